import { checkEvent, compileEnrichConfig, type CompiledEnrichConfig, type EnrichConfig } from "../../operators/enrich.js";
import type { Pipeline } from "../config/types.js";
import { formatDuration } from "../core/duration.js";
import { BadInputError, errorMessage, type DlqReason } from "../core/errors.js";

/*
 * `tacit publish` only writes to the input stream; enrich, in the worker, decides what goes to
 * the dead-letter queue. For the reasons that depend on the line alone (size, JSON, the event
 * contract, the timestamp against enrich's age and skew bounds) the publisher can tell in
 * advance, and warns when most of a file would be dead-lettered for one of them: the classic
 * case is an old simulated file whose every event is older than max_past_age.
 */

/** Why enrich would dead-letter a line: its DLQ reason, and for bad_timestamp which bound. */
export type PrecheckKind = Exclude<DlqReason, "bad_envelope" | "processing_failed" | "max_deliveries"> | "too_old" | "in_future";

/** A line enrich would dead-letter, as far as the line alone tells. */
export interface PrecheckFailure {
  kind: PrecheckKind;
  message: string;
}

/** What the check found over a file. */
export interface PrecheckSummary {
  /** Non-empty lines checked. */
  lines: number;
  /** Lines per kind of failure, with the first such line (1-based) and its message. */
  failures: Map<PrecheckKind, { count: number; line: number; message: string }>;
}

/** The enrich config of a pipeline's input stage, or undefined when its first stage is not enrich. */
export function inputEnrichConfig(p: Pipeline): CompiledEnrichConfig | undefined {
  const first = p.stages[0];
  return first?.operator === "enrich" ? compileEnrichConfig(first.config as EnrichConfig) : undefined;
}

/**
 * Judges one line (trimmed, non-empty) as enrich would if the stream stored it at `nowMs`,
 * using enrich's own checks; undefined when it passes them. Redis lookups and sampling are
 * not judged (they never dead-letter).
 */
export function precheckLine(line: string, cfg: CompiledEnrichConfig, nowMs: number): PrecheckFailure | undefined {
  const bytes = Buffer.byteLength(line, "utf8");
  if (bytes > cfg.maxEventBytes) return { kind: "oversized", message: `${bytes} bytes; max_event_bytes is ${cfg.maxEventBytes}` };
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (err) {
    return { kind: "malformed_json", message: errorMessage(err) };
  }
  const checked = checkEvent(value);
  if (checked instanceof BadInputError) return { kind: checked.code as PrecheckKind, message: checked.message };
  const { event, ts } = checked;
  // The same bounds enrich applies against the stream's time (here: now, when it will be stored).
  if (ts > nowMs + cfg.maxFutureSkewMs) {
    return { kind: "in_future", message: `timestamp ${event.timestamp} is ${formatDuration(ts - nowMs)} ahead of now (max_future_skew ${formatDuration(cfg.maxFutureSkewMs)})` };
  }
  if (ts < nowMs - cfg.maxPastAgeMs) {
    return { kind: "too_old", message: `timestamp ${event.timestamp} is ${formatDuration(nowMs - ts)} older than now (max_past_age ${formatDuration(cfg.maxPastAgeMs)})` };
  }
  return undefined;
}

/** Checks every line of a file (as `publishLines` would publish them). */
export async function precheckLines(lines: AsyncIterable<string> | Iterable<string>, cfg: CompiledEnrichConfig, nowMs: number): Promise<PrecheckSummary> {
  const summary: PrecheckSummary = { lines: 0, failures: new Map() };
  let n = 0;
  for await (const raw of lines) {
    n++;
    const line = raw.trim();
    if (line.length === 0) continue;
    summary.lines++;
    const f = precheckLine(line, cfg, nowMs);
    if (!f) continue;
    const seen = summary.failures.get(f.kind);
    if (seen) seen.count++;
    else summary.failures.set(f.kind, { count: 1, line: n, message: f.message });
  }
  return summary;
}

/** The DLQ reason enrich records for a kind of failure. */
export function dlqReasonOf(kind: PrecheckKind): DlqReason {
  return kind === "too_old" || kind === "in_future" ? "bad_timestamp" : kind;
}

/** The DLQ reason as the warning names it: bad_timestamp says which bound. */
function reasonText(kind: PrecheckKind, cfg: CompiledEnrichConfig): string {
  if (kind === "too_old") return `bad_timestamp (older than max_past_age ${formatDuration(cfg.maxPastAgeMs)})`;
  if (kind === "in_future") return `bad_timestamp (ahead by more than max_future_skew ${formatDuration(cfg.maxFutureSkewMs)})`;
  return kind;
}

function fixFor(kind: PrecheckKind, cfg: CompiledEnrichConfig): string {
  switch (kind) {
    case "too_old":
      return (
        `for simulated traffic run \`tacit simulate\` without --start (its traffic then ends now), or pass --start within the last ${formatDuration(cfg.maxPastAgeMs)}; ` +
        "for a real backfill raise stages.enrich.config.max_past_age in the pipeline the workers run"
      );
    case "in_future":
      return "check the producer's clock and time zone, or raise stages.enrich.config.max_future_skew";
    case "malformed_json":
      return "write one JSON object per line (JSONL), not a JSON array or pretty-printed JSON";
    case "schema_violation":
      return "make the events match config/schemas/event.v1.json (README, \"Input events\")";
    case "unknown_event_type":
      return "use the v1 event types (README, \"Input events\")";
    case "bad_timestamp":
      return "write timestamps in RFC 3339 with a time zone, e.g. 2026-05-01T12:00:00Z";
    case "oversized":
      return "shorten the events or raise stages.enrich.config.max_event_bytes";
  }
}

/**
 * One warning line when more than half of the lines would be dead-lettered for one reason:
 * the reason, the count, the first line and the fix. Undefined otherwise.
 */
export function precheckWarning(s: PrecheckSummary, cfg: CompiledEnrichConfig): string | undefined {
  let worst: [PrecheckKind, { count: number; line: number; message: string }] | undefined;
  for (const entry of s.failures) if (!worst || entry[1].count > worst[1].count) worst = entry;
  if (!worst || worst[1].count * 2 <= s.lines) return undefined;
  const [kind, f] = worst;
  const pct = Math.round((100 * f.count) / s.lines);
  return (
    `tacit: warning: ${f.count.toLocaleString("en-US")} of ${s.lines.toLocaleString("en-US")} lines (${pct} %) would be dead-lettered by enrich as ${reasonText(kind, cfg)} ` +
    `(line ${f.line}: ${f.message}); fix: ${fixFor(kind, cfg)}`
  );
}

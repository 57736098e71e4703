import type { Envelope } from "../core/event.js";
import { redactPii } from "../core/pii.js";
import { pipelineKey } from "../core/state.js";

/**
 * Signal-quality SLIs a worker keeps beside its counters (README "SLIs and alerts"): freshness
 * per device and cohort, the sampled post-enrich PII check, published labels by rule, weight,
 * model and position (drift and diversity), and what it polls on a timer (its durables' pending
 * counts, the drift PSI against the reference window in Redis, replay outcomes). Everything is
 * aggregated per batch or per tick; nothing is kept per user.
 */

/** Upper bounds of the label weight classes drift compares (the last class is everything above). */
export const WEIGHT_CLASSES = [0, 0.25, 0.5, 1, 2, 4, 8] as const;
/** Values kept per freshness dimension or diversity label; further values count as `other`. */
const MAX_VALUES = 32;
/** A window with fewer labels than this is too small to compare (its PSI is not updated). */
export const MIN_DRIFT_LABELS = 30;
/** Positions above this are counted as `<MAX_POSITION+1>+` (bounded label values). */
const MAX_POSITION = 10;

/** Adds `by` to `key` of a bounded map: a key beyond MAX_VALUES counts as `other`. */
function bump(m: Map<string, number>, key: string, by = 1): void {
  const cur = m.get(key);
  if (cur !== undefined) m.set(key, cur + by);
  else if (m.size < MAX_VALUES) m.set(key, by);
  else m.set("other", (m.get("other") ?? 0) + by);
}

/** Keeps the larger of `ts` and the stored value of `key` (bounded like {@link bump}). */
function newest(m: Map<string, number>, key: string, ts: number): void {
  const cur = m.get(key);
  if (cur === undefined) {
    if (m.size < MAX_VALUES) m.set(key, ts);
    else if (ts > (m.get("other") ?? -Infinity)) m.set("other", ts);
  } else if (ts > cur) m.set(key, ts);
}

/** The class of a label weight: the index of the first bound ≥ weight. */
export function weightClass(w: number): string {
  for (const b of WEIGHT_CLASSES) if (w <= b) return String(b);
  return "+Inf";
}

/**
 * Population stability index of `cur` against `ref` (counts by category, normalised here):
 * Σ (c − r) · ln(c / r), with a small floor for empty categories. 0 = same distribution;
 * by the usual reading < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 major shift.
 */
export function psi(ref: Readonly<Record<string, number>>, cur: Readonly<Record<string, number>>): number {
  const keys = new Set([...Object.keys(ref), ...Object.keys(cur)]);
  const total = (o: Readonly<Record<string, number>>) => Object.values(o).reduce((a, b) => a + b, 0);
  const rt = total(ref);
  const ct = total(cur);
  if (rt <= 0 || ct <= 0) return NaN;
  const floor = 1e-4;
  let sum = 0;
  for (const k of keys) {
    const r = Math.max(floor, (ref[k] ?? 0) / rt);
    const c = Math.max(floor, (cur[k] ?? 0) / ct);
    sum += (c - r) * Math.log(c / r);
  }
  return sum;
}

/** A published label as the runtime sees it (schema v1 fields, and v2's model/position when present). */
interface LabelView {
  kind?: unknown;
  rule?: unknown;
  weight?: unknown;
  model?: unknown;
  position?: unknown;
}

/** The counts drift compares, per dimension. */
export type DriftCounts = Record<"label_rule" | "label_weight", Record<string, number>>;

export class SliState {
  /** Newest event time (ms) per group and device / cohort, of events after enrich. */
  readonly newestByDevice = new Map<string, Map<string, number>>();
  readonly newestByCohort = new Map<string, Map<string, number>>();
  /** Newest event time whose state and online features are committed, per keyed group. */
  readonly featuresNewest = new Map<string, number>();
  /** Post-enrich PII check: inputs checked, and hits by kind (must stay 0). */
  piiChecked = 0;
  readonly piiHits = new Map<string, number>([["email", 0], ["phone", 0], ["card", 0], ["ip", 0]]);
  /** Labels published (first publication of each label id) by kind and rule: `kind\u0000rule`. */
  readonly firstLabels = new Map<string, number>();
  /** Labels published by rule and weight class, since start (drift takes differences per window). */
  readonly byRule = new Map<string, number>();
  readonly byWeight = new Map<string, number>(WEIGHT_CLASSES.map((b) => [String(b), 0]));
  /** Labelled responses by model and by position (diversity). */
  readonly byModel = new Map<string, number>();
  readonly byPosition = new Map<string, number>();

  constructor(readonly piiSampleEvery: number) {}

  /**
   * Inputs of one batch of a group after enrich: newest event time per device and cohort, and
   * every `piiSampleEvery`-th input (by stream sequence, so deterministic) scanned for PII in its
   * payload's text. A batch of the first group (raw events, no envelope) costs one check.
   */
  inputs(group: string, items: readonly { input: { seq: number; envelope?: Envelope } }[]): void {
    if (items.length === 0 || items[0]!.input.envelope === undefined) return;
    let dev = this.newestByDevice.get(group);
    let coh = this.newestByCohort.get(group);
    if (!dev || !coh) {
      this.newestByDevice.set(group, (dev = new Map()));
      this.newestByCohort.set(group, (coh = new Map()));
    }
    for (const { input } of items) {
      const ev = input.envelope?.event;
      if (!ev || !Number.isFinite(ev.ts)) continue;
      newest(dev, ev.ua?.device ?? "unknown", ev.ts);
      newest(coh, ev.cohort ?? "none", ev.ts);
      if (this.piiSampleEvery > 0 && input.seq % this.piiSampleEvery === 0) this.checkPii(ev.payload);
    }
  }

  private checkPii(payload: Record<string, unknown> | undefined): void {
    this.piiChecked++;
    if (!payload) return;
    for (const v of Object.values(payload)) {
      if (typeof v !== "string") continue;
      for (const kind of redactPii(v).found) this.piiHits.set(kind, (this.piiHits.get(kind) ?? 0) + 1);
    }
  }

  /** A keyed partition committed: its state and features reflect events up to `maxTs`. */
  committed(group: string, maxTs: number): void {
    if (maxTs > (this.featuresNewest.get(group) ?? -Infinity)) this.featuresNewest.set(group, maxTs);
  }

  /** A label published at revision `rev` (0 = the first publication of its id). */
  label(value: LabelView, rev: number): void {
    const kind = typeof value.kind === "string" ? value.kind : "unknown";
    const rule = typeof value.rule === "string" ? value.rule : "unknown";
    if (rev === 0) bump(this.firstLabels, `${kind}\u0000${rule}`);
    bump(this.byRule, rule);
    if (typeof value.weight === "number") bump(this.byWeight, weightClass(value.weight));
    if (kind !== "response") return;
    bump(this.byModel, typeof value.model === "string" ? value.model : "unknown");
    const pos = typeof value.position === "number" ? value.position : undefined;
    bump(this.byPosition, pos === undefined ? "none" : pos > MAX_POSITION ? `${MAX_POSITION + 1}+` : String(pos));
  }

  /** The label counts since start, per drift dimension. */
  driftCounts(): DriftCounts {
    return { label_rule: Object.fromEntries(this.byRule), label_weight: Object.fromEntries(this.byWeight) };
  }
}

/** What the poller reads: structural, so telemetry does not depend on the runtime. */
export interface SliSources {
  prefix: string;
  /** The durables this worker consumes now. */
  durables(): { stream: string; durable: string }[];
  consumerInfo(stream: string, durable: string): Promise<{ num_pending: number; num_ack_pending: number }>;
  redis: {
    get(key: string): Promise<string | null>;
    set(key: string, value: string, nx: "NX"): Promise<unknown>;
    hgetall(key: string): Promise<Record<string, string>>;
  };
  warn(obj: object, msg: string): void;
}

/** Redis key of the drift reference window (a JSON {@link DriftCounts} with `at`). */
export const driftReferenceKey = (prefix: string): string => pipelineKey(prefix, "drift", "reference");
/** Redis hash of replay runs: a count per outcome, `last_at` (ms) and `last_outcome`. */
export const replayRunsKey = (prefix: string): string => pipelineKey(prefix, "replay", "runs");
/** Outcomes of `tacit replay` (see executeReplay). */
export const REPLAY_OUTCOMES = ["caught_up", "not_caught_up", "failed"] as const;

function diff(now: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(now)) if (v - (before[k] ?? 0) > 0) out[k] = v - (before[k] ?? 0);
  return out;
}

/**
 * Polls, every `intervalMs`: pending and ack-pending of the worker's durables; replay outcomes
 * from Redis; and, every `driftWindowMs`, the drift PSI of the labels published in the window
 * against the reference window in Redis (the first full window any worker saw, kept until
 * someone deletes the key).
 */
export class SliPoller {
  readonly pending = new Map<string, { stream: string; durable: string; pending: number; ackPending: number }>();
  readonly psi = new Map<string, number>();
  replay: Record<string, string> = {};
  private timer?: NodeJS.Timeout;
  private windowStart: { at: number; counts: DriftCounts };
  private busy = false;

  constructor(
    private readonly s: SliSources,
    private readonly state: SliState,
    private readonly intervalMs: number,
    private readonly driftWindowMs: number,
  ) {
    this.windowStart = { at: Date.now(), counts: state.driftCounts() };
  }

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.intervalMs);
    this.timer.unref();
    void this.tick();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** One poll; errors are logged, the last values stay. */
  async tick(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      const ds = this.s.durables();
      const infos = await Promise.all(ds.map((d) => this.s.consumerInfo(d.stream, d.durable).catch(() => undefined)));
      this.pending.clear();
      ds.forEach((d, i) => {
        const ci = infos[i];
        if (ci) this.pending.set(`${d.stream}/${d.durable}`, { ...d, pending: ci.num_pending, ackPending: ci.num_ack_pending });
      });
      this.replay = await this.s.redis.hgetall(replayRunsKey(this.s.prefix));
      if (Date.now() - this.windowStart.at >= this.driftWindowMs) await this.drift();
    } catch (err) {
      this.s.warn({ err: String(err) }, "SLI poll failed");
    } finally {
      this.busy = false;
    }
  }

  private async drift(): Promise<void> {
    const now = this.state.driftCounts();
    const window: DriftCounts = { label_rule: diff(now.label_rule, this.windowStart.counts.label_rule), label_weight: diff(now.label_weight, this.windowStart.counts.label_weight) };
    const n = Object.values(window.label_rule).reduce((a, b) => a + b, 0);
    // Too few labels to compare: the window goes on.
    if (n < MIN_DRIFT_LABELS) return;
    this.windowStart = { at: Date.now(), counts: now };
    const key = driftReferenceKey(this.s.prefix);
    await this.s.redis.set(key, JSON.stringify({ at: new Date().toISOString(), ...window }), "NX");
    const ref = JSON.parse((await this.s.redis.get(key)) ?? "{}") as Partial<DriftCounts>;
    for (const dim of ["label_rule", "label_weight"] as const) {
      const v = psi(ref[dim] ?? {}, window[dim]);
      if (Number.isFinite(v)) this.psi.set(dim, v);
    }
  }
}

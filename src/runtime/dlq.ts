import { AckPolicy, DeliverPolicy, JetStreamApiError } from "@nats-io/jetstream";
import { headers as natsHeaders } from "@nats-io/transport-node";
import type { Pipeline } from "../config/types.js";
import { ConfigError, TacitError, errorMessage } from "../core/errors.js";
import type { OperatorSpec } from "../core/operator.js";
import type { NatsHandles } from "./nats.js";
import { stageGroups, streamName } from "../config/topology.js";
import { DLQ_HEADERS } from "./outputs.js";

/*
 * Dead letters (`<p>.dlq.<stage>`, stream `<name>_dlq`) carry the original bytes and headers
 * naming the stage, reason, message and source (stream, subject, sequence). `redrive` publishes
 * the bytes again to the source subject — the input of the stage group that failed, which for
 * enrich is the producer's `<p>.in.<event_type>` — with `Nats-Msg-Id: redrive:<dlq seq>` and
 * `Tacit-Redriven: <n + 1>`, then deletes the letter from the DLQ stream: the DLQ holds what
 * still needs attention. A redriven event that fails again comes back with `Tacit-Redriven` set
 * and is not redriven again unless asked (`again`), so nothing loops.
 */

/** One dead letter as stored. */
export interface DeadLetter {
  /** Sequence in the DLQ stream. */
  seq: number;
  time: string;
  subject: string;
  stage: string;
  reason: string;
  message: string;
  source_stream?: string;
  source_subject?: string;
  source_seq?: number;
  /** How often the event was redriven before it failed this time. */
  redriven: number;
  data: Uint8Array;
}

export interface DlqFilter {
  stage?: string;
  reason?: string;
}

function dlqStream(p: Pipeline): string {
  return streamName(p, "dlq");
}

function checkStage(p: Pipeline, stage: string | undefined): void {
  if (stage !== undefined && !p.stages.some((s) => s.name === stage)) {
    throw new ConfigError(`unknown stage ${stage}: the stages of ${p.name} are ${p.stages.map((s) => s.name).join(", ")}`);
  }
}

/** Every dead letter of the pipeline (of one stage, of one reason), oldest first. */
export async function readDeadLetters(p: Pipeline, nats: NatsHandles, filter: DlqFilter = {}): Promise<DeadLetter[]> {
  checkStage(p, filter.stage);
  const stream = dlqStream(p);
  let total: number;
  try {
    total = (await nats.jsm.streams.info(stream)).state.messages;
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === 10059) throw new TacitError("not_deployed", `stream ${stream} does not exist: run \`tacit deploy\` first`);
    throw err;
  }
  const out: DeadLetter[] = [];
  if (total === 0) return out;
  const name = `dlq_read_${Math.random().toString(36).slice(2, 10)}`;
  const subject = filter.stage ? `${p.subject_prefix}.dlq.${filter.stage}` : `${p.subject_prefix}.dlq.>`;
  await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.All, filter_subject: subject, inactive_threshold: 30_000_000_000, mem_storage: true });
  try {
    const c = await nats.js.consumers.get(stream, name);
    let seen = 0;
    while (seen < total) {
      let got = 0;
      for await (const m of await c.fetch({ max_messages: 1000, expires: 1000 })) {
        got++;
        seen++;
        const h = (k: string) => m.headers?.get(k) || undefined;
        const letter: DeadLetter = {
          seq: m.seq,
          time: m.time.toISOString(),
          subject: m.subject,
          stage: h("Tacit-Stage") ?? m.subject.split(".").pop() ?? "?",
          reason: h("Tacit-Reason") ?? "unknown",
          message: h("Tacit-Message") ?? "",
          source_stream: h("Tacit-Source-Stream"),
          source_subject: h("Tacit-Source-Subject"),
          source_seq: h("Tacit-Source-Seq") ? Number(h("Tacit-Source-Seq")) : undefined,
          redriven: Number(h(DLQ_HEADERS.redriven) ?? 0) || 0,
          data: m.data,
        };
        if (filter.reason === undefined || letter.reason === filter.reason) out.push(letter);
      }
      if (got === 0) break;
    }
  } finally {
    await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
  }
  return out;
}

/** A dead letter as shown: its bytes as text, cut short. */
export interface DeadLetterSample {
  seq: number;
  time: string;
  stage: string;
  reason: string;
  message: string;
  source_subject?: string;
  redriven: number;
  data: string;
}

/** Counts by stage and reason, and a few samples of each. */
export interface DlqSummary {
  pipeline: string;
  total: number;
  /** stage → reason → count. */
  by_stage: Record<string, Record<string, number>>;
  /** Letters of events that were redriven and failed again (not redriven again without `--again`). */
  redriven_and_failed_again: number;
  samples: DeadLetterSample[];
}

const PREVIEW_BYTES = 300;

/** Summarizes dead letters: counts, and up to `perReason` samples of each stage and reason. */
export function summarize(p: Pipeline, letters: DeadLetter[], perReason = 2): DlqSummary {
  const by: Record<string, Record<string, number>> = {};
  const samples: DeadLetterSample[] = [];
  const dec = new TextDecoder();
  for (const l of letters) {
    const s = (by[l.stage] ??= {});
    s[l.reason] = (s[l.reason] ?? 0) + 1;
    if (s[l.reason]! <= perReason) {
      const text = dec.decode(l.data.subarray(0, PREVIEW_BYTES));
      samples.push({
        seq: l.seq,
        time: l.time,
        stage: l.stage,
        reason: l.reason,
        message: l.message,
        ...(l.source_subject ? { source_subject: l.source_subject } : {}),
        redriven: l.redriven,
        data: l.data.length > PREVIEW_BYTES ? `${text}… (${l.data.length} bytes)` : text,
      });
    }
  }
  return { pipeline: p.name, total: letters.length, by_stage: by, redriven_and_failed_again: letters.filter((l) => l.redriven > 0).length, samples };
}

/** Human text of a summary. */
export function formatSummary(s: DlqSummary): string {
  if (s.total === 0) return `no dead letters in ${s.pipeline}`;
  const lines = [`${s.total} dead letters in ${s.pipeline}${s.redriven_and_failed_again ? ` (${s.redriven_and_failed_again} failed again after a redrive)` : ""}`];
  for (const [stage, reasons] of Object.entries(s.by_stage)) {
    for (const [reason, n] of Object.entries(reasons).sort((a, b) => b[1] - a[1])) lines.push(`  ${stage.padEnd(16)} ${reason.padEnd(20)} ${String(n).padStart(7)}`);
  }
  lines.push("samples:");
  for (const x of s.samples) {
    lines.push(`  #${x.seq} ${x.time} [${x.stage}] ${x.reason}${x.redriven ? ` (redriven ${x.redriven}×)` : ""}: ${x.message}`);
    lines.push(`    ${x.data.replace(/\s+/g, " ")}`);
  }
  return lines.join("\n");
}

export interface RedriveOptions extends DlqFilter {
  /** Also redrive letters of events that were redriven before and failed again. */
  again?: boolean;
  dryRun?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export interface RedriveResult {
  pipeline: string;
  dry_run: boolean;
  /** Letters matching the filter. */
  matched: number;
  redriven: number;
  /** Letters skipped because their event was redriven before and failed again. */
  skipped_already_redriven: number;
  /** Redriven, by stage. */
  by_stage: Record<string, number>;
}

/** Subjects a redrive may publish to: the pipeline's stage inputs (never an output). */
function redriveTarget(p: Pipeline, operators: (n: string) => OperatorSpec<any> | undefined, l: DeadLetter): string {
  const subj = l.source_subject;
  const pre = p.subject_prefix;
  const groups = stageGroups(p, operators);
  const ok =
    subj !== undefined &&
    (subj.startsWith(`${pre}.in.`) || groups.some((g) => subj.startsWith(`${pre}.x.${g.name}.`)));
  if (!ok) throw new TacitError("bad_dead_letter", `dead letter #${l.seq} has no usable Tacit-Source-Subject (${subj ?? "none"}): it cannot be redriven`);
  return subj;
}

/**
 * Re-injects dead letters into the input of the stage group that failed (original bytes,
 * original subject), then deletes them from the DLQ stream. Idempotent under a crash: a letter
 * redriven but not yet deleted is published again with the same `redrive:<seq>` id, which the
 * stream's duplicate window drops.
 */
export async function redrive(p: Pipeline, nats: NatsHandles, operators: (n: string) => OperatorSpec<any> | undefined, opts: RedriveOptions = {}): Promise<RedriveResult> {
  const letters = await readDeadLetters(p, nats, opts);
  const chosen = letters.filter((l) => opts.again || l.redriven === 0);
  const result: RedriveResult = {
    pipeline: p.name,
    dry_run: !!opts.dryRun,
    matched: letters.length,
    redriven: 0,
    skipped_already_redriven: letters.length - chosen.length,
    by_stage: {},
  };
  const targets = chosen.map((l) => redriveTarget(p, operators, l));
  if (opts.dryRun) {
    for (const l of chosen) result.by_stage[l.stage] = (result.by_stage[l.stage] ?? 0) + 1;
    result.redriven = chosen.length;
    return result;
  }
  const stream = dlqStream(p);
  // Windows of publishes in flight (one connection keeps their order), then the deletes.
  const WINDOW = 256;
  for (let at = 0; at < chosen.length; at += WINDOW) {
    const batch = chosen.slice(at, at + WINDOW);
    try {
      await Promise.all(
        batch.map((l, j) => {
          const h = natsHeaders();
          h.set(DLQ_HEADERS.redriven, String(l.redriven + 1));
          h.set("Tacit-Redrive-Of", String(l.seq));
          return nats.js.publish(targets[at + j]!, l.data, { msgID: `redrive:${l.seq}`, headers: h, timeout: 10_000 });
        }),
      );
      await Promise.all(batch.map((l) => nats.jsm.streams.deleteMessage(stream, l.seq, false)));
    } catch (err) {
      throw new TacitError("redrive_failed", `redriving dead letters failed after ${result.redriven} of ${chosen.length}: ${errorMessage(err)}; run the redrive again (it is idempotent within the input streams' duplicate window)`, { cause: err });
    }
    for (const l of batch) result.by_stage[l.stage] = (result.by_stage[l.stage] ?? 0) + 1;
    result.redriven += batch.length;
    opts.onProgress?.(result.redriven, chosen.length);
  }
  return result;
}

/** Human text of a redrive. */
export function formatRedrive(r: RedriveResult): string {
  const verb = r.dry_run ? "would redrive" : "redrove";
  const stages = Object.entries(r.by_stage).map(([s, n]) => `${s} ${n}`).join(", ");
  const lines = [`${verb} ${r.redriven} of ${r.matched} dead letters${stages ? ` (${stages})` : ""}`];
  if (r.skipped_already_redriven) lines.push(`skipped ${r.skipped_already_redriven} that were redriven before and failed again (fix the cause, then use --again)`);
  if (!r.dry_run && r.redriven) lines.push("redriven letters were removed from the DLQ; those that fail again come back to it marked Tacit-Redriven");
  return lines.join("\n");
}

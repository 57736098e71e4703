import type { NatsConnection } from "@nats-io/transport-node";
import type { Pipeline } from "../config/types.js";
import { TransientError, errorMessage } from "../core/errors.js";
import { spliceAttrs, type Envelope } from "../core/event.js";
import { LABEL_OUTPUTS, type Emit } from "../core/operator.js";
import type { CommitGroup, StateStore } from "../core/state.js";
import type { StageCounters } from "../telemetry/metrics.js";
import type { RuntimeObserver } from "../telemetry/otel.js";
import { startStageSpan } from "../telemetry/tracing.js";
import type { MsgResult } from "./chain.js";
import { PublishGroup, publisherFor, type HeaderPairs } from "./jspub.js";
import { OP_REVISION_HEADER, decideLabel, labelContentHash, publishedKey, type PublishedLabel } from "./label-registry.js";
import { dlqSubject, nextSubject, outputSubject, type StageGroup } from "../config/topology.js";

/**
 * Outputs of a batch: every emit and dead letter, published with deterministic `Nats-Msg-Id`s,
 * many in flight; labels through the published-label registry. The dead-letter headers are
 * defined here once, for the worker that writes them and the DLQ readers (dlq.ts, tail, demo).
 */

/** Headers of a dead letter. */
export const DLQ_HEADERS = {
  stage: "Tacit-Stage",
  reason: "Tacit-Reason",
  message: "Tacit-Message",
  sourceStream: "Tacit-Source-Stream",
  sourceSubject: "Tacit-Source-Subject",
  sourceSeq: "Tacit-Source-Seq",
  /** Counts how often a dead letter was redriven; carried through stages so a redrive is not retried forever. */
  redriven: "Tacit-Redriven",
  redriveOf: "Tacit-Redrive-Of",
} as const;

/** What a message of a batch is, for its outputs: its bytes, subject and sequence (dead letters carry them). */
export interface SourceMsg {
  subject: string;
  seq: number;
  data: Uint8Array;
}

export class Outputs {
  constructor(
    private readonly p: Pipeline,
    private readonly groups: StageGroup[],
    private readonly nc: NatsConnection,
    private readonly state: StateStore,
    /** The worker's counters of a stage: a group's publishes sent again are counted under its first stage. */
    private readonly counters: (stage: string) => StageCounters,
    private readonly observer?: RuntimeObserver,
  ) {}

  /**
   * Decides which label emits are published, and at which revision, from the published-label
   * registry (see replay.ts): a label computed again with the same content is not published
   * again, whatever the stream's duplicate window. Returns the decisions by emit and the
   * registry updates, which are committed after the publishes (a crash in between publishes the
   * same ids again, which JetStream drops).
   */
  private async planLabels(results: MsgResult[], sink: MsgResult, pending: Map<string, PublishedLabel | undefined>): Promise<{ plan: Map<Emit, { rev: number; k: number } | null>; commits: CommitGroup[] }> {
    const labels: Emit[] = [];
    for (const r of [...results, sink]) {
      if (r.retry || r.error) continue;
      for (const { emit } of r.emits) {
        const v = emit.value as { label_id?: unknown; user?: unknown; revision?: unknown } | null;
        if (LABEL_OUTPUTS.has(emit.to) && v && typeof v.label_id === "string" && typeof v.user === "string" && typeof v.revision === "number") labels.push(emit);
      }
    }
    const plan = new Map<Emit, { rev: number; k: number } | null>();
    if (labels.length === 0) return { plan, commits: [] };
    const keyOf = (e: Emit) => {
      const v = e.value as { label_id: string; user: string };
      return publishedKey(this.p.subject_prefix, v.user, v.label_id);
    };
    const keys = [...new Set(labels.map(keyOf))].filter((k) => !pending.has(k));
    const stored = keys.length ? await this.state.get(keys) : [];
    const reg = pending;
    keys.forEach((k, i) => reg.set(k, stored[i] ? (JSON.parse(stored[i]!) as PublishedLabel) : undefined));
    const changed = new Set<string>();
    for (const e of labels) {
      const key = keyOf(e);
      const k = (e.value as { revision: number }).revision;
      const d = decideLabel(reg.get(key), k, labelContentHash(e.value as Record<string, unknown>));
      plan.set(e, d.publishAt === undefined ? null : { rev: d.publishAt, k });
      if (d.publishAt !== undefined) this.observer?.label?.(e.value as Record<string, unknown>, d.publishAt);
      if (d.next !== reg.get(key)) {
        reg.set(key, d.next);
        changed.add(key);
      }
    }
    // The registry lives as long as the label stream keeps messages (plus a day).
    const ttl = this.p.streams.max_age_ms + 86_400_000;
    const commits: CommitGroup[] = [...changed].map((key) => ({ ops: [{ op: "set", key, value: JSON.stringify(reg.get(key)), ttl_ms: ttl }] }));
    return { plan, commits };
  }

  /**
   * Publishes the emits and dead letters of a batch, all in flight at once (bounded). `msgs[i]`
   * is the message of `results[i]`. Returns the registry updates of the labels it published, to
   * commit with the batch. `registry` holds registry entries decided but not committed yet (the
   * caller clears it after each commit): it is read before Redis and updated.
   */
  async publish(g: StageGroup, msgs: SourceMsg[], results: MsgResult[], sink: MsgResult, registry: Map<string, PublishedLabel | undefined>): Promise<CommitGroup[]> {
    const { plan, commits } = await this.planLabels(results, sink, registry);
    const c = this.counters(g.stages[0]!.name);
    const pending = new PublishGroup((why) => c.count("publish_resent", 1, why === "unanswered" ? RESENT_UNANSWERED : RESENT_NO_RESPONDERS));
    await this.issue(g, msgs, results, sink, plan, pending);
    return commits;
  }

  /** Sends every output of the batch into `pending` and waits for their PubAcks. */
  private async issue(g: StageGroup, msgs: SourceMsg[], results: MsgResult[], sink: MsgResult, plan: Map<Emit, { rev: number; k: number } | null>, pending: PublishGroup): Promise<void> {
    const p = this.p;
    const pub = publisherFor(this.nc);
    // Issued without an await in between (until max_in_flight are out), so a batch's publishes
    // leave in a few socket writes.
    const limit = p.runtime.max_in_flight;
    const send = (subject: string, data: Uint8Array, msgID: string, hdrs?: HeaderPairs) => pub.send(pending, subject, data, { msgID, headers: hdrs });
    // Awaited only when full: an await per input would yield to nats.js's flush each time.
    const drain = () => pending.wait();
    const last = g.index === this.groups.length - 1;
    const now = Date.now();
    const observer = this.observer;
    const emitOut = (e: Emit, traceparent?: string, redriven?: string, source?: SourceMsg, envelope?: Envelope) => {
      let value = e.value;
      let id = e.id;
      let hdrs: HeaderPairs | undefined;
      const decided = plan.size ? plan.get(e) : undefined;
      if (decided === null) return;
      if (decided) {
        if (decided.rev !== decided.k) {
          const label = e.value as { label_id: string; revision: number };
          value = { ...label, revision: decided.rev };
          id = `label:${label.label_id}:${decided.rev}`;
        }
        (hdrs ??= []).push([OP_REVISION_HEADER, String(decided.k)]);
      }
      const subject = e.to === "next" ? nextSubject(p, this.groups, g, (e.value as Envelope).partition) : outputSubject(p, e.to);
      if (traceparent) (hdrs ??= []).push(["traceparent", traceparent]);
      if (redriven && e.to === "next") (hdrs ??= []).push([DLQ_HEADERS.redriven, redriven]);
      if (observer && ((e.to === "next" && last) || LABEL_OUTPUTS.has(e.to))) {
        const ts = e.to === "next" ? (e.value as Envelope).event.ts : Date.parse((e.value as { event_time?: string }).event_time ?? "");
        if (Number.isFinite(ts)) observer.endToEnd(g.name, now - ts, e.to === "next" ? "next" : "label");
      }
      // An envelope no stage changed leaves as the bytes it came in as, one that stages only
      // annotated as those bytes with the annotations spliced in: the event is not encoded again.
      const data = source && envelope !== undefined ? (value === envelope ? source.data : (spliceAttrs(source.data, envelope, value) ?? Buffer.from(JSON.stringify(value)))) : Buffer.from(JSON.stringify(value));
      send(subject, data, id, hdrs);
    };
    for (let i = 0; i < results.length; i++) {
      const r = results[i]!;
      if (r.retry) continue;
      if (r.error) {
        // A fenced input was dead-lettered when it was first read (or since redriven): once is enough.
        if (r.replayed) continue;
        const m = msgs[i]!;
        const h: HeaderPairs = [
          [DLQ_HEADERS.stage, r.error.stage],
          [DLQ_HEADERS.reason, r.error.err.code],
          [DLQ_HEADERS.message, r.error.err.message.replace(/[\r\n]+/g, " ").slice(0, 1000)],
          [DLQ_HEADERS.sourceStream, g.inputStream],
          [DLQ_HEADERS.sourceSubject, m.subject],
          [DLQ_HEADERS.sourceSeq, String(m.seq)],
        ];
        if (r.redriven) h.push([DLQ_HEADERS.redriven, r.redriven]);
        send(dlqSubject(p, r.error.stage), m.data, `dlq:${g.inputStream}:${m.seq}`, h);
        if (pending.size >= limit) await drain();
        continue;
      }
      const span = startStageSpan(r.traceparent, g.name);
      for (const { emit } of r.emits) emitOut(emit, span?.traceparent, r.redriven, msgs[i], r.envelope);
      if (pending.size >= limit) await drain();
      span?.span.end();
    }
    for (const { emit } of sink.emits) {
      emitOut(emit);
      if (pending.size >= limit) await drain();
    }
    try {
      await pending.wait();
    } catch (err) {
      throw new TransientError("publish_failed", `publishing outputs failed: ${errorMessage(err)}`, err);
    }
  }
}

/** The reasons of `tacit_publish_resent_total`: unanswered for RESEND_AFTER_MS, or answered 503 (see jspub.ts). */
export const RESENT_UNANSWERED = { reason: "unanswered" };
export const RESENT_NO_RESPONDERS = { reason: "no_responders" };

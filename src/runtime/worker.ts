import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { DeliverPolicy, JetStreamApiError, JetStreamError, type Consumer, type JsMsg } from "@nats-io/jetstream";
import type { Redis, Cluster } from "ioredis";
import type { Pipeline, Stage } from "../config/types.js";
import { ManualClock } from "../core/clock.js";
import type { Envelope } from "../core/event.js";
import { BadInputError, TacitError, TransientError, errorMessage } from "../core/errors.js";
import type { Emit, Logger, OperatorSpec, Outcome, Processor, StageInput } from "../core/operator.js";
import { LeaseLostError, partitionKey, pipelineKey, type CommitGroup, type CommitLease, type StateStore } from "../core/state.js";
import { RedisStateStore, openPipelineRedis } from "../state/redis.js";
import { StageCounters } from "../telemetry/metrics.js";
import type { RuntimeObserver } from "../telemetry/otel.js";
import { startStageSpan } from "../telemetry/tracing.js";
import { ControlLoop } from "./control.js";
import { PartitionLeases } from "./leases.js";
import { connectNats, type NatsHandles } from "./nats.js";
import { publisherFor } from "./jspub.js";
import { OP_REVISION_HEADER, decideLabel, fenceField, fencesKey, labelContentHash, parseFence, publishedKey, type Fence, type PublishedLabel } from "./replay.js";
import { dlqSubject, durableName, nextSubject, outputSubject, stageGroups, type StageGroup } from "./topology.js";

const encoder = new TextEncoder();
/** How long one pull request waits for messages; also the longest a stop waits for it. */
const FETCH_EXPIRES_MS = 2000;
const decoder = new TextDecoder();

export interface WorkerOptions {
  pipeline: Pipeline;
  operators: (name: string) => OperatorSpec<any> | undefined;
  /** Run only these groups (by first stage name); all when absent. */
  groups?: string[];
  workerId?: string;
  devMode?: boolean;
  env?: Readonly<Record<string, string | undefined>>;
  log: Logger;
  /** Injected for tests; opened from the pipeline's URL otherwise. */
  redis?: Redis | Cluster;
  nats?: NatsHandles;
  /** Receives batch timings, end-to-end latencies and watermark lags (OpenTelemetry in `tacit run`). */
  observer?: RuntimeObserver;
}

/** What one input message came to, across the stages of its group. */
interface MsgResult {
  emits: { stage: string; emit: Emit }[];
  commits: CommitGroup[];
  error?: { stage: string; err: TacitError };
  /** A retryable per-message error: nak this message (unkeyed groups) instead of settling it. */
  retry?: { stage: string; err: TacitError };
  /** The traceparent its outputs carry, when the input had one. */
  traceparent?: string;
  /** `Tacit-Redriven` of the input: carried to its outputs and dead letters (a redrive is not retried forever). */
  redriven?: string;
  /** A replayed input below its durable's fence: its outputs were published before (labels excepted). */
  replayed?: boolean;
}

/** Header counting how often a dead letter was redriven; carried through stages. */
export const REDRIVEN_HEADER = "Tacit-Redriven";

/** Outputs that are still published for inputs below a replay fence: labels, which the registry de-duplicates by content. */
function keptOnReplay(e: Emit): boolean {
  return e.to.startsWith("labels.");
}

/** Drops what a fenced (already published) input or timer produced, except labels. */
function fenceOff(r: MsgResult): void {
  r.emits = r.emits.filter((x) => keptOnReplay(x.emit));
  r.replayed = true;
}

/** An input travelling through a group's stages; `msg` is -1 for records born from a watermark timer. */
interface Item {
  msg: number;
  input: StageInput;
}

/** Per-partition event-time progress of a keyed group, persisted with the state. */
interface WatermarkState {
  maxTs?: number;
  wm?: number;
}

/**
 * A worker runs the stage groups of a pipeline: a shared durable for unkeyed groups, and the
 * partitions it holds a lease on for keyed ones. Per batch: decode, run the group's operators,
 * publish every output (many in flight, deterministic Nats-Msg-Id), apply state commits, then
 * settle each message exactly once (ack; term after dead-lettering; nak for a retryable error).
 */
export class Worker {
  readonly id: string;
  readonly counters = new Map<string, StageCounters>();
  private readonly groups: StageGroup[];
  private readonly allGroups: StageGroup[];
  private nats?: NatsHandles;
  private redis?: Redis | Cluster;
  private ownsConnections = { nats: false, redis: false };
  private state?: StateStore;
  /**
   * One operator instance per stage and partition (Flink's parallel subtask): partitions of a
   * keyed group run concurrently, and an operator may keep per-batch state in memory between
   * `process` and `onWatermark`.
   */
  private readonly processors = new Map<string, Promise<Processor>>();
  private readonly clocks = new Map<string, ManualClock>();
  private readonly runners = new Map<string, ConsumerRunner>();
  /** Lease loops of the keyed groups that are running (absent while a group is paused). */
  private readonly leases = new Map<string, PartitionLeases>();
  /** Groups paused by `tacit replay` (through the control hash). */
  private readonly paused = new Set<string>();
  private control?: ControlLoop;
  private stopping = false;
  private started = false;

  constructor(private readonly opts: WorkerOptions) {
    const p = opts.pipeline;
    this.id = opts.workerId ?? `${hostname()}-${process.pid}-${randomBytes(3).toString("hex")}`;
    this.allGroups = stageGroups(p, opts.operators);
    this.groups = opts.groups ? this.allGroups.filter((g) => opts.groups!.includes(g.name)) : this.allGroups;
    for (const s of p.stages) this.counters.set(s.name, new StageCounters(s.name));
  }

  get pipeline(): Pipeline {
    return this.opts.pipeline;
  }

  async start(): Promise<void> {
    const p = this.opts.pipeline;
    this.nats = this.opts.nats ?? (await connectNats(p, `tacit-worker-${this.id}`));
    this.ownsConnections.nats = !this.opts.nats;
    this.redis = this.opts.redis ?? openPipelineRedis(p);
    this.ownsConnections.redis = !this.opts.redis;
    this.state = new RedisStateStore(this.redis);
    // Create each stage's first instance now, so a bad config or a missing secret fails the start.
    for (const g of this.groups) for (const s of g.stages) await this.processorFor(s, undefined);
    // The control loop starts every group that is not paused, before it returns: a worker
    // started during a replay does not touch the paused groups.
    this.control = new ControlLoop(this.redis, p.subject_prefix, this.id, this.groups.map((g) => g.name), {
      pause: (name) => this.pauseGroup(name),
      resume: (name) => this.resumeGroup(name),
    }, this.opts.log);
    await this.control.start();
    this.started = true;
  }

  private group(name: string): StageGroup {
    const g = this.groups.find((x) => x.name === name);
    if (!g) throw new TacitError("unknown_group", `this worker does not run stage group ${name}`);
    return g;
  }

  /** Starts consuming a group: its shared durable, or leases on its partitions. */
  private async resumeGroup(name: string): Promise<void> {
    if (this.stopping) return;
    const g = this.group(name);
    this.paused.delete(name);
    if (!g.keyed) {
      if (!this.runners.has(this.runnerKey(g))) await this.startRunner(g);
      return;
    }
    if (this.leases.has(name)) return;
    const p = this.opts.pipeline;
    const leases = new PartitionLeases(this.redis!, p.subject_prefix, g.name, p.partitions, this.id, p.runtime.lease_ttl_ms, {
      // Started beside the lease loop, not inside it: starting a runner takes a few round trips,
      // and a lease tick that waits for several would renew the other leases too late.
      acquired: async (n) => this.startSoon(g, n),
      releasing: (n) => this.stopRunner(g, n, true),
      lost: (n) => this.stopRunner(g, n, false),
    }, this.opts.log);
    this.leases.set(name, leases);
    await leases.start();
  }

  /** Starts a partition's runner in the background; retries while this worker still holds the lease. */
  private startSoon(g: StageGroup, n: number): void {
    const held = () => !this.paused.has(g.name) && !this.stopping && (this.leases.get(g.name)?.owned().includes(n) ?? false);
    if (!held() || this.runners.has(this.runnerKey(g, n))) return;
    this.startRunner(g, n).catch((err) => {
      this.opts.log.warn({ group: g.name, partition: n, err: errorMessage(err) }, "could not start partition; retrying");
      setTimeout(() => this.startSoon(g, n), 1000).unref();
    });
  }

  /** @internal True while this worker holds the lease of a keyed group's partition (the key PartitionLeases writes). */
  async holdsLease(g: StageGroup, n: number): Promise<boolean> {
    return (await this.redis!.get(pipelineKey(this.opts.pipeline.subject_prefix, "lease", g.name, n))) === this.id;
  }

  /**
   * Stops consuming a group, settling what is in flight: every partition's runner stops at
   * once (finishing its batch), then the leases are given up, so no other worker takes a
   * partition while this one still settles it.
   */
  private async pauseGroup(name: string): Promise<void> {
    const g = this.group(name);
    this.paused.add(name);
    if (!g.keyed) {
      await this.stopRunner(g, undefined, true);
      return;
    }
    const leases = this.leases.get(name);
    this.leases.delete(name);
    const mine = [...this.runners.keys()].filter((k) => k.startsWith(`${g.name}#`)).map((k) => Number(k.slice(g.name.length + 1)));
    await Promise.all(mine.map((n) => this.stopRunner(g, n, true)));
    await leases?.stop();
  }

  /** Ready: started, not stopping, and NATS and Redis connected. */
  ready(): boolean {
    return this.started && !this.stopping && !!this.nats && !this.nats.nc.isClosed() && (this.redis as { status?: string } | undefined)?.status === "ready";
  }

  /** @internal */
  get observer(): RuntimeObserver | undefined {
    return this.opts.observer;
  }

  /** @internal */
  get isLastGroup(): (g: StageGroup) => boolean {
    return (g) => g.index === this.allGroups.length - 1;
  }

  private clockOf(stage: string, partition?: number): ManualClock {
    const key = `${stage}#${partition ?? ""}`;
    let c = this.clocks.get(key);
    if (!c) this.clocks.set(key, (c = new ManualClock(0)));
    return c;
  }

  /** The operator instance of a stage for one partition (created on first use). */
  private processorFor(s: Stage, partition: number | undefined): Promise<Processor> {
    const key = `${s.name}#${partition ?? ""}`;
    let proc = this.processors.get(key);
    if (!proc) {
      const p = this.opts.pipeline;
      const spec = this.opts.operators(s.operator);
      if (!spec) return Promise.reject(new TacitError("unknown_operator", `stage ${s.name}: unknown operator ${s.operator}`));
      const ctx = {
        pipeline: p.name,
        prefix: p.subject_prefix,
        stage: s.name,
        partitions: p.partitions,
        state: this.state!,
        clock: this.clockOf(s.name, partition),
        log: this.opts.log,
        metrics: this.counters.get(s.name)!,
        env: this.opts.env ?? process.env,
        devMode: this.opts.devMode ?? false,
      };
      proc = Promise.resolve(spec.create(s.config, ctx));
      this.processors.set(key, proc);
    }
    return proc;
  }

  /** Partitions this worker holds, per keyed group. */
  ownedPartitions(): Record<string, number[]> {
    return Object.fromEntries(this.groups.filter((g) => g.keyed).map((g) => [g.name, this.leases.get(g.name)?.owned() ?? []]));
  }

  private runnerKey(g: StageGroup, n?: number): string {
    return n === undefined ? g.name : `${g.name}#${n}`;
  }

  private async startRunner(g: StageGroup, partition?: number): Promise<void> {
    const r = new ConsumerRunner(this, g, partition);
    this.runners.set(this.runnerKey(g, partition), r);
    try {
      await r.start();
    } catch (err) {
      this.runners.delete(this.runnerKey(g, partition));
      throw err;
    }
    this.reportOwned(g);
  }

  private reportOwned(g: StageGroup): void {
    if (g.keyed) this.opts.observer?.partitionsOwned(g.name, [...this.runners.keys()].filter((k) => k.startsWith(`${g.name}#`)).length);
  }

  private async stopRunner(g: StageGroup, partition: number | undefined, settle: boolean): Promise<void> {
    const key = this.runnerKey(g, partition);
    const r = this.runners.get(key);
    this.runners.delete(key);
    // Handing a partition over while running: quick. Shutting down: drain the open pull too.
    if (r) await r.stop(settle, !this.stopping);
    this.reportOwned(g);
  }

  /** Graceful stop: stop fetching, finish and settle what is in flight, release leases, close. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    await this.control?.stop();
    await Promise.all(this.groups.map((g) => this.pauseGroup(g.name)));
    await Promise.all([...this.runners.values()].map((r) => r.stop(true)));
    this.runners.clear();
    for (const proc of this.processors.values()) await (await proc.catch(() => undefined))?.close?.();
    if (this.ownsConnections.nats && this.nats) await this.nats.nc.drain().catch(() => undefined);
    if (this.ownsConnections.redis && this.redis) this.redis.disconnect();
  }

  // --- the per-batch path, used by ConsumerRunner -------------------------------------------

  /** @internal */
  get handles(): { nats: NatsHandles; state: StateStore; log: Logger } {
    return { nats: this.nats!, state: this.state!, log: this.opts.log };
  }

  /** @internal Turns messages into stage inputs; undecodable envelopes fail at once. */
  decode(g: StageGroup, msgs: JsMsg[], partition: number | undefined): { inputs: (StageInput | undefined)[]; results: MsgResult[] } {
    const first = g.index === 0;
    const results: MsgResult[] = msgs.map(() => ({ emits: [], commits: [] }));
    const inputs = msgs.map((m, i): StageInput | undefined => {
      const input: StageInput = {
        seq: m.seq,
        subject: m.subject,
        data: m.data,
        deliveries: m.info.deliveryCount,
        stream_time_ms: Number(m.info.timestampNanos / 1_000_000),
        partition,
      };
      const tp = m.headers?.get("traceparent");
      if (tp) results[i]!.traceparent = tp;
      const rd = m.headers?.get(REDRIVEN_HEADER);
      if (rd) results[i]!.redriven = rd;
      if (first) return input;
      try {
        const env = JSON.parse(decoder.decode(m.data)) as Envelope;
        if (env?.v !== 1 || typeof env.event?.ts !== "number" || typeof env.event.user !== "string") throw new Error("not a v1 envelope");
        input.envelope = env;
        return input;
      } catch (err) {
        results[i]!.error = { stage: g.stages[0]!.name, err: new BadInputError("bad_envelope", `cannot decode envelope: ${errorMessage(err)}`) };
        return undefined;
      }
    });
    return { inputs, results };
  }

  /** @internal Runs items through the group's stages from `from`, collecting results. */
  async runStages(g: StageGroup, from: number, items: Item[], results: MsgResult[], sink: MsgResult): Promise<void> {
    let current = items;
    for (let k = from; k < g.stages.length && current.length > 0; k++) {
      const stage = g.stages[k]!;
      const partition = current[0]!.input.partition;
      const proc = await this.processorFor(stage, partition);
      const counters = this.counters.get(stage.name)!;
      // Event time of the batch: the latest event time among its inputs (operators never read the wall clock).
      const clock = this.clockOf(stage.name, partition);
      let t = clock.now();
      for (const it of current) if (it.input.envelope && it.input.envelope.event.ts > t) t = it.input.envelope.event.ts;
      clock.set(t);
      counters.count("in", current.length);
      const outcomes = await this.processIsolated(proc, current.map((it) => it.input));
      const last = k === g.stages.length - 1;
      const next: Item[] = [];
      current.forEach((it, j) => {
        const o = outcomes[j]!;
        const r = it.msg >= 0 ? results[it.msg]! : sink;
        if (o.commits) r.commits.push(...o.commits);
        if (o.error) {
          if (o.error.retryable) r.retry = { stage: stage.name, err: o.error };
          else {
            r.error = { stage: stage.name, err: o.error };
            counters.count("dlq", 1, { reason: o.error.code });
          }
          return;
        }
        if (o.dropped) counters.count("dropped", 1, { reason: o.dropped });
        for (const e of o.emits) {
          if (e.to === "next") counters.count("out");
          else counters.count(e.to);
          if (e.to === "next" && !last) {
            next.push({ msg: it.msg, input: { ...it.input, envelope: e.value as Envelope } });
          } else {
            r.emits.push({ stage: stage.name, emit: e });
          }
        }
      });
      current = next;
    }
  }

  /** Processes a batch; if the operator throws a non-retryable error, isolates the poison message. */
  private async processIsolated(proc: Processor, inputs: StageInput[]): Promise<Outcome[]> {
    try {
      const out = await proc.process(inputs);
      if (out.length !== inputs.length) throw new Error(`operator returned ${out.length} outcomes for ${inputs.length} inputs`);
      return out;
    } catch (err) {
      if (err instanceof TacitError && err.retryable) throw err;
      if (inputs.length === 1) {
        return [{ emits: [], error: new TacitError("processing_failed", errorMessage(err), { cause: err }) }];
      }
      const out: Outcome[] = [];
      for (const input of inputs) out.push(...(await this.processIsolated(proc, [input])));
      return out;
    }
  }

  /** @internal Fires event-time timers of a keyed group after its watermark advanced. */
  async fireWatermark(g: StageGroup, partition: number, wm: number, results: MsgResult[], sink: MsgResult): Promise<void> {
    for (let k = 0; k < g.stages.length; k++) {
      const proc = await this.processorFor(g.stages[k]!, partition);
      if (!proc.onWatermark) continue;
      const fired = await proc.onWatermark(partition, wm);
      sink.commits.push(...fired.commits);
      const onward: Item[] = [];
      for (const e of fired.emits) {
        if (e.to === "next" && k < g.stages.length - 1) {
          onward.push({ msg: -1, input: { seq: 0, subject: "", data: new Uint8Array(), deliveries: 1, stream_time_ms: 0, envelope: e.value as Envelope, watermark_ms: wm, partition } });
        } else {
          sink.emits.push({ stage: g.stages[k]!.name, emit: e });
        }
      }
      if (onward.length) await this.runStages(g, k + 1, onward, results, sink);
    }
  }

  /**
   * Decides which label emits are published, and at which revision, from the published-label
   * registry (see replay.ts): a label computed again with the same content is not published
   * again, whatever the stream's duplicate window. Returns the decisions by emit and the
   * registry updates, which are committed after the publishes (a crash in between publishes the
   * same ids again, which JetStream drops).
   */
  private async planLabels(results: MsgResult[], sink: MsgResult): Promise<{ plan: Map<Emit, { rev: number; k: number } | null>; commits: CommitGroup[] }> {
    const p = this.opts.pipeline;
    const labels: Emit[] = [];
    for (const r of [...results, sink]) {
      if (r.retry || r.error) continue;
      for (const { emit } of r.emits) {
        const v = emit.value as { label_id?: unknown; user?: unknown; revision?: unknown } | null;
        if (emit.to.startsWith("labels.") && v && typeof v.label_id === "string" && typeof v.user === "string" && typeof v.revision === "number") labels.push(emit);
      }
    }
    const plan = new Map<Emit, { rev: number; k: number } | null>();
    if (labels.length === 0) return { plan, commits: [] };
    const keyOf = (e: Emit) => {
      const v = e.value as { label_id: string; user: string };
      return publishedKey(p.subject_prefix, v.user, v.label_id);
    };
    const keys = [...new Set(labels.map(keyOf))];
    const stored = await this.state!.get(keys);
    const reg = new Map<string, PublishedLabel | undefined>();
    keys.forEach((k, i) => reg.set(k, stored[i] ? (JSON.parse(stored[i]!) as PublishedLabel) : undefined));
    const changed = new Set<string>();
    for (const e of labels) {
      const key = keyOf(e);
      const k = (e.value as { revision: number }).revision;
      const d = decideLabel(reg.get(key), k, labelContentHash(e.value as Record<string, unknown>));
      plan.set(e, d.publishAt === undefined ? null : { rev: d.publishAt, k });
      if (d.next !== reg.get(key)) {
        reg.set(key, d.next);
        changed.add(key);
      }
    }
    // The registry lives as long as the label stream keeps messages (plus a day).
    const ttl = p.streams.max_age_ms + 86_400_000;
    const commits: CommitGroup[] = [...changed].map((key) => ({ ops: [{ op: "set", key, value: JSON.stringify(reg.get(key)), ttl_ms: ttl }] }));
    return { plan, commits };
  }

  /**
   * @internal Publishes emits and dead letters of a batch, all in flight at once (bounded).
   * Returns the registry updates of the labels it published, to commit with the batch.
   */
  async publishAll(g: StageGroup, msgs: JsMsg[], results: MsgResult[], sink: MsgResult): Promise<CommitGroup[]> {
    const p = this.opts.pipeline;
    const pub = publisherFor(this.nats!.nc);
    // Issued without an await in between (until max_in_flight are out), so a batch's publishes
    // leave in a few socket writes.
    const limit = p.runtime.max_in_flight;
    const pending: Promise<unknown>[] = [];
    const send = (subject: string, data: Uint8Array, msgID: string, hdrs?: ReturnType<typeof natsHeaders>) => {
      pending.push(pub.publish(subject, data, { msgID, headers: hdrs }));
    };
    // Awaited only when full: an await per input would yield to nats.js's flush each time.
    const drain = async () => {
      await Promise.all(pending);
      pending.length = 0;
    };
    const { plan, commits } = await this.planLabels(results, sink);
    const last = g.index === this.allGroups.length - 1;
    const now = Date.now();
    const emitOut = (e: Emit, traceparent?: string, redriven?: string) => {
      let value = e.value;
      let id = e.id;
      let hdrs: ReturnType<typeof natsHeaders> | undefined;
      const header = (k: string, v: string) => {
        hdrs ??= natsHeaders();
        hdrs.set(k, v);
      };
      const decided = plan.get(e);
      if (decided === null) return;
      if (decided) {
        if (decided.rev !== decided.k) {
          const label = e.value as { label_id: string; revision: number };
          value = { ...label, revision: decided.rev };
          id = `label:${label.label_id}:${decided.rev}`;
        }
        header(OP_REVISION_HEADER, String(decided.k));
      }
      const subject = e.to === "next" ? nextSubject(p, this.allGroups, g, (e.value as Envelope).partition) : outputSubject(p, e.to);
      if (traceparent) header("traceparent", traceparent);
      if (redriven && e.to === "next") header(REDRIVEN_HEADER, redriven);
      if (this.opts.observer && ((e.to === "next" && last) || e.to.startsWith("labels."))) {
        const ts = e.to === "next" ? (e.value as Envelope).event.ts : Date.parse((e.value as { event_time?: string }).event_time ?? "");
        if (Number.isFinite(ts)) this.opts.observer.endToEnd(g.name, now - ts);
      }
      send(subject, encoder.encode(JSON.stringify(value)), id, hdrs);
    };
    for (let i = 0; i < results.length; i++) {
      const r = results[i]!;
      if (r.retry) continue;
      if (r.error) {
        // A fenced input was dead-lettered when it was first read (or since redriven): once is enough.
        if (r.replayed) continue;
        const m = msgs[i]!;
        const h = natsHeaders();
        h.set("Tacit-Stage", r.error.stage);
        h.set("Tacit-Reason", r.error.err.code);
        h.set("Tacit-Message", r.error.err.message.replace(/[\r\n]+/g, " ").slice(0, 1000));
        h.set("Tacit-Source-Stream", g.inputStream);
        h.set("Tacit-Source-Subject", m.subject);
        h.set("Tacit-Source-Seq", String(m.seq));
        if (r.redriven) h.set(REDRIVEN_HEADER, r.redriven);
        send(dlqSubject(p, r.error.stage), m.data, `dlq:${g.inputStream}:${m.seq}`, h);
        if (pending.length >= limit) await drain();
        continue;
      }
      const span = startStageSpan(r.traceparent, g.name);
      for (const { emit } of r.emits) emitOut(emit, span?.traceparent, r.redriven);
      if (pending.length >= limit) await drain();
      span?.span.end();
    }
    for (const { emit } of sink.emits) {
      emitOut(emit);
      if (pending.length >= limit) await drain();
    }
    try {
      await Promise.all(pending);
    } catch (err) {
      throw new TransientError("publish_failed", `publishing outputs failed: ${errorMessage(err)}`, err);
    }
    return commits;
  }

  /** @internal Applies the batch's state commits (after the publishes, before the acks). */
  async commitAll(results: MsgResult[], sink: MsgResult, extra: CommitGroup[], lease?: CommitLease): Promise<void> {
    const groups: CommitGroup[] = [];
    for (const r of results) if (!r.retry && !r.error) groups.push(...r.commits);
    groups.push(...sink.commits, ...extra);
    if (groups.length) await this.state!.commit(groups, lease ? { lease } : {});
  }

  /** @internal The lease a keyed partition's commits are fenced by, where the store can check it atomically. */
  commitLease(g: StageGroup, n: number): CommitLease | undefined {
    return this.state!.inOrder ? { key: pipelineKey(this.opts.pipeline.subject_prefix, "lease", g.name, n), holder: this.id } : undefined;
  }
}

/**
 * Consumes one durable (a shared one, or one partition's) in micro-batches: messages arriving
 * while a batch is processed form the next batch, so batches grow with load.
 */
class ConsumerRunner {
  private buffer: JsMsg[] = [];
  private wake: (() => void) | undefined;
  private fetching?: Promise<void>;
  private fetchDone = false;
  private loop?: Promise<void>;
  private stopping = false;
  private abandon = false;
  private wm: WatermarkState = {};
  /** Keyed: the highest input sequence whose batch is fully applied (inputs at or below it are skipped). */
  private hwm = 0;
  /** Set by `tacit replay`: inputs up to here (and timers up to its watermark) were published before. */
  private fence: Fence | undefined;
  /** Wall-clock time of the last input (for idleness only). */
  private lastInputAt = Date.now();
  /** A stage watermark an idle partition should advance to, set by `checkIdle`. */
  private idleTarget: number | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly durable: string;
  private starting?: Promise<void>;
  /** The outstanding pull request (a keyed runner handing its partition over stops it at once; see `fetchLoop`). */
  private pull?: { stop(): void };
  private quick = false;

  constructor(
    private readonly w: Worker,
    private readonly g: StageGroup,
    private readonly partition?: number,
  ) {
    this.durable = durableName(g, partition);
  }

  private get wmKey(): string {
    return partitionKey(this.w.pipeline.subject_prefix, this.g.name, this.partition ?? 0, "wm");
  }

  start(): Promise<void> {
    this.starting ??= this.begin();
    return this.starting;
  }

  private async begin(): Promise<void> {
    const { state } = this.w.handles;
    const fences = await state.hgetall(fencesKey(this.w.pipeline.subject_prefix));
    this.fence = parseFence(fences[fenceField(this.g.inputStream, this.durable)]);
    if (this.partition !== undefined) {
      await this.resumeInOrder();
      const h = await state.hgetall(this.wmKey);
      this.wm = { maxTs: h.max_ts ? Number(h.max_ts) : undefined, wm: h.wm ? Number(h.wm) : undefined };
      this.hwm = Number(h.applied_seq ?? 0) || 0;
      const every = Math.max(250, Math.floor(this.w.pipeline.event_time.idle_timeout_ms / 2));
      if (this.stopping) return;
      this.idleTimer = setInterval(() => {
        this.checkIdle().catch((err) => this.w.handles.log.warn({ durable: this.durable, err: errorMessage(err) }, "idle check failed"));
      }, every);
    }
    // Stopped while starting (the lease went, the group was paused): start nothing.
    if (this.stopping) return;
    this.fetching = this.fetchLoop();
    this.loop = this.run();
  }

  /**
   * Keeps one pull request outstanding and streams what it brings into the buffer; the next
   * request goes out as soon as one completes. Unlike a free-running `consume`, a stopped
   * shared (unkeyed) runner leaves no request open, so no message is delivered to a worker
   * that has gone (it would sit unacknowledged until ack_wait): `stop` waits for the current
   * request (≤ FETCH_EXPIRES_MS); so does every runner when the worker shuts down. A keyed
   * runner that hands its partition over while the worker goes on (rebalance, lost lease,
   * pause) stops its request at once — a partition must change hands within its lease — and
   * whoever starts the partition next recreates the durable when a request may still be open
   * on it (`resumeInOrder`).
   */
  private async fetchLoop(): Promise<void> {
    const { nats, log } = this.w.handles;
    const max = this.w.pipeline.runtime.batch_size * 2;
    let consumer: Consumer | undefined;
    let failures = 0;
    let missed = 0;
    while (!this.stopping) {
      try {
        consumer ??= await nats.js.consumers.get(this.g.inputStream, this.durable);
        // Back-pressure: do not pull more while plenty is buffered.
        if (this.buffer.length >= max) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const iter = await consumer.fetch({ max_messages: max, expires: FETCH_EXPIRES_MS });
        this.pull = iter;
        if (this.quick) iter.stop();
        for await (const m of iter) {
          this.buffer.push(m);
          this.wake?.();
        }
        failures = 0;
        missed = 0;
      } catch (err) {
        if (this.stopping) break;
        // nats.js ends a fetch whose server heartbeats it missed; with heartbeats at half the
        // expiry that races the server's own end of the request. Nothing is lost: pull again.
        // Twice in a row is a real problem (server or consumer gone), handled as a failure.
        if (err instanceof JetStreamError && err.message === "heartbeats missed" && missed++ === 0) continue;
        consumer = undefined;
        failures++;
        log.warn({ durable: this.durable, err: errorMessage(err) }, "fetch failed; retrying");
        await new Promise((r) => setTimeout(r, Math.min(5000, 200 * failures)));
      }
    }
    this.fetchDone = true;
    this.wake?.();
  }

  /**
   * A keyed partition must be processed in stream order. A previous owner that died leaves
   * messages delivered but unacknowledged, which the server would redeliver only after
   * ack_wait, behind newer ones; one that stopped its last pull request leaves it open until
   * it expires, and it may still take messages. So on takeover, restart the durable at its ack
   * floor (deleting it also cancels every open request). Servers without a consumer reset API
   * (2.9) need delete + recreate.
   */
  private async resumeInOrder(): Promise<void> {
    const { jsm } = this.w.handles.nats;
    const info = await jsm.consumers.info(this.g.inputStream, this.durable);
    if (info.num_ack_pending === 0 && info.num_redelivered === 0 && info.num_waiting === 0) return;
    const start = info.ack_floor.stream_seq + 1;
    this.w.handles.log.info({ durable: this.durable, start, ack_pending: info.num_ack_pending }, "resuming partition from its ack floor");
    const cfg = { ...info.config };
    await jsm.consumers.delete(this.g.inputStream, this.durable);
    try {
      await jsm.consumers.add(this.g.inputStream, { ...cfg, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: start });
    } catch (err) {
      if (!(err instanceof JetStreamApiError)) throw err;
      throw new TransientError("consumer_recreate_failed", `could not recreate ${this.durable}: ${err.message}`, err);
    }
  }

  private async take(): Promise<JsMsg[] | "idle" | undefined> {
    while (this.buffer.length === 0) {
      if (this.stopping && this.fetchDone) return undefined;
      if (this.idleTarget !== undefined) return "idle";
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
    let n = this.w.pipeline.runtime.batch_size;
    // A batch is either wholly below the replay fence or wholly above it.
    if (this.fence) {
      const f = this.fence.seq;
      const below = this.buffer.findIndex((m) => m.seq > f);
      if (below === 0) {
        if (this.fence.wm === undefined || (this.wm.wm !== undefined && this.wm.wm >= this.fence.wm)) this.fence = undefined;
      } else {
        n = Math.min(n, below < 0 ? this.buffer.length : below);
      }
    }
    return this.buffer.splice(0, n);
  }

  private async run(): Promise<void> {
    for (;;) {
      const msgs = await this.take();
      if (!msgs || this.abandon) return;
      if (msgs === "idle") {
        const target = this.idleTarget!;
        this.idleTarget = undefined;
        await this.withRetry([], () => this.advanceIdle(target));
      } else {
        this.lastInputAt = Date.now();
        await this.withRetry(msgs, () => this.handle(msgs));
      }
    }
  }

  /**
   * Idle partitions must not hold event time back: a partition with no input for
   * `event_time.idle_timeout` takes the stage watermark (the minimum over the partitions that
   * are not idle), so its sessions and timers still close. When every partition is idle, nothing
   * advances (a replay with no traffic does not move event time by itself). This is the one
   * wall-clock-driven step in event time; it only ever fires timers, never reorders input.
   */
  private async checkIdle(): Promise<void> {
    const p = this.w.pipeline;
    const now = Date.now();
    if (this.stopping || now - this.lastInputAt < p.event_time.idle_timeout_ms) return;
    const { state } = this.w.handles;
    const keys = [...Array(p.partitions).keys()].filter((n) => n !== this.partition).map((n) => partitionKey(p.subject_prefix, this.g.name, n, "wm"));
    let stageWm: number | undefined;
    for (const h of await state.hgetallMany(keys)) {
      if (!h.wm || now - Number(h.last_input_at ?? 0) >= p.event_time.idle_timeout_ms) continue;
      stageWm = stageWm === undefined ? Number(h.wm) : Math.min(stageWm, Number(h.wm));
    }
    if (stageWm !== undefined && (this.wm.wm === undefined || stageWm > this.wm.wm)) {
      this.idleTarget = stageWm;
      this.wake?.();
    }
  }

  /** The batch is left to the partition's next owner: nothing committed or settled; this runner stops. */
  private leaseLost(): void {
    this.w.handles.log.warn({ durable: this.durable }, "lease no longer held: batch left to the partition's next owner");
    this.stopping = true;
    this.abandon = true;
    this.quick = true;
    this.pull?.stop();
  }

  private async advanceIdle(wm: number): Promise<void> {
    if (this.wm.wm !== undefined && wm <= this.wm.wm) return;
    const sink: MsgResult = { emits: [], commits: [] };
    await this.w.fireWatermark(this.g, this.partition!, wm, [], sink);
    if (this.fence?.wm !== undefined && wm <= this.fence.wm) fenceOff(sink);
    const labels = await this.w.publishAll(this.g, [], [], sink);
    try {
      await this.w.commitAll([], sink, [...labels, { ops: [{ op: "hset", key: this.wmKey, fields: { wm, idle_advanced_at: Date.now() } }] }], this.w.commitLease(this.g, this.partition!));
    } catch (err) {
      if (err instanceof LeaseLostError) return this.leaseLost();
      throw err;
    }
    this.wm = { ...this.wm, wm };
  }

  /** Transient failures (Redis or NATS down) retry the whole batch in order, with backoff. */
  private async withRetry(msgs: JsMsg[], step: () => Promise<void>): Promise<void> {
    const backoff = this.w.pipeline.runtime.retry_backoff_ms;
    for (let attempt = 0; ; attempt++) {
      try {
        await step();
        return;
      } catch (err) {
        if (this.abandon) return;
        const retryable = err instanceof TacitError ? err.retryable : true;
        const delay = backoff[Math.min(attempt, backoff.length - 1)] ?? 1000;
        this.w.handles.log.warn({ durable: this.durable, attempt, delay, retryable, err: errorMessage(err) }, "batch failed; retrying");
        for (const m of msgs) m.working();
        await new Promise((r) => setTimeout(r, delay));
        if (this.abandon) return;
      }
    }
  }

  private async handle(batch: JsMsg[]): Promise<void> {
    const t0 = performance.now();
    const w = this.w;
    const g = this.g;
    const keyed = this.partition !== undefined;
    // Inputs at or below the high-water mark have every effect in Redis and every output
    // published (a replay re-reads them, or a takeover finds them delivered but not acked).
    // Redeliveries are out of stream order: an input whose ack_wait ran out while it waited in
    // the buffer (a loaded machine) comes again behind newer inputs, in any batch, even in its
    // first copy's. Run again, it would meet a later watermark (late, not in its session), so
    // only inputs past every earlier one run; the first copy's ack settles a copy in this batch
    // (acks go by stream sequence).
    let msgs = batch;
    if (keyed) {
      let top = this.hwm;
      msgs = batch.filter((m) => {
        if (m.seq <= top) return false;
        top = m.seq;
        return true;
      });
      const done = batch.filter((m) => m.seq <= this.hwm);
      const counters = w.counters.get(g.stages[0]!.name);
      if (done.length) counters?.count("dropped", done.length, { reason: "already_applied" });
      if (batch.length > msgs.length + done.length) counters?.count("dropped", batch.length - msgs.length - done.length, { reason: "redelivered" });
      for (const m of done) m.ack();
      if (msgs.length === 0) return;
    }
    // The first input past a replay fence continues from the watermark the partition had when
    // the replay began: timers up to it fired then (their outputs were published).
    const fwm = this.fence?.wm;
    if (keyed && fwm !== undefined && msgs[0]!.seq > this.fence!.seq && (this.wm.wm === undefined || this.wm.wm < fwm)) {
      await this.advanceIdle(fwm);
    }
    const { inputs, results } = w.decode(g, msgs, this.partition);
    const bound = w.pipeline.event_time.max_out_of_orderness_ms;
    let maxTs = this.wm.maxTs;
    // The watermark never goes back, also after an idle advance moved it past maxTs - bound.
    const floor = this.wm.wm;
    const wmOf = (max: number | undefined) => (max === undefined ? floor : floor === undefined ? max - bound : Math.max(floor, max - bound));
    const items: Item[] = [];
    inputs.forEach((input, i) => {
      if (!input) return;
      if (keyed && input.envelope) {
        input.watermark_ms = wmOf(maxTs);
        maxTs = maxTs === undefined ? input.envelope.event.ts : Math.max(maxTs, input.envelope.event.ts);
      }
      items.push({ msg: i, input });
    });
    const sink: MsgResult = { emits: [], commits: [] };
    await w.runStages(g, 0, items, results, sink);

    // Retryable per-message errors: in a keyed partition, order matters, so retry the batch.
    const maxDeliver = w.pipeline.runtime.max_deliver;
    for (let i = 0; i < results.length; i++) {
      const r = results[i]!;
      if (!r.retry) continue;
      if (msgs[i]!.info.deliveryCount >= maxDeliver) {
        r.error = { stage: r.retry.stage, err: new TacitError("max_deliveries", `gave up after ${maxDeliver} deliveries: ${r.retry.err.message}`) };
        r.retry = undefined;
      } else if (keyed) {
        throw r.retry.err;
      }
    }

    // The partition's progress, written last and in one step, after the batch's other commits.
    const progress: Record<string, number> = {};
    const newWm = wmOf(maxTs);
    if (keyed && newWm !== undefined) {
      // Every keyed round ends with onWatermark, also when the watermark did not move: it is
      // how an operator learns that the round is complete (and may release what it deferred).
      await w.fireWatermark(g, this.partition!, newWm, results, sink);
      if (this.wm.wm === undefined || newWm > this.wm.wm) Object.assign(progress, { max_ts: maxTs!, wm: newWm });
    }

    // Below a replay fence, outputs were published when these inputs were first read: state is
    // applied again (it may have been wiped), outputs are not (labels go through the registry).
    const fence = this.fence;
    if (fence) {
      let all = true;
      msgs.forEach((m, i) => {
        if (m.seq <= fence.seq) fenceOff(results[i]!);
        else all = false;
      });
      // `take` never mixes both sides of the fence in one keyed batch.
      if (all) fenceOff(sink);
    }

    const labels = await w.publishAll(g, msgs, results, sink);
    // Outputs are idempotent; state is not. A partition whose lease ran out (a stalled worker)
    // may already be processed by its next owner: commit nothing, settle nothing, stop. On one
    // Redis the commit itself checks the lease, atomically; on Cluster (the lease lives in
    // another slot) it is read just before the commit, which leaves a short window.
    const lease = keyed ? w.commitLease(g, this.partition!) : undefined;
    if (keyed && !lease && !(await w.holdsLease(g, this.partition!))) return this.leaseLost();
    // The partition's progress goes last: a crash before it reads the batch again with the
    // watermark it first saw; after it, the batch is skipped. The watermark and the high-water
    // mark move together. One Redis applies a commit in order, so progress rides along with the
    // batch's commits; on Cluster those run in parallel per hash tag, so it waits for them.
    const top = msgs[msgs.length - 1]!.seq;
    const progressed: CommitGroup[] = keyed ? [{ ops: [{ op: "hset", key: this.wmKey, fields: { ...progress, applied_seq: top, last_input_at: Date.now() } }] }] : [];
    const inOrder = w.handles.state.inOrder;
    try {
      await w.commitAll(results, sink, inOrder ? [...labels, ...progressed] : labels, lease);
    } catch (err) {
      if (err instanceof LeaseLostError) return this.leaseLost();
      throw err;
    }
    if (keyed) {
      if (!inOrder) await w.handles.state.commit(progressed);
      this.hwm = Math.max(this.hwm, top);
      this.wm = { maxTs, wm: newWm };
      if (newWm !== undefined) w.observer?.watermarkLag(g.name, this.partition!, Date.now() - newWm);
    }
    const backoff = w.pipeline.runtime.retry_backoff_ms;
    for (let i = 0; i < msgs.length; i++) {
      const r = results[i]!;
      const m = msgs[i]!;
      if (r.retry) m.nak(backoff[Math.min(m.info.deliveryCount - 1, backoff.length - 1)]);
      else if (r.error) m.term();
      else m.ack();
    }
    w.observer?.batch(g.name, performance.now() - t0, batch.length);
  }

  /** Stops fetching; with `settle`, finishes what was fetched first, else hands it back (nak). */
  async stop(settle: boolean, quick = false): Promise<void> {
    this.stopping = true;
    this.quick = quick && this.partition !== undefined;
    await this.starting?.catch(() => undefined);
    if (this.idleTimer) clearInterval(this.idleTimer);
    this.abandon = !settle;
    if (this.quick) this.pull?.stop();
    this.wake?.();
    await this.fetching;
    this.wake?.();
    await this.loop;
    for (const m of this.buffer.splice(0)) m.nak();
  }
}

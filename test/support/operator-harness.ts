import { isDeepStrictEqual } from "node:util";
import { ManualClock } from "../../src/core/clock.js";
import type { Envelope } from "../../src/core/event.js";
import {
  isKeyedProcessor,
  NO_FEATURES,
  type Emit,
  type KeyedInput,
  type KeyedProcessor,
  type KeyScope,
  type OperatorContext,
  type OperatorMetrics,
  type OperatorSpec,
  type Outcome,
  type OutputName,
  type StageInput,
} from "../../src/core/operator.js";
import { hashTagOf, userKey, type CommitGroup, type CommitLease, type StateStore } from "../../src/core/state.js";
import { KeyedChain, emptyResult, type KeyedStage, type MsgResult } from "../../src/runtime/chain.js";
import { CacheBudget, StageState, decodeStoredValue } from "../../src/runtime/keyed-state.js";
import { admitInOrder, assignWatermarks, type PartitionProgress } from "../../src/runtime/watermarks.js";
import { MemoryStateStore } from "../../src/state/memory.js";

/**
 * A test driver for one operator in the style of Flink's operator test harnesses and Kafka
 * Streams' TopologyTestDriver: it feeds StageInputs per partition in order and runs them through
 * the runtime's own code — `admitInOrder` and `assignWatermarks` (src/runtime/watermarks.ts),
 * the keyed state and timers (src/runtime/keyed-state.ts) and the chain (src/runtime/chain.ts)
 * — as the worker does: emits are published before the commit (deduplicated by id as JetStream
 * does; an id re-emitted with a different value fails), then the batch's changes are committed
 * with the partition's progress, then the batch is acked. It can simulate a crash at any point
 * of a batch so tests can restart the operator on the same state.
 */

export interface HarnessOptions {
  /** Partition count of the pipeline. @default 1 */
  partitions?: number;
  /** `event_time.max_out_of_orderness` in ms. @default 0 */
  outOfOrdernessMs?: number;
  /** Stage name (emit ids and state keys use it). @default the operator's name */
  stage?: string;
  /** Subject prefix. @default "test" */
  prefix?: string;
  /** Time the state store uses for TTL expiry (a test's fake wall clock). @default () => 0 (nothing expires) */
  storeNow?: () => number;
  /** Entries the runtime's state cache keeps (over every partition). @default 100000 */
  cacheEntries?: number;
  env?: Record<string, string | undefined>;
}

/** How far a batch got before the simulated crash. The batch is never acked: it is redelivered. */
export type CrashPoint =
  /** Every emit of the batch published; nothing committed. */
  | "before_commits"
  /**
   * Each user's state and effects committed, the partition's progress not (on Redis Cluster the
   * groups of one commit land one hash tag at a time): the guard in each user's state must hold.
   */
  | "mid_commits"
  /** Every commit applied and the watermark persisted; only the ack is missing. */
  | "after_commits";

export interface PushOptions {
  /** Inputs per `process` call. @default 100 */
  batchSize?: number;
  /** Crash in batch number `batch` (0-based, counted within this push). */
  crash?: { batch: number; at: CrashPoint };
}

export interface PushResult {
  /** How many of the pushed envelopes were acked (redeliver from this index after a crash). */
  acked: number;
  crashed: boolean;
}

/** Counts calls per StateStore method, to hold operators to their round-trip budget. */
class CountingStore implements StateStore {
  readonly calls = { get: 0, hgetall: 0, hgetallMany: 0, zrangeByScore: 0, commit: 0, wipe: 0 };
  constructor(private readonly inner: StateStore) {}
  get inOrder() {
    return this.inner.inOrder;
  }
  get(keys: string[]) {
    this.calls.get++;
    return this.inner.get(keys);
  }
  hgetall(key: string) {
    this.calls.hgetall++;
    return this.inner.hgetall(key);
  }
  hgetallMany(keys: string[]) {
    this.calls.hgetallMany++;
    return this.inner.hgetallMany(keys);
  }
  zrangeByScore(key: string, min: number, max: number, limit?: number) {
    this.calls.zrangeByScore++;
    return this.inner.zrangeByScore(key, min, max, limit);
  }
  commit(groups: CommitGroup[], opts?: { lease?: CommitLease }) {
    this.calls.commit++;
    return this.inner.commit(groups, opts);
  }
  wipe(pattern: string) {
    this.calls.wipe++;
    return this.inner.wipe(pattern);
  }
}


interface InputRecord {
  seq: number;
  deliveries: number;
}

interface PartitionRun {
  partition: number;
  proc: KeyedProcessor<unknown>;
  chain: KeyedChain;
  /** What the runner holds in memory. */
  progress: PartitionProgress;
}

/**
 * Runs a keyed processor alone, each user's state in a plain Map: no store, no guard, no timers.
 * For metric attributes and inputs the harness cannot build.
 */
export function runAlone<S>(proc: KeyedProcessor<S>): (inputs: StageInput[]) => Outcome[] {
  const states = new Map<string, S>();
  return (inputs) =>
    inputs.map((input) => {
      const user = input.envelope?.event.user ?? "";
      const key: KeyScope<S> = { user, partition: 0, get: () => states.get(user), put: (s) => void states.set(user, s), clear: () => void states.delete(user), setTimer() {}, features: NO_FEATURES };
      return proc.processElement(input as KeyedInput, key);
    });
}

export class OperatorHarness<C = Record<string, unknown>> {
  /** The state the operator sees; survives `restart()`. */
  readonly state: MemoryStateStore;
  readonly clock = new ManualClock();
  /** Every input handed to the partition, with its outcome, in order (including redeliveries). */
  readonly log: { input: StageInput; outcome: Outcome }[] = [];
  readonly partitions: number;
  readonly stage: string;
  readonly prefix: string;
  private readonly store: CountingStore;
  private readonly outOfOrdernessMs: number;
  private readonly env: Record<string, string | undefined>;
  private readonly metricCounts = new Map<string, number>();
  private readonly published = new Map<OutputName, Map<string, unknown>>();
  private readonly inputs = new Map<number, InputRecord>();
  private readonly budget: CacheBudget;
  private readonly runs = new Map<number, PartitionRun>();
  /** What the runtime persisted per partition with its last commit. */
  private readonly persisted = new Map<number, PartitionProgress>();
  private lastSeq = 0;

  constructor(
    private readonly spec: OperatorSpec<C>,
    private readonly config: C,
    opts: HarnessOptions = {},
  ) {
    if (!spec.keyed) throw new Error(`${spec.name} is not keyed: drive it with its Processor directly`);
    this.partitions = opts.partitions ?? 1;
    this.outOfOrdernessMs = opts.outOfOrdernessMs ?? 0;
    this.stage = opts.stage ?? spec.name;
    this.prefix = opts.prefix ?? "test";
    this.env = opts.env ?? {};
    this.state = new MemoryStateStore(opts.storeNow ?? (() => 0));
    this.store = new CountingStore(this.state);
    this.budget = new CacheBudget(opts.cacheEntries ?? 100_000);
  }

  /** StateStore calls made by the runtime for the operator so far. */
  get stateCalls(): Readonly<CountingStore["calls"]> {
    return this.store.calls;
  }

  /** The watermark of a partition now (what its next input would see). */
  watermark(partition: number): number | undefined {
    return (this.runs.get(partition)?.progress ?? this.persisted.get(partition))?.wm;
  }

  /** Feeds envelopes of one partition in order, in batches; see PushOptions for crashes. */
  async push(partition: number, envelopes: Envelope[], opts: PushOptions = {}): Promise<PushResult> {
    const size = Math.max(1, opts.batchSize ?? 100);
    const run = await this.runOf(partition);
    for (let off = 0, b = 0; off < envelopes.length; off += size, b++) {
      const crash = opts.crash && opts.crash.batch === b ? opts.crash.at : undefined;
      const batch = envelopes.slice(off, off + size).map((env) => this.input(partition, env));
      const { run: admitted, done, redelivered } = admitInOrder(batch, run.progress.hwm);
      if (redelivered > 0) throw new Error("the harness feeds each batch in stream order: no redelivered copies within a batch");
      for (const input of done) this.log.push({ input, outcome: { emits: [], dropped: "already_applied" } });
      const after = assignWatermarks(admitted, run.progress, this.outOfOrdernessMs);
      const results = admitted.map(emptyResult);
      const sink = emptyResult();
      await run.chain.run(admitted.map((input, msg) => ({ msg, input })), after.wm, results, sink);
      admitted.forEach((input, i) => {
        const r = results[i]!;
        const outcome: Outcome = { emits: r.emits.map((e) => e.emit) };
        if (r.error) outcome.error = r.error.err;
        if (r.dropped) outcome.dropped = r.dropped;
        this.log.push({ input, outcome });
      });
      for (const r of [...results, sink]) if (!r.error) this.publish(r.emits.map((e) => e.emit));
      if (crash === "before_commits") return this.crash(off);
      const top = admitted.length ? admitted[admitted.length - 1]!.seq : run.progress.hwm;
      run.progress = { hwm: Math.max(run.progress.hwm, top), maxTs: after.maxTs, wm: after.wm };
      await this.commit(run, results, sink, crash === "mid_commits");
      if (crash === "mid_commits") return this.crash(off);
      if (crash === "after_commits") return this.crash(off);
    }
    return { acked: envelopes.length, crashed: false };
  }

  /** Raises a partition's watermark explicitly (an idle partition's advance, end of input) and fires its timers. */
  async advanceWatermark(partition: number, watermarkMs: number): Promise<void> {
    const run = await this.runOf(partition);
    if (run.progress.wm !== undefined && watermarkMs <= run.progress.wm) return;
    const sink = emptyResult();
    await run.chain.advance(watermarkMs, sink);
    this.publish(sink.emits.map((e) => e.emit));
    run.progress = { ...run.progress, wm: watermarkMs };
    await this.commit(run, [], sink, false);
  }

  /**
   * Drops every operator instance and its in-memory state (as a crashed worker would); the
   * partitions continue from what was persisted.
   */
  async restart(): Promise<void> {
    for (const r of this.runs.values()) r.chain.close();
    this.runs.clear();
  }

  /** A user's stored keyed state: the applied sequence and the operator's encoding ("" when cleared). */
  async stored(user: string): Promise<{ applied: number; payload: string }> {
    const [raw] = await this.state.get([userKey(this.prefix, user, this.stage, "state")]);
    if (raw == null) throw new Error(`${this.spec.name}: no state stored for ${user}`);
    return decodeStoredValue(raw);
  }

  /** Values published to an output, deduplicated by emit id, in publish order. */
  outputs(to: OutputName): unknown[] {
    return [...(this.published.get(to)?.values() ?? [])];
  }

  /** Emits published to an output, deduplicated by id, in publish order. */
  emits(to: OutputName): Emit[] {
    return [...(this.published.get(to) ?? new Map<string, unknown>())].map(([id, value]) => ({ to, id, value }));
  }

  /** A counter bumped through ctx.metrics or by the runtime (summed over attributes). */
  metric(name: string): number {
    return this.metricCounts.get(name) ?? 0;
  }

  /** How many inputs were dropped with this reason (by the operator or by the runtime's guard). */
  dropped(reason: string): number {
    return this.log.filter((l) => l.outcome.dropped === reason).length;
  }

  private async crash(acked: number): Promise<PushResult> {
    await this.restart();
    return { acked, crashed: true };
  }

  private async runOf(partition: number): Promise<PartitionRun> {
    let run = this.runs.get(partition);
    if (!run) {
      const proc = await this.spec.create(this.config, this.context());
      if (!isKeyedProcessor(proc)) throw new Error(`${this.spec.name}: create did not return a keyed processor`);
      const noop = (): void => {};
      const state = new StageState(this.store, this.prefix, this.stage, partition, proc.codec, { debug: noop, info: noop, warn: noop, error: noop }, this.budget);
      const stage: KeyedStage = { name: this.stage, proc, state, counters: this.metrics(), clock: this.clock };
      run = { partition, proc, chain: new KeyedChain([stage], partition), progress: { ...(this.persisted.get(partition) ?? { hwm: 0 }) } };
      this.runs.set(partition, run);
    }
    return run;
  }

  private metrics(): OperatorMetrics {
    return {
      count: (name, by = 1) => {
        this.metricCounts.set(name, (this.metricCounts.get(name) ?? 0) + by);
      },
    };
  }

  private context(): OperatorContext {
    const noop = (): void => {};
    return {
      pipeline: this.prefix,
      prefix: this.prefix,
      stage: this.stage,
      partitions: this.partitions,
      state: this.store,
      clock: this.clock,
      log: { debug: noop, info: noop, warn: noop, error: noop },
      metrics: this.metrics(),
      env: this.env,
      devMode: true,
    };
  }

  /** The StageInput for an envelope: a redelivered envelope (same `src.seq`) keeps its stream sequence. */
  private input(partition: number, env: Envelope): StageInput {
    let rec = this.inputs.get(env.src.seq);
    if (!rec) {
      rec = { seq: ++this.lastSeq, deliveries: 0 };
      this.inputs.set(env.src.seq, rec);
    }
    rec.deliveries++;
    return {
      seq: rec.seq,
      subject: `${this.prefix}.x.${this.stage}.${partition}`,
      data: new TextEncoder().encode(JSON.stringify(env)),
      envelope: env,
      deliveries: rec.deliveries,
      stream_time_ms: env.event?.ts ?? 0,
      partition,
    };
  }

  private publish(emits: Emit[]): void {
    for (const e of emits) {
      let out = this.published.get(e.to);
      if (!out) this.published.set(e.to, (out = new Map()));
      if (out.has(e.id)) {
        if (!isDeepStrictEqual(out.get(e.id), e.value)) {
          const show = (v: unknown): string => JSON.stringify(v).slice(0, 600);
          throw new Error(`${this.spec.name}: emit id ${e.id} on ${e.to} re-emitted with a different value:\n  first: ${show(out.get(e.id))}\n  again: ${show(e.value)}`);
        }
        continue;
      }
      out.set(e.id, structuredClone(e.value));
    }
  }

  /** Commits what the partition changed, then (unless `stateOnly`) its progress, as the worker does. */
  private async commit(run: PartitionRun, results: MsgResult[], sink: MsgResult, stateOnly: boolean): Promise<void> {
    const groups = run.chain.takeCommits(results, sink, this.clock.now()).flat();
    for (const g of groups) {
      const tags = new Set(g.ops.map((op) => hashTagOf(op.key)));
      if (tags.size > 1) throw new Error(`${this.spec.name}: a commit group spans hash tags ${[...tags].join(", ")}`);
    }
    // Applied beside the operator's store, so `stateCalls` counts only the runtime's reads.
    if (groups.length) await this.state.commit(groups);
    if (!stateOnly) {
      this.persisted.set(run.partition, { ...run.progress });
      run.chain.trim();
    }
  }
}

import { isDeepStrictEqual } from "node:util";
import { ManualClock } from "../../src/core/clock.js";
import type { Envelope } from "../../src/core/event.js";
import type {
  Emit,
  OperatorContext,
  OperatorSpec,
  Outcome,
  OutputName,
  Processor,
  StageInput,
} from "../../src/core/operator.js";
import { hashTagOf, type ClaimItem, type CommitGroup, type CommitLease, type StateStore } from "../../src/core/state.js";
import { MemoryStateStore } from "../../src/state/memory.js";

/**
 * A test driver for one operator in the style of Flink's operator test harnesses and Kafka
 * Streams' TopologyTestDriver: it feeds StageInputs per partition in order, computes each
 * input's watermark the way the runtime does, calls `onWatermark` when a partition's watermark
 * advances, publishes emits before applying commits (deduplicating by emit id as JetStream
 * does, and failing on an id re-emitted with a different value), and can simulate a crash at
 * any point of a batch so tests can restart the operator on the same state.
 *
 * Order per batch, as `src/runtime/worker.ts` runs it: `process`, then `onWatermark` if the
 * partition's watermark advanced (before any commit of the batch is applied), then every emit
 * is published, then the inputs' commits, then the watermark's commits (and the watermark is
 * persisted), then the batch is acked. `watermarkAfterCommits` runs `onWatermark` after the
 * inputs' commits instead; an operator should be correct under both.
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
  /** Call onWatermark only once the batch's commits are applied. @default false (the worker's order) */
  watermarkAfterCommits?: boolean;
  env?: Record<string, string | undefined>;
}

/** How far a batch got before the simulated crash. The batch is never acked: it is redelivered. */
export type CrashPoint =
  /** Every emit of the batch (and of its watermark) published; no commit applied. */
  | "before_commits"
  /** The inputs' commits applied; the watermark's commits not, and the watermark not persisted. */
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
  readonly calls = { get: 0, hgetall: 0, hgetallMany: 0, zrangeByScore: 0, claim: 0, commit: 0, wipe: 0 };
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
  claim(items: ClaimItem[]) {
    this.calls.claim++;
    return this.inner.claim(items);
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
  watermark_ms: number | undefined;
  deliveries: number;
}

export class OperatorHarness<C = Record<string, unknown>> {
  /** The state the operator sees; survives `restart()`. */
  readonly state: MemoryStateStore;
  readonly clock = new ManualClock();
  /** Every input processed with its outcome, in order (including redeliveries). */
  readonly log: { input: StageInput; outcome: Outcome }[] = [];
  readonly partitions: number;
  readonly stage: string;
  readonly prefix: string;
  private readonly store: CountingStore;
  private readonly outOfOrdernessMs: number;
  private readonly env: Record<string, string | undefined>;
  private readonly watermarkAfterCommits: boolean;
  private readonly metricCounts = new Map<string, number>();
  private readonly published = new Map<OutputName, Map<string, unknown>>();
  private readonly inputs = new Map<number, InputRecord>();
  private readonly maxTs = new Map<number, number>();
  private readonly floor = new Map<number, number>();
  /** What the runtime persists per partition at the end of a round: the watermark fired and the max event time. */
  private readonly fired = new Map<number, number>();
  private readonly persistedMaxTs = new Map<number, number>();
  private processor: Processor | undefined;
  private lastSeq = 0;

  constructor(
    private readonly spec: OperatorSpec<C>,
    private readonly config: C,
    opts: HarnessOptions = {},
  ) {
    this.partitions = opts.partitions ?? 1;
    this.outOfOrdernessMs = opts.outOfOrdernessMs ?? 0;
    this.stage = opts.stage ?? spec.name;
    this.prefix = opts.prefix ?? "test";
    this.env = opts.env ?? {};
    this.watermarkAfterCommits = opts.watermarkAfterCommits ?? false;
    this.state = new MemoryStateStore(opts.storeNow ?? (() => 0));
    this.store = new CountingStore(this.state);
  }

  /** StateStore calls made by the operator so far. */
  get stateCalls(): Readonly<CountingStore["calls"]> {
    return this.store.calls;
  }

  /** The watermark of a partition now: max event time seen − out-of-orderness, or an explicit advance. */
  watermark(partition: number): number | undefined {
    const seen = this.maxTs.get(partition);
    const fromEvents = seen === undefined ? undefined : seen - this.outOfOrdernessMs;
    const floor = this.floor.get(partition);
    if (fromEvents === undefined) return floor;
    return floor === undefined ? fromEvents : Math.max(floor, fromEvents);
  }

  /** Feeds envelopes of one partition in order, in batches; see PushOptions for crashes. */
  async push(partition: number, envelopes: Envelope[], opts: PushOptions = {}): Promise<PushResult> {
    const size = Math.max(1, opts.batchSize ?? 100);
    const proc = await this.operator();
    for (let off = 0, b = 0; off < envelopes.length; off += size, b++) {
      const crash = opts.crash && opts.crash.batch === b ? opts.crash.at : undefined;
      const batch = envelopes.slice(off, off + size).map((env) => this.input(partition, env));
      this.clock.set(this.maxTs.get(partition) ?? 0);
      const outcomes = await proc.process(batch);
      if (outcomes.length !== batch.length) {
        throw new Error(`${this.spec.name}: process returned ${outcomes.length} outcomes for ${batch.length} inputs`);
      }
      batch.forEach((input, i) => this.log.push({ input, outcome: outcomes[i]! }));
      const inputCommits = outcomes.flatMap((o) => (o.error ? [] : (o.commits ?? [])));
      for (const o of outcomes) this.publish(o.emits);

      if (this.watermarkAfterCommits) {
        if (crash === "before_commits") return { acked: off, crashed: true };
        await this.commit(inputCommits);
        const fired = await this.fireWatermark(partition);
        if (crash === "mid_commits") return { acked: off, crashed: true };
        await this.commitWatermark(partition, fired);
      } else {
        const fired = await this.fireWatermark(partition);
        if (crash === "before_commits") return { acked: off, crashed: true };
        await this.commit(inputCommits);
        if (crash === "mid_commits") return { acked: off, crashed: true };
        await this.commitWatermark(partition, fired);
      }
      if (crash === "after_commits") return { acked: off, crashed: true };
    }
    return { acked: envelopes.length, crashed: false };
  }

  /**
   * Raises a partition's watermark explicitly (idle time, end of input) and fires its timers: a
   * round with an empty batch, so the operator knows every earlier input was acked.
   */
  async advanceWatermark(partition: number, watermarkMs: number): Promise<void> {
    this.floor.set(partition, Math.max(this.floor.get(partition) ?? watermarkMs, watermarkMs));
    const outcomes = await (await this.operator()).process([]);
    if (outcomes.length !== 0) throw new Error(`${this.spec.name}: process([]) returned outcomes`);
    await this.commitWatermark(partition, await this.fireWatermark(partition));
  }

  /**
   * Drops the operator instance (as a crashed worker would) and creates a new one on the same
   * state; the partitions' max event time goes back to what was persisted, as the worker
   * restores it, so unacked inputs count again only when they are redelivered.
   */
  async restart(): Promise<void> {
    this.processor = undefined;
    this.maxTs.clear();
    for (const [p, ts] of this.persistedMaxTs) this.maxTs.set(p, ts);
  }

  /** Values published to an output, deduplicated by emit id, in publish order. */
  outputs(to: OutputName): unknown[] {
    return [...(this.published.get(to)?.values() ?? [])];
  }

  /** Emits published to an output, deduplicated by id, in publish order. */
  emits(to: OutputName): Emit[] {
    return [...(this.published.get(to) ?? new Map<string, unknown>())].map(([id, value]) => ({ to, id, value }));
  }

  /** A counter bumped through ctx.metrics (summed over attributes). */
  metric(name: string): number {
    return this.metricCounts.get(name) ?? 0;
  }

  /** How many outcomes were dropped with this reason. */
  dropped(reason: string): number {
    return this.log.filter((l) => l.outcome.dropped === reason).length;
  }

  private async operator(): Promise<Processor> {
    if (!this.processor) this.processor = await this.spec.create(this.config, this.context());
    return this.processor;
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
      metrics: {
        count: (name, by = 1) => {
          this.metricCounts.set(name, (this.metricCounts.get(name) ?? 0) + by);
        },
      },
      env: this.env,
      devMode: true,
    };
  }

  /**
   * The StageInput for an envelope. A redelivered envelope (same `src.seq`) keeps its stream
   * sequence and the watermark it had the first time: the runtime derives both from the
   * partition's stream order, not from delivery.
   */
  private input(partition: number, env: Envelope): StageInput {
    let rec = this.inputs.get(env.src.seq);
    if (!rec) {
      rec = { seq: ++this.lastSeq, watermark_ms: this.watermark(partition), deliveries: 0 };
      this.inputs.set(env.src.seq, rec);
    }
    rec.deliveries++;
    const ts = env.event?.ts;
    if (typeof ts === "number") this.maxTs.set(partition, Math.max(this.maxTs.get(partition) ?? ts, ts));
    return {
      seq: rec.seq,
      subject: `${this.prefix}.x.${this.stage}.${partition}`,
      data: new TextEncoder().encode(JSON.stringify(env)),
      envelope: env,
      deliveries: rec.deliveries,
      stream_time_ms: env.event?.ts ?? 0,
      watermark_ms: rec.watermark_ms,
      partition,
    };
  }

  /** Calls onWatermark if the partition's watermark advanced past the persisted one; publishes its emits. */
  private async fireWatermark(partition: number): Promise<{ wm: number; commits: CommitGroup[] } | undefined> {
    const wm = this.watermark(partition);
    const last = this.fired.get(partition);
    const proc = await this.operator();
    if (wm === undefined || (last !== undefined && wm <= last) || !proc.onWatermark) return undefined;
    const res = await proc.onWatermark(partition, wm);
    this.publish(res.emits);
    return { wm, commits: res.commits };
  }

  /** Applies the watermark's commits and persists the watermark (as the worker does, in the same round). */
  private async commitWatermark(partition: number, fired: { wm: number; commits: CommitGroup[] } | undefined): Promise<void> {
    if (fired) {
      await this.commit(fired.commits);
      this.fired.set(partition, fired.wm);
    }
    const max = this.maxTs.get(partition);
    if (max !== undefined) this.persistedMaxTs.set(partition, max);
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

  private async commit(groups: CommitGroup[]): Promise<void> {
    for (const g of groups) {
      const keys = [...(g.guard ? [g.guard.key] : []), ...g.ops.map((op) => op.key)];
      const tags = new Set(keys.map(hashTagOf));
      if (tags.size > 1) throw new Error(`${this.spec.name}: a commit group spans hash tags ${[...tags].join(", ")}`);
    }
    // Applied beside the operator's store, so `stateCalls` counts only the operator's own calls.
    if (groups.length) await this.state.commit(groups);
  }
}

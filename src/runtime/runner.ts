import { DeliverPolicy, JetStreamApiError, JetStreamError, type Consumer, type ConsumerConfig, type JsMsg } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import { ManualClock } from "../core/clock.js";
import type { Envelope } from "../core/event.js";
import { BadInputError, TacitError, TransientError, errorMessage } from "../core/errors.js";
import { LABEL_OUTPUTS, isKeyedProcessor, type Logger, type Processor, type StageInput } from "../core/operator.js";
import { LeaseLostError, commitPhases, partitionKey, type CommitGroup, type CommitLease, type StateStore } from "../core/state.js";
import type { StageCounters } from "../telemetry/metrics.js";
import type { RuntimeObserver } from "../telemetry/otel.js";
import { KeyedChain, emptyResult, runUnkeyed, type Item, type KeyedStage, type MsgResult, type UnkeyedStage } from "./chain.js";
import { CacheBudget, StageState } from "./keyed-state.js";
import { fenceField, fencesKey, parseFence, type Fence, type PublishedLabel } from "./label-registry.js";
import type { NatsHandles } from "./nats.js";
import { DeliveryInfoParser } from "./delivery-info.js";
import { DLQ_HEADERS, Outputs } from "./outputs.js";
import { durableName, maxAckPending, type StageGroup } from "../config/topology.js";
import { consumerConfig, isConsumerNotFound } from "./deploy.js";
import { admitInOrder, assignWatermarks, type PartitionProgress } from "./watermarks.js";

/**
 * With a commit interval: how long a partition's input must pause before its held batches are
 * committed anyway. Above the gaps of a busy worker's partitions (at 50 ms the bench's run made
 * 95 commits instead of 16–21 at 100–500 ms); each ms of it is also how long the last acks of a
 * burst wait.
 */
const HELD_IDLE_MS = 200;
/** How long one pull request waits for messages; also the longest a stop waits for it. */
const FETCH_EXPIRES_MS = 2000;
/**
 * The server's heartbeats on an idle pull request; nats.js ends a fetch after two are missed.
 * nats-server 2.9.10 (Debian's) can drop a request that expires just as a message arrives without
 * telling the client (fixed upstream in nats-io/nats-server#3942): the partition then gets nothing
 * until the fetch gives up. With nats.js's default (half the expiry) that was 4–5 s of stall, seen
 * as a p99 of 2–3 s in the bench's latency phase; at the shortest heartbeat nats.js allows it is
 * about a second (README, Performance), and FETCH_CHECK_MS cuts it shorter still.
 */
const FETCH_HEARTBEAT_MS = 500;
/**
 * A fetch still open this long after its request's expiry asks the server whether any request of
 * the consumer is still waiting. None: the request was dropped without a 408 (see above), and the
 * fetch is ended and sent again at once. Ended only then, since a request the server still holds
 * could deliver a message to a fetch that has stopped listening: a keyed partition would get it
 * again only after ack_wait, behind newer ones (it would see the gap and restart its durable; see
 * `gap`).
 */
const FETCH_CHECK_MS = 20;
const decoder = new TextDecoder();
const TRACEPARENT = Buffer.from("traceparent");
const REDRIVEN = Buffer.from(DLQ_HEADERS.redriven);

/**
 * The input's headers when it may carry one the runner reads (traceparent, Tacit-Redriven), else
 * undefined. nats.js parses a message's whole header block into a Map on first access, and the Map
 * then lives as long as the message, which a keyed partition holds until its commit; most inputs
 * carry only Nats-Msg-Id. So the raw block is searched for the two names first and parsed only
 * when one is in it. Where the raw block is not where nats.js 3 keeps it, the headers are parsed.
 */
function inputHeaders(m: JsMsg): JsMsg["headers"] {
  const msg = (m as unknown as { msg?: { _msg?: { hdr?: unknown }; _rdata?: unknown } }).msg;
  const hdr = msg?._msg?.hdr;
  const raw = msg?._rdata;
  if (typeof hdr === "number" && Buffer.isBuffer(raw)) {
    if (hdr <= 0) return undefined;
    const block = raw.subarray(0, hdr);
    if (block.indexOf(TRACEPARENT) < 0 && block.indexOf(REDRIVEN) < 0) return undefined;
  }
  return m.headers;
}

/**
 * Whether a keyed partition missed deliveries of its durable: each delivery (a redelivery too)
 * takes the consumer's next delivery sequence, so the sequences one puller sees run on by one.
 * A jump means the server counted messages delivered that never arrived (lost with a connection,
 * a dying consumer leader, a pull request the client had stopped listening to); a step back, a new
 * consumer leader that restored an older state. Either way the server would send what was missed
 * only after ack_wait, behind newer inputs, and once those are applied, `admitInOrder` would take
 * it for a copy of an applied input and skip it. So the durable is restarted at its ack floor
 * instead (every input after it comes again, in stream order; the applied ones are skipped).
 */
function gap(last: number | undefined, delivery: number): boolean {
  return last !== undefined && delivery !== last + 1;
}

/** The reasons of `tacit_partition_resumed_total`: `gap` found missed deliveries; the durable was gone (see `resumeInOrder`). */
export const MISSED_DELIVERIES = { reason: "missed_deliveries" };
export const DURABLE_MISSING = { reason: "durable_missing" };

/** Outcomes of a settled message (M1 ingestion success; `tacit_ingest_settled_total`). */
const INGEST_OK = { outcome: "ok" };
const INGEST_DROPPED = { outcome: "dropped" };
const INGEST_DLQ = { outcome: "dead_lettered" };
const INGEST_RETRIED = { outcome: "retried" };
const INGEST_HANDED_BACK = { outcome: "handed_back" };

/** What a runner needs from its worker. */
export interface RunnerHost {
  readonly pipeline: Pipeline;
  readonly nats: NatsHandles;
  readonly state: StateStore;
  readonly log: Logger;
  readonly outputs: Outputs;
  readonly budget: CacheBudget;
  readonly observer?: RuntimeObserver;
  counters(stage: string): StageCounters;
  /** The shared processor of an unkeyed stage, with its clock. */
  unkeyed(stage: string): Promise<{ proc: Processor; clock: ManualClock }>;
  /** A new instance of a stage's operator on its own event-time clock (keyed stages: one per partition). */
  create(stage: string, clock: ManualClock): Promise<unknown>;
  /** The lease a keyed partition's commits are fenced by, where the store can check it atomically. */
  commitLease(g: StageGroup, n: number): CommitLease | undefined;
  holdsLease(g: StageGroup, n: number): Promise<boolean>;
}

/** Drops what a fenced (already published) input or timer produced, except labels. */
function fenceOff(r: MsgResult): void {
  r.emits = r.emits.filter((x) => LABEL_OUTPUTS.has(x.emit.to));
  r.replayed = true;
}

/** Forgets what a published result no longer needs (see handleKeyed). */
function published(r: MsgResult): void {
  r.emits = [];
  r.commits = [];
  r.envelope = undefined;
}

/**
 * Consumes one durable (a shared one, or one partition's) in micro-batches: messages arriving
 * while a batch is processed form the next batch, so batches grow with load. Per batch: decode,
 * run the group's chain, publish every output, commit (a keyed partition: the changed state,
 * timers, effects and its progress in one atomic step, fenced by its lease), then settle each
 * message exactly once (ack; term after dead-lettering; a retryable error retries the batch, in order).
 */
export class ConsumerRunner {
  private buffer: JsMsg[] = [];
  private wake: (() => void) | undefined;
  private fetching?: Promise<void>;
  private fetchDone = false;
  private loop?: Promise<void>;
  private stopping = false;
  private abandon = false;
  /** Keyed: the partition's progress as processed (`committed`: as last committed). */
  private progress: PartitionProgress = { hwm: 0 };
  private committed: PartitionProgress = { hwm: 0 };
  /**
   * Keyed, with `runtime.commit_interval`: batches processed and published but not committed
   * yet (Kafka Streams' commit interval): their messages are acked after the commit, and a
   * user's state that several of them changed is written once.
   */
  private held: { msgs: JsMsg[]; results: MsgResult[]; sinks: MsgResult[]; labels: CommitGroup[]; since: number } | undefined;
  /** Label registry decisions not committed yet (see Outputs.publish). */
  private readonly registry = new Map<string, PublishedLabel | undefined>();
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
  /** The durable as it is to be recreated, between its delete and a recreate that succeeded (`resumeInOrder`). */
  private recreate?: Partial<ConsumerConfig>;
  /** Keyed: the chain with its in-memory state, valid while this runner holds the partition. */
  private chain?: KeyedChain;
  private unkeyedStages?: UnkeyedStage[];

  constructor(
    private readonly w: RunnerHost,
    private readonly g: StageGroup,
    private readonly partition?: number,
  ) {
    this.durable = durableName(g, partition);
  }

  /** The stream and durable this runner consumes (its pending counts are exported). */
  get consumer(): { stream: string; durable: string } {
    return { stream: this.g.inputStream, durable: this.durable };
  }

  private get wmKey(): string {
    return partitionKey(this.w.pipeline.subject_prefix, this.g.name, this.partition ?? 0, "wm");
  }

  start(): Promise<void> {
    this.starting ??= this.begin();
    return this.starting;
  }

  private async begin(): Promise<void> {
    const { state } = this.w;
    const fences = await state.hgetall(fencesKey(this.w.pipeline.subject_prefix));
    this.fence = parseFence(fences[fenceField(this.g.inputStream, this.durable)]);
    if (this.partition !== undefined) {
      const h = await state.hgetall(this.wmKey);
      this.progress = { hwm: Number(h.applied_seq ?? 0) || 0, maxTs: h.max_ts ? Number(h.max_ts) : undefined, wm: h.wm ? Number(h.wm) : undefined };
      this.committed = { ...this.progress };
      await this.resumeInOrder();
      const stages: KeyedStage[] = [];
      for (const s of this.g.stages) {
        const clock = new ManualClock(0);
        const proc = await this.w.create(s.name, clock);
        if (!isKeyedProcessor(proc)) throw new TacitError("not_keyed", `stage ${s.name} is in a keyed group but its operator is not keyed`);
        const st = new StageState(state, this.w.pipeline.subject_prefix, s.name, this.partition, proc.codec, this.w.log, this.w.budget);
        stages.push({ name: s.name, proc, state: st, counters: this.w.counters(s.name), clock });
      }
      this.chain = new KeyedChain(stages, this.partition);
      const every = Math.max(250, Math.floor(this.w.pipeline.event_time.idle_timeout_ms / 2));
      if (this.stopping) return;
      this.idleTimer = setInterval(() => {
        this.checkIdle().catch((err) => this.w.log.warn({ durable: this.durable, err: errorMessage(err) }, "idle check failed"));
      }, every);
    } else {
      this.unkeyedStages = [];
      for (const s of this.g.stages) this.unkeyedStages.push({ name: s.name, ...(await this.w.unkeyed(s.name)), counters: this.w.counters(s.name) });
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
    const { nats, log } = this.w;
    const max = this.w.pipeline.runtime.batch_size * 2;
    // M1: every delivery is counted here and once more when it is settled (see `settle`).
    const ingest = this.w.counters(this.g.stages[0]!.name);
    let consumer: Consumer | undefined;
    const deliveries = new DeliveryInfoParser();
    let failures = 0;
    let missed = 0;
    // Keyed: the delivery sequence of the last message taken from the durable (see `gap`).
    let lastDelivery: number | undefined;
    let resume = false;
    while (!this.stopping) {
      try {
        if (resume) {
          // Deliveries were missed: restart the durable where nothing is missed (see `gap`).
          await this.resumeInOrder(true);
          ingest.count("partition_resumed", 1, MISSED_DELIVERIES);
          resume = false;
          lastDelivery = undefined;
          consumer = undefined;
        }
        consumer ??= await nats.pull.consumers.get(this.g.inputStream, this.durable);
        // Back-pressure: do not pull more while plenty is buffered.
        if (this.buffer.length >= max) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const iter = await consumer.fetch({ max_messages: max, expires: FETCH_EXPIRES_MS, idle_heartbeat: FETCH_HEARTBEAT_MS });
        this.pull = iter;
        if (this.quick) iter.stop();
        const check = setTimeout(() => this.endIfDropped(iter), FETCH_EXPIRES_MS + FETCH_CHECK_MS);
        try {
          for await (const m of iter) {
            deliveries.apply(m);
            if (this.partition !== undefined) {
              const d = m.info.deliverySequence;
              if (gap(lastDelivery, d)) {
                log.warn({ durable: this.durable, after: lastDelivery, delivery: d, seq: m.seq }, "deliveries missed: restarting the durable at its ack floor");
                resume = true;
                iter.stop();
                break;
              }
              lastDelivery = d;
            }
            ingest.count("ingest_delivered");
            this.buffer.push(m);
            this.wake?.();
          }
        } finally {
          clearTimeout(check);
        }
        failures = 0;
        missed = 0;
      } catch (err) {
        if (this.stopping) break;
        // nats.js ends a fetch whose server heartbeats it missed: a request the server dropped
        // without a word (see FETCH_HEARTBEAT_MS), or a race with the server's own end of the
        // request. Nothing is lost: pull again. Twice in a row is a real problem (server or
        // consumer gone), handled as a failure.
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

  /** Ends a fetch that outlived its request when the server holds no request of this consumer (see FETCH_CHECK_MS). */
  private endIfDropped(iter: { stop(): void }): void {
    if (this.stopping) return;
    this.w.nats.jsm.consumers
      .info(this.g.inputStream, this.durable)
      .then((info) => {
        if (info.num_waiting !== 0) return;
        this.w.log.debug({ durable: this.durable }, "pull request dropped by the server without a 408; pulling again");
        iter.stop();
      })
      .catch(() => undefined);
  }

  /**
   * A keyed partition must be processed in stream order. A previous owner that died leaves
   * messages delivered but unacknowledged, which the server would redeliver only after
   * ack_wait, behind newer ones; one that stopped its last pull request leaves it open until
   * it expires, and it may still take messages. So on takeover, restart the durable at its ack
   * floor (deleting it also cancels every open request). Servers without a consumer reset API
   * (2.9) need delete + recreate. `always`: also when nothing is pending (deliveries were missed).
   * A delete or recreate that failed (a leader election: the request may have timed out and still
   * have been applied) is tried again from what the durable was when first read: deleted again
   * unless it is already gone, then recreated. A durable that is gone when first read (an owner
   * died between its delete and its recreate) is recreated as `tacit deploy` makes it, starting
   * after the partition's committed progress: its ack floor is gone with it, and nothing after
   * that progress was committed (acks follow commits, so the floor was never past it).
   */
  private async resumeInOrder(always = false): Promise<void> {
    const { jsm } = this.w.nats;
    if (!this.recreate) {
      const info = await jsm.consumers.info(this.g.inputStream, this.durable).catch((err: unknown) => {
        if (isConsumerNotFound(err)) return undefined;
        throw err;
      });
      if (info) {
        if (!always && info.num_ack_pending === 0 && info.num_redelivered === 0 && info.num_waiting === 0) return;
        const start = info.ack_floor.stream_seq + 1;
        this.w.log.info({ durable: this.durable, start, ack_pending: info.num_ack_pending }, "resuming partition from its ack floor");
        this.recreate = { ...info.config, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: start };
      } else {
        const applied = this.committed.hwm;
        this.w.log.warn({ durable: this.durable, start: applied + 1 }, "durable missing (its owner died while recreating it): recreating it after the partition's committed progress");
        this.w.counters(this.g.stages[0]!.name).count("partition_resumed", 1, DURABLE_MISSING);
        this.recreate = { ...consumerConfig(this.w.pipeline, this.g, this.partition), deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: applied + 1 };
      }
    }
    try {
      await jsm.consumers.delete(this.g.inputStream, this.durable).catch((err: unknown) => {
        if (!isConsumerNotFound(err)) throw err;
      });
      await jsm.consumers.add(this.g.inputStream, this.recreate);
      this.recreate = undefined;
    } catch (err) {
      if (!(err instanceof JetStreamApiError)) throw err;
      throw new TransientError("consumer_recreate_failed", `could not recreate ${this.durable}: ${err.message}`, err);
    }
  }

  /** Resolves when input arrives (or the fetch loop wakes the runner for another reason) or after `ms`. */
  private async waitForInput(ms: number): Promise<void> {
    if (this.stopping) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wake = undefined;
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
        if (this.fence.wm === undefined || (this.progress.wm !== undefined && this.progress.wm >= this.fence.wm)) this.fence = undefined;
      } else {
        n = Math.min(n, below < 0 ? this.buffer.length : below);
      }
    }
    return this.buffer.splice(0, n);
  }

  private async run(): Promise<void> {
    for (;;) {
      if (this.held && this.buffer.length === 0) {
        // Held batches are committed when the interval since the first of them is up, or when
        // the partition's input has paused for HELD_IDLE_MS (traffic stopped: acks and features
        // need not lag it by the interval). Not as soon as it runs dry: in one worker the keyed
        // partitions run dry each time they catch up with the stage before them, which on a busy
        // worker is every few batches, and committed far more often than the interval.
        const left = Math.min(this.held.since + this.commitInterval, this.lastInputAt + HELD_IDLE_MS) - Date.now();
        if (left > 0) await this.waitForInput(left);
        if (this.buffer.length === 0) await this.withRetry([], () => this.flush());
      }
      const msgs = await this.take();
      if (this.abandon) return;
      if (!msgs) {
        // Stopping: what was processed is committed and settled before the runner ends.
        if (this.held) await this.withRetry([], () => this.flush());
        if (this.held || this.buffer.length) continue;
        return;
      }
      if (msgs === "idle") {
        const target = this.idleTarget!;
        this.idleTarget = undefined;
        await this.withRetry([], () => this.advanceIdle(target));
      } else {
        this.lastInputAt = Date.now();
        await this.withRetry(msgs, () => (this.chain ? this.handleKeyed(msgs) : this.handleUnkeyed(msgs)));
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
    const keys = [...Array(p.partitions).keys()].filter((n) => n !== this.partition).map((n) => partitionKey(p.subject_prefix, this.g.name, n, "wm"));
    let stageWm: number | undefined;
    for (const h of await this.w.state.hgetallMany(keys)) {
      if (!h.wm || now - Number(h.last_input_at ?? 0) >= p.event_time.idle_timeout_ms) continue;
      stageWm = stageWm === undefined ? Number(h.wm) : Math.min(stageWm, Number(h.wm));
    }
    if (stageWm !== undefined && (this.progress.wm === undefined || stageWm > this.progress.wm)) {
      this.idleTarget = stageWm;
      this.wake?.();
    }
  }

  /** The batch is left to the partition's next owner: nothing committed or settled; this runner stops. */
  private leaseLost(): void {
    this.w.log.warn({ durable: this.durable }, "lease no longer held: batch left to the partition's next owner");
    this.stopping = true;
    this.abandon = true;
    this.quick = true;
    this.chain?.drop();
    this.pull?.stop();
  }

  private async advanceIdle(wm: number): Promise<void> {
    if (this.progress.wm !== undefined && wm <= this.progress.wm) return;
    await this.flush();
    if (this.abandon) return;
    const sink = emptyResult();
    await this.chain!.advance(wm, sink);
    if (this.fence?.wm !== undefined && wm <= this.fence.wm) fenceOff(sink);
    const labels = await this.w.outputs.publish(this.g, [], [], sink, this.registry);
    this.progress = { ...this.progress, wm };
    await this.commitKeyed([], [], [sink], labels, { idle_advanced_at: Date.now() });
  }

  /** Transient failures (Redis or NATS down) retry the whole batch in order, with backoff. */
  private async withRetry(msgs: JsMsg[], step: () => Promise<void>): Promise<void> {
    const backoff = this.w.pipeline.runtime.retry_backoff_ms;
    for (let attempt = 0; ; attempt++) {
      try {
        await step();
        return;
      } catch (err) {
        // What the failed batch changed in memory was not committed: read it again from Redis.
        const held = this.rewind();
        if (this.abandon) return;
        if (this.stopping) {
          // A stop does not wait out an outage (its supervisor would kill the worker anyway):
          // the failed batch and those held for the commit are handed back, to whoever reads
          // the durable next, as after a crash; the rest of the buffer follows in `stop`.
          const back = [...new Set([...held, ...msgs])];
          this.handBack(back);
          this.w.log.warn({ durable: this.durable, handed_back: back.length, err: errorMessage(err) }, "batch failed while stopping: handed back, not retried");
          this.abandon = true;
          return;
        }
        const retryable = err instanceof TacitError ? err.retryable : true;
        const delay = backoff[Math.min(attempt, backoff.length - 1)] ?? 1000;
        this.w.log.warn({ durable: this.durable, attempt, delay, retryable, err: errorMessage(err) }, "batch failed; retrying");
        // The batch stays ours while it waits: its ack deadline is pushed back through the delay.
        const slice = Math.max(100, this.w.pipeline.runtime.ack_wait_ms / 3);
        for (let left = delay; left > 0 && !this.abandon; left -= slice) {
          for (const m of msgs) m.working();
          await new Promise((r) => setTimeout(r, Math.min(left, slice)));
        }
        if (this.abandon) return;
        if (held.length) {
          // Held batches are run again too, before this one: back to the buffer, in order.
          const seen = new Set(held.map((m) => m.seq));
          this.buffer.unshift(...held, ...msgs.filter((m) => !seen.has(m.seq)));
          return;
        }
      }
    }
  }

  /** Forgets everything not committed (state in memory, held batches, registry decisions); returns the held messages. */
  private rewind(): JsMsg[] {
    this.chain?.drop();
    this.registry.clear();
    this.progress = { ...this.committed };
    const held = this.held?.msgs ?? [];
    this.held = undefined;
    return held;
  }

  /** Turns messages into stage inputs (`items`, by message index); undecodable envelopes fail at once. */
  private decode(msgs: JsMsg[]): { items: Item[]; results: MsgResult[] } {
    const first = this.g.index === 0;
    const results: MsgResult[] = msgs.map(emptyResult);
    const inputs = msgs.map((m, i): StageInput | undefined => {
      // nats.js makes a view of the message's bytes on every read of `data`.
      const data = m.data;
      const input: StageInput = {
        seq: m.seq,
        subject: m.subject,
        data,
        deliveries: m.info.deliveryCount,
        stream_time_ms: Number(m.info.timestampNanos / 1_000_000),
        partition: this.partition,
      };
      const r = results[i]!;
      const h = inputHeaders(m);
      if (h) {
        const tp = h.get("traceparent");
        if (tp) r.traceparent = tp;
        const rd = h.get(DLQ_HEADERS.redriven);
        if (rd) r.redriven = rd;
      }
      if (first) return input;
      try {
        const env = JSON.parse(decoder.decode(data)) as Envelope;
        if (env?.v !== 1 || typeof env.event?.ts !== "number" || typeof env.event.user !== "string") throw new Error("not a v1 envelope");
        input.envelope = env;
        r.envelope = env;
        return input;
      } catch (err) {
        r.error = { stage: this.g.stages[0]!.name, err: new BadInputError("bad_envelope", `cannot decode envelope: ${errorMessage(err)}`) };
        return undefined;
      }
    });
    const items: Item[] = [];
    inputs.forEach((input, msg) => {
      if (input) items.push({ msg, input });
    });
    return { items, results };
  }

  /**
   * Inputs whose retryable error met `runtime.max_deliver` are dead-lettered (`max_deliveries`);
   * returns the error of one still to retry, if any.
   */
  private giveUpExhausted(msgs: JsMsg[], results: MsgResult[]): TacitError | undefined {
    const maxDeliver = this.w.pipeline.runtime.max_deliver;
    let retry: TacitError | undefined;
    results.forEach((r, i) => {
      if (!r.retry) return;
      if (msgs[i]!.info.deliveryCount >= maxDeliver) {
        r.error = { stage: r.retry.stage, err: new TacitError("max_deliveries", `gave up after ${maxDeliver} deliveries: ${r.retry.err.message}`) };
        r.retry = undefined;
      } else retry ??= r.retry.err;
    });
    return retry;
  }

  private async handleUnkeyed(msgs: JsMsg[]): Promise<void> {
    const t0 = performance.now();
    const { items, results } = this.decode(msgs);
    this.w.observer?.inputs?.(this.g.name, items);
    await runUnkeyed(this.unkeyedStages!, items, results);
    // Retryable per-message errors (Redis down for enrich's context lookup) retry the batch in
    // order, like a keyed partition's: a nak would send those messages on behind newer ones, and
    // the keyed stages' event time depends on the order their inputs arrive in (events held back
    // by an outage would come out `late`, bot scores would see them out of order).
    const retry = this.giveUpExhausted(msgs, results);
    if (retry) throw retry;
    this.applyFence(msgs, results, undefined);
    const sink = emptyResult();
    const labels = await this.w.outputs.publish(this.g, msgs, results, sink, new Map());
    const groups: CommitGroup[] = [];
    for (const r of results) if (!r.retry && !r.error) groups.push(...r.commits);
    groups.push(...labels);
    // On Cluster, on a replica before the batch is acked (`redis.replica_wait`), as a keyed commit.
    if (groups.length) await this.w.state.commit(groups, { replicated: true });
    this.settle(msgs, results);
    this.w.observer?.batch(this.g.name, performance.now() - t0, msgs.length);
  }

  private async handleKeyed(batch: JsMsg[]): Promise<void> {
    const t0 = performance.now();
    const chain = this.chain!;
    const counters = this.w.counters(this.g.stages[0]!.name);
    const { run: msgs, done, redelivered } = admitInOrder(batch, this.progress.hwm);
    if (done.length) counters.count("dropped", done.length, { reason: "already_applied" });
    if (redelivered) counters.count("dropped", redelivered, { reason: "redelivered" });
    // Copies of inputs applied or in this batch: settled by their first copy's ack.
    if (batch.length > msgs.length) counters.count("ingest_settled", batch.length - msgs.length, { outcome: "duplicate" });
    // A copy of a held (processed, not yet committed) input is settled by the held one's ack.
    for (const m of done) if (m.seq <= this.committed.hwm) m.ack();
    if (msgs.length === 0) return;
    // The first input past a replay fence continues from the watermark the partition had when
    // the replay began: timers up to it fired then (their outputs were published).
    const fwm = this.fence?.wm;
    if (fwm !== undefined && msgs[0]!.seq > this.fence!.seq && (this.progress.wm === undefined || this.progress.wm < fwm)) {
      await this.advanceIdle(fwm);
    }
    const { items, results } = this.decode(msgs);
    this.w.observer?.inputs?.(this.g.name, items);
    const after = assignWatermarks(items.map((it) => it.input), this.progress, this.w.pipeline.event_time.max_out_of_orderness_ms);
    const sink = emptyResult();
    await chain.run(items, after.wm, results, sink);
    // Retryable per-message errors: in a keyed partition, order matters, so retry the batch.
    const retry = this.giveUpExhausted(msgs, results);
    if (retry) throw retry;
    chain.keepEffects();
    this.applyFence(msgs, results, sink);

    const labels = await this.w.outputs.publish(this.g, msgs, results, sink, this.registry);
    // Held until the commit is each input's outcome, not its outputs (published now) nor its
    // effects (the chain keeps those): outputs kept for a whole commit interval survive the
    // young generation's collections, which then copy them.
    for (const r of results) published(r);
    published(sink);
    // The partition's progress: the watermark and the high-water mark move together.
    this.progress = { hwm: Math.max(this.progress.hwm, msgs[msgs.length - 1]!.seq), maxTs: after.maxTs, wm: after.wm };
    this.w.observer?.batch(this.g.name, performance.now() - t0, batch.length);
    if (after.wm !== undefined) this.w.observer?.watermarkLag(this.g.name, this.partition!, Date.now() - after.wm);
    const held = (this.held ??= { msgs: [], results: [], sinks: [], labels: [], since: Date.now() });
    held.msgs.push(...msgs);
    held.results.push(...results);
    held.sinks.push(sink);
    held.labels.push(...labels);
    const rt = this.w.pipeline.runtime;
    // Nor near the consumer's max_ack_pending (held messages are not acked), nor past the
    // partition's share of the worker's state cache: changed entries can be evicted only once
    // written, so a full cache commits (as Kafka Streams' record cache flushes when full) and the
    // trim after it evicts. Its own share, not the worker's total: an idle partition over its
    // share must not make the busy ones commit every batch.
    if (Date.now() - held.since < this.commitInterval && held.msgs.length + 2 * rt.batch_size <= maxAckPending(rt) && !chain.overBudget) return;
    await this.flush();
  }

  /** How long processed batches may stay uncommitted (`runtime.commit_interval`), never near ack_wait. */
  private get commitInterval(): number {
    const rt = this.w.pipeline.runtime;
    return Math.min(rt.commit_interval_ms, rt.ack_wait_ms / 4);
  }

  /** Commits the held batches (if any) and settles their messages. */
  private async flush(): Promise<void> {
    const held = this.held;
    if (!held) return;
    if (!(await this.commitKeyed(held.msgs, held.results, held.sinks, held.labels, { last_input_at: Date.now() }))) return;
    this.held = undefined;
    this.settle(held.msgs, held.results);
  }

  /**
   * Below a replay fence, outputs were published when these inputs were first read: state is
   * applied again (it may have been wiped), outputs are not (labels go through the registry).
   */
  private applyFence(msgs: JsMsg[], results: MsgResult[], sink: MsgResult | undefined): void {
    const fence = this.fence;
    if (!fence) return;
    let all = true;
    msgs.forEach((m, i) => {
      if (m.seq <= fence.seq) fenceOff(results[i]!);
      else all = false;
    });
    // `take` never mixes both sides of the fence in one keyed batch.
    if (all && sink) fenceOff(sink);
  }

  /**
   * Commits a keyed partition's changes: timers, each user's state with its effects, label
   * registry updates, then the progress. Outputs are idempotent; state is not. A partition
   * whose lease ran out (a stalled worker) may already be processed by its next owner: commit
   * nothing, settle nothing, stop. On one Redis the commit itself checks the lease, atomically,
   * and applies everything in one MULTI/EXEC (a crash before it reads the batch again with the
   * watermark it first saw; after it, the batch is skipped); on Cluster (the lease lives in
   * another slot) the lease is read just before, the groups land per hash tag and the progress
   * after them, and each user's stored guard keeps a re-read from applying twice.
   */
  private async commitKeyed(msgs: JsMsg[], results: MsgResult[], sinks: MsgResult[], labels: CommitGroup[], extra: Record<string, number>): Promise<boolean> {
    const chain = this.chain!;
    const { state } = this.w;
    const lease = this.w.commitLease(this.g, this.partition!);
    if (!lease && !(await this.w.holdsLease(this.g, this.partition!))) {
      this.leaseLost();
      return false;
    }
    const next = this.progress;
    const fields: Record<string, number> = { ...extra };
    if (msgs.length) fields.applied_seq = next.hwm;
    if (next.wm !== undefined && (this.committed.wm === undefined || next.wm > this.committed.wm)) {
      fields.wm = next.wm;
      if (next.maxTs !== undefined) fields.max_ts = next.maxTs;
    }
    const progress: CommitGroup = { ops: [{ op: "hset", key: this.wmKey, fields }] };
    const sink = emptyResult();
    for (const x of sinks) sink.commits.push(...x.commits);
    const [before, users, after] = chain.takeCommits(results, sink, next.maxTs ?? 0);
    const phases = [before!, [...users!, ...labels], after!, [progress]];
    try {
      // The progress goes last. On Cluster each phase waits for a replica (`redis.replica_wait`)
      // before the next is written: the progress never survives a failover without the state it
      // vouches for, and the batch's messages are acked after it, so an acked input's state does.
      await commitPhases(state, phases, { lease, replicated: true });
    } catch (err) {
      if (err instanceof LeaseLostError) {
        this.leaseLost();
        return false;
      }
      throw err;
    }
    this.committed = { ...next };
    if (msgs.length && next.maxTs !== undefined) this.w.observer?.committed?.(this.g.name, next.maxTs);
    this.registry.clear();
    chain.trim();
    return true;
  }

  private settle(msgs: JsMsg[], results: MsgResult[]): void {
    const backoff = this.w.pipeline.runtime.retry_backoff_ms;
    let retried = 0;
    let dlq = 0;
    let dropped = 0;
    for (let i = 0; i < msgs.length; i++) {
      const r = results[i]!;
      const m = msgs[i]!;
      if (r.retry) {
        m.nak(backoff[Math.min(m.info.deliveryCount - 1, backoff.length - 1)]);
        retried++;
      } else if (r.error) {
        m.term();
        dlq++;
      } else {
        m.ack();
        if (r.dropped) dropped++;
      }
    }
    const c = this.w.counters(this.g.stages[0]!.name);
    c.count("ingest_settled", msgs.length - retried - dlq - dropped, INGEST_OK);
    if (dropped) c.count("ingest_settled", dropped, INGEST_DROPPED);
    if (dlq) c.count("ingest_settled", dlq, INGEST_DLQ);
    if (retried) c.count("ingest_settled", retried, INGEST_RETRIED);
  }

  /** Gives messages back to the durable unsettled (nak), for whoever reads it next. */
  private handBack(msgs: JsMsg[]): void {
    for (const m of msgs) m.nak();
    if (msgs.length) this.w.counters(this.g.stages[0]!.name).count("ingest_settled", msgs.length, INGEST_HANDED_BACK);
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
    this.handBack(this.buffer.splice(0));
    // The partition leaves this worker: its in-memory state is no longer valid.
    this.chain?.close();
  }
}

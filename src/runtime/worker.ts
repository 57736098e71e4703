import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { Cluster, type Redis } from "ioredis";
import type { Pipeline, Stage } from "../config/types.js";
import { ManualClock } from "../core/clock.js";
import { TacitError, errorMessage } from "../core/errors.js";
import type { KeyedProcessor, Logger, OperatorSpec, Processor } from "../core/operator.js";
import { pipelineKey, type CommitLease, type StateStore } from "../core/state.js";
import { RedisStateStore, openPipelineRedis } from "../state/redis.js";
import { StageCounters } from "../telemetry/metrics.js";
import type { RuntimeObserver } from "../telemetry/otel.js";
import { ControlLoop } from "./control.js";
import { CacheBudget } from "./keyed-state.js";
import { PartitionLeases } from "./leases.js";
import { assertDeployed } from "./deploy.js";
import { connectNats, type NatsHandles } from "./nats.js";
import { Outputs, RESENT_NO_RESPONDERS, RESENT_UNANSWERED } from "./outputs.js";
import { ConsumerRunner, DURABLE_MISSING, MISSED_DELIVERIES, type RunnerHost } from "./runner.js";
import { stageGroups, type StageGroup } from "../config/topology.js";

/** A worker's id: `<host>-<pid>-<hex>`. */
export function newWorkerId(): string {
  return `${hostname()}-${process.pid}-${randomBytes(3).toString("hex")}`;
}

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
  /** Fail the start (ConfigError) when an input stream does not exist yet (`tacit run`). */
  requireDeployed?: boolean;
}

/**
 * A worker runs the stage groups of a pipeline: a shared durable for unkeyed groups, and the
 * partitions it holds a lease on for keyed ones. Per batch: decode, run the group's operators,
 * publish every output (many in flight, deterministic Nats-Msg-Id), apply state commits, then
 * settle each message exactly once (ack; term after dead-lettering; a retryable error retries the batch, in order).
 */
export class Worker implements RunnerHost {
  readonly id: string;
  readonly stageCounters = new Map<string, StageCounters>();
  readonly budget: CacheBudget;
  private out?: Outputs;
  private readonly groups: StageGroup[];
  private readonly allGroups: StageGroup[];
  private natsHandles?: NatsHandles;
  private redis?: Redis | Cluster;
  /** The state store's own Cluster connection, when its commits WAIT for replicas. */
  private stateRedis?: Cluster;
  private ownsConnections = { nats: false, redis: false };
  private store?: StateStore;
  /** The processor of each unkeyed stage (keyed ones: one instance per partition, owned by its runner). */
  private readonly processors = new Map<string, Promise<{ proc: Processor; clock: ManualClock }>>();
  private readonly runners = new Map<string, ConsumerRunner>();
  /**
   * Runners still stopping, by key. A partition's lease can be lost and taken again by this same
   * worker while its old runner finishes a batch (a Redis outage longer than the lease): the new
   * runner starts only once the old one has stopped, else both would work on the partition, and
   * the new one would read a progress the old one is still moving.
   */
  private readonly stoppingRunners = new Map<string, Promise<void>>();
  /** Lease loops of the keyed groups that are running (absent while a group is paused). */
  private readonly leases = new Map<string, PartitionLeases>();
  /** Groups paused by `tacit replay` (through the control hash). */
  private readonly paused = new Set<string>();
  private control?: ControlLoop;
  private stopping = false;
  private started = false;
  /** The connections and operators of `prepare` (made once). */
  private preparing?: Promise<void>;

  constructor(private readonly opts: WorkerOptions) {
    const p = opts.pipeline;
    this.id = opts.workerId ?? newWorkerId();
    this.allGroups = stageGroups(p, opts.operators);
    this.groups = opts.groups ? this.allGroups.filter((g) => opts.groups!.includes(g.name)) : this.allGroups;
    for (const s of p.stages) this.stageCounters.set(s.name, new StageCounters(s.name));
    // Counters start at zero: the M1 ingestion series of every group exist before the first message.
    for (const g of this.groups) {
      const c = this.counters(g.stages[0]!.name);
      c.count("ingest_delivered", 0);
      for (const outcome of ["ok", "dropped", "dead_lettered", "retried", "handed_back", "duplicate"]) c.count("ingest_settled", 0, { outcome });
      c.count("publish_resent", 0, RESENT_UNANSWERED);
      c.count("publish_resent", 0, RESENT_NO_RESPONDERS);
      if (g.keyed) {
        c.count("partition_resumed", 0, MISSED_DELIVERIES);
        c.count("partition_resumed", 0, DURABLE_MISSING);
      }
    }
    this.budget = new CacheBudget(p.runtime.state_cache.max_entries);
  }

  get pipeline(): Pipeline {
    return this.opts.pipeline;
  }

  async start(): Promise<void> {
    await this.prepare();
    const p = this.opts.pipeline;
    if (this.opts.requireDeployed) await assertDeployed(p, this.natsHandles!.jsm, this.groups);
    // The control loop starts every group that is not paused, before it returns: a worker
    // started during a replay does not touch the paused groups.
    this.control = new ControlLoop(this.redis!, p.subject_prefix, this.id, this.groups.map((g) => g.name), {
      pause: (name) => this.pauseGroup(name),
      resume: (name) => this.resumeGroup(name),
    }, this.opts.log);
    await this.control.start();
    this.started = true;
  }

  /**
   * The first part of `start` (once): connects and creates each stage's operator, so a bad
   * config or a missing secret fails here, before anything is consumed. A two-thread worker
   * prepares both threads before it checks that the pipeline is deployed (see threads.ts).
   */
  async prepare(): Promise<void> {
    this.preparing ??= this.connectAndCreate();
    await this.preparing;
  }

  private async connectAndCreate(): Promise<void> {
    const p = this.opts.pipeline;
    this.natsHandles = this.opts.nats ?? (await connectNats(p, `tacit-worker-${this.id}`));
    this.ownsConnections.nats = !this.opts.nats;
    this.redis = this.opts.redis ?? openPipelineRedis(p);
    this.ownsConnections.redis = !this.opts.redis;
    // On Cluster, a commit's WAIT holds its connection until a replica acknowledges: the state
    // gets a connection of its own, so lease renewals never queue behind a WAIT.
    const waits = this.redis instanceof Cluster && p.redis.replica_wait_ms > 0;
    this.stateRedis = waits ? (this.redis as Cluster).duplicate() : undefined;
    this.store = new RedisStateStore(this.stateRedis ?? this.redis, waits ? p.redis.replica_wait_ms : 0);
    // Create each stage's operator now, so a bad config or a missing secret fails the start.
    for (const g of this.groups) for (const s of g.stages) await (g.keyed ? this.create(s.name, new ManualClock(0)) : this.unkeyed(s.name));
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

  /** @internal (tacit bench) Stops consuming a group as a pause does, outside the control loop. */
  hold(name: string): Promise<void> {
    return this.pauseGroup(name);
  }

  /** @internal (tacit bench) Consumes a held group again. */
  release(name: string): Promise<void> {
    return this.resumeGroup(name);
  }

  /** Ready: started, not stopping, and NATS and Redis connected. */
  ready(): boolean {
    return this.started && !this.stopping && !!this.natsHandles && !this.natsHandles.nc.isClosed() && (this.redis as { status?: string } | undefined)?.status === "ready";
  }

  /** @internal */
  get observer(): RuntimeObserver | undefined {
    return this.opts.observer;
  }

  /** A new instance of a stage's operator, on its own event-time clock. */
  create(stageName: string, clock: ManualClock): Promise<Processor | KeyedProcessor<unknown>> {
    const s = this.stage(stageName);
    const p = this.opts.pipeline;
    const spec = this.opts.operators(s.operator);
    if (!spec) return Promise.reject(new TacitError("unknown_operator", `stage ${s.name}: unknown operator ${s.operator}`));
    const ctx = {
      pipeline: p.name,
      prefix: p.subject_prefix,
      stage: s.name,
      partitions: p.partitions,
      state: this.state!,
      clock,
      log: this.opts.log,
      metrics: this.counters(s.name),
      env: this.opts.env ?? process.env,
      devMode: this.opts.devMode ?? false,
    };
    return Promise.resolve(spec.create(s.config, ctx));
  }

  /** The shared processor of an unkeyed stage and its clock (created on first use). */
  unkeyed(stageName: string): Promise<{ proc: Processor; clock: ManualClock }> {
    let proc = this.processors.get(stageName);
    if (!proc) {
      const clock = new ManualClock(0);
      proc = (this.create(stageName, clock) as Promise<Processor>).then((p) => ({ proc: p, clock }));
      this.processors.set(stageName, proc);
    }
    return proc;
  }

  private stage(name: string): Stage {
    const s = this.opts.pipeline.stages.find((x) => x.name === name);
    if (!s) throw new TacitError("unknown_stage", `no stage ${name} in pipeline ${this.opts.pipeline.name}`);
    return s;
  }

  counters(stage: string): StageCounters {
    return this.stageCounters.get(stage)!;
  }

  get nats(): NatsHandles {
    return this.natsHandles!;
  }

  get state(): StateStore {
    return this.store!;
  }

  get log(): Logger {
    return this.opts.log;
  }

  get outputs(): Outputs {
    return (this.out ??= new Outputs(this.opts.pipeline, this.allGroups, this.nats.nc, this.state, (stage) => this.counters(stage), this.opts.observer));
  }

  /** The lease a keyed partition's commits are fenced by, where the store can check it atomically. */
  commitLease(g: StageGroup, n: number): CommitLease | undefined {
    return this.state.inOrder ? { key: pipelineKey(this.opts.pipeline.subject_prefix, "lease", g.name, n), holder: this.id } : undefined;
  }

  /** The durables this worker consumes now. */
  durables(): { stream: string; durable: string }[] {
    return [...this.runners.values()].map((r) => r.consumer);
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
      await this.stoppingRunners.get(this.runnerKey(g, partition));
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
    if (r) {
      const stopping = r.stop(settle, !this.stopping);
      const stopped = stopping.catch(() => undefined);
      this.stoppingRunners.set(key, stopped);
      try {
        await stopping;
      } finally {
        if (this.stoppingRunners.get(key) === stopped) this.stoppingRunners.delete(key);
      }
    }
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
    for (const p of this.processors.values()) await (await p.catch(() => undefined))?.proc.close?.();
    if (this.ownsConnections.nats && this.natsHandles) await this.natsHandles.nc.drain().catch(() => undefined);
    if (this.ownsConnections.redis && this.redis) this.redis.disconnect();
    this.stateRedis?.disconnect();
  }
}

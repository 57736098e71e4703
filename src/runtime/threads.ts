import { readlinkSync } from "node:fs";
import { Session } from "node:inspector/promises";
import { availableParallelism } from "node:os";
import { Worker as Thread, parentPort, workerData } from "node:worker_threads";
import { threadMaxOldGenerationMb } from "../config/paths.js";
import type { Pipeline } from "../config/types.js";
import { stageGroups, type StageGroup } from "../config/topology.js";
import { BadInputError, ConfigError, TacitError, TransientError, errorMessage } from "../core/errors.js";
import { StageCounters } from "../telemetry/metrics.js";
import type { RuntimeObserver } from "../telemetry/otel.js";
import { assertDeployed } from "./deploy.js";
import { Worker, newWorkerId, type WorkerOptions } from "./worker.js";

/**
 * Stage groups on two threads (Flink runs each task of a job in a thread of its own, Kafka
 * Streams has `num.stream.threads`). With `runtime.threads: 2` a worker that runs both kinds of
 * group runs its unkeyed groups (enrich in the default pipeline) on a worker thread, and its keyed
 * groups on the main thread. The two share nothing but the process: each has its own NATS and
 * Redis connections and its own operators, and they meet only through the pipeline's streams, as
 * two worker processes would. One process, one id, one metrics endpoint: the thread's counters and
 * observations are posted to the main thread, which exports them with its own.
 *
 * A thread that fails to start fails the worker's start with the thread's error (a ConfigError
 * still exits 2); a thread that dies later is the worker's death (`onThreadExit`).
 */

/** What the thread needs to build its worker (structured-cloned to it). */
interface ThreadData {
  pipeline: Pipeline;
  groups: string[];
  workerId: string;
  env?: Record<string, string | undefined>;
  devMode?: boolean;
  logLevel: string;
  observe: boolean;
}

/** How a thread is started: its entry module (which calls `serveWorkerThread`) and its log level. */
export interface ThreadSpec {
  entry: URL;
  logLevel: string;
  /** The thread stopped while the worker was running (it crashed): the worker cannot go on. */
  onThreadExit(err: Error): void;
}

type Request = { type: "go" } | { type: "stop" } | { type: "hold"; group: string } | { type: "release"; group: string } | { type: "refresh" } | { type: "profile"; on: boolean; intervalUs?: number };

type Report =
  | { type: "prepared"; tid?: number }
  | { type: "failed"; error: SerializedError }
  | { type: "state"; counters: Record<string, Record<string, number>>; ready: boolean; durables: { stream: string; durable: string }[] }
  | { type: "observe"; calls: [keyof RuntimeObserver, unknown[]][] }
  | { type: "reply"; id: number; error?: SerializedError; value?: unknown };

interface SerializedError {
  name: string;
  code?: string;
  message: string;
  retryable?: boolean;
}

function serialize(err: unknown): SerializedError {
  if (err instanceof TacitError) return { name: err.name, code: err.code, message: err.message, retryable: err.retryable };
  return { name: err instanceof Error ? err.name : "Error", message: errorMessage(err) };
}

/** The thread's error as the class it was thrown as, so the CLI's exit codes hold. */
function deserialize(e: SerializedError): Error {
  if (e.name === "ConfigError") return new ConfigError(e.message);
  if (e.name === "TransientError") return new TransientError(e.code ?? "transient", e.message);
  if (e.name === "BadInputError") return new BadInputError(e.code ?? "bad_input", e.message);
  if (e.code !== undefined) return new TacitError(e.code, e.message, { retryable: e.retryable });
  const err = new Error(e.message);
  err.name = e.name;
  return err;
}

/** How often the thread posts its counters, readiness and durables (ms). */
const STATE_EVERY_MS = 250;
/** How long a stopping thread may take to drain before it is terminated (ms). */
const STOP_TIMEOUT_MS = 60_000;

/**
 * Whether a worker with these options runs on two threads: `runtime.threads` is 2 (`auto`: when
 * the machine has more than one core) and the groups it runs are of both kinds.
 */
export function runsOnTwoThreads(opts: Pick<WorkerOptions, "pipeline" | "operators" | "groups">): boolean {
  const t = opts.pipeline.runtime.threads;
  if (t === 1 || (t === "auto" && availableParallelism() < 2)) return false;
  const mine = groupsOf(opts);
  return mine.some((g) => g.keyed) && mine.some((g) => !g.keyed);
}

/** The stage groups a worker with these options runs (`groups`, or all). */
function groupsOf(opts: Pick<WorkerOptions, "pipeline" | "operators" | "groups">): StageGroup[] {
  return stageGroups(opts.pipeline, opts.operators).filter((g) => !opts.groups || opts.groups.includes(g.name));
}

/** A worker on one thread, or on two (see `runsOnTwoThreads`). */
export function createWorker(opts: WorkerOptions, thread: ThreadSpec): Worker | ThreadedWorker {
  return runsOnTwoThreads(opts) ? new ThreadedWorker(opts, thread) : new Worker(opts);
}

/** A worker whose unkeyed groups run on a thread of their own, its keyed groups on this one. */
export class ThreadedWorker {
  readonly id: string;
  /** Every stage's counters: the keyed ones live, the thread's as last posted. */
  readonly stageCounters = new Map<string, StageCounters>();
  private readonly keyed: Worker;
  private readonly mine: StageGroup[];
  private readonly threadGroups: string[];
  private thread?: Thread;
  /** Resolves when the thread has exited (set when it is spawned). */
  private threadExited: Promise<void> = Promise.resolve();
  private threadGone = true;
  private threadReady = false;
  private threadDurables: { stream: string; durable: string }[] = [];
  /** The thread's id in the operating system (Linux), as it reported it when prepared. */
  private threadTid: number | undefined;
  private stopping = false;
  private nextId = 0;
  private readonly replies = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();

  constructor(
    private readonly opts: WorkerOptions,
    private readonly spec: ThreadSpec,
  ) {
    this.id = opts.workerId ?? newWorkerId();
    const mine = groupsOf(opts);
    this.mine = mine;
    this.threadGroups = mine.filter((g) => !g.keyed).map((g) => g.name);
    // Deployment is checked here, for both threads' groups at once (see start).
    this.keyed = new Worker({ ...opts, workerId: this.id, groups: mine.filter((g) => g.keyed).map((g) => g.name), requireDeployed: false });
    const threadStages = new Set(mine.filter((g) => !g.keyed).flatMap((g) => g.stages.map((s) => s.name)));
    for (const [name, c] of this.keyed.stageCounters) this.stageCounters.set(name, threadStages.has(name) ? new StageCounters(name) : c);
  }

  get budget(): Worker["budget"] {
    return this.keyed.budget;
  }

  /**
   * Starts both threads in a one-thread worker's order: every stage's operator is created (the
   * thread's first, as enrich comes first), then every group's streams are checked at once (a
   * worker that was never deployed says so in one line), then both start consuming.
   */
  async start(): Promise<void> {
    const data: ThreadData = {
      pipeline: this.opts.pipeline,
      groups: this.threadGroups,
      workerId: this.id,
      env: this.opts.env ? { ...this.opts.env } : undefined,
      devMode: this.opts.devMode,
      logLevel: this.spec.logLevel,
      observe: this.opts.observer !== undefined,
    };
    const rt = this.opts.pipeline.runtime;
    const thread = new Thread(this.spec.entry, { workerData: data, resourceLimits: { maxOldGenerationSizeMb: threadMaxOldGenerationMb(rt.batch_size, rt.max_event_bytes) } });
    this.thread = thread;
    this.threadGone = false;
    this.threadExited = new Promise<void>((resolve) =>
      thread.once("exit", () => {
        this.threadGone = true;
        resolve();
      }),
    );
    const prepared = new Promise<void>((resolve, reject) => {
      const early = (err: Error) => reject(err);
      const exitEarly = (code: number) => reject(new Error(`the worker's thread exited (code ${code}) before it started`));
      thread.once("error", early);
      thread.once("exit", exitEarly);
      thread.on("message", (m: Report) => {
        if (m.type === "prepared") {
          this.threadTid = m.tid;
          thread.off("error", early);
          thread.off("exit", exitEarly);
          resolve();
        } else if (m.type === "failed") reject(deserialize(m.error));
        else this.onReport(m);
      });
    });
    try {
      // A thread whose start failed stops its worker and exits by itself.
      await prepared;
      thread.on("error", (err) => this.lost(err));
      thread.on("exit", (code) => this.lost(new Error(`the worker's thread exited (code ${code})`)));
      await this.keyed.prepare();
      if (this.opts.requireDeployed) await assertDeployed(this.opts.pipeline, this.keyed.nats.jsm, this.mine);
      await this.call({ type: "go" });
      await this.keyed.start();
    } catch (err) {
      await this.stopThread();
      throw err;
    }
  }

  private lost(err: Error): void {
    this.threadReady = false;
    for (const r of this.replies.values()) r.reject(err);
    this.replies.clear();
    if (!this.stopping) this.spec.onThreadExit(err);
  }

  private onReport(m: Report): void {
    if (m.type === "state") {
      for (const [stage, counts] of Object.entries(m.counters)) {
        const c = this.stageCounters.get(stage);
        if (!c || c === this.keyed.stageCounters.get(stage)) continue;
        c.counts.clear();
        for (const [k, v] of Object.entries(counts)) c.counts.set(k, v);
      }
      this.threadReady = m.ready;
      this.threadDurables = m.durables;
    } else if (m.type === "observe") {
      const o = this.opts.observer as Record<string, ((...args: unknown[]) => void) | undefined> | undefined;
      for (const [method, args] of m.calls) o?.[method]?.(...args);
    } else if (m.type === "reply") {
      const r = this.replies.get(m.id);
      this.replies.delete(m.id);
      if (m.error) r?.reject(deserialize(m.error));
      else r?.resolve(m.value);
    }
  }

  private call(req: Request): Promise<unknown> {
    const thread = this.thread;
    if (!thread) return Promise.reject(new Error("the worker's thread is not running"));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.replies.set(id, { resolve, reject });
      thread.postMessage({ id, req });
    });
  }

  /** Ready: both threads started, connected and not stopping. */
  ready(): boolean {
    return this.threadReady && this.keyed.ready();
  }

  /** The durables this worker consumes now, on both threads. */
  durables(): { stream: string; durable: string }[] {
    return [...this.threadDurables, ...this.keyed.durables()];
  }

  /** @internal (tacit bench) Stops consuming a group as a pause does, outside the control loop. */
  async hold(group: string): Promise<void> {
    if (this.threadGroups.includes(group)) await this.call({ type: "hold", group });
    else await this.keyed.hold(group);
  }

  /** @internal (tacit bench) Consumes a held group again. */
  async release(group: string): Promise<void> {
    if (this.threadGroups.includes(group)) await this.call({ type: "release", group });
    else await this.keyed.release(group);
  }

  /**
   * @internal (tacit bench) The worker's own thread, by the groups it runs, with its id in the
   * operating system (Linux only: empty elsewhere), so its CPU can be told from the main thread's
   * and from V8's and libuv's helpers in /proc/<pid>/task.
   */
  osThreads(): { name: string; tid: number }[] {
    return this.threadTid === undefined || this.threadGone ? [] : [{ name: this.threadGroups.join("+"), tid: this.threadTid }];
  }

  /** Brings the thread's counters up to date (they are posted every STATE_EVERY_MS otherwise). */
  async refresh(): Promise<void> {
    if (this.thread && !this.threadGone) await this.call({ type: "refresh" });
  }

  /** @internal (tacit bench) Starts V8's profiler on the thread. */
  async startProfile(intervalUs: number): Promise<void> {
    await this.call({ type: "profile", on: true, intervalUs });
  }

  /** @internal (tacit bench) Stops the thread's profiler and returns its profile. */
  async stopProfile(): Promise<unknown> {
    return this.call({ type: "profile", on: false });
  }

  private async stopThread(): Promise<void> {
    const thread = this.thread;
    if (!thread) return;
    this.stopping = true;
    const timeout = setTimeout(() => void thread.terminate(), STOP_TIMEOUT_MS);
    if (!this.threadGone) await Promise.race([this.call({ type: "stop" }).catch(() => undefined), this.threadExited]);
    await this.threadExited;
    clearTimeout(timeout);
    this.thread = undefined;
  }

  /** Graceful stop of both threads: each finishes and settles what is in flight. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all([this.stopThread(), this.keyed.stop()]);
  }
}

/**
 * The thread's side: builds a worker for the groups it was given (`build` supplies what cannot be
 * cloned: the operators and a logger), starts it, posts its counters every STATE_EVERY_MS, and
 * answers the main thread's requests until told to stop.
 */
export async function serveWorkerThread(build: (data: { logLevel: string }) => Pick<WorkerOptions, "operators" | "log">): Promise<void> {
  const port = parentPort;
  if (!port) throw new Error("serveWorkerThread runs in a worker thread");
  const data = workerData as ThreadData;
  const calls: [keyof RuntimeObserver, unknown[]][] = [];
  const forward = (method: keyof RuntimeObserver) => (...args: unknown[]) => void calls.push([method, args]);
  const observer: RuntimeObserver | undefined = data.observe
    ? {
        batch: forward("batch"),
        endToEnd: forward("endToEnd"),
        watermarkLag: forward("watermarkLag"),
        partitionsOwned: forward("partitionsOwned"),
        committed: forward("committed"),
        label: forward("label"),
        // Only what the observer reads of the inputs, and only when an envelope is there to read.
        inputs: (group, items) => {
          if (items.some((i) => i.input.envelope !== undefined)) calls.push(["inputs", [group, items.map((i) => ({ input: { seq: i.input.seq, envelope: i.input.envelope } }))]]);
        },
      }
    : undefined;
  const worker = new Worker({
    ...build({ logLevel: data.logLevel }),
    pipeline: data.pipeline,
    groups: data.groups,
    workerId: data.workerId,
    env: data.env,
    devMode: data.devMode,
    observer,
  });
  const post = () => {
    const counters: Record<string, Record<string, number>> = {};
    for (const [stage, c] of worker.stageCounters) counters[stage] = c.snapshot();
    port.postMessage({ type: "state", counters, ready: worker.ready(), durables: worker.durables() } satisfies Report);
    if (calls.length) port.postMessage({ type: "observe", calls: calls.splice(0) } satisfies Report);
  };
  try {
    await worker.prepare();
  } catch (err) {
    port.postMessage({ type: "failed", error: serialize(err) } satisfies Report);
    await worker.stop().catch(() => undefined);
    port.close();
    return;
  }
  port.postMessage({ type: "prepared", tid: osThreadId() } satisfies Report);
  let timer: NodeJS.Timeout | undefined;
  let profiler: Session | undefined;
  port.on("message", async ({ id, req }: { id: number; req: Request }) => {
    const reply = (value?: unknown, err?: unknown) => port.postMessage({ type: "reply", id, value, error: err === undefined ? undefined : serialize(err) } satisfies Report);
    try {
      let value: unknown;
      if (req.type === "go") {
        await worker.start();
        timer = setInterval(post, STATE_EVERY_MS);
      } else if (req.type === "stop") {
        clearInterval(timer);
        await worker.stop();
      } else if (req.type === "hold") await worker.hold(req.group);
      else if (req.type === "release") await worker.release(req.group);
      else if (req.type === "profile" && req.on) {
        profiler = new Session();
        profiler.connect();
        await profiler.post("Profiler.enable");
        await profiler.post("Profiler.setSamplingInterval", { interval: req.intervalUs ?? 1000 });
        await profiler.post("Profiler.start");
      } else if (req.type === "profile" && profiler) {
        value = (await profiler.post("Profiler.stop")).profile;
        profiler.disconnect();
        profiler = undefined;
      }
      post();
      reply(value);
      if (req.type === "stop") port.close();
    } catch (err) {
      reply(undefined, err);
    }
  });
}

/** The calling thread's id in the operating system, from /proc/thread-self (Linux); undefined elsewhere. */
function osThreadId(): number | undefined {
  try {
    const tid = Number(readlinkSync("/proc/thread-self").split("/").pop());
    return Number.isInteger(tid) && tid > 0 ? tid : undefined;
  } catch {
    return undefined;
  }
}

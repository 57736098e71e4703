import { AckPolicy, DeliverPolicy, RetentionPolicy, StorageType, type JsMsg } from "@nats-io/jetstream";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { Session } from "node:inspector/promises";
import { PerformanceObserver, type PerformanceEntry } from "node:perf_hooks";
import { nodeFlagsGiven, tacitArgv } from "../config/paths.js";
import type { Pipeline } from "../config/types.js";
import type { Logger, OperatorSpec } from "../core/operator.js";
import { percentile } from "../telemetry/metrics.js";
import { applyDeploy, planDeploy } from "../runtime/deploy.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { PublishGroup, publisherFor } from "../runtime/jspub.js";
import { publishLines } from "../runtime/publisher.js";
import { durableName, stageGroups, streamName } from "../config/topology.js";
import { createWorker, type ThreadSpec, type ThreadedWorker } from "../runtime/threads.js";
import { Worker } from "../runtime/worker.js";
import { openPipelineRedis } from "../state/redis.js";
import { within } from "../core/wait.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface BenchOptions {
  events: number;
  users: number;
  /** Events published at a steady rate for the latency phase. */
  latencyEvents: number;
  latencyRate: number;
  log: Logger;
  env: Readonly<Record<string, string | undefined>>;
  /**
   * Worker processes in the pipeline phase: this process's worker plus `workers − 1` children
   * running `tacit run` on the same servers.
   * @default 1
   */
  workers?: number;
  /** How a child worker loads the pipeline: the file and the `--set` overrides this run used. Required when workers > 1. */
  childPipeline?: { file: string; set: string[] };
  /** How this process's worker starts its second thread (`runtime.threads`); without it, one thread. */
  thread?: ThreadSpec;
  /**
   * Run a profiled window after the timed one, sampled by V8's profiler, for the per-stage CPU
   * shares. The profiler slows the worker it samples (by about a quarter in three alternating pairs
   * of runs), so it is never on in the timed window.
   * @default true
   */
  profile?: boolean;
  /** Also write the raw profile here (a `.cpuprofile` that Chrome DevTools and speedscope open); a second thread's beside it, `<name>.thread1.cpuprofile`. */
  profileOut?: string;
  /**
   * Events pushed through the relay and through the pipeline before the timed window, on users of
   * their own, by the same relay and the same workers, which go on to the timed events without a
   * stop. The relay's window starts once the warm-up's events are out; the pipeline's timed events
   * are loaded once the warm-up's are out and committed, while the worker runs, and its window
   * starts when they are in. The window then measures a running process, as a long-running worker
   * is (code compiled, a commit done, operators, consumers and leases set up), not V8 compiling the
   * code or the workers starting. 0 times a cold start, start-up included.
   * @default 0
   */
  warmupEvents?: number;
  /** The servers' process ids, when the bench started them itself: their CPU per event is reported too. */
  servers?: { nats: number; redis: number };
}

export interface RateResult {
  /** The events timed: the run's, or with a warm-up those out after the window began (fewer: the relay's begins after the batch that completes its warm-up, the pipeline's once the timed events are loaded, some already through). */
  events: number;
  /**
   * From the window's start until the last event's output is out (seen within 10 ms): event in
   * to output out, the same for the relay and the pipeline. `events_per_s` is events ÷ this.
   */
  seconds: number;
  /**
   * From the window's start until every input is settled: the relay's acked; the pipeline's
   * committed (state, features, progress) and acked. The pipeline's holds its last commit, which
   * comes once the input has paused (`runtime.commit_interval`): a stream that does not stop
   * commits while it goes on. The CPU figures run to here.
   */
  drained_seconds: number;
  events_per_s: number;
  /**
   * CPU time (user + system) per event over the timed phase, to drained: this process's, plus the
   * child workers' in the pipeline phase. What the work costs the workers, which a busy machine
   * changes far less than it changes the rate. The servers' CPU is not included.
   */
  cpu_us_per_event: number;
  /**
   * The servers' CPU (their threads' time on a core, from /proc's schedstat, ns) per event over the same phase, when the bench
   * started them: on a small machine they share the cores with the worker, so they bound the rate too.
   */
  servers_cpu_us_per_event?: { nats: number; redis: number };
}

export interface LatencyResult {
  events: number;
  rate_per_s: number;
  p50_ms: number;
  p99_ms: number;
}

/** A child worker of the pipeline phase (`--workers` > 1). */
export interface ChildWorkerResult {
  pid: number;
  /** From spawn to its "running" line, seconds: start-up time, inside the timed phase when it is cold. */
  ready_s: number | null;
  /** Its CPU (user + system, from /proc) over the timed window (cold: from spawn, start-up included), per event timed. */
  cpu_us_per_event: number;
  rss_peak_mb: number;
}

export interface PipelineResult extends RateResult {
  latency: LatencyResult;
  stages: string[];
  outputs: number;
  dlq: number;
  dropped: number;
  /** CPU of this process's worker alone, per event (equals cpu_us_per_event with one worker). */
  in_process_cpu_us_per_event: number;
  /**
   * in_process_cpu_us_per_event by thread, from each thread's schedstat (ns): `main` (the keyed groups when
   * `runtime.threads` is 2, else every group), `thread <groups>` (the worker's own thread: enrich in
   * the default pipeline), and `helpers`, every other thread: V8's garbage collection and compiler
   * threads and libuv's pool, which the profiler behind cpu_share does not see. Linux only.
   */
  threads_cpu_us_per_event?: Record<string, number>;
  /**
   * Cores used on average from the window's start to the last output (`seconds`, the rate's
   * window; the CPU figures above run on to drained): the worker processes, the servers (when the
   * bench started them) and the whole machine (every process, from /proc/stat's busy time, out of
   * `machine.cpus`). How near the machine was to full while the rate was measured. `main_thread`:
   * the shares of that window the worker's main thread (the keyed groups) spent on a core and
   * runnable but waiting for one (the kernel's schedstat): on a full machine, waiting is time the
   * thread that bounds the rate lost to the others; `gc_pauses`, the share of that window it was
   * paused for V8's garbage collection (perf_hooks' `gc` entries, every kind: scavenges, full
   * collections, incremental marking steps; wall time, so a pause's own waits for a core are in
   * it too). Linux only.
   */
  cores_to_last_output?: { workers: number; nats?: number; redis?: number; machine?: number; main_thread?: { running: number; waiting_for_a_core: number; gc_pauses?: number } };
  /**
   * Share of this process's sampled non-idle CPU time by where it was spent: stage names (a stage's
   * operator file and what it calls), `runtime`, `state`, `nats client`, `redis client`, `gc`,
   * `other`. Fractions summing to 1. From the profiled window (`profiled`), not the timed one.
   * Absent with `--no-profile`.
   */
  cpu_share?: Record<string, number>;
  /**
   * That sampled non-idle time per event, µs. Samples are spaced in wall-clock time, so a thread
   * the OS has descheduled still accrues it: on a busy machine this exceeds the process's CPU. The
   * profiler sees the worker's threads (JavaScript, GC, native code they call; with
   * `runtime.threads` 2 both, each sampled by a profiler of its own and added up), not the helper
   * threads of V8 and libuv.
   */
  profiled_us_per_event?: number;
  /** Sampling interval of the profiler, µs. */
  profile_interval_us?: number;
  /**
   * The profiled window: as many events again (users of their own, event time after the timed
   * events'), through the same worker, right after the timed window, with V8's profiler on. Apart
   * from the timed window because the profiler slows the worker it samples (see `profile`): its
   * figures are the shares' basis, not the worker's cost. `cpu_us_per_event` is
   * this process's CPU per event with the profiler on. Absent with `--no-profile`.
   */
  profiled?: { events: number; seconds: number; cpu_us_per_event: number };
  /** This process's resident set size, sampled every 100 ms through the pipeline phase (it also holds the bench's own client). */
  rss_peak_mb: number;
  rss_end_mb: number;
  /** Keyed-state entries held in memory by this process's worker when the phase drained, and the most seen while sampling. */
  cache_entries: number;
  cache_entries_peak: number;
  /** `runtime.state_cache.max_entries`: the bound per worker. */
  cache_max_entries: number;
  children: ChildWorkerResult[];
}

export interface BenchResult {
  events: number;
  users: number;
  /** Events through the relay and the pipeline before each was timed (0: a cold start). */
  warmup_events: number;
  /** Worker processes in the pipeline phase. */
  workers: number;
  relay: RateResult & { latency: LatencyResult };
  pipeline: PipelineResult;
  /** pipeline events/s ÷ relay events/s, measured in the same run. */
  ratio: number;
  /** `node_flags`: what this process (the in-process worker) was started with, NODE_OPTIONS included. */
  machine: { cpus: number; node: string; node_flags: string[] };
}

const TYPES = ["query", "response_shown", "click", "dwell", "copy_paste", "accept", "edit", "regenerate"] as const;

/** How `benchEvents` stamps and spreads its events. */
export interface BenchEventsOptions {
  /** Event time of each event, instead of t0 + one second per event of its user. */
  stamp?: () => number;
  /** Picks each event's user (load tests: users at random, so no user's events come like a metronome). */
  pickUser?: () => number;
  /** Prefixes user, session, query and event ids: events of their own, apart from another run's. */
  prefix?: string;
}

/**
 * Deterministic synthetic events for throughput runs: sessions of query → shown → interaction,
 * spread over `users` users, one second of event time apart per user. Not realistic traffic
 * (that is `tacit simulate`), just valid events with per-user order.
 */
export function* benchEvents(n: number, users: number, t0: number, { stamp, pickUser, prefix = "" }: BenchEventsOptions = {}): Generator<string> {
  // With `pickUser` (load tests: users at random, so no user's events come like a metronome), each
  // user's own count of events drives its session; in turn, that count is i / users.
  const seen = pickUser ? new Map<number, number>() : undefined;
  for (let i = 0; i < n; i++) {
    const u = pickUser ? pickUser() : i % users;
    const k = seen ? (seen.get(u) ?? 0) : Math.floor(i / users);
    seen?.set(u, k + 1);
    const type = TYPES[k % TYPES.length]!;
    const ts = stamp ? stamp() : t0 + k * 1000;
    const q = `${prefix}q${u}-${Math.floor(k / TYPES.length)}`;
    const payload: Record<string, unknown> =
      type === "query" ? { text: `how to tune nats consumers ${k % 7}` }
      : type === "response_shown" ? { position: 1, text_length: 400 }
      : type === "click" ? { position: 1 }
      // Ended 2 s after the response was shown (a dwell's timestamp is its end): no longer than that.
      : type === "dwell" ? { dwell_ms: 1_500 }
      : type === "copy_paste" ? { span_start: 0, span_end: 40, span_length: 40 }
      : type === "edit" ? { edit_distance: 12, original_length: 400 }
      : {};
    const ev: Record<string, unknown> = {
      event_id: `${prefix}b${i}`,
      session_id: `${prefix}s${u}`,
      user_id: `${prefix}user-${u}`,
      timestamp: new Date(ts).toISOString(),
      query_id: q,
      event_type: type,
      payload,
    };
    if (type !== "query") ev.response_id = `${q}-r1`;
    yield JSON.stringify(ev);
  }
}

function cpuMicros(since: NodeJS.CpuUsage): number {
  const d = process.cpuUsage(since);
  return d.user + d.system;
}

/** A phase that has not moved for this long has failed (ms); big runs take as long as they need while they progress. */
const STALL_MS = 120_000;

/**
 * Polls `check` until it reports done (true). Fails when its progress figure has not changed for
 * STALL_MS, or when `failed` names a reason (a child worker that died); with `quietMs`, returns
 * false instead once it has not changed for that long.
 */
async function waitUntil(what: string, check: () => Promise<{ done: boolean; progress: number }>, everyMs = 50, failed?: () => string | undefined, quietMs?: number): Promise<boolean> {
  let last = -1;
  let since = Date.now();
  for (;;) {
    const { done, progress } = await check();
    if (done) return true;
    const why = failed?.();
    if (why) throw new Error(`bench: ${why}`);
    if (progress !== last) {
      last = progress;
      since = Date.now();
    } else if (quietMs !== undefined && Date.now() - since > quietMs) {
      return false;
    } else if (Date.now() - since > STALL_MS) {
      throw new Error(`bench timed out waiting for ${what}: no progress for ${STALL_MS / 1000} s`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** How often the pipeline's window looks whether its last output is out (ms): within this of it. The relay reports its own. */
const WINDOW_POLL_MS = 10;
/** How often a window whose outputs are out checks whether its inputs are settled (ms). */
const DRAIN_POLL_MS = 20;
/** Outputs that stopped coming for this long (ms; events dropped or dead-lettered) end a window at drained instead. */
const OUTPUTS_STALL_MS = 2000;

async function ensureStream(nats: NatsHandles, name: string, subjects: string[]): Promise<void> {
  await nats.jsm.streams.delete(name).catch(() => undefined);
  await nats.jsm.streams.add({ name, subjects, retention: RetentionPolicy.Limits, storage: StorageType.File, duplicate_window: 120_000_000_000 });
}

/**
 * The do-nothing relay: consume → publish → ack, written with the runtime's batching and publisher
 * (micro-batches from `consume`, all publishes of a batch in flight at once, then the acks). The
 * yardstick for the pipeline. `onOutputs` hears its count of outputs stored after each batch.
 */
async function relay(nats: NatsHandles, inStream: string, outSubject: string, batch: number, signal: { stop: boolean }, onOutputs?: (n: number) => void): Promise<void> {
  await nats.jsm.consumers.add(inStream, { durable_name: "relay", ack_policy: AckPolicy.Explicit, deliver_policy: DeliverPolicy.All, max_ack_pending: batch * 4, ack_wait: 30_000_000_000 });
  const c = await nats.js.consumers.get(inStream, "relay");
  let buffer: JsMsg[] = [];
  let wake: (() => void) | undefined;
  let out = 0;
  const msgs = await c.consume({ max_messages: batch * 2, expires: 5000, callback: (m) => { buffer.push(m); wake?.(); } });
  while (!signal.stop) {
    if (buffer.length === 0) {
      await new Promise<void>((r) => { wake = r; setTimeout(r, 100); });
      continue;
    }
    const take = buffer.splice(0, batch);
    const pub = publisherFor(nats.nc);
    const group = new PublishGroup();
    for (const m of take) pub.send(group, outSubject, m.data, { msgID: `relay:${m.seq}` });
    await group.wait();
    out += take.length;
    onOutputs?.(out);
    for (const m of take) m.ack();
  }
  await msgs.close();
  buffer = [];
}

async function streamMessages(nats: NatsHandles, name: string): Promise<number> {
  try {
    return (await nats.jsm.streams.info(name)).state.messages;
  } catch {
    return 0;
  }
}

/** Reads a stream's new messages and records now − event time for each (latency phase). */
async function latencyProbe(nats: NatsHandles, stream: string, tsOf: (data: Uint8Array) => number | undefined, expected: number, timeoutMs: number): Promise<number[]> {
  const name = `lat_${Date.now().toString(36)}`;
  await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.New, inactive_threshold: 30_000_000_000 });
  const c = await nats.js.consumers.get(stream, name);
  const out: number[] = [];
  const end = Date.now() + timeoutMs;
  const msgs = await c.consume({ max_messages: 1000, expires: 1000 });
  const done = (async () => {
    for await (const m of msgs) {
      const ts = tsOf(m.data);
      if (ts !== undefined) out.push(Date.now() - ts);
      if (out.length >= expected || Date.now() > end) break;
    }
  })();
  // `within` clears its timer once the probe is done: left running, it kept the process alive
  // for up to timeoutMs after the bench had printed its figures.
  await within(done, timeoutMs);
  await msgs.close().catch(() => undefined);
  return out;
}

/** Publishes events at a steady rate with event time = publish time. */
async function pacedPublish(pipeline: Pipeline, nats: NatsHandles, n: number, rate: number, users: number, subject?: string): Promise<void> {
  // Users of their own: the throughput phase's users, an event a second each, may have been
  // flagged as bots by then (regular timing), and a bot's events never reach the output. Each
  // event is made (and stamped) just before its tick is sent, so latency starts when it is published.
  const events = benchEvents(n, users, 0, { prefix: "lat-", stamp: () => Date.now() });
  const perTick = Math.max(1, Math.round(rate / 100));
  let i = 0;
  while (i < n) {
    const t = Date.now();
    const chunk: string[] = [];
    while (chunk.length < Math.min(perTick, n - i)) chunk.push(events.next().value as string);
    if (subject) await Promise.all(chunk.map((l, j) => nats.js.publish(subject, encoder.encode(l), { msgID: `lat:${i + j}` })));
    else await publishLines(pipeline, nats.js, chunk, { idPrefix: `lat-${i}` });
    i += chunk.length;
    const wait = 10 - (Date.now() - t);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}

const tsOfEnvelope = (d: Uint8Array): number | undefined => {
  try {
    const v = JSON.parse(decoder.decode(d)) as { event?: { ts?: number }; timestamp?: string };
    return v.event?.ts ?? (v.timestamp ? Date.parse(v.timestamp) : undefined);
  } catch {
    return undefined;
  }
};

// --- CPU profile attribution -------------------------------------------------------------------

/** The parts of a V8 CPU profile (`Profiler.stop`) the attribution reads. */
export interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string }; children?: number[] }[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

/** Sampled non-idle time of a profile by category, µs. */
export interface CpuAttribution {
  total_us: number;
  us: Record<string, number>;
}

/** Categories other than stages, in the order reports list them. */
export const CPU_CATEGORIES = ["runtime", "state", "nats client", "redis client", "gc", "other"] as const;

/** Frames that are not work: V8 bookkeeping and waiting for the event loop. */
const NOT_WORK = new Set(["(idle)", "(program)"]);
const OPERATOR_FILE = /\/operators\/([A-Za-z0-9_-]+)\.(?:js|mjs|ts)$/;
const REDIS_CLIENT = /\/node_modules\/(?:ioredis|@ioredis|redis-parser|redis-errors|denque|standard-as-callback|cluster-key-slot)\//;

/** Operator name → the label its time is reported under: the stage name, or names joined by "+" when stages share an operator. */
export function stageLabels(stages: readonly { name: string; operator: string }[]): Map<string, string> {
  const by = new Map<string, string[]>();
  for (const s of stages) by.set(s.operator, [...(by.get(s.operator) ?? []), s.name]);
  return new Map([...by].map(([op, names]) => [op, names.join("+")]));
}

/** The stage label of a frame in one of the pipeline's operator files, else undefined. */
function operatorOf(url: string, labels: ReadonlyMap<string, string>): string | undefined {
  if (url.includes("/node_modules/")) return undefined;
  const m = OPERATOR_FILE.exec(url);
  return m ? labels.get(m[1]!) : undefined;
}

/** The category of a frame by itself (not looking at its callers); undefined for idle time. */
function frameCategory(fn: string, url: string, labels: ReadonlyMap<string, string>): string | undefined {
  if (NOT_WORK.has(fn)) return undefined;
  if (fn === "(garbage collector)") return "gc";
  const op = operatorOf(url, labels);
  if (op) return op;
  if (url.includes("/@nats-io/")) return "nats client";
  if (REDIS_CLIENT.test(url)) return "redis client";
  if (!url.includes("/node_modules/")) {
    if (url.includes("/src/runtime/")) return "runtime";
    if (url.includes("/src/state/")) return "state";
  }
  return "other";
}

/** Node's own JavaScript (`node:…`) or native code (no url), not V8's pseudo-frames like `(root)`. */
function isPlatformFrame(fn: string, url: string): boolean {
  return url.startsWith("node:") || (url === "" && !fn.startsWith("("));
}

/**
 * Attributes each sample's self time (the gap to the next sample; the last one runs to the
 * profile's end) to a category: the stage of the nearest frame, walking from the leaf towards
 * the root, that is in one of the pipeline's operator files (so a library an operator calls, or
 * the state access it makes, counts for its stage); else the leaf's own category, where a leaf
 * in Node's internals or native code takes the category of its nearest caller that has one (a
 * socket write under ioredis is the redis client's), and is `other` when none has. Idle and
 * `(program)` samples are left out of the total.
 */
export function attributeCpuProfile(profile: CpuProfile, labels: ReadonlyMap<string, string>): CpuAttribution {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const memo = new Map<number, string | undefined>();
  const categoryOf = (leaf: number): string | undefined => {
    if (memo.has(leaf)) return memo.get(leaf);
    const node = byId.get(leaf);
    let cat: string | undefined;
    if (node) {
      cat = frameCategory(node.callFrame.functionName, node.callFrame.url, labels);
      if (cat !== undefined && cat !== "gc") {
        // Node's internals and native code have no category of their own: a socket write counts
        // for the client that made it.
        let inherit = isPlatformFrame(node.callFrame.functionName, node.callFrame.url);
        for (let id = parent.get(leaf); id !== undefined; id = parent.get(id)) {
          const f = byId.get(id)!.callFrame;
          const op = operatorOf(f.url, labels);
          if (op) {
            cat = op;
            break;
          }
          if (inherit) {
            const c = frameCategory(f.functionName, f.url, labels);
            if (c !== undefined && c !== "other") {
              cat = c;
              inherit = false;
            } else if (!isPlatformFrame(f.functionName, f.url)) {
              inherit = false;
            }
          }
        }
      }
    }
    memo.set(leaf, cat);
    return cat;
  };
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  const at: number[] = [];
  let t = profile.startTime;
  for (let i = 0; i < samples.length; i++) at.push((t += deltas[i] ?? 0));
  const us: Record<string, number> = {};
  let total = 0;
  for (let i = 0; i < samples.length; i++) {
    const cat = categoryOf(samples[i]!);
    if (cat === undefined) continue;
    const d = Math.max(0, (i + 1 < samples.length ? at[i + 1]! : profile.endTime) - at[i]!);
    us[cat] = (us[cat] ?? 0) + d;
    total += d;
  }
  return { total_us: total, us };
}

/** Shares of the total as fractions: stages in pipeline order, then the other categories; zero shares left out. */
export function cpuShares(a: CpuAttribution, labels: ReadonlyMap<string, string>): Record<string, number> {
  const order = [...new Set(labels.values()), ...CPU_CATEGORIES];
  const out: Record<string, number> = {};
  for (const k of order) if ((a.us[k] ?? 0) > 0 && a.total_us > 0) out[k] = a.us[k]! / a.total_us;
  return out;
}

/**
 * Profiler sampling interval, µs. A share is a count of samples, so its precision depends on how
 * many there are, not on how fine each is: a 20,000-event run gives about 4,000 at 1 ms (a share
 * of 10 % is ±1 point). At 200 µs the profiler itself cost about a tenth of the worker's CPU
 * (four alternating pairs: 376 against 340 µs per event).
 */
const PROFILE_INTERVAL_US = 1000;

/** Now on V8's profile clock: the monotonic clock `process.hrtime` reads, µs. */
function profileClockUs(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

/**
 * The samples of a profile taken from `fromUs` to `toUs` (profile clock), as a profile of its own
 * that starts and ends there.
 */
export function profileWindow(profile: CpuProfile, fromUs: number, toUs: number): CpuProfile {
  const samples: number[] = [];
  const timeDeltas: number[] = [];
  const all = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  let t = profile.startTime;
  let last = fromUs;
  for (let i = 0; i < all.length; i++) {
    t += deltas[i] ?? 0;
    if (t < fromUs || t > toUs) continue;
    samples.push(all[i]!);
    timeDeltas.push(t - last);
    last = t;
  }
  return { ...profile, startTime: fromUs, endTime: Math.min(toUs, profile.endTime), samples, timeDeltas };
}

/**
 * Samples this thread with V8's profiler from start() to stop(), and returns the part from mark()
 * on. Starting the profiler is not free (V8 logs every function's code for it): it starts before
 * the profiled window's events are loaded, which marks where the window begins.
 */
class SelfProfiler {
  private readonly session = new Session();
  private from: number | undefined;
  /** `thread`: a worker whose second thread is sampled too, by a profiler of its own. */
  constructor(private readonly thread?: ThreadedWorker) {}
  async start(): Promise<void> {
    this.session.connect();
    await this.session.post("Profiler.enable");
    await this.session.post("Profiler.setSamplingInterval", { interval: PROFILE_INTERVAL_US });
    await this.session.post("Profiler.start");
    await this.thread?.startProfile(PROFILE_INTERVAL_US);
  }
  mark(): void {
    this.from = profileClockUs();
  }
  /** This thread's profile, and the worker's second thread's, each cut to the window (threads share the monotonic clock). */
  async stop(): Promise<CpuProfile[]> {
    try {
      const to = profileClockUs();
      const { profile } = await this.session.post("Profiler.stop");
      const other = this.thread ? ((await this.thread.stopProfile()) as CpuProfile) : undefined;
      return [profile, ...(other ? [other] : [])].map((p) => profileWindow(p, this.from ?? p.startTime, to));
    } finally {
      await this.session.post("Profiler.disable").catch(() => undefined);
      this.session.disconnect();
    }
  }
}

/** Attributions of several threads' profiles added up. */
function addAttributions(all: CpuAttribution[]): CpuAttribution {
  const us: Record<string, number> = {};
  let total = 0;
  for (const a of all) {
    total += a.total_us;
    for (const [k, v] of Object.entries(a.us)) us[k] = (us[k] ?? 0) + v;
  }
  return { total_us: total, us };
}

// --- memory and child workers ------------------------------------------------------------------

/** How often RSS and the state cache are sampled in the pipeline phase, ms. */
const SAMPLE_EVERY_MS = 100;
const MB = 1024 * 1024;

/** Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux). */
function clockTicks(): number {
  try {
    const n = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim());
    return n > 0 ? n : 100;
  } catch {
    return 100;
  }
}

/** A process's user + system CPU from /proc/<pid>/stat, µs; undefined once it is gone. */
function procCpuMicros(pid: number, ticksPerS: number): number | undefined {
  return statCpuMicros(`/proc/${pid}/stat`, ticksPerS);
}

/** The user + system CPU of a process's or thread's stat file (/proc/<pid>[/task/<tid>]/stat), µs; undefined once it is gone. */
function statCpuMicros(file: string, ticksPerS: number): number | undefined {
  try {
    const stat = readFileSync(file, "utf8");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return ((Number(f[11]) + Number(f[12])) / ticksPerS) * 1e6;
  } catch {
    return undefined;
  }
}

/**
 * A process's CPU at one instant: each thread's (µs) and, as a fallback, the process's total in
 * /proc's ticks. The ticks are 10 ms: a window of a few of them (a relay's 2,000 events at 100,000
 * events/s is 20 ms) could read none of a server's CPU, where each thread's schedstat counts ns.
 */
interface CpuReading {
  threads: Map<number, number>;
  ticks: number | undefined;
}

/** The reading of a process started after the window's start: all it used is the window's. */
const SPAWNED: CpuReading = { threads: new Map(), ticks: 0 };

function readCpu(pid: number, ticksPerS: number): CpuReading {
  return { threads: threadsCpuMicros(pid, ticksPerS), ticks: procCpuMicros(pid, ticksPerS) };
}

/**
 * The CPU a process used between two readings, µs: the sum of its threads' while every thread of
 * the first reading is still there; else (a thread that ended took its time with it) the ticks'.
 * NaN once the process is gone.
 */
function cpuBetween(a: CpuReading, b: CpuReading): number {
  if (b.ticks === undefined || a.ticks === undefined) return Number.NaN;
  if (a.threads.size === 0 || ![...a.threads.keys()].every((tid) => b.threads.has(tid))) return b.ticks - a.ticks;
  let us = 0;
  for (const [tid, v] of b.threads) us += v - (a.threads.get(tid) ?? 0);
  return us;
}

/** A process's CPU from now on: the result gives what it used since, µs (see cpuBetween). */
export function cpuMeter(pid: number, ticksPerS = clockTicks()): () => number {
  const at = readCpu(pid, ticksPerS);
  return () => cpuBetween(at, readCpu(pid, ticksPerS));
}

/** The servers' CPU from now on: `used()` is what they used since (µs), `perEvent(n)` that per event of n (undefined without servers). */
function serverCpu(servers: { nats: number; redis: number } | undefined, ticksPerS: number): { used(): { nats: number; redis: number } | undefined; perEvent(n: number): { nats: number; redis: number } | undefined } {
  const meters = servers ? { nats: cpuMeter(servers.nats, ticksPerS), redis: cpuMeter(servers.redis, ticksPerS) } : undefined;
  const used = () => (meters ? { nats: meters.nats(), redis: meters.redis() } : undefined);
  return {
    used,
    perEvent(n) {
      const u = used();
      return u ? { nats: u.nats / n, redis: u.redis / n } : undefined;
    },
  };
}

/** Each thread's CPU of a process (/proc/<pid>/task), µs by thread id: schedstat's (ns), else stat's (ticks); empty off Linux. */
function threadsCpuMicros(pid: number, ticksPerS: number): Map<number, number> {
  const out = new Map<number, number>();
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tids) {
    const running = schedTimes(pid, Number(tid))?.running;
    const us = running !== undefined ? running / 1000 : statCpuMicros(`/proc/${pid}/task/${tid}/stat`, ticksPerS);
    if (us !== undefined) out.set(Number(tid), us);
  }
  return out;
}

/**
 * The CPU this process used since `since` (a threadsCpuMicros of it), per event of `n`, by thread:
 * `main`, the worker's own thread by the groups it runs (`thread <groups>`), and `helpers`, every
 * other thread: V8's (garbage collection, compilers) and libuv's. A thread that ended in between
 * is left out. Undefined off Linux.
 */
function threadsPerEvent(since: Map<number, number>, ticksPerS: number, named: { name: string; tid: number }[], n: number): Record<string, number> | undefined {
  const now = threadsCpuMicros(process.pid, ticksPerS);
  if (now.size === 0) return undefined;
  const out: Record<string, number> = { main: 0 };
  for (const t of named) out[`thread ${t.name}`] = 0;
  out.helpers = 0;
  for (const [tid, us] of now) {
    const d = (us - (since.get(tid) ?? 0)) / n;
    const t = named.find((x) => x.tid === tid);
    const key = tid === process.pid ? "main" : t ? `thread ${t.name}` : "helpers";
    out[key] = (out[key] ?? 0) + d;
  }
  return out;
}

/** A thread's time on a core and waiting on a run queue (runnable, no core free) from /proc/<pid>/task/<tid>/schedstat, ns; undefined without it. */
function schedTimes(pid: number, tid: number): { running: number; waiting: number } | undefined {
  try {
    const [running, waiting] = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8").split(" ").map(Number);
    return Number.isFinite(running) && Number.isFinite(waiting) ? { running: running!, waiting: waiting! } : undefined;
  } catch {
    return undefined;
  }
}

/** The machine's busy CPU time, all cores, from /proc/stat (everything but idle and iowait), µs; undefined off Linux. */
function machineBusyMicros(ticksPerS: number): number | undefined {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
    // cpu user nice system idle iowait irq softirq steal (guest time is counted in user already).
    const f = line.trim().split(/\s+/).slice(1, 9).map(Number);
    const busy = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
    return Number.isFinite(busy) ? (busy / ticksPerS) * 1e6 : undefined;
  } catch {
    return undefined;
  }
}

/** A thread's schedstat times between two readings, ns. */
function schedDelta(a: { running: number; waiting: number } | undefined, b: { running: number; waiting: number } | undefined): { running: number; waiting: number } | undefined {
  return a && b ? { running: b.running - a.running, waiting: b.waiting - a.waiting } : undefined;
}

/** What a window used: CPU in µs (workers, servers, the machine's busy time), the main thread's schedstat times in ns and its GC pauses in ms. */
interface WindowUse {
  workers: number;
  servers?: { nats: number; redis: number };
  machine?: number;
  mainThread?: { running: number; waiting: number };
  /** The main thread's garbage-collection pauses, ms. */
  mainThreadGcMs?: number;
}

/** What a window used as average cores, and the main thread's shares of the window, over its `seconds`. */
function coresOver(used: WindowUse, seconds: number): NonNullable<PipelineResult["cores_to_last_output"]> {
  const cores = (us: number) => us / 1e6 / seconds;
  return {
    workers: cores(used.workers),
    ...(used.servers ? { nats: cores(used.servers.nats), redis: cores(used.servers.redis) } : {}),
    ...(used.machine !== undefined ? { machine: cores(used.machine) } : {}),
    ...(used.mainThread
      ? {
          main_thread: {
            running: used.mainThread.running / 1e9 / seconds,
            waiting_for_a_core: used.mainThread.waiting / 1e9 / seconds,
            ...(used.mainThreadGcMs !== undefined ? { gc_pauses: used.mainThreadGcMs / 1e3 / seconds } : {}),
          },
        }
      : {}),
  };
}

/**
 * The garbage-collection pauses of the thread that makes it, as a running total (ms) from
 * perf_hooks' `gc` entries: a window's pauses are the difference of two totals.
 */
class GcPauses {
  private ms = 0;
  private readonly observer = new PerformanceObserver((list) => this.add(list.getEntries()));

  constructor() {
    this.observer.observe({ entryTypes: ["gc"] });
  }

  private add(entries: PerformanceEntry[]): void {
    for (const e of entries) this.ms += e.duration;
  }

  /** The total so far, with the entries not yet handed to the observer. */
  total(): number {
    this.add(this.observer.takeRecords());
    return this.ms;
  }

  stop(): void {
    this.observer.disconnect();
  }
}

/** A process's resident set size from /proc/<pid>/status, bytes; undefined once it is gone. */
function procRss(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** A `tacit run` child of the pipeline phase. */
interface ChildWorker {
  child: ChildProcess;
  pid: number;
  spawnedAt: number;
  readyAt?: number;
  rssPeak: number;
  stderrTail(): string;
  exited: Promise<void>;
}

/** Starts `node bin/tacit.js run <file> --metrics-port 0 --set …` with the bench's servers and key, logging off. */
function spawnChildWorker(file: string, set: string[], env: Readonly<Record<string, string | undefined>>): ChildWorker {
  const child = spawn(process.execPath, tacitArgv(["run", file, "--metrics-port", "0", ...set.flatMap((s) => ["--set", s])]), {
    env: { ...env, TACIT_LOG_LEVEL: "silent" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  if (child.pid === undefined) throw new Error(`could not start a child worker: ${process.execPath} bin/tacit.js run ${file}`);
  let err = "";
  const w: ChildWorker = {
    child,
    pid: child.pid,
    spawnedAt: performance.now(),
    rssPeak: 0,
    stderrTail: () => err.trim().split("\n").slice(-5).join("\n"),
    exited: new Promise((resolve) => child.once("exit", () => resolve())),
  };
  child.stderr!.on("data", (d: Buffer) => {
    err = (err + d.toString()).slice(-10_000);
    if (w.readyAt === undefined && /worker \S+ running/.test(err)) w.readyAt = performance.now();
  });
  return w;
}

function alive(w: ChildWorker): boolean {
  return w.child.exitCode === null && w.child.signalCode === null;
}

/** SIGTERM (the worker drains), then SIGKILL whatever is still there after `graceMs`. */
async function stopChildWorkers(ws: ChildWorker[], graceMs = 15_000): Promise<void> {
  for (const w of ws) if (alive(w)) w.child.kill("SIGTERM");
  await within(Promise.all(ws.map((w) => w.exited)), graceMs);
  for (const w of ws) if (alive(w)) w.child.kill("SIGKILL");
}

/**
 * Kills the children if this process exits or is signalled before it stops them itself, so no
 * worker outlives the bench. Returns the undo.
 */
function killChildrenOnExit(ws: ChildWorker[]): () => void {
  const kill = () => {
    for (const w of ws) if (alive(w)) w.child.kill("SIGKILL");
  };
  const onSignal = (sig: NodeJS.Signals) => {
    kill();
    undo();
    // The default action, as if no handler had been installed.
    process.kill(process.pid, sig);
  };
  const undo = () => {
    process.off("exit", kill);
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  };
  process.on("exit", kill);
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  return undo;
}

/**
 * Runs the benchmark: N pre-loaded events through the do-nothing relay, then through the deployed
 * pipeline (this process's worker, plus `workers − 1` child `tacit run` processes started at the
 * same moment), each timed from its start to its last output (rate) and on to fully drained (CPU);
 * then, for the pipeline, a profiled window (V8's profiler: CPU by stage); then a latency phase
 * at a steady rate for both. Both run against the same servers in the same run. Through the
 * timed pipeline window RSS and the keyed-state cache are sampled by a timer.
 */
export async function runBench(pipeline: Pipeline, operators: (n: string) => OperatorSpec<any> | undefined, opts: BenchOptions): Promise<BenchResult> {
  const workers = opts.workers ?? 1;
  if (workers > 1 && !opts.childPipeline) throw new Error("runBench: workers > 1 needs childPipeline");
  const nats = await connectNats(pipeline, "tacit-bench");
  const redis = openPipelineRedis(pipeline);
  const children: ChildWorker[] = [];
  let undoKill = () => {};
  let worker: Worker | ThreadedWorker | undefined;
  const gc = new GcPauses();
  try {
    // Event time ends about now, so enrich's max_past_age accepts every event. The events are
    // generated as they are published (twice, identically), never held: a big run must not
    // inflate the worker's RSS with the bench's own input.
    const t0 = Date.now() - Math.ceil(opts.events / opts.users) * 1000 - 60_000;
    const lines = () => benchEvents(opts.events, opts.users, t0);
    // Warm-up events: users, sessions and ids of their own, event time before the timed events',
    // as many events per user as the timed ones get, so the warm-up takes every code path they
    // take (the later event types of a session, a user's second query).
    const warm = opts.warmupEvents ?? 0;
    const warmUsers = Math.max(1, Math.round((warm * opts.users) / opts.events));
    const warmLines = () => benchEvents(warm, warmUsers, t0 - Math.ceil(warm / warmUsers) * 1000 - 60_000, { prefix: "warm-" });
    const batch = pipeline.runtime.batch_size;

    // --- relay -----------------------------------------------------------------------------
    const rin = `${pipeline.name}_relay_in`;
    const rout = `${pipeline.name}_relay_out`;
    await ensureStream(nats, rin, [`${pipeline.subject_prefix}.relay.in`]);
    await ensureStream(nats, rout, [`${pipeline.subject_prefix}.relay.out`]);
    const relayIn = `${pipeline.subject_prefix}.relay.in`;
    const relayOut = `${pipeline.subject_prefix}.relay.out`;
    // One relay runs through the warm-up events and then the timed ones without stopping. Its
    // window starts after the batch whose outputs complete the warm-up (the events after it are
    // the ones timed, up to a batch short of the run's) and ends with the batch that completes
    // the run: the relay reports each batch's outputs as it has them, so neither end waits for a
    // poll (at a relay of 100,000 events/s, a poll every 10 ms could miss a thousand or more).
    if (warm > 0) await publishRaw(nats, relayIn, warmLines(), "warm");
    await publishRaw(nats, relayIn, lines(), "raw");
    const sig = { stop: false };
    const ticks = clockTicks();
    const relayTotal = warm + opts.events;
    const relayAt = (from: number) => ({ from, servers: serverCpu(opts.servers, ticks), cpu: process.cpuUsage(), at: performance.now() });
    // Cold (no warm-up): timed from the relay's start.
    let relayMark = warm > 0 ? undefined : relayAt(0);
    let relayOutAt: number | undefined;
    const relayDone = relay(nats, rin, relayOut, batch, sig, (n) => {
      if (!relayMark && n >= warm) relayMark = relayAt(n);
      if (relayOutAt === undefined && n >= relayTotal) relayOutAt = performance.now();
    });
    // Timed to its last output, then on to its last ack for the CPU: as the pipeline is.
    await waitUntil("the relay's outputs", async () => ({ done: relayOutAt !== undefined, progress: await streamMessages(nats, rout) }), WINDOW_POLL_MS);
    const { from: relayFrom, servers, cpu: cpu0, at: start } = relayMark!;
    if (relayFrom >= relayTotal) throw new Error(`bench: all ${relayTotal} events were through the relay in the batch that ended its warm-up; time more --events`);
    const relayEvents = relayTotal - relayFrom;
    const relaySecs = (relayOutAt! - start) / 1000;
    await waitUntil("the relay's acks", async () => {
      const n = (await nats.jsm.consumers.info(rin, "relay")).ack_floor.stream_seq;
      return { done: n >= relayTotal, progress: n };
    }, WINDOW_POLL_MS);
    const relayDrainedSecs = (performance.now() - start) / 1000;
    const relayCpu = cpuMicros(cpu0);
    const relayServers = servers.perEvent(relayEvents);
    const relayLat = latencyProbe(nats, rout, tsOfEnvelope, opts.latencyEvents, 60_000);
    await pacedPublish(pipeline, nats, opts.latencyEvents, opts.latencyRate, opts.users, relayIn);
    const relayLatencies = await relayLat;
    sig.stop = true;
    await relayDone;

    // --- pipeline --------------------------------------------------------------------------
    const plan = await planDeploy(pipeline, nats.jsm, operators);
    await applyDeploy(pipeline, nats.jsm, operators, plan);
    const groups = stageGroups(pipeline, operators);
    const durables = groups.flatMap((g) => (g.keyed ? [...Array(pipeline.partitions).keys()].map((n) => [g.inputStream, durableName(g, n)]) : [[g.inputStream, durableName(g)]]));
    const first = groups[0]!;
    /** Whether the first `n` events went through every stage: the first durable acked them and no keyed one has any left. */
    const drained = async (n: number) => {
      const c0 = await nats.jsm.consumers.info(first.inputStream, durableName(first));
      let progress = c0.ack_floor.stream_seq;
      let done = c0.ack_floor.stream_seq >= n;
      for (const [s, d] of durables) {
        const ci = await nats.jsm.consumers.info(s!, d!);
        progress += ci.ack_floor.stream_seq;
        if (ci.num_pending > 0 || ci.num_ack_pending > 0) done = false;
      }
      return { done, progress };
    };
    const events = streamName(pipeline, "events");
    const dlqStream = streamName(pipeline, "dlq");
    const outputs0 = await streamMessages(nats, events);
    // One worker runs through the warm-up events and on to the timed ones without a stop, as a
    // long-running worker does: its operators, caches and compiled code stay as they are, and its
    // start (leases, consumers, the first touch of each operator) is outside the timed window. The
    // timed events are loaded once the warm-up's are out and committed (so a commit, which a
    // warm-up shorter than the commit interval would not reach otherwise, has run too), while
    // the worker runs; the window starts when they are all in the stream.
    if (warm > 0) await publishLines(pipeline, nats.js, warmLines(), { idPrefix: "bench-warm" });
    else await publishLines(pipeline, nats.js, lines(), { idPrefix: "bench" });
    const wopts = { pipeline, operators, log: opts.log, env: opts.env, devMode: true, redis, nats };
    worker = opts.thread ? createWorker(wopts, opts.thread) : new Worker(wopts);
    const inProcess = worker;
    const budget = worker.budget;
    const labels = stageLabels(pipeline.stages);
    const profiler = opts.profile === false ? undefined : new SelfProfiler(worker instanceof Worker ? undefined : worker);
    let rssPeak = 0;
    let cachePeak = 0;
    const sample = () => {
      rssPeak = Math.max(rssPeak, process.memoryUsage.rss());
      cachePeak = Math.max(cachePeak, budget.size());
      for (const c of children) c.rssPeak = Math.max(c.rssPeak, procRss(c.pid) ?? 0);
    };
    const droppedSoFar = async () => {
      if (!(inProcess instanceof Worker)) await inProcess.refresh();
      let n = 0;
      for (const c of inProcess.stageCounters.values()) n += c.get("dropped");
      return n;
    };
    /** The child workers' CPU since a window's start (µs each; NaN for one that is gone). */
    const childrenCpuSince = (at: CpuReading[]) => children.map((c, i) => cpuBetween(at[i] ?? SPAWNED, readCpu(c.pid, ticks)));
    /**
     * Where a window starts: CPU (this process's, by thread, the children's, the servers', the
     * machine's busy time), the main thread's schedstat times and garbage-collection pauses, the
     * time, and the counts it reports.
     */
    const begin = async () => ({
      servers: serverCpu(opts.servers, ticks),
      cpu: process.cpuUsage(),
      threads: threadsCpuMicros(process.pid, ticks),
      machine: machineBusyMicros(ticks),
      sched: schedTimes(process.pid, process.pid),
      gcMs: gc.total(),
      at: performance.now(),
      children: children.map((c) => readCpu(c.pid, ticks)),
      dropped: await droppedSoFar(),
      dlq: await streamMessages(nats, dlqStream),
    });
    /**
     * Waits for the phase's first `total` events to drain, and returns when their last output was
     * out (seen within WINDOW_POLL_MS; when fewer outputs come out, dropped or dead-lettered, when
     * drained) and when they drained; `atOut` runs when the last output is seen. Until the
     * outputs are out, one stream info per check; each durable's (a consumer info each) only after
     * that, or once the outputs stop coming: the bench's own checks run in the worker's process
     * and on its server, so they are kept few.
     */
    const finish = async (total: number, atOut?: () => void) => {
      let outAt: number | undefined;
      const out = async () => {
        const n = (await streamMessages(nats, events)) - outputs0;
        if (outAt === undefined && n >= total) {
          outAt = performance.now();
          atOut?.();
        }
        return n;
      };
      await waitUntil("the pipeline's outputs", async () => {
        const n = await out();
        return { done: outAt !== undefined, progress: n };
      }, WINDOW_POLL_MS, childDied, OUTPUTS_STALL_MS);
      await waitUntil("the pipeline to drain", async () => (await out(), drained(total)), DRAIN_POLL_MS, childDied);
      const end = performance.now();
      return { outAt: outAt ?? end, end };
    };
    const childDied = () => {
      const dead = children.find((c) => !alive(c));
      return dead ? `child worker ${dead.pid} exited (${dead.child.exitCode ?? dead.child.signalCode}): ${dead.stderrTail()}` : undefined;
    };
    /**
     * Loads `lines` while the worker runs, its first group held meanwhile (as a replay's pause
     * holds it): with `runtime.threads` 2 that group runs on a thread of its own and would
     * otherwise work through the events while they are loaded, before the window. The window
     * starts once they are all in the stream, and the group is then released. (Child workers
     * are not held.) Returns the outputs out by then, and the window's start.
     */
    const load = async (lines: Iterable<string>, idPrefix: string, total: number) => {
      await inProcess.hold(first.name);
      await publishLines(pipeline, nats.js, lines, { idPrefix });
      const from = (await streamMessages(nats, events)) - outputs0;
      if (from >= total) throw new Error(`bench: all ${total} events were out before the last was loaded; time more --events`);
      const mark = await begin();
      await inProcess.release(first.name);
      return { from, mark };
    };
    // Cold (no warm-up): timed from before the workers start, their start-up included (the
    // children's CPU from spawn: /proc has nothing earlier).
    let mark = warm > 0 ? undefined : await begin();
    let pipeFrom = 0;
    undoKill = killChildrenOnExit(children);
    for (let i = 1; i < workers; i++) children.push(spawnChildWorker(opts.childPipeline!.file, opts.childPipeline!.set, opts.env));
    const sampler = setInterval(sample, SAMPLE_EVERY_MS);
    const timedTotal = warm + opts.events;
    let ends: { outAt: number; end: number };
    let toOut: WindowUse | undefined;
    try {
      sample();
      await worker.start();
      if (!mark) {
        await waitUntil("the pipeline's warm-up to drain", () => drained(warm), 100, childDied);
        ({ from: pipeFrom, mark } = await load(lines(), "bench", timedTotal));
      }
      const m = mark;
      // What the workers, the servers and the machine used up to the last output (the rate's window).
      ends = await finish(timedTotal, () => {
        toOut = {
          workers: cpuMicros(m.cpu) + childrenCpuSince(m.children).reduce((a, b) => a + b, 0),
          servers: m.servers.used(),
          machine: m.machine === undefined ? undefined : (machineBusyMicros(ticks) ?? Number.NaN) - m.machine,
          mainThread: schedDelta(m.sched, schedTimes(process.pid, process.pid)),
          mainThreadGcMs: gc.total() - m.gcMs,
        };
      });
      sample();
    } finally {
      clearInterval(sampler);
    }
    const pipeEvents = timedTotal - pipeFrom;
    const pipeSecs = (ends.outAt - mark.at) / 1000;
    const pipeDrainedSecs = (ends.end - mark.at) / 1000;
    const ownCpu = cpuMicros(mark.cpu);
    const threadsCpu = threadsPerEvent(mark.threads, ticks, "osThreads" in inProcess ? inProcess.osThreads() : [], pipeEvents);
    const pipeServersCpu = mark.servers.perEvent(pipeEvents);
    const childCpu = childrenCpuSince(mark.children);
    const rssEnd = process.memoryUsage.rss();
    const cacheEnd = budget.size();
    const outputs = (await streamMessages(nats, events)) - outputs0 - pipeFrom;
    const dlq = (await streamMessages(nats, dlqStream)) - mark.dlq;
    const dropped = (await droppedSoFar()) - mark.dropped;

    // The profiled window: as many events again, users of their own, event time after the timed
    // ones', through the same worker with V8's profiler on (it slows what it samples, so it stays
    // out of the timed window). The profiler starts (logging every function's code for it, a cost
    // of its own) before they are loaded; only the window's samples are kept.
    let profiled: { events: number; seconds: number; cpu: number; profiles: CpuProfile[] } | undefined;
    if (profiler) {
      await profiler.start();
      const total = timedTotal + opts.events;
      const t1 = t0 + Math.ceil(opts.events / opts.users) * 1000;
      const { from, mark: pm } = await load(benchEvents(opts.events, opts.users, t1, { prefix: "prof-" }), "bench-prof", total);
      profiler.mark();
      const pe = await finish(total);
      const cpu = cpuMicros(pm.cpu);
      const profiles = await profiler.stop();
      profiled = { events: total - from, seconds: (pe.outAt - pm.at) / 1000, cpu, profiles };
      // The main thread's profile at the path given; the second thread's (if any) beside it.
      profiles.forEach((p, i) => {
        if (opts.profileOut) writeFileSync(i === 0 ? opts.profileOut : opts.profileOut.replace(/(\.cpuprofile)?$/, `.thread${i}.cpuprofile`), JSON.stringify(p));
      });
    }
    const pipeLat = latencyProbe(nats, events, tsOfEnvelope, opts.latencyEvents, 60_000);
    await pacedPublish(pipeline, nats, opts.latencyEvents, opts.latencyRate, opts.users);
    const pipeLatencies = await pipeLat;
    await stopChildWorkers(children);
    await worker.stop();
    worker = undefined;

    const relayRate = relayEvents / relaySecs;
    const pipeRate = pipeEvents / pipeSecs;
    const attribution = profiled ? addAttributions(profiled.profiles.map((p) => attributeCpuProfile(p, labels))) : undefined;
    const { cpus } = await import("node:os");
    return {
      events: opts.events,
      users: opts.users,
      warmup_events: warm,
      workers,
      relay: {
        events: relayEvents,
        seconds: relaySecs,
        drained_seconds: relayDrainedSecs,
        cpu_us_per_event: relayCpu / relayEvents,
        ...(relayServers ? { servers_cpu_us_per_event: relayServers } : {}),
        events_per_s: relayRate,
        latency: { events: relayLatencies.length, rate_per_s: opts.latencyRate, p50_ms: percentile(relayLatencies, 50), p99_ms: percentile(relayLatencies, 99) },
      },
      pipeline: {
        events: pipeEvents,
        seconds: pipeSecs,
        drained_seconds: pipeDrainedSecs,
        cpu_us_per_event: (ownCpu + childCpu.reduce((a, b) => a + b, 0)) / pipeEvents,
        in_process_cpu_us_per_event: ownCpu / pipeEvents,
        ...(threadsCpu ? { threads_cpu_us_per_event: threadsCpu } : {}),
        ...(toOut ? { cores_to_last_output: coresOver(toOut, pipeSecs) } : {}),
        ...(pipeServersCpu ? { servers_cpu_us_per_event: pipeServersCpu } : {}),
        events_per_s: pipeRate,
        stages: pipeline.stages.map((s) => s.name),
        outputs,
        dlq,
        dropped,
        latency: { events: pipeLatencies.length, rate_per_s: opts.latencyRate, p50_ms: percentile(pipeLatencies, 50), p99_ms: percentile(pipeLatencies, 99) },
        ...(attribution && profiled
          ? {
              cpu_share: cpuShares(attribution, labels),
              profiled_us_per_event: attribution.total_us / profiled.events,
              profile_interval_us: PROFILE_INTERVAL_US,
              profiled: { events: profiled.events, seconds: profiled.seconds, cpu_us_per_event: profiled.cpu / profiled.events },
            }
          : {}),
        rss_peak_mb: rssPeak / MB,
        rss_end_mb: rssEnd / MB,
        cache_entries: cacheEnd,
        cache_entries_peak: cachePeak,
        cache_max_entries: budget.maxEntries,
        children: children.map((c, i) => ({
          pid: c.pid,
          ready_s: c.readyAt === undefined ? null : (c.readyAt - c.spawnedAt) / 1000,
          cpu_us_per_event: childCpu[i]! / pipeEvents,
          rss_peak_mb: c.rssPeak / MB,
        })),
      },
      ratio: pipeRate / relayRate,
      machine: { cpus: cpus().length, node: process.version, node_flags: nodeFlagsGiven() },
    };
  } finally {
    gc.stop();
    await stopChildWorkers(children).catch(() => undefined);
    undoKill();
    await worker?.stop().catch(() => undefined);
    redis.disconnect();
    await nats.nc.drain().catch(() => undefined);
  }
}

async function publishRaw(nats: NatsHandles, subject: string, lines: Iterable<string>, idPrefix: string): Promise<void> {
  let inflight: Promise<unknown>[] = [];
  let i = 0;
  for (const line of lines) {
    inflight.push(nats.js.publish(subject, encoder.encode(line), { msgID: `${idPrefix}:${i++}` }));
    if (inflight.length >= 4096) {
      await Promise.all(inflight);
      inflight = [];
    }
  }
  await Promise.all(inflight);
}

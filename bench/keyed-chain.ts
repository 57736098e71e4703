import { spawnSync } from "node:child_process";
import { PerformanceObserver, performance } from "node:perf_hooks";
import { fileURLToPath, pathToFileURL } from "node:url";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { WORKER_NODE_FLAGS, defaultPipelinePath } from "../src/config/paths.js";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope } from "../src/core/event.js";
import { isKeyedProcessor, type OperatorContext, type StageInput } from "../src/core/operator.js";
import { partitionOf } from "../src/core/partition.js";
import type { StateStore } from "../src/core/state.js";
import { KeyedChain, emptyResult, type KeyedStage, type MsgResult } from "../src/runtime/chain.js";
import { CacheBudget, StageState } from "../src/runtime/keyed-state.js";
import { admitInOrder, assignWatermarks, type PartitionProgress } from "../src/runtime/watermarks.js";
import { StageCounters } from "../src/telemetry/metrics.js";

/**
 * What the keyed thread's own work costs, without servers: the default pipeline's keyed chain
 * (dedupe → bot-score → sessionize → reformulation → label-derive, fused as the worker runs them)
 * over `tacit bench`'s events, as a worker's keyed partitions take them — each message's envelope
 * decoded from its bytes, the exactly-once guard, watermarks (out-of-orderness 0, as the bench
 * sets), the chain with the runtime's keyed state, timers and feature writes, the effects kept
 * once a batch is done — with the partitions' batches taken in turn, 145 inputs each (what the
 * bench's keyed thread averaged). No commit falls in the timed pass (the worker commits every 5 s,
 * after the bench's window); the state store answers every read with nothing (the bench's timed
 * users are new) and takes commits without keeping them.
 *
 * Each run is a process of its own, with the worker's node flags: the chain warms up on
 * `--warmup-events` events of users of their own, then times `--events` events of new users
 * (`--users` of them), as the bench does. Reported per event: wall time of the pass, the
 * process's CPU (V8's helper threads included: parallel scavenges, concurrent marking) and the
 * main thread's garbage-collection pauses; the median over `--runs`.
 *
 *   node dist/bench/keyed-chain.js [--events 20000] [--users 2000] [--warmup-events 40000] [--runs 7]
 */

const BATCH = 145;
const T0 = Date.parse("2026-01-01T00:00:00Z");
const KEY = "k1:0123456789abcdef0123456789abcdef";

const SILENT = { debug() {}, info() {}, warn() {}, error() {} };

/** A store that holds nothing: reads find nothing, commits are taken and dropped. */
const EMPTY_STORE: StateStore = {
  inOrder: true,
  get: async (keys) => keys.map(() => null),
  hgetall: async () => ({}),
  hgetallMany: async (keys) => keys.map(() => ({})),
  zrangeByScore: async () => [],
  commit: async (groups) => groups.map(() => true),
  wipe: async () => 0,
};

interface Partition {
  chain: KeyedChain;
  progress: PartitionProgress;
  seq: number;
}

/** One process's run: the warm-up pass, then the timed one. */
async function run(events: number, users: number, warmup: number): Promise<{ wallUs: number; cpuUs: number; gcUs: number }> {
  const p = loadPipelineOrThrow(defaultPipelinePath(), { env: { ...process.env, TACIT_PSEUDONYM_KEY: KEY } });
  const counters = new Map<string, StageCounters>();
  const countersOf = (stage: string): StageCounters => {
    let c = counters.get(stage);
    if (!c) counters.set(stage, (c = new StageCounters(stage)));
    return c;
  };
  const ctxOf = (stage: string, clock: ManualClock): OperatorContext => ({
    pipeline: p.name,
    prefix: p.subject_prefix,
    stage,
    partitions: p.partitions,
    state: EMPTY_STORE,
    clock,
    log: SILENT,
    metrics: countersOf(stage),
    env: { TACIT_PSEUDONYM_KEY: KEY },
    devMode: true,
  });
  const [first, ...keyed] = p.stages;
  const enrich = await findOperator(first!.operator)!.create({ ...first!.config, context_lookup: false }, ctxOf(first!.name, new ManualClock(T0)));
  if (isKeyedProcessor(enrich)) throw new Error("the first stage is unkeyed");
  const budget = new CacheBudget(p.runtime.state_cache.max_entries);
  const parts: Partition[] = [];
  for (let n = 0; n < p.partitions; n++) {
    const stages: KeyedStage[] = [];
    for (const s of keyed) {
      const clock = new ManualClock(0);
      const proc = await findOperator(s.operator)!.create(s.config, ctxOf(s.name, clock));
      if (!isKeyedProcessor(proc)) throw new Error(`${s.name} is not keyed`);
      stages.push({ name: s.name, proc, state: new StageState(EMPTY_STORE, p.subject_prefix, s.name, n, proc.codec, SILENT, budget), counters: countersOf(s.name), clock });
    }
    parts.push({ chain: new KeyedChain(stages, n), progress: { hwm: 0 }, seq: 0 });
  }
  const enc = new TextEncoder();
  const dec = new TextDecoder();

  /** enrich's outputs for `n` events of users named with `prefix`, as their bytes, by partition. */
  const envelopes = async (n: number, prefix: string, t0: number): Promise<Uint8Array[][]> => {
    const per: Uint8Array[][] = parts.map(() => []);
    const lines = [...benchEvents(n, users, t0, { prefix })].map((l) => enc.encode(l));
    for (let start = 0; start < lines.length; start += 500) {
      const raw: StageInput[] = lines.slice(start, start + 500).map((data, k) => ({ seq: start + k + 1, subject: "bench.in", data, deliveries: 1, stream_time_ms: t0 }));
      for (const o of await enrich.process(raw)) {
        for (const e of o.emits) {
          const env = e.value as Envelope;
          per[partitionOf(env.event.user, p.partitions)]!.push(enc.encode(JSON.stringify(env)));
        }
      }
    }
    return per;
  };

  /** The partitions' batches in turn, as the worker's keyed runners take them. */
  const pass = async (per: Uint8Array[][], t0: number): Promise<void> => {
    const at = per.map(() => 0);
    for (let left = per.reduce((a, x) => a + x.length, 0); left > 0; ) {
      for (let n = 0; n < parts.length; n++) {
        const part = parts[n]!;
        const batch = per[n]!.slice(at[n], at[n]! + BATCH);
        if (batch.length === 0) continue;
        at[n]! += batch.length;
        left -= batch.length;
        const msgs: StageInput[] = batch.map((data) => ({ seq: ++part.seq, subject: "bench.keyed", data, deliveries: 1, stream_time_ms: t0 + part.seq, partition: n }));
        const { run: inputs } = admitInOrder(msgs, part.progress.hwm);
        const results: MsgResult[] = inputs.map(emptyResult);
        for (let i = 0; i < inputs.length; i++) results[i]!.envelope = inputs[i]!.envelope = JSON.parse(dec.decode(inputs[i]!.data)) as Envelope;
        const after = assignWatermarks(inputs, part.progress, 0);
        await part.chain.run(
          inputs.map((input, msg) => ({ msg, input })),
          after.wm,
          results,
          emptyResult(),
        );
        part.chain.keepEffects();
        part.progress = { hwm: inputs[inputs.length - 1]!.seq, maxTs: after.maxTs, wm: after.wm };
      }
    }
  };

  await pass(await envelopes(warmup, "w", T0), T0);
  const t1 = T0 + 3_600_000;
  const timed = await envelopes(events, "t", t1);
  const pauses: { start: number; ms: number }[] = [];
  const gc = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) pauses.push({ start: e.startTime, ms: e.duration });
  });
  gc.observe({ entryTypes: ["gc"] });
  const cpu0 = process.cpuUsage();
  const w0 = performance.now();
  await pass(timed, t1);
  const w1 = performance.now();
  const cpu = process.cpuUsage(cpu0);
  // gc entries arrive after the pause they describe: let them in, then keep the window's.
  await new Promise((r) => setTimeout(r, 50));
  gc.disconnect();
  const gcMs = pauses.filter((x) => x.start >= w0 && x.start <= w1).reduce((a, x) => a + x.ms, 0);
  return { wallUs: ((w1 - w0) * 1000) / events, cpuUs: (cpu.user + cpu.system) / events, gcUs: (gcMs * 1000) / events };
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const num = (name: string, d: number): number => {
    const i = argv.indexOf(name);
    return i >= 0 ? Number(argv[i + 1]) : d;
  };
  const [events, users, warmup] = [num("--events", 20_000), num("--users", 2_000), num("--warmup-events", 40_000)];
  if (argv.includes("--child")) {
    process.stdout.write(`${JSON.stringify(await run(events, users, warmup))}\n`);
    return;
  }
  const runs = num("--runs", 7);
  const rows: { wallUs: number; cpuUs: number; gcUs: number }[] = [];
  for (let r = 0; r < runs; r++) {
    const child = spawnSync(process.execPath, [...WORKER_NODE_FLAGS, fileURLToPath(import.meta.url), "--child", "--events", String(events), "--users", String(users), "--warmup-events", String(warmup)], { encoding: "utf8" });
    if (child.status !== 0) throw new Error(`run ${r + 1} failed (${child.status}): ${child.stderr}`);
    const row = JSON.parse(child.stdout) as { wallUs: number; cpuUs: number; gcUs: number };
    rows.push(row);
    process.stdout.write(`run ${r + 1}: ${row.wallUs.toFixed(1)} µs wall, ${row.cpuUs.toFixed(1)} µs CPU, ${row.gcUs.toFixed(1)} µs GC pauses per event\n`);
  }
  const m = (f: (x: (typeof rows)[number]) => number) => median(rows.map(f)).toFixed(1);
  process.stdout.write(`keyed chain, ${events} events over ${users} users after ${warmup} warm-up events, median of ${runs}: ${m((x) => x.wallUs)} µs wall, ${m((x) => x.cpuUs)} µs CPU, ${m((x) => x.gcUs)} µs GC pauses per event\n`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((err: unknown) => {
    process.stderr.write(`keyed-chain: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}

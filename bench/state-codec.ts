import { Packr } from "msgpackr";
import { pathToFileURL } from "node:url";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { defaultPipelinePath } from "../src/config/paths.js";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope } from "../src/core/event.js";
import { isKeyedProcessor, type OperatorContext, type StageInput } from "../src/core/operator.js";
import { KeyedChain, emptyResult, type KeyedStage } from "../src/runtime/chain.js";
import { StageState, decodeStoredValue } from "../src/runtime/keyed-state.js";
import { MemoryStateStore } from "../src/state/memory.js";

/**
 * Which encoding for keyed state: the states the default pipeline's five keyed stages write on
 * `tacit bench`'s events (enrich, then the fused keyed chain on an in-memory store, as a worker
 * runs them), encoded as the runtime stores them today (the codec's value through
 * JSON.stringify, to a string) and as plain MessagePack (msgpackr, no records: what any reader and Redis's cmsgpack can read).
 * Each is timed twice: in the worker's mix (the five stages' states one after another through
 * one encoder, as a commit encodes them) and one stage at a time (one shape per encoder).
 *
 *   node dist/bench/state-codec.js [--events 20000] [--users 2000] [--runs 7]
 */

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/** The stored states (`<applied>:<json>` values of state keys) of a bench-shaped run, by stage, parsed. */
async function sampleStates(events: number, users: number): Promise<Map<string, unknown[]>> {
  const p = loadPipelineOrThrow(defaultPipelinePath(), { env: { ...process.env, TACIT_PSEUDONYM_KEY: "k1:0123456789abcdef0123456789abcdef" } });
  const T0 = Date.parse("2025-01-01T00:00:00Z");
  const store = new MemoryStateStore(() => 0);
  const ctxOf = (stage: string, clock: ManualClock): OperatorContext => ({
    pipeline: p.name,
    prefix: "codec",
    stage,
    partitions: 1,
    state: store,
    clock,
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count() {} },
    env: { TACIT_PSEUDONYM_KEY: "k1:0123456789abcdef0123456789abcdef" },
    devMode: true,
  });
  const [first, ...keyed] = p.stages;
  const enrichClock = new ManualClock(T0);
  const enrich = await findOperator(first!.operator)!.create({ ...first!.config, context_lookup: false }, ctxOf(first!.name, enrichClock));
  if (isKeyedProcessor(enrich)) throw new Error("the first stage is unkeyed");
  const stages: KeyedStage[] = [];
  for (const s of keyed) {
    const clock = new ManualClock(0);
    const ctx = ctxOf(s.name, clock);
    const proc = await findOperator(s.operator)!.create(s.config, ctx);
    if (!isKeyedProcessor(proc)) throw new Error(`${s.name} is not keyed`);
    stages.push({ name: s.name, proc, state: new StageState(store, ctx.prefix, s.name, 0, proc.codec, ctx.log), counters: ctx.metrics, clock });
  }
  const chain = new KeyedChain(stages, 0);
  const enc = new TextEncoder();
  const lines = [...benchEvents(events, users, T0)].map((l) => enc.encode(l));
  const streamTime = T0 + Math.ceil(events / users) * 1000;
  const out = new Map<string, unknown[]>(keyed.map((s) => [s.name, []]));
  for (let start = 0; start < lines.length; start += 500) {
    const raw: StageInput[] = lines.slice(start, start + 500).map((data, k) => ({ seq: start + k + 1, subject: "bench.in.x", data, deliveries: 1, stream_time_ms: streamTime }));
    const enriched = await enrich.process(raw);
    const inputs: StageInput[] = enriched.map((o, k) => ({ ...raw[k]!, envelope: o.emits[0]!.value as Envelope, partition: 0 }));
    const results = inputs.map(emptyResult);
    const sink = emptyResult();
    // The watermark of `tacit bench` (out-of-orderness 0): the batch's latest event time, so the
    // event-time hold releases every input at the end of its batch.
    const wm = Math.max(...inputs.map((i) => i.envelope!.event.ts));
    await chain.run(inputs.map((input, msg) => ({ msg, input })), wm, results, sink);
    for (const g of chain.takeCommits(results, sink, streamTime).flat()) {
      for (const op of g.ops) {
        if (op.op !== "set" || !op.key.endsWith(":state")) continue;
        const stage = op.key.split(":").at(-2)!;
        // The head stage's value may start with inputs held for event-time order: only the operator's part.
        const { payload } = decodeStoredValue(op.value);
        if (payload !== "") out.get(stage)?.push(JSON.parse(payload));
      }
    }
  }
  return out;
}

/**
 * CPU µs per state of `encode` over `states` (`runs` timed passes, median), and bytes per state
 * (`size` of what it returned, outside the timing).
 */
function measure(states: unknown[], encode: (s: unknown) => unknown, size: (x: unknown) => number, runs: number): { us: number; bytes: number } {
  const pass = (): number => {
    const t0 = process.cpuUsage();
    for (const s of states) encode(s);
    const c = process.cpuUsage(t0);
    return (c.user + c.system) / states.length;
  };
  pass();
  const xs: number[] = [];
  for (let r = 0; r < runs; r++) xs.push(pass());
  let bytes = 0;
  for (const s of states) bytes += size(encode(s));
  return { us: median(xs), bytes: bytes / states.length };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const num = (name: string, d: number): number => {
    const i = argv.indexOf(name);
    return i >= 0 ? Number(argv[i + 1]) : d;
  };
  const runs = num("--runs", 7);
  const byStage = await sampleStates(num("--events", 20_000), num("--users", 2_000));
  const packr = new Packr({ useRecords: false, variableMapSize: true });
  // JSON as the runtime pays for it: the string (the commit's packer then writes it as UTF-8, a
  // copy that the packed bytes need as well).
  const json = { encode: (s: unknown) => JSON.stringify(s), size: (x: unknown) => Buffer.byteLength(x as string) };
  const msgpack = { encode: (s: unknown) => packr.pack(s), size: (x: unknown) => (x as Uint8Array).length };
  // The worker's mix: round robin over the stages, one state of each in turn.
  const lists = [...byStage.values()];
  const mixed: unknown[] = [];
  for (let i = 0; mixed.length < lists.reduce((n, l) => n + l.length, 0); i++) for (const l of lists) if (i < l.length) mixed.push(l[i]);
  const row = (name: string, states: unknown[]) => {
    // Alternated, so both see the same machine.
    const a = measure(states, json.encode, json.size, runs);
    const b = measure(states, msgpack.encode, msgpack.size, runs);
    const a2 = measure(states, json.encode, json.size, runs);
    const b2 = measure(states, msgpack.encode, msgpack.size, runs);
    const j = Math.min(a.us, a2.us);
    const m = Math.min(b.us, b2.us);
    return `${name.padEnd(15)} ${String(states.length).padStart(6)}  JSON ${j.toFixed(2).padStart(6)} µs ${a.bytes.toFixed(0).padStart(5)} B   MessagePack ${m.toFixed(2).padStart(6)} µs ${b.bytes.toFixed(0).padStart(5)} B   (MessagePack/JSON: time ${(m / j).toFixed(2)}, bytes ${(b.bytes / a.bytes).toFixed(2)})`;
  };
  const lines = ["keyed-state encoding, CPU per state (median of the passes, the lower of two alternations) and bytes per state:", row("mixed (worker)", mixed)];
  for (const [stage, states] of byStage) lines.push(row(stage, states));
  process.stdout.write(lines.join("\n") + "\n");
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  });
}

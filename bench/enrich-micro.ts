import { pathToFileURL } from "node:url";
import { benchEvents } from "../src/bench/bench.js";
import { ManualClock } from "../src/core/clock.js";
import type { OperatorContext, StageInput } from "../src/core/operator.js";
import { userKey } from "../src/core/state.js";
import type { StateStore } from "../src/core/state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { openRedis, RedisStateStore, unlinkMatching } from "../src/state/redis.js";
import { enrich, type EnrichConfig } from "../operators/enrich.js";
import { sampleBrowserAgents } from "./bot-ua-eval.js";

/**
 * CPU cost of the `enrich` operator alone, in µs per event: `tacit bench`'s events (plus one
 * traffic-weighted browser user agent per user, and a context hash for every other user) pushed
 * through `enrich.create(…).process` in batches, with an in-memory state store, so neither NATS
 * nor Redis is measured; `--redis <url>` looks contexts up in that Redis instead (under the
 * prefix `enrich-micro`, deleted afterwards) to see the client's share. A warm-up pass runs
 * first; then `--runs` timed passes, median reported.
 *
 *   node dist/bench/enrich-micro.js [--events 20000] [--users 2000] [--batch 500] [--runs 3] [--redis redis://127.0.0.1:6379]
 *   node --cpu-prof --cpu-prof-dir=/tmp/prof dist/bench/enrich-micro.js
 */

/** Options of `benchEnrich`. */
export interface EnrichMicroOptions {
  /** Events per timed pass. @default 20000 */
  events?: number;
  /** Distinct users. @default 2000 */
  users?: number;
  /** Inputs per `process` call (the runtime's default `batch_size`). @default 500 */
  batch?: number;
  /** Timed passes. @default 3 */
  runs?: number;
  config?: EnrichConfig;
  /** Redis to look contexts up in; in-memory state when absent. */
  redisUrl?: string;
}

/** What one `benchEnrich` call measured. */
export interface EnrichMicroResult {
  events: number;
  users: number;
  batch: number;
  /** CPU µs (user + system) per event of each timed pass. */
  cpu_us_per_event: number[];
  median_cpu_us_per_event: number;
  /** Wall-clock µs per event of each timed pass. */
  wall_us_per_event: number[];
  median_wall_us_per_event: number;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export async function benchEnrich(opts: EnrichMicroOptions = {}): Promise<EnrichMicroResult> {
  const events = opts.events ?? 20_000;
  const users = opts.users ?? 2_000;
  const batchSize = opts.batch ?? 500;
  const runs = opts.runs ?? 3;
  const T0 = Date.parse("2025-01-01T00:00:00Z");
  const clock = new ManualClock(T0);
  const redis = opts.redisUrl ? openRedis(opts.redisUrl) : undefined;
  const state: StateStore = redis ? new RedisStateStore(redis) : new MemoryStateStore(() => clock.now());
  const ctx: OperatorContext = {
    pipeline: "enrich-micro",
    prefix: "enrich-micro",
    stage: "enrich",
    partitions: 8,
    state,
    clock,
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count() {} },
    env: { TACIT_PSEUDONYM_KEY: "k1:0123456789abcdef0123456789abcdef" },
    devMode: false,
  };
  const proc = await enrich.create(opts.config ?? {}, ctx);

  // Every other user has a cohort/experiment hash, as an assignment service would write it.
  const probe = await enrich.create({ context_lookup: false }, ctx);
  const agents = sampleBrowserAgents(users, 7);
  const enc = new TextEncoder();
  const lines = [...benchEvents(events, users, T0)].map((line, i) => {
    const ev = JSON.parse(line) as Record<string, unknown>;
    ev.user_agent = agents[i % users];
    return enc.encode(JSON.stringify(ev));
  });
  for (let u = 0; u < users; u += 2) {
    const [o] = await probe.process([{ seq: 0, subject: "bench.in.x", data: lines[u]!, deliveries: 1, stream_time_ms: T0 }]);
    const user = (o!.emits[0]!.value as { event: { user: string } }).event.user;
    await state.commit([{ ops: [{ op: "hset", key: userKey(ctx.prefix, user, "context"), fields: { cohort: `c${u % 5}`, experiment_id: "exp-1", variant: u % 4 ? "a" : "b" } }] }]);
  }
  // Stream time at the end of the bench's event time, so no event is too old or too far ahead.
  const streamTime = T0 + Math.ceil(events / users) * 1000;
  const batches: StageInput[][] = [];
  for (let start = 0; start < lines.length; start += batchSize) {
    batches.push(lines.slice(start, start + batchSize).map((data, k) => ({ seq: start + k + 1, subject: "bench.in.x", data, deliveries: 1, stream_time_ms: streamTime })));
  }

  const pass = async (): Promise<{ cpu: number; wall: number }> => {
    const cpu0 = process.cpuUsage();
    const wall0 = process.hrtime.bigint();
    for (const b of batches) {
      const outs = await proc.process(b);
      for (const o of outs) if (o.error) throw new Error(`enrich failed in the bench: ${o.error.message}`);
    }
    const wall = Number(process.hrtime.bigint() - wall0) / 1000;
    const c = process.cpuUsage(cpu0);
    return { cpu: (c.user + c.system) / events, wall: wall / events };
  };
  await pass(); // warm-up: JIT, and the caches a long-running worker would have filled
  const cpu: number[] = [];
  const wall: number[] = [];
  for (let r = 0; r < runs; r++) {
    const p = await pass();
    cpu.push(p.cpu);
    wall.push(p.wall);
  }
  if (redis) {
    await unlinkMatching(redis, userKey(ctx.prefix, "*", "context"));
    redis.disconnect();
  }
  return { events, users, batch: batchSize, cpu_us_per_event: cpu, median_cpu_us_per_event: median(cpu), wall_us_per_event: wall, median_wall_us_per_event: median(wall) };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const num = (name: string): number | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? Number(argv[i + 1]) : undefined;
  };
  const i = argv.indexOf("--redis");
  const redisUrl = i >= 0 ? argv[i + 1] : undefined;
  const r = await benchEnrich({ events: num("--events"), users: num("--users"), batch: num("--batch"), runs: num("--runs"), redisUrl });
  if (argv.includes("--json")) {
    process.stdout.write(JSON.stringify(r, null, 2) + "\n");
    return;
  }
  const fmt = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(", ");
  process.stdout.write(
    `enrich micro-benchmark: ${r.events} events, ${r.users} users, batches of ${r.batch}, state ${redisUrl ?? "in memory"}\n` +
      `  CPU  µs/event  median ${r.median_cpu_us_per_event.toFixed(2)}  (runs ${fmt(r.cpu_us_per_event)})\n` +
      `  wall µs/event  median ${r.median_wall_us_per_event.toFixed(2)}  (runs ${fmt(r.wall_us_per_event)})\n`,
  );
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  });
}

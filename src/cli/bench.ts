import type { Command } from "commander";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findOperator } from "../../operators/index.js";
import { loadPipelineOrThrow } from "../config/load.js";
import { ConfigError } from "../core/errors.js";
import { runBench, type BenchResult } from "../bench/bench.js";
import { ensureBinaries } from "../services/binaries.js";
import { freePort, startNats, startRedis, type ServiceHandle } from "../services/processes.js";
import { action, cliLogger, collect, out, workerThread } from "./common.js";
import { defaultPipelinePath } from "../config/paths.js";

function fmt(r: BenchResult): string {
  const n = (x: number) => (Number.isFinite(x) ? Math.round(x).toLocaleString("en-US") : "-");
  const ms = (x: number) => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : "-");
  const mb = (x: number) => `${Math.round(x)} MB`;
  const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
  const p = r.pipeline;
  const lines = [
    `events: ${r.events} over ${r.users} users on ${r.machine.cpus} cores, node ${r.machine.node}${r.machine.node_flags.length ? ` ${r.machine.node_flags.join(" ")}` : ""}, ${r.warmup_events ? `after ${r.warmup_events} warm-up events each` : "cold (no warm-up)"}; pipeline phase: ${r.workers === 1 ? "1 worker (in-process)" : `${r.workers} workers (in-process + ${r.workers - 1} child process${r.workers > 2 ? "es" : ""})`}`,
    `relay     ${n(r.relay.events_per_s).padStart(9)} events/s  (${r.relay.seconds.toFixed(2)} s to the last output, ${r.relay.drained_seconds.toFixed(2)} s to drained; ${n(r.relay.cpu_us_per_event)} µs CPU/event)   latency p50 ${ms(r.relay.latency.p50_ms)}  p99 ${ms(r.relay.latency.p99_ms)} at ${r.relay.latency.rate_per_s}/s`,
    `pipeline  ${n(p.events_per_s).padStart(9)} events/s  (${p.seconds.toFixed(2)} s to the last output, ${p.drained_seconds.toFixed(2)} s to drained; ${n(p.cpu_us_per_event)} µs CPU/event${r.workers > 1 ? ` over ${r.workers} workers` : ""})   latency p50 ${ms(p.latency.p50_ms)}  p99 ${ms(p.latency.p99_ms)} at ${p.latency.rate_per_s}/s`,
    `ratio     ${r.ratio.toFixed(3)}  (pipeline ÷ relay, same run)   stages: ${p.stages.join(" → ")}`,
    ...(r.relay.servers_cpu_us_per_event && p.servers_cpu_us_per_event
      ? [`servers   CPU/event relay: nats-server ${n(r.relay.servers_cpu_us_per_event.nats)} µs; pipeline: nats-server ${n(p.servers_cpu_us_per_event.nats)} µs, redis-server ${n(p.servers_cpu_us_per_event.redis)} µs`]
      : []),
    ...(p.threads_cpu_us_per_event
      ? [`threads   CPU/event of the ${r.workers > 1 ? "in-process " : ""}worker's threads: ${Object.entries(p.threads_cpu_us_per_event).map(([k, v]) => `${k === "helpers" ? "helpers (V8's GC and compilers, libuv)" : k} ${n(v)} µs`).join(", ")}`]
      : []),
    ...(p.cores_to_last_output
      ? [
          `cores     used on average up to the last output: worker${r.workers > 1 ? "s" : ""} ${p.cores_to_last_output.workers.toFixed(2)}` +
            (p.cores_to_last_output.nats !== undefined ? `, nats-server ${p.cores_to_last_output.nats.toFixed(2)}, redis-server ${(p.cores_to_last_output.redis ?? Number.NaN).toFixed(2)}` : "") +
            (p.cores_to_last_output.machine !== undefined ? `; the whole machine ${p.cores_to_last_output.machine.toFixed(2)} of ${r.machine.cpus}` : "") +
            (p.cores_to_last_output.main_thread
              ? `; the ${r.workers > 1 ? "in-process worker's " : ""}main thread on a core ${pct(p.cores_to_last_output.main_thread.running)} of the time, waiting for one ${pct(p.cores_to_last_output.main_thread.waiting_for_a_core)}` +
                (p.cores_to_last_output.main_thread.gc_pauses !== undefined ? `, paused for garbage collection ${pct(p.cores_to_last_output.main_thread.gc_pauses)}` : "")
              : ""),
        ]
      : []),
    `outputs ${p.outputs}, dropped ${p.dropped}, dead letters ${p.dlq}`,
  ];
  if (p.cpu_share) {
    const who = r.workers > 1 ? "in-process worker" : "worker";
    lines.push(
      `cpu share of the ${who}, profiled window of ${p.profiled?.events ?? "-"} events after the timed one: V8 samples every ${p.profile_interval_us} µs, ` +
        `${n(p.profiled_us_per_event ?? Number.NaN)} µs/event of non-idle sampled time (wall clock on the stack; the process used ` +
        `${n(p.profiled?.cpu_us_per_event ?? Number.NaN)} µs/event of CPU with the profiler on, ${n(p.in_process_cpu_us_per_event)} in the timed window)`,
    );
    const entries = Object.entries(p.cpu_share);
    const width = Math.max(...entries.map(([k]) => k.length));
    for (const [k, v] of entries) lines.push(`  ${k.padEnd(width)}  ${pct(v).padStart(6)}  ${"█".repeat(Math.round(v * 40))}`);
  }
  lines.push(
    `memory    worker RSS peak ${mb(p.rss_peak_mb)}, end ${mb(p.rss_end_mb)} (${r.workers > 1 ? "in-process worker, " : ""}sampled every 100 ms; includes the bench's client)`,
    `state     state_cache.max_entries ${n(p.cache_max_entries)}, keyed entries in memory at the end ${n(p.cache_entries)}, peak ${n(p.cache_entries_peak)}${r.workers > 1 ? " (in-process worker)" : ""}`,
  );
  for (const c of p.children) {
    lines.push(`child     pid ${c.pid}: ${n(c.cpu_us_per_event)} µs CPU/event (start-up included), RSS peak ${mb(c.rss_peak_mb)}, running after ${c.ready_s === null ? "-" : `${c.ready_s.toFixed(2)} s`}`);
  }
  return lines.join("\n");
}

function positiveInt(name: string, v: number): number {
  if (!Number.isInteger(v) || v < 1) throw new ConfigError(`--${name} must be a positive integer, got ${v}`);
  return v;
}

interface BenchCliOptions {
  events: number;
  users: number;
  warmupEvents: number;
  latencyEvents: number;
  latencyRate: number;
  workers: number;
  cacheEntries?: number;
  stages?: number;
  profile: boolean;
  profileOut?: string;
  set: string[];
  json?: boolean;
}

export function registerBench(program: Command): void {
  program
    .command("bench [pipeline]")
    .description(
      "throughput and latency of the pipeline beside a do-nothing JetStream relay, in the same run, on its own nats-server and " +
        "redis-server (unless NATS_URL and REDIS_URL are set). Each is timed from its start to its last output, and its CPU to " +
        "its last input settled. The pipeline phase also reports the worker's RSS peak and end, the keyed-state entries held in " +
        "memory against runtime.state_cache.max_entries, and, from a profiled window of as many events again after the timed " +
        "one (V8 sampling profiler, which slows the worker, so never in the timed window), each stage's share of the worker's " +
        "CPU (a stage's share includes the libraries and state access its operator calls)",
    )
    .option("--events <n>", "events to push through each", (v) => Number(v), 50_000)
    .option("--users <n>", "distinct users the events are spread over (each user's events cycle query → shown → … in order; with more users than events every event is a query)", (v) => Number(v), 2_000)
    .option(
      "--warmup-events <n>",
      "events through the relay and through the pipeline (on users of their own) before each is timed, by the same relay and " +
        "workers, which go on to the timed events without a stop (the pipeline's are loaded once the warm-up is out and committed): " +
        "the timed window measures a running worker, as a long-running one is, not V8 compiling the code or the worker starting; " +
        "0 times a cold start",
      (v) => Number(v),
      40_000,
    )
    .option("--latency-events <n>", "events for the steady-rate latency phase", (v) => Number(v), 2_000)
    .option("--latency-rate <n>", "events/s in the latency phase", (v) => Number(v), 1_000)
    .option(
      "--workers <n>",
      "worker processes in the pipeline phase: this process's worker plus n−1 `tacit run` children on the same servers, all started " +
        "once the events are loaded and timed to drained (cold, the children's start-up is inside the time and their CPU); CPU/event sums them all",
      (v) => Number(v),
      1,
    )
    .option(
      "--stages <n>",
      "only the pipeline's first n stages (the last of them publishes the outputs): run it for n = 1, 2, … to see what each layer of the pipeline costs; one worker only",
      (v) => Number(v),
    )
    .option("--cache-entries <n>", "shorthand for --set runtime.state_cache.max_entries=<n> (the in-memory keyed-state bound per worker)", (v) => Number(v))
    .option("--no-profile", "skip the profiled window (and the per-stage shares)")
    .option("--profile-out <file>", "also write the profiled window's CPU profile there (.cpuprofile: Chrome DevTools, speedscope)")
    .option("--set <path=value>", "override a pipeline value (repeatable)", collect, [])
    .option("--json", "print machine-readable JSON")
    .action(
      action(async (file: string | undefined, opts: BenchCliOptions) => {
        for (const k of ["events", "users", "latencyEvents", "latencyRate", "workers"] as const) positiveInt(k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`), opts[k]);
        if (!Number.isInteger(opts.warmupEvents) || opts.warmupEvents < 0) throw new ConfigError(`--warmup-events must be 0 or a positive integer, got ${opts.warmupEvents}`);
        if (opts.cacheEntries !== undefined) positiveInt("cache-entries", opts.cacheEntries);
        if (opts.stages !== undefined) {
          positiveInt("stages", opts.stages);
          // Child workers load the whole pipeline file.
          if (opts.workers > 1) throw new ConfigError("--stages runs one worker: leave out --workers");
        }
        const log = cliLogger();
        const started: ServiceHandle[] = [];
        let dir: string | undefined;
        const env: Record<string, string | undefined> = { ...process.env };
        try {
          const pipelineFile = file ?? defaultPipelinePath();
          // The synthetic events come in event-time order: with out-of-orderness 0 the event-time hold
          // releases each at the end of its batch, so the phases time the processing, not the wait for
          // the watermark (that wait is the bound itself; --set event_time.max_out_of_orderness=… to include it).
          const set = [`name=tacitbench`, `subject_prefix=tacitbench`, "event_time.max_out_of_orderness=0ms", ...opts.set, ...(opts.cacheEntries !== undefined ? [`runtime.state_cache.max_entries=${opts.cacheEntries}`] : [])];
          // Bad config fails before any server starts.
          const { stages } = loadPipelineOrThrow(pipelineFile, { set, env, operators: findOperator });
          if (opts.stages !== undefined && opts.stages > stages.length) throw new ConfigError(`--stages ${opts.stages}: ${pipelineFile} has ${stages.length} stages`);
          // Own servers unless URLs were given: a bench must not touch someone's data.
          if (!process.env.NATS_URL || !process.env.REDIS_URL) {
            await ensureBinaries({ install: true, log: (m) => process.stderr.write(m + "\n") });
            dir = mkdtempSync(join(tmpdir(), "tacit-bench-"));
            const nats = await startNats({ port: await freePort(), dataDir: join(dir, "nats") });
            started.push(nats);
            const redis = await startRedis({ port: await freePort(), dataDir: join(dir, "redis") });
            started.push(redis);
            env.NATS_URL = nats.url;
            env.REDIS_URL = redis.url;
          }
          const whole = loadPipelineOrThrow(pipelineFile, { set, env, operators: findOperator });
          // A prefix of a valid pipeline is one: every stage's prerequisites come before it.
          const p = opts.stages === undefined ? whole : { ...whole, stages: whole.stages.slice(0, opts.stages) };
          if (!opts.json) {
            process.stderr.write(
              `bench: ${opts.events} events (after ${opts.warmupEvents} to warm up) over ${opts.users} users through a relay, then through ${p.stages.map((s) => s.name).join(" → ")} ` +
                `with ${opts.workers} worker${opts.workers > 1 ? "s" : ""} (state_cache.max_entries ${p.runtime.state_cache.max_entries}) …\n`,
            );
          }
          const workerEnv = { ...env, TACIT_PSEUDONYM_KEY: env.TACIT_PSEUDONYM_KEY ?? "bench:tacit-bench-fixed-key-0123456789" };
          const [nats, redis] = started;
          const res = await runBench(p, findOperator, {
            events: opts.events,
            users: opts.users,
            warmupEvents: opts.warmupEvents,
            latencyEvents: opts.latencyEvents,
            latencyRate: opts.latencyRate,
            log,
            env: workerEnv,
            workers: opts.workers,
            childPipeline: { file: pipelineFile, set },
            thread: workerThread(process.env.TACIT_LOG_LEVEL ?? "warn", log),
            profile: opts.profile,
            ...(opts.profileOut ? { profileOut: opts.profileOut } : {}),
            ...(nats && redis ? { servers: { nats: nats.pid, redis: redis.pid } } : {}),
          });
          out(opts.json, res, () => fmt(res));
          return 0;
        } finally {
          for (const s of started.reverse()) await s.stop().catch(() => undefined);
          if (dir) rmSync(dir, { recursive: true, force: true });
        }
      }),
    );
}

import type { Command } from "commander";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findOperator } from "../../operators/index.js";
import { loadPipelineOrThrow } from "../config/load.js";
import { runBench, type BenchResult } from "../bench/bench.js";
import { ensureBinaries } from "../services/binaries.js";
import { freePort, startNats, startRedis, type ServiceHandle } from "../services/processes.js";
import { action, cliLogger, collect, out } from "./common.js";
import { defaultPipelinePath } from "../config/paths.js";

function fmt(r: BenchResult): string {
  const n = (x: number) => Math.round(x).toLocaleString("en-US");
  const ms = (x: number) => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : "-");
  return [
    `events: ${r.events} on ${r.machine.cpus} cores, node ${r.machine.node}`,
    `relay     ${n(r.relay.events_per_s).padStart(9)} events/s  (${r.relay.seconds.toFixed(2)} s, ${n(r.relay.cpu_us_per_event)} µs CPU/event)   latency p50 ${ms(r.relay.latency.p50_ms)}  p99 ${ms(r.relay.latency.p99_ms)} at ${r.relay.latency.rate_per_s}/s`,
    `pipeline  ${n(r.pipeline.events_per_s).padStart(9)} events/s  (${r.pipeline.seconds.toFixed(2)} s, ${n(r.pipeline.cpu_us_per_event)} µs CPU/event)   latency p50 ${ms(r.pipeline.latency.p50_ms)}  p99 ${ms(r.pipeline.latency.p99_ms)} at ${r.pipeline.latency.rate_per_s}/s`,
    `ratio     ${r.ratio.toFixed(3)}  (pipeline ÷ relay, same run)   stages: ${r.pipeline.stages.join(" → ")}`,
    `outputs ${r.pipeline.outputs}, dropped ${r.pipeline.dropped}, dead letters ${r.pipeline.dlq}`,
  ].join("\n");
}

export function registerBench(program: Command): void {
  program
    .command("bench [pipeline]")
    .description("throughput and latency of the pipeline beside a do-nothing JetStream relay, in the same run")
    .option("--events <n>", "events to push through each", (v) => Number(v), 50_000)
    .option("--users <n>", "distinct users", (v) => Number(v), 2_000)
    .option("--latency-events <n>", "events for the steady-rate latency phase", (v) => Number(v), 2_000)
    .option("--latency-rate <n>", "events/s in the latency phase", (v) => Number(v), 1_000)
    .option("--set <path=value>", "override a pipeline value (repeatable)", collect, [])
    .option("--json", "print machine-readable JSON")
    .action(
      action(async (file: string | undefined, opts: { events: number; users: number; latencyEvents: number; latencyRate: number; set: string[]; json?: boolean }) => {
        const log = cliLogger();
        const started: ServiceHandle[] = [];
        let dir: string | undefined;
        const env: Record<string, string | undefined> = { ...process.env };
        try {
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
          const p = loadPipelineOrThrow(file ?? defaultPipelinePath(), {
            set: [`name=tacitbench`, `subject_prefix=tacitbench`, ...opts.set],
            env,
            operators: findOperator,
          });
          if (!opts.json) process.stderr.write(`bench: ${opts.events} events through a relay, then through ${p.stages.map((s) => s.name).join(" → ")} …\n`);
          const res = await runBench(p, findOperator, { events: opts.events, users: opts.users, latencyEvents: opts.latencyEvents, latencyRate: opts.latencyRate, log, env: { ...env, TACIT_PSEUDONYM_KEY: env.TACIT_PSEUDONYM_KEY ?? "bench:tacit-bench-fixed-key-0123456789" } });
          out(opts.json, res, () => fmt(res));
          return 0;
        } finally {
          for (const s of started.reverse()) await s.stop().catch(() => undefined);
          if (dir) rmSync(dir, { recursive: true, force: true });
        }
      }),
    );
}

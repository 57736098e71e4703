import type { Command } from "commander";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { findOperator } from "../../operators/index.js";
import { loadPipelineOrThrow } from "../config/load.js";
import type { Pipeline } from "../config/types.js";
import { parseDuration } from "../core/duration.js";
import { applyDeploy, formatPlan, planDeploy } from "../runtime/deploy.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { publishLines } from "../runtime/publisher.js";
import { formatStatus, pipelineStatus, type PipelineStatus } from "../runtime/status.js";
import { streamName } from "../runtime/topology.js";
import { Worker } from "../runtime/worker.js";
import { servicesUp } from "../services/embedded.js";
import { openPipelineRedis } from "../state/redis.js";
import { action, cliLogger, collect } from "./common.js";
import { defaultPipelinePath, projectRoot } from "./paths.js";

const decoder = new TextDecoder();

/** Reads up to `n` messages of a stream from the start (for showing samples). */
async function sample(nats: NatsHandles, stream: string, n: number, filter?: string): Promise<{ subject: string; data: string; headers: Record<string, string> }[]> {
  const name = `demo_${Date.now().toString(36)}_${Math.floor(Math.random() * 1e6)}`;
  try {
    await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.All, inactive_threshold: 10_000_000_000, ...(filter ? { filter_subject: filter } : {}) });
  } catch {
    return [];
  }
  const c = await nats.js.consumers.get(stream, name);
  const out: { subject: string; data: string; headers: Record<string, string> }[] = [];
  while (out.length < n) {
    const m = await c.next({ expires: 1000 });
    if (!m) break;
    const headers: Record<string, string> = {};
    if (m.headers) for (const [k, v] of m.headers) headers[k] = v.join(",");
    out.push({ subject: m.subject, data: decoder.decode(m.data), headers });
  }
  await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
  return out;
}

/**
 * Shifts the sample's event times so its last event is `now`: enrich rejects events older than
 * `max_past_age`, and a bundled file would otherwise age out. Lines that are not JSON pass as is.
 */
export function rebase(lines: string[], now: number): string[] {
  const times = lines.map((l) => {
    try {
      const t = Date.parse((JSON.parse(l) as { timestamp?: string }).timestamp ?? "");
      return Number.isNaN(t) ? undefined : t;
    } catch {
      return undefined;
    }
  });
  const last = Math.max(...times.filter((t): t is number => t !== undefined));
  if (!Number.isFinite(last)) return lines;
  const shift = now - last;
  return lines.map((l, i) => {
    if (times[i] === undefined) return l;
    const ev = JSON.parse(l) as Record<string, unknown>;
    ev.timestamp = new Date(times[i]! + shift).toISOString();
    return JSON.stringify(ev);
  });
}

function drained(s: PipelineStatus): boolean {
  return s.stages.every((st) => st.pending === 0 && st.ack_pending === 0);
}

/**
 * The main job on the embedded default: services up, deploy, run a worker, publish traffic,
 * show a live stage table, sample outputs and dead letters, then stop the worker cleanly.
 */
export async function runDemo(opts: { duration: string; input?: string; set: string[]; json?: boolean }): Promise<number> {
  const say = (s: string) => {
    if (!opts.json) process.stdout.write(s + "\n");
  };
  const timeoutMs = parseDuration(opts.duration, "--duration");
  say("tacit demo — the embedded default: local nats-server and redis-server, pipelines/feedback.yaml\n");

  const up = await servicesUp({ install: true, log: (m) => say(`  ${m}`) });
  const env: Record<string, string | undefined> = { ...process.env };
  if (!process.env.NATS_URL) env.NATS_URL = up.nats.url;
  if (!process.env.REDIS_URL) env.REDIS_URL = up.redis.url;
  say(`1. services: nats ${env.NATS_URL}, redis ${env.REDIS_URL} (stop them with \`tacit services down\`)`);

  const p: Pipeline = loadPipelineOrThrow(defaultPipelinePath(), { set: opts.set, env, operators: findOperator });
  const nats = await connectNats(p, "tacit-demo");
  const redis = openPipelineRedis(p);
  const log = cliLogger();
  let worker: Worker | undefined;
  try {
    const plan = await planDeploy(p, nats.jsm, findOperator);
    await applyDeploy(p, nats.jsm, findOperator, plan);
    say(`2. deploy: ${formatPlan(plan, false).split("\n").pop()}`);

    if (!env.TACIT_PSEUDONYM_KEY) {
      say("   warning: TACIT_PSEUDONYM_KEY is not set; the demo pseudonymizes users with a fixed development key. Set it in production.");
    }
    worker = new Worker({ pipeline: p, operators: findOperator, log, env, devMode: true, redis, nats });
    await worker.start();
    say(`3. run: worker ${worker.id} on ${p.stages.map((s) => s.name).join(" → ")} (${p.partitions} partitions)`);

    const input = opts.input ?? join(projectRoot(), "pipelines", "sample-events.jsonl");
    const lines = rebase(readFileSync(input, "utf8").split("\n").filter((l) => l.trim()), Date.now());
    const res = await publishLines(p, nats.js, lines, { idPrefix: `demo-${Date.now()}` });
    say(`4. publish: ${res.published} events from ${input}`);

    const tty = process.stdout.isTTY && !opts.json;
    const end = Date.now() + timeoutMs;
    let status = await pipelineStatus(p, nats.jsm, redis, findOperator);
    let printed = 0;
    while (Date.now() < end) {
      await new Promise((r) => setTimeout(r, 500));
      status = await pipelineStatus(p, nats.jsm, redis, findOperator);
      const table = formatStatus(status);
      if (tty) {
        if (printed) process.stdout.write(`\x1b[${printed}A\x1b[J`);
        process.stdout.write(table + "\n");
        printed = table.split("\n").length;
      } else if (!opts.json && Date.now() % 4000 < 600) {
        say(table);
      }
      if (drained(status) && status.stages[0]!.partitions[0]!.ack_floor_seq >= res.published) break;
    }
    if (!tty) say(formatStatus(status));

    const events = await sample(nats, streamName(p, "events"), 2);
    const labels = await sample(nats, streamName(p, "labels"), 3);
    const dlq = await sample(nats, streamName(p, "dlq"), 5);
    say("\n5. sample outputs");
    for (const e of labels.length ? labels : events) say(`   ${e.subject}  ${e.data.slice(0, 300)}`);
    say(`\n   dead letters (${status.outputs.dlq} in all): bad input is kept with its bytes and a reason`);
    for (const d of dlq) say(`   [${d.headers["Tacit-Stage"]}] ${d.headers["Tacit-Reason"]}: ${d.headers["Tacit-Message"]}`);

    let dropped = 0;
    for (const c of worker.counters.values()) dropped += c.get("dropped");
    const summary = { published: res.published, outputs: status.outputs, dropped, drained: drained(status) };
    if (opts.json) process.stdout.write(JSON.stringify({ status, summary }, null, 2) + "\n");
    say(`\n6. done: ${res.published} published → ${status.outputs.events} clean events, ${dropped} dropped (duplicates, sampling), ${status.outputs.dlq} dead letters`);
    say(`   next: tacit status pipelines/feedback.yaml · tacit tail pipelines/feedback.yaml dlq --count 5 · tacit services down`);
    return drained(status) ? 0 : 1;
  } finally {
    await worker?.stop();
    redis.disconnect();
    await nats.nc.drain().catch(() => undefined);
  }
}

export function registerDemo(program: Command): void {
  program
    .command("demo")
    .description("the main job on the embedded default: services up, deploy, run, traffic, live stage table, sample outputs")
    .option("--duration <d>", "give up waiting for the pipeline to drain after this long", "60s")
    .option("--input <file>", "events to publish (default: pipelines/sample-events.jsonl)")
    .option("--set <path=value>", "override a pipeline value (repeatable)", collect, [])
    .option("--json", "print machine-readable JSON")
    .action(action(async (opts: { duration: string; input?: string; set: string[]; json?: boolean }) => runDemo(opts)));
}

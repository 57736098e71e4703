import type { Command } from "commander";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import { readFileSync } from "node:fs";
import { findOperator } from "../../operators/index.js";
import { loadPipelineOrThrow } from "../config/load.js";
import type { Pipeline } from "../config/types.js";
import { parseDuration } from "../core/duration.js";
import { applyDeploy, formatPlan, planDeploy } from "../runtime/deploy.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { publishLines } from "../runtime/publisher.js";
import { formatStatus, pipelineStatus, type PipelineStatus } from "../runtime/status.js";
import { streamName } from "../config/topology.js";
import { createWorker, type ThreadedWorker } from "../runtime/threads.js";
import type { Worker } from "../runtime/worker.js";
import { servicesUp } from "../services/embedded.js";
import { RedisStateStore, openPipelineRedis } from "../state/redis.js";
import { resolvePseudonymKey, pseudonymize } from "../core/pseudonym.js";
import { simulate } from "../sim/simulate.js";
import type { TruthRecord } from "../sim/truth.js";
import { collectLive } from "../eval/live.js";
import { eventsPerUser } from "../eval/inputs.js";
import { evaluate, type Report } from "../eval/evaluate.js";
import { formatReport } from "./evaluate.js";
import { desiredStreams } from "../runtime/deploy.js";
import { stageGroups } from "../config/topology.js";
import { action, cliLogger, collect, workerThread } from "./common.js";
import { defaultPipelinePath } from "../config/paths.js";

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

/** Publishes lines paced evenly over `ms` of wall time (the live part of the demo). */
async function pacedPublish(p: Pipeline, nats: NatsHandles, lines: string[], ms: number, idPrefix: string, onTick: () => Promise<void>): Promise<number> {
  const t0 = Date.now();
  const ticks = Math.max(1, Math.round(ms / 500));
  const per = Math.ceil(lines.length / ticks);
  let sent = 0;
  for (let k = 0; k < ticks && sent < lines.length; k++) {
    const chunk = lines.slice(sent, sent + per);
    // Line numbers stay global so the Nats-Msg-Ids are those of the whole file.
    await publishLines(p, nats.js, chunk, { idPrefix: `${idPrefix}-${sent}` });
    sent += chunk.length;
    await onTick();
    const wait = t0 + ((k + 1) * ms) / ticks - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  return sent;
}

export interface DemoOptions {
  duration: string;
  users: number;
  seed: string;
  input?: string;
  set: string[];
  json?: boolean;
}

/**
 * The main job on the embedded default: services up, deploy, a worker, simulated traffic with
 * hidden ground truth published over `--duration`, a live per-stage table, sample labels and
 * dead letters, and the evaluation of the labels against the truth.
 */
export async function runDemo(opts: DemoOptions): Promise<number> {
  const say = (s: string) => {
    if (!opts.json) process.stdout.write(s + "\n");
  };
  const publishMs = parseDuration(opts.duration, "--duration");
  say("tacit demo — the embedded default: local nats-server and redis-server, pipelines/feedback.yaml\n");

  const up = await servicesUp({ install: true, log: (m) => say(`  ${m}`) });
  const env: Record<string, string | undefined> = { ...process.env };
  if (!process.env.NATS_URL) env.NATS_URL = up.nats.url;
  if (!process.env.REDIS_URL) env.REDIS_URL = up.redis.url;
  say(`1. services: nats ${env.NATS_URL}, redis ${env.REDIS_URL} (stop them with \`tacit services down\`)`);

  // A short idle timeout so quiet partitions close their sessions within the demo's minute.
  const p: Pipeline = loadPipelineOrThrow(defaultPipelinePath(), { set: ["event_time.idle_timeout=10s", ...opts.set], env, operators: findOperator });
  const nats = await connectNats(p, "tacit-demo");
  const redis = openPipelineRedis(p);
  const log = cliLogger();
  let worker: Worker | ThreadedWorker | undefined;
  try {
    // The demo owns this sandbox: a previous demo's data would mix into this one's evaluation.
    const plan = await planDeploy(p, nats.jsm, findOperator);
    await applyDeploy(p, nats.jsm, findOperator, plan);
    let purged = 0;
    for (const s of desiredStreams(p, stageGroups(p, findOperator))) purged += Number((await nats.jsm.streams.purge(s.name!)).purged);
    const wiped = await new RedisStateStore(redis).wipe(`tacit:{${p.subject_prefix}*`);
    say(`2. deploy: ${formatPlan(plan, false).split("\n").pop()}${purged || wiped ? `; cleared a previous demo (${purged} messages, ${wiped} keys)` : ""}`);

    const { key, dev } = resolvePseudonymKey(env, "TACIT_PSEUDONYM_KEY", true);
    if (dev) say("   warning: TACIT_PSEUDONYM_KEY is not set; the demo pseudonymizes users with a fixed development key. Set it in production.");
    worker = createWorker({ pipeline: p, operators: findOperator, log, env, devMode: true, redis, nats }, workerThread(process.env.TACIT_LOG_LEVEL ?? "warn", log));
    await worker.start();
    say(`3. run: worker ${worker.id} on ${p.stages.map((s) => s.name).join(" → ")} (${p.partitions} partitions)`);

    let lines: string[];
    let truth: TruthRecord[] = [];
    if (opts.input) {
      lines = rebase(readFileSync(opts.input, "utf8").split("\n").filter((l) => l.trim()), Date.now());
      say(`4. traffic: ${lines.length} events from ${opts.input}`);
    } else {
      // Two hours of event time ending half an hour ago, so sessions can close on the watermark.
      const sim = simulate({ seed: opts.seed, users: opts.users, durationMs: 2 * 3_600_000, startTime: Date.now() - 3 * 3_600_000, botFraction: 0.3 });
      lines = sim.events;
      truth = sim.truth;
      const s = sim.summary as unknown as Record<string, unknown>;
      say(`4. traffic: tacit simulate --seed ${opts.seed} --users ${opts.users} (30 % bots): ${lines.length} lines${typeof s.noise === "object" ? `, noise ${JSON.stringify(s.noise)}` : ""}`);
    }

    const tty = process.stdout.isTTY && !opts.json;
    let printed = 0;
    let lastPlain = 0;
    let status = await pipelineStatus(p, nats.jsm, redis, findOperator);
    const show = async (force = false) => {
      status = await pipelineStatus(p, nats.jsm, redis, findOperator);
      if (opts.json) return;
      const table = formatStatus(status);
      if (tty) {
        if (printed) process.stdout.write(`\x1b[${printed}A\x1b[J`);
        process.stdout.write(table + "\n");
        printed = table.split("\n").length;
      } else if (force || Date.now() - lastPlain > 10_000) {
        lastPlain = Date.now();
        say(table);
      }
    };
    say(`   publishing over ${opts.duration} …`);
    const published = await pacedPublish(p, nats, lines, publishMs, `demo-${Date.now()}`, () => show());
    const end = Date.now() + Math.max(60_000, publishMs);
    while (Date.now() < end) {
      await new Promise((r) => setTimeout(r, 500));
      await show();
      if (drained(status) && status.stages[0]!.partitions[0]!.ack_floor_seq >= published) break;
    }
    await show(true);

    const labels = await sample(nats, streamName(p, "labels"), 3);
    const dlq = await sample(nats, streamName(p, "dlq"), 4);
    say("\n5. sample labels (for ML teams, on feedback.labels.<kind>)");
    for (const e of labels) say(`   ${e.subject}  ${e.data.slice(0, 400)}`);
    say(`\n   dead letters (${status.outputs.dlq} in all): bad input is kept with its bytes and a reason`);
    for (const d of dlq) say(`   [${d.headers["Tacit-Stage"]}] ${d.headers["Tacit-Reason"]}: ${(d.headers["Tacit-Message"] ?? "").slice(0, 160)}`);

    let report: Report | undefined;
    if (truth.length) {
      const pseudonymOf = (id: string) => pseudonymize(key, id);
      const live = await collectLive(p, nats, redis, truth, pseudonymOf);
      report = evaluate({
        labels: live.labels,
        truth,
        pseudonymOf,
        features: live.features,
        botUsers: live.botUsers,
        scoresWithoutBaselines: live.scoresWithoutBaselines,
        rejectedLabels: live.rejectedLabels,
        eventsPerUser: eventsPerUser(lines, pseudonymOf),
      });
      say("\n6. label quality against the simulator's hidden ground truth (tacit evaluate)");
      say(formatReport(report).replace(/^/gm, "   "));
    }
    const ok = drained(status);
    if (opts.json) process.stdout.write(JSON.stringify({ published, status, evaluation: report }, null, 2) + "\n");
    say(`\n${ok ? "done" : "not drained in time"}: ${published} published → ${status.outputs.labels} labels, ${status.outputs.bots} bot events, ${status.outputs.late} late, ${status.outputs.dlq} dead letters`);
    if (report) {
      const d = report.delivery;
      say(`   final view: ${report.labels.live} labels, ${report.labels.from_bots} from bot users; ${d.retractions} retractions (${d.published_then_retracted_bots} of bot users' labels published, then retracted)`);
    }
    say("   next: tacit status pipelines/feedback.yaml · tacit tail pipelines/feedback.yaml labels --count 5 · tacit features pipelines/feedback.yaml get response <id> · tacit services down");
    return ok ? 0 : 1;
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
    .option("--duration <d>", "publish the simulated traffic over this much wall time", "60s")
    .option("--users <n>", "simulated users (30 % of them bots)", (v) => Number(v), 300)
    .option("--seed <seed>", "seed of the simulated traffic", "1")
    .option("--input <file>", "publish this JSONL file instead of simulated traffic (e.g. pipelines/sample-events.jsonl)")
    .option("--set <path=value>", "override a pipeline value (repeatable)", collect, [])
    .option("--json", "print machine-readable JSON")
    .action(action(async (opts: DemoOptions) => runDemo(opts)));
}

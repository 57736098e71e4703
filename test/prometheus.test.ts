// The SLIs in a real Prometheus (Debian's prometheus and promtool, installed by scripts/test.mjs):
// promtool checks and unit-tests every rule file under deploy/prometheus; then a `tacit run`
// worker on real nats-server and redis-server processes simulated traffic through the default
// pipeline, `promtool check metrics` finds nothing to say about its /metrics, and a Prometheus
// scraping it every second with deploy/prometheus's rules answers a PromQL query for each SLI.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Redis } from "ioredis";
import { findOperator } from "../operators/index.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { defaultPipelinePath, projectRoot } from "../src/config/paths.js";
import { stageGroups } from "../src/config/topology.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { executeReplay } from "../src/runtime/replay.js";
import { ensurePrometheus } from "../src/services/binaries.js";
import { freePort } from "../src/services/processes.js";
import { simulate } from "../src/sim/simulate.js";
import { withServers } from "./harness.js";
import { consumersDrained, eventually } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const PROM_DIR = join(projectRoot(), "deploy", "prometheus");
const RULE_FILES = ["slis.yml", "alerts.yml"].map((f) => join(PROM_DIR, f));
const KEY = "t1:prometheus-test-secret-0123456";
const SET = ["--set", "name=promsli", "--set", "subject_prefix=promsli", "--set", "event_time.idle_timeout=5s"];

/** SIGTERM, then SIGKILL after 10 s: a hung child must not hang the test run. */
async function stopChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

/** prometheus and promtool (scripts/test.mjs installs Debian's prometheus package as root; else this names the command). */
const bin = async (name: "prometheus" | "promtool"): Promise<string> => (await ensurePrometheus({ install: false }))[name];

test("promtool: every rule file under deploy/prometheus checks, and the alert unit tests pass", async () => {
  const check = spawnSync(await bin("promtool"), ["check", "rules", ...RULE_FILES], { encoding: "utf8" });
  assert.equal(check.status, 0, check.stdout + check.stderr);
  const tests = readdirSync(join(PROM_DIR, "tests")).filter((f) => f.endsWith(".yml")).map((f) => join(PROM_DIR, "tests", f));
  assert.ok(tests.length > 0, "promtool unit tests under deploy/prometheus/tests");
  const run = spawnSync(await bin("promtool"), ["test", "rules", ...tests], { encoding: "utf8" });
  assert.equal(run.status, 0, run.stdout + run.stderr);
  assert.match(run.stdout + run.stderr, /SUCCESS/);
});

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

async function query(base: string, q: string): Promise<Sample[]> {
  const res = await fetch(`${base}/api/v1/query?query=${encodeURIComponent(q)}`);
  const body = (await res.json()) as { status: string; data?: { result: Sample[] }; error?: string };
  assert.equal(body.status, "success", `${q}: ${body.error}`);
  return body.data!.result;
}

test("a real Prometheus scrapes a worker after simulated traffic and returns every SLI", { timeout: 120_000 }, (t) =>
  withServers(t, async (servers) => {
    const dir = mkdtempSync(join(tmpdir(), "tacit-prom-"));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY, TACIT_LOG_LEVEL: "warn", TACIT_HOME: join(dir, "home") };
    const file = defaultPipelinePath();
    const p = loadPipelineOrThrow(file, { set: SET.filter((_, i) => i % 2 === 1), env, operators: findOperator });
    const nats = await connectNats(p, "prometheus-test");
    const redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
    // Stopped in this order before withServers stops the servers (a drain without a server never ends).
    const cleanup: (() => Promise<void>)[] = [];
    try {
    await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));

    const metricsPort = await freePort();
    const worker = spawnTacit(["run", file, "--metrics-port", String(metricsPort), "--sli-interval", "500ms", "--drift-window", "1s", "--pii-sample", "3", ...SET], env);
    cleanup.unshift(() => stopChild(worker.child, worker.exited()));
    const metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
    await eventually("the worker to be ready", async () => worker.running() && (await fetch(`http://127.0.0.1:${metricsPort}/readyz`).then((r) => r.status === 200, () => false)), 30_000, 100);
    assert.ok(worker.running(), worker.stderr());

    // Counters start at zero: the SLI families are there before any traffic.
    const before = await (await fetch(metricsUrl)).text();
    for (const name of ["tacit_ingest_delivered_total", "tacit_pii_detector_hits_total", "tacit_labels_total", "tacit_pii_redacted_total", "tacit_bot_band_total", "tacit_explicit_agreement_total"]) {
      assert.match(before, new RegExp(`^${name}\\{[^}]*\\} 0\\b`, "m"), `${name} at 0 before traffic`);
    }
    assert.match(before, /^target_info\{[^}]*service_name="tacit"/m, "service.name is tacit");
    assert.match(before, new RegExp(`^target_info\\{[^}]*service_instance_id="[^"]+-${worker.child.pid}-[0-9a-f]+"`, "m"), "the worker id is the resource's service.instance.id");

    // Prometheus: scrape every second, the deploy rules evaluated every second.
    const promPort = await freePort();
    const promDir = join(dir, "prom");
    const config = join(dir, "prometheus.yml");
    writeFileSync(
      config,
      JSON.stringify({
        global: { scrape_interval: "1s", evaluation_interval: "1s" },
        rule_files: RULE_FILES,
        scrape_configs: [{ job_name: "tacit-workers", static_configs: [{ targets: [`127.0.0.1:${metricsPort}`] }] }],
      }),
    );
    const prom = spawn(await bin("prometheus"), [`--config.file=${config}`, `--storage.tsdb.path=${promDir}`, `--web.listen-address=127.0.0.1:${promPort}`], { stdio: ["ignore", "ignore", "pipe"] });
    let promErr = "";
    prom.stderr!.on("data", (d: Buffer) => (promErr = (promErr + d.toString()).slice(-5000)));
    const promExited = new Promise((r) => prom.once("exit", r));
    cleanup.unshift(() => stopChild(prom, promExited));
    const base = `http://127.0.0.1:${promPort}`;
    await eventually("Prometheus to be ready", async () => prom.exitCode === null && (await fetch(`${base}/-/ready`).then((r) => r.ok, () => false)), 20_000, 100);
    // Rates need samples from before the traffic: wait for a few scrapes (targets load a few seconds after start).
    await eventually("Prometheus to scrape the worker", async () => (await query(base, 'count_over_time(up{job="tacit-workers"}[1m]) >= 3')).length > 0, 30_000, 250);

    // An hour of simulated traffic ending an hour ago, with bots, PII in queries and explicit ratings.
    // Published in two halves, scraped in between: series born in the first half have samples
    // before the second (a rate needs two different samples).
    const sim = simulate({ seed: "11", users: 60, durationMs: 3_600_000, startTime: Date.now() - 2 * 3_600_000, botFraction: 0.3 });
    const inputs = stageGroups(p, findOperator).map((g) => g.inputStream);
    const half = Math.floor(sim.events.length / 2);
    for (const [i, part] of [sim.events.slice(0, half), sim.events.slice(half)].entries()) {
      await publishLines(p, nats.js, part, { idPrefix: `promsli-${i}` });
      let streak = 0;
      await eventually("the pipeline to drain", async () => {
        streak = (await consumersDrained(nats, inputs)) ? streak + 1 : 0;
        return streak >= 3;
      }, 40_000, 250);
      await sleep(2_500);
    }

    // M9: a replay run (of the last input only), counted in Redis and exported by the worker.
    const last = (await nats.jsm.streams.info(inputs[0]!)).state.last_seq;
    const report = await executeReplay(p, nats, redis, findOperator, { from: { kind: "seq", seq: last } }, { waitMs: 20_000, pauseTimeoutMs: 10_000 });
    assert.equal(report.caught_up, true);

    // promtool check metrics on the live worker's /metrics prints nothing.
    const text = await (await fetch(metricsUrl)).text();
    const lint = spawnSync(await bin("promtool"), ["check", "metrics"], { input: text, encoding: "utf8" });
    assert.equal(lint.stdout + lint.stderr, "", "promtool check metrics");
    assert.equal(lint.status, 0);

    // Each SLI as Prometheus answers it: [query, check of each value].
    const nonNegative = (v: number) => v >= 0;
    const ratio = (v: number) => v >= 0 && v <= 1;
    const slis: [string, string, (v: number) => boolean][] = [
      ["M1 ingestion error ratio", "tacit:ingest_errors:ratio_rate5m", ratio],
      ["M1 conservation (unaccounted deliveries)", "tacit:ingest_unaccounted:increase1h", (v) => Math.abs(v) < 1],
      ["M1 per-stage in", "sum by (stage) (tacit_stage_in_total) > 0", (v) => v > 0],
      ["M2 event → label p99", "tacit:event_to_label_seconds:p99_5m", (v) => v > 0 && v < 86_400],
      ["M2 event → feature p99", "tacit:event_to_feature_seconds:p99_5m", (v) => v > 0 && v < 86_400],
      ["M3 label coverage", "tacit:label_coverage:ratio_rate1h", nonNegative],
      ["M3 response label coverage", "tacit:response_label_coverage:ratio_rate1h", (v) => v > 0 && v <= 5],
      ["M4 event age per device", "tacit:event_age_seconds:by_device", (v) => v > 0 && v < 4 * 3600],
      ["M4 event age per cohort", "tacit:event_age_seconds:by_cohort", (v) => v > 0 && v < 4 * 3600],
      ["M4 features age", "tacit:features_age_seconds:max", (v) => v > 0 && v < 4 * 3600],
      ["M5 bot-filter ratio", "tacit:bot_filter:ratio_rate1h", (v) => v > 0 && v < 1],
      ["M6 drift PSI", "tacit:drift_psi:max", nonNegative],
      ["M8 redactions by kind", "tacit:pii_redactions:rate1h", nonNegative],
      ["M8 post-enrich detector hits", "tacit:pii_detector_hits:increase1h", (v) => v === 0],
      ["M8 post-enrich inputs checked", "tacit_pii_detector_checked_total", (v) => v > 0],
      ["M9 replay runs", 'tacit_replay_runs_total{outcome="caught_up"}', (v) => v === 1],
      ["M10 diversity (entropy)", "tacit:label_diversity:entropy1h", nonNegative],
      ["explicit vs implicit agreement", "sum by (rule, outcome) (tacit_explicit_agreement_total)", nonNegative],
      ["pending per durable", "tacit_consumer_pending", nonNegative],
      ["ack pending per durable", "tacit_consumer_ack_pending", nonNegative],
    ];
    const missing: string[] = [];
    const deadline = Date.now() + 30_000;
    for (const [what, q, ok] of slis) {
      let last: Sample[] = [];
      for (;;) {
        last = await query(base, q);
        const values = last.map((s) => Number(s.value[1]));
        if (values.length > 0 && values.every((v) => Number.isFinite(v) && ok(v))) break;
        if (Date.now() > deadline) {
          missing.push(`${what} (${q}): ${JSON.stringify(last.map((s) => [s.metric, s.value[1]]))}`);
          break;
        }
        await sleep(500);
      }
    }
    assert.deepEqual(missing, [], `Prometheus stderr: ${promErr.slice(-1500)}\nworker stderr: ${worker.stderr().slice(-1500)}`);
    const redactions = (await query(base, "sum(tacit_pii_redacted_total)")).map((s) => Number(s.value[1]));
    assert.ok(redactions[0]! > 0, "the simulated queries had PII that enrich redacted");
    } finally {
      for (const stop of cleanup) await stop().catch(() => undefined);
      redis.disconnect();
      await nats.nc.close().catch(() => undefined);
    }
  }),
);

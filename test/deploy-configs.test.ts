// Checks of deploy/: the NATS cluster configs run as a real 3-node JetStream cluster and each
// role gets exactly its permissions; Redis starts from its config with AUTH, AOF and noeviction;
// Prometheus rules and the Grafana dashboard query only the metrics workers export; the compose
// file, Dockerfile and Kubernetes manifests hang together (files exist, ports agree, secrets come
// only from generated env files or placeholders, the pipeline loads with their command lines).
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { tmpdir } from "node:os";
import { basename, dirname, join, relative, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Redis } from "ioredis";
import { WORKER_NODE_FLAGS, projectRoot } from "../src/config/paths.js";
import { findBinary } from "../src/services/binaries.js";
import { freePort, freePorts, readFirstLine } from "../src/services/processes.js";
import { loadPipeline, formatProblem } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { FAKE_OPERATORS } from "../src/config/fake-operators.js";
import type { OperatorSpec } from "../src/core/operator.js";
import { parsePseudonymKey } from "../src/core/pseudonym.js";
import { findOperator } from "../operators/index.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { dlqSubject, durableName, eventsSubject, outputSubject, pipelineStreams, stageGroups, stageSubject, streamName, SIDE_OUTPUTS } from "../src/config/topology.js";
import { openRedis } from "../src/state/redis.js";
import { WorkerTelemetry } from "../src/telemetry/otel.js";
import { StageCounters } from "../src/telemetry/metrics.js";

const ROOT = projectRoot();
const DEPLOY = join(ROOT, "deploy");
const PIPELINE_FILE = join(ROOT, "pipelines", "feedback.yaml");
const COMPOSE_DIR = join(DEPLOY, "compose");
const K8S_DIR = join(DEPLOY, "k8s");

/** The metric families every worker exports (src/telemetry/otel.ts, operator counters included). */
const TACIT_METRICS = [
  "tacit_batch_duration_seconds",
  "tacit_bot_band_total",
  "tacit_consumer_ack_pending",
  "tacit_consumer_pending",
  "tacit_drift_psi",
  "tacit_event_to_feature_seconds",
  "tacit_event_to_output_seconds",
  "tacit_explicit_agreement_total",
  "tacit_features_newest_event_timestamp_seconds",
  "tacit_ingest_delivered_total",
  "tacit_ingest_settled_total",
  "tacit_label_weight_class_total",
  "tacit_labelled_responses_by_model_total",
  "tacit_labelled_responses_by_position_total",
  "tacit_labels_first_published_total",
  "tacit_labels_total",
  "tacit_newest_event_by_cohort_timestamp_seconds",
  "tacit_newest_event_timestamp_seconds",
  "tacit_partition_resumed_total",
  "tacit_partitions_owned",
  "tacit_pii_detector_checked_total",
  "tacit_pii_detector_hits_total",
  "tacit_pii_redacted_total",
  "tacit_publish_resent_total",
  "tacit_replay_last_run_timestamp_seconds",
  "tacit_replay_runs_total",
  "tacit_responses_shown_total",
  "tacit_stage_dlq_total",
  "tacit_stage_dropped_total",
  "tacit_stage_in_total",
  "tacit_stage_out_total",
  "tacit_stage_side_output_total",
  "tacit_watermark_lag_seconds",
] as const;
const HISTOGRAMS = new Set(["tacit_batch_duration_seconds", "tacit_event_to_output_seconds", "tacit_event_to_feature_seconds"]);
/** Besides tacit's own: Prometheus' `up`. */
const ALERT_EXTRA_METRICS = ["up"];
const DASHBOARDS = ["executive.json", "oncall.json", "debug.json"];

const read = (file: string): string => readFileSync(file, "utf8");
const yamlFile = (file: string): any => parseYaml(read(file), { merge: true });
/** The recording rules of deploy/prometheus/slis.yml: name → expression(s). */
const recorded = (): Map<string, string[]> => {
  const m = new Map<string, string[]>();
  for (const g of yamlFile(join(DEPLOY, "prometheus", "slis.yml")).groups as any[]) for (const r of g.rules as any[]) m.set(r.record, [...(m.get(r.record) ?? []), r.expr]);
  return m;
};

// --- the pipeline, as the deploy configs see it -----------------------------------------------

/** The registry first; the config-test stand-ins for operators not registered yet (topology only needs names and keyed). */
const operators = (name: string): OperatorSpec<any> | undefined => findOperator(name) ?? FAKE_OPERATORS.find((o) => o.name === name);

function loadOrFail(opts: { set?: string[]; env?: Record<string, string | undefined>; secrets?: boolean } = {}): Pipeline {
  const res = loadPipeline(PIPELINE_FILE, { set: opts.set ?? [], env: opts.env ?? {}, secrets: opts.secrets ?? false, operators });
  assert.deepEqual(res.problems.map(formatProblem), [], "pipelines/feedback.yaml must load");
  return res.pipeline!;
}

// --- PromQL: the metric names an expression reads ---------------------------------------------

const PROMQL_KEYWORDS = new Set(["by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"]);

/** Metric names an expression selects (histogram series folded to their family name). */
function promqlMetrics(expr: string): string[] {
  let s = expr.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""');
  const names: string[] = [];
  // Grafana's label_values(metric, label): the second argument is a label, not a metric.
  s = s.replace(/label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)/g, (_, m: string) => (names.push(m), " "));
  s = s.replace(/\{[^}]*\}/g, " ").replace(/\[[^\]]*\]/g, " ");
  s = s.replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ");
  for (const m of s.matchAll(/(?<![\w.$])[A-Za-z_:][\w:]*/g)) {
    const rest = s.slice(m.index! + m[0].length).trimStart();
    if (rest.startsWith("(") || PROMQL_KEYWORDS.has(m[0].toLowerCase())) continue;
    names.push(m[0]);
  }
  return names.map((n) => {
    const base = n.replace(/_(?:bucket|sum|count)$/, "");
    return HISTOGRAMS.has(base) ? base : n;
  });
}

/** Parentheses, brackets and braces balance outside strings. */
function balanced(expr: string): boolean {
  const s = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  const stack: string[] = [];
  const pairs: Record<string, string> = { ")": "(", "]": "[", "}": "{" };
  for (const c of s) {
    if ("([{".includes(c)) stack.push(c);
    else if (c in pairs && stack.pop() !== pairs[c]) return false;
  }
  return stack.length === 0 && (s.match(/"/g)?.length ?? 0) % 2 === 0;
}

test("promqlMetrics reads metric names, not functions, labels, durations or Grafana variables", () => {
  assert.deepEqual(promqlMetrics('sum by (stage, reason) (rate(tacit_stage_dlq_total{stage=~"$stage"}[$__rate_interval])) > 0'), ["tacit_stage_dlq_total"]);
  assert.deepEqual(promqlMetrics("histogram_quantile(0.99, sum by (le) (rate(tacit_batch_duration_seconds_bucket[5m])))"), ["tacit_batch_duration_seconds"]);
  assert.deepEqual(promqlMetrics("(sum(increase(a_total[10m])) or vector(0)) == 0 and on() sum(b_total offset 5m) > 1e3"), ["a_total", "b_total"]);
  assert.deepEqual(promqlMetrics("label_values(tacit_stage_in_total, stage)"), ["tacit_stage_in_total"]);
  assert.deepEqual(promqlMetrics('absent(up{job="w"} == 1) / ignoring(x) made_up_metric'), ["up", "made_up_metric"]);
  assert.equal(balanced("sum(rate(x[5m])"), false);
  assert.equal(balanced('sum(rate(x{a="("}[5m]))'), true);
});

// --- processes ----------------------------------------------------------------------------------

const started = new Set<ChildProcess>();
process.once("exit", () => {
  for (const c of started) c.kill("SIGKILL");
});

interface Proc {
  child: ChildProcess;
  output(): string;
  stop(): Promise<void>;
}

function startProcess(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Proc {
  const child = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  started.add(child);
  let out = "";
  let exited = false;
  child.once("exit", () => ((exited = true), started.delete(child)));
  for (const s of [child.stdout!, child.stderr!]) s.on("data", (c: Buffer) => (out = (out + c.toString()).slice(-8_000)));
  return {
    child,
    output: () => out,
    async stop() {
      if (exited) return;
      const gone = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      // An unref'd timer: a pending 5 s wait must not keep the test process alive after the exit.
      if (await Promise.race([gone.then(() => true), sleep(5_000, undefined, { ref: false }).then(() => false)])) return;
      child.kill("SIGKILL");
      await gone;
    },
  };
}

/** A server that did not come up: its errors first (they are at the end of a long banner), then its last lines. */
class StartError extends Error {
  readonly portTaken: boolean;
  constructor(what: string, output: string) {
    const lines = output.split("\n");
    const errors = lines.filter((l) => /\[(ERR|FTL)\]|error|fatal/i.test(l));
    super(`${what}: ${errors.join(" | ") || "(no error line)"}\n${lines.slice(-15).join("\n")}`);
    this.portTaken = /address already in use/i.test(output);
  }
}

async function waitFor(what: string, p: Proc, ready: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (p.child.exitCode !== null) throw new StartError(`${what} exited during start-up`, p.output());
    if (await ready().catch(() => false)) return;
    if (Date.now() > deadline) throw new StartError(`${what} not ready within ${timeoutMs} ms`, p.output());
    await sleep(50);
  }
}

function binary(name: string): string {
  const bin = findBinary(name);
  assert.ok(bin, `${name} must be installed (npm test installs it as root on Debian)`);
  return bin;
}

// --- secrets: generated by make-secrets.sh, shared by the NATS and compose tests ---------------

function parseEnvFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) env[m[1]!] = m[2]!;
  }
  return env;
}

function makeSecrets(): { dir: string; files: Record<string, Record<string, string>> } {
  const dir = mkdtempSync(join(tmpdir(), "tacit-secrets-"));
  const res = spawnSync("sh", [join(COMPOSE_DIR, "make-secrets.sh"), dir], { encoding: "utf8" });
  assert.equal(res.status, 0, `make-secrets.sh failed: ${res.stderr}`);
  const files: Record<string, Record<string, string>> = {};
  for (const f of readdirSync(dir)) files[f] = parseEnvFile(read(join(dir, f)));
  return { dir, files };
}

// --- NATS ---------------------------------------------------------------------------------------

const NATS_NODES = [1, 2, 3].map((n) => join(DEPLOY, "nats", `nats-${n}.conf`));
const NATS_CONF_FILES = readdirSync(join(DEPLOY, "nats")).filter((f) => f.endsWith(".conf")).map((f) => join(DEPLOY, "nats", f));

/** `$VAR` references of the NATS configs (outside comments and quoted strings). */
function natsEnvRefs(): Set<string> {
  const refs = new Set<string>();
  for (const f of NATS_CONF_FILES) {
    for (const line of read(f).split("\n")) {
      const code = line.replace(/#.*$/, "").replace(/"[^"]*"/g, "");
      for (const m of code.matchAll(/\$([A-Za-z_][A-Za-z0-9_]*)/g)) refs.add(m[1]!);
    }
  }
  return refs;
}

test("nats: every node config parses with the real server (nats-server -t), and only with its secrets set", () => {
  const bin = binary("nats-server");
  const help = spawnSync(bin, ["--help"], { encoding: "utf8" });
  assert.match(help.stdout + help.stderr, /^\s+-t\s/m, "nats-server has -t");
  const { dir, files } = makeSecrets();
  try {
    const names = new Set<string>();
    for (const conf of NATS_NODES) {
      const ok = spawnSync(bin, ["-c", conf, "-t"], { encoding: "utf8", env: { PATH: process.env.PATH, ...files["nats.env"] } });
      assert.equal(ok.status, 0, `${conf}: ${ok.stderr}${ok.stdout}`);
      assert.match(ok.stderr + ok.stdout, /is valid/);
      // Without the password variables the server must refuse to start: they are references, not values.
      const bare = spawnSync(bin, ["-c", conf, "-t"], { encoding: "utf8", env: { PATH: process.env.PATH } });
      assert.notEqual(bare.status, 0, `${conf} parsed without NATS_*_PASSWORD set`);
      assert.match(bare.stderr, /variable reference for 'NATS_[A-Z_]+_PASSWORD'/);
      names.add(/^server_name:\s*(\S+)/m.exec(read(conf))?.[1] ?? "");
    }
    assert.deepEqual([...names].sort(), ["nats-1", "nats-2", "nats-3"]);

    // The routes name exactly the three nodes (the compose service names).
    const cluster = read(join(DEPLOY, "nats", "cluster.conf"));
    const routes = [...cluster.replace(/#.*$/gm, "").matchAll(/nats-route:\/\/([\w.-]+):(\d+)/g)].map((m) => m[1]);
    assert.deepEqual(routes.sort(), ["nats-1", "nats-2", "nats-3"]);
    assert.match(cluster, /^\s*store_dir:\s*\S+/m);
    assert.match(cluster, /^\s*max_file_store:\s*\S+/m);
    assert.match(cluster, /^#\s*tls\s*\{/m, "a commented client TLS block");

    // Every password is a `$VAR` reference, and make-secrets.sh provides every variable.
    for (const f of NATS_CONF_FILES) {
      for (const line of read(f).split("\n")) {
        const m = /^\s*(?:\{\s*user:\s*\S+,\s*)?password\s*[:=]\s*([^\s,}]+)/.exec(line.replace(/#.*$/, ""));
        if (m) assert.match(m[1]!, /^\$[A-Z][A-Z0-9_]*$/, `${basename(f)}: password in clear: ${line.trim()}`);
      }
    }
    assert.deepEqual([...natsEnvRefs()].sort(), Object.keys(files["nats.env"]!).sort());
    // nats-server parses a `$VAR` value as a config value: a password must start with a letter.
    for (const v of Object.values(files["nats.env"]!)) assert.match(v, /^[A-Za-z][A-Za-z0-9]{31,}$/);
    const withAll = (v: string) => spawnSync(bin, ["-c", NATS_NODES[0]!, "-t"], { encoding: "utf8", env: { PATH: process.env.PATH, ...Object.fromEntries(Object.keys(files["nats.env"]!).map((k) => [k, v])) } }).status;
    assert.equal(withAll(`e1${"0".repeat(62)}`), 0, "letter-first values parse, even float-like ones");
    assert.notEqual(withAll(`9e3f${"0".repeat(60)}`), 0, "digit-first values break the config (why make-secrets.sh prefixes a letter)");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("nats: a broken config fails the -t check (the check can fail)", () => {
  const bin = binary("nats-server");
  const dir = mkdtempSync(join(tmpdir(), "tacit-nats-bad-"));
  try {
    for (const f of NATS_CONF_FILES) copyFileSync(f, join(dir, basename(f)));
    writeFileSync(join(dir, "accounts.conf"), read(join(dir, "accounts.conf")).replace('"feedback.in.>"', '"feedback.in.>" }'));
    const res = spawnSync(bin, ["-c", join(dir, "nats-1.conf"), "-t"], { encoding: "utf8", env: { PATH: process.env.PATH, ...makeSecretsEnvOnly() } });
    assert.notEqual(res.status, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

function makeSecretsEnvOnly(): Record<string, string> {
  const { dir, files } = makeSecrets();
  rmSync(dir, { recursive: true, force: true });
  return files["nats.env"]!;
}

test("nats: the worker's permissions name exactly the input streams of the pipeline's stage groups", () => {
  const p = loadOrFail();
  const groups = stageGroups(p, operators);
  const text = read(join(DEPLOY, "nats", "accounts.conf")).replace(/#.*$/gm, "");
  const block = /user:\s*worker\b([\s\S]*?)(?:user:|$)/.exec(text)?.[1] ?? "";
  const streams = new Set<string>();
  for (const m of block.matchAll(/"\$JS\.(?:API\.CONSUMER\.(?:INFO|CREATE|DURABLE\.CREATE|DELETE|MSG\.NEXT)|ACK)\.([^."]+)\./g)) streams.add(m[1]!);
  assert.deepEqual([...streams].sort(), groups.map((g) => g.inputStream).sort(), "worker stage streams in deploy/nats/accounts.conf vs pipelines/feedback.yaml");
  assert.equal(p.subject_prefix, "feedback", "accounts.conf is written for the prefix `feedback`");
});

const CLUSTER_ATTEMPTS = 3;

/**
 * A 3-node cluster from the real node configs; only ports, routes and store dirs differ. Started
 * again on new ports when a node finds one of its ports taken by another process.
 */
async function startCluster(t: TestContext, env: Record<string, string>): Promise<{ urls: string[] }> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startClusterOnce(t, env);
    } catch (err) {
      if (!(err instanceof StartError && err.portTaken) || attempt >= CLUSTER_ATTEMPTS) throw err;
      t.diagnostic(`cluster start attempt ${attempt}: ${err.message.split("\n")[0]}; retrying on new ports`);
    }
  }
}

async function startClusterOnce(t: TestContext, env: Record<string, string>): Promise<{ urls: string[] }> {
  const bin = binary("nats-server");
  const dir = mkdtempSync(join(tmpdir(), "tacit-nats-cluster-"));
  const free = await freePorts(9);
  const ports = [0, 1, 2].map((i) => ({ client: free[3 * i]!, route: free[3 * i + 1]!, http: free[3 * i + 2]! }));
  const routes = ports.map((p) => `nats-route://127.0.0.1:${p.route}`).join(",");
  const procs: Proc[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(procs.map((p) => p.stop()));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    for (const [i, conf] of NATS_NODES.entries()) {
      const nodeDir = join(dir, `n${i + 1}`);
      mkdirSync(nodeDir);
      for (const f of NATS_CONF_FILES) copyFileSync(f, join(nodeDir, basename(f)));
      const cluster = read(join(nodeDir, "cluster.conf"));
      assert.match(cluster, /store_dir: \/data\/jetstream/);
      writeFileSync(join(nodeDir, "cluster.conf"), cluster.replace("store_dir: /data/jetstream", `store_dir: "${join(nodeDir, "js")}"`));
      const p = ports[i]!;
      procs.push(startProcess(bin, ["-c", join(nodeDir, basename(conf)), "-a", "127.0.0.1", "-p", String(p.client), "-m", String(p.http), "--cluster_listen", `nats://127.0.0.1:${p.route}`, "--routes", routes], { PATH: process.env.PATH, ...env }));
    }
    // Ready when every node reports JetStream healthy and the meta group has elected a leader.
    const healthy = async (port: number): Promise<boolean> => {
      const h = await fetch(`http://127.0.0.1:${port}/healthz?js-enabled-only=true`);
      if (!h.ok) return false;
      const jsz = (await (await fetch(`http://127.0.0.1:${port}/jsz`)).json()) as { meta_cluster?: { leader?: string; cluster_size?: number } };
      return typeof jsz.meta_cluster?.leader === "string" && jsz.meta_cluster.leader !== "" && jsz.meta_cluster.cluster_size === 3;
    };
    await Promise.all(procs.map((p, i) => waitFor(`nats-${i + 1}`, p, () => healthy(ports[i]!.http), 12_000)));
  } catch (err) {
    await stop();
    throw err;
  }
  t.after(stop);
  return { urls: ports.map((p) => `nats://127.0.0.1:${p.client}`) };
}

function isPermissionError(err: unknown): boolean {
  for (let e: unknown = err; e; e = (e as { cause?: unknown }).cause) {
    if ((e as Error).name === "PermissionViolationError" || /Permissions Violation/i.test((e as Error).message ?? "")) return true;
  }
  return false;
}

/** Whether the server lets this user publish (or request) on `subject`; a refusal comes back as -ERR. */
async function mayPublish(nc: NatsConnection, subject: string): Promise<boolean> {
  // A pull request that must not wait: JetStream answers MSG.NEXT only for a consumer that exists.
  const body = subject.includes(".MSG.NEXT.") ? JSON.stringify({ batch: 1, no_wait: true }) : "";
  try {
    await nc.request(subject, new TextEncoder().encode(body), { timeout: 3_000 });
    return true;
  } catch (err) {
    if (isPermissionError(err)) return false;
    return true; // no responders or an error reply: the server let it through
  }
}

async function maySubscribe(nc: NatsConnection, subject: string): Promise<boolean> {
  const sub = nc.subscribe(subject);
  let refused = false;
  void sub.closed.then((err) => (refused = isPermissionError(err)));
  await nc.flush();
  await sleep(20);
  if (!sub.isClosed()) sub.unsubscribe();
  return !refused;
}

async function expectPermissions(nc: NatsConnection, role: string, allow: string[], deny: string[]): Promise<void> {
  const wrong: string[] = [];
  for (const s of allow) if (!(await mayPublish(nc, s))) wrong.push(`${role} should be allowed ${s}`);
  for (const s of deny) if (await mayPublish(nc, s)) wrong.push(`${role} should be denied ${s}`);
  assert.deepEqual(wrong, []);
}

/**
 * A stream that another server of the cluster has just created can answer "no responders" for a
 * moment, until its subjects' interest has reached the server the publisher is connected to
 * (nats.js then reports JetStreamNotEnabled): the publishes a role must be able to make retry
 * (nats.js's own backoff; it retries no responders and timeouts only) instead of failing on timing.
 */
const PUBLISH_RETRIES = 10;

test("nats: on a live 3-node cluster each role can do its job and nothing else", async (t) => {
  const { dir, files } = makeSecrets();
  rmSync(dir, { recursive: true, force: true });
  const natsEnv = files["nats.env"]!;
  const { urls } = await startCluster(t, natsEnv);
  // Permissions depend on neither the replica count nor the partition count: R1 and 2 partitions
  // keep the test fast (each R3 asset costs a Raft group); one stream is moved to R3 below.
  const p = loadOrFail({ set: ["streams.replicas=1", "partitions=2"] });
  const groups = stageGroups(p, operators);
  const [first, keyed] = [groups[0]!, groups.find((g) => g.keyed)!];
  assert.ok(keyed, "the pipeline has a keyed group");
  const streams = pipelineStreams(p, groups).map((s) => s.name);
  const stageStreams = groups.map((g) => g.inputStream);
  const outputStreams = streams.filter((s) => !stageStreams.includes(s));
  const labels = streamName(p, "labels");
  const dlq = streamName(p, "dlq");
  const inClick = `${p.subject_prefix}.in.click`;
  const outputs = [
    ...groups.slice(1).map((g) => stageSubject(p, g.name, 0)),
    eventsSubject(p, 0),
    outputSubject(p, "labels.response"),
    outputSubject(p, "labels.preference"),
    outputSubject(p, "labels.session"),
    ...p.stages.map((s) => dlqSubject(p, s.name)),
    ...SIDE_OUTPUTS.map((o) => outputSubject(p, o)),
  ];
  const conns: NatsConnection[] = [];
  t.after(async () => {
    await Promise.all(conns.map((c) => c.close().catch(() => undefined)));
  });
  const as = async (user: string, password: string | undefined): Promise<NatsConnection> => {
    assert.ok(password, `a password for ${user}`);
    const nc = await connect({ servers: urls, user, pass: password, noAsyncTraces: true });
    conns.push(nc);
    return nc;
  };
  const payload = new TextEncoder().encode(JSON.stringify({ probe: true }));

  // Anonymous clients and wrong passwords are refused.
  await assert.rejects(connect({ servers: urls[0]!, reconnect: false }));
  await assert.rejects(connect({ servers: urls[0]!, user: "worker", pass: "not-the-password", reconnect: false }));

  // deployer: the real deploy code creates everything, and a second plan changes nothing.
  const deployer = await as("deployer", natsEnv.NATS_DEPLOYER_PASSWORD);
  const djsm = await jetstreamManager(deployer);
  await applyDeploy(p, djsm, operators, await planDeploy(p, djsm, operators));
  const again = await planDeploy(p, djsm, operators);
  assert.deepEqual(again.filter((c) => c.action !== "unchanged").map((c) => c.name), []);
  await expectPermissions(
    deployer,
    "deployer",
    ["$JS.API.STREAM.INFO.nosuch", "$JS.API.STREAM.CREATE.nosuch", "$JS.API.STREAM.UPDATE.nosuch", "$JS.API.STREAM.DELETE.nosuch", "$JS.API.CONSUMER.DELETE.nosuch.x", "$JS.API.STREAM.NAMES"],
    [inClick, outputSubject(p, "labels.response"), `$JS.API.CONSUMER.MSG.NEXT.${first.inputStream}.${durableName(first)}`, `$JS.API.STREAM.PURGE.${first.inputStream}`, `$JS.API.STREAM.MSG.GET.${dlq}`, `$JS.API.STREAM.MSG.DELETE.${dlq}`, `$JS.ACK.${first.inputStream}.x.1.1.1.1.0`],
  );

  // producer: raw events in, nothing else.
  const producer = await as("producer", natsEnv.NATS_PRODUCER_PASSWORD);
  await jetstreamManager(producer); // what `tacit publish` does on connect
  const ack = await jetstream(producer).publish(inClick, payload, { msgID: "deploy-test-1", retries: PUBLISH_RETRIES });
  assert.equal(ack.stream, first.inputStream);
  await expectPermissions(producer, "producer", [], [
    ...outputs,
    `$JS.API.STREAM.INFO.${first.inputStream}`,
    `$JS.API.CONSUMER.CREATE.${first.inputStream}.x`,
    `$JS.API.CONSUMER.MSG.NEXT.${first.inputStream}.${durableName(first)}`,
    `$JS.API.STREAM.DELETE.${first.inputStream}`,
  ]);
  assert.equal(await maySubscribe(producer, `${p.subject_prefix}.>`), false);

  // worker: consume and settle its durables, take over a keyed partition, publish every output.
  const worker = await as("worker", natsEnv.NATS_WORKER_PASSWORD);
  const wjs = jetstream(worker);
  const wjsm = await jetstreamManager(worker);
  const m0 = await (await wjs.consumers.get(first.inputStream, durableName(first))).next({ expires: 3_000 });
  assert.equal(m0?.subject, inClick);
  assert.equal(await m0!.ackAck(), true);
  for (const s of outputs) {
    const pa = await wjs.publish(s, payload, { msgID: `deploy-test:${s}`, retries: PUBLISH_RETRIES });
    assert.ok(pa.seq > 0, `worker published ${s}`);
  }
  const durable = durableName(keyed, 0);
  const info = await wjsm.consumers.info(keyed.inputStream, durable);
  await wjsm.consumers.delete(keyed.inputStream, durable);
  await wjsm.consumers.add(keyed.inputStream, { ...info.config, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: 1 });
  const m1 = await (await wjs.consumers.get(keyed.inputStream, durable)).next({ expires: 3_000 });
  assert.equal(m1?.subject, stageSubject(p, keyed.name, 0));
  assert.equal(await m1!.ackAck(), true);
  const stageAllow = groups.flatMap((g) => [
    `$JS.API.CONSUMER.INFO.${g.inputStream}.nosuch`,
    `$JS.API.CONSUMER.DELETE.${g.inputStream}.nosuch`,
    `$JS.API.CONSUMER.CREATE.${g.inputStream}.nosuch`,
    `$JS.API.CONSUMER.DURABLE.CREATE.${g.inputStream}.nosuch`,
    `$JS.API.CONSUMER.MSG.NEXT.${g.inputStream}.${g.keyed ? durableName(g, 1) : durableName(g)}`,
    `$JS.ACK.${g.inputStream}.nosuch.1.1.1.1.0`,
  ]);
  await expectPermissions(worker, "worker", stageAllow, [
    inClick,
    ...streams.flatMap((s) => [`$JS.API.STREAM.CREATE.${s}`, `$JS.API.STREAM.DELETE.${s}`, `$JS.API.STREAM.PURGE.${s}`]),
    ...outputStreams.flatMap((s) => [`$JS.API.CONSUMER.CREATE.${s}.x`, `$JS.API.CONSUMER.MSG.NEXT.${s}.x`]),
    `$JS.API.CONSUMER.CREATE.${first.inputStream}`,
  ]);
  assert.equal(await maySubscribe(worker, `${p.subject_prefix}.>`), false);

  // ml-reader: ordered consumers and `tacit tail`-style ephemerals on the labels stream only.
  const ml = await as("ml-reader", natsEnv.NATS_ML_READER_PASSWORD);
  const mljs = jetstream(ml);
  const mljsm = await jetstreamManager(ml);
  const ordered = await mljs.consumers.get(labels);
  assert.match((await ordered.next({ expires: 3_000 }))?.subject ?? "", new RegExp(`^${p.subject_prefix}\\.labels\\.`));
  await mljsm.consumers.add(labels, { name: "tail_test", ack_policy: AckPolicy.None, filter_subject: outputSubject(p, "labels.session"), inactive_threshold: 30_000_000_000 });
  assert.equal((await (await mljs.consumers.get(labels, "tail_test")).next({ expires: 3_000 }))?.subject, outputSubject(p, "labels.session"));
  await mljsm.consumers.delete(labels, "tail_test");
  await expectPermissions(ml, "ml-reader", [], [
    ...outputs,
    inClick,
    ...streams.filter((s) => s !== labels).flatMap((s) => [`$JS.API.STREAM.INFO.${s}`, `$JS.API.CONSUMER.CREATE.${s}.x`, `$JS.API.CONSUMER.MSG.NEXT.${s}.x`]),
    `$JS.API.STREAM.DELETE.${labels}`,
    `$JS.API.STREAM.PURGE.${labels}`,
  ]);
  assert.equal(await maySubscribe(ml, `${p.subject_prefix}.labels.>`), false);

  // oncall: replay a durable from a sequence, read the DLQ, redrive into a stage's input.
  const oncall = await as("oncall", natsEnv.NATS_ONCALL_PASSWORD);
  const ojs = jetstream(oncall);
  const ojsm = await jetstreamManager(oncall);
  const cfg = (await ojsm.consumers.info(keyed.inputStream, durable)).config;
  await ojsm.consumers.delete(keyed.inputStream, durable);
  await ojsm.consumers.add(keyed.inputStream, { ...cfg, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: 1 });
  assert.equal((await ojsm.consumers.info(keyed.inputStream, durable)).num_pending, 1, "the replayed durable sees the message again");
  const dead = await (await ojs.consumers.get(dlq)).next({ expires: 3_000 });
  assert.match(dead?.subject ?? "", new RegExp(`^${p.subject_prefix}\\.dlq\\.`));
  assert.equal((await ojs.publish(inClick, payload, { msgID: "redrive-1", retries: PUBLISH_RETRIES })).stream, first.inputStream);
  assert.equal((await ojs.publish(stageSubject(p, keyed.name, 1), payload, { msgID: "redrive-2", retries: PUBLISH_RETRIES })).stream, keyed.inputStream);
  await expectPermissions(oncall, "oncall", [`$JS.API.STREAM.MSG.GET.${dlq}`, `$JS.API.CONSUMER.DELETE.${first.inputStream}.nosuch`], [
    ...outputs.filter((s) => !s.startsWith(`${p.subject_prefix}.x.`)),
    ...streams.flatMap((s) => [`$JS.API.STREAM.CREATE.${s}`, `$JS.API.STREAM.UPDATE.${s}`, `$JS.API.STREAM.DELETE.${s}`, `$JS.API.STREAM.PURGE.${s}`]),
  ]);

  // The cluster places a 3-replica stream (what the compose deploy job asks for), with its data.
  await djsm.streams.update(labels, { ...(await djsm.streams.info(labels)).config, num_replicas: 3 });
  const placed = (await djsm.streams.info(labels)).cluster;
  const nodes = new Set([placed?.leader, ...(placed?.replicas ?? []).map((r) => r.name)].filter(Boolean));
  assert.deepEqual([...nodes].sort(), ["nats-1", "nats-2", "nats-3"], "labels stream on the 3 nodes");
  assert.ok((await djsm.streams.info(labels)).state.messages >= 3);
  // Every stream survived the probes (a wrongly allowed DELETE would have removed one).
  const left: string[] = [];
  for await (const n of djsm.streams.names()) left.push(n);
  assert.deepEqual(left.sort(), [...streams].sort());
});

// --- Redis --------------------------------------------------------------------------------------

test("redis: redis.conf starts a server that requires AUTH, keeps an AOF (everysec) and never evicts", async (t) => {
  const bin = binary("redis-server");
  const dir = mkdtempSync(join(tmpdir(), "tacit-redis-conf-"));
  const port = await freePort();
  const password = "deploy-test-password";
  const proc = startProcess(bin, [join(DEPLOY, "redis", "redis.conf"), "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--requirepass", password]);
  let client: Redis | undefined;
  let worker: ReturnType<typeof openRedis> | undefined;
  t.after(async () => {
    client?.disconnect();
    worker?.disconnect();
    await proc.stop();
    rmSync(dir, { recursive: true, force: true });
  });
  // Unauthenticated PING is refused: proof the password is on.
  await waitFor("redis-server", proc, async () => /^-NOAUTH/.test(await readFirstLine("127.0.0.1", port, "PING\r\n")));
  client = new Redis({ host: "127.0.0.1", port, password, lazyConnect: true, maxRetriesPerRequest: 1 });
  await client.connect();
  const conf = async (k: string): Promise<string> => ((await client!.config("GET", k)) as string[])[1]!;
  assert.equal(await conf("appendonly"), "yes");
  assert.equal(await conf("appendfsync"), "everysec");
  assert.equal(await conf("maxmemory-policy"), "noeviction");
  assert.ok(Number(await conf("maxmemory")) > 0, "a memory limit is set");
  assert.equal(await conf("save"), "");
  await client.set("tacit:deploy-test", "kept");
  // The worker's own client, opened from a REDIS_URL as compose and the k8s Secret give it.
  worker = openRedis(`redis://:${password}@127.0.0.1:${port}`);
  assert.equal(await worker.get("tacit:deploy-test"), "kept");
  await assert.rejects(client.call("FLUSHALL"), /unknown command/i);
  await client.call("BGREWRITEAOF").catch(() => undefined);
  assert.ok(existsSync(join(dir, "appendonlydir")), "AOF directory in --dir");
  const text = read(join(DEPLOY, "redis", "redis.conf"));
  assert.doesNotMatch(text.replace(/#.*$/gm, ""), /^\s*requirepass\s/m, "no password in the file");
  assert.doesNotMatch(text.replace(/#.*$/gm, ""), /^\s*dir\s/m, "dir comes from the working directory or --dir");
  assert.match(text, /^#\s*tls-port/m, "commented TLS lines");
});

// --- metrics, alerts, dashboard ---------------------------------------------------------------

test("metrics: a worker's /metrics exposes exactly the SLI metric families", async (t) => {
  const c = new StageCounters("label-derive");
  c.count("in", 3);
  c.count("out", 2);
  c.count("dropped", 1, { reason: "duplicate" });
  c.count("dlq", 1, { reason: "schema_violation" });
  c.count("side_output", 2, { to: "labels.response" });
  c.count("ingest_delivered", 3);
  c.count("ingest_settled", 3, { outcome: "ok" });
  c.count("partition_resumed", 0, { reason: "missed_deliveries" });
  c.count("publish_resent", 0, { reason: "unanswered" });
  // Operator counters, exported as tacit_<name>_total.
  c.count("labels", 1, { kind: "response", rule: "click" });
  c.count("responses_shown", 2);
  c.count("pii_redacted", 1, { kind: "email" });
  c.count("bot_band", 1, { band: "human" });
  c.count("explicit_agreement", 1, { rule: "click", outcome: "agree" });
  const tel = new WorkerTelemetry(() => [c], () => true, { workerId: "w-1" });
  tel.batch("label-derive", 12);
  tel.endToEnd("label-derive", 40, "label");
  tel.watermarkLag("label-derive", 0, 5);
  tel.partitionsOwned("label-derive", 4);
  tel.committed("label-derive", Date.now() - 1000);
  const ts = Date.now();
  tel.inputs("dedupe", [{ input: { seq: 100, envelope: { v: 1, src: { seq: 100 }, partition: 0, attrs: {}, event: { event_id: "e", session_id: "s", user: "u", user_key_version: "k", timestamp: "", ts, event_type: "query", payload: { text: "mail me at a@b.example" }, ua: { device: "mobile" } } } } }]);
  const store = new Map<string, string>();
  tel.watch(
    {
      prefix: "p",
      durables: () => [{ stream: "s", durable: "d" }],
      consumerInfo: async () => ({ num_pending: 7, num_ack_pending: 2 }),
      redis: {
        get: async (k) => store.get(k) ?? null,
        set: async (k, v) => (store.has(k) ? null : store.set(k, v)),
        hgetall: async () => ({ caught_up: "1", last_at: String(ts) }),
      },
      warn: () => undefined,
    },
    { intervalMs: 20, driftWindowMs: 0 },
  );
  for (let i = 0; i < 40; i++) tel.label({ kind: "response", rule: i % 2 ? "click" : "copy", weight: 1, model: "m1", position: 1 }, 0);
  await sleep(100);
  const port = await tel.listen(0, "127.0.0.1");
  t.after(() => tel.stop());
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const families = [...text.matchAll(/^# TYPE (tacit_\w+) /gm)].map((m) => m[1]!).sort();
  assert.deepEqual(families, [...TACIT_METRICS].sort());
  // The label alerts and panels select label outputs with labels[.].+ (Prometheus regexes are anchored).
  const output = /tacit_stage_side_output_total\{[^}]*output="([^"]+)"/.exec(text)?.[1];
  assert.equal(output, "labels.response");
  assert.match(output!, /^(?:labels[.].+)$/);
  assert.match(text, /^tacit_pii_detector_hits_total\{kind="email"\} 1$/m, "the sampled detector found the e-mail");
  assert.match(text, /^tacit_consumer_pending\{stream="s",durable="d"\} 7$/m);
  assert.match(text, /^tacit_drift_psi\{dimension="label_rule"\} 0$/m, "the first window is the reference: PSI 0");
  assert.match(text, /^target_info\{[^}]*service_name="tacit"[^}]*\}/m);
  assert.match(text, /service_instance_id="w-1"/);
  assert.equal((await fetch(`http://127.0.0.1:${port}/readyz`)).status, 200);
});

/** A README anchor as GitHub makes it from a heading. */
const anchor = (heading: string): string => heading.trim().toLowerCase().replace(/[^\w\- ]/g, "").replace(/ /g, "-");

test("prometheus: config and rules parse, rules read only exported metrics and cover every SLI, each alert links its runbook", () => {
  const prom = yamlFile(join(DEPLOY, "prometheus", "prometheus.yml"));
  const compose = yamlFile(join(COMPOSE_DIR, "docker-compose.yml"));
  assert.deepEqual(prom.rule_files, ["slis.yml", "alerts.yml"]);
  for (const f of prom.rule_files as string[]) assert.ok(existsSync(join(DEPLOY, "prometheus", f)), `rule file ${f}`);
  const workers = (prom.scrape_configs as any[]).find((s) => s.job_name === "tacit-workers");
  assert.ok(workers, "a tacit-workers scrape job");
  const sd = workers.dns_sd_configs[0];
  assert.ok(sd.names.every((n: string) => n in compose.services), "scrapes compose services");
  assert.equal(sd.port, metricsPortOf(compose.services.worker.command));
  for (const job of prom.scrape_configs as any[]) {
    for (const target of (job.static_configs ?? []).flatMap((s: any) => s.targets as string[])) {
      const host = target.split(":")[0];
      assert.ok(host === "localhost" || host in compose.services, `${job.job_name} target ${target} is a compose service`);
    }
  }

  // Recording rules read exported metrics (or rules recorded before them).
  const rec = recorded();
  for (const [name, exprs] of rec) {
    assert.match(name, /^tacit:[a-z0-9_]+:[a-z0-9_]+$/, `${name}: level:metric:operation`);
    for (const e of exprs) for (const n of promqlMetrics(e)) assert.ok((TACIT_METRICS as readonly string[]).includes(n) || rec.has(n), `${name}: unknown metric ${n}`);
  }
  // Every SLI of SPEC §7 has its recording rule.
  for (const sli of ["tacit:ingest_errors:ratio_rate5m", "tacit:ingest_unaccounted:increase1h", "tacit:event_to_label_seconds:p99_5m", "tacit:event_to_feature_seconds:p99_5m", "tacit:label_coverage:ratio_rate1h", "tacit:event_age_seconds:by_device", "tacit:features_age_seconds:max", "tacit:bot_filter:ratio_rate1h", "tacit:drift_psi:max", "tacit:pii_detector_hits:increase1h", "tacit:replay_runs:increase1d", "tacit:label_diversity:entropy1h", "tacit:explicit_agreement:ratio_rate1h"]) {
    assert.ok(rec.has(sli), `recording rule ${sli}`);
  }

  const alerts = yamlFile(join(DEPLOY, "prometheus", "alerts.yml"));
  const rules = (alerts.groups as any[]).flatMap((g) => g.rules as any[]);
  const allowed = new Set<string>([...TACIT_METRICS, ...ALERT_EXTRA_METRICS, ...rec.keys()]);
  const readme = read(join(ROOT, "README.md"));
  const anchors = new Set([...readme.matchAll(/^#+ (.+)$/gm)].map((m) => anchor(m[1]!)));
  const used = new Map<string, string[]>();
  for (const r of rules) {
    assert.equal(typeof r.alert, "string");
    assert.ok(balanced(r.expr), `${r.alert}: unbalanced expression`);
    assert.match(r.for, /^\d+[smh]$/, `${r.alert}: for`);
    assert.ok(["warning", "critical"].includes(r.labels?.severity), `${r.alert}: severity`);
    assert.ok(["page", "ticket"].includes(r.labels?.routing), `${r.alert}: routing`);
    assert.equal(typeof r.annotations?.summary, "string", `${r.alert}: summary`);
    const runbook = /^README\.md#(.+)$/.exec(r.annotations?.runbook_url ?? "")?.[1];
    assert.ok(runbook && anchors.has(runbook), `${r.alert}: runbook_url ${r.annotations?.runbook_url} names a README section`);
    const names = promqlMetrics(r.expr);
    assert.ok(names.length > 0, `${r.alert}: reads a metric`);
    for (const n of names) assert.ok(allowed.has(n), `${r.alert}: unknown metric ${n}`);
    used.set(r.alert, names);
  }
  const find = (pred: (expr: string, names: string[]) => boolean, what: string): void => {
    assert.ok(rules.some((r) => pred(r.expr, used.get(r.alert)!)), `an alert for ${what}`);
  };
  find((e, n) => n.includes("tacit:ingest_errors:ratio_rate1h") && n.includes("tacit:ingest_errors:ratio_rate5m") && /14\.4/.test(e), "ingestion fast burn (1h/5m at 14.4x)");
  find((_, n) => n.includes("tacit:ingest_errors:ratio_rate3d") && n.includes("tacit:ingest_errors:ratio_rate6h"), "ingestion slow burn (3d/6h)");
  find((e, n) => n.includes("tacit:label_latency_slow:ratio_rate6h") && n.includes("tacit:label_latency_slow:ratio_rate30m") && /6 \*/.test(e), "latency burn (6h/30m at 6x)");
  find((_, n) => n.includes("tacit:drift_psi:max"), "drift");
  find((_, n) => n.includes("tacit_labels_first_published_total") && n.includes("tacit_responses_shown_total"), "a coverage drop");
  find((_, n) => n.includes("tacit_features_newest_event_timestamp_seconds"), "stale features");
  find((_, n) => n.includes("tacit:pii_detector_hits:increase1h"), "a PII detector hit");
  find((e, n) => n.includes("tacit_stage_dlq_total") && /> 0\b/.test(e), "a sustained DLQ rate");
  find((e, n) => n.includes("tacit_consumer_pending") && /deriv\(/.test(e), "growing consumer pending");
  find((e, n) => n.includes("tacit_watermark_lag_seconds") && /> 300\b/.test(e), "watermark lag over 5 min");
  find((e, n) => n.includes("tacit_stage_side_output_total") && /\[10m\]/.test(e) && /labels\[\.\]/.test(e), "no labels for 10 min");
  find((_, n) => n.includes("up"), "a worker down");
});

function dashboardPanels(d: any): any[] {
  return (d.panels as any[]).flatMap((p) => (p.type === "row" ? [p, ...(p.panels ?? [])] : [p]));
}

test("grafana: three dashboards whose panels query only exported metrics and recording rules, provisioning matches compose", () => {
  const dir = join(DEPLOY, "grafana", "dashboards");
  assert.deepEqual(readdirSync(dir).sort(), [...DASHBOARDS].sort());
  const ds = yamlFile(join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml")).datasources[0];
  const rec = recorded();
  const known = (n: string) => (TACIT_METRICS as readonly string[]).includes(n) || rec.has(n) || n === "up";
  const used = new Set<string>();
  const exprs: string[] = [];
  const uids = new Set<string>();
  for (const file of DASHBOARDS) {
    const d = JSON.parse(read(join(dir, file)));
    assert.ok(!uids.has(d.uid), `${file}: unique uid`);
    uids.add(d.uid);
    const panels = dashboardPanels(d);
    const ids = panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, `${file}: unique panel ids`);
    for (const p of panels.filter((x) => x.type !== "row")) {
      assert.ok(p.gridPos && typeof p.title === "string", `${file} panel ${p.id}: title and position`);
      assert.equal(p.datasource?.uid, ds.uid, `${file} ${p.title}: datasource`);
      assert.ok(p.targets?.length > 0, `${file} ${p.title}: has queries`);
      for (const tg of p.targets) {
        assert.ok(balanced(tg.expr), `${file} ${p.title}: unbalanced ${tg.expr}`);
        const names = promqlMetrics(tg.expr);
        assert.ok(names.length > 0, `${file} ${p.title}: reads a metric`);
        for (const n of names) {
          assert.ok(known(n), `${file} ${p.title}: unknown metric or recording rule ${n}`);
          used.add(n);
        }
        exprs.push(tg.expr);
      }
    }
    for (const v of d.templating.list as any[]) {
      for (const n of promqlMetrics(typeof v.query === "string" ? v.query : v.query.query)) assert.ok(known(n), `${file} variable ${v.name}: ${n}`);
    }
  }
  // Every SLI is on a dashboard: each exported family is read by a panel or by a recording rule a panel reads.
  const covered = new Set(used);
  for (const n of used) for (const e of rec.get(n) ?? []) for (const m of promqlMetrics(e)) covered.add(m);
  for (const n of [...covered]) for (const e of rec.get(n) ?? []) for (const m of promqlMetrics(e)) covered.add(m);
  assert.deepEqual((TACIT_METRICS as readonly string[]).filter((n) => !covered.has(n)), [], "every exported metric family is on a dashboard");
  const quantiles = (metric: string) => exprs.filter((e) => e.includes(`${metric}_bucket`)).map((e) => /histogram_quantile\(([\d.]+)/.exec(e)?.[1]);
  assert.deepEqual([...new Set(quantiles("tacit_batch_duration_seconds"))].sort(), ["0.5", "0.99"]);
  assert.ok(exprs.some((e) => /by \(instance, group\) \(tacit_partitions_owned\)/.test(e)), "partitions owned per worker");

  // Provisioning: the datasource is the compose Prometheus; the dashboard dir is where compose mounts it.
  const compose = yamlFile(join(COMPOSE_DIR, "docker-compose.yml"));
  const url = new URL(ds.url);
  assert.ok(url.hostname in compose.services);
  assert.equal(url.port, "9090");
  const provider = yamlFile(join(DEPLOY, "grafana", "provisioning", "dashboards", "tacit.yml")).providers[0];
  const mounts = bindMounts(compose.services.grafana);
  assert.equal(mounts.find((m) => m.host === join(DEPLOY, "grafana", "dashboards"))?.target, provider.options.path);
  assert.equal(mounts.find((m) => m.host === join(DEPLOY, "grafana", "provisioning"))?.target, "/etc/grafana/provisioning");
  const home = compose.services.grafana.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH as string;
  assert.ok(DASHBOARDS.includes(basename(home)) && home.startsWith(provider.options.path), "the home dashboard is a provisioned one");
});

// --- compose and Dockerfile -------------------------------------------------------------------

function bindMounts(service: any): { host: string; target: string }[] {
  return ((service.volumes ?? []) as (string | { type: string; source: string; target: string })[])
    .map((v) => (typeof v === "string" ? { source: v.split(":")[0]!, target: v.split(":")[1]! } : v))
    .filter((v) => v.source.startsWith(".") || v.source.startsWith("/"))
    .map((v) => ({ host: resolve(COMPOSE_DIR, v.source), target: v.target }));
}

function commandArgs(cmd: unknown): string[] {
  if (Array.isArray(cmd)) return cmd.map(String);
  return typeof cmd === "string" ? cmd.split(/\s+/) : [];
}

function metricsPortOf(cmd: unknown): number {
  const args = commandArgs(cmd);
  const i = args.indexOf("--metrics-port");
  return i >= 0 ? Number(args[i + 1]) : 9464;
}

function setsOf(cmd: unknown): string[] {
  const args = commandArgs(cmd);
  return args.flatMap((a, i) => (a === "--set" ? [args[i + 1]!] : []));
}

/** Names of variables that hold secrets, which must come from an env file or a Secret. */
const SECRET_NAME = /passw|secret|token|(?:^|_)key(?:$|_)|credential/i;
/** A value that looks like key material: a URL with a password, or a long hex / base64 run with letters and digits. */
function looksLikeSecret(v: string): boolean {
  if (/:\/\/[^/@\s]*:[^/@\s]+@/.test(v)) return true;
  return v.split(/[=\s:"']/).some((part) => /^[A-Za-z0-9+/_-]{24,}={0,2}$/.test(part) && !part.startsWith("/") && /\d/.test(part) && /[A-Za-z]/.test(part));
}

test("compose: services, builds and mounted files exist, secrets come only from generated env files", () => {
  const compose = yamlFile(join(COMPOSE_DIR, "docker-compose.yml"));
  const services = compose.services as Record<string, any>;
  for (const s of ["nats-1", "nats-2", "nats-3", "redis", "deploy", "worker", "prometheus", "grafana"]) assert.ok(s in services, `service ${s}`);
  const { dir, files } = makeSecrets();
  try {
    for (const [name, svc] of Object.entries(services)) {
      assert.ok(svc.image || svc.build, `${name}: image or build`);
      if (svc.build) {
        const ctx = resolve(COMPOSE_DIR, svc.build.context);
        assert.ok(existsSync(join(ctx, "package.json")), `${name}: build context is the repository`);
        assert.ok(existsSync(join(ctx, svc.build.dockerfile)), `${name}: dockerfile`);
      }
      // Mounted host paths exist, and absolute paths in the command that fall in a mount exist on the host.
      const mounts = bindMounts(svc);
      for (const m of mounts) assert.ok(existsSync(m.host), `${name}: ${relative(ROOT, m.host)} exists`);
      const cmdText = commandArgs(svc.command).join(" ");
      for (const [abs] of cmdText.matchAll(/\/[\w./-]+\.(?:conf|ya?ml|json)/g)) {
        const m = mounts.find((x) => abs === x.target || abs.startsWith(`${x.target}/`));
        if (m) assert.ok(existsSync(join(m.host, abs.slice(m.target.length))), `${name}: ${abs} is mounted from an existing file`);
      }
      for (const v of (svc.volumes ?? []) as (string | { source: string })[]) {
        const src = typeof v === "string" ? v.split(":")[0]! : v.source;
        if (!src.startsWith(".") && !src.startsWith("/")) assert.ok(src in (compose.volumes ?? {}), `${name}: volume ${src} declared`);
      }
      // No literal secret: not in environment, not on the command line.
      const env: Record<string, string> = Array.isArray(svc.environment)
        ? Object.fromEntries((svc.environment as string[]).map((e) => [e.split("=")[0]!, e.split("=").slice(1).join("=")]))
        : (svc.environment ?? {});
      for (const [k, v] of Object.entries(env)) {
        assert.ok(!SECRET_NAME.test(k), `${name}: ${k} must come from an env_file`);
        assert.ok(!looksLikeSecret(String(v)), `${name}: ${k} looks like a secret`);
      }
      for (const a of commandArgs(svc.command)) {
        assert.ok(!looksLikeSecret(a) && !/\.(password|token)=/.test(a), `${name}: command argument ${a}`);
      }
      assert.doesNotMatch(cmdText, /--requirepass\s+(?!"?\$\$)/, `${name}: --requirepass takes a variable`);
      // env_file: generated by make-secrets.sh, and defines every variable the service references.
      const envFiles = ((svc.env_file ?? []) as string[]).map((f) => {
        assert.match(f, /^secrets\/[\w-]+\.env$/, `${name}: env_file under secrets/`);
        const generated = files[basename(f)];
        assert.ok(generated, `${name}: make-secrets.sh writes ${f}`);
        return generated;
      });
      const provided = Object.assign({}, ...envFiles) as Record<string, string>;
      const refs = [
        ...setsOf(svc.command).filter((s) => /\.password_env=|\.token_env=/.test(s)).map((s) => s.split("=")[1]!),
        ...[...JSON.stringify([svc.command, svc.healthcheck]).matchAll(/\$\$([A-Z_][A-Z0-9_]*)/g)].map((m) => m[1]!),
      ];
      for (const r of refs) assert.ok(r in provided, `${name}: ${r} is not in its env_file`);
      if (/^nats-\d$/.test(name)) for (const r of natsEnvRefs()) assert.ok(r in provided, `${name}: ${r}`);
    }

    // The generated secrets agree with each other.
    const nats = files["nats.env"]!;
    assert.equal(files["worker.env"]!.NATS_PASSWORD, nats.NATS_WORKER_PASSWORD);
    assert.equal(files["deployer.env"]!.NATS_PASSWORD, nats.NATS_DEPLOYER_PASSWORD);
    assert.equal(files["worker.env"]!.REDIS_PASSWORD, files["redis.env"]!.REDIS_PASSWORD);
    const redisUrl = new URL(files["worker.env"]!.REDIS_URL!);
    assert.equal(decodeURIComponent(redisUrl.password), files["redis.env"]!.REDIS_PASSWORD, "REDIS_URL authenticates on its own");
    assert.equal(redisUrl.hostname, "redis");
    assert.equal(parsePseudonymKey(files["worker.env"]!.TACIT_PSEUDONYM_KEY!, "TACIT_PSEUDONYM_KEY").version, "k1");
    const all = Object.values(nats);
    assert.equal(new Set(all).size, all.length, "one password per NATS user");
    for (const v of all) assert.ok(v.length >= 32 && looksLikeSecret(v), "generated secrets are long and the secret check would catch them inline");
    assert.ok(looksLikeSecret(`TACIT_PSEUDONYM_KEY=${files["worker.env"]!.TACIT_PSEUDONYM_KEY}`) && looksLikeSecret("redis://:hunter2@redis:6379"));
    // Fresh every run; never overwritten.
    assert.notEqual(makeSecretsEnvOnly().NATS_WORKER_PASSWORD, nats.NATS_WORKER_PASSWORD);
    const rerun = spawnSync("sh", [join(COMPOSE_DIR, "make-secrets.sh"), dir], { encoding: "utf8" });
    assert.notEqual(rerun.status, 0);
    assert.equal(parseEnvFile(read(join(dir, "nats.env"))).NATS_WORKER_PASSWORD, nats.NATS_WORKER_PASSWORD);
    assert.match(read(join(COMPOSE_DIR, ".gitignore")), /^secrets\/$/m);

    // Wiring: workers start after a successful deploy; deploy after a healthy cluster; replicas.
    const worker = services.worker;
    assert.equal(worker.deploy.replicas, 2);
    assert.equal(worker.depends_on.deploy.condition, "service_completed_successfully");
    for (const n of ["nats-1", "nats-2", "nats-3"]) assert.equal(services.deploy.depends_on[n].condition, "service_healthy");
    assert.match(JSON.stringify(worker.healthcheck.test), new RegExp(`:${metricsPortOf(worker.command)}/readyz`));

    // The pipeline loads with exactly the command lines and environment the containers get.
    for (const [name, user] of [["worker", "worker"], ["deploy", "deployer"]] as const) {
      const svc = services[name];
      const args = commandArgs(svc.command);
      assert.equal(args[0], name === "worker" ? "run" : "deploy");
      assert.equal(resolve(ROOT, args[1]!), PIPELINE_FILE);
      // Compose gives `environment` precedence over env_file.
      const env = { ...Object.assign({}, ...(svc.env_file as string[]).map((f) => files[basename(f)])), ...svc.environment };
      const p = loadOrFail({ set: setsOf(svc.command), env, secrets: true });
      assert.equal(p.nats.user, user);
      assert.equal(p.nats.password, env.NATS_PASSWORD);
      assert.deepEqual(p.nats.url.split(",").map((u) => new URL(u).hostname), ["nats-1", "nats-2", "nats-3"]);
      if (name === "worker") {
        assert.equal(p.redis.password, env.REDIS_PASSWORD);
        assert.equal(new URL(p.redis.url).hostname, "redis");
        assert.equal(new URL(p.redis.url).password, env.REDIS_PASSWORD, "the Redis client, opened from the URL, authenticates");
      } else {
        assert.equal(p.streams.replicas, 3);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

interface DockerStage {
  from: string;
  name?: string;
  lines: string[];
}

function dockerStages(text: string): DockerStage[] {
  const stages: DockerStage[] = [];
  const logical = text.replace(/\\\n/g, " ").split("\n").map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
  for (const l of logical) {
    const from = /^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/i.exec(l);
    if (from) stages.push({ from: from[1]!, name: from[2], lines: [] });
    else stages[stages.length - 1]!.lines.push(l);
  }
  return stages;
}

test("the worker's node flags: bin/tacit.js's shebang and `npm run demo` pass each of them, as the Dockerfile does", () => {
  const shebang = read(join(ROOT, "bin", "tacit.js")).split("\n")[0]!;
  const demo = (JSON.parse(read(join(ROOT, "package.json"))) as { scripts: Record<string, string> }).scripts.demo!;
  for (const f of WORKER_NODE_FLAGS) {
    assert.ok(shebang.split(/\s+/).includes(f), `the shebang passes ${f}: ${shebang}`);
    assert.ok(demo.split(/\s+/).includes(f), `npm run demo passes ${f}: ${demo}`);
  }
});

test("compose: the Dockerfile builds in a builder stage and ships only runtime files and production dependencies", () => {
  const stages = dockerStages(read(join(COMPOSE_DIR, "Dockerfile")));
  for (const s of stages) assert.match(s.from, /^node:20-slim$/);
  const final = stages[stages.length - 1]!;
  const names = new Set(stages.map((s) => s.name).filter(Boolean));
  const build = stages.find((s) => s.lines.some((l) => /npm run build/.test(l)))!;
  assert.ok(build && build.lines.some((l) => /^RUN npm ci(?!.*--omit=dev)/.test(l)), "the builder installs dev dependencies and builds");
  assert.ok(stages.some((s) => s !== final && s.lines.some((l) => /^RUN npm ci .*--omit=dev/.test(l))), "production dependencies installed apart");
  assert.ok(!final.lines.some((l) => /^RUN npm/.test(l)), "nothing is built in the final image");
  for (const s of stages) {
    for (const l of s.lines.filter((x) => /^COPY\s/.test(x))) {
      const parts = l.split(/\s+/).slice(1);
      const from = parts.find((p) => p.startsWith("--from="))?.slice(7);
      const srcs = parts.filter((p) => !p.startsWith("--")).slice(0, -1);
      if (from) assert.ok(names.has(from), `COPY --from=${from} names a stage`);
      else for (const src of srcs) assert.ok(existsSync(join(ROOT, src)), `COPY source ${src} exists`);
    }
  }
  const finalCopies = final.lines.filter((l) => l.startsWith("COPY")).join("\n");
  for (const want of ["node_modules", "dist/src", "dist/operators", "package.json", "bin", "config", "pipelines"]) assert.match(finalCopies, new RegExp(`(?:^|[\\s/])${want}(?:\\s|$)`, "m"), `final image gets ${want}`);
  assert.ok(final.lines.some((l) => /^USER\s+(?!root\b|0\b)\S+/.test(l)), "runs unprivileged");
  const entry = final.lines.find((l) => l.startsWith("ENTRYPOINT") && l.includes("bin/tacit.js"));
  assert.ok(entry, "the entrypoint runs bin/tacit.js");
  for (const f of WORKER_NODE_FLAGS) assert.ok(entry.includes(`"${f}"`), `the entrypoint passes the worker's node flag ${f}: ${entry}`);
  const ignore = read(join(COMPOSE_DIR, "Dockerfile.dockerignore"));
  for (const p of ["node_modules", "dist", "deploy/compose/secrets"]) assert.ok(ignore.split("\n").some((l) => l.trim().endsWith(p)), `.dockerignore drops ${p}`);

  // What the image runs (dist/src, dist/operators) imports only what `npm ci --omit=dev` installs,
  // and nothing from test/ or bench/, which the image leaves out.
  const lock = JSON.parse(read(join(ROOT, "package-lock.json"))) as { packages: Record<string, { dev?: boolean }> };
  const shipped = [join(ROOT, "dist", "src"), join(ROOT, "dist", "operators")];
  const problems: string[] = [];
  const walk = (d: string): string[] => readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
  const files = shipped.flatMap(walk).filter((f) => f.endsWith(".js") && !f.endsWith(".test.js"));
  assert.ok(files.length > 10, "dist/ is built");
  for (const f of files) {
    for (const m of read(f).matchAll(/(?:^|[\s;])(?:import|export)\s[^"']*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)|^import\s*["']([^"']+)["']/gm)) {
      const spec = m[1] ?? m[2] ?? m[3]!;
      if (spec.startsWith(".")) {
        const target = resolve(dirname(f), spec);
        if (!shipped.some((s) => target.startsWith(s + "/"))) problems.push(`${relative(ROOT, f)} imports ${spec}, which the image leaves out`);
        continue;
      }
      if (spec.startsWith("node:") || builtinModules.includes(spec)) continue;
      const pkg = spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0]!;
      const entry = lock.packages[`node_modules/${pkg}`];
      if (!entry || entry.dev) problems.push(`${relative(ROOT, f)} imports ${pkg}, which npm ci --omit=dev does not install`);
    }
  }
  assert.deepEqual(problems, []);
});

// --- Kubernetes ---------------------------------------------------------------------------------

function k8sDocs(): { file: string; doc: any }[] {
  const out: { file: string; doc: any }[] = [];
  for (const f of readdirSync(K8S_DIR).filter((x) => x.endsWith(".yaml")).sort()) {
    for (const d of parseAllDocuments(read(join(K8S_DIR, f)))) {
      assert.deepEqual(d.errors.map(String), [], `${f} parses`);
      const doc = d.toJS();
      if (doc !== null) out.push({ file: f, doc });
    }
  }
  return out;
}

test("k8s: manifests parse, probes use the metrics port, Secrets hold only placeholders, the pipeline is the repository's", () => {
  const docs = k8sDocs();
  const byKind = (kind: string) => docs.filter((d) => d.doc.kind === kind).map((d) => d.doc);
  for (const kind of ["Namespace", "ConfigMap", "Secret", "Deployment", "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Service"]) {
    assert.ok(byKind(kind).length > 0, `a ${kind}`);
  }
  const ns = byKind("Namespace")[0].metadata.name;
  for (const { file, doc } of docs.filter((d) => d.doc.kind !== "Kustomization")) {
    assert.ok(doc.apiVersion && doc.metadata?.name, `${file}: apiVersion and name`);
    if (doc.kind !== "Namespace") assert.equal(doc.metadata.namespace, ns, `${file}: ${doc.kind} in ${ns}`);
  }
  const kustomization = docs.find((d) => d.doc.kind === "Kustomization")!.doc;
  for (const r of kustomization.resources as string[]) assert.ok(existsSync(join(K8S_DIR, r)), `kustomization resource ${r}`);
  assert.ok(!(kustomization.resources as string[]).some((r) => /secret/i.test(r)), "the Secret template is not applied by kustomize");

  // Secrets: placeholders only.
  const secrets = byKind("Secret");
  for (const s of secrets) {
    const values = { ...(s.stringData ?? {}), ...(s.data ?? {}) };
    assert.ok(Object.keys(values).length > 0);
    for (const [k, v] of Object.entries(values)) assert.equal(v, "REPLACE_ME", `Secret ${s.metadata.name}.${k} must be a placeholder`);
  }
  const secretKeys = (name: string): string[] => {
    const s = secrets.find((x) => x.metadata.name === name);
    assert.ok(s, `Secret ${name} in the template`);
    return Object.keys({ ...(s.stringData ?? {}), ...(s.data ?? {}) });
  };

  // The ConfigMap is pipelines/feedback.yaml, byte for byte.
  const cm = byKind("ConfigMap").find((c) => c.metadata.name === "tacit-pipeline");
  assert.equal(cm?.data["feedback.yaml"], read(PIPELINE_FILE), "deploy/k8s/configmap-pipeline.yaml is stale: run node deploy/k8s/render-configmap.mjs");

  const p = loadOrFail();
  const workdir = /^WORKDIR\s+(\S+)/m.exec(read(join(COMPOSE_DIR, "Dockerfile")).split(/^FROM /m).pop()!)?.[1];
  assert.ok(workdir, "the image's WORKDIR");
  const checkPod = (what: string, spec: any, user: string): any => {
    const c = spec.containers[0];
    const args = c.args as string[];
    // The pipeline is mounted from the ConfigMap exactly where the command reads it.
    const mount = (c.volumeMounts as any[]).find((m) => m.mountPath === `${workdir}/${args[1]}`);
    assert.ok(mount, `${what}: mounts the pipeline at ${workdir}/${args[1]}`);
    const vol = (spec.volumes as any[]).find((v) => v.name === mount.name);
    assert.equal(vol.configMap.name, cm.metadata.name);
    assert.equal(mount.subPath, "feedback.yaml");
    assert.equal(c.securityContext.allowPrivilegeEscalation, false);
    assert.equal(spec.securityContext.runAsNonRoot, true);
    assert.ok(c.resources?.requests && c.resources?.limits, `${what}: resources`);
    // Secrets only by reference; plain env values are not secrets.
    for (const e of (c.env ?? []) as any[]) {
      assert.ok(!SECRET_NAME.test(e.name) || e.valueFrom, `${what}: ${e.name} must come from a Secret`);
      if (e.value !== undefined) assert.ok(!looksLikeSecret(e.value), `${what}: ${e.name}`);
    }
    const keys = (c.envFrom as any[]).flatMap((f) => secretKeys(f.secretRef.name));
    const dummy = (k: string): string => (k === "TACIT_PSEUDONYM_KEY" ? "k1:0123456789abcdef0123" : k === "REDIS_URL" ? "redis://:test-pw@redis:6379" : `test-${k}`);
    const env: Record<string, string> = Object.fromEntries([...((c.env ?? []) as any[]).map((e) => [e.name, e.value]), ...keys.map((k) => [k, dummy(k)])]);
    const loaded = loadOrFail({ set: setsOf(args), env, secrets: true });
    assert.equal(loaded.nats.user, user);
    assert.equal(loaded.nats.password, env.NATS_PASSWORD);
    return { c, args, keys, loaded };
  };

  // Workers: replicas, probes on the metrics port, a grace period that lets the drain finish.
  const dep = byKind("Deployment").find((d) => d.metadata.name === "tacit-worker");
  assert.equal(dep.spec.replicas, 2);
  const pod = dep.spec.template;
  const w = checkPod("worker", pod.spec, "worker");
  assert.equal(w.args[0], "run");
  assert.ok(["TACIT_PSEUDONYM_KEY", "REDIS_PASSWORD", "REDIS_URL"].every((k) => w.keys.includes(k)));
  assert.equal(new URL(w.loaded.redis.url).password, "test-pw", "the Redis URL comes from the Secret");
  assert.equal(w.loaded.redis.password, "test-REDIS_PASSWORD");
  const port = metricsPortOf(w.args);
  const named = (ref: string | number): number => (typeof ref === "number" ? ref : (w.c.ports as any[]).find((x) => x.name === ref).containerPort);
  assert.equal(w.c.readinessProbe.httpGet.path, "/readyz");
  assert.equal(w.c.livenessProbe.httpGet.path, "/healthz");
  assert.equal(named(w.c.readinessProbe.httpGet.port), port);
  assert.equal(named(w.c.livenessProbe.httpGet.port), port);
  assert.ok(pod.spec.terminationGracePeriodSeconds * 1000 >= p.runtime.ack_wait_ms, "grace period ≥ ack_wait: a batch can finish and be acked");
  assert.equal(pod.metadata.annotations["prometheus.io/port"], String(port));
  for (const [k, v] of Object.entries(dep.spec.selector.matchLabels)) assert.equal(pod.metadata.labels[k], v);

  const svc = byKind("Service").find((s) => s.metadata.name === "tacit-worker-metrics");
  assert.equal(svc.metadata.annotations["prometheus.io/scrape"], "true");
  assert.equal(svc.metadata.annotations["prometheus.io/port"], String(port));
  assert.equal(named(svc.spec.ports[0].targetPort), port);
  assert.deepEqual(svc.spec.selector, dep.spec.selector.matchLabels);
  assert.deepEqual(byKind("PodDisruptionBudget")[0].spec.selector.matchLabels, dep.spec.selector.matchLabels);

  const hpa = byKind("HorizontalPodAutoscaler")[0];
  assert.equal(hpa.spec.scaleTargetRef.name, dep.metadata.name);
  assert.ok(hpa.spec.maxReplicas <= p.partitions, "beyond the partition count, keyed stages gain nothing");
  assert.ok(hpa.spec.minReplicas >= 1);

  const job = byKind("Job").find((j) => j.metadata.name === "tacit-deploy");
  assert.ok(["Never", "OnFailure"].includes(job.spec.template.spec.restartPolicy));
  const d = checkPod("deploy job", job.spec.template.spec, "deployer");
  assert.equal(d.args[0], "deploy");
  assert.equal(d.loaded.streams.replicas, 3);
});

test("README: every file under deploy/ is described", () => {
  const readme = read(join(DEPLOY, "README.md"));
  const walk = (d: string): string[] => readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
  const missing = walk(DEPLOY)
    .map((f) => relative(DEPLOY, f))
    .filter((f) => f !== "README.md" && !f.startsWith(`compose${"/"}secrets/`))
    .filter((f) => !readme.includes(f) && !readme.includes(basename(f)));
  assert.deepEqual(missing, []);
});

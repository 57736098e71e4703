// Golden-output tests (the Arroyo smoke-test pattern) of the default pipeline on real
// nats-server and redis-server: a seeded simulated day is run to completion and its labels
// (without emitted_at) and online features are recorded; then every way of running it again —
// a replay of the whole pipeline, a replay of one stage from the middle, a rebuild after wiping
// Redis, a run with two workers of which one is SIGKILLed three times, a redrive of dead letters
// after a config fix — must end with exactly the same labels and features, and no label_id +
// revision published twice; and a label rule fixed after the fact, with label-derive rebuilt,
// must end as if the fixed rule had run from the start, re-publishing only the labels that
// changed. The golden pipeline's duplicate window is 1 s, so every replay below is older than it:
// JetStream's de-duplication cannot hide a repeat.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Cluster, Redis } from "ioredis";
import { startServers, type TestServers } from "./harness.js";
import { Random } from "./support/random.js";
import { consumersDrained, eventually, readLabelStream, readStream } from "./support/streams.js";
import { startRedisCluster } from "./support/servers.js";
import { spawnTacit, type TacitProcess } from "./support/tacit-process.js";
import { findOperator } from "../operators/index.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { groupState, keptByRebuild, type ReplayReport } from "../src/runtime/replay.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";
import { simulate } from "../src/sim/simulate.js";

const ROOT = projectRoot();
const PIPELINE = join(ROOT, "pipelines", "feedback.yaml");
const KEY = "t1:golden-test-secret-0123456789abcdef";
const SEED = 424242;
const HOUR = 3_600_000;
const silent = { debug() {}, info() {}, warn() {}, error() {} };
/**
 * Test speed: fewer partitions, short leases; no idle advance during a run (it is wall-clock driven).
 * Topology: the default pipeline fuses its five keyed stages into one group; here sessionize and
 * label-derive head groups of their own (enrich | dedupe+bot-score | sessionize+reformulation |
 * label-derive), so replay and rebuild are tested both on fused groups and stage by stage.
 */
const SETS = ["partitions=4", "runtime.batch_size=200", "runtime.ack_wait=3s", "runtime.lease_ttl=2s", "event_time.idle_timeout=10m", "stages.sessionize.fuse_with_previous=false", "stages.label-derive.fuse_with_previous=false"];

/** The simulated day: 150 users, 2 h of event time ending an hour ago, noise on (duplicates, late, out of order, malformed). */
function day(): string[] {
  return simulate({ seed: SEED, users: 150, durationMs: 2 * HOUR, startTime: Date.now() - 3 * HOUR }).events;
}

function envOf(s: TestServers): Record<string, string> {
  return { NATS_URL: s.natsUrl, REDIS_URL: s.redisUrl, TACIT_PSEUDONYM_KEY: KEY };
}

function load(s: TestServers, extra: string[] = []): Pipeline {
  return loadPipelineOrThrow(PIPELINE, { env: envOf(s), set: [...SETS, ...extra], operators: findOperator });
}

function setArgs(extra: string[] = []): string[] {
  return [...SETS, ...extra].flatMap((x) => ["--set", x]);
}

async function deploy(p: Pipeline, nats: NatsHandles): Promise<void> {
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
}

function inputStreams(p: Pipeline): string[] {
  return stageGroups(p, findOperator).map((g) => g.inputStream);
}

/** Every durable drained, twice in a row (first stage to last, so nothing is in between). */
async function quiescent(p: Pipeline, nats: NatsHandles, what: string, timeoutMs = 120_000): Promise<void> {
  let streak = 0;
  try {
    await eventually(what, async () => {
      streak = (await consumersDrained(nats, inputStreams(p))) ? streak + 1 : 0;
      return streak >= 3;
    }, timeoutMs, 150);
  } catch (err) {
    const behind: string[] = [];
    for (const s of inputStreams(p)) {
      for await (const ci of nats.jsm.consumers.list(s)) if (ci.num_pending || ci.num_ack_pending) behind.push(`${ci.name}: pending ${ci.num_pending}, unacked ${ci.num_ack_pending}, waiting ${ci.num_waiting}`);
    }
    throw new Error(`${(err as Error).message}; behind: ${behind.join("; ")}`);
  }
}

/** What a run produced: labels as published (emitted_at left out), features, side-output counts. */
interface Snapshot {
  /** `label_id:revision` → the label without emitted_at, as JSON. */
  labels: Map<string, string>;
  /** How many label messages the stream holds (repeats included). */
  labelMessages: number;
  /** Feature hash key (without the pipeline prefix) → fields. */
  features: Map<string, Record<string, string>>;
  counts: Record<string, number>;
}

async function snapshot(p: Pipeline, nats: NatsHandles, redis: Redis | Cluster): Promise<Snapshot> {
  const labels = new Map<string, string>();
  const msgs = await readLabelStream(nats, streamName(p, "labels"));
  const repeats: string[] = [];
  for (const m of msgs) {
    const { emitted_at: _e, ...l } = JSON.parse(m.data) as { label_id: string; revision: number; emitted_at: string };
    const id = `${l.label_id}:${l.revision}`;
    if (labels.has(id)) repeats.push(id);
    labels.set(id, JSON.stringify(l));
  }
  assert.deepEqual(repeats, [], "no label_id + revision is published twice");
  const features = new Map<string, Record<string, string>>();
  // On Cluster, every master holds some of the keys.
  for (const node of redis instanceof Cluster ? redis.nodes("master") : [redis]) {
    let cursor = "0";
    do {
      const [next, keys] = await node.scan(cursor, "MATCH", `tacit:{${p.subject_prefix}:u:*}:features:*`, "COUNT", 1000);
      cursor = next;
      for (const k of keys) features.set(k.replace(`{${p.subject_prefix}:`, "{"), await node.hgetall(k));
    } while (cursor !== "0");
  }
  const counts: Record<string, number> = {};
  for (const s of ["events", "sessions", "late", "bots", "dlq"]) counts[s] = (await nats.jsm.streams.info(streamName(p, s))).state.messages;
  return { labels, labelMessages: msgs.length, features, counts };
}

function assertSame(actual: Snapshot, golden: Snapshot, what: string): void {
  const missing = [...golden.labels.keys()].filter((k) => !actual.labels.has(k));
  const extra = [...actual.labels.keys()].filter((k) => !golden.labels.has(k));
  const show = (ks: string[]) => ks.slice(0, 3).map((k) => `${k} ${actual.labels.get(k) ?? golden.labels.get(k)}`);
  assert.deepEqual({ missing: show(missing), extra: show(extra) }, { missing: [], extra: [] }, `${what}: the same label ids and revisions`);
  for (const [k, v] of golden.labels) assert.equal(actual.labels.get(k), v, `${what}: label ${k} has the same content`);
  assert.equal(actual.labelMessages, golden.labelMessages, `${what}: label messages`);
  assert.equal(actual.features.size, golden.features.size, `${what}: feature hashes`);
  for (const [k, v] of golden.features) assert.deepEqual(actual.features.get(k), v, `${what}: features of ${k}`);
  assert.deepEqual(actual.counts, golden.counts, `${what}: events, sessions, late, bots and dead letters are not repeated`);
}

/** Runs a `tacit` command to its end and returns its JSON output ('close', not 'exit': stdout may still be in flight at exit). */
async function cliJson<T>(s: TestServers, args: string[]): Promise<T> {
  const r = spawnTacit([...args, "--json"], { ...envOf(s), TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
  const code = await new Promise<number | null>((resolve) => r.child.once("close", (c) => resolve(c)));
  assert.equal(code, 0, r.stderr());
  return JSON.parse(r.stdout()) as T;
}

/** Runs `tacit replay …` and returns its report. */
function replayCli(s: TestServers, args: string[], sets: string[] = []): Promise<ReplayReport> {
  return cliJson<ReplayReport>(s, ["replay", PIPELINE, ...setArgs(["streams.duplicate_window=1s", ...sets]), "--yes", ...args]);
}

/** The version the default rules give `accept`; the fixed rules give it this + 1. */
const ACCEPT_VERSION = Number(/\n  - name: accept\n    version: (\d+)\n/.exec(readFileSync(join(ROOT, "config", "label-rules.yaml"), "utf8"))?.[1]);

/** The default label rules with one rule changed after the fact: `accept` weighs 0.8 (its version + 1). */
function fixedRules(): string {
  const text = readFileSync(join(ROOT, "config", "label-rules.yaml"), "utf8");
  const at = text.indexOf("  - name: accept\n");
  const end = text.indexOf("\n  - name: ", at + 1);
  assert.ok(at > 0 && end > at, "the default rules have an accept rule");
  assert.ok(Number.isInteger(ACCEPT_VERSION), "the accept rule states its version");
  const rule = text.slice(at, end).replace(`version: ${ACCEPT_VERSION}`, `version: ${ACCEPT_VERSION + 1}`).replace("base: 1.0", "base: 0.8");
  assert.notEqual(rule, text.slice(at, end));
  const file = join(mkdtempSync(join(tmpdir(), "tacit-rules-")), "label-rules.yaml");
  writeFileSync(file, text.slice(0, at) + rule + text.slice(end));
  return file;
}

/** The latest revision of every label, without its revision number. */
function latest(s: Snapshot): Map<string, string> {
  const best = new Map<string, { rev: number; json: string }>();
  for (const [key, json] of s.labels) {
    const [id, rev] = [key.slice(0, key.lastIndexOf(":")), Number(key.slice(key.lastIndexOf(":") + 1))];
    if ((best.get(id)?.rev ?? -1) < rev) best.set(id, { rev, json });
  }
  return new Map([...best].map(([id, { json }]) => {
    const { revision: _r, ...rest } = JSON.parse(json) as { revision: number };
    return [id, JSON.stringify(rest)];
  }));
}

interface Env {
  servers: TestServers;
  nats: NatsHandles;
  redis: Redis;
  /** Runs at the end, last registered first, before the servers stop. */
  cleanup(fn: () => unknown): void;
}

/** Fresh servers for one test; cleanups (workers, processes) run before they stop, pass or fail. */
async function withEnv<T>(fn: (e: Env) => Promise<T>): Promise<T> {
  const servers = await startServers();
  const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "golden-test");
  const redis = new Redis(servers.redisUrl);
  const cleanups: (() => unknown)[] = [];
  try {
    return await fn({ servers, nats, redis, cleanup: (f) => cleanups.push(f) });
  } finally {
    for (const f of cleanups.reverse()) await Promise.resolve(f()).catch(() => undefined);
    redis.disconnect();
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  }
}

/** An in-process worker with its own Redis connection, stopped and disconnected by the env's cleanup. */
async function startWorker(e: Env, p: Pipeline): Promise<Worker> {
  const redis = new Redis(e.servers.redisUrl);
  const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env: envOf(e.servers), redis, nats: e.nats });
  e.cleanup(() => redis.disconnect());
  e.cleanup(() => worker.stop());
  await worker.start();
  return worker;
}

/** The golden run: one in-process worker, every event published at once; the worker goes on running. */
async function goldenRun(e: Env, p: Pipeline, lines: string[]): Promise<{ snap: Snapshot; worker: Worker }> {
  await deploy(p, e.nats);
  await publishLines(p, e.nats.js, lines, { idPrefix: "day" });
  const worker = await startWorker(e, p);
  await quiescent(p, e.nats, "the golden run to finish");
  return { snap: await snapshot(p, e.nats, e.redis), worker };
}

/** Every key of the pipeline's keyed state (`tacit:{<prefix>:…`), with its value as DUMP gives it. */
async function stateDump(p: Pipeline, redis: Redis): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  let cursor = "0";
  do {
    const [next, keys] = await redis.scan(cursor, "MATCH", `tacit:{${p.subject_prefix}:*`, "COUNT", 1000);
    cursor = next;
    const batch = redis.pipeline();
    for (const k of keys) batch.dumpBuffer(k);
    for (const [i, [err, v]] of ((await batch.exec()) ?? []).entries()) {
      if (err) throw err;
      out.set(keys[i]!, (v as Buffer | null)?.toString("hex") ?? "");
    }
  } while (cursor !== "0");
  return out;
}

let goldenCache: { lines: string[]; golden: Snapshot } | undefined;

/** The golden output: from the first test when it ran in this process, else computed on servers of its own. */
async function goldenOutput(): Promise<{ lines: string[]; golden: Snapshot }> {
  if (goldenCache) return goldenCache;
  const lines = day();
  const golden = await withEnv(async (g) => (await goldenRun(g, load(g.servers, ["streams.duplicate_window=1s"]), lines)).snap);
  return (goldenCache = { lines, golden });
}

test("golden: replaying the whole pipeline, one stage from the middle, and a rebuild after wiping Redis change no label or feature; rebuilding label-derive after a rule fix re-publishes only changed labels", { timeout: 180_000 }, async () => {
  await withEnv(async (e) => {
    const lines = day();
    const p = load(e.servers, ["streams.duplicate_window=1s"]);
    const { snap: golden, worker } = await goldenRun(e, p, lines);
    goldenCache = { lines, golden };
    assert.ok(golden.labels.size > 200, `the day produces labels (${golden.labels.size})`);
    assert.ok(golden.features.size > 100, `and features (${golden.features.size})`);
    assert.ok([...golden.labels.keys()].some((k) => !k.endsWith(":0")), "some labels were revised");
    assert.ok(golden.counts.sessions > 0 && golden.counts.dlq > 0, "sessions closed and malformed lines were dead-lettered");
    // What the operators wrote is what their `state` docs say: every key belongs to exactly one
    // stage group's state (what `--rebuild --stage` wipes) or is kept by every rebuild.
    const groups = stageGroups(p, findOperator);
    const stateOf = new Map(groups.map((g) => [g.name, groupState(p, g, findOperator)]));
    const keep = keptByRebuild(p.subject_prefix);
    const owners = new Map<string, number>();
    for (const k of (await stateDump(p, e.redis)).keys()) {
      const of = groups.filter((g) => stateOf.get(g.name)!.some((m) => m.re.test(k))).map((g) => g.name);
      assert.equal(of.length + (keep.test(k) ? 1 : 0), 1, `${k}: one owner (${of.join(", ") || (keep.test(k) ? "kept" : "none")})`);
      for (const g of of) owners.set(g, (owners.get(g) ?? 0) + 1);
    }
    for (const g of groups.filter((x) => x.keyed)) assert.ok((owners.get(g.name) ?? 0) > 0, `${g.name} wrote state`);
    await new Promise((r) => setTimeout(r, 1200)); // past the 1 s duplicate window

    // (a) The whole pipeline from the start, through the CLI, with the worker running.
    const a = await replayCli(e.servers, ["--from", "start"]);
    assert.equal(a.caught_up, true);
    for (const g of stageGroups(p, findOperator)) {
      assert.equal(a.plan.reread[g.name], (await e.nats.jsm.streams.info(g.inputStream)).state.messages, `${g.name} read its whole stream again`);
    }
    assert.equal(a.labels.published, 0, "no label published again");
    await quiescent(p, e.nats, "replay (a) to settle");
    assertSame(await snapshot(p, e.nats, e.redis), golden, "(a) whole-pipeline replay");

    // (b) One stage from the middle of its stream.
    const mid = Math.floor((await e.nats.jsm.streams.info(streamName(p, "x_sessionize"))).state.last_seq / 2);
    const b = await replayCli(e.servers, ["--stage", "sessionize", "--from", String(mid)]);
    assert.deepEqual(b.plan.groups, ["sessionize"]);
    assert.ok(b.reread > 100 && b.reread < a.plan.reread.sessionize!, `about half of sessionize's input is read again (${b.reread})`);
    await quiescent(p, e.nats, "replay (b) to settle");
    assertSame(await snapshot(p, e.nats, e.redis), golden, "(b) one stage from the middle");

    // (c) Redis state lost: wipe it and rebuild every stage from the start of its stream.
    await e.redis.flushall();
    const c = await replayCli(e.servers, ["--rebuild"]);
    assert.equal(c.caught_up, true);
    assert.ok((c.seeded_labels ?? 0) >= new Set([...golden.labels.keys()].map((k) => k.split(":")[0])).size, "the label registry was re-filled from the label stream");
    await quiescent(p, e.nats, "rebuild (c) to settle");
    assertSame(await snapshot(p, e.nats, e.redis), golden, "(c) rebuild after Redis loss");

    // (e) A label rule fixed after the fact: workers restarted with the fix, then label-derive
    // rebuilt. It must end as a run of the fixed rule from the start, re-publishing only the
    // labels that changed, and leave every other group's state and output as it was.
    const fix = [`stages.label-derive.config.rules_file=${fixedRules()}`];
    await worker.stop();
    const pf = load(e.servers, ["streams.duplicate_window=1s", ...fix]);
    await startWorker(e, pf);
    const ld = stateOf.get("label-derive")!;
    const before = await stateDump(pf, e.redis);
    const untouched = (d: Map<string, string>) => new Map([...d].filter(([k]) => !ld.some((m) => m.re.test(k)) && !keep.test(k)));
    const r = await replayCli(e.servers, ["--rebuild", "--stage", "label-derive"], fix);
    assert.deepEqual([r.plan.groups, r.caught_up], [["label-derive"], true]);
    assert.equal(r.wiped_keys, [...before.keys()].filter((k) => ld.some((m) => m.re.test(k))).length, "(e) wiped: label-derive's keys");
    await quiescent(pf, e.nats, "the label-derive rebuild to settle");
    const rebuilt = await snapshot(pf, e.nats, e.redis);
    assert.deepEqual(untouched(await stateDump(pf, e.redis)), untouched(before), "(e) the other groups' state is untouched");
    assert.deepEqual(rebuilt.counts, golden.counts, "(e) no event, session, late, bot record or dead letter again");
    const expected = await withEnv(async (g) => (await goldenRun(g, load(g.servers, ["streams.duplicate_window=1s", ...fix]), lines)).snap);
    assert.equal(rebuilt.features.size, expected.features.size, "(e) feature hashes");
    for (const [k, v] of expected.features) assert.deepEqual(rebuilt.features.get(k), v, `(e) features of ${k} as with the fixed rule from the start`);
    const [was, now, want] = [latest(golden), latest(rebuilt), latest(expected)];
    const revs = (snap: Snapshot, id: string) => [...snap.labels.keys()].filter((k) => k.startsWith(`${id}:`)).sort();
    let changed = 0;
    for (const id of new Set([...was.keys(), ...now.keys(), ...want.keys()])) {
      if (want.has(id)) assert.equal(now.get(id), want.get(id), `(e) label ${id} ends as with the fixed rule from the start`);
      // A label the fixed rule no longer makes is not taken back (only a bot flag retracts labels):
      // like an unchanged one, it is not published again.
      if (!want.has(id) || was.get(id) === want.get(id)) assert.deepEqual(revs(rebuilt, id), revs(golden, id), `(e) label ${id} is not published again`);
      else changed++;
    }
    assert.equal(r.labels.distinct_labels, changed, "(e) the rebuild published the changed labels, and only them");
    const accepts = [...now.values()].filter((c) => c.includes('"rule":"accept"'));
    assert.ok(changed > 10 && accepts.length > 10 && accepts.every((c) => c.includes(`"rule_version":${ACCEPT_VERSION + 1}`)), `(e) the accept labels changed (${changed} labels changed, ${accepts.length} accept labels)`);
  });
});

test("golden: two workers, one SIGKILLed three times at random points, end with the golden labels and features", { timeout: 180_000 }, async () => {
  const rnd = new Random(SEED);
  const { lines, golden } = await goldenOutput();
  await withEnv(async (e) => {
    // With a commit interval (the golden run commits every batch): a SIGKILL also loses batches
    // that were processed and published but held uncommitted, which the next owner runs again.
    const held = ["runtime.commit_interval=400ms"];
    const p = load(e.servers, held);
    await deploy(p, e.nats);
    const env = { ...envOf(e.servers), TACIT_LOG_LEVEL: "warn" };
    const run = (args: string[]) => spawnTacit(["run", PIPELINE, ...setArgs(held), "--metrics-port", "0", ...args], { ...env, TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
    // A reads everything; B only the keyed stages. Enrich stays on one consumer so the partitions'
    // stream order — which event-time decisions depend on — is the golden run's order.
    const keyed = stageGroups(p, findOperator).filter((g) => g.keyed).map((g) => g.name);
    const a = run([]);
    let b: TacitProcess = run(["--stage", ...keyed]);
    e.cleanup(() => {
      for (const x of [a, b]) if (x.running()) x.child.kill("SIGKILL");
    });
    await publishLines(p, e.nats.js, lines, { idPrefix: "day" });
    const labelsStream = streamName(p, "labels");
    const total = golden.labelMessages;
    for (let k = 0; k < 3; k++) {
      // Kill at a random point of the label output, spread over the run.
      const at = Math.floor(total * (k / 3 + rnd.float() / 4));
      await eventually(`${at} labels before kill ${k + 1}`, async () => (await e.nats.jsm.streams.info(labelsStream)).state.messages >= at, 120_000, 20);
      b.child.kill("SIGKILL");
      await b.exited();
      b = run(["--stage", ...keyed]);
    }
    await quiescent(p, e.nats, "both workers to finish", 150_000);
    const snap = await snapshot(p, e.nats, e.redis);
    a.child.kill("SIGTERM");
    b.child.kill("SIGTERM");
    assert.equal(await a.exited(), 0, a.stderr());
    assert.equal(await b.exited(), 0, b.stderr());
    assertSame(snap, golden, "(d) SIGKILL ×3");
  });
});

test("golden: events dead-lettered by a too strict config, redriven after the fix, are labelled exactly once", { timeout: 180_000 }, async () => {
  const { lines, golden } = await goldenOutput();
  await withEnv(async (e) => {
    // A bad deploy: enrich rejects every event older than a minute (the whole day).
    const strict = load(e.servers, ["stages.enrich.config.max_past_age=1m"]);
    await deploy(strict, e.nats);
    await publishLines(strict, e.nats.js, lines, { idPrefix: "day" });
    const w1 = await startWorker(e, strict);
    await quiescent(strict, e.nats, "the strict run to dead-letter the day");
    await w1.stop();
    const dlq = await readStream(e.nats, streamName(strict, "dlq"));
    const stale = dlq.filter((m) => m.headers["Tacit-Reason"] === "bad_timestamp").length;
    assert.ok(stale > lines.length * 0.9, `the day is dead-lettered as bad_timestamp (${stale})`);
    assert.equal((await e.nats.jsm.streams.info(streamName(strict, "labels"))).state.messages, 0);

    // The fix: the default max_past_age, workers restarted with it, then the redrive.
    const fixed = load(e.servers);
    await startWorker(e, fixed);
    const dlqCli = (args: string[]) => cliJson<{ redriven: number }>(e.servers, ["dlq", PIPELINE, ...setArgs(), ...args]);
    assert.equal((await dlqCli(["redrive", "--stage", "enrich", "--reason", "bad_timestamp", "--yes"])).redriven, stale);
    await quiescent(fixed, e.nats, "the redriven day to be processed");
    // A second redrive finds nothing: redriven letters left the DLQ.
    assert.equal((await dlqCli(["redrive", "--reason", "bad_timestamp", "--yes"])).redriven, 0);
    const snap = await snapshot(fixed, e.nats, e.redis);
    // Everything but the DLQ equals the golden run: the malformed lines stay dead letters.
    assert.equal(snap.counts.dlq, golden.counts.dlq, "only the truly malformed lines remain in the DLQ");
    assertSame(snap, golden, "redrive after a config fix");
  });
});

test("golden: Redis SIGKILLed mid-stream and restarted from its AOF: the workers wait, then end with the golden labels and features", { timeout: 180_000 }, async (t) => {
  const { lines, golden } = await goldenOutput();
  await withEnv(async (e) => {
    const p = load(e.servers);
    await deploy(p, e.nats);
    await startWorker(e, p);
    await publishLines(p, e.nats.js, lines, { idPrefix: "day" });
    const labelsStream = streamName(p, "labels");
    await eventually("a third of the labels", async () => (await e.nats.jsm.streams.info(labelsStream)).state.messages >= golden.labelMessages / 3, 120_000, 20);
    // A crash, not a shutdown: no final AOF flush beyond what the server already wrote.
    await e.servers.stopRedis({ hard: true });
    const during = (await e.nats.jsm.streams.info(labelsStream)).state.messages;
    await new Promise((r) => setTimeout(r, 3_000));
    const down = Date.now();
    await e.servers.restartRedis();
    await quiescent(p, e.nats, "the run to finish after the restart");
    t.diagnostic(`labels at the kill: ${during}/${golden.labelMessages}; finished ${((Date.now() - down) / 1000).toFixed(1)} s after Redis came back`);
    assertSame(await snapshot(p, e.nats, e.redis), golden, "Redis restart from AOF");
  });
});

/*
 * Redis Cluster with replicas, a master SIGKILLed mid-stream and its replica promoted. Redis
 * replicates asynchronously; each keyed commit waits for its writes to reach a replica
 * (`redis.replica_wait`, on by default) before its input is acked. The victim's replica is
 * paused (SIGSTOP) for 1.5 s before the kill, so the failover also meets commits whose WAIT timed
 * out (retried, never acked). Then, for ~2-4 s, every slot answers CLUSTERDOWN: enrich's context
 * lookups fail, and every partition's 2 s lease runs out and is taken again. The run must end
 * with the golden output: every event once, the same labels (none twice), features, sessions,
 * late events and bot records. (A SIGKILLed master still hands what it wrote to its sockets to
 * the replica, so on loopback a kill alone loses nothing to asynchrony even without the WAIT;
 * test/redis-state.test.ts shows the WAIT itself.)
 */
test("golden on Redis Cluster with replicas: a master SIGKILLed mid-stream while its replica lags, the replica is promoted; the run ends with the golden labels and features", { timeout: 240_000 }, async (t) => {
  const { lines, golden } = await goldenOutput();
  await withEnv(async (e) => {
    const cluster = await startRedisCluster(mkdtempSync(join(tmpdir(), "tacit-rcluster-")));
    e.cleanup(() => cluster.stop());
    const env = { ...envOf(e.servers), REDIS_URL: cluster.url };
    const p = loadPipelineOrThrow(PIPELINE, { env, set: SETS, operators: findOperator });
    assert.equal(p.redis.replica_wait_ms, 1000, "commits wait for a replica by default");
    await deploy(p, e.nats);
    const worker = spawnTacit(["run", PIPELINE, ...setArgs(), "--metrics-port", "0"], { ...env, TACIT_LOG_LEVEL: "warn", TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
    e.cleanup(() => void (worker.running() && worker.child.kill("SIGKILL")));
    const started = Date.now();
    await publishLines(p, e.nats.js, lines, { idPrefix: "day" });
    // Killed while enrich still reads the input (its context lookups fail too) and the keyed stages commit.
    const labelsStream = streamName(p, "labels");
    await eventually("a third of the labels", async () => (await e.nats.jsm.streams.info(labelsStream)).state.messages >= golden.labelMessages / 3, 120_000, 20);
    const before = await cluster.masters();
    const victim = cluster.nodes.find((n) => n.port === before[0])!;
    const replica = cluster.nodes.find((n) => n.port === cluster.replicaOf(victim.port))!;
    const atKill = (await e.nats.jsm.streams.info(labelsStream)).state.messages;
    replica.proc.child.kill("SIGSTOP");
    e.cleanup(() => replica.proc.child.kill("SIGCONT"));
    await new Promise((r) => setTimeout(r, 1_500));
    await victim.proc.stop({ hard: true });
    const killed = Date.now();
    replica.proc.child.kill("SIGCONT");
    await eventually("the replica to be promoted", async () => {
      const now = await cluster.masters();
      return now.length === 3 && now.includes(replica.port);
    }, 30_000, 100);
    const promoted = Date.now();
    await quiescent(p, e.nats, "the run to finish after the failover", 150_000);
    const finished = Date.now();
    assert.ok(worker.running(), worker.stderr());
    const live = cluster.nodes.filter((n) => n.proc.running()).map((n) => ({ host: "127.0.0.1", port: n.port }));
    const client = new Cluster(live);
    e.cleanup(() => client.disconnect());
    await eventually("the cluster client", async () => client.status === "ready", 10_000);
    const snap = await snapshot(p, e.nats, client);
    t.diagnostic(`labels when the replica was paused: ${atKill}/${golden.labelMessages}; replica promoted ${((promoted - killed) / 1000).toFixed(1)} s after the kill; run finished ${((finished - killed) / 1000).toFixed(1)} s after it (${((finished - started) / 1000).toFixed(1)} s in all)`);
    try {
      assertSame(snap, golden, "Redis Cluster failover");
    } catch (err) {
      (err as Error).message += `\nworker log: ${worker.stderr().slice(-1500)}`;
      throw err;
    }
    worker.child.kill("SIGTERM");
    assert.equal(await worker.exited(), 0, worker.stderr());
  });
});

// Replay: the published-label registry and what a per-stage rebuild wipes (unit), and against
// real nats-server and redis-server on the small enrich → dedupe pipeline: the pause that running
// workers obey, replays older than the duplicate window, time → sequence resolution, a rebuild
// (whole and of one stage) that really re-applies state, and the command line's usage errors.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { Redis } from "ioredis";
import { startServers, type TestServers } from "./harness.js";
import { consumersDrained, eventually, readStream } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { ConfigError, TacitError } from "../src/core/errors.js";
import { partitionKey, pipelineKey, userKey } from "../src/core/state.js";
import { indexKey, responseFeaturesKey, sessionFeaturesKey, userFeaturesKey } from "../src/labels/features.js";
import { controlAcksKey, controlKey, controlWorkersKey, pauseGroups, readControl, resumeGroups } from "../src/runtime/control.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { decideLabel, fenceField, fencesKey, labelContentHash, publishedKey, seedLabel, type PublishedLabel } from "../src/runtime/label-registry.js";
import {
  executeReplay,
  groupState,
  keptByRebuild,
  parseReplayPoint,
  planReplay,
  selectGroups,
  seqAtTime,
  stateMatcher,
  versionAtLeast,
  wipeState,
  type StateMatcher,
} from "../src/runtime/replay.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";

const ROOT = projectRoot();
/** The default pipeline fuses its keyed stages into one group; these tests look at one group per stage. */
const UNFUSED = ["bot-score", "sessionize", "reformulation", "label-derive"].map((s) => `stages.${s}.fuse_with_previous=false`);
const PIPELINE = join(ROOT, "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:replay-test-secret-0123456789abcdef";
const silent = { debug() {}, info() {}, warn() {}, error() {} };

// --- the published-label registry ----------------------------------------------------------------

/** Runs operator emissions (revision, content) through the registry; returns what was published. */
function publishAll(reg: PublishedLabel | undefined, emits: [number, string][]): { reg: PublishedLabel | undefined; published: { k: number; r: number; x: string }[]; silent: number } {
  const published: { k: number; r: number; x: string }[] = [];
  let silent = 0;
  for (const [k, x] of emits) {
    const d = decideLabel(reg, k, x);
    if (d.publishAt !== undefined) published.push({ k, r: d.publishAt, x });
    else if (d.next !== reg) silent++; // the registry changed without a message: the stream cannot show it
    reg = d.next;
  }
  return { reg, published, silent };
}

test("registry: the same computation again publishes nothing; a changed one continues the revisions", () => {
  const first = publishAll(undefined, [[0, "a"], [1, "b"], [2, "c"]]);
  assert.deepEqual(first.published.map((p) => p.r), [0, 1, 2]);
  // A redelivery, a replay, a rebuild with the same rules: nothing.
  assert.deepEqual(publishAll(first.reg, [[0, "a"], [1, "b"], [2, "c"]]).published, []);
  assert.deepEqual(publishAll(first.reg, [[1, "b"]]).published, []);
  // A rebuild after a rule fix: the history differs from revision 1 on. The new versions are
  // published after everything already published; consumers end with the new final version.
  const fixed = publishAll(first.reg, [[0, "a"], [1, "B"], [2, "c"]]);
  assert.deepEqual(fixed.published, [{ k: 1, r: 3, x: "B" }, { k: 2, r: 4, x: "c" }]);
  // The same fixed computation once more: nothing.
  assert.deepEqual(publishAll(fixed.reg, [[0, "a"], [1, "B"], [2, "c"]]).published, []);
  // Live processing after the fix goes on from the last published revision.
  assert.deepEqual(publishAll(fixed.reg, [[3, "d"]]).published, [{ k: 3, r: 5, x: "d" }]);
});

test("registry: a version equal to what consumers already hold is not published", () => {
  const first = publishAll(undefined, [[0, "a"], [1, "b"]]);
  // Recomputed as [a, x, b]: x is new (revision 2), then b again must be re-published (3) since x superseded it.
  const re = publishAll(first.reg, [[0, "a"], [1, "x"], [2, "b"]]);
  assert.deepEqual(re.published.map((p) => [p.r, p.x]), [[2, "x"], [3, "b"]]);
  // An operator that re-emits unchanged content under a new revision publishes nothing.
  assert.deepEqual(publishAll(first.reg, [[2, "b"]]).published, []);
});

test("registry (property): revisions only grow, no (label, revision) is published twice, the last published is the last computed, and seeding from the stream gives the same registry", () => {
  const run = fc.array(fc.array(fc.constantFrom("a", "b", "c", "d"), { minLength: 1, maxLength: 5 }), { minLength: 1, maxLength: 4 });
  fc.assert(
    fc.property(run, (computations) => {
      let reg: PublishedLabel | undefined;
      let previous: [number, string][] | undefined;
      let silentTotal = 0;
      const stream: { k: number; r: number; x: string }[] = [];
      for (const versions of computations) {
        // Consecutive identical versions are not re-emitted by an operator (nothing changed).
        const emits = versions.filter((x, i) => i === 0 || versions[i - 1] !== x).map((x, k) => [k, x] as [number, string]);
        const out = publishAll(reg, emits);
        silentTotal += out.silent;
        reg = out.reg;
        stream.push(...out.published);
        const revs = stream.map((p) => p.r);
        assert.deepEqual(revs, [...revs].sort((a, b) => a - b), "revisions grow");
        assert.equal(new Set(revs).size, revs.length, "no revision twice");
        // Known limit (documented in decideLabel): a recomputation that repeats the start of
        // the previous one and stops early cannot be told from a replay that is not finished.
        const prefix = previous !== undefined && emits.length < previous.length && emits.every(([, x], k) => previous![k]![1] === x);
        if (!prefix) assert.equal(stream[stream.length - 1]!.x, emits[emits.length - 1]![1], "consumers end with the last computed version");
        previous = emits;
      }
      let seeded: PublishedLabel | undefined;
      for (const m of stream) seeded = seedLabel(seeded, m.k, m.r, m.x);
      assert.equal(seeded!.R, reg!.R);
      assert.equal(seeded!.H, reg!.H);
      // After a Redis loss, recomputing the last computation publishes nothing that consumers
      // do not hold already: at most its final version again, never an older one.
      // Seeded from the stream, the registry lets a recomputation of the last computation
      // through silently — unless a version was once skipped without a message (documented).
      if (silentTotal === 0) assert.deepEqual(publishAll(seeded, previous!).published, []);
    }),
    { numRuns: 300, seed: 7 },
  );
});

test("label content hash ignores revision, emitted_at and key order, and sees every other field", () => {
  const l = { label_id: "L", revision: 0, weight: 1.5, signals: [{ event_id: "e", event_type: "accept" }], emitted_at: "2026-01-01T00:00:00Z" };
  const same = { emitted_at: "2027-01-01T00:00:00Z", signals: [{ event_type: "accept", event_id: "e" }], weight: 1.5, revision: 4, label_id: "L" };
  assert.equal(labelContentHash(l), labelContentHash(same));
  assert.notEqual(labelContentHash(l), labelContentHash({ ...l, weight: 1.6 }));
  assert.notEqual(labelContentHash(l), labelContentHash({ ...l, signals: [] }));
});

test("replay points, versions, groups and what a rebuild keeps", () => {
  assert.deepEqual(parseReplayPoint("1042", "--from"), { kind: "seq", seq: 1042 });
  assert.deepEqual(parseReplayPoint("start", "--from"), { kind: "start" });
  assert.deepEqual(parseReplayPoint("2026-01-01T09:30:00Z", "--to"), { kind: "time", ms: Date.UTC(2026, 0, 1, 9, 30) });
  for (const bad of ["yesterday", "0", "2026-01-01", "start"]) assert.throws(() => parseReplayPoint(bad, "--to"), ConfigError, bad);
  assert.ok(versionAtLeast("2.14.0", "2.14.0") && versionAtLeast("2.14.1-beta", "2.14.0") && versionAtLeast("3.0.0", "2.14.0"));
  assert.ok(!versionAtLeast("2.9.10", "2.14.0") && !versionAtLeast("2.13.99", "2.14.0"));
  const keep = keptByRebuild("feedback");
  assert.ok(keep.test(userKey("feedback", "U1", "context")));
  assert.ok(keep.test(userKey("feedback", "U1", "published", "lbl-x")));
  assert.ok(!keep.test(userKey("feedback", "U1", "dedupe", "seen", "e1")));
  assert.ok(!keep.test(userKey("feedback", "U1", "features", "user")));
  assert.ok(!keep.test(userKey("feedbackx", "U1", "context")));
  const p = loadPipelineOrThrow(join(ROOT, "pipelines", "feedback.yaml"), { env: {}, set: [...UNFUSED, "stages.bot-score.fuse_with_previous=true"], operators: findOperator });
  assert.deepEqual(selectGroups(p, findOperator, "dedupe").map((g) => g.stages.map((s) => s.name)), [["dedupe", "bot-score"]]);
  assert.throws(() => selectGroups(p, findOperator, "bot-score"), /fused into group dedupe.*--stage dedupe/);
  assert.throws(() => selectGroups(p, findOperator, "nope"), /unknown stage nope/);
});

// --- what a per-stage rebuild wipes --------------------------------------------------------------

const FEEDBACK = join(ROOT, "pipelines", "feedback.yaml");
const owns = (ms: StateMatcher[], key: string) => ms.some((m) => m.re.test(key));

/**
 * Keys of every kind the default pipeline writes, made with the functions that write them, by the
 * stage that owns them (`kept`: what every rebuild keeps; `pipeline`: pipeline-wide). Ids carry
 * colons and the tail of another stage's key, which a SCAN glob (`*` spans anything) would take.
 */
function keysOfFeedback(prefix: string): Record<string, string[]> {
  const u = "Ab3_-xYz9";
  const trap = "e:1}:features:user";
  const stage = (name: string, ...parts: string[]) => userKey(prefix, u, name, ...parts);
  return {
    kept: [userKey(prefix, u, "context"), publishedKey(prefix, u, "lbl:1}:label-derive:state"), publishedKey(prefix, u, trap)],
    pipeline: [pipelineKey(prefix, "fences"), controlKey(prefix, "label-derive"), controlAcksKey(prefix, "label-derive"), controlWorkersKey(prefix, "label-derive"), pipelineKey(prefix, "lease", "label-derive", 3), pipelineKey(prefix, "workers", "label-derive")],
    dedupe: [stage("dedupe", "state"), partitionKey(prefix, "dedupe", 0, "wm")],
    "bot-score": [stage("bot-score", "state"), partitionKey(prefix, "bot-score", 7, "wm")],
    sessionize: [stage("sessionize", "state"), partitionKey(prefix, "sessionize", 2, "timers"), partitionKey(prefix, "sessionize", 2, "wm")],
    reformulation: [stage("reformulation", "state"), partitionKey(prefix, "reformulation", 1, "wm")],
    "label-derive": [
      stage("label-derive", "state"),
      userFeaturesKey(prefix, u),
      responseFeaturesKey(prefix, u, "r:1"),
      sessionFeaturesKey(prefix, u, "s:1"),
      indexKey(prefix, "response", "r:1"),
      indexKey(prefix, "session", "s:1"),
      partitionKey(prefix, "label-derive", 5, "timers"),
      partitionKey(prefix, "label-derive", 5, "wm"),
    ],
  };
}

test("a per-stage rebuild wipes exactly its group's documented state and partition marks; state shared with another group is refused", () => {
  assert.equal(stateMatcher("tacit:{<prefix>:u:<user>}:<stage>:seen:<event_id>", "feedback", "dedupe")?.glob, "tacit:{feedback:u:*}:dedupe:seen:*");
  assert.equal(stateMatcher("tacit:{<p>:p:<stage>:<partition>}:timers", "feedback", "sessionize")?.glob, "tacit:{feedback:p:sessionize:*}:timers");
  const ix = stateMatcher("tacit:{<prefix>:ix:response|session:<id>}:user", "feedback", "label-derive")!;
  assert.equal(ix.key, "tacit:{feedback:ix:response|session:<id>}:user");
  assert.ok(ix.re.test("tacit:{feedback:ix:session:s1}:user") && !ix.re.test("tacit:{feedback:ix:query:s1}:user"));
  assert.ok(!stateMatcher("tacit:{<p>:p:<stage>:<partition>}:timers", "feedback", "sessionize")!.re.test(partitionKey("feedback", "sessionize-b", 1, "timers")));
  assert.equal(stateMatcher("tacit:{other}:x", "feedback", "s"), undefined, "never outside the pipeline's namespace");
  assert.equal(stateMatcher("tacit:{<prefix>}:fences", "feedback", "s"), undefined, "never a pipeline-wide key");

  const full = loadPipelineOrThrow(FEEDBACK, { env: {}, set: UNFUSED, operators: findOperator });
  const keys = keysOfFeedback(full.subject_prefix);
  const groups = stageGroups(full, findOperator);
  for (const g of groups) {
    const ms = groupState(full, g, findOperator);
    for (const [owner, ks] of Object.entries(keys)) {
      for (const k of ks) assert.equal(owns(ms, k), owner === g.name, `${g.name} ${owner === g.name ? "wipes" : "leaves"} ${k}`);
    }
  }
  // The glob alone would take another stage's key whose id carries the tail of one of ours.
  const ld = groupState(full, groups.find((g) => g.name === "label-derive")!, findOperator);
  assert.ok(ld.some((m) => m.glob === "tacit:{feedback:u:*}:features:user"));

  // Two label-derive stages write the same features: a rebuild of one alone would lose the
  // other's part. Stages whose keys name them (two sessionizes) share nothing.
  const twice = (op: string) => ({ ...full, stages: [...full.stages, { ...full.stages.find((s) => s.operator === op)!, name: `${op}-b` }] });
  const two = twice("label-derive");
  for (const g of stageGroups(two, findOperator).filter((x) => x.name.startsWith("label-derive"))) {
    assert.throws(() => groupState(two, g, findOperator), (err: unknown) => err instanceof ConfigError && /shared with group label-derive.*features.*without --stage/.test(err.message), g.name);
  }
  const s2 = twice("sessionize");
  for (const g of stageGroups(s2, findOperator)) assert.doesNotThrow(() => groupState(s2, g, findOperator), g.name);
});

// --- against real servers ----------------------------------------------------------------------

interface Env {
  servers: TestServers;
  nats: NatsHandles;
  redis: Redis;
  cleanup(fn: () => unknown): void;
}

async function withEnv(fn: (e: Env) => Promise<void>): Promise<void> {
  const servers = await startServers();
  const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "replay-test");
  const redis = new Redis(servers.redisUrl);
  const cleanups: (() => unknown)[] = [];
  try {
    await fn({ servers, nats, redis, cleanup: (f) => cleanups.push(f) });
  } finally {
    for (const f of cleanups.reverse()) await Promise.resolve(f()).catch(() => undefined);
    redis.disconnect();
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  }
}

function envOf(s: TestServers, name: string): Record<string, string> {
  return { NATS_URL: s.natsUrl, REDIS_URL: s.redisUrl, TEST_PIPELINE: name, TACIT_PSEUDONYM_KEY: KEY };
}

async function setup(e: Env, name: string, set: string[] = []): Promise<Pipeline> {
  const p = loadPipelineOrThrow(PIPELINE, { env: envOf(e.servers, name), set, operators: findOperator });
  await applyDeploy(p, e.nats.jsm, findOperator, await planDeploy(p, e.nats.jsm, findOperator));
  return p;
}

async function startWorker(e: Env, p: Pipeline, name: string): Promise<Worker> {
  const redis = new Redis(e.servers.redisUrl);
  const w = new Worker({ pipeline: p, operators: findOperator, log: silent, env: envOf(e.servers, name), redis, nats: e.nats });
  e.cleanup(() => redis.disconnect());
  e.cleanup(() => w.stop());
  await w.start();
  return w;
}

const streamsOf = (p: Pipeline) => stageGroups(p, findOperator).map((g) => g.inputStream);
const count = async (e: Env, p: Pipeline, s: string) => (await e.nats.jsm.streams.info(streamName(p, s))).state.messages;

async function drained(e: Env, p: Pipeline): Promise<void> {
  let streak = 0;
  await eventually("the pipeline to drain", async () => {
    streak = (await consumersDrained(e.nats, streamsOf(p))) ? streak + 1 : 0;
    return streak >= 2;
  }, 60_000, 100);
}

/** Event ids in the cleaned-events stream, with how often each occurs. */
async function eventIds(e: Env, p: Pipeline): Promise<Map<string, number>> {
  const ids = new Map<string, number>();
  for (const m of await readStream(e.nats, streamName(p, "events"))) {
    const id = (JSON.parse(m.data) as { event: { event_id: string } }).event.event_id;
    ids.set(id, (ids.get(id) ?? 0) + 1);
  }
  return ids;
}

/** Every key under a glob (SCAN). */
async function scanKeys(redis: Redis, glob: string): Promise<string[]> {
  const out: string[] = [];
  let cursor = "0";
  do {
    const [next, keys] = await redis.scan(cursor, "MATCH", glob, "COUNT", 1000);
    cursor = next;
    out.push(...keys);
  } while (cursor !== "0");
  return out.sort();
}

test("wipeState on redis-server: a group's state goes, every other key of the pipeline and other pipelines' keys stay", { timeout: 30_000 }, async () => {
  await withEnv(async (e) => {
    const full = loadPipelineOrThrow(FEEDBACK, { env: {}, set: UNFUSED, operators: findOperator });
    const mine = keysOfFeedback(full.subject_prefix);
    const other = Object.values(keysOfFeedback("feedback-b")).flat();
    for (const k of [...Object.values(mine).flat(), ...other]) await e.redis.set(k, "1");
    const ld = groupState(full, stageGroups(full, findOperator).find((g) => g.name === "label-derive")!, findOperator);
    assert.equal(await wipeState(e.redis, full.subject_prefix, ld), mine["label-derive"]!.length);
    const left = Object.entries(mine).filter(([owner]) => owner !== "label-derive").flatMap(([, ks]) => ks);
    assert.deepEqual(await scanKeys(e.redis, "*"), [...left, ...other].sort());
  });
});

test("pause: running workers stop consuming and acknowledge; a worker started meanwhile waits; resume restarts them; an unresponsive worker is named", { timeout: 90_000 }, async () => {
  await withEnv(async (e) => {
    const p = await setup(e, "pause");
    const groups = stageGroups(p, findOperator).map((g) => g.name);
    const w1 = await startWorker(e, p, "pause");
    await publishLines(p, e.nats.js, [...benchEvents(500, 20, Date.now() - 3_600_000)], { idPrefix: "a" });
    await drained(e, p);
    assert.equal(await count(e, p, "events"), 500);

    const t0 = Date.now();
    const paused = await pauseGroups(e.redis, p.subject_prefix, groups, { reason: "test", by: "replay.test", timeoutMs: 20_000 });
    assert.ok(Date.now() - t0 < 8_000, `paused quickly (${Date.now() - t0} ms)`);
    for (const g of groups) assert.deepEqual(paused.workers[g], [w1.id], `${g}: the live worker acknowledged`);
    assert.deepEqual(w1.ownedPartitions().dedupe, [], "the keyed group gave its partitions up");
    const w2 = await startWorker(e, p, "pause");
    await publishLines(p, e.nats.js, [...benchEvents(300, 20, Date.now() - 1_800_000)].map((l) => l.replace(/"b(\d+)"/, '"c$1"')), { idPrefix: "b" });
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(await count(e, p, "events"), 500, "nothing is consumed while paused, by either worker");
    assert.deepEqual(w2.ownedPartitions().dedupe, []);

    await resumeGroups(e.redis, p.subject_prefix, groups);
    await eventually("both workers to consume again", async () => (await count(e, p, "events")) === 800, 30_000);
    assert.equal((await readControl(e.redis, p.subject_prefix, "dedupe")).paused, false);

    // A worker that heartbeats but never pauses (stuck, or an old version): the pause gives up,
    // names it, and leaves the pipeline running.
    await e.redis.zadd(controlWorkersKey(p.subject_prefix, "dedupe"), Date.now() + 60_000, "stuck-worker-1");
    await assert.rejects(
      pauseGroups(e.redis, p.subject_prefix, groups, { reason: "test", by: "replay.test", timeoutMs: 4000 }),
      (err: unknown) => err instanceof TacitError && err.code === "pause_timeout" && /dedupe: stuck-worker-1/.test(err.message) && !/enrich:/.test(err.message),
    );
    for (const g of groups) assert.equal(await e.redis.hget(controlKey(p.subject_prefix, g), "paused"), "0", `${g} resumed after the timeout`);
  });
});

test("replaying the whole pipeline past the duplicate window repeats nothing; a rebuild re-applies state (duplicates are still caught); --from a time starts at the right message", { timeout: 120_000 }, async () => {
  await withEnv(async (e) => {
    const p = await setup(e, "rp", ["streams.duplicate_window=1s"]);
    await startWorker(e, p, "rp");
    const USERS = 60;
    const lines = [...benchEvents(3000, USERS, Date.now() - 3_600_000)];
    await publishLines(p, e.nats.js, lines.slice(0, 1500), { idPrefix: "a" });
    await drained(e, p);
    const middle = Date.now();
    await new Promise((r) => setTimeout(r, 50));
    await publishLines(p, e.nats.js, lines.slice(1500), { idPrefix: "b" });
    await drained(e, p);
    await new Promise((r) => setTimeout(r, 1200)); // older than the duplicate window
    const input = streamName(p, "in");
    assert.equal(await seqAtTime(e.nats, input, middle), 1501, "the first message stored at or after the time");
    assert.equal(await seqAtTime(e.nats, input, Date.now() + 60_000), 3001, "after the last message: nothing to read");

    const dry = await planReplay(p, e.nats, e.redis, findOperator, { from: { kind: "time", ms: middle } });
    assert.equal(dry.reread.enrich, 1500);
    assert.equal(dry.reread.dedupe, 1500, "dedupe's partitions hold the second half from that time on");
    assert.equal(await count(e, p, "events"), 3000, "a dry run changes nothing");

    const r = await executeReplay(p, e.nats, e.redis, findOperator, { from: { kind: "start" } }, { waitMs: 60_000 });
    assert.equal(r.caught_up, true);
    assert.equal(r.reread, 6000);
    assert.deepEqual(Object.values(r.new_messages).filter((n) => n > 0), [], "no stream got a message");
    await drained(e, p);
    const ids = await eventIds(e, p);
    assert.equal(ids.size, 3000);
    assert.ok([...ids.values()].every((n) => n === 1), "no event output twice");

    // Redis lost: dedupe's claims are gone. The rebuild reads everything again and claims anew…
    await e.redis.flushall();
    const rb = await executeReplay(p, e.nats, e.redis, findOperator, { rebuild: true }, { waitMs: 60_000 });
    assert.equal(rb.caught_up, true);
    await drained(e, p);
    assert.equal(await count(e, p, "events"), 3000, "the rebuild published nothing again");
    // …so a producer's re-send after the rebuild is still recognised as a duplicate.
    await publishLines(p, e.nats.js, lines.slice(0, 100), { idPrefix: "resend" });
    await drained(e, p);
    assert.equal(await count(e, p, "events"), 3000, "re-sent events are dropped by the rebuilt dedupe state");

    // Only dedupe rebuilt: its per-user state (the ids it has seen) is wiped and made again, the
    // same; enrich's context, the label registry and enrich's fence stay, and dedupe is resumed.
    const values = async (ks: string[]) => new Map(await Promise.all(ks.map(async (k) => [k, (await e.redis.type(k)) === "hash" ? JSON.stringify(await e.redis.hgetall(k)) : await e.redis.get(k)] as const)));
    const prefix = p.subject_prefix;
    await e.redis.hset(userKey(prefix, "U1", "context"), { cohort: "a" });
    await e.redis.set(publishedKey(prefix, "U1", "lbl-1"), JSON.stringify({ R: 0, H: "h", off: 0, h: { 0: "h" } }));
    const claims = await scanKeys(e.redis, `tacit:{${prefix}:u:*}:dedupe:state`);
    const kept = [userKey(prefix, "U1", "context"), publishedKey(prefix, "U1", "lbl-1")];
    const enrichFence = () => e.redis.hget(fencesKey(prefix), fenceField(streamName(p, "in"), "enrich"));
    const [claimsBefore, keptBefore, fenceBefore] = [await values(claims), await values(kept), await enrichFence()];
    assert.ok(fenceBefore);
    const marks = (await scanKeys(e.redis, `tacit:{${prefix}:p:dedupe:*`)).length;
    assert.ok(claims.length === USERS && marks === 4, `dedupe holds its users' state (${claims.length}) and partition marks (${marks})`);
    const st = await executeReplay(p, e.nats, e.redis, findOperator, { rebuild: true, stage: "dedupe" }, { waitMs: 60_000 });
    assert.deepEqual([st.plan.groups, st.reread, st.caught_up], [["dedupe"], 3100, true]);
    assert.equal(st.wiped_keys, claims.length + marks, "exactly dedupe's state and partition marks were wiped");
    await drained(e, p);
    assert.deepEqual(await values(await scanKeys(e.redis, `tacit:{${prefix}:u:*}:dedupe:state`)), claimsBefore, "the same state again");
    assert.deepEqual(await values(kept), keptBefore);
    assert.equal(await enrichFence(), fenceBefore);
    assert.equal((await readControl(e.redis, p.subject_prefix, "dedupe")).paused, false);
    assert.equal(await count(e, p, "events"), 3000, "the per-stage rebuild published nothing again");
  });
});

test("tacit replay: usage errors exit 2; --dry-run reports per durable; --resume clears a pause left by a dead replay", { timeout: 60_000 }, async () => {
  await withEnv(async (e) => {
    const p = await setup(e, "cli");
    await publishLines(p, e.nats.js, [...benchEvents(200, 10, Date.now() - 3_600_000)], { idPrefix: "a" });
    const w = await startWorker(e, p, "cli");
    await drained(e, p);
    await w.stop();
    const env = { ...envOf(e.servers, "cli"), TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) };
    const run = async (args: string[]) => {
      const r = spawnTacit(["replay", PIPELINE, ...args], env);
      const code = await new Promise<number | null>((res) => r.child.once("close", res));
      return { code, out: r.stdout(), err: r.stderr() };
    };
    for (const args of [[], ["--from", "start", "--rebuild"], ["--rebuild", "--to", "5"], ["--from", "yesterday"], ["--from", "start", "--stage", "nope"]]) {
      const r = await run(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.err}`);
      assert.match(r.err, /tacit: /);
    }
    const dry = await run(["--from", "1", "--dry-run"]);
    assert.equal(dry.code, 0, dry.err);
    assert.match(dry.out, /enrich: 200 messages to read again/);
    assert.match(dry.out, /dedupe: 200 messages to read again/);
    assert.match(dry.out, /0 live worker\(s\)/);
    const dryRebuild = await run(["--rebuild", "--stage", "dedupe", "--dry-run"]);
    assert.equal(dryRebuild.code, 0, dryRebuild.err);
    assert.match(dryRebuild.out, /^rebuild of cli from start/);
    assert.doesNotMatch(dryRebuild.out, /enrich:/);
    assert.match(dryRebuild.out, /wipes: tacit:\{cli:p:dedupe:<partition>\}:<key>, tacit:\{cli:u:<user>\}:dedupe:state \(keeps/);
    // Without --yes and without a terminal, a replay refuses.
    const noYes = await run(["--from", "start"]);
    assert.equal(noYes.code, 2);
    assert.match(noYes.err, /--yes/);

    await pauseGroups(e.redis, p.subject_prefix, ["dedupe"], { reason: "a replay that died", by: "host:1", timeoutMs: 1000 });
    const blocked = await run(["--from", "start", "--yes"]);
    assert.equal(blocked.code, 1);
    assert.match(blocked.err, /already paused \(a replay that died, by host:1/);
    const res = await run(["--resume", "--json"]);
    assert.equal(res.code, 0, res.err);
    assert.deepEqual(JSON.parse(res.out), { resumed: ["dedupe"] });
    assert.equal((await readControl(e.redis, p.subject_prefix, "dedupe")).paused, false);
  });
});

// The runtime's keyed state against real nats-server and redis-server: the in-memory cache is
// valid only while a worker holds a partition's lease. A partition that moves to another worker
// mid-stream continues from exactly the committed state (the end result equals one worker's), and
// a worker that lost a lease never writes its cached state over the new owner's.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Redis } from "ioredis";
import { startServers, type TestServers } from "./harness.js";
import { eventually } from "./support/streams.js";
import { assertSameResult, drained, snapshot } from "./support/pipeline-result.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { findOperator } from "../operators/index.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";
import { benchEvents } from "../src/bench/bench.js";
import { simulate } from "../src/sim/simulate.js";
import { pipelineKey } from "../src/core/state.js";
import { projectRoot } from "../src/config/paths.js";

const PIPELINE = join(projectRoot(), "pipelines", "feedback.yaml");
const KEY = "t1:keyed-state-test-secret-0123456789";
const silent = { debug() {}, info() {}, warn() {}, error() {} };

function env(servers: TestServers): Record<string, string> {
  return { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY };
}

function load(servers: TestServers, name: string, set: string[] = []): Pipeline {
  return loadPipelineOrThrow(PIPELINE, {
    env: env(servers),
    set: [`name=${name}`, `subject_prefix=${name}`, "partitions=4", "runtime.lease_ttl=2s", "runtime.ack_wait=10s", "runtime.batch_size=100", ...set],
    operators: findOperator,
  });
}

async function deploy(p: Pipeline, nats: NatsHandles): Promise<void> {
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
}

function worker(servers: TestServers, p: Pipeline, nats: NatsHandles, redis: Redis, id: string, groups?: string[]): Worker {
  return new Worker({ pipeline: p, operators: findOperator, log: silent, env: env(servers), redis, nats, workerId: id, ...(groups ? { groups } : {}) });
}

for (const interval of ["0ms", "400ms"]) {
test(`a partition that moves to another worker mid-stream continues from exactly the committed state: the result equals one worker's (commit_interval ${interval})`, { timeout: 240_000 }, async () => {
  const servers = await startServers();
  const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "test");
  const redis = new Redis(servers.redisUrl);
  try {
    // A simulated day: humans and bots, sessions, labels, duplicates, late and malformed events.
    const lines = simulate({ seed: 77, users: 80, durationMs: 2 * 3_600_000, startTime: Date.now() - 3 * 3_600_000 }).events;
    // The reference: one worker, every partition from start to end.
    const ref = load(servers, "ref");
    await deploy(ref, nats);
    await publishLines(ref, nats.js, lines, { idPrefix: "k" });
    // One enrich worker in each run, so both keyed streams hold the same events in the same order.
    const re = worker(servers, ref, nats, redis, "ref-enrich", ["enrich"]);
    const r = worker(servers, ref, nats, redis, "ref-1", ["dedupe"]);
    await re.start();
    await r.start();
    await eventually("the reference to finish", () => drained(ref, nats, lines.length), 120_000, 200);
    await r.stop();
    await re.stop();

    // The same events, while a second worker joins and then the first leaves: partitions move twice.
    // With a commit interval, partitions hold processed batches; handing one over commits them first.
    const mv = load(servers, "mv", [`runtime.commit_interval=${interval}`]);
    await deploy(mv, nats);
    const e = worker(servers, mv, nats, redis, "mv-enrich", ["enrich"]);
    await e.start();
    const a = worker(servers, mv, nats, redis, "mv-a", ["dedupe"]);
    await a.start();
    await publishLines(mv, nats.js, lines.slice(0, 1000), { idPrefix: "k0" });
    await eventually("worker a to process some events", async () => (await nats.jsm.streams.info(streamName(mv, "events"))).state.messages >= 300, 60_000, 50);
    const b = worker(servers, mv, nats, redis, "mv-b", ["dedupe"]);
    await b.start();
    const owners = async () => Promise.all([...Array(mv.partitions).keys()].map((n) => redis.get(pipelineKey(mv.subject_prefix, "lease", "dedupe", n))));
    await eventually("partitions to be shared by both workers", async () => new Set(await owners()).size === 2, 30_000, 100);
    await publishLines(mv, nats.js, lines.slice(1000, 2000), { idPrefix: "k1" });
    await a.stop();
    await eventually("worker b to own every partition", async () => (await owners()).every((o) => o === "mv-b"), 30_000, 100);
    await publishLines(mv, nats.js, lines.slice(2000), { idPrefix: "k2" });
    await eventually("the moved run to finish", () => drained(mv, nats, lines.length), 120_000, 200);
    await b.stop();
    await e.stop();

    const want = await snapshot(ref, nats, redis);
    const got = await snapshot(mv, nats, redis);
    assertSameResult(got, want, lines.length, 50, "one worker");
  } finally {
    redis.disconnect();
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  }
});
}

test("a worker that lost a partition's lease never writes its cached state over the new owner's", { timeout: 120_000 }, async () => {
  const servers = await startServers();
  const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "test");
  const redis = new Redis(servers.redisUrl);
  try {
    // Long lease and ack_wait: only the fenced commit can notice the takeover.
    const p = load(servers, "stale", ["runtime.lease_ttl=60s", "runtime.ack_wait=60s"]);
    await deploy(p, nats);
    const w = worker(servers, p, nats, redis, "stale-a");
    await w.start();
    const leaseKeys = [...Array(p.partitions).keys()].map((n) => pipelineKey(p.subject_prefix, "lease", "dedupe", n));
    const lines = [...benchEvents(800, 20, Date.now() - 3_600_000)];
    try {
      await eventually("the worker to hold every partition", async () => (await redis.mget(leaseKeys)).every((v) => v === w.id), 30_000);
      await publishLines(p, nats.js, lines.slice(0, 400), { idPrefix: "s0" });
      await eventually("the first half to be processed", () => drained(p, nats, 400), 60_000, 100);
      // The cache is warm now. Another owner takes every partition and writes its own state.
      const stateKeys = (await redis.keys(`tacit:{${p.subject_prefix}:u:*}:*:state`)).sort();
      assert.ok(stateKeys.length > 0, "keyed state was committed");
      for (const k of leaseKeys) await redis.set(k, "new-owner", "KEEPTTL");
      for (const k of stateKeys) await redis.set(k, "999999:written-by-the-new-owner");
      const progress = await Promise.all([...Array(p.partitions).keys()].map((n) => redis.hget(`tacit:{${p.subject_prefix}:p:dedupe:${n}}:wm`, "applied_seq")));
      await publishLines(p, nats.js, lines.slice(400), { idPrefix: "s1" });
      const dedupe = stageGroups(p, findOperator).find((g) => g.name === "dedupe")!;
      await eventually("the stale worker to receive the second half", async () => {
        let pending = 0;
        for await (const ci of nats.jsm.consumers.list(dedupe.inputStream)) pending += ci.num_ack_pending;
        return pending > 0;
      }, 30_000);
      // Its next commit (the pipeline's commit_interval after the batch) finds the lease gone.
      await eventually("the stale worker to drop its cached state", async () => w.budget.size() === 0, 30_000, 100);
      for (const k of stateKeys) assert.equal(await redis.get(k), "999999:written-by-the-new-owner", `${k}: the stale owner wrote nothing`);
      const after = await Promise.all([...Array(p.partitions).keys()].map((n) => redis.hget(`tacit:{${p.subject_prefix}:p:dedupe:${n}}:wm`, "applied_seq")));
      assert.deepEqual(after, progress, "no progress committed without the lease");
      assert.equal(w.budget.size(), 0, "the stale worker dropped its cached state");
    } finally {
      await w.stop();
    }
  } finally {
    redis.disconnect();
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  }
});

test("a full state cache commits before the commit interval is up: with many users the cache stays near its bound", { timeout: 120_000 }, async () => {
  const servers = await startServers();
  let nats: NatsHandles | undefined;
  const redis = new Redis(servers.redisUrl);
  try {
    nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "test");
    // Every event a new user; a commit interval far longer than the run; room for 400 entries (user × stage).
    const p = load(servers, "full", ["runtime.commit_interval=10m", "runtime.state_cache.max_entries=400"]);
    await deploy(p, nats);
    const n = 3000;
    await publishLines(p, nats.js, benchEvents(n, n, Date.now() - 3_600_000), { idPrefix: "full" });
    const w = worker(servers, p, nats, redis, "w-full");
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, w.budget.size())), 5);
    await w.start();
    try {
      await eventually("the pipeline to drain", () => drained(p, nats!, n), 90_000, 200);
    } finally {
      clearInterval(sampler);
      await w.stop();
    }
    // Without the early commit every entry stays until the interval: 3,000 users × 5 stages.
    // With it, the cache exceeds its bound by at most the users of the batches in flight
    // (4 partitions × 100 inputs × 5 stages).
    assert.ok(peak > 0, "the cache was used");
    assert.ok(peak <= 400 + 4 * 100 * 5, `cache peak ${peak} entries for a bound of 400`);
    // The drain needed commits: every input's state landed in Redis.
    assert.equal((await redis.keys(`tacit:{full:u:*}:dedupe:state`)).length, n);
  } finally {
    redis.disconnect();
    await nats?.nc.close().catch(() => undefined);
    await servers.stop();
  }
});

// `runtime.threads: 2` against real nats-server and redis-server: a worker runs enrich on a
// worker thread of its own (its own connections and operators) and the keyed chain on the main
// thread. The result must be exactly a one-thread worker's; the thread's counters, durables and
// readiness are the worker's; holding a group reaches the thread; a thread that dies is reported;
// a thread that cannot start fails the worker's start with its own error class (a ConfigError
// still exits 2).
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Redis } from "ioredis";
import { withServers, type TestServers } from "./harness.js";
import { eventually } from "./support/streams.js";
import { assertSameResult, drained, snapshot } from "./support/pipeline-result.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { findOperator } from "../operators/index.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { streamName } from "../src/config/topology.js";
import { ConfigError } from "../src/core/errors.js";
import { Worker } from "../src/runtime/worker.js";
import { ThreadedWorker, createWorker, runsOnTwoThreads, type ThreadSpec } from "../src/runtime/threads.js";
import { workerThread } from "../src/cli/common.js";
import { simulate } from "../src/sim/simulate.js";
import { projectRoot } from "../src/config/paths.js";

const PIPELINE = join(projectRoot(), "pipelines", "feedback.yaml");
const KEY = "t1:worker-threads-test-secret-0123456789";
const silent = { debug() {}, info() {}, warn() {}, error() {} };

function env(servers: TestServers, key = KEY): Record<string, string> {
  return { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: key };
}

function load(servers: TestServers, name: string, threads: 1 | 2): Pipeline {
  return loadPipelineOrThrow(PIPELINE, {
    env: env(servers),
    set: [`name=${name}`, `subject_prefix=${name}`, "partitions=4", "runtime.batch_size=100", "runtime.commit_interval=200ms", `runtime.threads=${threads}`],
    operators: findOperator,
  });
}

async function deploy(p: Pipeline, nats: NatsHandles): Promise<void> {
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
}

/** Servers for one test (the harness's withServers), with a NATS and a Redis client on them, closed at its end. */
function withClients(t: TestContext, fn: (servers: TestServers, nats: NatsHandles, redis: Redis) => Promise<void>): Promise<void> {
  return withServers(t, async (servers) => {
    const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "test");
    const redis = new Redis(servers.redisUrl);
    try {
      await fn(servers, nats, redis);
    } finally {
      redis.disconnect();
      await nats.nc.close().catch(() => undefined);
    }
  });
}

/** The CLI's thread entry; a thread that dies is recorded, not the test process's exit. */
function threadSpec(died: Error[]): ThreadSpec {
  return { ...workerThread("silent", silent), onThreadExit: (err) => void died.push(err) };
}

test("threads 2 runs only a worker with both kinds of group on two threads", () => {
  const p = loadPipelineOrThrow(PIPELINE, { env: { TACIT_PSEUDONYM_KEY: KEY }, set: ["runtime.threads=2"], operators: findOperator });
  assert.equal(runsOnTwoThreads({ pipeline: p, operators: findOperator }), true);
  assert.equal(runsOnTwoThreads({ pipeline: p, operators: findOperator, groups: ["enrich"] }), false, "enrich alone: one thread");
  assert.equal(runsOnTwoThreads({ pipeline: p, operators: findOperator, groups: ["dedupe"] }), false, "the keyed chain alone: one thread");
  const one = loadPipelineOrThrow(PIPELINE, { env: { TACIT_PSEUDONYM_KEY: KEY }, set: ["runtime.threads=1"], operators: findOperator });
  assert.equal(runsOnTwoThreads({ pipeline: one, operators: findOperator }), false);
});

test("with threads 2, enrich on a thread of its own and the keyed chain on the main thread end exactly as one thread does; the thread's counters, durables and holds are the worker's", { timeout: 240_000 }, (t) =>
  withClients(t, async (servers, nats, redis) => {
    const died: Error[] = [];
    const lines = simulate({ seed: 78, users: 60, durationMs: 2 * 3_600_000, startTime: Date.now() - 3 * 3_600_000 }).events;
    const ref = load(servers, "one", 1);
    await deploy(ref, nats);
    await publishLines(ref, nats.js, lines, { idPrefix: "t" });
    const one = createWorker({ pipeline: ref, operators: findOperator, log: silent, env: env(servers), redis, nats }, threadSpec(died));
    assert.ok(one instanceof Worker, "threads 1: a plain worker");
    await one.start();
    await eventually("the one-thread run to finish", () => drained(ref, nats, lines.length), 120_000, 200);
    await one.stop();

    const p = load(servers, "two", 2);
    await deploy(p, nats);
    const w = createWorker({ pipeline: p, operators: findOperator, log: silent, env: env(servers), redis, nats }, threadSpec(died));
    assert.ok(w instanceof ThreadedWorker, "threads 2: enrich on a thread");
    await w.start();
    try {
      assert.ok(w.ready(), "ready once both threads have started");
      // Held, enrich (on the thread) reads nothing; released, everything goes through.
      await w.hold("enrich");
      await publishLines(p, nats.js, lines, { idPrefix: "t" });
      await new Promise((r) => setTimeout(r, 1000));
      const held = await nats.jsm.consumers.info(streamName(p, "in"), "enrich");
      assert.equal(held.num_pending + held.num_ack_pending, lines.length, "a held group on the thread consumes nothing");
      await w.release("enrich");
      await eventually("the two-thread run to finish", () => drained(p, nats, lines.length), 120_000, 200);
      await w.refresh();
      assert.equal(w.stageCounters.get("enrich")!.get("in"), lines.length, "enrich's counters come from the thread");
      assert.ok(w.stageCounters.get("dedupe")!.get("in") > 0, "the keyed stages' counters are the main thread's");
      const durables = w.durables().map((d) => d.durable);
      assert.ok(durables.includes("enrich") && durables.some((d) => d.startsWith("dedupe")), `both threads' durables: ${durables.join(", ")}`);
    } finally {
      await w.stop();
    }
    assert.deepEqual(died, [], "no thread died; a stopped one is not reported as dead");

    const want = await snapshot(ref, nats, redis);
    const got = await snapshot(p, nats, redis);
    assertSameResult(got, want, lines.length, 20, "one thread");
  }),
);

test("a thread that dies while the worker runs is reported (tacit run exits 1 on it) and the worker is no longer ready", { timeout: 60_000 }, (t) =>
  withClients(t, async (servers, nats, redis) => {
    const died: Error[] = [];
    const p = load(servers, "dies", 2);
    await deploy(p, nats);
    const w = createWorker({ pipeline: p, operators: findOperator, log: silent, env: env(servers), redis, nats }, threadSpec(died));
    assert.ok(w instanceof ThreadedWorker);
    await w.start();
    // What an uncaught error or an out-of-memory kill of the thread looks like from the main thread.
    await (w as unknown as { thread: { terminate(): Promise<number> } }).thread.terminate();
    await eventually("the thread's death to be reported", async () => died.length === 1, 10_000, 20);
    assert.match(died[0]!.message, /thread exited/);
    assert.equal(w.ready(), false, "not ready without its thread");
    await w.stop();
  }),
);

test("a thread that cannot start fails the worker's start with its error: a missing pseudonymization key is still a ConfigError", { timeout: 60_000 }, (t) =>
  withClients(t, async (servers, nats, redis) => {
    const died: Error[] = [];
    const p = load(servers, "nokey", 2);
    await deploy(p, nats);
    const w = createWorker({ pipeline: p, operators: findOperator, log: silent, env: env(servers, ""), devMode: false, redis, nats }, threadSpec(died));
    await assert.rejects(w.start(), (err: unknown) => err instanceof ConfigError && /TACIT_PSEUDONYM_KEY/.test(err.message));
    await w.stop();
    assert.deepEqual(died, []);
  }),
);

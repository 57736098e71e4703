// NATS node loss (issue 12, item 1): a 3-node JetStream cluster, every stream R3, a `tacit run`
// worker (enrich → dedupe). In the middle of the run the node leading the input stream — and,
// in a second run, the node leading a keyed partition's consumer — is SIGKILLed. Every event
// must come out exactly once, with the same envelope as in the run without a fault; the stall
// (longest time without output) and the time to finish after the kill are reported, from the
// times the output stream stored each event (the test's own polling is blind while its own
// server or a stream's leader is lost).
// 20,000 events by default; TACIT_LONG=1 runs 50,000.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { projectRoot } from "../src/config/paths.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import type { Pipeline } from "../src/config/types.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { startServers, type TestServers } from "./harness.js";
import { startNatsCluster, type NatsCluster } from "./support/servers.js";
import { consumersDrained, eventually, readStream } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:nats-failover-secret-0123456789abcdef";
const N = process.env.TACIT_LONG === "1" ? 50_000 : 20_000;
const EVENTS = [...benchEvents(N, 500, Date.now() - 3_600_000)];

interface Run {
  /** event_id → the output envelope (without nothing removed: envelopes are deterministic). */
  out: Map<string, string>;
  repeats: number;
  stallMs: number;
  recoverMs: number;
  /** Times a keyed partition restarted its durable after missing deliveries (the worker's warnings). */
  resumes: number;
  killed?: string;
}

/** JetStream API requests time out while a leader is being elected (and on a fresh cluster): try again. */
async function retry<T>(fn: () => Promise<T>, attempts = 10): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i >= attempts) throw err;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

async function connectWithRetry(p: Pipeline): Promise<NatsHandles> {
  for (let i = 0; ; i++) {
    try {
      const h = await connectNats(p, "failover-test");
      try {
        await h.jsm.getAccountInfo();
      } catch (err) {
        // Not left open: it would reconnect forever once the cluster is stopped, and keep this file's process alive.
        await h.nc.close();
        throw err;
      }
      return h;
    } catch (err) {
      if (i > 50) throw err;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** Each durable of the pipeline's input streams: pending, unacknowledged, waiting requests, and its leader. */
async function consumerStates(h: NatsHandles, p: Pipeline): Promise<string> {
  const out: string[] = [];
  for (const g of stageGroups(p, findOperator)) {
    try {
      for await (const ci of h.jsm.consumers.list(g.inputStream)) {
        if (ci.config.durable_name) out.push(`${ci.name} pending ${ci.num_pending} ack_pending ${ci.num_ack_pending} waiting ${ci.num_waiting} leader ${ci.cluster?.leader ?? "?"}`);
      }
    } catch (e) {
      out.push(`${g.inputStream}: ${(e as Error).message}`);
    }
  }
  return out.join("; ");
}

/** Each of the pipeline's streams: messages, first and last sequence, and its leader (where a run that lost events lost them). */
async function streamStates(h: NatsHandles): Promise<string> {
  const out: string[] = [];
  try {
    for await (const si of h.jsm.streams.list()) {
      out.push(`${si.config.name} messages ${si.state.messages} seq ${si.state.first_seq}..${si.state.last_seq} leader ${si.cluster?.leader ?? "?"}`);
    }
  } catch (e) {
    out.push(`streams: ${(e as Error).message}`);
  }
  return out.join("; ");
}

/**
 * One run of the events through a worker on the cluster; `victim` picks the node to kill once
 * half the events are out (none: the no-fault run).
 */
async function run(t: TestContext, servers: TestServers, nats: NatsCluster, name: string, victim?: (p: Pipeline, h: NatsHandles) => Promise<string>): Promise<Run> {
  const env = { NATS_URL: nats.url, REDIS_URL: servers.redisUrl, TEST_PIPELINE: name, TACIT_PSEUDONYM_KEY: KEY };
  const p = loadPipelineOrThrow(PIPELINE, { env, set: ["streams.replicas=3"], operators: findOperator });
  const h = await connectWithRetry(p);
  t.after(() => h.nc.close());
  await retry(async () => applyDeploy(p, h.jsm, findOperator, await planDeploy(p, h.jsm, findOperator)));
  await retry(() => publishLines(p, h.js, EVENTS, { idPrefix: name }));
  const worker = spawnTacit(["run", PIPELINE, "--set", "streams.replicas=3", "--metrics-port", "0"], { ...env, TACIT_LOG_LEVEL: "warn", TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
  t.after(() => void (worker.running() && worker.child.kill("SIGKILL")));
  const events = streamName(p, "events");
  const count = async () => (await h.jsm.streams.info(events).catch(() => undefined))?.state.messages ?? -1;
  let killed: string | undefined;
  let killedAt = 0;
  if (victim) {
    await eventually("half the events out", async () => (await count()) >= N / 2, 120_000, 20);
    killed = await retry(() => victim(p, h));
    killedAt = Date.now();
    await nats.nodes.get(killed)!.proc.stop({ hard: true });
  }
  const start = Date.now();
  let last = 0;
  await eventually(`every event out (${name})`, async () => {
    const c = await count();
    if (c < 0) return false;
    last = c;
    return c >= N;
  }, 180_000, 50).catch(async (err: Error) => {
    // Seen once in six CI runs (a run after a kill never got all events out), once in four runs
    // beside a bench (19,980 of 20,000 out, every durable drained, after each partition's batch
    // had waited 10 s for a PubAck and was retried), and in the CI run of 87b6caa (19,975 out):
    // deliveries lost in flight, skipped as copies once they came again (fixed by `gap` in
    // runner.ts; test/redelivery.test.ts). Say where it stood, streams included.
    throw new Error(`${err.message}: ${last} of ${N} out${killed ? `, ${killed} killed` : ""}; streams: ${await streamStates(h)}; consumers: ${await consumerStates(h, p)}; worker stderr (last 4,000 characters): ${worker.stderr().slice(-4000)}`);
  });
  let streak = 0;
  await eventually("the pipeline to drain", async () => {
    // A request may time out while a leader is being elected: not drained yet.
    const done = await consumersDrained(h, stageGroups(p, findOperator).map((g) => g.inputStream)).catch(() => false);
    streak = done ? streak + 1 : 0;
    return streak >= 3;
  }, 60_000, 200);
  assert.ok(worker.running(), worker.stderr());
  const out = new Map<string, string>();
  let repeats = 0;
  const stored = await retry(() => readStream(h, events));
  // From the kill (the run's start without one) to the last output, by the times the outputs
  // were stored: the stall is the longest time without a new one.
  const from = killedAt || start;
  let stallMs = 0;
  let prev = from;
  for (const m of stored) {
    if (m.time < from) continue;
    stallMs = Math.max(stallMs, m.time - prev);
    prev = m.time;
  }
  const recoverMs = prev - from;
  for (const m of stored) {
    const env = JSON.parse(m.data) as { event: { event_id: string } };
    if (out.has(env.event.event_id)) repeats++;
    out.set(env.event.event_id, m.data);
  }
  worker.child.kill("SIGTERM");
  assert.equal(await worker.exited(), 0, worker.stderr());
  const resumes = worker.stderr().split("deliveries missed").length - 1;
  return { out, repeats, stallMs, recoverMs, resumes, ...(killed ? { killed } : {}) };
}

function assertGolden(r: Run, golden: Run, what: string): void {
  assert.equal(r.repeats, 0, `${what}: no event output twice`);
  assert.equal(r.out.size, N, `${what}: every event output`);
  let differ = 0;
  for (const [id, env] of golden.out) if (r.out.get(id) !== env) differ++;
  assert.equal(differ, 0, `${what}: every envelope equals the no-fault run's`);
}

test(`nats: ${N} events on a 3-node R3 cluster; the input stream's leader and a keyed consumer's leader SIGKILLed mid-stream; every event out once, as in the no-fault run`, { timeout: 600_000 }, async (t) => {
  const servers = await startServers();
  t.after(() => servers.stop());
  // A fresh cluster per run: each kill leaves the cluster with two nodes.
  const cluster = async () => {
    const c = await startNatsCluster(mkdtempSync(join(tmpdir(), "tacit-nats-cluster-")));
    t.after(() => c.stop());
    return c;
  };
  const golden = await run(t, servers, await cluster(), "gold");
  assert.equal(golden.repeats, 0);
  assert.equal(golden.out.size, N);

  const streamLeader = await run(t, servers, await cluster(), "sl", async (p, h) => (await h.jsm.streams.info(streamName(p, "in"))).cluster!.leader!);
  assertGolden(streamLeader, golden, "input stream leader killed");
  const consumerLeader = await run(t, servers, await cluster(), "cl", async (p, h) => (await h.jsm.consumers.info(streamName(p, "x_dedupe"), "dedupe_p0")).cluster!.leader!);
  assertGolden(consumerLeader, golden, "dedupe_p0 consumer leader killed");
  t.diagnostic(`no fault: longest gap ${Math.round(golden.stallMs)} ms, all out in ${(golden.recoverMs / 1000).toFixed(1)} s, ${golden.resumes} partition restarts`);
  for (const [what, r] of [["input stream leader", streamLeader], ["dedupe_p0 consumer leader", consumerLeader]] as const) {
    t.diagnostic(`${what} (${r.killed}) killed at ${N / 2} out: stall ${(r.stallMs / 1000).toFixed(1)} s, all out ${(r.recoverMs / 1000).toFixed(1)} s after the kill; ${r.resumes} partition restarts for missed deliveries`);
  }
});

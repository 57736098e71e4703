// Integration tests of the runtime against real nats-server and redis-server (started by the
// harness on free ports): deploy, the DLQ path, exactly-once output under SIGKILL, graceful
// shutdown (also during an outage), partition lease takeover, Redis outages, and publishes sent
// again while an output stream takes nothing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { Redis } from "ioredis";
import { startServers, type TestServers } from "./harness.js";
import { eventually, readStream, consumersDrained } from "./support/streams.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { findOperator } from "../operators/index.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines, subjectForLine } from "../src/runtime/publisher.js";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { pipelineStreams, stageGroups, streamName } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";
import { benchEvents } from "../src/bench/bench.js";
import { partitionKey, pipelineKey } from "../src/core/state.js";
import { projectRoot, tacitArgv } from "../src/config/paths.js";

const ROOT = projectRoot();
const PIPELINE = join(ROOT, "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:runtime-test-secret-0123456789";
const silent = { debug() {}, info() {}, warn() {}, error() {} };

/** One line per bad-input kind of SPEC §3, with the reason enrich must give it. */
export function badLines(now: number): { line: string; reason: string }[] {
  const ts = new Date(now).toISOString();
  return [
    { line: "{not json", reason: "malformed_json" },
    { line: JSON.stringify({ event_id: "bad-schema", session_id: "s", user_id: "u", timestamp: ts, event_type: "click", response_id: "r", payload: { position: "first" } }), reason: "schema_violation" },
    { line: JSON.stringify({ event_id: "bad-type", session_id: "s", user_id: "u", timestamp: ts, event_type: "teleport", payload: {} }), reason: "unknown_event_type" },
    { line: JSON.stringify({ event_id: "bad-time", session_id: "s", user_id: "u", timestamp: "yesterday", event_type: "query", query_id: "q", payload: { text: "x" } }), reason: "bad_timestamp" },
    { line: JSON.stringify({ event_id: "bad-size", session_id: "s", user_id: "u", timestamp: ts, event_type: "query", query_id: "q", payload: { text: "x".repeat(70_000) } }), reason: "oversized" },
  ];
}

function env(servers: TestServers, name: string): Record<string, string> {
  return { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TEST_PIPELINE: name, TACIT_PSEUDONYM_KEY: KEY };
}

function load(servers: TestServers, name: string, set: string[] = []): Pipeline {
  return loadPipelineOrThrow(PIPELINE, { env: env(servers, name), set, operators: findOperator });
}

async function deploy(p: Pipeline, nats: NatsHandles): Promise<void> {
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
}

function inputStreams(p: Pipeline): string[] {
  return stageGroups(p, findOperator).map((g) => g.inputStream);
}

/** Event ids in the pipeline's cleaned-events stream, with how often each occurs. */
async function outputIds(p: Pipeline, nats: NatsHandles): Promise<Map<string, number>> {
  const ids = new Map<string, number>();
  for (const m of await readStream(nats, streamName(p, "events"))) {
    const id = (JSON.parse(m.data) as { event: { event_id: string } }).event.event_id;
    ids.set(id, (ids.get(id) ?? 0) + 1);
  }
  return ids;
}

function tacitRun(servers: TestServers, name: string): ChildProcess {
  const child = spawn(process.execPath, tacitArgv(["run", PIPELINE, "--metrics-port", "0"]), {
    env: { ...process.env, ...env(servers, name), TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")), TACIT_LOG_LEVEL: "warn" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
    if (err.length > 20_000) err = err.slice(-10_000);
  });
  (child as ChildProcess & { stderrText: () => string }).stderrText = () => err;
  return child;
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode);
    else child.once("exit", (code) => resolve(code));
  });
}

async function withEnv(fn: (servers: TestServers, nats: NatsHandles) => Promise<void>): Promise<void> {
  const servers = await startServers();
  let nats: NatsHandles | undefined;
  try {
    nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "test");
    await fn(servers, nats);
  } finally {
    await nats?.nc.close().catch(() => undefined);
    await servers.stop();
  }
}

test("deploy creates streams and consumers once, then is idempotent and shows updates", async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "dep");
    const first = await planDeploy(p, nats.jsm, findOperator);
    const streams = pipelineStreams(p, stageGroups(p, findOperator)).length;
    assert.equal(first.filter((c) => c.kind === "stream" && c.action === "create").length, streams);
    // enrich is shared (1 durable); dedupe is keyed: one durable per partition.
    assert.equal(first.filter((c) => c.kind === "consumer" && c.action === "create").length, 1 + p.partitions);
    await applyDeploy(p, nats.jsm, findOperator, first);
    const again = await planDeploy(p, nats.jsm, findOperator);
    assert.ok(again.every((c) => c.action === "unchanged"), JSON.stringify(again.filter((c) => c.action !== "unchanged")));
    await applyDeploy(p, nats.jsm, findOperator, again);

    const changed = load(servers, "dep", ["streams.max_age=1d", "runtime.ack_wait=10s"]);
    const upd = await planDeploy(changed, nats.jsm, findOperator);
    const updates = upd.filter((c) => c.action === "update");
    assert.equal(updates.filter((c) => c.kind === "stream").length, streams);
    assert.equal(updates.filter((c) => c.kind === "consumer").length, 1 + p.partitions);
    assert.deepEqual(updates.find((c) => c.kind === "stream")!.changes.map((c) => c.field), ["max_age"]);
    await applyDeploy(changed, nats.jsm, findOperator, upd);
    assert.ok((await planDeploy(changed, nats.jsm, findOperator)).every((c) => c.action === "unchanged"));

    const fewer = load(servers, "dep", ["partitions=2"]);
    const conflict = await planDeploy(fewer, nats.jsm, findOperator);
    assert.equal(conflict.filter((c) => c.action === "conflict").length, 2, "partitions 2 and 3 are left over");
    await assert.rejects(applyDeploy(fewer, nats.jsm, findOperator, conflict), /conflict/);
  });
});

test("events flow through enrich and dedupe exactly once; every bad input is dead-lettered with its bytes and reason; a traceparent travels with its event", async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "flow");
    await deploy(p, nats);
    const now = Date.now();
    const good = [...benchEvents(2000, 50, now - 3_600_000)];
    const dups = good.filter((_, i) => i % 7 === 0); // re-sent by the producer: same event_id, new message
    const bad = badLines(now);
    await publishLines(p, nats.js, [...good, ...dups, ...bad.map((b) => b.line)], { idPrefix: "t" });
    // Three more events, each with a W3C traceparent: both hops read it from the input's headers.
    const trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    const traced = [...benchEvents(3, 3, now - 1_800_000)].map((l, i) => JSON.stringify({ ...JSON.parse(l), event_id: `traced-${i}` }));
    for (const line of traced) {
      const h = natsHeaders();
      h.set("traceparent", `00-${trace}-00f067aa0ba902b7-01`);
      await nats.js.publish(subjectForLine(p, line), line, { headers: h, msgID: `traced:${line.length}:${traced.indexOf(line)}` });
    }

    const redis = new Redis(servers.redisUrl);
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env: env(servers, "flow"), redis, nats });
    await worker.start();
    try {
      await eventually("the pipeline to drain", async () => (await consumersDrained(nats, inputStreams(p))) && (await readStream(nats, streamName(p, "dlq"))).length === bad.length);
    } finally {
      await worker.stop();
      redis.disconnect();
    }
    const ids = await outputIds(p, nats);
    assert.equal(ids.size, good.length + traced.length);
    assert.ok([...ids.values()].every((n) => n === 1), "no event_id is output twice");
    assert.equal(worker.stageCounters.get("dedupe")!.get("dropped"), dups.length);

    const dlq = await readStream(nats, streamName(p, "dlq"));
    for (const b of bad) {
      const d = dlq.find((m) => m.data === b.line);
      assert.ok(d, `dead letter for ${b.reason} keeps the original bytes`);
      assert.equal(d.headers["Tacit-Reason"], b.reason);
      assert.equal(d.headers["Tacit-Stage"], "enrich");
      assert.equal(d.subject, `${p.subject_prefix}.dlq.enrich`);
      assert.ok(d.headers["Tacit-Message"]!.length > 0);
    }
    const events = await readStream(nats, streamName(p, "events"));
    const withTrace = events.filter((m) => m.headers.traceparent !== undefined);
    assert.deepEqual(withTrace.map((m) => (JSON.parse(m.data) as { event: { event_id: string } }).event.event_id).sort(), ["traced-0", "traced-1", "traced-2"]);
    assert.ok(withTrace.every((m) => m.headers.traceparent!.startsWith(`00-${trace}-`)), "the trace id is kept across both hops");
    // Nothing of the raw user id or PII leaves enrich.
    const sample = events.slice(0, 50);
    assert.ok(sample.every((m) => !m.data.includes("user-")), "raw user_id never appears downstream");
  });
});

test("SIGKILL in the middle of 50,000 events: after a restart every event is output exactly once", { timeout: 300_000 }, async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "kill");
    await deploy(p, nats);
    const now = Date.now();
    const good = [...benchEvents(50_000, 500, now - 6 * 3_600_000)];
    const bad = badLines(now);
    await publishLines(p, nats.js, [...good.slice(0, 25_000), ...bad.map((b) => b.line), ...good.slice(25_000)], { idPrefix: "k" });

    const first = tacitRun(servers, "kill");
    await eventually("some output before the kill", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages >= 10_000, 120_000, 20);
    first.kill("SIGKILL");
    await exited(first);
    const midway = (await nats.jsm.streams.info(streamName(p, "events"))).state.messages;
    assert.ok(midway < good.length, `killed mid-run (had ${midway})`);

    const second = tacitRun(servers, "kill");
    try {
      await eventually("the restarted worker to finish", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 240_000, 200);
    } finally {
      second.kill("SIGTERM");
      assert.equal(await exited(second), 0, (second as ChildProcess & { stderrText: () => string }).stderrText());
    }
    const ids = await outputIds(p, nats);
    assert.equal(ids.size, good.length, "no event lost");
    const twice = [...ids.entries()].filter(([, n]) => n > 1);
    assert.deepEqual(twice, [], "no event output twice");
    const reasons = (await readStream(nats, streamName(p, "dlq"))).map((m) => m.headers["Tacit-Reason"]).sort();
    assert.deepEqual(reasons, bad.map((b) => b.reason).sort(), "each bad event dead-lettered once, with its reason");
  });
});

test("SIGTERM drains: in-flight messages are settled and the worker exits 0", async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "term");
    await deploy(p, nats);
    const good = [...benchEvents(20_000, 200, Date.now() - 3_600_000)];
    await publishLines(p, nats.js, good, { idPrefix: "g" });
    const child = tacitRun(servers, "term");
    await eventually("processing to start", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages > 1000, 60_000, 20);
    const t0 = Date.now();
    child.kill("SIGTERM");
    assert.equal(await exited(child), 0, (child as ChildProcess & { stderrText: () => string }).stderrText());
    assert.ok(Date.now() - t0 < 15_000, "drained promptly");
    // Everything the worker had taken was settled: nothing is left waiting for an ack.
    for (const s of inputStreams(p)) {
      for await (const ci of nats.jsm.consumers.list(s)) assert.equal(ci.num_ack_pending, 0, `${ci.name} has unacked messages after a clean stop`);
    }
    const again = tacitRun(servers, "term");
    await eventually("the rest to be processed", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 120_000, 200);
    again.kill("SIGTERM");
    await exited(again);
    const ids = await outputIds(p, nats);
    assert.equal(ids.size, good.length);
    assert.ok([...ids.values()].every((n) => n === 1));
  });
});

test("a dead worker's partitions move to the survivor, which finishes the work", { timeout: 180_000 }, async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "lease");
    await deploy(p, nats);
    const redis = new Redis(servers.redisUrl);
    const owners = async () => {
      const vals = await Promise.all([...Array(p.partitions).keys()].map((n) => redis.get(pipelineKey(p.subject_prefix, "lease", "dedupe", n))));
      return vals;
    };
    const a = tacitRun(servers, "lease");
    const b = tacitRun(servers, "lease");
    try {
      await eventually("both workers to hold partitions", async () => {
        const o = await owners();
        return o.every((x) => x !== null) && new Set(o).size === 2;
      }, 30_000);
      a.kill("SIGKILL");
      await exited(a);
      await eventually("the survivor to own every partition", async () => {
        const o = await owners();
        return o.every((x) => x !== null) && new Set(o).size === 1;
      }, 30_000);
      const good = [...benchEvents(5000, 100, Date.now() - 3_600_000)];
      await publishLines(p, nats.js, good, { idPrefix: "l" });
      await eventually("the survivor to process everything", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 120_000, 200);
      const ids = await outputIds(p, nats);
      assert.equal(ids.size, good.length);
    } finally {
      a.kill("SIGKILL");
      b.kill("SIGTERM");
      await exited(b);
      redis.disconnect();
    }
  });
});

test("a worker whose partition lease was taken commits nothing and settles nothing there: the commit itself checks the lease", { timeout: 120_000 }, async () => {
  await withEnv(async (servers, nats) => {
    // Long lease and ack_wait: neither the renewal timer nor a redelivery may act during the test,
    // so only the fenced commit can notice the takeover.
    const p = load(servers, "fence", ["runtime.lease_ttl=60s", "runtime.ack_wait=60s"]);
    await deploy(p, nats);
    const redis = new Redis(servers.redisUrl);
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env: env(servers, "fence"), redis, nats });
    await worker.start();
    const leaseKeys = [...Array(p.partitions).keys()].map((n) => pipelineKey(p.subject_prefix, "lease", "dedupe", n));
    const progress = [...Array(p.partitions).keys()].map((n) => partitionKey(p.subject_prefix, "dedupe", n, "wm"));
    try {
      await eventually("the worker to hold every dedupe partition", async () => (await redis.mget(leaseKeys)).every((v) => v === worker.id), 30_000);
      // Another worker takes every partition over (as after this one stalled past its lease).
      for (const k of leaseKeys) await redis.set(k, "intruder", "KEEPTTL");
      const good = [...benchEvents(400, 40, Date.now() - 3_600_000)];
      await publishLines(p, nats.js, good, { idPrefix: "f" });
      const dedupe = stageGroups(p, findOperator).find((g) => g.name === "dedupe")!;
      await eventually("enrich to pass every event on", async () => (await nats.jsm.streams.info(dedupe.inputStream)).state.messages >= good.length, 30_000);
      await eventually("the dedupe runners to receive their batches", async () => {
        let pending = 0;
        for await (const ci of nats.jsm.consumers.list(dedupe.inputStream)) pending += ci.num_ack_pending;
        return pending > 0;
      }, 30_000);
      await new Promise((r) => setTimeout(r, 2_000));
      for (const k of progress) assert.equal(await redis.hget(k, "applied_seq"), null, `${k}: no progress committed without the lease`);
      for await (const ci of nats.jsm.consumers.list(dedupe.inputStream)) assert.equal(ci.ack_floor.stream_seq, 0, `${ci.name}: nothing acked without the lease`);
      const state = await redis.keys(`tacit:{${p.subject_prefix}:u:*}:dedupe:*`);
      assert.deepEqual(state.filter((k) => !k.includes(":seen:")), [], "no dedupe state beyond its first-writer claims");
    } finally {
      await worker.stop();
      redis.disconnect();
    }
  });
});

test("Redis down: batches are retried, nothing is lost or dead-lettered, and work resumes when it is back", { timeout: 120_000 }, async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "redis", ["runtime.retry_backoff=[200ms,500ms]"]);
    await deploy(p, nats);
    const redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
    redis.on("error", () => undefined);
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env: env(servers, "redis"), redis, nats });
    await worker.start();
    try {
      await servers.stopRedis();
      const good = [...benchEvents(3000, 60, Date.now() - 3_600_000)];
      await publishLines(p, nats.js, good, { idPrefix: "r" });
      await new Promise((r) => setTimeout(r, 2000));
      await servers.restartRedis();
      await eventually("work to resume after Redis is back", async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 90_000, 200);
      const ids = await outputIds(p, nats);
      assert.equal(ids.size, good.length);
      assert.ok([...ids.values()].every((n) => n === 1));
      assert.equal((await nats.jsm.streams.info(streamName(p, "dlq"))).state.messages, 0, "an outage is not a bad event");
    } finally {
      await worker.stop();
      redis.disconnect();
    }
  });
});

test("an output stream without a leader for a while (here: not there): the worker's publishes to it are sent again, counted as publish_resent, and land once when it is back", { timeout: 120_000 }, async () => {
  await withEnv(async (servers, nats) => {
    const p = load(servers, "resent");
    await deploy(p, nats);
    const events = streamName(p, "events");
    // No stream listens on the events subjects: JetStream answers 503, as while a clustered
    // stream elects its leader.
    await nats.jsm.streams.delete(events);
    const redis = new Redis(servers.redisUrl);
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env: env(servers, "resent"), redis, nats });
    await worker.start();
    try {
      const good = [...benchEvents(500, 20, Date.now() - 3_600_000)];
      await publishLines(p, nats.js, good, { idPrefix: "rs" });
      const resent = (reason: string) => worker.stageCounters.get("dedupe")!.counts.get(`publish_resent{reason=${reason}}`) ?? 0;
      // An outage of 2 s, within the publishes' 10 s deadline: no batch fails.
      await new Promise((r) => setTimeout(r, 2_000));
      // Counted as they are sent again, while the batch still waits: on-call sees the outage as it lasts.
      assert.ok(resent("no_responders") > 0, "the keyed group's outputs were counted as sent again during the outage");
      await deploy(p, nats);
      await eventually("every event out", async () => (await nats.jsm.streams.info(events)).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 60_000, 200);
      const ids = await outputIds(p, nats);
      assert.equal(ids.size, good.length);
      assert.ok([...ids.values()].every((n) => n === 1), "each output stored once");
      assert.equal(worker.stageCounters.get("dedupe")!.counts.get("ingest_settled{outcome=retried}"), 0, "no batch failed");
      assert.ok(resent("no_responders") > 0, "the keyed group's outputs were sent again while no stream took them");
      assert.equal(resent("unanswered"), 0, "every send was answered");
      assert.equal(worker.stageCounters.get("enrich")!.counts.get("publish_resent{reason=no_responders}"), 0, "enrich's partition stream was there all along");
    } finally {
      await worker.stop();
      redis.disconnect();
    }
  });
});

/**
 * SIGTERM to a `tacit run` while `outage` lasts: it must exit 0 well before its supervisor's
 * grace period (60 s in deploy/), handing back what it cannot finish instead of retrying it; once
 * `restore` ends the outage, a new worker outputs every event once.
 */
async function sigtermDuringOutage(servers: TestServers, nats: NatsHandles, name: string, outage: (p: Pipeline) => Promise<void>, restore: (p: Pipeline) => Promise<void>): Promise<void> {
  const p = load(servers, name);
  await deploy(p, nats);
  const events = streamName(p, "events");
  const good = [...benchEvents(2000, 50, Date.now() - 3_600_000)];
  await publishLines(p, nats.js, good.slice(0, 1000), { idPrefix: `${name}1` });
  const child = tacitRun(servers, name) as ChildProcess & { stderrText: () => string };
  await eventually("processing to start", async () => (await nats.jsm.streams.info(events)).state.messages > 0, 60_000, 20);
  await outage(p);
  await publishLines(p, nats.js, good.slice(1000), { idPrefix: `${name}2` });
  await new Promise((r) => setTimeout(r, 1_000));
  const t0 = Date.now();
  child.kill("SIGTERM");
  // 8.7 s (NATS) and 17 s (Redis: each request takes the client's retries to fail) here; still
  // running after 90 s before stops handed work back.
  const code = await Promise.race([exited(child), new Promise<string>((r) => setTimeout(() => r("still running"), 50_000))]);
  if (code !== 0) child.kill("SIGKILL");
  assert.equal(code, 0, child.stderrText());
  assert.ok(Date.now() - t0 < 40_000, `stopped within 40 s (${Date.now() - t0} ms)`);
  assert.match(child.stderrText(), /handed back, not retried/);
  await restore(p);
  const again = tacitRun(servers, name);
  await eventually("the rest to be processed", async () => (await nats.jsm.streams.info(events)).state.messages >= good.length && (await consumersDrained(nats, inputStreams(p))), 120_000, 200);
  again.kill("SIGTERM");
  await exited(again);
  const ids = await outputIds(p, nats);
  assert.equal(ids.size, good.length);
  assert.ok([...ids.values()].every((n) => n === 1), "each output stored once");
}

test("SIGTERM while an output stream takes nothing: the worker hands back what it cannot finish and exits 0 without waiting out the outage; every event is output once after it", { timeout: 180_000 }, async () => {
  await withEnv(async (servers, nats) => {
    // The keyed group's output stream stops taking its subjects (what it stored stays): its
    // publishes are answered 503 until their 10 s deadline, then the batch fails, and it used to
    // be retried with backoff for as long as that lasted.
    const outage = async (p: Pipeline) => {
      const cfg = (await nats.jsm.streams.info(streamName(p, "events"))).config;
      await nats.jsm.streams.update(streamName(p, "events"), { ...cfg, subjects: [`${p.subject_prefix}.nowhere`] });
    };
    await sigtermDuringOutage(servers, nats, "termout", outage, (p) => deploy(p, nats));
  });
});

test("SIGTERM while Redis is down: the worker hands back what it cannot commit and exits 0 without waiting out the outage or each lease request's retries; every event is output once after it", { timeout: 180_000 }, async () => {
  await withEnv(async (servers, nats) => {
    await sigtermDuringOutage(servers, nats, "termredis", () => servers.stopRedis(), () => servers.restartRedis());
  });
});

// Overload and soak (issue 12, items 4 and 5) on real servers with a `tacit run` worker
// (enrich → dedupe): capacity is measured first (events/s through the worker); then producers
// publish as fast as they can (aiming at ≥ 3× what the worker takes meanwhile) — nothing is lost, the worker's RSS stays bounded, the backlog shows in
// `tacit status` (pipelineStatus) and in the worker's /metrics (published minus
// tacit_stage_in_total), and it drains afterwards; then a soak at half the capacity — RSS, the
// worker's /healthz response time (its event-loop lag, seen from outside) and the Redis key count
// stay flat after warm-up. Its assertions compare rates, so it needs a machine of its own: it
// runs only with TACIT_LONG=1 (60 s overload, 10 min soak; TACIT_LOAD_SHORT=1 for 10 s and 30 s).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { projectRoot } from "../src/config/paths.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { pipelineStatus } from "../src/runtime/status.js";
import { freePort } from "../src/services/processes.js";
import { startServers } from "./harness.js";
import { consumersDrained, eventually } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:load-test-secret-0123456789abcdef";
const LONG = process.env.TACIT_LONG === "1";
const SHORT = process.env.TACIT_LOAD_SHORT === "1";
const OVERLOAD_S = SHORT ? 10 : 60;
const SOAK_S = SHORT ? 30 : 600;
const USERS = 2_000;

const rssMb = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) / 1024;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;

test(`load: ${OVERLOAD_S} s of producers faster than the worker loses nothing, keeps RSS bounded, shows and drains its backlog; ${SOAK_S} s at half capacity stays flat`, { timeout: (OVERLOAD_S * 4 + SOAK_S + 240) * 1000, skip: !LONG && !SHORT && "long form: TACIT_LONG=1" }, async (t) => {
  const servers = await startServers();
  t.after(() => servers.stop());
  const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TEST_PIPELINE: "ld", TACIT_PSEUDONYM_KEY: KEY };
  const p = loadPipelineOrThrow(PIPELINE, { env, operators: findOperator });
  const nats = await connectNats(p, "load-test");
  t.after(() => nats.nc.close());
  const redis = new Redis(servers.redisUrl);
  t.after(() => redis.disconnect());
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
  const port = await freePort();
  const worker = spawnTacit(["run", PIPELINE, "--metrics-port", String(port)], { ...env, TACIT_LOG_LEVEL: "warn", TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
  t.after(() => void (worker.running() && worker.child.kill("SIGKILL")));
  const pid = worker.child.pid!;
  await eventually("the worker to be ready", async () => (await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.status, () => 0)) === 200, 20_000);
  const inputs = stageGroups(p, findOperator).map((g) => g.inputStream);
  const outCount = async () => (await nats.jsm.streams.info(streamName(p, "events"))).state.messages;
  const drain = async (timeoutMs: number) => {
    let streak = 0;
    await eventually("the backlog to drain", async () => {
      streak = (await consumersDrained(nats, inputs)) ? streak + 1 : 0;
      return streak >= 3;
    }, timeoutMs, 200);
  };
  const enrichIn = async () => {
    const m = /tacit_stage_in_total\{[^}]*stage="enrich"[^}]*\} (\d+)/.exec(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
    return m ? Number(m[1]) : 0;
  };
  // Distinct events for every phase: ids prefixed, users spread over USERS, event time just behind now.
  let published = 0;
  const batch = (n: number, phase: string) => [...benchEvents(n, USERS, Date.now() - 600_000, () => Date.now() - 1_000)].map((l) => l.replace('"event_id":"b', `"event_id":"${phase}-b`));
  /** Publishes `rate` events/s (Infinity: as fast as the producer can) for `seconds`, calling `every` between windows. */
  const publishAt = async (rate: number, seconds: number, phase: string, every: () => Promise<void>) => {
    const tick = 200;
    const per = Number.isFinite(rate) ? Math.max(1, Math.round((rate * tick) / 1000)) : 2_000;
    const end = Date.now() + seconds * 1000;
    for (let k = 0; Date.now() < end; k++) {
      const next = Date.now() + tick;
      await publishLines(p, nats.js, batch(per, `${phase}${k}`), { idPrefix: `${phase}${k}`, window: 2_000 });
      published += per;
      await every();
      if (Number.isFinite(rate)) await new Promise((r) => setTimeout(r, Math.max(0, next - Date.now())));
    }
  };

  // --- capacity ---
  const C = 20_000;
  await publishLines(p, nats.js, batch(C, "cap"), { idPrefix: "cap" });
  published += C;
  const t0 = Date.now();
  await eventually("the capacity run", async () => (await outCount()) >= published, 120_000, 50);
  const capacity = Math.round(C / ((Date.now() - t0) / 1000));
  await drain(30_000);
  const rssIdle = rssMb(pid);

  // --- overload: producers as fast as they go (on a 2-core machine the producer shares the CPU
  // with the worker and the servers, so a fixed 3× of the idle capacity may be out of reach) ---
  const rss: number[] = [];
  const backlogMetrics: number[] = [];
  const backlogStatus: number[] = [];
  let lastSample = 0;
  const o0 = Date.now();
  const before = published;
  const outBefore = await outCount();
  await publishAt(Infinity, OVERLOAD_S, "ovl", async () => {
    if (Date.now() - lastSample < 3000) return;
    lastSample = Date.now();
    rss.push(rssMb(pid));
    backlogMetrics.push(published - (await enrichIn()));
    const st = await pipelineStatus(p, nats.jsm, redis, findOperator);
    backlogStatus.push(st.stages.reduce((a, s) => a + s.pending + s.ack_pending, 0));
  });
  const overS = (Date.now() - o0) / 1000;
  const offered = Math.round((published - before) / overS);
  const processed = Math.round(((await outCount()) - outBefore) / overS);
  const d0 = Date.now();
  await drain(OVERLOAD_S * 6_000 + 60_000);
  const drainS = (Date.now() - d0) / 1000;
  assert.equal(await outCount(), published, "every event out, none lost");
  assert.equal((await nats.jsm.streams.info(streamName(p, "dlq"))).state.messages, 0);
  assert.ok(worker.running(), worker.stderr());
  const peakBacklog = Math.max(...backlogStatus);
  const peakMetrics = Math.max(...backlogMetrics);
  const peakRss = Math.max(...rss);
  t.diagnostic(`capacity ${capacity} ev/s idle; overload: producers offered ${offered} ev/s for ${OVERLOAD_S} s (${(offered / capacity).toFixed(1)}× capacity) while the worker processed ${processed} ev/s; backlog peak ${peakBacklog} (status) / ${peakMetrics} (metrics); RSS idle ${rssIdle.toFixed(0)} MB, peak ${peakRss.toFixed(0)} MB; drained in ${drainS.toFixed(1)} s`);
  assert.ok(offered > 1.5 * processed, `the producers outran the worker (${offered} vs ${processed} ev/s)`);
  // What the worker could not take waits in JetStream, and both views show it.
  assert.ok(peakBacklog >= 1000 && peakMetrics >= 1000, `the backlog shows in status (${peakBacklog}) and in the metrics (${peakMetrics})`);
  // Bounded: the worker holds at most a few batches, never the backlog.
  assert.ok(peakRss < 400, `RSS bounded under overload: peak ${peakRss.toFixed(0)} MB`);

  // --- soak: half capacity ---
  const samples: { at: number; rss: number; lagMs: number; keys: number }[] = [];
  const s0 = Date.now();
  lastSample = 0;
  await publishAt(capacity / 2, SOAK_S, "soak", async () => {
    if (Date.now() - lastSample < 2000) return;
    lastSample = Date.now();
    const h0 = performance.now();
    await fetch(`http://127.0.0.1:${port}/healthz`);
    samples.push({ at: Date.now() - s0, rss: rssMb(pid), lagMs: performance.now() - h0, keys: await redis.dbsize() });
  });
  await drain(60_000);
  assert.equal(await outCount(), published, "every soak event out");
  // After warm-up (the first third): the last third against the middle third.
  const third = Math.floor(samples.length / 3);
  const mid = samples.slice(third, 2 * third);
  const end = samples.slice(2 * third);
  const growth = (f: (s: (typeof samples)[number]) => number) => median(end.map(f)) / median(mid.map(f)) - 1;
  t.diagnostic(`soak ${SOAK_S} s at ${Math.round(capacity / 2)} ev/s: RSS median ${median(mid.map((s) => s.rss)).toFixed(0)} → ${median(end.map((s) => s.rss)).toFixed(0)} MB (${(growth((s) => s.rss) * 100).toFixed(1)} %); /healthz ${median(mid.map((s) => s.lagMs)).toFixed(1)} → ${median(end.map((s) => s.lagMs)).toFixed(1)} ms; Redis keys ${median(mid.map((s) => s.keys))} → ${median(end.map((s) => s.keys))}`);
  assert.ok(growth((s) => s.rss) < 0.1, "RSS flat after warm-up (< 10 % growth)");
  assert.ok(growth((s) => s.keys) < 0.1, "Redis key count flat after warm-up (< 10 % growth)");
  // Response time is noisy on a shared machine: flat means no trend beyond a few milliseconds.
  assert.ok(median(end.map((s) => s.lagMs)) < median(mid.map((s) => s.lagMs)) * 1.1 + 5, "event-loop lag (healthz time) flat");
  worker.child.kill("SIGTERM");
  assert.equal(await worker.exited(), 0, worker.stderr());
});

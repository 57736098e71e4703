// Dead letters on real nats-server and redis-server (enrich → dedupe): `tacit dlq list` counts
// and samples, `tacit dlq redrive` re-injects letters after a config fix — into enrich's input
// subject, and into a later stage's partition subject — and an event that fails again goes back
// to the DLQ once, marked, instead of looping.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { startServers, type TestServers } from "./harness.js";
import { consumersDrained, eventually, readStream } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import type { DlqSummary, RedriveResult } from "../src/runtime/dlq.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { stageGroups, stageSubject, streamName } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:dlq-test-secret-0123456789abcdef";
const NAME = "dl";
const silent = { debug() {}, info() {}, warn() {}, error() {} };

function envOf(s: TestServers): Record<string, string> {
  return { NATS_URL: s.natsUrl, REDIS_URL: s.redisUrl, TEST_PIPELINE: NAME, TACIT_PSEUDONYM_KEY: KEY };
}

async function drained(p: Pipeline, nats: NatsHandles): Promise<void> {
  let streak = 0;
  const streams = stageGroups(p, findOperator).map((g) => g.inputStream);
  await eventually("the pipeline to drain", async () => {
    streak = (await consumersDrained(nats, streams)) ? streak + 1 : 0;
    return streak >= 2;
  }, 60_000, 100);
}

test("dlq: list by stage and reason; redrive after a config fix outputs each event once; what fails again returns once, marked, and is not redriven again unless asked", { timeout: 90_000 }, async () => {
  const servers = await startServers();
  const nats = await connectNats({ nats: { url: servers.natsUrl } } as Pipeline, "dlq-test");
  const workers: { w: Worker; r: Redis }[] = [];
  const startWorker = async (set: string[]) => {
    const p = loadPipelineOrThrow(PIPELINE, { env: envOf(servers), set, operators: findOperator });
    const r = new Redis(servers.redisUrl);
    const w = new Worker({ pipeline: p, operators: findOperator, log: silent, env: envOf(servers), redis: r, nats });
    workers.push({ w, r });
    await w.start();
    return { p, w };
  };
  const cli = async <T>(args: string[]): Promise<{ code: number | null; json?: T; err: string }> => {
    const r = spawnTacit(["dlq", PIPELINE, ...args], { ...envOf(servers), TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")) });
    const code = await new Promise<number | null>((res) => r.child.once("close", res));
    return { code, err: r.stderr(), ...(code === 0 && args.includes("--json") ? { json: JSON.parse(r.stdout()) as T } : {}) };
  };
  try {
    // A too strict deploy: enrich takes at most 600 bytes; a tenth of the events are longer.
    const strict = loadPipelineOrThrow(PIPELINE, { env: envOf(servers), set: ["stages.enrich.config.max_event_bytes=600"], operators: findOperator });
    await applyDeploy(strict, nats.jsm, findOperator, await planDeploy(strict, nats.jsm, findOperator));
    // Context passes through enrich; a long one makes an event long without making it invalid.
    const good = [...benchEvents(1000, 40, Date.now() - 3_600_000)].map((l, i) => (i % 10 === 3 ? JSON.stringify({ ...JSON.parse(l), context: { note: "x".repeat(700) } }) : l));
    const long = good.filter((l) => l.length > 600).length;
    assert.equal(long, 100);
    const malformed = ["{not json", '{"event_type":"teleport"}'];
    await publishLines(strict, nats.js, [...good, ...malformed], { idPrefix: "a" });
    const first = await startWorker(["stages.enrich.config.max_event_bytes=600"]);
    // A message on dedupe's input that is not an envelope: dead-lettered by the later stage.
    await nats.js.publish(stageSubject(strict, "dedupe", 0), new TextEncoder().encode("not an envelope"));
    await drained(strict, nats);
    await first.w.stop();
    assert.equal((await nats.jsm.streams.info(streamName(strict, "events"))).state.messages, 900);

    const list = await cli<DlqSummary>(["list", "--json"]);
    assert.equal(list.code, 0, list.err);
    assert.equal(list.json!.total, 103);
    assert.deepEqual(list.json!.by_stage, { enrich: { oversized: 100, malformed_json: 1, unknown_event_type: 1 }, dedupe: { bad_envelope: 1 } });
    const sample = list.json!.samples.find((x) => x.reason === "oversized")!;
    assert.match(sample.message, /max_event_bytes is 600/);
    assert.match(sample.data, /… \(\d+ bytes\)$/, "long bytes are cut in samples");
    assert.equal(list.json!.samples.filter((x) => x.reason === "oversized").length, 2, "two samples per stage and reason by default");
    const onlyDedupe = await cli<DlqSummary>(["list", "--stage", "dedupe", "--json"]);
    assert.equal(onlyDedupe.json!.total, 1);

    // The fix: the default limit. Workers restart with it; then every letter is redriven.
    const fixed = await startWorker([]);
    const dry = await cli<RedriveResult>(["redrive", "--dry-run", "--json"]);
    assert.deepEqual(dry.json!.by_stage, { enrich: 102, dedupe: 1 });
    assert.equal((await readStream(nats, streamName(strict, "dlq"))).length, 103, "a dry run changes nothing");
    const r1 = await cli<RedriveResult>(["redrive", "--yes", "--json"]);
    assert.equal(r1.code, 0, r1.err);
    assert.equal(r1.json!.redriven, 103);
    await drained(fixed.p, nats);
    await eventually("the failures to come back", async () => (await readStream(nats, streamName(strict, "dlq"))).length === 3, 10_000);

    // Each fixed event is output exactly once.
    const ids = new Map<string, number>();
    for (const m of await readStream(nats, streamName(strict, "events"))) {
      const id = (JSON.parse(m.data) as { event: { event_id: string } }).event.event_id;
      ids.set(id, (ids.get(id) ?? 0) + 1);
    }
    assert.equal(ids.size, 1000);
    assert.ok([...ids.values()].every((n) => n === 1));
    // What still fails is back once, marked as redriven, with its original bytes and subject.
    const back = await readStream(nats, streamName(strict, "dlq"));
    assert.deepEqual(back.map((m) => m.headers["Tacit-Redriven"]), ["1", "1", "1"]);
    assert.deepEqual(back.map((m) => m.data).sort(), [...malformed, "not an envelope"].sort());
    assert.ok(back.some((m) => m.headers["Tacit-Source-Subject"] === stageSubject(strict, "dedupe", 0)), "the later stage's letter went back to its partition subject");

    // Not redriven again by default…
    const r2 = await cli<RedriveResult>(["redrive", "--yes", "--json"]);
    assert.deepEqual({ redriven: r2.json!.redriven, skipped: r2.json!.skipped_already_redriven }, { redriven: 0, skipped: 3 });
    // …only when asked, and then it comes back once more, counted.
    const r3 = await cli<RedriveResult>(["redrive", "--again", "--reason", "bad_envelope", "--yes", "--json"]);
    assert.equal(r3.json!.redriven, 1);
    await drained(fixed.p, nats);
    await eventually("the bad envelope to come back", async () => (await readStream(nats, streamName(strict, "dlq"))).some((m) => m.headers["Tacit-Redriven"] === "2"), 10_000);
    assert.equal((await readStream(nats, streamName(strict, "dlq"))).length, 3);

    for (const args of [["frobnicate"], ["list", "--reason", "nope"], ["redrive", "--stage", "nope"]]) {
      const bad = await cli(args);
      assert.equal(bad.code, 2, `${args.join(" ")}: ${bad.err}`);
    }
  } finally {
    for (const { w, r } of workers) {
      await w.stop().catch(() => undefined);
      r.disconnect();
    }
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  }
});

// `tacit evaluate <pipeline> --truth FILE` on real nats-server and redis-server: simulated traffic
// with its truth file, the default pipeline under a prefix of its own, an in-process worker
// (not dev mode, a real key), then the CLI reads labels, bot decisions and features live.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { findOperator } from "../operators/index.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { defaultPipelinePath } from "../src/config/paths.js";
import { stageGroups, streamName } from "../src/config/topology.js";
import type { Report } from "../src/eval/evaluate.js";
import { explicitAgreement, ratingsFromEvents, type ExplicitReport } from "../src/eval/explicit.js";
import { collectLiveExplicit } from "../src/eval/live.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { Worker } from "../src/runtime/worker.js";
import { simulate } from "../src/sim/simulate.js";
import { withServers } from "./harness.js";
import { consumersDrained, eventually } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const KEY = "t1:evaluate-live-test-secret-0123";
// As `tacit demo`: a short idle timeout so sessions close (and session labels come) within the test.
const SET = ["--set", "name=evlive", "--set", "subject_prefix=evlive", "--set", "event_time.idle_timeout=10s"];
const silent = { debug() {}, info() {}, warn() {}, error() {} };

async function run(args: string[], env: Record<string, string>): Promise<{ code: number | null; out: string; err: string }> {
  const p = spawnTacit(args, env);
  const code = await p.exited();
  return { code, out: p.stdout(), err: p.stderr() };
}

test("tacit evaluate <pipeline> --truth: labels, bots and features read live from a running pipeline", { timeout: 90_000 }, (t) =>
  withServers(t, async (servers) => {
    const dir = mkdtempSync(join(tmpdir(), "tacit-evlive-"));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY, TACIT_HOME: join(dir, "home"), TACIT_LOG_LEVEL: "warn" };
    const file = defaultPipelinePath();
    const sets = SET.filter((_, i) => i % 2 === 1);
    const p = loadPipelineOrThrow(file, { set: sets, env, operators: findOperator });

    // Two hours of event time ending an hour ago, as the demo publishes, so sessions close on the watermark.
    const sim = simulate({ seed: "5", users: 80, durationMs: 2 * 3_600_000, startTime: Date.now() - 3 * 3_600_000, botFraction: 0.3 });
    const truthFile = join(dir, "truth.jsonl");
    writeFileSync(truthFile, sim.truth.map((r) => JSON.stringify(r)).join("\n") + "\n");

    const nats = await connectNats(p, "evaluate-live-test");
    const redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env, devMode: false, redis, nats });
    let stopped = false;
    try {
      await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
      await worker.start();
      await publishLines(p, nats.js, sim.events, { idPrefix: "evlive" });
      const inputs = stageGroups(p, findOperator).map((g) => g.inputStream);
      let streak = 0;
      await eventually("the pipeline to drain", async () => {
        streak = (await consumersDrained(nats, inputs)) ? streak + 1 : 0;
        return streak >= 3;
      }, 40_000, 250);
      await worker.stop();
      stopped = true;
      const labelMessages = (await nats.jsm.streams.info(streamName(p, "labels"))).state.messages;
      assert.ok(labelMessages > 0, "the pipeline made labels");

      const live = await run(["evaluate", file, "--truth", truthFile, "--json", ...SET], env);
      assert.equal(live.code, 0, live.err);
      const report = JSON.parse(live.out) as Report & { notes: string[] };
      assert.ok(report.labels.received > 0);
      assert.equal(report.labels.received, labelMessages);
      assert.ok(report.bots !== null && report.bots.filtered > 0, JSON.stringify(report.bots));
      assert.ok(Array.isArray(report.targets) && report.targets.length > 0);
      assert.match(report.score.source, /features/, "features read from Redis");
      assert.ok(!report.notes.some((n) => /development pseudonym key|no label's user matches/.test(n)), report.notes.join("; "));

      // --explicit, live: the ratings come from the response features label-derive keeps in Redis
      // (no truth needed); they must give what the published events give for the same labels.
      const explicit = await run(["evaluate", file, "--explicit", "--json", ...SET], env);
      assert.equal(explicit.code, 0, explicit.err);
      const agreement = JSON.parse(explicit.out) as ExplicitReport & { notes: string[] };
      const liveLabels = await collectLiveExplicit(p, nats, redis);
      assert.ok(agreement.labels_rated > 0, explicit.out);
      assert.deepEqual({ ...agreement, notes: undefined }, { ...explicitAgreement(liveLabels.labels, ratingsFromEvents(sim.events.join("\n"))), notes: undefined });
      const withTruth = await run(["evaluate", file, "--explicit", "--truth", truthFile, ...SET], env);
      assert.equal(withTruth.code, 0, withTruth.err);
      assert.match(withTruth.out, /(positive|negative)\s+all\s+\d+\s+\d+\s+[\d.]+\s+\[[\d.]+, [\d.]+\]\s+[\d.]+\s+\[/);

      // The pipeline used a real key: without it the development key is not accepted (exit 2).
      const noKey = await run(["evaluate", file, "--truth", truthFile, ...SET], { ...env, TACIT_PSEUDONYM_KEY: "" });
      assert.equal(noKey.code, 2, noKey.err);
      assert.match(noKey.err, /TACIT_PSEUDONYM_KEY/);

      // Unreachable NATS: exit 1 with one line.
      const down = await run(["evaluate", file, "--truth", truthFile, ...SET], { ...env, NATS_URL: "nats://127.0.0.1:1" });
      assert.equal(down.code, 1, down.err);
      assert.match(down.err, /^tacit: cannot connect to NATS at nats:\/\/127\.0\.0\.1:1[^\n]*\n$/);

      // A pipeline that cannot be loaded: exit 2 naming file and line.
      const bad = join(dir, "bad.yaml");
      writeFileSync(bad, "name: x\npartitions: [\n");
      const broken = await run(["evaluate", bad, "--truth", truthFile], env);
      assert.equal(broken.code, 2, broken.err);
      assert.match(broken.err, /bad\.yaml:\d+/);
    } finally {
      if (!stopped) await worker.stop().catch(() => undefined);
      redis.disconnect();
      await nats.nc.drain().catch(() => undefined);
    }
  }),
);

// Retraction end to end on real nats-server and redis-server: simulated traffic with 30 % bots and
// more traffic after the simulated span (so watermarks pass it), the default pipeline (probation:
// hold) with an in-process worker. Labels of bots flagged late were published and are retracted:
// the final view (latest revision per label_id, not retracted, weight > 0) holds no label of a bot
// user by the truth file, counted here from the label stream and by `tacit evaluate`, and the
// bots' label weights and signal counts in Redis are back to 0.
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
import type { Label } from "../src/core/label.js";
import { pseudonymize, resolvePseudonymKey } from "../src/core/pseudonym.js";
import type { Report } from "../src/eval/evaluate.js";
import { responseFeaturesKey } from "../src/labels/features.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { Worker } from "../src/runtime/worker.js";
import { simulate } from "../src/sim/simulate.js";
import { withServers } from "./harness.js";
import { consumersDrained, eventually, readLabelStream } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const KEY = "t1:retraction-e2e-test-secret-0123";
const SET = ["name=retract", "subject_prefix=retract", "event_time.idle_timeout=5s"];
const silent = { debug() {}, info() {}, warn() {}, error() {} };
const HOUR = 3_600_000;

test("bots flagged late: their published labels are retracted on the live stream; the final view holds none, their features are back to 0", { timeout: 120_000 }, (t) =>
  withServers(t, async (servers) => {
    const dir = mkdtempSync(join(tmpdir(), "tacit-retract-"));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY, TACIT_HOME: join(dir, "home"), TACIT_LOG_LEVEL: "warn" };
    const file = defaultPipelinePath();
    const p = loadPipelineOrThrow(file, { set: SET, env, operators: findOperator });

    // Two hours of traffic, then an hour more from other users: the simulated span is followed by traffic.
    const start = Date.now() - 4 * HOUR;
    const sim = simulate({ seed: "33", users: 100, durationMs: 2 * HOUR, startTime: start, botFraction: 0.3 });
    const after = simulate({ seed: "34", users: 30, durationMs: HOUR, startTime: start + 2 * HOUR, botFraction: 0.3 });
    const truthFile = join(dir, "truth.jsonl");
    writeFileSync(truthFile, sim.truth.map((r) => JSON.stringify(r)).join("\n") + "\n");

    const nats = await connectNats(p, "retraction-e2e-test");
    const redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env, devMode: false, redis, nats });
    let stopped = false;
    try {
      await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
      await worker.start();
      await publishLines(p, nats.js, sim.events, { idPrefix: "span" });
      await publishLines(p, nats.js, after.events, { idPrefix: "after" });
      const inputs = stageGroups(p, findOperator).map((g) => g.inputStream);
      // Drained, and no label for longer than the idle timeout (idle partitions close their sessions).
      let streak = 0;
      let last = -1;
      await eventually(
        "the pipeline to drain and its labels to settle",
        async () => {
          const n = (await nats.jsm.streams.info(streamName(p, "labels"))).state.messages;
          streak = (await consumersDrained(nats, inputs)) && n === last ? streak + 1 : 0;
          last = n;
          return streak >= 7;
        },
        90_000,
        1000,
      );
      await worker.stop();
      stopped = true;

      // The independent count: every label message, the final view by hand, users by the truth.
      const { key } = resolvePseudonymKey(env, "TACIT_PSEUDONYM_KEY", false);
      const bots = new Map<string, string>();
      for (const u of [...sim.truth, ...after.truth]) if (u.kind === "user" && u.is_bot) bots.set(pseudonymize(key, u.user_id), u.user_id);
      const spanUsers = new Set(sim.truth.flatMap((u) => (u.kind === "user" ? [pseudonymize(key, u.user_id)] : [])));
      const all = (await readLabelStream(nats, streamName(p, "labels"))).map((m) => JSON.parse(m.data) as Label);
      const latest = new Map<string, Label>();
      for (const l of all) if ((latest.get(l.label_id)?.revision ?? -1) < l.revision) latest.set(l.label_id, l);
      const retracted = [...latest.values()].filter((l) => l.retracted === true);
      const live = [...latest.values()].filter((l) => l.retracted !== true && l.weight > 0);
      assert.ok(retracted.length > 0, "some labels were published and then retracted");
      for (const r of retracted) {
        assert.equal(r.weight, 0);
        assert.match(r.retracted_reason ?? "", /^bot/);
        assert.ok(bots.has(r.user), `retracted label ${r.label_id} is of a bot user`);
        assert.ok(all.some((l) => l.label_id === r.label_id && l.revision < r.revision && l.weight > 0), `${r.label_id} was live before`);
      }
      assert.deepEqual(live.filter((l) => bots.has(l.user)).map((l) => [l.label_id, bots.get(l.user)]), [], "no live label of a bot user");
      assert.ok(live.length > 200, `live labels: ${live.length}`);

      // The bots' label weights and signal counts are taken back.
      for (const r of [...sim.truth, ...after.truth]) {
        if (r.kind !== "response" || !r.is_bot_user) continue;
        const f = await redis.hgetall(responseFeaturesKey(p.subject_prefix, pseudonymize(key, r.user_id), r.response_id));
        for (const field of ["pos_weight", "neg_weight", "signal_count"]) assert.equal(Number(f[field] ?? 0), 0, `${r.response_id} ${field}`);
      }

      // tacit evaluate judges the same final view (of the span's users: the truth file is the span's).
      const ev = spawnTacit(["evaluate", file, "--truth", truthFile, "--json", ...SET.flatMap((s) => ["--set", s])], env);
      assert.equal(await ev.exited(), 0, ev.stderr());
      const report = JSON.parse(ev.stdout()) as Report;
      assert.equal(report.labels.from_bots, 0);
      assert.equal(report.bots?.recall, 1, "bot-score flags every bot of this seed");
      assert.equal(report.delivery.published_then_retracted_bots, retracted.filter((l) => spanUsers.has(l.user)).length);
      assert.ok(report.delivery.published_then_retracted_bots > 0);
      assert.equal(report.delivery.retractions, all.filter((l) => l.retracted).length);
      t.diagnostic(`labels ${all.length}, final view ${live.length}, retracted ${retracted.length}; evaluate: positive precision ${report.positive.precision?.toFixed(3)}, coverage ${report.coverage?.toFixed(3)}`);
    } finally {
      if (!stopped) await worker.stop().catch(() => undefined);
      redis.disconnect();
      await nats.nc.drain().catch(() => undefined);
    }
  }),
);

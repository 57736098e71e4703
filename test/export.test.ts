// `tacit export <pipeline> labels|features` on real nats-server and redis-server: simulated traffic
// through the default pipeline (an in-process worker), one synthetic retraction published on the
// label subject, then the CLI exports the final view and DuckDB reads it back, as an ML team would.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DuckDBInstance, type DuckDBConnection } from "@duckdb/node-api";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { Redis } from "ioredis";
import { findOperator } from "../operators/index.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { defaultPipelinePath } from "../src/config/paths.js";
import { outputSubject, stageGroups, streamName } from "../src/config/topology.js";
import type { Label } from "../src/core/label.js";
import { parsePseudonymKey, pseudonymize } from "../src/core/pseudonym.js";
import { userKey } from "../src/core/state.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { Worker } from "../src/runtime/worker.js";
import { simulate } from "../src/sim/simulate.js";
import { withServers } from "./harness.js";
import { consumersDrained, eventually, readLabelStream } from "./support/streams.js";
import { spawnTacit } from "./support/tacit-process.js";

const KEY = "t1:export-test-secret-0123456789";
const SET = ["--set", "name=exp", "--set", "subject_prefix=exp", "--set", "event_time.idle_timeout=10s"];
const silent = { debug() {}, info() {}, warn() {}, error() {} };

async function tacit(args: string[], env: Record<string, string>): Promise<{ code: number | null; out: string; err: string }> {
  const p = spawnTacit(args, env);
  const code = await p.exited();
  return { code, out: p.stdout(), err: p.stderr() };
}

async function rows(db: DuckDBConnection, sql: string): Promise<Record<string, unknown>[]> {
  return (await db.runAndReadAll(sql)).getRowObjectsJson() as Record<string, unknown>[];
}

test("tacit export: labels as Parquet and JSONL (one row per live label_id at its latest revision, typed columns, --kind, --from/--to, retractions), features as Parquet", { timeout: 120_000 }, (t) =>
  withServers(t, async (servers) => {
    const dir = mkdtempSync(join(tmpdir(), "tacit-export-"));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY, TACIT_HOME: join(dir, "home"), TACIT_LOG_LEVEL: "warn" };
    const file = defaultPipelinePath();
    const p = loadPipelineOrThrow(file, { set: SET.filter((_, i) => i % 2 === 1), env, operators: findOperator });

    const sim = simulate({ seed: "11", users: 60, durationMs: 2 * 3_600_000, startTime: Date.now() - 3 * 3_600_000, botFraction: 0.2 });
    const nats = await connectNats(p, "export-test");
    const redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
    // The product's assignment service: a cohort per user, which enrich looks up and labels carry.
    const key = parsePseudonymKey(KEY);
    for (const r of sim.truth) if (r.kind === "user") await redis.hset(userKey(p.subject_prefix, pseudonymize(key, r.user_id), "context"), { cohort: `c-${r.user_id.length % 3}` });
    const worker = new Worker({ pipeline: p, operators: findOperator, log: silent, env, devMode: false, redis, nats });
    let stopped = false;
    const duck = await (await DuckDBInstance.create(":memory:")).connect();
    try {
      await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
      await worker.start();
      await publishLines(p, nats.js, sim.events, { idPrefix: "export" });
      const inputs = stageGroups(p, findOperator).map((g) => g.inputStream);
      let streak = 0;
      await eventually("the pipeline to drain", async () => {
        streak = (await consumersDrained(nats, inputs)) ? streak + 1 : 0;
        return streak >= 3;
      }, 60_000, 250);
      await worker.stop();
      stopped = true;

      // A retraction, as label-derive publishes one when a label's user is later flagged as a bot.
      const stream = streamName(p, "labels");
      const before = (await readLabelStream(nats, stream)).map((m) => JSON.parse(m.data) as Label);
      const victim = before.find((l) => l.kind === "response" && l.weight > 0)!;
      const retraction: Label = { ...victim, revision: victim.revision + 100, weight: 0, retracted: true, retracted_reason: "bot", emitted_at: new Date().toISOString() };
      const h = natsHeaders();
      h.set("Nats-Msg-Id", `label:${retraction.label_id}:${retraction.revision}`);
      await nats.js.publish(outputSubject(p, "labels.response"), JSON.stringify(retraction), { headers: h });

      // The expected final view, computed here from the stream (every message validated against label.v2.json).
      const msgs = await readLabelStream(nats, stream);
      const latest = new Map<string, { label: Label; data: string }>();
      for (const m of msgs) {
        const l = JSON.parse(m.data) as Label;
        const cur = latest.get(l.label_id);
        if (!cur || l.revision >= cur.label.revision) latest.set(l.label_id, { label: l, data: m.data });
      }
      const live = [...latest.values()].filter((x) => x.label.retracted !== true);
      // The synthetic one, and those label-derive published for bots bot-score flagged late.
      const retracted = latest.size - live.length;
      assert.ok(live.length > 100 && latest.size < msgs.length, `labels with revisions (${live.length} live of ${msgs.length} messages)`);
      assert.ok(!live.some((x) => x.label.label_id === victim.label_id));
      const sum = (ls: { label: Label }[]) => ls.reduce((a, x) => a + x.label.weight, 0);

      // Parquet.
      const pq = join(dir, "labels.parquet");
      const r = await tacit(["export", file, "labels", "--out", pq, "--json", ...SET], env);
      assert.equal(r.code, 0, r.err);
      const summary = JSON.parse(r.out) as { rows: number; messages: number; labels: number; retracted_left_out: number; partitions: number };
      assert.deepEqual([summary.rows, summary.messages, summary.labels, summary.retracted_left_out, summary.partitions], [live.length, msgs.length, latest.size, retracted, 1]);
      const src = `read_parquet('${pq}')`;
      const [agg] = await rows(duck, `SELECT count(*)::INT AS n, count(DISTINCT label_id)::INT AS ids, sum(weight) AS w FROM ${src}`);
      assert.equal(agg!.n, live.length, "one row per live label_id");
      assert.equal(agg!.ids, live.length);
      assert.ok(Math.abs((agg!.w as number) - sum(live)) < 1e-6, `summed weight ${String(agg!.w)} = the stream's latest revisions ${sum(live)}`);
      const got = new Map((await rows(duck, `SELECT label_id, revision::INT AS revision FROM ${src}`)).map((x) => [x.label_id as string, x.revision as number]));
      assert.deepEqual(got, new Map(live.map((x) => [x.label.label_id, x.label.revision])), "each at its latest revision");
      const types = Object.fromEntries((await rows(duck, `DESCRIBE SELECT * FROM ${src}`)).map((x) => [x.column_name, x.column_type]));
      assert.deepEqual(
        [types.weight, types.revision, types.event_time, types.emitted_at, types.signals, types.experiment, types.retracted, types.position, types.propensity, types.kind],
        ["DOUBLE", "BIGINT", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP WITH TIME ZONE", "STRUCT(event_id VARCHAR, event_type VARCHAR)[]", "STRUCT(id VARCHAR, variant VARCHAR)", "BOOLEAN", "INTEGER", "DOUBLE", "VARCHAR"],
      );
      const enc = Object.fromEntries((await rows(duck, `SELECT path_in_schema AS c, string_agg(DISTINCT encodings, ',') AS e FROM parquet_metadata('${pq}') GROUP BY 1`)).map((x) => [x.c, x.e]));
      assert.match(String(enc.kind), /DICTIONARY/, "low-cardinality strings are dictionary-encoded");
      // The v2 fields arrive filled from the simulator's events and enrich's context lookup.
      const [v2] = await rows(duck, `SELECT count(model)::INT AS model, count(experiment)::INT AS exp, count(cohort)::INT AS cohort, count(device)::INT AS device, count(position)::INT AS pos, count(*) FILTER (WHERE schema_version = 2)::INT AS v2 FROM ${src}`);
      for (const [f, n] of Object.entries(v2!)) assert.ok((n as number) > 0, `${f} is filled`);
      const one = live.find((x) => x.label.kind === "preference")!.label;
      const [row] = await rows(duck, `SELECT signals, epoch_ms(event_time)::BIGINT::VARCHAR AS et, rule_version FROM ${src} WHERE label_id = '${one.label_id}'`);
      assert.deepEqual(row!.signals, one.signals);
      assert.equal(Number(row!.et), Date.parse(one.event_time));
      assert.equal(row!.rule_version, String(one.rule_version));

      // The spill path (bounded memory): the same rows when at most 40 messages are held at once.
      const spilled = join(dir, "spilled.parquet");
      const sp = await tacit(["export", file, "labels", "--out", spilled, "--max-in-memory", "40", "--json", ...SET], env);
      assert.equal(sp.code, 0, sp.err);
      assert.ok((JSON.parse(sp.out) as { partitions: number }).partitions > 1);
      const [diff] = await rows(duck, `SELECT count(*)::INT AS n FROM ((SELECT * EXCLUDE (signals) FROM read_parquet('${spilled}')) EXCEPT (SELECT * EXCLUDE (signals) FROM ${src}))`);
      const [n2] = await rows(duck, `SELECT count(*)::INT AS n FROM read_parquet('${spilled}')`);
      assert.deepEqual([diff!.n, n2!.n], [0, live.length]);

      // JSONL: the latest messages as published; --include-retracted keeps the retraction.
      const jl = join(dir, "labels.jsonl");
      const j = await tacit(["export", file, "labels", "--format", "jsonl", "--out", jl, "--include-retracted", ...SET], env);
      assert.equal(j.code, 0, j.err);
      const lines = readFileSync(jl, "utf8").trim().split("\n");
      assert.deepEqual(new Set(lines), new Set([...latest.values()].map((x) => x.data)));
      assert.equal(lines.map((l) => JSON.parse(l) as Label).find((l) => l.label_id === victim.label_id)?.retracted, true);

      // --kind and --from/--to select on the latest revision.
      const times = live.map((x) => Date.parse(x.label.event_time)).sort((a, b) => a - b);
      const from = new Date(times[Math.floor(times.length / 3)]!).toISOString();
      const to = new Date(times[Math.floor((2 * times.length) / 3)]!).toISOString();
      const sel = join(dir, "sel.parquet");
      const k = await tacit(["export", file, "labels", "--kind", "session", "--from", from, "--to", to, "--out", sel, ...SET], env);
      assert.equal(k.code, 0, k.err);
      const want = live.filter((x) => x.label.kind === "session" && x.label.event_time >= from && Date.parse(x.label.event_time) < Date.parse(to));
      const kinds = await rows(duck, `SELECT kind, count(*)::INT AS n FROM read_parquet('${sel}') GROUP BY kind`);
      assert.ok(want.length > 0);
      assert.deepEqual(kinds, [{ kind: "session", n: want.length }]);

      // Features: one row per response stored in Redis, typed.
      const fq = join(dir, "responses.parquet");
      const f = await tacit(["export", file, "features", "--entity", "response", "--out", fq, "--json", ...SET], env);
      assert.equal(f.code, 0, f.err);
      const keys = await redis.keys(`tacit:{${p.subject_prefix}:u:*}:features:response:*`);
      let pos = 0;
      for (const kk of keys) pos += Number((await redis.hget(kk, "pos_weight")) ?? 0);
      const [fa] = await rows(duck, `SELECT count(*)::INT AS n, count(DISTINCT response_id)::INT AS ids, sum(pos_weight) AS pos FROM read_parquet('${fq}')`);
      assert.deepEqual([fa!.n, fa!.ids], [keys.length, keys.length]);
      assert.ok(Math.abs((fa!.pos as number) - pos) < 1e-6);
      const ft = Object.fromEntries((await rows(duck, `DESCRIBE SELECT * FROM read_parquet('${fq}')`)).map((x) => [x.column_name, x.column_type]));
      assert.deepEqual([ft.pos_weight, ft.signal_count, ft.last_event_time, ft.query_id], ["DOUBLE", "BIGINT", "TIMESTAMP WITH TIME ZONE", "VARCHAR"]);

      // Exit codes: bad usage 2, unreachable NATS 1 (nothing written).
      const bad = await tacit(["export", file, "labels", "--from", "yesterday", "--out", join(dir, "x.parquet"), ...SET], env);
      assert.equal(bad.code, 2, bad.err);
      const down = await tacit(["export", file, "labels", "--out", join(dir, "y.parquet"), ...SET], { ...env, NATS_URL: "nats://127.0.0.1:1" });
      assert.equal(down.code, 1, down.err);
      assert.match(down.err, /^tacit: [^\n]*cannot connect to NATS at nats:\/\/127\.0\.0\.1:1[^\n]*\n$/);
    } finally {
      duck.closeSync();
      if (!stopped) await worker.stop().catch(() => undefined);
      redis.disconnect();
      await nats.nc.drain().catch(() => undefined);
    }
  }),
);

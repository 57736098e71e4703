import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { Redis } from "ioredis";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope, EventType } from "../src/core/event.js";
import { isKeyedProcessor, type KeyedInput, type OperatorContext } from "../src/core/operator.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../src/core/pseudonym.js";
import { readFeatures } from "../src/labels/features.js";
import { KeyedChain, emptyResult } from "../src/runtime/chain.js";
import { StageState } from "../src/runtime/keyed-state.js";
import { RedisStateStore } from "../src/state/redis.js";
import { labelDerive } from "../operators/label-derive.js";
import { startServers, type TestServers } from "./harness.js";

/*
 * label-derive's commits on a real Redis (the Lua commit script, TTLs, numbers as Redis stores
 * them), made by the runtime's keyed chain as the worker makes them, read back with readFeatures
 * and with the `tacit features` command.
 */

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const USER = pseudonymize(DEV_PSEUDONYM_KEY, "carol");
const T0 = Date.parse("2026-01-01T10:00:00Z");

let servers: TestServers;
let redis: Redis;
let store: RedisStateStore;

before(async () => {
  servers = await startServers();
  redis = new Redis(servers.redisUrl, { maxRetriesPerRequest: 1 });
  store = new RedisStateStore(redis);
});

after(async () => {
  redis?.disconnect();
  await servers?.stop();
});

function input(seq: number, type: EventType, atSec: number, payload: Record<string, unknown> = {}): KeyedInput {
  const ts = T0 + atSec * 1000;
  const envelope: Envelope = {
    v: 1,
    event: { event_id: `e-${seq}`, session_id: "x", user: USER, user_key_version: "dev", timestamp: new Date(ts).toISOString(), ts, event_type: type, payload, query_id: "q-1", response_id: "r-1" },
    src: { seq },
    partition: 0,
    attrs: { bot: { score: 0.02, band: "human", indicators: [] }, session: { id: "s-carol-1", seq_in_session: seq } },
  };
  return { seq, subject: "feedback.x.label-derive.0", data: new Uint8Array(), envelope, deliveries: 1, stream_time_ms: ts, watermark_ms: ts - 5000, partition: 0 };
}

/** `tacit features …` through a program that registers only that command (main.ts wiring is separate). */
function features(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const script = `
    import { Command } from "commander";
    import { registerFeatures } from "./dist/src/cli/features.js";
    const program = new Command().exitOverride();
    registerFeatures(program);
    await program.parseAsync(["node", "tacit", "features", ...JSON.parse(process.argv[1])]);
  `;
  const r = spawnSync(process.execPath, ["--input-type=module", "-e", script, JSON.stringify(args)], {
    cwd: ROOT,
    encoding: "utf8",
    env: { ...process.env, REDIS_URL: servers.redisUrl, NATS_URL: servers.natsUrl, TACIT_PSEUDONYM_KEY: "", TACIT_LOG_LEVEL: "silent" },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test("label-derive's commits apply on Redis, twice applied once, and `tacit features` reads them", async () => {
  const noop = (): void => {};
  const ctx: OperatorContext = {
    pipeline: "feedback",
    prefix: "feedback",
    stage: "label-derive",
    partitions: 1,
    state: store,
    clock: new ManualClock(T0),
    log: { debug: noop, info: noop, warn: noop, error: noop },
    metrics: { count: noop },
    env: {},
    devMode: true,
  };
  // Probation off: this test is about the feature layout and the CLI, not about when labels are released.
  const proc = await labelDerive.create({ probation: { enabled: false } }, ctx);
  assert.ok(isKeyedProcessor(proc));
  const batch = [input(1, "response_shown", 0, { text_length: 1000 }), input(2, "copy_paste", 30, { span_length: 500 }), input(3, "accept", 40)];
  /** One batch through a fresh worker's chain (its state read from Redis); the commit groups it makes. */
  const runBatch = async () => {
    const chain = new KeyedChain([{ name: "label-derive", proc, state: new StageState(store, "feedback", "label-derive", 0, proc.codec, ctx.log), counters: ctx.metrics, clock: new ManualClock(T0) }], 0);
    const results = batch.map(emptyResult);
    const sink = emptyResult();
    // The watermark after the batch reaches its last event (as later traffic moves it): nothing stays held for event-time order.
    await chain.run(batch.map((i, msg) => ({ msg, input: i })), batch[batch.length - 1]!.envelope.event.ts, results, sink);
    return { results, groups: chain.takeCommits(results, sink, T0 + 40_000).flat() };
  };
  const first = await runBatch();
  assert.ok(first.groups.some((g) => g.ops.some((op) => op.key === `tacit:{feedback:u:${USER}}:label-derive:state`) && g.ops.some((op) => op.op === "hincrbyfloat")), "the user's state and features in one group");
  assert.deepEqual(await store.commit(first.groups), first.groups.map(() => true));
  // A redelivered batch (a crash before the ack): a new worker reads the user's guard from Redis,
  // recognises every input as applied, and has nothing to commit.
  const again = await runBatch();
  assert.deepEqual(again.results.map((r) => r.dropped), ["already_applied", "already_applied", "already_applied"]);
  assert.deepEqual(again.groups, []);

  const r = await readFeatures(store, "feedback", "response", "r-1");
  assert.equal(r!.user, USER);
  assert.equal(r!.fields.signal_count, 2);
  assert.ok(Math.abs((r!.fields.pos_weight as number) - (0.4 + 1.4 * 0.5 + 1)) < 1e-9, String(r!.fields.pos_weight));
  const ttl = await redis.pttl(`tacit:{feedback:u:${USER}}:features:response:r-1`);
  assert.ok(ttl > 6 * 86_400_000 && ttl <= 7 * 86_400_000, `response TTL ${ttl}`);

  const json = features(["pipelines/feedback.yaml", "get", "response", "r-1", "--json"]);
  assert.equal(json.status, 0, json.stderr);
  const rec = JSON.parse(json.stdout) as { entity: string; id: string; user: string; fields: Record<string, unknown> };
  assert.deepEqual([rec.entity, rec.id, rec.user, rec.fields.signal_count], ["response", "r-1", USER, 2]);

  const human = features(["pipelines/feedback.yaml", "get", "user", "--raw-user", "carol"]);
  assert.equal(human.status, 0, human.stderr);
  assert.match(human.stdout, new RegExp(`^user ${USER}`));
  assert.match(human.stdout, /count_copy_paste\s+1\s+events of the user per event type/);
  assert.match(human.stderr, /development key/);

  const session = features(["pipelines/feedback.yaml", "get", "session", "s-carol-1", "--json"]);
  assert.equal(session.status, 0, session.stderr);
  assert.equal((JSON.parse(session.stdout) as { fields: { events: number } }).fields.events, 3);

  const missing = features(["pipelines/feedback.yaml", "get", "response", "r-none"]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /no features for response r-none/);
  const bad = features(["pipelines/feedback.yaml", "get", "query", "q-1"]);
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /unknown entity "query"/);
});

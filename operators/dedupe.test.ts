import { test } from "node:test";
import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { ManualClock } from "../src/core/clock.js";
import { BadInputError, TransientError } from "../src/core/errors.js";
import type { Envelope } from "../src/core/event.js";
import { NO_FEATURES, type KeyScope, type KeyedInput, type OperatorContext, type Outcome } from "../src/core/operator.js";
import { userKey } from "../src/core/state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { OperatorHarness } from "../test/support/operator-harness.js";
import { compileDedupeConfig, dedupe, dedupeCodec, MAX_IDS_PER_USER, STATE_TTL_MARGIN_MS, type DedupeConfig, type DedupeState } from "./dedupe.js";

const T0 = Date.UTC(2024, 4, 1, 12);
const HOUR = 3_600_000;

/** A dedupe stage run by the runtime's code; `wall` is the store's expiry clock (a fake wall clock). */
function harness(config: DedupeConfig = {}, wall = { t: T0 }): OperatorHarness<DedupeConfig> {
  return new OperatorHarness(dedupe, config, { stage: "dedupe", prefix: "feedback", storeNow: () => wall.t });
}

/** Pushes envelopes and returns their outcomes; one input per batch unless told. */
async function run(h: OperatorHarness<DedupeConfig>, envs: Envelope[], batchSize = 1): Promise<Outcome[]> {
  const from = h.log.length;
  await h.push(0, envs, { batchSize });
  return h.log.slice(from).map((l) => l.outcome);
}

/** The user's stored value, decoded: the applied sequence and the state. */
async function stored(h: OperatorHarness<DedupeConfig>, user: string, windowMs = 24 * HOUR): Promise<{ applied: number; state: DedupeState }> {
  const { applied, payload } = await h.stored(user);
  return { applied, state: dedupeCodec(windowMs).decode(payload) };
}

/**
 * The operator alone on one user's in-memory state, without the runtime's guard in front of it:
 * for inputs the harness cannot make (a new stream sequence for a known origin, no envelope).
 */
async function direct(config: DedupeConfig = {}): Promise<(e: Envelope | undefined, seq: number) => Outcome> {
  const ctx: OperatorContext = {
    pipeline: "feedback",
    prefix: "feedback",
    stage: "dedupe",
    partitions: 4,
    state: new MemoryStateStore(),
    clock: new ManualClock(T0),
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count() {} },
    env: {},
    devMode: false,
  };
  const proc = await dedupe.create(config, ctx);
  let state: DedupeState | undefined;
  const key: KeyScope<DedupeState> = { user: "U1", partition: 0, get: () => state, put: (s) => (state = s), clear: () => (state = undefined), setTimer() {}, features: NO_FEATURES };
  return (e, seq) => proc.processElement({ seq, subject: "feedback.x.dedupe.0", data: new Uint8Array(), envelope: e, deliveries: 1, stream_time_ms: T0 } as KeyedInput, key);
}

function env(eventId: string, srcSeq: number, user = "U1", ts = T0): Envelope {
  return {
    v: 1,
    event: { event_id: eventId, session_id: "s", user, user_key_version: "k1", timestamp: new Date(ts).toISOString(), ts, event_type: "click", payload: { position: 1 }, response_id: "r" },
    src: { seq: srcSeq },
    partition: 0,
    attrs: {},
  };
}

function passed(o: Outcome, e: Envelope): void {
  assert.equal(o.error, undefined);
  assert.equal(o.dropped, undefined);
  assert.deepEqual(o.emits, [{ to: "next", id: `dedupe:${e.src.seq}`, value: e }]);
}

function droppedDuplicate(o: Outcome): void {
  assert.deepEqual(o, { emits: [], dropped: "duplicate" });
}

test("the first copy passes unchanged; a second copy with another origin is dropped", async () => {
  const h = harness();
  const first = env("e-1", 10);
  const [o1] = await run(h, [first]);
  passed(o1!, first);
  assert.equal(o1!.emits[0]!.value, first, "the envelope is passed on as is");
  const [o2] = await run(h, [env("e-1", 11)]);
  droppedDuplicate(o2!);
  // The record names the first copy (sequence 1 of dedupe's stream, origin 10, its event time) and lives under the user's hash tag.
  assert.deepEqual(await stored(h, "U1"), { applied: 2, state: { at: T0, ids: new Map([["e-1", { seq: 1, src: 10, ts: T0 }]]) } });
  assert.deepEqual(h.state.keys(), [userKey("feedback", "U1", "dedupe", "state")]);
  // Another user's event with the same id is not a duplicate (ids are scoped per user).
  const other = env("e-1", 12, "U2");
  passed((await run(h, [other]))[0]!, other);
});

test("a redelivery or replay of the same input passes again with the same emit id, or is the guard's once applied", async () => {
  const e = env("e-7", 42);
  // Redelivered after a crash before the commit: decided again, it passes with the same id and value
  // (the harness fails on an id re-emitted with another value).
  const h = harness();
  await h.push(0, [e], { crash: { batch: 0, at: "before_commits" } });
  const [a] = await run(h, [e]);
  passed(a!, e);
  assert.equal(h.log[h.log.length - 1]!.input.deliveries, 2);
  // Redelivered (or dedupe's durable rewound by a replay) after the user's state was committed:
  // the runtime's guard skips it as applied; it is never taken for a duplicate of itself.
  for (const at of ["mid_commits", "after_commits"] as const) {
    const m = harness();
    await m.push(0, [e], { crash: { batch: 0, at } });
    assert.deepEqual((await run(m, [e]))[0], { emits: [], dropped: "already_applied" }, at);
    assert.deepEqual(m.emits("next"), h.emits("next"), at);
    assert.equal(m.dropped("duplicate"), 0, at);
    // And a true duplicate arriving after is still dropped.
    droppedDuplicate((await run(m, [env("e-7", 43)]))[0]!);
  }
  // The operator itself, handed the claiming input again on the same state, passes it: it is itself.
  const feed = await direct();
  const [x, y] = [feed(e, 500), feed(e, 500)];
  passed(x!, e);
  passed(y!, e);
  droppedDuplicate(feed(env("e-7", 43), 501));
});

test("a copy re-published by the stage before (same origin, new stage seq) is dropped, so later stages never count it twice", async () => {
  const feed = await direct();
  const e = env("e-8", 77);
  passed(feed(e, 600), e);
  // enrich replayed beyond the stream's duplicate window: the same event arrives as a new message.
  assert.deepEqual(feed(e, 901), { emits: [], dropped: "republished" });
  // The original message again on that state still passes (in the runtime the guard stops it first, as applied).
  passed(feed(e, 600), e);
});

test("copies within one batch: the first passes, the others are dropped, with one state read", async () => {
  const h = harness();
  const batch = [env("a", 1), env("b", 2), env("a", 3), env("c", 4), env("b", 5), env("a", 6)];
  const outcomes = await run(h, batch, 100);
  assert.equal(h.stateCalls.get, 1);
  passed(outcomes[0]!, batch[0]!);
  passed(outcomes[1]!, batch[1]!);
  droppedDuplicate(outcomes[2]!);
  passed(outcomes[3]!, batch[3]!);
  droppedDuplicate(outcomes[4]!);
  droppedDuplicate(outcomes[5]!);
  // A rebuild (state wiped, the same input read again) gives the same decisions, whatever the batches.
  for (const size of [100, 1, 4]) assert.deepEqual(await run(harness(), structuredClone(batch), size), outcomes, `batches of ${size}`);
  // The same input again on the same state is the guard's: nothing passes twice.
  const again = await run(h, batch, 100);
  assert.ok(again.every((o) => o.dropped === "already_applied" && o.emits.length === 0));
  // A warm cache: the second batch read nothing.
  assert.equal(h.stateCalls.get, 1);
});

test("the window is event time: a repeat passes again once the user's time is a window past the first copy", async () => {
  const h = harness({ window: "2h" });
  passed((await run(h, [env("w", 1)]))[0]!, env("w", 1));
  droppedDuplicate((await run(h, [env("w", 2, "U1", T0 + 2 * HOUR - 1)]))[0]!);
  passed((await run(h, [env("w", 3, "U1", T0 + 2 * HOUR)]))[0]!, env("w", 3, "U1", T0 + 2 * HOUR));
  // The new copy starts a new window.
  droppedDuplicate((await run(h, [env("w", 4, "U1", T0 + 3 * HOUR)]))[0]!);

  // Repeats carry the original's time: the user's other events move the window on.
  const k = harness({ window: "2h" });
  const out = await run(k, [env("a", 1), env("b", 2, "U1", T0 + 2 * HOUR - 1), env("a", 3), env("c", 4, "U1", T0 + 2 * HOUR), env("a", 5), env("a", 6)]);
  assert.deepEqual(
    out.map((o) => o.dropped ?? o.emits[0]!.id),
    ["dedupe:1", "dedupe:2", "duplicate", "dedupe:4", "dedupe:5", "dedupe:6"],
    "a is forgotten once the user's time is 2h past it, and an event already that old is not remembered",
  );
  assert.deepEqual((await stored(k, "U1", 2 * HOUR)).state, {
    at: T0 + 2 * HOUR,
    ids: new Map([
      ["b", { seq: 2, src: 2, ts: T0 + 2 * HOUR - 1 }],
      ["c", { seq: 4, src: 4, ts: T0 + 2 * HOUR }],
    ]),
  });
});

test("the state expires a window and a margin after the user's latest event; the wall clock decides nothing else", async () => {
  const wall = { t: T0 };
  const h = harness({ window: "2h" }, wall);
  await run(h, [env("a", 1)]);
  // Hours of wall clock within the TTL change no decision.
  wall.t = T0 + 3 * HOUR - 1;
  droppedDuplicate((await run(h, [env("a", 2)]))[0]!);
  // Written again then (the runtime writes the guard with every input): it lives 2h + the margin from there.
  assert.equal(STATE_TTL_MARGIN_MS, HOUR);
  wall.t = T0 + 6 * HOUR - 2;
  assert.deepEqual(h.state.keys(), [userKey("feedback", "U1", "dedupe", "state")]);
  wall.t = T0 + 6 * HOUR - 1;
  assert.deepEqual(h.state.keys(), [], "window 2h + 1h margin from the last write");
});

test(`ids per user are bounded (${MAX_IDS_PER_USER}): the earliest claimed is forgotten first`, async () => {
  const h = harness();
  const many = Array.from({ length: MAX_IDS_PER_USER + 1 }, (_, i) => env(`id-${i}`, i + 1, "U1", T0 + i));
  const out = await run(h, many, 2_000);
  assert.ok(out.every((o) => o.emits.length === 1));
  const { state } = await stored(h, "U1");
  assert.equal(state.ids.size, MAX_IDS_PER_USER);
  assert.equal(state.ids.has("id-0"), false);
  const n = MAX_IDS_PER_USER + 1;
  const [kept, forgotten] = await run(h, [env("id-1", n + 1, "U1", T0 + 1), env("id-0", n + 2, "U1", T0)], 2);
  droppedDuplicate(kept!);
  passed(forgotten!, env("id-0", n + 2, "U1", T0));
  // Claimed anew at the end of the order, it pushed the next earliest out.
  const after = (await stored(h, "U1")).state.ids;
  assert.equal(after.size, MAX_IDS_PER_USER);
  assert.deepEqual([after.has("id-1"), after.has("id-2"), [...after.keys()].at(-1)], [false, true, "id-0"]);
});

test("fingerprint ids (events sent without event_id) are de-duplicated too", async () => {
  const fp = "fp:0123456789abcdef0123456789abcdef";
  const outcomes = await run(harness(), [env(fp, 1), env(fp, 2), env("fp:ffffffffffffffffffffffffffffffff", 3)], 3);
  passed(outcomes[0]!, env(fp, 1));
  droppedDuplicate(outcomes[1]!);
  passed(outcomes[2]!, env("fp:ffffffffffffffffffffffffffffffff", 3));
});

test("ids from input cannot reach the prototype, and integer-like ids keep the claim order", async () => {
  const h = harness({ window: "2h" });
  const out = await run(h, [env("__proto__", 1), env("7", 2, "U1", T0 + 1), env("__proto__", 3), env("7", 4)], 4);
  assert.deepEqual(out.map((o) => o.dropped ?? "passed"), ["passed", "passed", "duplicate", "duplicate"]);
  assert.deepEqual([...(await stored(h, "U1", 2 * HOUR)).state.ids.keys()], ["__proto__", "7"]);
  assert.equal(({} as Record<string, unknown>).seq, undefined);
});

test("a bad envelope is a bad_envelope dead letter; the rest of the batch goes on", async () => {
  const good = env("g", 1);
  const broken = { ...env("x", 2), event: { ...env("x", 2).event, event_id: undefined } } as unknown as Envelope;
  const outcomes = await run(harness(), [good, broken, env("g", 3)], 3);
  assert.ok(outcomes[1]!.error instanceof BadInputError);
  assert.equal(outcomes[1]!.error!.code, "bad_envelope");
  assert.deepEqual(outcomes[1]!.emits, []);
  passed(outcomes[0]!, good);
  droppedDuplicate(outcomes[2]!);
  // No envelope at all (the worker dead-letters undecodable messages before any stage; the operator still refuses one).
  const none = (await direct())(undefined, 5);
  assert.ok(none.error instanceof BadInputError);
  assert.equal(none.error.code, "bad_envelope");
  assert.deepEqual(none.emits, []);
});

test("a state failure makes the batch retryable instead of passing or dropping", async () => {
  const h = harness();
  const get = h.state.get.bind(h.state);
  h.state.get = async () => {
    throw new Error("connection reset");
  };
  await assert.rejects(h.push(0, [env("e", 1), env("e", 2)], { batchSize: 2 }), (err: unknown) => err instanceof TransientError && err.retryable);
  assert.deepEqual(h.outputs("next"), []);
  assert.equal(h.log.length, 0, "nothing was decided");
  assert.deepEqual(h.state.keys(), []);
  // Redelivered once the store is back: decided as usual.
  h.state.get = get;
  const out = await run(h, [env("e", 1), env("e", 2)], 2);
  passed(out[0]!, env("e", 1));
  droppedDuplicate(out[1]!);
});

test("config: defaults, examples, and lint", () => {
  const ajv = new Ajv({ useDefaults: true, strict: true });
  const validate = ajv.compile(dedupe.schema);
  const filled: Record<string, unknown> = {};
  assert.ok(validate(filled));
  assert.deepEqual(filled, { window: "24h" });
  assert.deepEqual(compileDedupeConfig(filled), { windowMs: 24 * HOUR });
  assert.deepEqual(compileDedupeConfig({}), compileDedupeConfig(filled));
  for (const ex of dedupe.examples) assert.ok(validate(structuredClone(ex.config)), ex.title);
  assert.equal(validate({ window: "a day" }), false);
  assert.equal(validate({ windw: "1h" }), false);

  const stages = [
    { name: "enrich", operator: "enrich", config: {} },
    { name: "dedupe", operator: "dedupe", config: {} },
  ];
  assert.deepEqual(dedupe.lint!({}, { stages, index: 1 }), []);
  assert.match(dedupe.lint!({ window: "10s" }, { stages, index: 1 })[0]!.message, /shorter than a minute/);
  assert.match(dedupe.lint!({}, { stages: [stages[1]!, stages[0]!], index: 0 })[0]!.message, /needs an enrich stage before it/);
});

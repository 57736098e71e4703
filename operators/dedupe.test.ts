import { test } from "node:test";
import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { ManualClock } from "../src/core/clock.js";
import { BadInputError, TransientError } from "../src/core/errors.js";
import type { Envelope } from "../src/core/event.js";
import type { OperatorContext, Outcome, Processor, StageInput } from "../src/core/operator.js";
import { userKey, type StateStore } from "../src/core/state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { compileDedupeConfig, dedupe, type DedupeConfig } from "./dedupe.js";

const T0 = Date.UTC(2024, 4, 1, 12);
const HOUR = 3_600_000;

/** A dedupe stage on a MemoryStateStore whose expiry clock the test moves. */
async function setup(config: DedupeConfig = {}, state?: StateStore): Promise<{ p: Processor; store: MemoryStateStore; now: { t: number }; claims: number[] }> {
  const now = { t: T0 };
  const store = new MemoryStateStore(() => now.t);
  const claims: number[] = [];
  const counted: StateStore = state ?? Object.assign(Object.create(store) as StateStore, {
    claim: async (items: Parameters<StateStore["claim"]>[0]) => {
      claims.push(items.length);
      return store.claim(items);
    },
  });
  const ctx: OperatorContext = {
    pipeline: "feedback",
    prefix: "feedback",
    stage: "dedupe",
    partitions: 4,
    state: counted,
    clock: new ManualClock(T0),
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count() {} },
    env: {},
    devMode: false,
  };
  return { p: await dedupe.create(config, ctx), store, now, claims };
}

function env(eventId: string, srcSeq: number, user = "U1"): Envelope {
  return {
    v: 1,
    event: { event_id: eventId, session_id: "s", user, user_key_version: "k1", timestamp: new Date(T0).toISOString(), ts: T0, event_type: "click", payload: { position: 1 }, response_id: "r" },
    src: { seq: srcSeq },
    partition: 0,
    attrs: {},
  };
}

/** The stage input carrying an envelope; `seq` is the dedupe stream's own sequence (differs from src.seq). */
function input(e: Envelope | undefined, seq = 1000 + (e?.src.seq ?? 0), deliveries = 1): StageInput {
  return { seq, subject: "feedback.x.dedupe.0", data: new Uint8Array(), envelope: e, deliveries, stream_time_ms: T0 };
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
  const { p, store } = await setup();
  const first = env("e-1", 10);
  const [o1] = await p.process([input(first)]);
  passed(o1!, first);
  assert.equal(o1!.emits[0]!.value, first, "the envelope is passed on as is");
  const [o2] = await p.process([input(env("e-1", 11))]);
  droppedDuplicate(o2!);
  // The record names the first copy and lives under the user's hash tag.
  assert.deepEqual(await store.get([userKey("feedback", "U1", "dedupe", "seen", "e-1")]), ["1010:10"]);
  // Another user's event with the same id is not a duplicate (ids are scoped per user).
  const other = env("e-1", 12, "U2");
  passed((await p.process([input(other)]))[0]!, other);
});

test("a redelivery or replay of the same input passes again with the same emit id", async () => {
  const { p } = await setup();
  const e = env("e-7", 42);
  const [a] = await p.process([input(e, 500, 1)]);
  const [b] = await p.process([input(e, 500, 2)]); // redelivered after a crash
  const [c] = await p.process([input(e, 500, 1)]); // dedupe's durable rewound by a replay: same stage seq
  for (const o of [a, b, c]) passed(o!, e);
  assert.equal(a!.emits[0]!.id, c!.emits[0]!.id);
  // And a true duplicate arriving after the replay is still dropped.
  droppedDuplicate((await p.process([input(env("e-7", 43))]))[0]!);
});

test("a copy re-published by the stage before (same origin, new stage seq) is dropped, so later stages never count it twice", async () => {
  const { p } = await setup();
  const e = env("e-8", 77);
  passed((await p.process([input(e, 600)]))[0]!, e);
  // enrich replayed beyond the stream's duplicate window: the same event arrives as a new message.
  assert.deepEqual((await p.process([input(e, 901)]))[0], { emits: [], dropped: "republished" });
  // The original message, re-read, still passes (its outputs are fenced by the runtime).
  passed((await p.process([input(e, 600)]))[0]!, e);
});

test("copies within one batch: the first passes, the others are dropped, with one claim call", async () => {
  const { p, claims } = await setup();
  const batch = [env("a", 1), env("b", 2), env("a", 3), env("c", 4), env("b", 5), env("a", 6)];
  const outcomes = await p.process(batch.map((e) => input(e)));
  assert.deepEqual(claims, [6]);
  passed(outcomes[0]!, batch[0]!);
  passed(outcomes[1]!, batch[1]!);
  droppedDuplicate(outcomes[2]!);
  passed(outcomes[3]!, batch[3]!);
  droppedDuplicate(outcomes[4]!);
  droppedDuplicate(outcomes[5]!);
  // Replaying the same batch gives the same decisions.
  const again = await p.process(batch.map((e) => input(e)));
  assert.deepEqual(again, outcomes);
});

test("after the window a repeat passes again; within it, it is dropped", async () => {
  const { p, now } = await setup({ window: "2h" });
  passed((await p.process([input(env("w", 1))]))[0]!, env("w", 1));
  now.t = T0 + 2 * HOUR - 1;
  droppedDuplicate((await p.process([input(env("w", 2))]))[0]!);
  now.t = T0 + 2 * HOUR;
  passed((await p.process([input(env("w", 3))]))[0]!, env("w", 3));
  // The new copy starts a new window.
  now.t = T0 + 3 * HOUR;
  droppedDuplicate((await p.process([input(env("w", 4))]))[0]!);
});

test("fingerprint ids (events sent without event_id) are de-duplicated too", async () => {
  const { p } = await setup();
  const fp = "fp:0123456789abcdef0123456789abcdef";
  const outcomes = await p.process([input(env(fp, 1)), input(env(fp, 2)), input(env("fp:ffffffffffffffffffffffffffffffff", 3))]);
  passed(outcomes[0]!, env(fp, 1));
  droppedDuplicate(outcomes[1]!);
  passed(outcomes[2]!, env("fp:ffffffffffffffffffffffffffffffff", 3));
});

test("a missing envelope is a bad_envelope dead letter; the rest of the batch goes on", async () => {
  const { p } = await setup();
  const good = env("g", 1);
  const broken = { ...env("x", 2), event: { ...env("x", 2).event, event_id: undefined } } as unknown as Envelope;
  const outcomes = await p.process([input(undefined, 5), input(good), input(broken)]);
  for (const i of [0, 2]) {
    assert.ok(outcomes[i]!.error instanceof BadInputError);
    assert.equal(outcomes[i]!.error!.code, "bad_envelope");
    assert.deepEqual(outcomes[i]!.emits, []);
  }
  passed(outcomes[1]!, good);
});

test("a state failure makes the batch retryable instead of passing or dropping", async () => {
  const failing: StateStore = Object.assign(new MemoryStateStore(), {
    claim: async () => {
      throw new Error("connection reset");
    },
  });
  const { p } = await setup({}, failing);
  const [o] = await p.process([input(env("e", 1))]);
  assert.ok(o!.error instanceof TransientError);
  assert.equal(o!.error.retryable, true);
  assert.deepEqual(o!.emits, []);
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

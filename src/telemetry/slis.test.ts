import { test } from "node:test";
import assert from "node:assert/strict";
import type { Envelope } from "../core/event.js";
import { SliPoller, SliState, psi, weightClass, driftReferenceKey, type SliSources } from "./slis.js";

test("psi: 0 for the same distribution, grows with the shift, symmetric in its terms", () => {
  assert.equal(psi({ a: 10, b: 30 }, { a: 1, b: 3 }), 0);
  const small = psi({ a: 50, b: 50 }, { a: 55, b: 45 });
  const large = psi({ a: 50, b: 50 }, { a: 90, b: 10 });
  assert.ok(small > 0 && small < 0.1, String(small));
  assert.ok(large > 0.25, String(large));
  // A category only one side has counts with the floor, not as infinity.
  assert.ok(Number.isFinite(psi({ a: 10 }, { b: 10 })));
  assert.ok(Number.isNaN(psi({}, { a: 1 })));
});

test("weightClass: the first upper bound at or above the weight", () => {
  assert.deepEqual([0, 0.1, 1, 1.5, 8, 9].map(weightClass), ["0", "0.25", "1", "2", "8", "+Inf"]);
});

const env = (seq: number, ts: number, device: string | undefined, text: string): { input: { seq: number; envelope: Envelope } } => ({
  input: { seq, envelope: { v: 1, src: { seq }, partition: 0, attrs: {}, event: { event_id: `e${seq}`, session_id: "s", user: "u", user_key_version: "k", timestamp: "", ts, event_type: "query", payload: { text }, ...(device ? { ua: { device } } : {}) } } },
});

test("SliState: newest event per device (bounded), sampled PII check by sequence, labels by rule, class, model and position", () => {
  const s = new SliState(2);
  s.inputs("g", [env(1, 100, "mobile", "a@b.example"), env(2, 50, "mobile", "call +1 415 555 0100"), env(3, 70, undefined, "plain"), env(4, 10, "desktop", "[email]")]);
  assert.deepEqual(Object.fromEntries(s.newestByDevice.get("g")!), { mobile: 100, unknown: 70, desktop: 10 });
  // Inputs 2 and 4 are sampled: one phone number found, the redacted placeholder is not PII.
  assert.equal(s.piiChecked, 2);
  assert.equal(s.piiHits.get("phone"), 1);
  assert.equal(s.piiHits.get("email"), 0);
  // The first group's raw inputs (no envelope) are skipped.
  s.inputs("enrich", [{ input: { seq: 6 } }]);
  assert.equal(s.piiChecked, 2);
  for (let i = 0; i < 40; i++) s.inputs("g", [env(100 + i, 200, `d${i}`, "")]);
  assert.ok(s.newestByDevice.get("g")!.size <= 33, "device values are bounded (then `other`)");

  s.label({ kind: "response", rule: "click", weight: 1.5, model: "m1", position: 12 }, 0);
  s.label({ kind: "response", rule: "click", weight: 1.5, model: "m1", position: 2 }, 1);
  s.label({ kind: "session", rule: "sess", weight: 0 }, 0);
  assert.deepEqual(Object.fromEntries(s.firstLabels), { "response\u0000click": 1, "session\u0000sess": 1 });
  assert.deepEqual(s.driftCounts().label_rule, { click: 2, sess: 1 });
  assert.equal(s.byWeight.get("2"), 2);
  assert.deepEqual(Object.fromEntries(s.byModel), { m1: 2 });
  assert.deepEqual(Object.fromEntries(s.byPosition), { "11+": 1, "2": 1 });
});

test("SliPoller: the first full drift window becomes the reference in Redis; a shifted window gets a high PSI", async () => {
  const store = new Map<string, string>();
  const src: SliSources = {
    prefix: "p",
    durables: () => [],
    consumerInfo: async () => ({ num_pending: 0, num_ack_pending: 0 }),
    redis: { get: async (k) => store.get(k) ?? null, set: async (k, v) => (store.has(k) ? null : store.set(k, v)), hgetall: async () => ({}) },
    warn: () => undefined,
  };
  const s = new SliState(0);
  const poller = new SliPoller(src, s, 60_000, 0);
  for (let i = 0; i < 40; i++) s.label({ kind: "response", rule: i % 2 ? "a" : "b", weight: 1 }, 0);
  await poller.tick();
  assert.ok(store.has(driftReferenceKey("p")));
  assert.equal(poller.psi.get("label_rule"), 0);
  for (let i = 0; i < 40; i++) s.label({ kind: "response", rule: i < 36 ? "a" : "b", weight: 1 }, 0);
  await poller.tick();
  assert.ok(poller.psi.get("label_rule")! > 0.25, String(poller.psi.get("label_rule")));
  // Too few labels: the window goes on, the last PSI stays.
  s.label({ kind: "response", rule: "b", weight: 1 }, 0);
  const before = poller.psi.get("label_rule");
  await poller.tick();
  assert.equal(poller.psi.get("label_rule"), before);
});

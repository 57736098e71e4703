import { test } from "node:test";
import assert from "node:assert/strict";
import { hashTagOf, userTag } from "../core/state.js";
import { MemoryStateStore } from "../state/memory.js";
import { FEATURE_FIELDS, fieldNames, indexKey, readFeatures, responseFeaturesKey, sessionFeaturesKey, userFeaturesKey } from "./features.js";

test("every feature key of a user carries the user's hash tag; index pointers have their own", () => {
  const tag = userTag("feedback", "U1").slice(1, -1);
  for (const k of [userFeaturesKey("feedback", "U1"), responseFeaturesKey("feedback", "U1", "r-1"), sessionFeaturesKey("feedback", "U1", "s-1")]) {
    assert.equal(hashTagOf(k), tag, k);
  }
  assert.equal(userFeaturesKey("feedback", "U1"), "tacit:{feedback:u:U1}:features:user");
  assert.equal(responseFeaturesKey("feedback", "U1", "r-1"), "tacit:{feedback:u:U1}:features:response:r-1");
  assert.notEqual(hashTagOf(indexKey("feedback", "response", "r-1")), hashTagOf(indexKey("feedback", "response", "r-2")));
  assert.notEqual(hashTagOf(indexKey("feedback", "response", "x")), hashTagOf(indexKey("feedback", "session", "x")));
});

test("readFeatures finds a response and a session through their index pointer, a user by pseudonym", async () => {
  const st = new MemoryStateStore();
  await st.commit([
    { ops: [{ op: "hset", key: responseFeaturesKey("p", "U1", "r-1"), fields: { pos_weight: 1.5, neg_weight: "0", query_id: "q-1" } }] },
    { ops: [{ op: "hset", key: sessionFeaturesKey("p", "U1", "s-1"), fields: { events: 3, duration_ms: 1200 } }] },
    { ops: [{ op: "hset", key: userFeaturesKey("p", "U1"), fields: { count_accept: 2, bot_band: "human" } }] },
    { ops: [{ op: "set", key: indexKey("p", "response", "r-1"), value: "U1" }] },
    { ops: [{ op: "set", key: indexKey("p", "session", "s-1"), value: "U1" }] },
  ]);
  assert.deepEqual(await readFeatures(st, "p", "response", "r-1"), { entity: "response", id: "r-1", user: "U1", fields: { neg_weight: 0, pos_weight: 1.5, query_id: "q-1" } });
  assert.deepEqual((await readFeatures(st, "p", "session", "s-1"))?.fields, { duration_ms: 1200, events: 3 });
  assert.deepEqual((await readFeatures(st, "p", "user", "U1"))?.fields, { bot_band: "human", count_accept: 2 });
  assert.equal(await readFeatures(st, "p", "response", "r-unknown"), null);
  assert.equal(await readFeatures(st, "p", "user", "U-unknown"), null);
  assert.equal(await readFeatures(st, "other", "response", "r-1"), null);
});

test("the documented field list has unique names per entity and a meaning for each", () => {
  for (const entity of ["user", "response", "session"] as const) {
    const names = FEATURE_FIELDS.filter((f) => f.entity === entity).map((f) => f.name);
    assert.equal(new Set(names).size, names.length, entity);
  }
  for (const f of FEATURE_FIELDS) assert.ok(f.meaning.length > 10, f.name);
  assert.ok(fieldNames("user").includes("count_regenerate"));
  assert.ok(fieldNames("response").includes("pos_weight_nobase"));
  assert.ok(!fieldNames("response").some((n) => n.includes("<")));
});

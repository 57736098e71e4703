import { test } from "node:test";
import assert from "node:assert/strict";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../core/pseudonym.js";
import { parseFeatures, parseLabels, parseScores, parseUserSet } from "./inputs.js";

const user = pseudonymize(DEV_PSEUDONYM_KEY, "u-1");
const label = {
  schema_version: 1,
  label_id: "l-1",
  revision: 0,
  pipeline: "feedback",
  kind: "response",
  response_id: "r-1",
  query_id: "q-1",
  session_id: "s-1",
  user,
  label: "positive",
  weight: 1,
  rule: "copy",
  rule_version: 1,
  signals: [{ event_id: "e-1", event_type: "copy_paste" }],
  event_time: "2026-01-01T00:00:01.000Z",
  emitted_at: "2026-01-01T00:00:02.000Z",
};

test("parseLabels keeps valid labels, unwraps tail records, and rejects the rest with line numbers", () => {
  const text = [
    JSON.stringify(label),
    "",
    JSON.stringify({ subject: "feedback.labels.response", seq: 4, value: { ...label, label_id: "l-2" } }),
    "{not json",
    JSON.stringify({ ...label, label_id: "l-3", user: "u-1" }),
  ].join("\n");
  const { labels, rejected } = parseLabels(text);
  assert.deepEqual(labels.map((l) => l.label_id), ["l-1", "l-2"]);
  assert.deepEqual(rejected.map((r) => r.line), [4, 5]);
  assert.match(rejected[0]!.message, /not JSON/);
  assert.match(rejected[1]!.message, /\/user/);
});

test("parseFeatures reads flat and nested shapes, numbers as strings, and skips other entities", () => {
  const text = [
    JSON.stringify({ response_id: "r-1", pos_weight: 1.5, neg_weight: 0, signal_count: 2 }),
    JSON.stringify({ entity: "response", id: "r-2", fields: { pos_weight: "0.25", neg_weight: "1", signal_count: "3" } }),
    JSON.stringify({ entity: "user", id: "x", fields: { events: "9" } }),
    JSON.stringify({ response_id: "r-3", pos_weight: "lots" }),
  ].join("\n");
  const { features, rejected } = parseFeatures(text);
  assert.deepEqual([...features], [
    ["r-1", { pos_weight: 1.5, neg_weight: 0, signal_count: 2 }],
    ["r-2", { pos_weight: 0.25, neg_weight: 1, signal_count: 3 }],
  ]);
  assert.deepEqual(rejected.map((r) => r.line), [4]);
});

test("parseUserSet accepts bare, JSON-string and object lines", () => {
  const text = ["abc", '"def"', JSON.stringify({ user: "ghi", score: 0.9 }), JSON.stringify({ envelope: { event: { user: "jkl" } } }), JSON.stringify({ score: 1 })].join("\n");
  const { users, rejected } = parseUserSet(text);
  assert.deepEqual([...users], ["abc", "def", "ghi", "jkl"]);
  assert.deepEqual(rejected.map((r) => r.line), [5]);
});

test("parseScores needs a response_id and a numeric score", () => {
  const { scores, rejected } = parseScores([JSON.stringify({ response_id: "r", score: -0.5 }), JSON.stringify({ response_id: "s" })].join("\n"));
  assert.deepEqual([...scores], [["r", -0.5]]);
  assert.equal(rejected.length, 1);
});

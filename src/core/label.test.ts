import { test } from "node:test";
import assert from "node:assert/strict";
import { newConfigAjv } from "../config/ajv.js";
import { LABEL_FIELDS, LABEL_KINDS, LABEL_V2_FIELDS, labelSchema, latestRevisions, toLabelV1, type PreferenceLabel, type ResponseLabel, type SessionLabel } from "./label.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "./pseudonym.js";
import { EVENT_TYPES } from "./event.js";

type LabelSchema = {
  properties: Record<string, { enum?: (string | number)[]; items?: { properties: { event_type: { enum: string[] } } } }>;
  required: string[];
  examples: unknown[];
};
const schema = labelSchema(1) as LabelSchema;
const validate = newConfigAjv().compile(schema);
const schemaV2 = labelSchema(2) as LabelSchema;
const validateV2 = newConfigAjv().compile(schemaV2);
const user = pseudonymize(DEV_PSEUDONYM_KEY, "u-1");

const response: ResponseLabel = {
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
  weight: 0.7,
  rule: "copy",
  rule_version: 1,
  signals: [{ event_id: "e-1", event_type: "copy_paste" }],
  event_time: "2026-01-01T00:00:01.000Z",
  emitted_at: "2026-03-01T10:00:00.000Z",
};
const preference: PreferenceLabel = {
  schema_version: 1,
  label_id: "l-2",
  revision: 0,
  pipeline: "feedback",
  kind: "preference",
  query_id: "q-1",
  chosen_response_id: "r-2",
  rejected_response_id: "r-1",
  session_id: "s-1",
  user,
  weight: 1,
  rule: "regenerate_then_accept",
  rule_version: "2026-01",
  signals: [{ event_id: "e-2", event_type: "regenerate" }, { event_id: "e-3", event_type: "accept" }],
  event_time: "2026-01-01T00:00:09+01:00",
  emitted_at: "2026-03-01T10:00:00Z",
};
const session: SessionLabel = {
  schema_version: 1,
  label_id: "l-3",
  revision: 2,
  pipeline: "feedback",
  kind: "session",
  session_id: "s-1",
  user,
  label: "negative",
  weight: 0,
  rule: "session_abandoned",
  rule_version: 3,
  signals: [{ event_id: "e-4", event_type: "abandon" }],
  event_time: "2026-01-01T00:10:00Z",
  emitted_at: "2026-03-01T10:00:00Z",
};

test("the schema's examples and typed labels of every kind validate", () => {
  for (const ex of [...schema.examples, response, preference, session]) assert.ok(validate(ex), JSON.stringify(validate.errors));
});

test("the TypeScript type and the JSON Schemas name the same fields: v2 adds fields after v1's and keeps each v1 field but schema_version as it was", () => {
  assert.deepEqual(Object.keys(schemaV2.properties), [...LABEL_FIELDS]);
  assert.deepEqual(Object.keys(schema.properties), LABEL_FIELDS.filter((f) => !(LABEL_V2_FIELDS as readonly string[]).includes(f)));
  for (const f of Object.keys(schema.properties)) if (f !== "schema_version") assert.deepEqual(schemaV2.properties[f], schema.properties[f], f);
  assert.deepEqual(schemaV2.required, schema.required);
  assert.deepEqual(schema.properties.kind!.enum, [...LABEL_KINDS]);
  // Signals may be any event type except explicit feedback, which is never a label input.
  assert.deepEqual(schema.properties.signals!.items!.properties.event_type.enum, EVENT_TYPES.filter((t) => t !== "explicit_feedback"));
});

test("contract violations are rejected", () => {
  const bad: [string, Record<string, unknown>][] = [
    ["raw user id", { ...response, user: "u-1" }],
    ["negative weight", { ...response, weight: -0.1 }],
    ["unknown field", { ...response, score: 3 }],
    ["response without label", { ...response, label: undefined }],
    ["response without response_id", { ...response, response_id: undefined }],
    ["response with a preference field", { ...response, chosen_response_id: "r-9" }],
    ["preference without rejected", { ...preference, rejected_response_id: undefined }],
    ["preference with a polarity", { ...preference, label: "positive" }],
    ["session without label", { ...session, label: undefined }],
    ["explicit feedback as a signal", { ...response, signals: [{ event_id: "e-9", event_type: "explicit_feedback" }] }],
    ["no signals", { ...response, signals: [] }],
    ["bad kind", { ...response, kind: "pair" }],
    ["fractional revision", { ...response, revision: 0.5 }],
    ["event_time not RFC 3339", { ...response, event_time: "2026-01-01 00:00:01" }],
    ["missing emitted_at", { ...response, emitted_at: undefined }],
    ["wrong schema_version", { ...response, schema_version: 2 }],
    ["bad polarity", { ...response, label: "neutral" }],
  ];
  for (const [why, label] of bad) {
    const value = JSON.parse(JSON.stringify(label)) as unknown;
    assert.equal(validate(value), false, why);
  }
});

test("the user pattern accepts exactly pseudonyms", () => {
  for (let i = 0; i < 50; i++) assert.ok(validate({ ...response, user: pseudonymize(DEV_PSEUDONYM_KEY, `user-${i}@example.com`) }));
});

test("latestRevisions keeps the highest revision of each label_id", () => {
  const kept = latestRevisions([
    { label_id: "a", revision: 0 },
    { label_id: "b", revision: 1 },
    { label_id: "a", revision: 2 },
    { label_id: "a", revision: 1 },
  ]);
  assert.deepEqual(kept, [{ label_id: "a", revision: 2 }, { label_id: "b", revision: 1 }]);
});

const v2: ResponseLabel = {
  ...response,
  schema_version: 2,
  position: 3,
  propensity: 0.48,
  model: "ranker-2026-01",
  experiment: { id: "exp-1", variant: "B" },
  cohort: "new",
  device: "mobile",
};

test("label.v2.json: its examples, v2 labels of every kind, a retraction and every v1 label validate", () => {
  const retraction = { ...v2, revision: 1, weight: 0, retracted: true, retracted_reason: "bot" };
  for (const ex of [...schemaV2.examples, v2, { ...preference, schema_version: 2, propensity: 1 }, { ...session, schema_version: 2, cohort: "c" }, retraction, response, preference, session, ...schema.examples]) {
    assert.ok(validateV2(ex), `${JSON.stringify(ex)}: ${JSON.stringify(validateV2.errors)}`);
  }
});

test("label.v2.json rejects what it must", () => {
  const bad: [string, Record<string, unknown>][] = [
    ["retracted with a weight", { ...v2, retracted: true, weight: 0.5 }],
    ["a reason without retracted", { ...v2, retracted_reason: "bot" }],
    ["v1 label with a v2 field", { ...v2, schema_version: 1 }],
    ["schema_version 3", { ...v2, schema_version: 3 }],
    ["position 0", { ...v2, position: 0 }],
    ["fractional position", { ...v2, position: 1.5 }],
    ["propensity 0", { ...v2, propensity: 0 }],
    ["propensity above 1", { ...v2, propensity: 1.2 }],
    ["experiment without id", { ...v2, experiment: { variant: "B" } }],
    ["unknown field", { ...v2, score: 3 }],
    ["v1 contract still holds: raw user id", { ...v2, user: "u-1" }],
  ];
  for (const [why, label] of bad) assert.equal(validateV2(JSON.parse(JSON.stringify(label)) as unknown), false, why);
});

test("a v1 consumer: label.v1.json rejects a v2 label, and accepts its v1 view (what label-derive publishes with schema_version: 1)", () => {
  assert.equal(validate(v2), false);
  const v1 = toLabelV1(v2);
  assert.ok(validate(v1), JSON.stringify(validate.errors));
  assert.deepEqual(v1, response, "the v1 view is the v1 label: every v1 field as it was");
  assert.equal(v2.schema_version, 2, "the label itself is left as it was");
});

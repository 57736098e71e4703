import { test } from "node:test";
import assert from "node:assert/strict";
import { spliceAttrs, type Envelope } from "./event.js";

const input = (): { env: Envelope; bytes: Buffer } => {
  const env: Envelope = {
    v: 1,
    event: { event_id: "e1", session_id: "s", user: "u-ü", user_key_version: "k1", timestamp: "2026-01-01T00:00:00.000Z", ts: 1767225600000, event_type: "query", payload: { text: "naïve \"quoted\" \u2028 ☃", n: 1.5e-7 } },
    src: { seq: 7 },
    partition: 3,
    attrs: {},
  };
  const bytes = Buffer.from(JSON.stringify(env));
  return { env: JSON.parse(bytes.toString()) as Envelope, bytes };
};

test("spliceAttrs gives the bytes JSON.stringify gives for an envelope that stages only annotated", () => {
  const { env, bytes } = input();
  const once = { ...env, attrs: { ...env.attrs, bot: { score: 0.25, band: "human" } } };
  const twice = { ...once, attrs: { ...once.attrs, session: { id: "ses-1", seq_in_session: 2 }, note: "€" } };
  for (const out of [once, twice, { ...env }]) assert.deepEqual(spliceAttrs(bytes, env, out), Buffer.from(JSON.stringify(out)));
});

test("spliceAttrs declines what it cannot splice: another event, other keys or order, annotated input bytes", () => {
  const { env, bytes } = input();
  const attrs = { bot: { score: 1 } };
  assert.equal(spliceAttrs(bytes, env, { ...env, event: { ...env.event }, attrs }), undefined);
  assert.equal(spliceAttrs(bytes, env, { ...env, src: { seq: 8 }, attrs }), undefined);
  assert.equal(spliceAttrs(bytes, env, { ...env, partition: 4, attrs }), undefined);
  assert.equal(spliceAttrs(bytes, env, { ...env, attrs, extra: 1 }), undefined);
  assert.equal(spliceAttrs(bytes, env, { attrs, v: 1, event: env.event, src: env.src, partition: env.partition }), undefined);
  assert.equal(spliceAttrs(bytes, env, null), undefined);
  const annotated = { ...env, attrs };
  const annotatedBytes = Buffer.from(JSON.stringify(annotated));
  assert.equal(spliceAttrs(annotatedBytes, annotated, { ...annotated, attrs: { ...attrs, x: 1 } }), undefined);
});

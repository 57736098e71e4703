import { test } from "node:test";
import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { ManualClock } from "../src/core/clock.js";
import { BadInputError, ConfigError, DLQ_REASONS, TransientError } from "../src/core/errors.js";
import { EVENT_TYPES, type Envelope, type EventType } from "../src/core/event.js";
import type { OperatorContext, Outcome, StageInput } from "../src/core/operator.js";
import { partitionOf } from "../src/core/partition.js";
import { parsePseudonymKey, pseudonymize } from "../src/core/pseudonym.js";
import { userKey, type StateStore } from "../src/core/state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import {
  UserAgentCache,
  canonicalJson,
  compileEnrichConfig,
  enrich,
  fingerprint,
  MAX_CONTEXT_DEPTH,
  parseRfc3339,
  parseUserAgent,
  type EnrichConfig,
} from "./enrich.js";

const T0 = Date.UTC(2024, 4, 1, 12, 0, 0); // stream time of every test message unless stated
const ISO0 = new Date(T0).toISOString();
const KEY = "k1:0123456789abcdef0123456789abcdef";

interface Harness {
  ctx: OperatorContext;
  warnings: unknown[];
  counts: Map<string, number>;
}

function harness(opts: { env?: Record<string, string | undefined>; devMode?: boolean; state?: StateStore } = {}): Harness {
  const warnings: unknown[] = [];
  const counts = new Map<string, number>();
  const ctx: OperatorContext = {
    pipeline: "feedback",
    prefix: "feedback",
    stage: "enrich",
    partitions: 8,
    state: opts.state ?? new MemoryStateStore(() => T0),
    clock: new ManualClock(T0),
    log: { debug() {}, info() {}, warn: (o: unknown, msg?: string) => warnings.push({ o, msg }), error() {} },
    metrics: { count: (name: string, by = 1) => counts.set(name, (counts.get(name) ?? 0) + by) },
    env: opts.env ?? { TACIT_PSEUDONYM_KEY: KEY },
    devMode: opts.devMode ?? false,
  };
  return { ctx, warnings, counts };
}

async function processor(config: EnrichConfig = {}, h: Harness = harness()) {
  return enrich.create(config, h.ctx);
}

const enc = new TextEncoder();
let nextSeq = 1;
function input(data: unknown, opts: { seq?: number; stream_time_ms?: number } = {}): StageInput {
  const bytes = data instanceof Uint8Array ? data : enc.encode(typeof data === "string" ? data : JSON.stringify(data));
  return { seq: opts.seq ?? nextSeq++, subject: "feedback.in.x", data: bytes, deliveries: 1, stream_time_ms: opts.stream_time_ms ?? T0 };
}

function ev(over: Record<string, unknown> = {}): Record<string, unknown> {
  return { event_id: "e-1", session_id: "s-1", user_id: "alice@example.com", timestamp: ISO0, query_id: "q-1", event_type: "query", payload: { text: "how to bake bread" }, ...over };
}

/** One valid event of each type, with its required payload and ids. */
const VALID: Record<EventType, Record<string, unknown>> = {
  query: { payload: { text: "sourdough starter" } },
  response_shown: { response_id: "r-1", payload: { position: 1, candidates: 3, model: "m-7", text_length: 420 } },
  click: { response_id: "r-1", payload: { position: 2 } },
  copy_paste: { response_id: "r-1", payload: { span_start: 10, span_end: 50, span_length: 40, destination: "editor" } },
  accept: { response_id: "r-1" },
  edit: { response_id: "r-1", payload: { original_text: "hello world", edited_text: "hello there world", original_length: 11 } },
  regenerate: { response_id: "r-1", payload: {} },
  dwell: { response_id: "r-1", payload: { dwell_ms: 12000, scroll_depth: 0.8 } },
  abandon: {},
  task_complete: { payload: { outcome: "success" } },
  share: { response_id: "r-1" },
  explicit_feedback: { response_id: "r-1", payload: { rating: "up" } },
};

function envelopeOf(o: Outcome): Envelope {
  assert.equal(o.error, undefined, `unexpected error: ${o.error?.message}`);
  assert.equal(o.emits.length, 1);
  return o.emits[0]!.value as Envelope;
}

function dlq(o: Outcome): { code: string; message: string } {
  assert.ok(o.error instanceof BadInputError, `expected a BadInputError, got ${JSON.stringify(o)}`);
  assert.equal(o.error.retryable, false);
  assert.ok(o.error.code in DLQ_REASONS, `unknown DLQ reason ${o.error.code}`);
  assert.deepEqual(o.emits, []);
  return { code: o.error.code, message: o.error.message };
}

test("every kind of bad input becomes a dead-letter outcome with a specific reason", async () => {
  const p = await processor({ max_event_bytes: 1024 });
  const cases: [StageInput, string, RegExp][] = [
    [input(ev({ payload: { text: "x".repeat(2000) } })), "oversized", /max_event_bytes is 1024/],
    [input('{"event_id": "e-1", '), "malformed_json", /JSON/],
    [input(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d])), "malformed_json", /UTF-8/],
    [input(ev({ event_type: "click", response_id: "r-1", payload: { position: "2" } })), "schema_violation", /^\/payload\/position must be integer$/],
    [input(ev({ event_type: "click", response_id: "r-1", payload: {} })), "schema_violation", /\/payload must have required property 'position'/],
    [input(ev({ user_id: undefined })), "schema_violation", /must have required property 'user_id'/],
    [input(ev({ event_type: "accept" })), "schema_violation", /must have required property 'response_id'/],
    [input(ev({ payload: { text: "x", extra: 1 } })), "schema_violation", /\/payload must NOT have additional property 'extra'/],
    [input(ev({ event_type: "explicit_feedback", response_id: "r", payload: { rating: 7 } })), "schema_violation", /\/payload\/rating must be/],
    [input(ev({ event_type: "copy_paste", response_id: "r", payload: { span_start: 9, span_end: 3, span_length: 6 } })), "schema_violation", /span_end must be >= span_start/],
    [input("[1,2]"), "schema_violation", /^\/ must be object/],
    [input(ev({ event_type: "purchase" })), "unknown_event_type", /"purchase" is not one of the v1 event types/],
    // The unknown type wins over the other schema errors of the same message.
    [input(ev({ event_type: "purchase", user_id: 5 })), "unknown_event_type", /purchase/],
    [input(ev({ timestamp: "yesterday" })), "bad_timestamp", /not a valid RFC 3339/],
    [input(ev({ timestamp: "2024-05-01 12:00:00" })), "bad_timestamp", /not a valid RFC 3339/],
    [input(ev({ timestamp: "2024-02-30T12:00:00Z" })), "bad_timestamp", /not a valid RFC 3339/],
    [input(ev({ timestamp: "2024-05-01T12:00:00" })), "bad_timestamp", /time zone/],
    [input(ev({ timestamp: new Date(T0 + 2 * 3_600_000).toISOString() })), "bad_timestamp", /2h ahead .*max_future_skew 1h/],
    [input(ev({ timestamp: new Date(T0 - 31 * 86_400_000).toISOString() })), "bad_timestamp", /31d older .*max_past_age 30d/],
  ];
  const outcomes = await p.process(cases.map((c) => c[0]));
  assert.equal(outcomes.length, cases.length);
  outcomes.forEach((o, i) => {
    const { code, message } = dlq(o);
    assert.equal(code, cases[i]![1], `case ${i}: ${message}`);
    assert.match(message, cases[i]![2], `case ${i}`);
  });
});

test("a context nested deeper than MAX_CONTEXT_DEPTH is dead-lettered; one at the limit passes and serializes", async () => {
  const p = await processor();
  const nested = (depth: number) => JSON.parse('{"a":'.repeat(depth - 1) + "{}" + "}".repeat(depth - 1)) as unknown;
  const deep = `{"event_id":"e-9","session_id":"s","user_id":"u","timestamp":"${ISO0}","query_id":"q","event_type":"query","payload":{"text":"x"},"context":{"a":${"[".repeat(20_000)}${"]".repeat(20_000)}}}`;
  const [atLimit, over, huge] = await p.process([input(ev({ context: nested(MAX_CONTEXT_DEPTH) })), input(ev({ context: nested(MAX_CONTEXT_DEPTH + 1) })), input(deep)]);
  assert.ok(JSON.stringify(envelopeOf(atLimit!)).length > 0);
  for (const o of [over!, huge!]) assert.deepEqual(dlq(o), { code: "schema_violation", message: `/context nests deeper than ${MAX_CONTEXT_DEPTH} levels` });
});

test("time bounds are relative to the stream's time, not the wall clock", async () => {
  const p = await processor({ max_future_skew: "5m", max_past_age: "1d" });
  const old = ev({ timestamp: "2020-01-01T00:00:00Z" });
  const [replayed, fresh] = await p.process([input(old, { stream_time_ms: Date.UTC(2020, 0, 1, 0, 3) }), input(old, { stream_time_ms: Date.UTC(2020, 0, 3) })]);
  assert.equal(envelopeOf(replayed!).event.ts, Date.UTC(2020, 0, 1));
  assert.equal(dlq(fresh!).code, "bad_timestamp");
  const [justInside, justOutside] = await p.process([
    input(ev({ timestamp: new Date(T0 + 5 * 60_000).toISOString() })),
    input(ev({ timestamp: new Date(T0 + 5 * 60_000 + 1).toISOString() })),
  ]);
  envelopeOf(justInside!);
  assert.equal(dlq(justOutside!).code, "bad_timestamp");
});

test("a valid event of every type becomes one envelope for the next stage", async () => {
  const h = harness();
  const p = await processor({}, h);
  const key = parsePseudonymKey(KEY);
  for (const [i, type] of EVENT_TYPES.entries()) {
    const raw = ev({ event_id: `e-${type}`, event_type: type, payload: undefined, ...VALID[type] });
    const seq = 1000 + i;
    const [o] = await p.process([input(raw, { seq })]);
    assert.equal(o!.emits[0]?.to, "next", type);
    assert.equal(o!.emits[0]!.id, `enrich:${seq}`);
    const env = envelopeOf(o!);
    const user = pseudonymize(key, "alice@example.com");
    assert.deepEqual(env.src, { seq });
    assert.equal(env.v, 1);
    assert.deepEqual(env.attrs, {});
    assert.equal(env.partition, partitionOf(user, 8));
    assert.equal(env.event.user, user);
    assert.equal(env.event.user_key_version, "k1");
    assert.equal(env.event.event_type, type);
    assert.equal(env.event.event_id, `e-${type}`);
    assert.equal(env.event.session_id, "s-1");
    assert.equal(env.event.ts, T0);
    assert.equal(env.event.timestamp, ISO0);
    assert.equal(env.event.response_id, raw.response_id);
    assert.equal(env.event.query_id, "q-1");
    assert.deepEqual(env.event.payload, (raw.payload as Record<string, unknown> | undefined) ?? {});
    assert.ok(!("user_id" in env.event), "user_id must not be on the event");
  }
});

test("timestamps with offsets and fractions parse to the same instant", async () => {
  const p = await processor();
  const outcomes = await p.process(["2024-05-01T14:00:00+02:00", "2024-05-01T07:30:00.000-04:30", "2024-05-01t12:00:00.000123456z"].map((t) => input(ev({ timestamp: t }))));
  for (const o of outcomes) assert.equal(envelopeOf(o).event.ts, T0);
});

test("parseRfc3339 accepts RFC 3339 date-times only", () => {
  assert.equal(parseRfc3339("2024-02-29T23:59:59.999Z"), Date.UTC(2024, 1, 29, 23, 59, 59, 999));
  assert.equal(parseRfc3339("1999-12-31T23:59:60Z"), Date.UTC(2000, 0, 1)); // leap second
  assert.equal(parseRfc3339("0050-01-01T00:00:00Z"), new Date("0050-01-01T00:00:00Z").getTime());
  for (const bad of ["2023-02-29T00:00:00Z", "2024-13-01T00:00:00Z", "2024-04-31T00:00:00Z", "2024-05-01T24:00:00Z", "2024-05-01T12:60:00Z", "2024-05-01T12:00:00+24:00", "2024-05-01", "1714564800", "2024-05-01T12:00Z", " 2024-05-01T12:00:00Z"]) {
    assert.equal(parseRfc3339(bad), null, bad);
  }
});

test("pseudonyms are stable per key, record the key version, and the raw user_id never appears", async () => {
  const events = [ev({ event_id: "a" }), ev({ event_id: "b", user_id: "bob-42" }), ev({ event_id: "c" })];
  const run = async (env: Record<string, string>) => (await (await processor({}, harness({ env }))).process(events.map((e) => input(e)))).map((o) => envelopeOf(o).event);
  const k1 = await run({ TACIT_PSEUDONYM_KEY: KEY });
  const again = await run({ TACIT_PSEUDONYM_KEY: KEY });
  const k2 = await run({ TACIT_PSEUDONYM_KEY: "k2:fedcba9876543210fedcba9876543210" });
  const bare = await run({ TACIT_PSEUDONYM_KEY: "fedcba9876543210fedcba9876543210" });
  assert.equal(k1[0]!.user, k1[2]!.user);
  assert.notEqual(k1[0]!.user, k1[1]!.user);
  assert.deepEqual(k1.map((e) => e.user), again.map((e) => e.user));
  assert.notEqual(k1[0]!.user, k2[0]!.user);
  assert.deepEqual([k1[0]!.user_key_version, k2[0]!.user_key_version, bare[0]!.user_key_version], ["k1", "k2", "v0"]);
  assert.match(k1[0]!.user, /^[A-Za-z0-9_-]{22}$/);
  const serialized = JSON.stringify([k1, k2, bare]);
  for (const raw of ["alice@example.com", "alice", "bob-42"]) assert.ok(!serialized.includes(raw), `raw user id "${raw}" leaked`);
});

test("a custom key variable is honoured; a missing key fails outside dev mode and warns in dev mode", async () => {
  await assert.rejects(
    async () => processor({}, harness({ env: {} })),
    (e: unknown) => e instanceof ConfigError && e.message.includes("TACIT_PSEUDONYM_KEY"),
  );
  await assert.rejects(async () => processor({ pseudonym_key_env: "MY_KEY" }, harness({ env: { TACIT_PSEUDONYM_KEY: KEY } })), /MY_KEY/);
  await assert.rejects(async () => processor({}, harness({ env: { TACIT_PSEUDONYM_KEY: "k1:" } })), ConfigError);
  const weak = harness({ env: { TACIT_PSEUDONYM_KEY: "k1:short" } });
  await processor({}, weak);
  assert.match(JSON.stringify(weak.warnings), /brute-forced/);
  const strong = harness();
  await processor({}, strong);
  assert.deepEqual(strong.warnings, []);

  const custom = await processor({ pseudonym_key_env: "MY_KEY" }, harness({ env: { MY_KEY: "k9:0123456789abcdef0123456789abcdef" } }));
  assert.equal(envelopeOf((await custom.process([input(ev())]))[0]!).event.user_key_version, "k9");

  const h = harness({ env: {}, devMode: true });
  const dev = await processor({}, h);
  assert.equal(h.warnings.length, 1);
  assert.match(JSON.stringify(h.warnings[0]), /TACIT_PSEUDONYM_KEY/);
  const outcomes = await dev.process([input(ev()), input(ev({ event_id: "e-2" }))]);
  assert.equal(h.warnings.length, 1, "the dev-key warning is logged once, not per message");
  assert.equal(envelopeOf(outcomes[0]!).event.user_key_version, "dev");
});

test("PII in free-text payload fields is redacted and the fields are listed", async () => {
  const h = harness();
  const p = await processor({}, h);
  const [q, edit, clean, off] = await p.process([
    input(ev({ payload: { text: "email me at jane.doe@example.com or call +1 (555) 123-4567" } })),
    input(ev({ event_type: "edit", response_id: "r", payload: { original_text: "card 4111 1111 1111 1111", edited_text: "server 10.0.0.12" } })),
    input(ev({ payload: { text: "best bread recipe 2024" } })),
    input(ev({ event_type: "copy_paste", response_id: "r", payload: { span_start: 0, span_end: 1, span_length: 1, destination: "to a@b.io" } })),
  ]);
  const qe = envelopeOf(q!).event;
  assert.equal(qe.payload.text, "email me at [email] or call [phone]");
  assert.deepEqual(qe.redacted, ["payload.text"]);
  const ee = envelopeOf(edit!).event;
  assert.deepEqual(ee.payload, { original_text: "card [card]", edited_text: "server [ip]" });
  assert.deepEqual(ee.redacted, ["payload.original_text", "payload.edited_text"]);
  const ce = envelopeOf(clean!).event;
  assert.equal(ce.payload.text, "best bread recipe 2024");
  assert.equal(ce.redacted, undefined);
  assert.equal(envelopeOf(off!).event.payload.destination, "to [email]");
  assert.equal(h.counts.get("pii_redacted"), 5);

  // Kinds and fields are configurable.
  const narrow = await processor({ redact: { emails: false, fields: ["text"] } });
  const [n1, n2] = await narrow.process([
    input(ev({ payload: { text: "a@b.io 555-123-4567" } })),
    input(ev({ event_type: "edit", response_id: "r", payload: { original_text: "555-123-4567", edited_text: "x" } })),
  ]);
  assert.equal(envelopeOf(n1!).event.payload.text, "a@b.io [phone]");
  assert.equal(envelopeOf(n2!).event.payload.original_text, "555-123-4567");
});

test("the user agent is parsed, bot-checked and dropped", async () => {
  const p = await processor();
  const chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
  const iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
  const googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
  const outcomes = await p.process([chrome, iphone, googlebot, undefined].map((ua) => input(ev({ user_agent: ua }))));
  const [c, i, g, none] = outcomes.map((o) => envelopeOf(o).event);
  assert.deepEqual(c!.ua, { browser: "Chrome", os: "Windows", device: "desktop", raw_is_bot: false });
  assert.equal(i!.ua?.device, "mobile");
  assert.equal(i!.ua?.os, "iOS");
  assert.equal(i!.ua?.raw_is_bot, false);
  assert.equal(g!.ua?.raw_is_bot, true);
  assert.equal(none!.ua, undefined);
  const serialized = JSON.stringify(outcomes);
  for (const ua of [chrome, iphone, googlebot]) assert.ok(!serialized.includes(ua), "the raw user agent must not be passed on");
  assert.ok(!serialized.includes("user_agent"));
});

/** Browser agents in many versions: more distinct strings than a small cache holds. */
function agentVariants(n: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const v = 100 + (i % 40);
    out.push(
      i % 3 === 0 ? `Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/${v}.0.${i}.0 Safari/537.36`
      : i % 3 === 1 ? `Mozilla/5.0 (iPhone; CPU iPhone OS 17_${i % 7} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.${i} Mobile/15E148 Safari/604.1`
      : `Mozilla/5.0 (compatible; ExampleBot/${i}.0; +http://example.com/bot.html)`,
    );
  }
  return out;
}

test("UserAgentCache gives parseUserAgent's result, hit or miss, holds at most its bound, and hands out copies", () => {
  const agents = agentVariants(60);
  const cache = new UserAgentCache(50);
  for (let round = 0; round < 2; round++) {
    for (const ua of agents) assert.deepEqual(cache.parse(ua), parseUserAgent(ua), ua);
    assert.ok(cache.size <= 50, `size ${cache.size}`);
  }
  assert.ok(agents.some((ua) => parseUserAgent(ua).raw_is_bot) && agents.some((ua) => !parseUserAgent(ua).raw_is_bot));
  const first = cache.parse(agents[0]!);
  first.browser = "edited downstream";
  assert.deepEqual(cache.parse(agents[0]!), parseUserAgent(agents[0]!));
});

test("enrich's output is the same whether its pseudonym and user-agent caches hit or miss", async () => {
  const agents = agentVariants(40);
  const batch = () =>
    Array.from({ length: 120 }, (_, i) =>
      input(ev({ event_id: `e-${i}`, user_id: `user-${i % 30}`, user_agent: agents[i % agents.length] }), { seq: 1000 + i }),
    );
  const warm = await processor();
  const firstPass = await warm.process(batch());
  const secondPass = await warm.process(batch()); // every user and agent is cached by now
  const fresh = await (await processor()).process(batch());
  assert.deepEqual(secondPass, firstPass);
  assert.deepEqual(fresh, firstPass);
  const key = parsePseudonymKey(KEY);
  for (const [i, o] of secondPass.entries()) {
    const e = envelopeOf(o).event;
    assert.equal(e.user, pseudonymize(key, `user-${i % 30}`));
    assert.deepEqual(e.ua, parseUserAgent(agents[i % agents.length]!));
  }
});

test("a rotated key pseudonymizes afresh: same user, new version, new pseudonym", async () => {
  const rotated = "k2:fedcba9876543210fedcba9876543210";
  const before = envelopeOf((await (await processor()).process([input(ev())]))[0]!).event;
  const after = envelopeOf((await (await processor({}, harness({ env: { TACIT_PSEUDONYM_KEY: rotated } }))).process([input(ev())]))[0]!).event;
  assert.equal(before.user_key_version, "k1");
  assert.equal(after.user_key_version, "k2");
  assert.equal(after.user, pseudonymize(parsePseudonymKey(rotated), "alice@example.com"));
  assert.notEqual(after.user, before.user);
});

test("cohort and experiment come from one Redis lookup per batch; the event's own experiment wins", async () => {
  const mem = new MemoryStateStore(() => T0);
  const key = parsePseudonymKey(KEY);
  const alice = pseudonymize(key, "alice@example.com");
  await mem.commit([{ ops: [{ op: "hset", key: userKey("feedback", alice, "context"), fields: { cohort: "power", experiment_id: "exp-9", variant: "B" } }] }]);
  let lookups = 0;
  let keysAsked: string[] = [];
  const counting: StateStore = Object.assign(Object.create(mem) as StateStore, {
    hgetallMany: async (keys: string[]) => {
      lookups++;
      keysAsked = keys;
      return mem.hgetallMany(keys);
    },
  });
  const p = await processor({}, harness({ state: counting }));
  const outcomes = await p.process([
    input(ev({ event_id: "1" })),
    input(ev({ event_id: "2", context: { device: "mobile", experiment: { id: "own", variant: "A" } } })),
    input(ev({ event_id: "3", user_id: "carol" })),
    input(ev({ event_id: "4", context: { app_version: "3.1" } })),
    input("not json"),
  ]);
  assert.equal(lookups, 1);
  assert.equal(keysAsked.length, 2, "one key per distinct user");
  const [a, own, carol, merged] = outcomes.slice(0, 4).map((o) => envelopeOf(o).event);
  assert.equal(a!.cohort, "power");
  assert.deepEqual(a!.context, { experiment: { id: "exp-9", variant: "B" } });
  assert.equal(own!.cohort, "power");
  assert.deepEqual(own!.context, { device: "mobile", experiment: { id: "own", variant: "A" } });
  assert.equal(carol!.cohort, undefined);
  assert.equal(carol!.context, undefined);
  assert.deepEqual(merged!.context, { app_version: "3.1", experiment: { id: "exp-9", variant: "B" } });

  lookups = 0;
  const off = await processor({ context_lookup: false }, harness({ state: counting }));
  const [o] = await off.process([input(ev())]);
  assert.equal(lookups, 0);
  assert.equal(envelopeOf(o!).event.cohort, undefined);
});

test("a failing context lookup makes the batch's valid events retryable; bad ones still dead-letter", async () => {
  const failing: StateStore = Object.assign(new MemoryStateStore(), {
    hgetallMany: async () => {
      throw new TransientError("redis_unavailable", "Redis: connection refused");
    },
  });
  const p = await processor({}, harness({ state: failing }));
  const [good, bad] = await p.process([input(ev()), input("{")]);
  assert.ok(good!.error instanceof TransientError);
  assert.equal(good!.error.retryable, true);
  assert.deepEqual(good!.emits, []);
  assert.equal(dlq(bad!).code, "malformed_json");
});

test("sampling is deterministic per event_id, stratified by type, and never drops explicit_feedback", async () => {
  const ids = Array.from({ length: 10_000 }, (_, i) => `evt-${i}`);
  const config: EnrichConfig = { context_lookup: false, sampling: { default_rate: 1, rates: { dwell: 0.3 } } };
  const kept = async (rate: EnrichConfig) => {
    const p = await processor(rate);
    const outcomes = await p.process(ids.map((id) => input(ev({ event_id: id, event_type: "dwell", response_id: "r", payload: { dwell_ms: 100 } }))));
    return new Set(ids.filter((_, i) => {
      const o = outcomes[i]!;
      if (o.dropped) {
        assert.deepEqual(o, { emits: [], dropped: "sampled_out" });
        return false;
      }
      envelopeOf(o);
      return true;
    }));
  };
  const first = await kept(config);
  const second = await kept(config);
  assert.deepEqual([...first], [...second], "the same events are kept on every run");
  const share = first.size / ids.length;
  assert.ok(Math.abs(share - 0.3) < 0.02, `kept ${share}, expected about 0.3`);
  // A higher rate keeps a superset: raising a rate never un-samples an event.
  const more = await kept({ ...config, sampling: { rates: { dwell: 0.6 } } });
  for (const id of first) assert.ok(more.has(id));
  assert.ok(Math.abs(more.size / ids.length - 0.6) < 0.02);

  // Other types use default_rate; explicit_feedback is kept even at rate 0.
  const none = await processor({ context_lookup: false, sampling: { default_rate: 0, rates: { click: 1 } } });
  const outcomes = await none.process([
    input(ev()),
    input(ev({ event_type: "explicit_feedback", response_id: "r", payload: { rating: 4 } })),
    input(ev({ event_type: "click", response_id: "r", payload: { position: 1 } })),
  ]);
  assert.equal(outcomes[0]!.dropped, "sampled_out");
  envelopeOf(outcomes[1]!);
  envelopeOf(outcomes[2]!);
});

test("events without event_id get a stable fingerprint of the canonical event", async () => {
  const p = await processor();
  const base = ev({ event_id: undefined });
  const reordered = Object.fromEntries(Object.entries(base).reverse());
  const [a, b, c] = await p.process([input(base), input(JSON.stringify(reordered, null, 2)), input({ ...base, payload: { text: "other" } })]);
  const ida = envelopeOf(a!).event.event_id;
  assert.match(ida, /^fp:[0-9a-f]{32}$/);
  assert.equal(envelopeOf(b!).event.event_id, ida, "key order and whitespace do not change the fingerprint");
  assert.notEqual(envelopeOf(c!).event.event_id, ida);
  assert.equal(ida, fingerprint(JSON.parse(JSON.stringify(base))));
  assert.equal(canonicalJson({ b: [2, { d: 1, c: null }], a: "x" }), '{"a":"x","b":[2,{"c":null,"d":1}]}');
  // Producers cannot forge fingerprints.
  const [forged] = await p.process([input(ev({ event_id: ida }))]);
  assert.equal(dlq(forged!).code, "schema_violation");
});

test("a batch mixing good and bad events returns one outcome per input, in order", async () => {
  const p = await processor({ sampling: { rates: { dwell: 0 } } });
  const batch = [
    input(ev({ event_id: "g1" })),
    input("nope"),
    input(ev({ event_id: "g2", event_type: "click", response_id: "r", payload: { position: 3 } })),
    input(ev({ event_type: "teleport" })),
    input(ev({ event_id: "s1", event_type: "dwell", response_id: "r", payload: { dwell_ms: 5 } })),
    input(ev({ event_id: "g3", timestamp: "2024-05-01T11:59:00Z" })),
    input(ev({ timestamp: "2099-01-01T00:00:00Z" })),
  ];
  const outcomes = await p.process(batch);
  assert.equal(outcomes.length, batch.length);
  const summary = outcomes.map((o) => (o.error ? o.error.code : o.dropped ? o.dropped : (o.emits[0]!.value as Envelope).event.event_id));
  assert.deepEqual(summary, ["g1", "malformed_json", "g2", "unknown_event_type", "sampled_out", "g3", "bad_timestamp"]);
  outcomes.forEach((o, i) => {
    if (o.emits.length) assert.equal(o.emits[0]!.id, `enrich:${batch[i]!.seq}`);
  });
});

test("the config schema's defaults match compileEnrichConfig, and every example validates", () => {
  const ajv = new Ajv({ useDefaults: true, allErrors: true, strict: true });
  const validate = ajv.compile(enrich.schema);
  const filled: Record<string, unknown> = {};
  assert.ok(validate(filled), JSON.stringify(validate.errors));
  assert.deepEqual(compileEnrichConfig(filled as EnrichConfig), compileEnrichConfig({}));
  assert.deepEqual(compileEnrichConfig({}), {
    maxEventBytes: 65536,
    maxFutureSkewMs: 3_600_000,
    maxPastAgeMs: 30 * 86_400_000,
    pseudonymKeyEnv: "TACIT_PSEUDONYM_KEY",
    redactKinds: { emails: true, phones: true, cards: true, ips: true },
    redactFields: ["text", "original_text", "edited_text", "destination"],
    defaultRate: 1,
    rates: {},
    contextLookup: true,
  });
  for (const ex of enrich.examples) assert.ok(validate(structuredClone(ex.config)), `${ex.title}: ${JSON.stringify(validate.errors)}`);
  for (const bad of [{ max_future_skew: "1 hour" }, { sampling: { rates: { purchase: 0.5 } } }, { sampling: { default_rate: 2 } }, { redact: { fields: ["user_id"] } }, { unknown: 1 }]) {
    assert.equal(validate(bad), false, JSON.stringify(bad));
  }
});

test("lint: enrich must come first, explicit_feedback cannot be sampled, default_rate 0 needs a positive rate", () => {
  const view = (index: number) => ({ stages: [], index });
  assert.deepEqual(enrich.lint!({}, view(0)), []);
  assert.match(enrich.lint!({}, view(1))[0]!.message, /first stage/);
  const ef = enrich.lint!({ sampling: { rates: { explicit_feedback: 0.5 } } }, view(0));
  assert.deepEqual(ef.map((i) => i.path), [["sampling", "rates", "explicit_feedback"]]);
  assert.equal(enrich.lint!({ sampling: { default_rate: 0 } }, view(0)).length, 1);
  assert.equal(enrich.lint!({ sampling: { default_rate: 0, rates: { query: 1 } } }, view(0)).length, 0);
});

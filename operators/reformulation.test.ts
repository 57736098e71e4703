import { test } from "node:test";
import assert from "node:assert/strict";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope, EventType, TacitEvent } from "../src/core/event.js";
import { isKeyedProcessor, type KeyedProcessor, type OperatorContext, type Outcome, type StageInput } from "../src/core/operator.js";
import { userKey } from "../src/core/state.js";
import { jaccard3, normalizedLevenshtein, tokenOverlap, type ReformulationKind } from "../src/core/text.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { OperatorHarness, runAlone } from "../test/support/operator-harness.js";
import { reformulation, type ReformulationAnnotation, type ReformulationConfig, type ReformulationDecision, type UserState } from "./reformulation.js";

const T0 = Date.parse("2025-03-01T12:00:00Z");
const STAGE = "reformulation";

/** A harness on one partition; `wall` is the store's expiry clock (a fake wall clock). */
function harness(config: ReformulationConfig = {}, wall = { t: T0 }): OperatorHarness<ReformulationConfig> {
  return new OperatorHarness(reformulation, config, { stage: STAGE, prefix: "feedback", storeNow: () => wall.t });
}

let srcSeq = 1000;
function envOf(event: TacitEvent, attrs: Record<string, unknown> = {}): Envelope {
  return { v: 1, event, src: { seq: ++srcSeq }, partition: 0, attrs };
}

/** Pushes events (or envelopes) and returns their outcomes; one input per batch unless told. */
async function run(h: OperatorHarness<ReformulationConfig>, items: (TacitEvent | Envelope)[], batchSize = 1): Promise<Outcome[]> {
  const from = h.log.length;
  await h.push(0, items.map((x) => ("v" in x ? x : envOf(x))), { batchSize });
  return h.log.slice(from).map((l) => l.outcome);
}

/** A context for calling create/process directly (inputs the harness cannot build, metric attributes). */
function directCtx(counts = new Map<string, number>()): OperatorContext {
  return {
    pipeline: "feedback",
    prefix: "feedback",
    stage: STAGE,
    partitions: 1,
    state: new MemoryStateStore(),
    clock: new ManualClock(T0),
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count: (name, by = 1, attrs) => counts.set(`${name}:${attrs?.decision ?? ""}`, (counts.get(`${name}:${attrs?.decision ?? ""}`) ?? 0) + by) },
    env: {},
    devMode: true,
  };
}

/**
 * The operator alone, each user's state in memory (no store, no guard): for metric attributes and
 * inputs the harness cannot build.
 */
async function direct(counts?: Map<string, number>): Promise<(inputs: StageInput[]) => Outcome[]> {
  const proc = await reformulation.create({}, directCtx(counts));
  assert.ok(isKeyedProcessor(proc));
  return runAlone(proc as KeyedProcessor<UserState>);
}

/** A user's stored value: the applied sequence and the state's JSON ("" when none). */
async function stored(h: OperatorHarness<ReformulationConfig>, user: string): Promise<{ applied: number; json: string }> {
  const { applied, payload } = await h.stored(user);
  return { applied, json: payload };
}

function inputOf(envelope: Envelope, seq: number): StageInput {
  return { seq, subject: `feedback.x.${STAGE}.0`, data: new Uint8Array(), envelope, deliveries: 1, stream_time_ms: envelope.event.ts };
}

let counter = 0;
function ev(type: EventType, ts: number, extra: Partial<TacitEvent> = {}): TacitEvent {
  counter++;
  return { event_id: `e${counter}`, session_id: "s1", user: "u1", user_key_version: "v1", timestamp: new Date(ts).toISOString(), ts, event_type: type, payload: {}, ...extra };
}
const query = (ts: number, text: string, qid: string, extra: Partial<TacitEvent> = {}) => ev("query", ts, { query_id: qid, payload: { text }, ...extra });
const shown = (ts: number, rid: string, qid?: string, extra: Partial<TacitEvent> = {}) => ev("response_shown", ts, { response_id: rid, ...(qid ? { query_id: qid } : {}), ...extra });

function noteOf(o: Outcome): ReformulationAnnotation {
  assert.equal(o.emits.length, 1);
  assert.equal(o.emits[0]!.to, "next");
  return (o.emits[0]!.value as Envelope).attrs.reformulation as ReformulationAnnotation;
}

/** Every taxonomy kind with the decision it leads to when asked 60 s after the previous query. */
const TABLE: { prev: string; next: string; kind: ReformulationKind; decision: ReformulationDecision }[] = [
  { prev: "python list sort", next: "Python list sort", kind: "same", decision: "reformulation" },
  { prev: "new york pizza", next: "pizza new york", kind: "word_reorder", decision: "reformulation" },
  { prev: "email login", next: "e-mail login", kind: "whitespace_punctuation", decision: "reformulation" },
  { prev: "python sort", next: "python sort list by key descending", kind: "words_added", decision: "clarification" },
  { prev: "how to sort a python list by key", next: "sort python list", kind: "words_removed", decision: "reformulation" },
  { prev: "running shoes", next: "run shoe", kind: "stemming", decision: "reformulation" },
  { prev: "world health organization covid guidance", next: "who covid guidance", kind: "acronym", decision: "reformulation" },
  { prev: "univ of washington", next: "university of washington", kind: "abbreviation", decision: "reformulation" },
  { prev: "facebook", next: "book", kind: "substring", decision: "reformulation" },
  { prev: "python tut", next: "python tutorial for beginners", kind: "superstring", decision: "clarification" },
  { prev: "cheap flights paris", next: "cheap hotels paris", kind: "substitution", decision: "reformulation" },
  { prev: "pyhton tutorial", next: "python tutorial", kind: "spelling_correction", decision: "reformulation" },
  { prev: "weather in boston", next: "best pasta recipe", kind: "new_topic", decision: "new_topic" },
  // No taxonomy rule applies, but the texts are close (normalized Levenshtein 4/13 ≤ 0.35, 3-gram Jaccard 0.5).
  { prev: "configuration", next: "configurable", kind: "new_topic", decision: "reformulation" },
  // Just outside both similarity thresholds (Levenshtein 5/14 > 0.35, 3-gram Jaccard 7/15 < 0.5).
  { prev: "transformation", next: "transformers", kind: "new_topic", decision: "new_topic" },
];

test("table: every taxonomy kind and the decision drawn from it", async () => {
  for (const row of TABLE) {
    const [first, , second] = await run(harness(), [query(T0, row.prev, "q1"), shown(T0 + 2_000, "r1", "q1"), query(T0 + 60_000, row.next, "q2")]);
    assert.deepEqual(noteOf(first!), { previous_query_id: null, previous_response_id: null, kind: null, decision: "none", levenshtein: null, jaccard3: null, token_overlap: null, gap_ms: null });
    const note = noteOf(second!);
    const label = `${row.prev} → ${row.next}`;
    assert.equal(note.kind, row.kind, label);
    assert.equal(note.decision, row.decision, label);
    assert.equal(note.previous_query_id, "q1");
    assert.equal(note.previous_response_id, "r1");
    assert.equal(note.gap_ms, 60_000);
    assert.ok(Math.abs(note.levenshtein! - normalizedLevenshtein(row.prev, row.next)) < 1e-4, label);
    assert.ok(Math.abs(note.jaccard3! - jaccard3(row.prev, row.next)) < 1e-4, label);
    assert.ok(Math.abs(note.token_overlap! - tokenOverlap(row.prev, row.next)) < 1e-4, label);
  }
  assert.ok(new Set(TABLE.map((r) => r.decision)).size === 3);
});

test("similarity scores are the documented measures", async () => {
  const [, second] = await run(harness(), [query(T0, "kitten", "q1"), query(T0 + 1_000, "sitting", "q2")]);
  const note = noteOf(second!);
  assert.equal(note.levenshtein, Math.round((3 / 7) * 1e4) / 1e4);
  // 3-grams {kit, itt, tte, ten} vs {sit, itt, tti, tin, ing}: 1 shared of 8.
  assert.equal(note.jaccard3, 0.125);
  assert.equal(note.token_overlap, 0);
});

test("gap rule: a similar query after max_gap is a new topic; at max_gap it is still a reformulation", async () => {
  const at = async (gap: number, cfg: ReformulationConfig = {}) => noteOf((await run(harness(cfg), [query(T0, "pyhton tutorial", "q1"), query(T0 + gap, "python tutorial", "q2")]))[1]!);
  assert.equal((await at(300_000)).decision, "reformulation");
  const late = await at(300_001);
  assert.equal(late.decision, "new_topic");
  assert.equal(late.kind, "spelling_correction");
  assert.equal(late.gap_ms, 300_001);
  assert.equal((await at(300_001, { max_gap: "10m" })).decision, "reformulation");
  assert.equal((await at(60_000, { max_gap: "30s" })).decision, "new_topic");
  // A clarification after the gap is not one either.
  const out = await run(harness(), [query(T0, "python sort", "q1"), query(T0 + 400_000, "python sort by key", "q2")]);
  assert.equal(noteOf(out[1]!).decision, "new_topic");
});

test("thresholds come from the config", async () => {
  const pair = async (cfg: ReformulationConfig) => noteOf((await run(harness(cfg), [query(T0, "configuration", "q1"), query(T0 + 1_000, "configurable", "q2")]))[1]!).decision;
  assert.equal(await pair({}), "reformulation");
  assert.equal(await pair({ levenshtein_max: 0.2, jaccard_min: 0.9 }), "new_topic");
  assert.equal(await pair({ levenshtein_max: 0.2 }), "reformulation"); // Jaccard alone suffices
  assert.equal(await pair({ jaccard_min: 0.9 }), "reformulation"); // Levenshtein alone suffices
  const kinds = async (cfg: ReformulationConfig) => noteOf((await run(harness(cfg), [query(T0, "python sort", "q1"), query(T0 + 1_000, "python sort list", "q2")]))[1]!).decision;
  assert.equal(await kinds({}), "clarification");
  assert.equal(await kinds({ clarification_kinds: ["superstring"] }), "reformulation");
});

test("sessions: the previous query is per session; attrs.session.id wins over session_id", async () => {
  const out = await run(harness(), [query(T0, "pyhton tutorial", "q1"), query(T0 + 1_000, "python tutorial", "q2", { session_id: "s2" }), query(T0 + 2_000, "python tutorial", "q3")]);
  assert.equal(noteOf(out[1]!).decision, "none");
  const third = noteOf(out[2]!);
  assert.equal(third.previous_query_id, "q1");
  assert.equal(third.kind, "spelling_correction");

  const merged = { session: { id: "merged", seq_in_session: 1 } };
  const [, o] = await run(harness(), [envOf(query(T0, "pyhton tutorial", "q1", { session_id: "raw-a" }), merged), envOf(query(T0 + 1_000, "python tutorial", "q2", { session_id: "raw-b" }), merged)]);
  const env = o!.emits[0]!.value as Envelope;
  assert.equal((env.attrs.reformulation as ReformulationAnnotation).previous_query_id, "q1");
  assert.deepEqual(env.attrs.session, merged.session);
});

test("previous_response_id is the last response shown for the previous query", async () => {
  const out = await run(harness(), [
    query(T0, "pyhton tutorial", "q1"),
    shown(T0 + 1_000, "r1", "q1"),
    shown(T0 + 5_000, "r2", "q1"), // regenerated
    shown(T0 + 3_000, "r-old", "q1"), // arrives late: not the last shown
    shown(T0 + 6_000, "r-other", "q0"), // for another query
    query(T0 + 10_000, "python tutorial", "q2"),
    query(T0 + 20_000, "python tutorials", "q3"),
  ]);
  assert.equal(noteOf(out[5]!).previous_response_id, "r2");
  // Nothing was shown for q2.
  assert.equal(noteOf(out[6]!).previous_response_id, null);
  assert.equal(noteOf(out[6]!).previous_query_id, "q2");
  // Other events pass through untouched, with the stage's id for them.
  const clickEnv = envOf(ev("click", T0 + 30_000, { response_id: "r2", payload: { position: 1 } }), { bot: { score: 0, band: "human", indicators: [] } });
  const [click] = await run(harness(), [clickEnv]);
  assert.deepEqual(click!.emits, [{ to: "next", id: `${STAGE}:${clickEnv.src.seq}`, value: clickEnv }]);
});

test("order in a batch: one batch gives what one-at-a-time gives; each query sees the one before it", async () => {
  const envs = [
    query(T0, "weather in boston", "q1"),
    shown(T0 + 1_000, "r1", "q1"),
    ev("click", T0 + 2_000, { response_id: "r1", payload: { position: 1 } }),
    query(T0 + 30_000, "weather in bostn", "q2"),
    query(T0 + 60_000, "weather in bostn tomorrow", "q3"),
    query(T0 + 90_000, "best pasta recipe", "q4"),
    query(T0 + 95_000, "other user", "x1", { user: "u2" }),
  ].map((e) => envOf(e));
  const a = harness();
  const batched = await run(a, envs, 100);
  assert.equal(a.stateCalls.get, 1);
  const b = harness();
  const single = await run(b, structuredClone(envs), 1);
  assert.equal(b.stateCalls.get, 2, "a warm cache: one read per user, none in the user's later batches");
  assert.deepEqual(batched.map((o) => o.emits), single.map((o) => o.emits));
  const notes = [0, 3, 4, 5, 6].map((i) => noteOf(batched[i]!));
  assert.deepEqual(notes.map((n) => n.decision), ["none", "reformulation", "clarification", "new_topic", "none"]);
  assert.deepEqual(notes.map((n) => n.previous_query_id), [null, "q1", "q2", "q3", null]);
  assert.equal(notes[1]!.previous_response_id, "r1");
  assert.equal(a.metric("reformulation_decision"), 5);
  // Each user's state is written once, recording that user's last input of the batch.
  assert.deepEqual([(await stored(a, "u1")).applied, (await stored(a, "u2")).applied], [6, 7]);
  assert.deepEqual(a.state.keys(), [userKey("feedback", "u1", STAGE, "state"), userKey("feedback", "u2", STAGE, "state")]);

  // Each decision is counted under its own attribute.
  const counts = new Map<string, number>();
  (await direct(counts))(envs.map((e, i) => inputOf(e, i + 1)));
  assert.deepEqual(Object.fromEntries(counts), { "reformulation_decision:none": 2, "reformulation_decision:reformulation": 1, "reformulation_decision:clarification": 1, "reformulation_decision:new_topic": 1 });
});

test("exactly once: a redelivered input at or below the applied sequence is skipped, even one that changed no state", async () => {
  const envs = [query(T0, "pyhton tutorial", "q1"), ev("click", T0 + 1_000, { response_id: "r1", payload: { position: 1 } }), query(T0 + 2_000, "python tutorial", "q2"), query(T0 + 3_000, "python tutorial for kids", "q3")].map((e) => envOf(e));
  const straight = harness();
  await run(straight, structuredClone(envs), 1);

  // The first two are committed but not acked: all four are delivered again.
  const h = harness();
  const first = await h.push(0, envs.slice(0, 2), { batchSize: 2, crash: { batch: 0, at: "after_commits" } });
  assert.deepEqual(first, { acked: 0, crashed: true });
  await h.restart();
  const again = await run(h, envs, 4);
  assert.deepEqual(again.slice(0, 2), [{ emits: [], dropped: "already_applied" }, { emits: [], dropped: "already_applied" }]);
  assert.equal(noteOf(again[2]!).previous_query_id, "q1");
  assert.equal(noteOf(again[2]!).decision, "reformulation");
  assert.equal(noteOf(again[3]!).decision, "clarification");
  // And once more after a clean ack: everything is skipped.
  const third = await run(h, envs, 4);
  assert.ok(third.every((o) => o.dropped === "already_applied" && o.emits.length === 0));
  assert.deepEqual(h.emits("next"), straight.emits("next"));

  // A crash before the commits: the same batch recomputes the same emits (the harness fails on
  // an id re-emitted with another value) and the state is applied once.
  const e = harness();
  await e.push(0, envs, { batchSize: 4, crash: { batch: 0, at: "before_commits" } });
  await e.restart();
  await e.push(0, envs, { batchSize: 4 });
  assert.equal(e.dropped("already_applied"), 0);
  assert.deepEqual(e.emits("next"), straight.emits("next"));
  assert.deepEqual(await e.state.get(e.state.keys()), await straight.state.get(straight.state.keys()));
});

test("no query text outlives the session: expired by event time and by key TTL", async () => {
  const wall = { t: T0 };
  const h = harness({ state_ttl: "30m" }, wall);
  await run(h, [query(T0, "my secret question", "q1", { session_id: "s1" })]);
  const key = userKey("feedback", "u1", STAGE, "state");
  // A query in another session 31 minutes later (of event time; the key itself has not expired yet):
  // the first session's text is dropped from the state.
  wall.t = T0 + 60_000;
  const [o] = await run(h, [query(T0 + 31 * 60_000, "something else", "q2", { session_id: "s2" })]);
  assert.equal(noteOf(o!).decision, "none");
  const [raw] = await h.state.get([key]);
  assert.ok(raw && !raw.includes("my secret question") && raw.includes("something else"), raw ?? "");
  // The same session after more than state_ttl of event time: nothing to compare with.
  const [late] = await run(h, [query(T0 + 62 * 60_000, "something else again", "q3", { session_id: "s2" })]);
  assert.equal(noteOf(late!).decision, "none");
  // Silence past the TTL: every key is gone.
  wall.t += 30 * 60_000 + 1;
  assert.deepEqual(h.state.keys(), []);
});

test("sessions remembered per user are bounded", async () => {
  const h = harness({ max_sessions: 2 });
  await run(h, [query(T0, "a query", "q1", { session_id: "s1" }), query(T0 + 1_000, "b query", "q2", { session_id: "s2" }), query(T0 + 2_000, "c query", "q3", { session_id: "s3" })]);
  const { json } = await stored(h, "u1");
  assert.deepEqual((JSON.parse(json) as { sessions: [string, unknown][] }).sessions.map(([sid]) => sid).sort(), ["s2", "s3"]);
});

test("session ids from input cannot reach the prototype (session __proto__)", async () => {
  const out = await run(harness(), [query(T0, "pyhton tutorial", "q1", { session_id: "__proto__" }), query(T0 + 1_000, "python tutorial", "q2", { session_id: "__proto__" })]);
  assert.equal(noteOf(out[1]!).previous_query_id, "q1");
  assert.equal(({} as Record<string, unknown>).text, undefined);
});

test("a query older than the session's previous one is not compared and does not replace it", async () => {
  const h = harness();
  const out = await run(h, [query(T0 + 60_000, "python tutorial", "q2"), query(T0, "pyhton tutorial", "q1"), query(T0 + 90_000, "python tutorials", "q3")]);
  assert.equal(noteOf(out[1]!).decision, "none");
  assert.equal(h.metric("reformulation_out_of_order"), 1);
  assert.equal(noteOf(out[2]!).previous_query_id, "q2");
});

test("bad input: no envelope, or a query without text, is a non-retryable error; the batch goes on", async () => {
  const good = inputOf(envOf(query(T0, "hello", "q1")), 3);
  const noText = inputOf(envOf(ev("query", T0 + 1, { payload: {} })), 2);
  const out = (await direct())([{ ...good, seq: 1, envelope: undefined }, noText, good]);
  assert.equal(out[0]!.error?.code, "bad_envelope");
  assert.equal(out[1]!.error?.code, "schema_violation");
  assert.equal(out[1]!.error?.retryable, false);
  assert.equal(noteOf(out[2]!).decision, "none");
});

test("lint: max_gap beyond the state TTL, new_topic as a clarification", () => {
  const issues = reformulation.lint!({ max_gap: "1h", state_ttl: "30m", clarification_kinds: ["new_topic"] }, { stages: [], index: 0 });
  assert.deepEqual(issues.map((i) => i.path.join(".")).sort(), ["clarification_kinds", "max_gap"]);
  assert.deepEqual(reformulation.lint!({}, { stages: [], index: 0 }), []);
  // Query text must not outlive the session: state_ttl at most the sessionize gap.
  const stages = [{ name: "sessionize", operator: "sessionize", config: { gap: "20m" } }, { name: "reformulation", operator: "reformulation", config: {} }];
  assert.deepEqual(reformulation.lint!({}, { stages, index: 1 }).map((i) => i.path.join(".")), ["state_ttl"]);
  assert.deepEqual(reformulation.lint!({ state_ttl: "20m" }, { stages, index: 1 }), []);
});

test("bot-score's flag marker is passed on unchanged and changes no state; the fence still covers it", async () => {
  const flag = (e: TacitEvent): Envelope => envOf(e, { bot: { score: 0.95, band: "bot", indicators: [], flagged: true } });
  const q1 = envOf(query(T0, "python tutorial", "q1"));
  // A query marker (even one without text: the text check is for events this stage compares).
  const m = flag(ev("query", T0 + 1_000, { query_id: "qm", payload: {} }));
  const q2 = envOf(query(T0 + 2_000, "python tutorial for kids", "q2"));
  const h = harness();
  const out = await run(h, [q1, m, q2], 3);
  assert.deepEqual(out[1]!.emits, [{ to: "next", id: `${STAGE}:${m.src.seq}`, value: m }]);
  assert.equal(out[1]!.error, undefined);
  assert.equal(noteOf(out[2]!).previous_query_id, "q1", "the marker is not the previous query");
  assert.equal(noteOf(out[2]!).decision, "clarification");

  // Committed, then redelivered: skipped.
  const c = harness();
  await c.push(0, [q1, m], { batchSize: 2, crash: { batch: 0, at: "after_commits" } });
  await c.restart();
  const again = await run(c, [q1, m], 2);
  assert.deepEqual(again.map((o) => o.dropped), ["already_applied", "already_applied"]);
  // A marker alone writes only the fence: the applied sequence, no state.
  const lone = harness();
  await run(lone, [flag(ev("accept", T0, { response_id: "r1" }))]);
  assert.deepEqual(lone.state.keys(), [userKey("feedback", "u1", STAGE, "state")]);
  assert.deepEqual(await stored(lone, "u1"), { applied: 1, json: "" });
});

test("out of order: a response_shown that arrives before its query is still the response the follow-up reformulates", async () => {
  const inOrder = [query(T0, "pyhton tutorial", "q1"), shown(T0 + 1_000, "r1", "q1"), query(T0 + 30_000, "python tutorial", "q2")];
  // Stream order: q1's response before q1 itself (within the out-of-orderness), then the follow-up.
  const swapped = [shown(T0 + 1_000, "r1", "q1"), query(T0, "pyhton tutorial", "q1"), query(T0 + 30_000, "python tutorial", "q2")];
  for (const events of [inOrder, swapped]) {
    const out = await run(harness(), events);
    const note = noteOf(out[2]!);
    assert.equal(note.decision, "reformulation");
    assert.equal(note.previous_query_id, "q1");
    assert.equal(note.previous_response_id, "r1");
  }
  // Two early responses of one query (a regeneration): the later shown is the one reformulated.
  const two = await run(harness(), [shown(T0 + 5_000, "r2", "q1"), shown(T0 + 1_000, "r1", "q1"), query(T0, "pyhton tutorial", "q1"), query(T0 + 30_000, "python tutorial", "q2")]);
  assert.equal(noteOf(two[3]!).previous_response_id, "r2");
  // An early response of another session or query is not taken; nothing is kept once taken.
  const h = harness();
  const other = await run(h, [shown(T0 + 1_000, "rx", "q1", { session_id: "s2" }), shown(T0 + 1_000, "ry", "q9"), query(T0, "pyhton tutorial", "q1"), query(T0 + 30_000, "python tutorial", "q2")]);
  assert.equal(noteOf(other[3]!).previous_response_id, null);
  const { json } = await stored(h, "u1");
  assert.deepEqual((JSON.parse(json) as UserState).early?.map((e) => e[2]), ["rx", "ry"]);
});

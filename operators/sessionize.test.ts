import { test } from "node:test";
import assert from "node:assert/strict";
import { newConfigAjv } from "../src/config/ajv.js";
import type { Envelope, EventType, TacitEvent } from "../src/core/event.js";
import { isKeyedProcessor } from "../src/core/operator.js";
import { decodeStoredValue } from "../src/runtime/keyed-state.js";
import { partitionKey, userKey } from "../src/core/state.js";
import { OperatorHarness, type CrashPoint } from "../test/support/operator-harness.js";
import { Random } from "../test/support/random.js";
import { generateSessionStream, type SessionStream } from "../test/support/session-generator.js";
import {
  SESSIONIZE_DEFAULTS,
  STATE_TTL_MARGIN_MS,
  sessionize,
  type LateRecord,
  type SessionAttr,
  type SessionizeConfig,
  type SessionSummary,
} from "./sessionize.js";

const MIN = 60_000;
const T0 = Date.UTC(2025, 2, 1, 12);
const STAGE = "sessionize";
const PREFIX = "fb";
const FAR = T0 + 365 * 24 * 60 * MIN;

let srcSeq = 0;
/** An enriched event of `user` at T0 + `atMs`, wrapped as the stage receives it. */
function ev(user: string, atMs: number, type: EventType = "click", extra: Partial<TacitEvent> = {}): Envelope {
  const seq = ++srcSeq;
  const ts = T0 + atMs;
  return {
    v: 1,
    event: {
      event_id: `e${seq}`,
      session_id: "client",
      user,
      user_key_version: "k1",
      timestamp: new Date(ts).toISOString(),
      ts,
      event_type: type,
      payload: {},
      ...extra,
    },
    src: { seq },
    partition: 0,
    attrs: {},
  };
}

function harness(config: Partial<SessionizeConfig>, outOfOrdernessMs: number, storeNow?: () => number) {
  return new OperatorHarness(sessionize, { ...SESSIONIZE_DEFAULTS, ...config }, { outOfOrdernessMs, stage: STAGE, prefix: PREFIX, storeNow });
}

const summaries = (h: OperatorHarness<SessionizeConfig>) => h.outputs("sessions") as SessionSummary[];
const nexts = (h: OperatorHarness<SessionizeConfig>) => h.outputs("next") as Envelope[];
const sessionOf = (e: Envelope) => e.attrs.session as SessionAttr;

/** The latest revision of every session id that was not merged into another. */
function finalSummaries(all: SessionSummary[]): SessionSummary[] {
  const latest = new Map<string, SessionSummary>();
  for (const s of all) if ((latest.get(s.session_id)?.revision ?? -1) < s.revision) latest.set(s.session_id, s);
  const merged = new Set(all.flatMap((s) => s.merged_from));
  return [...latest.values()].filter((s) => !merged.has(s.session_id)).sort((a, b) => a.user.localeCompare(b.user) || a.start - b.start);
}

/** The user's state key, as the runtime stores it: `<applied seq>:<encoded sessions>`. */
const stateKey = (user: string, prefix = PREFIX) => userKey(prefix, user, STAGE, "state");

/** A stored state value split into the runtime's guard and the operator's encoding ('' once cleared). */
function stored(raw: string | null): { applied: number; payload: string } | null {
  return raw === null ? null : decodeStoredValue(raw);
}

/**
 * Keys holding anything but an exactly-once fence: session state, timers. Once a user's last
 * session has closed the runtime keeps `<applied seq>:` (no state) for the state TTL, so a
 * redelivery whose partition progress was not committed is still skipped.
 */
async function stateLeft(h: OperatorHarness<SessionizeConfig>): Promise<string[]> {
  const keys = h.state.keys();
  const values = await h.state.get(keys);
  return keys.filter((_, i) => stored(values[i]!)?.payload !== "");
}

test("an event bridging two sessions merges them; the emitted summary is superseded by a revision listing the merged-away id", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "10m" }, 5 * MIN);
  await h.push(0, [ev("u1", 0, "query", { query_id: "q1" }), ev("u1", 40 * MIN, "click")]);
  const [t, s] = nexts(h).map((e) => sessionOf(e).id);
  assert.notEqual(t, s, "40 min apart: two sessions");
  // Watermark 35m has passed the first session's end + gap (30m): it is emitted, the second is not.
  assert.deepEqual(summaries(h).map((x) => [x.session_id, x.revision, x.event_count]), [[t, 0, 1]]);

  await h.push(0, [ev("u1", 28 * MIN, "copy_paste")]); // 7 min late, within 10 min; bridges both
  assert.deepEqual(sessionOf(nexts(h)[2]!), { id: t, seq_in_session: 3 });
  assert.equal(summaries(h).length, 1, "the merged session ends at 40m: not due before the watermark passes 70m");

  await h.advanceWatermark(0, FAR);
  const all = summaries(h);
  assert.deepEqual(all.map((x) => [x.session_id, x.revision]), [[t, 0], [t, 1]]);
  const merged = all[1]!;
  assert.deepEqual(merged.merged_from, [s]);
  assert.equal(merged.event_count, 3);
  assert.deepEqual([merged.start, merged.end, merged.duration_ms], [T0, T0 + 40 * MIN, 40 * MIN]);
  assert.deepEqual(merged.counts, { click: 1, copy_paste: 1, query: 1 });
  assert.ok(!all.some((x) => x.session_id === s), "the merged-away session never gets a summary of its own");
  assert.deepEqual(h.emits("sessions").map((e) => e.id), [`session:${t}:0`, `session:${t}:1`]);
});

test("with lateness ≥ gap (lint rejects it) two emitted sessions can merge: the later one is retracted, nothing is double-counted", async () => {
  const h = harness({ gap: "10m", allowed_lateness: "30m" }, 0);
  await h.push(0, [ev("u1", 0), ev("u1", 15 * MIN), ev("u2", 30 * MIN)]);
  const [t, s] = nexts(h).map((e) => sessionOf(e).id);
  assert.deepEqual(summaries(h).map((x) => [x.session_id, x.revision, x.event_count]), [[t, 0, 1], [s, 0, 1]]);

  await h.push(0, [ev("u1", 7 * MIN)]); // bridges [0] and [15m]; the merged session is due at once
  const rev1 = summaries(h).find((x) => x.session_id === t && x.revision === 1);
  assert.ok(rev1, "revision 1 is emitted right away, without waiting for another watermark");
  assert.deepEqual([rev1.event_count, rev1.merged_from], [3, [s]]);

  await h.advanceWatermark(0, FAR);
  const u1 = finalSummaries(summaries(h)).filter((x) => x.user === "u1");
  assert.deepEqual(u1.map((x) => [x.session_id, x.event_count]), [[t, 3]]);
});

test("a late event within the allowed lateness revises the emitted summary: same id, revision 1", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "10m" }, 1 * MIN);
  await h.push(0, [ev("u1", 0, "query", { query_id: "q1" }), ev("u1", 10 * MIN, "response_shown", { query_id: "q1", response_id: "r1" }), ev("u2", 45 * MIN)]);
  const id = sessionOf(nexts(h)[0]!).id;
  assert.deepEqual(summaries(h).map((x) => [x.session_id, x.revision, x.event_count, x.ended_in_abandonment]), [[id, 0, 2, true]]);

  await h.push(0, [ev("u1", 35 * MIN, "accept", { query_id: "q1", response_id: "r1" })]); // watermark 44m: 9 min late
  assert.equal(sessionOf(nexts(h)[3]!).id, id, "the late event is passed on with its session");
  assert.equal(h.outputs("late").length, 0);

  await h.advanceWatermark(0, T0 + 66 * MIN); // past the new end (35m) + gap
  const last = summaries(h).at(-1)!;
  assert.deepEqual(
    [last.session_id, last.revision, last.event_count, last.end, last.ended_in_abandonment, last.merged_from],
    [id, 1, 3, T0 + 35 * MIN, false, []],
  );
  assert.deepEqual([last.query_ids, last.response_ids], [["q1"], ["r1"]]);
  assert.deepEqual(h.emits("sessions").map((e) => e.id), [`session:${id}:0`, `session:${id}:1`]);
});

test("a session fires when the watermark passes end + gap, not when it reaches it", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
  await h.push(0, [ev("u1", 0), ev("u1", 10 * MIN)]);
  await h.advanceWatermark(0, T0 + 40 * MIN);
  assert.equal(summaries(h).length, 0);
  await h.advanceWatermark(0, T0 + 40 * MIN + 1);
  assert.deepEqual(summaries(h).map((x) => [x.revision, x.event_count]), [[0, 2]]);
  assert.ok((await stateLeft(h)).includes(stateKey("u1")), "kept for the allowed lateness");
  await h.advanceWatermark(0, T0 + 45 * MIN);
  assert.ok((await stateLeft(h)).includes(stateKey("u1")), "a watermark at end + gap + lateness still finds it (closed, not yet removed)");
  await h.advanceWatermark(0, T0 + 45 * MIN + 1);
  assert.deepEqual(await stateLeft(h), []);
});

test("with emit_updates off a late event still counts in its session but no revision is emitted", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "10m", emit_updates: false }, 1 * MIN);
  await h.push(0, [ev("u1", 0), ev("u1", 10 * MIN), ev("u2", 45 * MIN)]);
  await h.push(0, [ev("u1", 35 * MIN)]);
  assert.equal(nexts(h).length, 4);
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(summaries(h).filter((x) => x.user === "u1").map((x) => [x.revision, x.event_count]), [[0, 2]]);
  assert.deepEqual(await stateLeft(h), []);
});

test("an event beyond the allowed lateness goes to `late` with its lateness and is counted, not passed on", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 1 * MIN);
  await h.push(0, [ev("u1", 0), ev("u2", 60 * MIN)]);
  const late = ev("u1", 30 * MIN);
  await h.push(0, [late]);
  assert.deepEqual(h.emits("late"), [
    {
      to: "late",
      id: `${STAGE}:${late.src.seq}`,
      value: { event: late.event, src: late.src, lateness_ms: 29 * MIN, watermark_ms: T0 + 59 * MIN, reason: "beyond_allowed_lateness" } satisfies LateRecord,
    },
  ]);
  // The runtime counts every emit to a side output under the output's name (`late`); sessionize's own count, with its reason, goes under the same name.
  assert.equal(h.metric("late"), 1, "sessionize counts the late event once");
  assert.ok(!nexts(h).some((e) => e.src.seq === late.src.seq));
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 1], ["u2", 1]]);
});

test("a late event aimed at a session the watermark has closed goes to `late` as session_closed", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "10m" }, 0);
  await h.push(0, [ev("u1", 0), ev("u2", 40 * MIN)]); // watermark 40m = end + gap + lateness: closed
  const late = ev("u1", 30 * MIN); // exactly 10 min late, and within the gap of the closed session
  await h.push(0, [late]);
  const rec = h.outputs("late") as LateRecord[];
  assert.deepEqual(rec.map((r) => [r.src.seq, r.reason, r.lateness_ms]), [[late.src.seq, "session_closed", 10 * MIN]]);
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 1], ["u2", 1]]);
});

test("a session longer than max_session_length is split and both parts are flagged", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m", max_session_length: "4h" }, 0);
  await h.push(0, Array.from({ length: 31 }, (_, i) => ev("u1", i * 10 * MIN)), { batchSize: 4 });
  await h.advanceWatermark(0, FAR);
  const parts = finalSummaries(summaries(h));
  assert.deepEqual(
    parts.map((p) => [p.start - T0, p.end - T0, p.event_count, p.split]),
    [[0, 240 * MIN, 25, true], [250 * MIN, 300 * MIN, 6, true]],
  );
  assert.ok(parts.every((p) => p.duration_ms <= 4 * 60 * MIN));
  assert.equal(h.metric("sessions_split") > 0, true);
});

test("a redelivered input that was already applied is skipped: no emits, no state change", async () => {
  const h = harness({}, 0);
  const events = [ev("u1", 0), ev("u1", 1 * MIN), ev("u1", 2 * MIN)];
  await h.push(0, events);
  const keys = h.state.keys();
  const before = await h.state.get(keys);
  const emitted = h.log.length;
  await h.push(0, [events[1]!, events[2]!]);
  assert.deepEqual(h.log.slice(emitted).map((l) => [l.input.deliveries, l.outcome.dropped, l.outcome.emits.length, l.outcome.commits]), [
    [2, "already_applied", 0, undefined],
    [2, "already_applied", 0, undefined],
  ]);
  assert.deepEqual(await h.state.get(keys), before);
  assert.equal(h.dropped("already_applied"), 2);
});

test("no state and no timers are left once every session has closed; the fences left expire", async () => {
  let now = 0;
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 2 * MIN, () => now);
  const rng = new Random(7);
  const events = Array.from({ length: 120 }, (_, i) => ev(`u${i % 9}`, i * 3 * MIN + rng.int(0, 2 * MIN)));
  await h.push(0, events, { batchSize: 13 });
  const timers = partitionKey(PREFIX, STAGE, 0, "timers");
  assert.ok(h.state.keys().includes(timers), "timers exist while sessions are open");
  assert.ok((await stateLeft(h)).includes(stateKey("u3")));
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(await stateLeft(h), []);
  assert.ok(summaries(h).length > 9);
  now = STATE_TTL_MARGIN_MS;
  assert.deepEqual(h.state.keys(), []);
});

test("a timer left behind by a crash fires, finds nothing, and removes itself", async () => {
  const h = harness({}, 0);
  const timers = partitionKey(PREFIX, STAGE, 0, "timers");
  await h.state.commit([{ ops: [{ op: "zadd", key: timers, score: T0, member: "ghost" }] }]);
  await h.advanceWatermark(0, T0 + MIN);
  assert.deepEqual(h.state.keys(), []);
  assert.equal(summaries(h).length, 0);
});

test("stored state: each user's sessions behind its applied sequence, its timer in the partition's set, under the keys the state docs name", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
  await h.push(0, [ev("u1", 0), ev("u2", 0), ev("u1", MIN)]);
  const timers = partitionKey(PREFIX, STAGE, 0, "timers");
  assert.deepEqual(h.state.keys(), [timers, stateKey("u1"), stateKey("u2")].sort());
  const noop = (): void => {};
  const proc = await sessionize.create({ ...SESSIONIZE_DEFAULTS }, {
    pipeline: PREFIX, prefix: PREFIX, stage: STAGE, partitions: 1, state: h.state, clock: h.clock,
    log: { debug: noop, info: noop, warn: noop, error: noop }, metrics: { count: noop }, env: {}, devMode: true,
  });
  assert.ok(isKeyedProcessor(proc));
  const codec = proc.codec;
  for (const [user, i, count, end] of [["u1", 2, 2, MIN], ["u2", 1, 1, 0]] as const) {
    const value = stored((await h.state.get([stateKey(user)]))[0]!)!;
    assert.equal(value.applied, h.log[i]!.input.seq, `${user}: the guard is its last input's sequence`);
    const sessions = (codec.decode(value.payload) as { sessions: { count: number; end: number; rev: number }[] }).sessions;
    assert.deepEqual(sessions.map((s) => [s.count, s.end - T0, s.rev]), [[count, end, -1]]);
  }
  assert.deepEqual(await h.state.zrangeByScore(timers, 0, Infinity), [
    { member: "u2", score: T0 + 30 * MIN + 1 },
    { member: "u1", score: T0 + 31 * MIN + 1 },
  ]);
  const docs = sessionize.state.map((d) => new RegExp(`^${d.key.replace(/[{}]/g, "\\$&").replace("<prefix>", PREFIX).replace("<stage>", STAGE).replace("<partition>", "\\d+").replace("<user>", "[^{}:]+")}$`));
  for (const k of h.state.keys()) assert.ok(docs.some((re) => re.test(k)), `${k} is named by a state doc`);
});

test("a crash after the timer commit but before the user state recomputes the same outputs", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
  const first = ev("u1", 0);
  await h.push(0, [first]);
  const batch = [ev("u1", 10 * MIN), ev("u2", 50 * MIN)];
  const res = await h.push(0, batch, { crash: { batch: 0, at: "before_commits" } });
  assert.deepEqual(res, { acked: 0, crashed: true });
  // The runtime commits new and earlier timers first (removed and later ones after the states):
  // those the batch set, taken from a run without the crash.
  const twin = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
  await twin.push(0, [first]);
  await twin.push(0, batch);
  const timers = partitionKey(PREFIX, STAGE, 0, "timers");
  const set = await twin.state.zrangeByScore(timers, 0, Infinity);
  assert.deepEqual(set.map((t) => t.member), ["u2"], "u1's session closed within the batch: its timer is gone");
  const before = await h.state.zrangeByScore(timers, 0, Infinity);
  await h.state.commit([{ ops: set.map((t) => ({ op: "zadd" as const, key: timers, score: t.score, member: t.member })) }]);
  assert.deepEqual(await h.state.zrangeByScore(timers, 0, Infinity), [...before, ...set], "the timers as the crashed commit left them: u1's removal comes after the states");
  await h.restart();
  await h.push(0, batch); // throws if any emit id comes back with a different value
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 2], ["u2", 1]]);
  assert.deepEqual(await stateLeft(h), []);
});

test(
  "a crash that lands the partition's new and earlier timers but not the users' states (Redis Cluster) recomputes the same outputs",
  async () => {
    const h = harness({ gap: "30m", allowed_lateness: "10m" }, 0);
    const twin = harness({ gap: "30m", allowed_lateness: "10m" }, 0);
    const first = [ev("u1", 0), ev("u2", 0)];
    // u1's session fires before its own late event (7 min late, within the lateness) and is revised by it.
    const batch = [ev("u2", 35 * MIN), ev("u1", 28 * MIN)];
    await h.push(0, first);
    await twin.push(0, first);
    await h.push(0, batch, { crash: { batch: 0, at: "before_commits" } });
    await twin.push(0, batch);
    const timers = partitionKey(PREFIX, STAGE, 0, "timers");
    const set = await twin.state.zrangeByScore(timers, 0, Infinity);
    // What lands before the states: timers that are new or earlier than the committed ones.
    const committed = new Map((await h.state.zrangeByScore(timers, 0, Infinity)).map((t) => [t.member, t.score]));
    const early = set.filter((t) => !committed.has(t.member) || t.score < committed.get(t.member)!);
    if (early.length) await h.state.commit([{ ops: early.map((t) => ({ op: "zadd" as const, key: timers, score: t.score, member: t.member })) }]);
    await h.restart();
    await h.push(0, batch);
    await h.advanceWatermark(0, FAR); // throws when session:<u1's id>:0 comes back with the late event in it
    assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 2], ["u2", 1], ["u2", 1]]);
  },
);

test("a batch whose own watermark passes the session one of its inputs extended emits the extended session", async () => {
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
  await h.push(0, [ev("u1", 0)]);
  // One batch extends u1's session to 20m and moves the watermark to 55m, past 20m + gap.
  await h.push(0, [ev("u1", 20 * MIN), ev("u2", 55 * MIN)]);
  assert.deepEqual(summaries(h).map((x) => [x.user, x.event_count, x.end - T0]), [["u1", 2, 20 * MIN]]);
  await h.advanceWatermark(0, FAR);
  assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 2], ["u2", 1]]);
});

test("when a batch's own watermark closes a user's last session, the fence outlives the round: a redelivery is skipped", async () => {
  // mid_commits: the users' states landed, the partition's progress did not; only the fence in u1's state holds.
  for (const at of ["mid_commits", "after_commits"] as const) {
    const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0);
    const batch = [ev("u1", 0), ev("u2", 120 * MIN)];
    const res = await h.push(0, batch, { crash: { batch: 0, at } });
    assert.equal(res.crashed, true);
    assert.equal(summaries(h).length, 1, `${at}: u1's session fired and closed in the crashed round`);
    assert.deepEqual(stored((await h.state.get([stateKey("u1")]))[0]!), { applied: h.log[0]!.input.seq, payload: "" }, `${at}: u1 keeps its fence, no sessions`);
    await h.restart();
    await h.push(0, batch);
    assert.equal(h.dropped("already_applied"), 2, at);
    assert.equal(h.outputs("late").length, 0, at);
    await h.advanceWatermark(0, FAR);
    assert.deepEqual(await stateLeft(h), [], at);
    assert.deepEqual(finalSummaries(summaries(h)).map((x) => [x.user, x.event_count]), [["u1", 1], ["u2", 1]], at);
  }
});

test("state keys expire by event-time deadline plus the margin", async () => {
  let now = 0;
  const h = harness({ gap: "30m", allowed_lateness: "5m" }, 0, () => now);
  await h.push(0, [ev("u1", 0)]); // no watermark yet: the deadline is counted from the event itself
  const keys = [stateKey("u1")];
  const ttl = 35 * MIN + STATE_TTL_MARGIN_MS;
  now = ttl - 1;
  assert.ok((await h.state.get(keys)).every((v) => v !== null));
  now = ttl;
  assert.deepEqual(await h.state.get(keys), [null]);
});

test("one state read per batch, none with a warm cache, and later events of a user see the earlier ones of the same batch", async () => {
  const h = harness({}, 0);
  const events = Array.from({ length: 200 }, (_, i) => ev(`u${i % 50}`, i * 1000));
  await h.push(0, events, { batchSize: 200 });
  assert.equal(h.stateCalls.get, 1, "one read for the 50 users of the batch");
  assert.equal(h.stateCalls.zrangeByScore, 1, "the partition's timers are read once");
  const seqs = nexts(h).filter((e) => e.event.user === "u7").map((e) => sessionOf(e).seq_in_session);
  assert.deepEqual(seqs, [1, 2, 3, 4]);
  assert.equal(new Set(nexts(h).filter((e) => e.event.user === "u7").map((e) => sessionOf(e).id)).size, 1);
  await h.push(0, Array.from({ length: 50 }, (_, i) => ev(`u${i}`, 200_000 + i * 1000)), { batchSize: 50 });
  assert.deepEqual([h.stateCalls.get, h.stateCalls.zrangeByScore], [1, 1], "the same users again: served from the cache");
  assert.equal(sessionOf(nexts(h).at(-1)!).seq_in_session, 5, "u49's fifth event, from the cached state");
});

test("summaries carry ids, counts and abandonment, never raw query text; emit ids are deterministic", async () => {
  const h = harness({}, 0);
  const q = ev("u1", 0, "query", { query_id: "q1", payload: { text: "how do I reset my password" } });
  await h.push(0, [q, ev("u1", MIN, "response_shown", { query_id: "q1", response_id: "r1" }), ev("u1", 2 * MIN, "abandon", { query_id: "q1", response_id: "r1" })]);
  await h.advanceWatermark(0, FAR);
  const [s] = summaries(h);
  assert.ok(s);
  assert.match(s.session_id, /^s:[0-9a-f]{16}$/);
  assert.deepEqual(
    { ...s, session_id: "" },
    {
      session_id: "",
      user: "u1",
      start: T0,
      end: T0 + 2 * MIN,
      duration_ms: 2 * MIN,
      event_count: 3,
      counts: { abandon: 1, query: 1, response_shown: 1 },
      query_ids: ["q1"],
      response_ids: ["r1"],
      ended_in_abandonment: true,
      split: false,
      merged_from: [],
      revision: 0,
    },
  );
  assert.ok(!JSON.stringify(h.outputs("sessions")).includes("password"));
  assert.deepEqual(h.emits("next").map((e) => e.id), [1, 2, 3].map((k) => `${STAGE}:${q.src.seq + k - 1}`));

  // The same input in a fresh run gives the same session id.
  const again = harness({}, 0);
  await again.push(0, [q]);
  assert.equal(sessionOf(nexts(again)[0]!).id, s.session_id);
});

test("a bad envelope is an error for the DLQ, not a crash of the batch", async () => {
  const h = harness({}, 0);
  const bad = ev("", 0);
  await h.push(0, [ev("u1", 0), bad, ev("u1", MIN)]);
  assert.deepEqual(h.log.map((l) => l.outcome.error?.code), [undefined, "bad_envelope", undefined]);
  assert.equal(nexts(h).length, 2);
});

test("lint: allowed_lateness must be smaller than gap; every example is valid and lint-clean", () => {
  const issues = sessionize.lint!({ ...SESSIONIZE_DEFAULTS, gap: "10m", allowed_lateness: "10m" }, { stages: [], index: 0 });
  assert.equal(issues.length, 1);
  assert.deepEqual(issues[0]!.path, ["allowed_lateness"]);
  assert.ok(issues[0]!.hint && issues[0]!.hint.length > 0);
  assert.deepEqual(sessionize.lint!({ ...SESSIONIZE_DEFAULTS }, { stages: [], index: 0 }), []);

  const validate = newConfigAjv().compile(sessionize.schema);
  for (const ex of sessionize.examples) {
    const config = structuredClone(ex.config);
    assert.ok(validate(config), `${ex.title}: ${JSON.stringify(validate.errors)}`);
    assert.deepEqual(sessionize.lint!(config as unknown as SessionizeConfig, { stages: [], index: 0 }), [], ex.title);
  }
  const filled: Record<string, unknown> = {};
  validate(filled);
  assert.deepEqual(filled, { ...SESSIONIZE_DEFAULTS });
  assert.equal(validate({ gap: "30 minutes" }), false);
});

// ---------------------------------------------------------------------------------------------
// Property: a seeded stream of thousands of sessions, against a ground truth computed by the generator
// ---------------------------------------------------------------------------------------------

const GAP = MIN;
const LATENESS = 20_000;
const BOUND = 30_000;
const PARTITIONS = 4;
const PROP_CONFIG: SessionizeConfig = { gap: "1m", allowed_lateness: "20s", max_session_length: "4h", emit_updates: true };

interface RunOptions {
  batchSize: number;
  /** Envelopes per push: fixed (3 batches) or drawn at random, so redeliveries regroup into other batches. */
  randomSlices?: boolean;
  /** Chance that a push crashes somewhere in its batches. */
  crashRate?: number;
  seed?: number;
  /** Entries the runtime's state cache keeps: small ones evict users between batches, so states go through Redis and back. */
  cacheEntries?: number;
}

/** Feeds the partitions round-robin, in slices, crashing and resuming as a restarted worker would. */
async function run(stream: SessionStream, opts: RunOptions, config = PROP_CONFIG, bound = BOUND) {
  const h = new OperatorHarness(sessionize, config, {
    partitions: PARTITIONS,
    outOfOrdernessMs: bound,
    stage: STAGE,
    prefix: "prop",
    cacheEntries: opts.cacheEntries,
  });
  const rng = new Random(opts.seed ?? 1);
  const points: CrashPoint[] = ["before_commits", "mid_commits", "after_commits"];
  const pos = stream.partitions.map(() => 0);
  let crashes = 0;
  while (pos.some((p, i) => p < stream.partitions[i]!.length)) {
    for (let p = 0; p < PARTITIONS; p++) {
      const slice = opts.randomSlices ? rng.int(1, opts.batchSize * 4) : Math.max(opts.batchSize * 3, 50);
      const envs = stream.partitions[p]!.slice(pos[p], pos[p]! + slice);
      if (envs.length === 0) continue;
      const batches = Math.ceil(envs.length / opts.batchSize);
      const at = opts.randomSlices ? rng.pick(points) : points[crashes % points.length]!;
      const crash = opts.crashRate && rng.chance(opts.crashRate) ? { batch: rng.int(0, batches - 1), at } : undefined;
      const res = await h.push(p, envs, { batchSize: opts.batchSize, crash });
      if (!res.crashed) {
        pos[p]! += envs.length;
        continue;
      }
      crashes++;
      await h.restart();
      // Redeliver from the first unacked input: after `mid_commits` and `after_commits` the
      // inputs of that batch are already applied and must be skipped.
      pos[p]! += res.acked;
    }
  }
  for (let p = 0; p < PARTITIONS; p++) await h.advanceWatermark(p, FAR);
  return { h, crashes };
}

function snapshot(h: OperatorHarness<SessionizeConfig>) {
  const sorted = (to: "next" | "late" | "sessions") => h.emits(to).map((e) => [e.id, e.value]).sort(([a], [b]) => String(a).localeCompare(String(b)));
  return { next: sorted("next"), late: sorted("late"), sessions: sorted("sessions") };
}

/** Checks one run against the generator's ground truth. */
async function checkTruth(h: OperatorHarness<SessionizeConfig>, stream: SessionStream): Promise<void> {
  const truth = [...stream.events.values()];
  const accepted = new Set(truth.filter((e) => e.timeliness !== "late_beyond").map((e) => e.envelope.src.seq));
  const beyond = truth.filter((e) => e.timeliness === "late_beyond");

  const passed = nexts(h);
  assert.deepEqual(new Set(passed.map((e) => e.src.seq)), accepted, "exactly the on-time and allowed-late events are passed on");
  const late = h.outputs("late") as LateRecord[];
  assert.deepEqual(
    late.map((r) => [r.src.seq, r.lateness_ms, r.reason]).sort((a, b) => (a[0] as number) - (b[0] as number)),
    beyond.map((e) => [e.envelope.src.seq, e.lateness_ms, "beyond_allowed_lateness"]).sort((a, b) => (a[0] as number) - (b[0] as number)),
    "exactly the beyond-lateness events go to late, with the generator's lateness",
  );

  const all = summaries(h);
  const finals = finalSummaries(all);
  const project = (s: SessionSummary) => ({
    user: s.user,
    start: s.start,
    end: s.end,
    event_count: s.event_count,
    counts: s.counts,
    query_ids: s.query_ids,
    response_ids: s.response_ids,
    ended_in_abandonment: s.ended_in_abandonment,
  });
  assert.deepEqual(
    finals.map(project),
    stream.expected.map(({ src_seqs: _, ...rest }) => rest),
    "final summaries equal the offline sessionization of the accepted events",
  );
  assert.ok(finals.every((s) => !s.split && s.duration_ms === s.end - s.start));

  // Every passed event lands in exactly one final summary through its provisional id.
  const owner = new Map<string, SessionSummary>();
  for (const s of finals) {
    for (const id of [s.session_id, ...s.merged_from]) {
      assert.ok(!owner.has(id), `session id ${id} claimed by two final summaries`);
      owner.set(id, s);
    }
  }
  const landed = new Map<string, number>();
  for (const e of passed) {
    const s = owner.get(sessionOf(e).id);
    assert.ok(s, `event ${e.src.seq}: provisional session ${sessionOf(e).id} resolves to no final summary`);
    assert.equal(s.user, e.event.user);
    assert.ok(e.event.ts >= s.start && e.event.ts <= s.end, `event ${e.src.seq} outside its session`);
    landed.set(s.session_id, (landed.get(s.session_id) ?? 0) + 1);
  }
  for (const s of finals) assert.equal(landed.get(s.session_id), s.event_count, `session ${s.session_id}: events landed vs event_count`);
  assert.deepEqual(await stateLeft(h), [], "no state left after the final watermark");
}

test("property: seeded sessions through shuffles, lateness, batch sizes and crashes give the ground truth, identically", async () => {
  const stream = generateSessionStream({
    seed: 20250301,
    users: 500,
    partitions: PARTITIONS,
    gapMs: GAP,
    allowedLatenessMs: LATENESS,
    outOfOrdernessMs: BOUND,
  });
  const stats = { on_time: 0, late_within: 0, late_beyond: 0 };
  for (const e of stream.events.values()) stats[e.timeliness]++;
  assert.ok(stream.generatedSessions >= 2000, `thousands of sessions (${stream.generatedSessions})`);
  assert.ok(stats.late_within > 100 && stats.late_beyond > 50, JSON.stringify(stats));
  assert.ok(stream.maxExtentMs < 4 * 60 * MIN, "no generated session reaches the length cap");
  assert.ok(stream.partitions.every((p) => p.length > 1000));

  const reference = await run(stream, { batchSize: 1 });
  await checkTruth(reference.h, stream);
  const expected = snapshot(reference.h);

  // The stream must exercise what it claims to: merges, revisions after emission, merges into an emitted session.
  const all = summaries(reference.h);
  const finals = finalSummaries(all);
  assert.ok(finals.filter((s) => s.merged_from.length > 0).length > 10, "merges");
  assert.ok(all.filter((s) => s.revision > 0).length > 10, "revisions");
  assert.ok(finals.some((s) => s.revision > 0 && s.merged_from.length > 0), "a merge into an already emitted session");

  for (const opts of [
    { batchSize: 7 },
    { batchSize: 500 },
    { batchSize: 7, crashRate: 0.1, seed: 11 },
    { batchSize: 500, crashRate: 0.3, seed: 12 },
    { batchSize: 61, crashRate: 0.5, seed: 13 },
    { batchSize: 7, cacheEntries: 16 },
    { batchSize: 500, crashRate: 0.3, seed: 14, cacheEntries: 64 },
  ]) {
    const { h, crashes } = await run(stream, opts);
    await checkTruth(h, stream);
    assert.deepEqual(snapshot(h), expected, `every output identical with ${JSON.stringify(opts)}`);
    if (opts.crashRate) {
      assert.ok(crashes >= 3, `${crashes} crashes`);
      assert.ok(h.dropped("already_applied") > 0, "already-applied inputs were redelivered and skipped");
    }
  }
});

test("property: across random gaps, lateness and out-of-orderness, with redeliveries regrouped into other batches", async () => {
  for (let seed = 1; seed <= 8; seed++) {
    const r = new Random(seed * 7919);
    const gapMs = r.pick([30_000, MIN, 5 * MIN]);
    const latenessMs = r.int(2, gapMs - 1);
    const bound = r.int(0, gapMs);
    const config: SessionizeConfig = { gap: `${gapMs}ms`, allowed_lateness: `${latenessMs}ms`, max_session_length: "4h", emit_updates: true };
    const stream = generateSessionStream({
      seed,
      users: r.int(20, 80),
      partitions: PARTITIONS,
      gapMs,
      allowedLatenessMs: latenessMs,
      outOfOrdernessMs: bound,
      lateWithinRate: r.pick([0.02, 0.1, 0.3]),
      lateBeyondRate: r.pick([0.01, 0.05, 0.2]),
    });
    const label = `seed ${seed} ${JSON.stringify(config)} bound ${bound}`;
    const reference = await run(stream, { batchSize: 1 }, config, bound);
    await checkTruth(reference.h, stream);
    const expected = snapshot(reference.h);
    for (const opts of [
      { batchSize: r.int(2, 40), crashRate: 0.3, randomSlices: true, seed: seed + 1 },
      { batchSize: r.int(50, 600), crashRate: 0.5, randomSlices: true, seed: seed + 2, cacheEntries: r.chance(0.5) ? 8 : undefined },
      { batchSize: r.int(1, 9), crashRate: 0.6, randomSlices: true, seed: seed + 3, cacheEntries: 8 },
    ]) {
      const { h } = await run(stream, opts, config, bound);
      await checkTruth(h, stream);
      assert.deepEqual(snapshot(h), expected, `${label}: every output identical with ${JSON.stringify(opts)}`);
    }
  }
});

/** bot-score's flag marker: the event that made the user a bot, annotated band "bot". */
function marker(user: string, atMs: number): Envelope {
  const m = ev(user, atMs, "accept");
  m.attrs = { bot: { score: 0.95, band: "bot", indicators: [], flagged: true } };
  return m;
}

test("bot-score's flag marker is passed on unchanged, joins no session and changes no session state", async () => {
  const events = [ev("u1", 0, "query", { query_id: "q1" }), ev("u1", 1 * MIN), marker("u1", 2 * MIN), ev("u1", 3 * MIN)];
  const h = harness({}, 0);
  await h.push(0, structuredClone(events));
  const out = nexts(h);
  assert.deepEqual(out[2], events[2], "the marker as it came");
  assert.deepEqual(h.emits("next")[2]!.id, `${STAGE}:${events[2]!.src.seq}`);
  assert.deepEqual([0, 1, 3].map((i) => sessionOf(out[i]!).seq_in_session), [1, 2, 3]);
  // The same events without the marker leave the same sessions behind.
  const without = harness({}, 0);
  await without.push(0, structuredClone(events.filter((_, i) => i !== 2)));
  const sessionsOf = async (x: OperatorHarness<SessionizeConfig>) => stored((await x.state.get([stateKey("u1")]))[0]!)!.payload;
  assert.deepEqual(await sessionsOf(h), await sessionsOf(without));
  await h.advanceWatermark(0, FAR);
  await without.advanceWatermark(0, FAR);
  assert.deepEqual(summaries(h), summaries(without));
  assert.equal(summaries(h)[0]!.event_count, 3);
  // Far behind the watermark it is still passed on (it is no event of a session, so never late).
  await h.push(0, [marker("u1", 0)]);
  assert.equal(h.outputs("late").length, 0);
  assert.equal(nexts(h).length, 5);
});

test("a flag marker counts toward the applied fence: redelivered after its commit, it is skipped", async () => {
  const events = [ev("u1", 0), marker("u1", 1 * MIN)];
  const h = harness({}, 0);
  const r = await h.push(0, events, { batchSize: 2, crash: { batch: 0, at: "after_commits" } });
  assert.equal(r.crashed, true);
  await h.restart();
  await h.push(0, events, { batchSize: 2 });
  assert.deepEqual(h.log.slice(2).map((l) => l.outcome.dropped), ["already_applied", "already_applied"]);
  assert.equal(nexts(h).length, 2);
  // A marker of a user with no session leaves nothing behind.
  const lone = harness({}, 0);
  await lone.push(0, [marker("u9", 0)]);
  assert.equal(nexts(lone).length, 1);
  assert.deepEqual(await stateLeft(lone), []);
  assert.deepEqual(stored((await lone.state.get([stateKey("u9")]))[0]!), { applied: lone.log[0]!.input.seq, payload: "" }, "only its fence");
});

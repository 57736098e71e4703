import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope, EventType, TacitEvent } from "../src/core/event.js";
import { TransientError } from "../src/core/errors.js";
import { isKeyedProcessor, type KeyedProcessor, type OperatorContext, type Outcome, type StageInput } from "../src/core/operator.js";
import { userKey } from "../src/core/state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { OperatorHarness, runAlone } from "../test/support/operator-harness.js";
import {
  botScore,
  combineIndicators,
  decodeBotState,
  encodeBotState,
  maxInWindowContaining,
  type BotAnnotation,
  type BotRecord,
  type BotScoreConfig,
  type ResponseMemo,
  type UserState,
} from "./bot-score.js";

const T0 = Date.parse("2025-03-01T12:00:00Z");
const STAGE = "bot-score";
const CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
const GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/** A harness on one partition; `wall` is the store's expiry clock (a fake wall clock). */
function harness(config: BotScoreConfig = {}, wall = { t: T0 }): OperatorHarness<BotScoreConfig> {
  return new OperatorHarness(botScore, config, { stage: STAGE, prefix: "feedback", storeNow: () => wall.t });
}

let srcSeq = 0;
function envOf(event: TacitEvent, attrs: Record<string, unknown> = {}): Envelope {
  return { v: 1, event, src: { seq: ++srcSeq }, partition: 0, attrs };
}

/** Pushes events (or envelopes) and returns their outcomes; one input per batch unless told. */
async function run(h: OperatorHarness<BotScoreConfig>, items: (TacitEvent | Envelope)[], batchSize = 1): Promise<Outcome[]> {
  const from = h.log.length;
  await h.push(0, items.map((x) => ("v" in x ? x : envOf(x))), { batchSize });
  return h.log.slice(from).map((l) => l.outcome);
}

function inputOf(envelope: Envelope, seq: number): StageInput {
  return { seq, subject: `feedback.x.${STAGE}.0`, data: new Uint8Array(), envelope, deliveries: 1, stream_time_ms: envelope.event.ts };
}

/** A context for calling create directly (inputs the harness cannot build, metric attributes). */
function directCtx(counts = new Map<string, number>()): OperatorContext {
  return {
    pipeline: "feedback",
    prefix: "feedback",
    stage: STAGE,
    partitions: 1,
    state: new MemoryStateStore(),
    clock: new ManualClock(T0),
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count: (name, by = 1, attrs) => counts.set(`${name}:${attrs?.band ?? ""}`, (counts.get(`${name}:${attrs?.band ?? ""}`) ?? 0) + by) },
    env: {},
    devMode: true,
  };
}

/** The operator alone, each user's state in memory (no store, no guard). */
async function direct(counts?: Map<string, number>): Promise<(inputs: StageInput[]) => Outcome[]> {
  const proc = await botScore.create({}, directCtx(counts));
  assert.ok(isKeyedProcessor(proc));
  return runAlone(proc as KeyedProcessor<UserState>);
}

/** A user's stored value, decoded: the applied sequence and the state. */
async function stored(h: OperatorHarness<BotScoreConfig>, user: string): Promise<{ applied: number; state: UserState }> {
  const { applied, payload } = await h.stored(user);
  return { applied, state: decodeBotState(payload) };
}

let eventCounter = 0;
function ev(user: string, ts: number, type: EventType = "dwell", extra: Partial<TacitEvent> = {}): TacitEvent {
  eventCounter++;
  return { event_id: `e${eventCounter}`, session_id: `s-${user}`, user, user_key_version: "v1", timestamp: new Date(ts).toISOString(), ts, event_type: type, payload: {}, ...extra };
}

/** `n` events of one user starting at T0, `gap` ms apart. */
function series(user: string, n: number, gap: number, start = T0): TacitEvent[] {
  return Array.from({ length: n }, (_, i) => ev(user, start + i * gap));
}

function bandOf(o: Outcome): "bot" | "ambivalent" | "human" {
  const e = o.emits[0]!;
  if (e.to === "bots") {
    // The flagging event also sends its one marker on; every other bot event only goes to bots.
    if (o.emits.length === 2) assert.equal(o.emits[1]!.to, "next");
    else assert.equal(o.emits.length, 1);
    return "bot";
  }
  assert.equal(o.emits.length, 1);
  assert.equal(e.to, "next");
  return ((e.value as Envelope).attrs.bot as BotAnnotation).band;
}

function scoreOf(o: Outcome): number {
  const e = o.emits[0]!;
  return e.to === "bots" ? (e.value as BotRecord).score : ((e.value as Envelope).attrs.bot as BotAnnotation).score;
}

function indicatorNames(o: Outcome): string[] {
  const e = o.emits[0]!;
  const list = e.to === "bots" ? (e.value as BotRecord).indicators : ((e.value as Envelope).attrs.bot as BotAnnotation).indicators;
  return list.map((i) => i.name);
}

test("user agent: enrich's flag or a raw UA that isbot matches makes a bot; a browser does not", async () => {
  const h = harness();
  const envs = [
    ev("u1", T0, "query", { ua: { raw_is_bot: true } }),
    ev("u2", T0, "query", { ua: { raw: GOOGLEBOT, raw_is_bot: false } }),
    ev("u3", T0, "query", { ua: { raw: CHROME, raw_is_bot: false } }),
    ev("u4", T0, "query"),
  ].map((e) => envOf(e));
  const [flagged, raw, browser, none] = await run(h, envs);
  for (const o of [flagged!, raw!]) {
    assert.equal(bandOf(o), "bot");
    assert.equal(scoreOf(o), 1);
    assert.deepEqual(indicatorNames(o), ["user_agent"]);
    const rec = o.emits[0]!.value as BotRecord;
    assert.equal(rec.user, o === flagged ? "u1" : "u2");
    assert.equal(rec.event.event_type, "query");
  }
  assert.match((raw!.emits[0]!.value as BotRecord).indicators[0]!.detail, /isbot \("Google/);
  for (const o of [browser!, none!]) {
    assert.equal(bandOf(o), "human");
    assert.equal(scoreOf(o), 0);
    assert.deepEqual(indicatorNames(o), []);
  }
  assert.equal(h.outputs("bots").length, 2);
  // The two human events, and for each bot its one flag marker.
  const next = h.outputs("next") as Envelope[];
  assert.deepEqual(next.map((e) => [e.event.user, (e.attrs.bot as BotAnnotation).band]), [["u1", "bot"], ["u2", "bot"], ["u3", "human"], ["u4", "human"]]);
  assert.equal(h.metric("bot_band"), 4);
  // Output ids are the stage name and the origin sequence.
  assert.equal(flagged!.emits[0]!.id, `${STAGE}:${envs[0]!.src.seq}`);
});

test("user agent indicator can be switched off or down-weighted", async () => {
  const off = await run(harness({ user_agent: { enabled: false } }), [ev("u", T0, "query", { ua: { raw: GOOGLEBOT, raw_is_bot: true } })]);
  assert.equal(bandOf(off[0]!), "human");
  const half = await run(harness({ user_agent: { weight: 0.5 } }), [ev("u", T0, "query", { ua: { raw_is_bot: true } })]);
  assert.equal(bandOf(half[0]!), "ambivalent");
  assert.equal(scoreOf(half[0]!), 0.5);
});

test("event-time rate: a burst of 12 events in 1 s is flagged, the same 12 over 2 minutes are not", async () => {
  const burst = await run(harness(), series("u", 12, 80));
  const bands = burst.map(bandOf);
  // 1–5 events in the window: human; 6–10: ambivalent (soft threshold 5); 11, 12: more than 10 → bot.
  assert.deepEqual(bands, [...Array(5).fill("human"), ...Array(5).fill("ambivalent"), "bot", "bot"]);
  assert.deepEqual(indicatorNames(burst[10]!), ["rate"]);
  const rec = burst[10]!.emits[0]!.value as BotRecord;
  assert.equal(rec.indicators[0]!.value, 11);
  assert.equal(rec.indicators[0]!.limit, 10);
  // Ambivalent strengths grow with the count.
  const amb = burst.slice(5, 10).map(scoreOf);
  for (let i = 1; i < amb.length; i++) assert.ok(amb[i]! > amb[i - 1]!, `${amb}`);

  const spread = await run(harness(), series("u", 12, 120_000 / 11));
  assert.deepEqual(spread.map(bandOf), Array(12).fill("human"));
  assert.ok(spread.every((o) => scoreOf(o) === 0));
});

test("impressions are not user actions: a results page of 10 response_shown events within ms does not count toward the rate", async () => {
  const page = [ev("u", T0, "query"), ...Array.from({ length: 10 }, (_, i) => ev("u", T0 + 200 + i, "response_shown", { response_id: `r${i}`, payload: { position: i + 1 } })), ev("u", T0 + 5_000, "click", { response_id: "r0", payload: { position: 1 } })];
  assert.deepEqual((await run(harness(), page)).map(bandOf), Array(page.length).fill("human"));
  // Counted when configured as actions: the same page is then a burst.
  const counted = await run(harness({ untimed_event_types: [] }), page);
  assert.ok(counted.map(bandOf).includes("bot"));
});

test("a script's metronome shows in every event it sends: impressions count for regularity", async () => {
  const types: EventType[] = ["query", "response_shown", "accept"];
  const metronome = Array.from({ length: 24 }, (_, i) => ev("u", T0 + i * 3_000, types[i % 3]!, { response_id: `r${Math.floor(i / 3)}` }));
  const out = await run(harness({ rate: [] }), metronome);
  assert.equal(bandOf(out[out.length - 1]!), "bot");
  assert.ok(indicatorNames(out[out.length - 1]!).includes("regularity"));
});

test("event-time rate is decided on event time, whatever the arrival order", async () => {
  const events = series("u", 12, 80).reverse();
  const out = await run(harness(), events);
  // The 11th and 12th arrivals complete a window of 11 and 12 events.
  assert.deepEqual(out.map(bandOf).slice(10), ["bot", "bot"]);
});

test("rate over 15 minutes: more than 300 events is a bot, more than 150 ambivalent", async () => {
  const out = await run(harness({ regularity: { enabled: false } }), series("u", 301, 2_500));
  assert.equal(bandOf(out[149]!), "human");
  assert.equal(bandOf(out[150]!), "ambivalent");
  assert.equal(bandOf(out[299]!), "ambivalent");
  assert.equal(bandOf(out[300]!), "bot");
  assert.match((out[300]!.emits[0]!.value as BotRecord).indicators[0]!.detail, /301 events in 15m/);
});

test("regularity: perfectly periodic events are a bot after min_events, irregular ones are not", async () => {
  const periodic = await run(harness(), series("u", 20, 30_000));
  assert.deepEqual(periodic.slice(0, 19).map(bandOf), Array(19).fill("human"));
  assert.equal(bandOf(periodic[19]!), "bot");
  assert.deepEqual(indicatorNames(periodic[19]!), ["regularity"]);

  // Gaps alternating 10 s / 50 s: CV ≈ 0.67.
  let t = T0;
  const irregular = Array.from({ length: 25 }, (_, i) => ev("u", (t += i % 2 ? 10_000 : 50_000)));
  assert.deepEqual((await run(harness(), irregular)).map(bandOf), Array(25).fill("human"));

  // Gaps alternating 26 s / 34 s: CV ≈ 0.13, between max_cv 0.1 and ambivalent_cv 0.2.
  t = T0;
  const nearly = Array.from({ length: 20 }, (_, i) => ev("u", (t += i % 2 ? 26_000 : 34_000)));
  const out = await run(harness(), nearly);
  assert.equal(bandOf(out[19]!), "ambivalent");
  assert.deepEqual(indicatorNames(out[19]!), ["regularity"]);
});

test("regularity sees the last min_events events even when they span more than the longest rate window", async () => {
  // One event every 2 minutes: 20 events span 38 minutes, beyond the 15-minute rate window.
  const out = await run(harness(), series("u", 20, 120_000));
  assert.deepEqual(out.slice(0, 19).map(bandOf), Array(19).fill("human"));
  assert.equal(bandOf(out[19]!), "bot");
  assert.deepEqual(indicatorNames(out[19]!), ["regularity"]);
});

test("impossible: a click before the response was shown, in either arrival order", async () => {
  const shownFirst = await run(harness(), [
    ev("u", T0 + 5_000, "response_shown", { response_id: "r1", payload: { text_length: 100 } }),
    ev("u", T0 + 1_000, "click", { response_id: "r1", payload: { position: 1 } }),
  ]);
  assert.equal(bandOf(shownFirst[0]!), "human");
  assert.equal(bandOf(shownFirst[1]!), "bot");
  assert.deepEqual(indicatorNames(shownFirst[1]!), ["impossible"]);

  const clickFirst = await run(harness(), [
    ev("u", T0 + 1_000, "click", { response_id: "r1", payload: { position: 1 } }),
    ev("u", T0 + 5_000, "response_shown", { response_id: "r1", payload: { text_length: 100 } }),
  ]);
  assert.deepEqual(clickFirst.map(bandOf), ["human", "bot"]);

  const fine = await run(harness(), [
    ev("u", T0, "response_shown", { response_id: "r1" }),
    ev("u", T0 + 3_000, "click", { response_id: "r1", payload: { position: 1 } }),
    ev("u", T0 + 9_000, "click", { response_id: "r2", payload: { position: 1 } }),
  ]);
  assert.deepEqual(fine.map(bandOf), ["human", "human", "human"]);

  const skew = await run(harness({ impossible: { tolerance: "500ms" } }), [
    ev("u", T0 + 1_000, "response_shown", { response_id: "r1" }),
    ev("u", T0 + 700, "click", { response_id: "r1", payload: { position: 1 } }),
  ]);
  assert.deepEqual(skew.map(bandOf), ["human", "human"]);

  const off = await run(harness({ impossible: { click_before_shown: false } }), [
    ev("u", T0 + 5_000, "response_shown", { response_id: "r1" }),
    ev("u", T0 + 1_000, "click", { response_id: "r1", payload: { position: 1 } }),
  ]);
  assert.deepEqual(off.map(bandOf), ["human", "human"]);
});

test("impossible: an accept, copy or edit before the response was shown, or a dwell that began before it", async () => {
  const shown = (ts: number) => ev("u", ts, "response_shown", { response_id: "r1", payload: { text_length: 1000 } });
  const accept = (ts: number) => ev("u", ts, "accept", { response_id: "r1" });
  const dwell = (ts: number, ms: number) => ev("u", ts, "dwell", { response_id: "r1", payload: { dwell_ms: ms } });
  assert.deepEqual((await run(harness(), [shown(T0 + 5_000), accept(T0 + 1_000)])).map(bandOf), ["human", "bot"]);
  assert.deepEqual((await run(harness(), [accept(T0 + 1_000), shown(T0 + 5_000)])).map(bandOf), ["human", "bot"]);
  const copy = ev("u", T0 + 1_000, "copy_paste", { response_id: "r1", payload: { span_start: 0, span_end: 50, span_length: 50 } });
  assert.deepEqual((await run(harness(), [shown(T0 + 5_000), copy])).map(bandOf), ["human", "bot"]);
  // A 60 s dwell reported 2 s after the impression: the read began 58 s before the response existed.
  assert.deepEqual((await run(harness(), [shown(T0), dwell(T0 + 2_000, 60_000)])).map(bandOf), ["human", "bot"]);
  assert.deepEqual((await run(harness(), [dwell(T0 + 2_000, 60_000), shown(T0)])).map(bandOf), ["human", "bot"]);
  // A read from the impression on, rounded 1 ms long, and an accept after it are human.
  assert.deepEqual((await run(harness(), [shown(T0), dwell(T0 + 30_000, 30_001), accept(T0 + 31_000)])).map(bandOf), ["human", "human", "human"]);
  const off = await run(harness({ impossible: { used_before_shown: false } }), [shown(T0 + 5_000), accept(T0 + 1_000), dwell(T0 + 6_000, 60_000)]);
  assert.deepEqual(off.map(bandOf), ["human", "human", "human"]);
});

test("impossible: a copy longer than the response, in either arrival order", async () => {
  const shown = (ts: number) => ev("u", ts, "response_shown", { response_id: "r1", payload: { text_length: 100 } });
  const copy = (ts: number, len: number) => ev("u", ts, "copy_paste", { response_id: "r1", payload: { span_start: 0, span_end: len, span_length: len } });
  assert.deepEqual((await run(harness(), [shown(T0), copy(T0 + 2_000, 150)])).map(bandOf), ["human", "bot"]);
  assert.deepEqual((await run(harness(), [copy(T0 + 2_000, 150), shown(T0)])).map(bandOf), ["human", "bot"]);
  assert.deepEqual((await run(harness(), [shown(T0), copy(T0 + 2_000, 100)])).map(bandOf), ["human", "human"]);
  // span_end − span_start when span_length is missing.
  const noLen = ev("u", T0 + 2_000, "copy_paste", { response_id: "r1", payload: { span_start: 10, span_end: 180 } });
  assert.deepEqual((await run(harness(), [shown(T0), noLen])).map(bandOf), ["human", "bot"]);
});

test("responses remembered per user are bounded", async () => {
  const h = harness({ impossible: { max_responses: 5 } });
  await run(h, Array.from({ length: 12 }, (_, i) => ev("u", T0 + i * 60_000, "response_shown", { response_id: `r${i}`, payload: { text_length: 10 } })));
  const { state } = await stored(h, "u");
  assert.deepEqual([...state.resp.keys()].sort(), ["r10", "r11", "r7", "r8", "r9"]);
});

test("ids from input cannot reach the prototype (response_id __proto__)", async () => {
  const out = await run(harness(), [
    ev("u", T0 + 5_000, "response_shown", { response_id: "__proto__", payload: { text_length: 10 } }),
    ev("u", T0 + 1_000, "click", { response_id: "__proto__", payload: { position: 1 } }),
  ]);
  assert.deepEqual(out.map(bandOf), ["human", "bot"]);
  assert.equal(({} as Record<string, unknown>).t, undefined);
});

test("combination: two ambivalent indicators together make a bot; the score is the noisy-OR", async () => {
  const cfg: BotScoreConfig = { user_agent: { weight: 0.7 } };
  const uaOnly = await run(harness(cfg), [ev("u", T0, "query", { ua: { raw_is_bot: true } })]);
  assert.equal(bandOf(uaOnly[0]!), "ambivalent");
  const rateOnly = await run(harness(cfg), series("u", 7, 100));
  assert.equal(bandOf(rateOnly[6]!), "ambivalent");

  const both = await run(harness(cfg), series("u", 7, 100).map((e) => ({ ...e, ua: { raw_is_bot: true } })));
  const last = both[6]!;
  assert.equal(bandOf(last), "bot");
  assert.deepEqual(indicatorNames(last).sort(), ["rate", "user_agent"]);
  const rec = last.emits[0]!.value as BotRecord;
  const expected = 1 - (1 - 0.7) * (1 - rec.indicators.find((i) => i.name === "rate")!.strength);
  assert.ok(Math.abs(rec.score - expected) < 1e-3, `${rec.score} vs ${expected}`);
  assert.ok(rec.score > scoreOf(uaOnly[0]!) && rec.score > scoreOf(rateOnly[6]!));
});

test("combineIndicators is 0 with no evidence, monotone, and bounded by 1", () => {
  assert.equal(combineIndicators([]), 0);
  fc.assert(
    fc.property(
      fc.array(fc.record({ strength: fc.double({ min: 0, max: 1, noNaN: true }), weight: fc.double({ min: 0, max: 1, noNaN: true }) }), { maxLength: 6 }),
      fc.record({ strength: fc.double({ min: 0, max: 1, noNaN: true }), weight: fc.double({ min: 0, max: 1, noNaN: true }) }),
      (base, extra) => {
        const a = combineIndicators(base);
        const b = combineIndicators([...base, extra]);
        return a >= 0 && b <= 1 + 1e-12 && b >= a - 1e-12;
      },
    ),
  );
});

test("ambivalent band: passed on with the annotation and counted, not sent to bots", async () => {
  const h = harness();
  const envs = series("u", 7, 100).map((e, i) => envOf(e, i === 6 ? { session: { id: "s1", seq_in_session: 7 } } : {}));
  const out = await run(h, envs);
  const o = out[6]!;
  assert.equal(o.emits[0]!.to, "next");
  assert.equal(o.emits[0]!.id, `${STAGE}:${envs[6]!.src.seq}`);
  const env = o.emits[0]!.value as Envelope;
  // The envelope goes on unchanged but for the annotation; earlier annotations are kept.
  assert.deepEqual({ ...env, attrs: { session: env.attrs.session } }, envs[6]);
  const bot = env.attrs.bot as BotAnnotation;
  assert.equal(bot.band, "ambivalent");
  assert.ok(bot.score >= 0.4 && bot.score < 0.8);
  assert.equal(bot.indicators[0]!.name, "rate");
  assert.equal(h.outputs("bots").length, 0);

  // Each band is counted under its own attribute.
  const counts = new Map<string, number>();
  (await direct(counts))(series("u", 11, 80).map((e, i) => inputOf(envOf(e), i + 1)));
  assert.deepEqual(Object.fromEntries(counts), { "bot_band:human": 5, "bot_band:ambivalent": 5, "bot_band:bot": 1, "bot_flagged:": 1 });
});

test("sticky: once a bot, a bot for the state TTL, then forgotten", async () => {
  const wall = { t: T0 };
  const h = harness({ state_ttl: "1h" }, wall);
  const burst = await run(h, series("u", 11, 50));
  assert.equal(bandOf(burst[10]!), "bot");
  // Calm events 10 and 50 minutes later: still a bot, with the sticky indicator.
  for (const t of [T0 + 600_000, T0 + 3_000_000]) {
    wall.t = t;
    const [o] = await run(h, [ev("u", t)]);
    assert.equal(bandOf(o!), "bot");
    assert.deepEqual(indicatorNames(o!), ["sticky"]);
    assert.equal(scoreOf(o!), scoreOf(burst[10]!));
  }
  // Other users are not affected.
  assert.equal(bandOf((await run(h, [ev("v", wall.t)]))[0]!), "human");
  // Silent for more than the TTL: the state expired, the user starts afresh.
  wall.t = T0 + 3_000_000 + 3_600_001;
  assert.deepEqual(h.state.keys(), []);
  const [fresh] = await run(h, [ev("u", wall.t)]);
  assert.equal(bandOf(fresh!), "human");
});

test("the state lives state_ttl of event time after the user's latest event, cached or read back, whatever the wall clock", async () => {
  for (const cold of [false, true]) {
    const h = new OperatorHarness(botScore, { state_ttl: "1h" }, { stage: STAGE, prefix: "feedback" }); // the store never expires anything
    const burst = await run(h, series("u", 11, 50));
    assert.equal(bandOf(burst[10]!), "bot");
    if (cold) await h.restart();
    const last = T0 + 500;
    assert.deepEqual(indicatorNames((await run(h, [ev("u", last + 3_600_000 - 1)]))[0]!), ["sticky"]);
    if (cold) await h.restart();
    const [fresh] = await run(h, [ev("u", last + 2 * 3_600_000)]);
    assert.equal(bandOf(fresh!), "human", `cold cache: ${cold}`);
    assert.equal((await stored(h, "u")).state.bot, undefined);
  }
});

test("flagging: the event that turns a user into a bot sends one marker on (band bot, flagged), once per state lifetime", async () => {
  const wall = { t: T0 };
  const h = harness({ state_ttl: "1h" }, wall);
  const envs = series("u", 12, 80).map((e) => envOf(e, { session: { id: "s1", seq_in_session: 1 } }));
  const out = await run(h, envs);
  const first = out.findIndex((o) => o.emits[0]!.to === "bots");
  assert.equal(first, 10, "the 11th event in 1 s is the first bot event");
  const o = out[first]!;
  assert.deepEqual(o.emits.map((e) => [e.to, e.id]), [["bots", `${STAGE}:${envs[first]!.src.seq}`], ["next", `${STAGE}:${envs[first]!.src.seq}:flagged`]]);
  const marker = o.emits[1]!.value as Envelope;
  const bot = marker.attrs.bot as BotAnnotation;
  // The triggering envelope, unchanged but for the annotation, which repeats the bots record's verdict.
  assert.deepEqual({ ...marker, attrs: { session: marker.attrs.session } }, envs[first]);
  assert.deepEqual(bot, { score: scoreOf(o), band: "bot", indicators: (o.emits[0]!.value as BotRecord).indicators, flagged: true });
  // Later bot events of the same user go to bots only.
  assert.ok(out.slice(first + 1).every((x) => x.emits.length === 1 && x.emits[0]!.to === "bots"));
  assert.equal(h.outputs("next").filter((e) => ((e as Envelope).attrs.bot as BotAnnotation).band === "bot").length, 1);
  assert.equal(h.metric("bot_flagged"), 1);

  // A sticky bot event much later: no second marker. After the state expired, a new verdict sends a new one.
  wall.t = T0 + 1_800_000;
  const [sticky] = await run(h, [ev("u", wall.t)]);
  assert.equal(sticky!.emits.length, 1);
  wall.t = T0 + 1_800_000 + 3_600_001;
  const again = await run(h, series("u", 11, 80, wall.t));
  assert.deepEqual(again.map((x) => x.emits.length), [...Array(10).fill(1), 2]);
  assert.equal(h.metric("bot_flagged"), 2);
});

test("flagging is exactly once under redelivery: the marker keeps its id and content, and is not emitted again once applied", async () => {
  const envs = series("u", 12, 80).map((e) => envOf(e));
  const straight = harness();
  await run(straight, structuredClone(envs), 12);
  const h = harness();
  // Crash before the commits: the batch is recomputed, the same marker (same id, same value) comes again.
  await h.push(0, envs, { batchSize: 12, crash: { batch: 0, at: "before_commits" } });
  await h.restart();
  // The harness throws when an id comes back with another value.
  await h.push(0, envs, { batchSize: 5, crash: { batch: 2, at: "after_commits" } });
  await h.restart();
  await h.push(0, envs, { batchSize: 12 });
  const markers = (x: OperatorHarness<BotScoreConfig>) => x.emits("next").filter((e) => e.id.endsWith(":flagged"));
  assert.equal(markers(h).length, 1);
  assert.deepEqual(markers(h), markers(straight));
  // The applied inputs of the last delivery emitted nothing, markers included.
  const last = h.log.slice(-12);
  assert.ok(last.every((l) => l.outcome.dropped === "already_applied" && l.outcome.emits.length === 0));
});

test("within a batch the operator sees its own earlier changes; one state read per batch", async () => {
  const envs = [...series("u", 12, 80), ...series("v", 3, 80)].map((e) => envOf(e));
  const a = harness();
  const batched = await run(a, envs, 100);
  assert.equal(a.stateCalls.get, 1);
  const b = harness();
  const single = await run(b, structuredClone(envs), 1);
  assert.equal(b.stateCalls.get, 2, "a warm cache: one read per user, none in the user's later batches");
  assert.deepEqual(batched.map((o) => o.emits), single.map((o) => o.emits));
  assert.deepEqual(batched.map(bandOf).slice(10, 12), ["bot", "bot"]);
  // One value per user, recording that user's last input of the batch (the guard) with the state.
  assert.deepEqual(a.state.keys(), [userKey("feedback", "u", STAGE, "state"), userKey("feedback", "v", STAGE, "state")]);
  assert.deepEqual([(await stored(a, "u")).applied, (await stored(a, "v")).applied], [12, 15]);
  assert.deepEqual(a.state.keys(), b.state.keys());
  assert.deepEqual(await a.state.get(a.state.keys()), await b.state.get(b.state.keys()));
});

test("exactly once: a redelivered input at or below the applied sequence is skipped; an uncommitted batch recomputes the same", async () => {
  const envs = series("u", 12, 80).map((e) => envOf(e));
  const straight = harness();
  await run(straight, structuredClone(envs));

  // Crash after the commits of the first 8 (not acked): all 12 are delivered again.
  const h = harness();
  const r = await h.push(0, envs.slice(0, 8), { batchSize: 8, crash: { batch: 0, at: "after_commits" } });
  assert.deepEqual(r, { acked: 0, crashed: true });
  await h.restart();
  const again = await run(h, envs, 12);
  assert.ok(again.slice(0, 8).every((o) => o.dropped === "already_applied" && o.emits.length === 0 && !o.commits));
  assert.deepEqual(again.slice(8).map(bandOf), ["ambivalent", "ambivalent", "bot", "bot"]);
  assert.equal(h.dropped("already_applied"), 8);
  assert.deepEqual(h.emits("next"), straight.emits("next"));
  assert.deepEqual(h.emits("bots"), straight.emits("bots"));
  assert.deepEqual(await h.state.get(h.state.keys()), await straight.state.get(straight.state.keys()));

  // Crash before the commits: the redelivered batch recomputes the same emits (the harness
  // fails on an id re-emitted with a different value) and applies the state once.
  const e = harness();
  await e.push(0, envs, { batchSize: 12, crash: { batch: 0, at: "before_commits" } });
  await e.restart();
  await e.push(0, envs, { batchSize: 12 });
  assert.equal(e.dropped("already_applied"), 0);
  assert.deepEqual(e.emits("bots"), straight.emits("bots"));
  assert.deepEqual(await e.state.get(e.state.keys()), await straight.state.get(straight.state.keys()));
});

test("a message without an envelope fails as bad_envelope without stopping the batch", async () => {
  const good = inputOf(envOf(ev("u", T0)), 2);
  const out = (await direct())([{ ...good, seq: 1, envelope: undefined }, good]);
  assert.equal(out[0]!.error?.code, "bad_envelope");
  assert.equal(out[0]!.error?.retryable, false);
  assert.equal(bandOf(out[1]!), "human");
});

test("state read failure is retryable for the whole batch", async () => {
  const h = harness();
  const get = h.state.get.bind(h.state);
  h.state.get = () => Promise.reject(new Error("down"));
  const envs = [envOf(ev("u", T0)), envOf(ev("v", T0))];
  await assert.rejects(h.push(0, envs, { batchSize: 2 }), (err: unknown) => err instanceof TransientError && err.retryable);
  assert.equal(h.log.length, 0, "nothing was decided");
  assert.deepEqual([h.outputs("next"), h.outputs("bots"), h.state.keys()], [[], [], []]);
  // Redelivered once the store is back: processed as usual.
  h.state.get = get;
  assert.deepEqual((await run(h, envs, 2)).map(bandOf), ["human", "human"]);
});

test("responses past state_ttl are forgotten input by input as a state read back for every input forgets them", async () => {
  // Three hours of one user's responses, a new one every 10 minutes and a click on one shown
  // 50 minutes earlier, against a TTL of 1 h: responses age out all along.
  const events: TacitEvent[] = [];
  for (let i = 0; i < 18; i++) {
    const t = T0 + i * 600_000;
    events.push(ev("u", t, "response_shown", { response_id: `r${i}`, payload: { text_length: 100 } }));
    if (i >= 5) events.push(ev("u", t + 1_000, "click", { response_id: `r${i - 5}` }));
  }
  // Then queries only, until every response has aged out; then one more response, which ages out too.
  const queries = (from: number, n: number) => Array.from({ length: n }, (_, k) => ev("u", from + k * 600_000, "query", { payload: { text: "q" } }));
  events.push(...queries(T0 + 180 * 60_000, 9), ev("u", T0 + 261 * 60_000, "response_shown", { response_id: "r99", payload: { text_length: 100 } }), ...queries(T0 + 270 * 60_000, 8));
  const trace = async (cold: boolean) => {
    const h = harness({ state_ttl: "1h" });
    const after: { applied: number; state: UserState }[] = [];
    for (const e of events) {
      await run(h, [e]);
      if (cold) await h.restart();
      after.push(await stored(h, "u"));
    }
    return after;
  };
  const cached = await trace(false);
  const cold = await trace(true);
  cached.forEach((x, i) => assert.deepEqual(x, cold[i], `after input ${i}`));
  // After the responses (170 min and 1 s in), r0–r5 were last touched more than an hour before
  // (r5 by its click at 100 min and 1 s); r6 was clicked at 110 min and 1 s, exactly an hour before.
  const at = (i: number) => [...cached[i]!.state.resp.keys()].sort();
  assert.deepEqual(at(18 + 13 - 1), ["r10", "r11", "r12", "r13", "r14", "r15", "r16", "r17", "r6", "r7", "r8", "r9"]);
  assert.deepEqual(at(18 + 13 + 9 - 1), [], "all aged out by 260 min");
  assert.deepEqual(at(18 + 13 + 9), ["r99"]);
  assert.deepEqual(at(events.length - 1), [], "r99 aged out too");
});

test("the stored state round-trips", () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: T0, max: T0 + 3_600_000 }), { maxLength: 30 }),
      fc.dictionary(fc.string({ minLength: 1, maxLength: 8 }), fc.record({ t: fc.integer({ min: T0, max: T0 + 3_600_000 }), s: fc.option(fc.integer({ min: T0, max: T0 + 3_600_000 }), { nil: undefined }), l: fc.option(fc.nat(), { nil: undefined }), c: fc.option(fc.integer({ min: T0, max: T0 + 3_600_000 }), { nil: undefined }), p: fc.option(fc.nat(), { nil: undefined }) }, { requiredKeys: ["t"] })),
      fc.array(fc.boolean(), { minLength: 30, maxLength: 30 }),
      (raw, resp, acts) => {
        const times = [...raw].sort((a, b) => a - b);
        const act = times.map((_, i) => acts[i]!);
        const max_ts = times.length ? times[times.length - 1]! : -Infinity;
        const clean = new Map(Object.entries(resp).map(([k, m]) => [k, Object.fromEntries(Object.entries(m).filter(([, v]) => v !== undefined)) as unknown as ResponseMemo]));
        const state: UserState = { v: 1, times, act, max_ts, resp: clean, score: 0.25, quiet: undefined };
        assert.deepEqual(decodeBotState(encodeBotState(state)), state);
      },
    ),
  );
});

test("maxInWindowContaining matches a brute-force count", () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 0, max: 5_000 }), { minLength: 1, maxLength: 40 }), fc.integer({ min: 1, max: 2_000 }), fc.nat(), (raw, w, pick) => {
      const times = [...raw].sort((a, b) => a - b);
      const t = times[pick % times.length]!;
      let best = 0;
      for (let s = t - w + 1; s <= t; s++) best = Math.max(best, times.filter((x) => x >= s && x < s + w).length);
      return maxInWindowContaining(times, t, w) === best;
    }),
  );
});

test("lint catches an empty or inverted band and a TTL shorter than a window", () => {
  const issues = botScore.lint!({ threshold: 0.5, ambivalent_from: 0.6, regularity: { max_cv: 0.3, ambivalent_cv: 0.2 }, state_ttl: "5m" }, { stages: [], index: 0 });
  assert.deepEqual(issues.map((i) => i.path.join(".")).sort(), ["ambivalent_from", "regularity.ambivalent_cv", "state_ttl"]);
  assert.deepEqual(botScore.lint!({}, { stages: [], index: 0 }), []);
  const bad = botScore.lint!({ rate: [{ window: "1s", max_events: 3, ambivalent_events: 5 }] }, { stages: [], index: 0 });
  assert.equal(bad.length, 1);
  assert.match(bad[0]!.message, /ambivalent_events/);
});

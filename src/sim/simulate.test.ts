import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { isbot } from "isbot";
import { newConfigAjv } from "../config/ajv.js";
import { ConfigError } from "../core/errors.js";
import { EVENT_TYPES } from "../core/event.js";
import { checkEvent } from "../../operators/enrich.js";
import { simulate, type SimResult } from "./simulate.js";
import type { NoiseTruth, QueryTruth, ResponseTruth, UserTruth } from "./truth.js";

interface Ev {
  event_id: string;
  session_id: string;
  user_id: string;
  timestamp: string;
  query_id?: string;
  response_id?: string;
  event_type: string;
  payload: Record<string, number | string>;
  user_agent: string;
}

const HOUR = 3_600_000;
const BASE = { seed: 123, users: 600, durationMs: 2 * HOUR } as const;
const run = simulate(BASE);

/** Well-formed events once each (malformed lines and re-sent duplicates dropped), with parsed times. */
function wellFormed(r: SimResult): (Ev & { t: number })[] {
  const skip = new Set(r.truth.filter((t): t is NoiseTruth => t.kind === "noise" && (t.noise === "malformed" || t.noise === "duplicate")).map((t) => t.line));
  return r.events.flatMap((line, i) => {
    if (skip.has(i + 1)) return [];
    const e = JSON.parse(line) as Ev;
    return [{ ...e, t: Date.parse(e.timestamp) }];
  });
}

function index(r: SimResult) {
  const users = new Map<string, UserTruth>();
  const responses = new Map<string, ResponseTruth>();
  const queries = new Map<string, QueryTruth>();
  for (const t of r.truth) {
    if (t.kind === "user") users.set(t.user_id, t);
    else if (t.kind === "response") responses.set(t.response_id, t);
    else if (t.kind === "query") queries.set(t.query_id, t);
  }
  return { users, responses, queries };
}

const events = wellFormed(run);
const { users, responses, queries } = index(run);
const human = events.filter((e) => !users.get(e.user_id)!.is_bot);
const mean = (xs: number[]): number => xs.reduce((s, x) => s + x, 0) / xs.length;

test("same seed → byte-identical events and truth; another seed → different traffic", () => {
  const again = simulate(BASE);
  assert.equal(again.events.join("\n"), run.events.join("\n"));
  assert.equal(JSON.stringify(again.truth), JSON.stringify(run.truth));
  const other = simulate({ ...BASE, seed: 124 });
  assert.notEqual(other.events.join("\n"), run.events.join("\n"));
  assert.notEqual(JSON.stringify(other.truth), JSON.stringify(run.truth));
});

test("event time comes only from startTime: shifting it shifts every timestamp and nothing else", () => {
  const DAY = 24 * HOUR;
  const shifted = simulate({ ...BASE, startTime: "2026-01-02T00:00:00Z" });
  const a = events;
  const b = wellFormed(shifted);
  assert.equal(a.length, b.length);
  for (let i = 0; i < a.length; i++) {
    const { timestamp: ta, t: xa, ...restA } = a[i]!;
    const { timestamp: tb, t: xb, ...restB } = b[i]!;
    assert.equal(xb - xa, DAY, `${ta} vs ${tb}`);
    assert.deepEqual(restB, restA);
  }
});

test("endTime: the last event carries exactly that time, and the traffic is the startTime run shifted", () => {
  const end = Date.parse("2026-03-04T05:06:07.089Z");
  const ending = simulate({ ...BASE, endTime: end });
  assert.equal(ending.summary.last_event_time, new Date(end).toISOString());
  assert.equal(Math.max(...wellFormed(ending).map((e) => e.t)), end);
  const a = events;
  const b = wellFormed(ending);
  assert.equal(a.length, b.length);
  const shift = b[0]!.t - a[0]!.t;
  for (let i = 0; i < a.length; i++) {
    const { timestamp: ta, t: xa, ...restA } = a[i]!;
    const { timestamp: tb, t: xb, ...restB } = b[i]!;
    assert.equal(xb - xa, shift, `${ta} vs ${tb}`);
    assert.deepEqual(restB, restA);
  }
  // The span of session starts ends before endTime by however long the last sessions ran.
  assert.ok(Date.parse(ending.summary.first_event_time!) < end - BASE.durationMs + 60_000);
  assert.equal(JSON.stringify(simulate({ ...BASE, endTime: new Date(end).toISOString() }).events), JSON.stringify(ending.events));
});

test("options are checked and errors name the option", () => {
  for (const [opts, field] of [
    [{ ...BASE, users: 0 }, "users"],
    [{ ...BASE, botFraction: 1.5 }, "botFraction"],
    [{ ...BASE, durationMs: 0 }, "durationMs"],
    [{ ...BASE, startTime: "yesterday" }, "startTime"],
    [{ ...BASE, endTime: "tomorrow" }, "endTime"],
    [{ ...BASE, startTime: 0, endTime: 1 }, "startTime and endTime"],
    [{ ...BASE, positionBiasEta: -1 }, "positionBiasEta"],
  ] as const) {
    assert.throws(() => simulate(opts), (e: unknown) => e instanceof ConfigError && e.message.startsWith(field));
  }
});

test("bots are the configured share of users, of three kinds, and only ua_bots use crawler agents", () => {
  const all = [...users.values()];
  assert.equal(all.length, 600);
  assert.equal(all.filter((u) => u.is_bot).length, Math.round(600 * 0.3));
  assert.equal(run.summary.bots, 180);
  const kinds = new Set(all.filter((u) => u.is_bot).map((u) => u.bot_kind));
  assert.deepEqual([...kinds].sort(), ["human_paced_script", "regular_script", "ua_bot"]);
  for (const u of all) {
    assert.equal(isbot(u.user_agent), u.bot_kind === "ua_bot", `${u.user_id} ${u.bot_kind} ${u.user_agent}`);
    assert.equal(u.habit === null, u.is_bot);
  }
  const none = simulate({ ...BASE, users: 50, botFraction: 0 });
  assert.equal(none.summary.bots, 0);
  // Every event carries its user's agent.
  for (const e of events) assert.equal(e.user_agent, users.get(e.user_id)!.user_agent);
});

test("every human habit occurs, and habits change behaviour as described", () => {
  const byHabit = new Map<string, UserTruth[]>();
  for (const u of users.values()) if (u.habit) byHabit.set(u.habit, [...(byHabit.get(u.habit) ?? []), u]);
  assert.deepEqual([...byHabit.keys()].sort(), ["copier", "fast_reader", "heavy_editor", "mobile", "regenerator", "typical"]);
  const big = simulate({ seed: 5, users: 2000, durationMs: HOUR, botFraction: 0 });
  const bigUsers = index(big).users;
  const evs = wellFormed(big);
  const perHabit = (type: string, habit: string): number => {
    const n = [...bigUsers.values()].filter((u) => u.habit === habit).length;
    return evs.filter((e) => e.event_type === type && bigUsers.get(e.user_id)!.habit === habit).length / n;
  };
  const shownPerHabit = (habit: string): number => perHabit("response_shown", habit);
  assert.ok(perHabit("edit", "heavy_editor") / shownPerHabit("heavy_editor") > 3 * (perHabit("edit", "typical") / shownPerHabit("typical")), "heavy editors edit more");
  assert.ok(perHabit("regenerate", "regenerator") / shownPerHabit("regenerator") > 2 * (perHabit("regenerate", "typical") / shownPerHabit("typical")), "regenerators regenerate more");
  assert.ok(perHabit("copy_paste", "copier") / shownPerHabit("copier") > 1.5 * (perHabit("copy_paste", "typical") / shownPerHabit("typical")), "copiers copy more");
  const bigResponses = index(big).responses;
  const goodAb = (habit: string): number => {
    const rs = [...bigResponses.values()].filter((r) => bigUsers.get(r.user_id)!.habit === habit);
    return rs.filter((r) => r.outcome === "good_abandonment").length / rs.length;
  };
  assert.ok(goodAb("mobile") > 1.5 * goodAb("typical"), "mobile users abandon satisfied more often");
  const dwellOf = (habit: string): number => mean(evs.filter((e) => e.event_type === "dwell" && bigUsers.get(e.user_id)!.habit === habit && bigResponses.get(e.response_id!)!.quality > 0.7).map((e) => e.payload.dwell_ms as number));
  assert.ok(dwellOf("fast_reader") < 0.7 * dwellOf("typical"), "fast readers read faster");
});

test("well-formed events validate against config/schemas/event.v1.json", () => {
  const schemaPath = fileURLToPath(new URL("../../../config/schemas/event.v1.json", import.meta.url));
  const validate = newConfigAjv().compile(JSON.parse(readFileSync(schemaPath, "utf8")) as object);
  const types = new Set<string>();
  for (const e of events) {
    const { t: _t, ...raw } = e;
    assert.ok(validate(raw), `${JSON.stringify(raw)}: ${JSON.stringify(validate.errors)}`);
    types.add(e.event_type);
  }
  assert.deepEqual([...types].sort(), [...EVENT_TYPES].sort(), "every v1 event type occurs");
});

test("noise: counts follow the configured fractions and the truth says which line is what", () => {
  const r = simulate({ ...BASE, seed: 9, lateFraction: 0.05, outOfOrderFraction: 0.1, duplicateFraction: 0.1, malformedFraction: 0.05 });
  const n = r.summary.events;
  const noise = r.truth.filter((t): t is NoiseTruth => t.kind === "noise");
  const count = (k: string): number => noise.filter((x) => x.noise === k).length;
  for (const [kind, p] of [["late", 0.05], ["out_of_order", 0.1], ["duplicate", 0.1], ["malformed", 0.05]] as const) {
    const expected = n * p;
    assert.ok(Math.abs(count(kind) - expected) < 5 * Math.sqrt(expected), `${kind}: ${count(kind)} vs ≈${expected.toFixed(0)}`);
    assert.equal(r.summary.noise[kind], count(kind));
  }
  assert.equal(r.events.length, n + count("duplicate") + count("malformed"));
  const lineOf = (k: number): string => r.events[k - 1]!;
  const reasons = new Set<string>();
  for (const x of noise) {
    if (x.noise === "duplicate") {
      assert.ok(x.of_line! < x.line);
      assert.equal(lineOf(x.line), lineOf(x.of_line!));
    } else if (x.noise === "late") {
      assert.ok(x.delay_ms! >= 2 * 60_000 && x.delay_ms! <= 3 * HOUR + 1);
      assert.equal((JSON.parse(lineOf(x.line)) as Ev).event_id, x.event_id);
    } else if (x.noise === "out_of_order") {
      assert.ok(x.delay_ms! >= 500 && x.delay_ms! <= 5001);
    } else {
      reasons.add(x.reason!);
      // What enrich decides for the line is what the truth says (a far-off but well-formed
      // timestamp is caught against stream time, later in enrich).
      let parsed: unknown;
      try {
        parsed = JSON.parse(lineOf(x.line));
      } catch {
        assert.equal(x.reason, "malformed_json");
        continue;
      }
      const checked = checkEvent(parsed);
      if (checked instanceof Error) assert.equal(checked.code, x.reason, lineOf(x.line));
      else {
        assert.equal(x.reason, "bad_timestamp");
        assert.ok(Math.abs(checked.ts - Date.parse("2026-01-01T00:00:00Z")) > 365 * 24 * HOUR);
      }
    }
  }
  assert.deepEqual([...reasons].sort(), ["bad_timestamp", "malformed_json", "schema_violation", "unknown_event_type"]);
  // Lines are in delivery order: late lines appear after events that happened later.
  const wf = wellFormed(r);
  let inversions = 0;
  for (let i = 1; i < wf.length; i++) if (wf[i]!.t < wf[i - 1]!.t) inversions++;
  assert.ok(inversions > 0);
  // Every well-formed event id is unique: only duplicates repeat one.
  assert.equal(new Set(wf.map((e) => e.event_id)).size, wf.length);
});

test("position bias: human clicks fall with rank, and more steeply with a larger η", () => {
  const clickShare = (r: SimResult): number[] => {
    const idx = index(r);
    const counts = new Array<number>(11).fill(0);
    for (const e of wellFormed(r)) if (e.event_type === "click" && !idx.users.get(e.user_id)!.is_bot) counts[e.payload.position as number]!++;
    const total = counts.reduce((s, x) => s + x, 0);
    return counts.slice(1).map((c) => c / total);
  };
  const base = clickShare(run);
  const many = clickShare(simulate({ seed: 77, users: 3000, durationMs: HOUR, botFraction: 0 }));
  for (let i = 0; i < 4; i++) assert.ok(many[i]! > many[i + 1]!, `rank ${i + 1} ${many[i]} > rank ${i + 2} ${many[i + 1]}`);
  for (let i = 0; i < 2; i++) assert.ok(base[i]! > base[i + 1]!, `rank ${i + 1} ${base[i]} > rank ${i + 2} ${base[i + 1]}`);
  const flat = clickShare(simulate({ ...BASE, positionBiasEta: 0 }));
  const steep = clickShare(simulate({ ...BASE, positionBiasEta: 2 }));
  assert.ok(steep[0]! > base[0]! && base[0]! > flat[0]!, `top share: η=2 ${steep[0]}, η=1 ${base[0]}, η=0 ${flat[0]}`);
  // Clicks only on examined responses: every click names a result shown at that position.
  for (const e of human.filter((x) => x.event_type === "click")) assert.equal(responses.get(e.response_id!)!.position, e.payload.position);
});

test("dwell is gamma-like: positive, right-skewed, long on good responses, short quick backs on bad ones", () => {
  const dwell = (pred: (q: number) => boolean): number[] =>
    human.filter((e) => e.event_type === "dwell" && pred(responses.get(e.response_id!)!.quality)).map((e) => e.payload.dwell_ms as number);
  const good = dwell((q) => q >= 0.8);
  const bad = dwell((q) => q < 0.2);
  assert.ok(good.length > 50 && bad.length > 50);
  assert.ok([...good, ...bad].every((d) => d > 0));
  assert.ok(mean(good) > 3 * mean(bad), `good ${mean(good)} vs bad ${mean(bad)}`);
  const median = (xs: number[]): number => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  assert.ok(mean(good) > median(good), "right-skewed");
  assert.ok(median(bad) < 10_000, "quick backs take seconds");
});

test("LLM signals track hidden quality the way the literature says", () => {
  const q = (e: Ev): ResponseTruth => responses.get(e.response_id!)!;
  // Copy span grows with quality.
  const copies = human.filter((e) => e.event_type === "copy_paste");
  assert.ok(copies.length > 30);
  const spanShare = (pred: (x: number) => boolean): number =>
    mean(copies.filter((e) => pred(q(e).quality)).map((e) => (e.payload.span_length as number) / lengthOf(e.response_id!)));
  assert.ok(spanShare((x) => x >= 0.6) > spanShare((x) => x < 0.4) + 0.15);
  // Edits: low normalized distance on good responses, high on bad ones.
  const edits = human.filter((e) => e.event_type === "edit");
  const dist = (pred: (r: ResponseTruth) => boolean): number =>
    mean(edits.filter((e) => pred(q(e))).map((e) => (e.payload.edit_distance as number) / (e.payload.original_length as number)));
  assert.ok(dist((r) => r.good) < 1 / 3 && dist((r) => !r.good) > dist((r) => r.good) + 0.2, `good ${dist((r) => r.good)}, bad ${dist((r) => !r.good)}`);
  // Task completion and thumbs-up mostly on good responses; regenerate mostly on bad ones.
  const goodShare = (type: string, pred: (e: Ev) => boolean = () => true): number => {
    const xs = human.filter((e) => e.event_type === type && pred(e));
    return xs.filter((e) => q(e).good).length / xs.length;
  };
  const baseGood = [...responses.values()].filter((r) => !r.is_bot_user && r.signals > 0);
  const base = baseGood.filter((r) => r.good).length / baseGood.length;
  assert.ok(goodShare("task_complete") > 0.8, `task_complete ${goodShare("task_complete")}`);
  assert.ok(goodShare("regenerate") < base - 0.15, `regenerate ${goodShare("regenerate")} vs ${base}`);
  assert.ok(goodShare("explicit_feedback", (e) => e.payload.rating === "up" || Number(e.payload.rating) >= 4) > goodShare("explicit_feedback", (e) => e.payload.rating === "down" || Number(e.payload.rating) <= 2));
  // Good abandonment: only on good responses to answerable queries, read (dwell) then abandoned.
  const goodAb = [...responses.values()].filter((r) => r.outcome === "good_abandonment");
  assert.ok(goodAb.length > 10);
  for (const r of goodAb) {
    assert.ok(r.good && queries.get(r.query_id)!.answerable);
    const types = human.filter((e) => e.response_id === r.response_id).map((e) => e.event_type);
    assert.ok(types.includes("dwell") && types.includes("abandon"), types.join());
    assert.ok(!types.some((t) => ["copy_paste", "accept", "edit", "task_complete", "regenerate"].includes(t)), types.join());
  }
});

const shownLength = new Map<string, number>();
for (const e of events) if (e.event_type === "response_shown") shownLength.set(e.response_id!, e.payload.text_length as number);
function lengthOf(rid: string): number {
  return shownLength.get(rid)!;
}

test("reformulations follow within minutes, mostly after bad responses, and say what changed", () => {
  const queryTime = new Map(events.filter((e) => e.event_type === "query").map((e) => [e.query_id!, e.t]));
  const reforms = [...queries.values()].filter((x) => !x.is_bot_user && ["spelling_fix", "words_added", "substitution"].includes(x.change));
  assert.ok(reforms.length > 30);
  const kinds = new Set(reforms.map((x) => x.change));
  assert.deepEqual([...kinds].sort(), ["spelling_fix", "substitution", "words_added"]);
  for (const x of reforms) {
    const gap = queryTime.get(x.query_id)! - queryTime.get(x.previous_query_id!)!;
    assert.ok(gap > 0 && gap < 10 * 60_000, `gap ${gap}`);
  }
  // The single LLM response before a reformulation is bad far more often than responses in general.
  const lastResponseOf = (qid: string): ResponseTruth | undefined =>
    [...responses.values()].filter((r) => r.query_id === qid && r.position === null).at(-1);
  const before = reforms.map((x) => lastResponseOf(x.previous_query_id!)).filter((r): r is ResponseTruth => r !== undefined);
  const humanLlm = [...responses.values()].filter((r) => !r.is_bot_user && r.position === null);
  const badShare = (rs: ResponseTruth[]): number => rs.filter((r) => !r.good).length / rs.length;
  assert.ok(badShare(before) > badShare(humanLlm) + 0.3, `before reformulation ${badShare(before)} vs ${badShare(humanLlm)}`);
  const textOf = new Map(events.filter((e) => e.event_type === "query").map((e) => [e.query_id!, String(e.payload.text)]));
  for (const x of reforms.filter((y) => y.change === "words_added")) {
    assert.ok(textOf.get(x.query_id)!.startsWith(textOf.get(x.previous_query_id!)!.replace(/, .*$/, "")), `${textOf.get(x.previous_query_id!)} → ${textOf.get(x.query_id)}`);
  }
});

test("truth is consistent with the events: ids, signal counts, positions", () => {
  const counted = new Map<string, number>();
  const signalTypes = new Set(["click", "copy_paste", "accept", "edit", "regenerate", "dwell", "abandon", "task_complete", "share"]);
  for (const e of events) {
    if (e.response_id !== undefined) assert.ok(responses.has(e.response_id), `unknown response ${e.response_id}`);
    if (e.query_id !== undefined) assert.ok(queries.has(e.query_id), `unknown query ${e.query_id}`);
    assert.ok(users.has(e.user_id));
    if (e.response_id !== undefined && signalTypes.has(e.event_type)) counted.set(e.response_id, (counted.get(e.response_id) ?? 0) + 1);
  }
  for (const r of responses.values()) {
    const extra = r.signals - (counted.get(r.response_id) ?? 0);
    assert.ok(extra === 0 || extra === 1, `${r.response_id}: truth ${r.signals}, events ${counted.get(r.response_id) ?? 0}`);
    assert.equal(r.good, r.quality >= 0.5);
    assert.ok(r.quality >= 0 && r.quality <= 1);
  }
  assert.equal(run.truth[0]!.kind, "meta");
  assert.equal(run.summary.lines, run.events.length);
});

test("bots give themselves away as configured; humans never do anything impossible", () => {
  const byUser = new Map<string, (Ev & { t: number })[]>();
  for (const e of events) byUser.set(e.user_id, [...(byUser.get(e.user_id) ?? []), e]);
  const cv = (ts: number[]): number => {
    const gaps = ts.slice(1).map((t, i) => t - ts[i]!);
    const m = mean(gaps);
    return Math.sqrt(mean(gaps.map((g) => (g - m) ** 2))) / m;
  };
  const impossible = (evs: (Ev & { t: number })[]): number => {
    const shown = new Map<string, { t: number; len: number }>();
    for (const e of evs) if (e.event_type === "response_shown") shown.set(e.response_id!, { t: e.t, len: e.payload.text_length as number });
    return evs.filter((e) => {
      const s = e.response_id === undefined ? undefined : shown.get(e.response_id);
      if (!s) return false;
      return (e.event_type === "click" && e.t < s.t) || (e.event_type === "copy_paste" && (e.payload.span_length as number) > s.len);
    }).length;
  };
  let scriptsWithImpossible = 0;
  for (const u of users.values()) {
    const evs = (byUser.get(u.user_id) ?? []).slice().sort((a, b) => a.t - b.t);
    if (u.bot_kind === "regular_script") {
      // Within one session the script ticks like a metronome.
      const sessions = new Map<string, number[]>();
      for (const e of evs) sessions.set(e.session_id, [...(sessions.get(e.session_id) ?? []), e.t]);
      for (const ts of sessions.values()) if (ts.length >= 10) assert.ok(cv(ts) < 0.05, `${u.user_id} CV ${cv(ts)}`);
    }
    if (u.bot_kind === "human_paced_script") {
      if (impossible(evs) > 0) scriptsWithImpossible++;
      const sessions = new Map<string, number[]>();
      for (const e of evs) sessions.set(e.session_id, [...(sessions.get(e.session_id) ?? []), e.t]);
      for (const ts of sessions.values()) if (ts.length >= 10) assert.ok(cv(ts) > 0.3, `${u.user_id} human-paced CV ${cv(ts)}`);
    }
    if (!u.is_bot) assert.equal(impossible(evs), 0, u.user_id);
  }
  const paced = [...users.values()].filter((u) => u.bot_kind === "human_paced_script").length;
  assert.ok(scriptsWithImpossible > paced / 2, `${scriptsWithImpossible} of ${paced}`);
});

test("explicit ratings: a small share of humans rate, skewed to extremes, mostly agreeing with the hidden quality", () => {
  const ratings = events.filter((e) => e.event_type === "explicit_feedback");
  const raters = new Set([...users.values()].filter((u) => u.rates_explicitly).map((u) => u.user_id));
  const humans = [...users.values()].filter((u) => !u.is_bot);
  // A small share of the humans, and only they rate; no bot rates.
  assert.ok(raters.size >= 0.05 * humans.length && raters.size <= 0.16 * humans.length, `${raters.size} raters of ${humans.length}`);
  assert.ok([...users.values()].every((u) => !u.is_bot || !u.rates_explicitly));
  assert.ok(ratings.length > 30, `${ratings.length} ratings`);
  assert.ok(ratings.every((e) => raters.has(e.user_id)));
  // Skew to extremes: numeric ratings are mostly 1 or 5, and the rated responses are further from a middling quality than those the raters used.
  const numeric = ratings.map((e) => e.payload.rating).filter((r): r is number => typeof r === "number");
  assert.ok(numeric.filter((r) => r === 1 || r === 5).length / numeric.length > 0.7, numeric.join());
  const extremity = (ids: Iterable<string>): number => mean([...ids].map((id) => Math.abs(responses.get(id)!.quality - 0.5)));
  const used = new Set(events.filter((e) => raters.has(e.user_id) && e.response_id !== undefined && e.event_type !== "response_shown" && e.event_type !== "explicit_feedback").map((e) => e.response_id!));
  assert.ok(extremity(ratings.map((e) => e.response_id!)) > extremity(used) + 0.03, `${extremity(ratings.map((e) => e.response_id!))} vs ${extremity(used)}`);
  // Polarity follows the hidden quality (but for RATING_NOISE, 4 %).
  const agree = ratings.filter((e) => (e.payload.rating === "up" || Number(e.payload.rating) >= 4) === responses.get(e.response_id!)!.good).length;
  assert.ok(agree / ratings.length > 0.9, `${agree} of ${ratings.length}`);
  // A rating comes after what the rater did with the response.
  for (const e of ratings) {
    const before = events.filter((x) => x.response_id === e.response_id && x.event_type !== "explicit_feedback");
    assert.ok(before.every((x) => x.t <= e.t));
  }
});

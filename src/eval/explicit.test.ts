import { test } from "node:test";
import assert from "node:assert/strict";
import type { Label } from "../core/label.js";
import type { TruthRecord } from "../sim/truth.js";
import { explicitAgreement, formatExplicit, ratingPolarity, ratingsFromEvents, wilson } from "./explicit.js";

function label(id: string, rid: string, polarity: "positive" | "negative", rule: string, extra: Partial<Label> = {}): Label {
  return {
    schema_version: 1, label_id: id, revision: 0, pipeline: "feedback", kind: "response", response_id: rid, query_id: "q", session_id: "s", user: "u",
    label: polarity, weight: 1, rule, rule_version: 1, signals: [{ event_id: "e", event_type: "accept" }], event_time: "2026-01-01T00:00:00Z", emitted_at: "2026-01-01T00:00:00Z",
    ...extra,
  } as Label;
}
const truthOf = (rid: string, good: boolean): TruthRecord =>
  ({ kind: "response", response_id: rid, query_id: "q", session_id: "s", user_id: "x", quality: good ? 0.9 : 0.1, good, position: null, regenerated_from: null, is_bot_user: false, signals: 1, outcome: null }) as TruthRecord;

test("wilson: the textbook interval, sane at the edges", () => {
  const [lo, hi] = wilson(8, 10)!;
  assert.ok(Math.abs(lo - 0.4902) < 1e-3 && Math.abs(hi - 0.9433) < 1e-3, `${lo} ${hi}`);
  const [lo0, hi0] = wilson(0, 5)!;
  assert.equal(lo0, 0);
  assert.ok(hi0 > 0.4 && hi0 < 0.5);
  assert.equal(wilson(0, 0), null);
});

test("ratings: up / 4–5 positive, down / 1–2 negative, 3 neither; from event lines, duplicates once, other events and bad lines ignored", () => {
  assert.deepEqual(["up", 5, 4, 3, 2, 1, "down", "meh"].map(ratingPolarity), ["up", "up", "up", null, "down", "down", "down", null]);
  const ev = (id: string, rid: string, rating: unknown, type = "explicit_feedback") => JSON.stringify({ event_id: id, event_type: type, response_id: rid, payload: { rating } });
  const text = [ev("e1", "r1", "up"), ev("e1", "r1", "up"), ev("e2", "r1", 1), ev("e3", "r2", 5), ev("e4", "r2", 3), ev("e5", "r3", "up", "accept"), '{"event_type":"explicit_feedback",', ""].join("\n");
  const r = ratingsFromEvents(text);
  assert.deepEqual(Object.fromEntries(r), { r1: { up: 1, down: 1 }, r2: { up: 1, down: 0 } });
});

test("agreement per rule and per polarity, on the final view only, beside the truth of the same labels", () => {
  const labels = [
    label("a", "r1", "positive", "copy"),
    label("b", "r2", "positive", "copy"),
    label("c", "r3", "negative", "regenerate"),
    label("d", "r4", "positive", "accept"),
    // Superseded by a later revision that withdraws it (weight 0): not counted.
    label("e", "r3", "positive", "accept"),
    label("e", "r3", "positive", "accept", { revision: 1, weight: 0 }),
    // No rating, or a tie: not counted.
    label("f", "r9", "positive", "copy"),
    label("g", "r5", "negative", "regenerate"),
    // Preference labels are not judged here.
    { ...label("h", "r1", "positive", "pair"), kind: "preference", chosen_response_id: "r1", rejected_response_id: "r2" } as Label,
  ];
  const ratings = new Map([
    ["r1", { up: 2, down: 0 }],
    ["r2", { up: 0, down: 1 }],
    ["r3", { up: 0, down: 1 }],
    ["r4", { up: 1, down: 0 }],
    ["r5", { up: 1, down: 1 }],
  ]);
  // r2's rater was wrong: its response is good.
  const truth = [truthOf("r1", true), truthOf("r2", true), truthOf("r3", false), truthOf("r4", true)];
  const r = explicitAgreement(labels, ratings, truth);
  assert.equal(r.labels, 6);
  assert.equal(r.rated_responses, 5);
  assert.equal(r.tied_responses, 1);
  assert.equal(r.labels_rated, 4);
  const row = (label: string, rule: string) => r.rows.find((x) => x.label === label && x.rule === rule)!;
  assert.deepEqual([row("positive", "all").explicit.n, row("positive", "all").explicit.agree], [3, 2]);
  assert.deepEqual([row("positive", "copy").explicit.n, row("positive", "copy").explicit.agree, row("positive", "copy").truth!.agree], [2, 1, 2]);
  assert.deepEqual([row("negative", "regenerate").explicit.precision, row("negative", "regenerate").truth!.precision], [1, 1]);
  assert.deepEqual(row("positive", "copy").explicit.ci, wilson(1, 2));
  assert.deepEqual(r.rows.map((x) => `${x.label}:${x.rule}`), ["positive:all", "positive:accept", "positive:copy", "negative:all", "negative:regenerate"]);
  // Without truth there is no truth column.
  assert.ok(explicitAgreement(labels, ratings).rows.every((x) => x.truth === null));
  const text = formatExplicit(r);
  assert.match(text, /positive\s+copy\s+2\s+1\s+0\.500\s+\[0\.095, 0\.905\]\s+1\.000/);
});

import { test } from "node:test";
import assert from "node:assert/strict";
import type { Label } from "../core/label.js";
import type { ResponseTruth, TruthRecord, UserTruth } from "../sim/truth.js";
import { evaluate } from "./evaluate.js";

const user = (id: string, bot: UserTruth["bot_kind"] = null): UserTruth => ({
  kind: "user",
  user_id: id,
  is_bot: bot !== null,
  bot_kind: bot,
  habit: bot === null ? "typical" : null,
  propensity: 1,
  device: "desktop",
  user_agent: "ua",
});
const resp = (id: string, quality: number, userId = "h1", signals = 1, position: number | null = null): ResponseTruth => ({
  kind: "response",
  response_id: id,
  query_id: `q-${id}`,
  session_id: "s",
  user_id: userId,
  quality,
  good: quality >= 0.5,
  position,
  regenerated_from: null,
  is_bot_user: userId.startsWith("b"),
  signals,
  outcome: null,
});
const P = (id: string) => `p(${id})`;
let n = 0;
const label = (responseId: string, polarity: "positive" | "negative", weight = 1, userId = "h1", extra: Partial<Label> = {}): Label =>
  ({
    schema_version: 1,
    label_id: `l${n++}`,
    revision: 0,
    pipeline: "feedback",
    kind: "response",
    response_id: responseId,
    query_id: `q-${responseId}`,
    session_id: "s",
    user: P(userId),
    label: polarity,
    weight,
    rule: "r",
    rule_version: 1,
    signals: [{ event_id: "e", event_type: "accept" }],
    event_time: "2026-01-01T00:00:00Z",
    emitted_at: "2026-01-01T00:00:00Z",
    ...extra,
  }) as Label;

// Humans h1..h4, bots b1 (ua) and b2 (regular). Responses: g* good, x* bad, z never signalled.
const truth: TruthRecord[] = [
  { kind: "meta", truth_version: 1, seed: 42, users: 6, duration_ms: 1, bot_fraction: 0.33, position_bias_eta: 1, start_time: "2026-01-01T00:00:00.000Z", lines: 0 },
  user("h1"), user("h2"), user("h3"), user("h4"), user("b1", "ua_bot"), user("b2", "regular_script"),
  resp("g1", 0.9), resp("g2", 0.8), resp("g3", 0.6), resp("g4", 0.7),
  resp("x1", 0.2), resp("x2", 0.1), resp("x3", 0.4),
  resp("z1", 0.9, "h1", 0),
  resp("bot1", 0.1, "b1", 3),
];

test("precision, recall, F1, coverage and AUC on a hand-computed case", () => {
  const labels = [
    label("g1", "positive", 2),
    label("g2", "positive"),
    label("x1", "positive", 0.5), // a wrong positive
    label("x2", "negative"),
    label("g3", "negative", 0.5), // a wrong negative
  ];
  const r = evaluate({ labels, truth, pseudonymOf: P });
  // Positive: 2 of 3 labels right; weighted (2+1)/(3.5); good signalled humans g1..g4, found g1,g2 → recall 0.5.
  assert.equal(r.positive.labels, 3);
  assert.equal(r.positive.precision, 2 / 3);
  assert.equal(r.positive.weighted_precision, 3 / 3.5);
  assert.equal(r.positive.recall, 0.5);
  assert.ok(Math.abs(r.positive.f1! - (2 * (2 / 3) * 0.5) / (2 / 3 + 0.5)) < 1e-12);
  // Negative: 1 of 2 right; bad signalled humans x1..x3, found x2 → recall 1/3.
  assert.equal(r.negative.precision, 0.5);
  assert.equal(r.negative.recall, 1 / 3);
  // Signalled humans: g1..g4, x1..x3 (z1 has no signal, bot1 is a bot's) → 7; labelled 5.
  assert.equal(r.responses.signalled, 7);
  assert.equal(r.responses.labelled, 5);
  assert.equal(r.coverage, 5 / 7);
  // Scores from labels: g1 2, g2 1, g3 −0.5, g4 0 | x1 0.5, x2 −1, x3 0.
  // Pairs good>bad: g1 3/3, g2 3/3, g3 vs (0.5 lose, −1 win, 0 lose) 1/3, g4 vs (lose, win, tie) 1.5/3 → 8.5/12.
  assert.equal(r.score.source, "labels");
  assert.ok(Math.abs(r.score.auc! - 8.5 / 12) < 1e-12, String(r.score.auc));
  assert.equal(r.seed, 42);
  assert.equal(r.bots, null);
  assert.equal(r.baselines, null);
});

test("features take precedence over labels for the score", () => {
  const features = new Map([
    ["g1", { pos_weight: 1, neg_weight: 0, signal_count: 1 }],
    ["x1", { pos_weight: 0, neg_weight: 1, signal_count: 1 }],
    // A response the truth says had no signal but features do: it becomes eligible.
    ["z1", { pos_weight: 2, neg_weight: 0, signal_count: 1 }],
  ]);
  const r = evaluate({ labels: [label("x1", "positive", 5)], truth, features, pseudonymOf: P });
  assert.equal(r.responses.signalled, 8);
  assert.equal(r.score.source, "features");
  // Good: g1 1, g2..g4 0, z1 2; bad: x1 −1, x2 0, x3 0. Pairs: g1 3, z1 3, g2..g4 each (win, tie, tie) = 2 → 12/15.
  assert.ok(Math.abs(r.score.auc! - 12 / 15) < 1e-12, String(r.score.auc));
});

test("revisions, duplicates, bot labels, raw user ids and unknown responses are reported", () => {
  const first = label("g1", "negative");
  const revised = { ...first, revision: 1, label: "positive" } as Label;
  const labels = [first, revised, revised, label("bot1", "positive", 1, "b1"), label("g2", "positive", 1, "h2", { user: "h2" }), label("nope", "positive")];
  const r = evaluate({ labels, truth, pseudonymOf: P });
  assert.equal(r.labels.received, 6);
  assert.equal(r.labels.distinct, 4);
  assert.equal(r.labels.duplicates, 1);
  assert.equal(r.labels.from_bots, 1);
  assert.equal(r.labels.raw_user_ids, 1);
  assert.equal(r.labels.unknown_response, 1);
  // Only the highest revision counts: g1 is a (right) positive, not a wrong negative.
  assert.equal(r.negative.labels, 0);
  assert.equal(r.positive.labels, 3);
});

test("bot filter precision, recall and human false-positive rate; targets pass and fail", () => {
  const labels = [label("g1", "positive"), label("g2", "positive"), label("g3", "positive"), label("x1", "negative"), label("x2", "negative")];
  const botUsers = new Set([P("b1"), P("h4")]);
  const r = evaluate({ labels, truth, pseudonymOf: P, botUsers });
  assert.deepEqual(
    { bots: r.bots!.bots, humans: r.bots!.humans, filtered: r.bots!.filtered, precision: r.bots!.precision, recall: r.bots!.recall, fpr: r.bots!.human_fpr },
    { bots: 2, humans: 4, filtered: 2, precision: 0.5, recall: 0.5, fpr: 0.25 },
  );
  assert.deepEqual(r.bots!.recall_by_kind, { ua_bot: 1, regular_script: 0, human_paced_script: null });
  const byName = Object.fromEntries(r.targets.map((t) => [t.name, t]));
  assert.equal(byName.positive_precision!.pass, true);
  assert.equal(byName.coverage!.pass, true); // 5 of 7
  assert.equal(byName.human_fpr!.pass, false);
  assert.equal(r.all_pass, false);
  const clean = evaluate({ labels, truth, pseudonymOf: P, botUsers: new Set([P("b1"), P("b2")]) });
  assert.equal(clean.bots!.human_fpr, 0);
  assert.equal(clean.targets.find((t) => t.name === "human_fpr")!.pass, true);
  // Without bot decisions the FPR target cannot be judged: null, and not all_pass.
  const unknown = evaluate({ labels, truth, pseudonymOf: P });
  assert.equal(unknown.targets.find((t) => t.name === "human_fpr")!.pass, null);
  assert.equal(unknown.all_pass, false);
  // Thresholds can be overridden.
  const strict = evaluate({ labels, truth, pseudonymOf: P, botUsers: new Set([P("b1"), P("b2")]), targets: { coverage: 0.9 } });
  assert.equal(strict.targets.find((t) => t.name === "coverage")!.pass, false);
});

test("AUC gain from baselines, preference accuracy and position correlation", () => {
  const ranked: TruthRecord[] = [
    ...truth.filter((t) => t.kind !== "response"),
    resp("a1", 0.9, "h1", 1, 1), resp("a2", 0.3, "h1", 1, 2), resp("a3", 0.8, "h1", 1, 3), resp("a4", 0.2, "h1", 1, 4),
  ];
  const labels: Label[] = [
    label("a1", "positive", 3),
    label("a2", "positive", 2),
    label("a3", "positive", 1),
    { ...label("a1", "positive"), kind: "preference", chosen_response_id: "a3", rejected_response_id: "a4", label: undefined, response_id: undefined } as unknown as Label,
    { ...label("a1", "positive"), kind: "preference", chosen_response_id: "a2", rejected_response_id: "a1", label: undefined, response_id: undefined } as unknown as Label,
  ];
  const without = new Map([["a1", 0], ["a2", 1], ["a3", 0], ["a4", 1]]);
  const r = evaluate({ labels, truth: ranked, pseudonymOf: P, scoresWithoutBaselines: without });
  // Scores 3, 2, 1, 0 for good, bad, good, bad: pairs a1>a2, a1>a4, a3<a2, a3>a4 → 3/4.
  assert.equal(r.score.auc, 0.75);
  // Without baselines the bad ones win: 0 of 4.
  assert.equal(r.baselines!.auc_without, 0);
  assert.equal(r.baselines!.auc_gain, 0.75);
  assert.deepEqual(r.preference, { pairs: 2, accuracy: 0.5 });
  // Score falls strictly with rank: Spearman −1. Hidden quality by rank 0.9, 0.3, 0.8, 0.2 has ranks
  // 4, 2, 3, 1 against 1, 2, 3, 4: Σd² = 18, ρ = 1 − 6·18 / (4·15) = −0.8.
  assert.equal(r.score.position_spearman, -1);
  assert.ok(Math.abs(r.score.quality_position_spearman! + 0.8) < 1e-12);
  assert.equal(r.coverage_any_kind, 1);
  assert.equal(r.coverage, 3 / 4);
});

test("a target value that rounds onto its goal is printed with enough digits to match its verdict", async () => {
  const { targetRow } = await import("../cli/evaluate.js");
  const row = (value: number, pass: boolean) => targetRow({ name: "positive_precision", value, op: ">=", threshold: 0.85, pass });
  assert.match(row(0.8497, false), /0\.8497\s.*FAIL/);
  assert.match(row(0.8503, true), /0\.8503\s.*pass/);
  assert.match(row(0.833, false), /0\.833\s.*FAIL/);
  assert.doesNotMatch(row(0.833, false), /0\.8330/);
});

test("the final view is scored: a retracted or weight-0 latest revision drops the label; delivery counts retractions, leaks and latency", () => {
  const t = (s: number) => new Date(Date.parse("2026-01-01T00:00:00Z") + s * 1000).toISOString();
  const botLabel = label("bot1", "positive", 1, "b1", { event_time: t(0), emitted_at: t(60) });
  const wrong = label("x1", "positive", 1, "h1", { event_time: t(0), emitted_at: t(0) });
  const held = label("g1", "positive", 1, "h2", { event_time: t(0), emitted_at: t(1800) });
  const labels = [
    botLabel,
    { ...botLabel, revision: 1, weight: 0, retracted: true, retracted_reason: "bot: rate", emitted_at: t(600) },
    wrong,
    { ...wrong, revision: 1, weight: 0, emitted_at: t(5) },
    held,
  ];
  const r = evaluate({ labels, truth, pseudonymOf: P, eventsPerUser: new Map([[P("h2"), 4], [P("h1"), 30]]) });
  assert.deepEqual([r.labels.distinct, r.labels.live, r.labels.from_bots, r.positive.labels, r.positive.precision], [3, 1, 0, 1, 1]);
  assert.deepEqual(r.delivery, {
    retractions: 1,
    published_then_retracted: 1,
    published_then_retracted_bots: 1,
    published_from_bots: 1,
    latency: { n: 3, p50_ms: 60_000, p99_ms: 1_800_000 },
    light_latency: { n: 1, p50_ms: 1_800_000, p99_ms: 1_800_000 },
  });
  // Without the retraction the bot's label is live.
  assert.equal(evaluate({ labels: labels.filter((l) => !l.retracted), truth, pseudonymOf: P }).labels.from_bots, 1);
});

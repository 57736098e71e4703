import { latestRevisions, liveLabels, type Label } from "../core/label.js";
import type { BotKind, ResponseTruth, TruthRecord, UserTruth } from "../sim/truth.js";
import { percentile } from "../telemetry/metrics.js";
import { confusion, coverage, prf, rocAuc, spearman } from "./metrics.js";

/** Online features of one response, as `tacit features` reads them from Redis. */
export interface ResponseFeatures {
  pos_weight: number;
  neg_weight: number;
  signal_count: number;
}

/** Thresholds of issue 4 (simulation with 30 % bots, position-bias exponent 1). */
export interface Targets {
  /** Positive-label precision at least this. @default 0.85 */
  positive_precision: number;
  /** Share of signalled responses with a response label, at least this. @default 0.40 */
  coverage: number;
  /** ROC-AUC of the per-response score, at least this. @default 0.80 */
  auc: number;
  /** Share of human users filtered as bots, at most this. @default 0.005 */
  human_fpr: number;
}

/** Issue 4's targets. */
export const DEFAULT_TARGETS: Targets = { positive_precision: 0.85, coverage: 0.4, auc: 0.8, human_fpr: 0.005 };

/** What `evaluate` scores: the labels (and optionally features, bot decisions) of one simulated run. */
export interface EvaluateInput {
  labels: readonly Label[];
  /** Per-response online features; the score is pos_weight − neg_weight where present. */
  features?: ReadonlyMap<string, ResponseFeatures>;
  truth: readonly TruthRecord[];
  /** Raw user_id → the pseudonym labels carry. @default identity */
  pseudonymOf?: (userId: string) => string;
  /** Pseudonyms the pipeline routed to `<p>.bots`; without it the bot metrics are null. */
  botUsers?: ReadonlySet<string>;
  /** Per-response scores computed without per-user baselines, for the AUC gain. */
  scoresWithoutBaselines?: ReadonlyMap<string, number>;
  /** Labels the caller dropped because they did not match label.v2.json (reported, not scored). */
  rejectedLabels?: number;
  /** Events per user (pseudonym), e.g. counted in the simulator's events file: picks the light users of the latency figures. */
  eventsPerUser?: ReadonlyMap<string, number>;
  targets?: Partial<Targets>;
}

/** Precision / recall / F1 of one label polarity. */
export interface PolarityReport {
  /** Labels of this polarity (highest revision of each label_id) on responses in the truth. */
  labels: number;
  /** Share of those labels whose response has the matching hidden truth. */
  precision: number | null;
  /** Same, each label counted by its weight. */
  weighted_precision: number | null;
  /** Share of signalled human responses with the matching truth that got at least one such label. */
  recall: number | null;
  f1: number | null;
}

/** One target with the value reached and whether it passes. */
export interface TargetResult {
  name: keyof Targets;
  value: number | null;
  op: ">=" | "<=";
  threshold: number;
  /** Null when the value could not be computed (e.g. no bot decisions given). */
  pass: boolean | null;
}

/** Label quality against the simulator's hidden truth (`tacit evaluate`). */
export interface Report {
  seed: number | null;
  labels: {
    /** Messages given, every revision. */
    received: number;
    /** Distinct label_ids (highest revision kept). */
    distinct: number;
    /** The final view, which everything below scores: label_ids whose latest revision is not retracted and has weight > 0. */
    live: number;
    /** Same label_id and revision seen more than once (at-least-once delivery leaking through). */
    duplicates: number;
    /** Labels that did not match label.v2.json (dropped before scoring). */
    rejected: number;
    by_kind: { response: number; preference: number; session: number };
    /** Labels naming a response the truth does not know. */
    unknown_response: number;
    /** Labels of the final view whose user is a bot in the truth (must be 0). */
    from_bots: number;
    /** Labels whose `user` is a raw user_id rather than a pseudonym (must be 0). */
    raw_user_ids: number;
  };
  responses: {
    total: number;
    human: number;
    /** Human responses that received any signal (the coverage and recall denominator). */
    signalled: number;
    /** Signalled human responses with at least one response label. */
    labelled: number;
  };
  positive: PolarityReport;
  negative: PolarityReport;
  /** labelled / signalled. */
  coverage: number | null;
  /** Same, counting responses named by preference labels too. */
  coverage_any_kind: number | null;
  preference: {
    pairs: number;
    /** Share of pairs whose chosen response has higher hidden quality than the rejected one. */
    accuracy: number | null;
  };
  score: {
    /** Where the per-response score came from. */
    source: "features" | "labels" | "features+labels";
    /** Signalled human responses scored (a response without features or labels scores 0). */
    n: number;
    /** ROC-AUC of the score against hidden `good`. */
    auc: number | null;
    /** Spearman correlation between score and rank (ranked responses only): position bias left. */
    position_spearman: number | null;
    /** The same correlation for hidden quality, for reference: a ranker's legitimate share. */
    quality_position_spearman: number | null;
    ranked_n: number;
  };
  bots: null | {
    bots: number;
    humans: number;
    filtered: number;
    precision: number | null;
    recall: number | null;
    /** Humans filtered / humans. */
    human_fpr: number | null;
    recall_by_kind: Record<BotKind, number | null>;
  };
  baselines: null | {
    auc_without: number | null;
    /** AUC with baselines minus AUC without. */
    auc_gain: number | null;
  };
  delivery: Delivery;
  targets: TargetResult[];
  /** True when every computable target passes and none is missing. */
  all_pass: boolean;
}

/** Label latency over a set of labels: p50 / p99 of emitted_at − event_time, ms. */
export interface Latency {
  n: number;
  p50_ms: number | null;
  p99_ms: number | null;
}

/**
 * How labels reached consumers: what an online learner saw before the final view. Latency is
 * emitted_at − event_time of each response and preference label_id's first live revision (stream
 * time of the input that published it minus the event time of its deciding signal; session labels
 * wait for the session's close in any case and are left out): with traffic published as it
 * happens it is how long a label waited; with a backlog published at once it includes its age.
 */
export interface Delivery {
  /** Retraction messages received (revisions with retracted: true). */
  retractions: number;
  /** label_ids that were live in some revision and are retracted in the final view: what an online learner consumed and had to take back. */
  published_then_retracted: number;
  /** Of those, label_ids of bot users in the truth. */
  published_then_retracted_bots: number;
  /** label_ids of bot users that were live in some revision (leaked to online consumers before a retraction, or still live). */
  published_from_bots: number;
  latency: Latency;
  /** The same for users with 3–5 events (null without eventsPerUser). */
  light_latency: Latency | null;
}

/** Users with this many events (inclusive) are light users. */
export const LIGHT_USER_EVENTS: readonly [number, number] = [3, 5];

function latencyOf(ms: number[]): Latency {
  return { n: ms.length, p50_ms: num(percentile(ms, 50)), p99_ms: num(percentile(ms, 99)) };
}

/** Retractions, leaks and latency of a label changelog (every revision, in any order). */
function delivery(all: readonly Label[], isBot: (user: string) => boolean, eventsPerUser: ReadonlyMap<string, number> | undefined): Delivery {
  const firstLive = new Map<string, Label>();
  let retractions = 0;
  for (const l of all) {
    if (l.retracted === true) retractions++;
    else if (l.weight > 0) {
      const cur = firstLive.get(l.label_id);
      if (!cur || l.revision < cur.revision) firstLive.set(l.label_id, l);
    }
  }
  let thenRetracted = 0;
  let thenRetractedBots = 0;
  for (const l of latestRevisions(all)) {
    if (l.retracted !== true || !firstLive.has(l.label_id)) continue;
    thenRetracted++;
    if (isBot(l.user)) thenRetractedBots++;
  }
  const [lo, hi] = LIGHT_USER_EVENTS;
  const waits: number[] = [];
  const light: number[] = [];
  let fromBots = 0;
  for (const l of firstLive.values()) {
    if (isBot(l.user)) fromBots++;
    // Session labels wait for the session's close (session_gap) whatever the mode.
    if (l.kind === "session") continue;
    const ms = Date.parse(l.emitted_at) - Date.parse(l.event_time);
    if (!Number.isFinite(ms)) continue;
    waits.push(ms);
    const n = eventsPerUser?.get(l.user);
    if (n !== undefined && n >= lo && n <= hi) light.push(ms);
  }
  return {
    retractions,
    published_then_retracted: thenRetracted,
    published_then_retracted_bots: thenRetractedBots,
    published_from_bots: fromBots,
    latency: latencyOf(waits),
    light_latency: eventsPerUser ? latencyOf(light) : null,
  };
}

const num = (x: number): number | null => (Number.isFinite(x) ? x : null);

function polarity(
  labels: readonly Label[],
  responses: ReadonlyMap<string, ResponseTruth>,
  signalled: readonly ResponseTruth[],
  which: "positive" | "negative",
): PolarityReport {
  const wanted = which === "positive";
  let tp = 0;
  let fp = 0;
  let wTp = 0;
  let wAll = 0;
  const hit = new Set<string>();
  for (const l of labels) {
    if (l.kind !== "response" || l.label !== which) continue;
    const r = responses.get(l.response_id);
    if (!r) continue;
    const correct = r.good === wanted;
    if (correct) tp++;
    else fp++;
    wAll += l.weight;
    if (correct) wTp += l.weight;
    hit.add(r.response_id);
  }
  const relevant = signalled.filter((r) => r.good === wanted);
  const found = relevant.filter((r) => hit.has(r.response_id)).length;
  const m = prf(tp, fp, relevant.length - found);
  // Recall counts responses, precision counts labels: F1 is recomputed from the two.
  const f1 = Number.isFinite(m.precision) && Number.isFinite(m.recall) ? (m.precision + m.recall === 0 ? 0 : (2 * m.precision * m.recall) / (m.precision + m.recall)) : NaN;
  return {
    labels: tp + fp,
    precision: num(m.precision),
    weighted_precision: num(wAll === 0 ? NaN : wTp / wAll),
    recall: num(m.recall),
    f1: num(f1),
  };
}

function target(name: keyof Targets, value: number | null, op: ">=" | "<=", threshold: number): TargetResult {
  return { name, value, op, threshold, pass: value === null ? null : op === ">=" ? value >= threshold : value <= threshold };
}

/**
 * Scores labels and features against the simulator's truth: positive / negative precision,
 * recall and F1, coverage, ROC-AUC of the per-response score, position bias left in the score,
 * bot-filter quality, the AUC gain from per-user baselines, and issue 4's targets.
 */
export function evaluate(input: EvaluateInput): Report {
  const targets: Targets = { ...DEFAULT_TARGETS, ...input.targets };
  const pseudonymOf = input.pseudonymOf ?? ((id: string) => id);
  const users: UserTruth[] = [];
  const responses = new Map<string, ResponseTruth>();
  let seed: number | null = null;
  for (const t of input.truth) {
    if (t.kind === "user") users.push(t);
    else if (t.kind === "response") responses.set(t.response_id, t);
    else if (t.kind === "meta") seed = t.seed;
  }
  const pseudonymToUser = new Map<string, UserTruth>();
  const rawIds = new Set<string>();
  for (const u of users) {
    pseudonymToUser.set(pseudonymOf(u.user_id), u);
    rawIds.add(u.user_id);
  }

  // ── labels ──
  const seen = new Set<string>();
  let duplicates = 0;
  for (const l of input.labels) {
    const key = `${l.label_id}\u0000${l.revision}`;
    if (seen.has(key)) duplicates++;
    else seen.add(key);
  }
  const distinct = latestRevisions(input.labels).length;
  const labels = liveLabels(input.labels);
  const byKind = { response: 0, preference: 0, session: 0 };
  let unknownResponse = 0;
  let fromBots = 0;
  let rawUserIds = 0;
  for (const l of labels) {
    byKind[l.kind]++;
    const named = l.kind === "preference" ? [l.chosen_response_id, l.rejected_response_id] : l.response_id !== undefined ? [l.response_id] : [];
    if (named.some((id) => !responses.has(id))) unknownResponse++;
    if (pseudonymToUser.get(l.user)?.is_bot) fromBots++;
    if (rawIds.has(l.user) && !pseudonymToUser.has(l.user)) rawUserIds++;
  }

  // ── responses and coverage ──
  const human = [...responses.values()].filter((r) => !r.is_bot_user);
  const signalled = human.filter((r) => r.signals > 0 || (input.features?.get(r.response_id)?.signal_count ?? 0) > 0);
  const responseLabelled = new Set<string>();
  const anyLabelled = new Set<string>();
  for (const l of labels) {
    if (l.kind === "response") {
      responseLabelled.add(l.response_id);
      anyLabelled.add(l.response_id);
    } else if (l.kind === "preference") {
      anyLabelled.add(l.chosen_response_id);
      anyLabelled.add(l.rejected_response_id);
    }
  }
  const signalledIds = signalled.map((r) => r.response_id);

  // ── preference pairs ──
  let pairs = 0;
  let pairsRight = 0;
  for (const l of labels) {
    if (l.kind !== "preference") continue;
    const c = responses.get(l.chosen_response_id);
    const r = responses.get(l.rejected_response_id);
    if (!c || !r) continue;
    pairs++;
    if (c.quality > r.quality) pairsRight++;
  }

  // ── per-response score ──
  const fromLabels = new Map<string, number>();
  for (const l of labels) {
    if (l.kind !== "response") continue;
    fromLabels.set(l.response_id, (fromLabels.get(l.response_id) ?? 0) + (l.label === "positive" ? l.weight : -l.weight));
  }
  let usedFeatures = false;
  let usedLabels = false;
  const scoreOf = (id: string): number => {
    const f = input.features?.get(id);
    if (f) {
      usedFeatures = true;
      return f.pos_weight - f.neg_weight;
    }
    const s = fromLabels.get(id);
    if (s !== undefined) {
      usedLabels = true;
      return s;
    }
    return 0;
  };
  const scores = signalled.map((r) => scoreOf(r.response_id));
  const goods = signalled.map((r) => r.good);
  const auc = num(rocAuc(scores, goods));
  const ranked = signalled.map((r, i) => ({ r, s: scores[i]! })).filter((x) => x.r.position !== null);
  const positions = ranked.map((x) => x.r.position!);

  // ── bots ──
  let bots: Report["bots"] = null;
  if (input.botUsers) {
    const filtered = users.map((u) => input.botUsers!.has(pseudonymOf(u.user_id)));
    const isBot = users.map((u) => u.is_bot);
    const c = confusion(filtered, isBot);
    const m = prf(c.tp, c.fp, c.fn);
    const recallByKind = {} as Record<BotKind, number | null>;
    for (const kind of ["ua_bot", "regular_script", "human_paced_script"] as const) {
      const ofKind = users.map((u, i) => [u, filtered[i]!] as const).filter(([u]) => u.bot_kind === kind);
      recallByKind[kind] = ofKind.length === 0 ? null : ofKind.filter(([, f]) => f).length / ofKind.length;
    }
    const humans = c.fp + c.tn;
    bots = {
      bots: c.tp + c.fn,
      humans,
      filtered: c.tp + c.fp,
      precision: num(m.precision),
      recall: num(m.recall),
      human_fpr: humans === 0 ? null : c.fp / humans,
      recall_by_kind: recallByKind,
    };
  }

  let baselines: Report["baselines"] = null;
  if (input.scoresWithoutBaselines) {
    const without = num(rocAuc(signalled.map((r) => input.scoresWithoutBaselines!.get(r.response_id) ?? 0), goods));
    baselines = { auc_without: without, auc_gain: auc === null || without === null ? null : auc - without };
  }

  const positive = polarity(labels, responses, signalled, "positive");
  const negative = polarity(labels, responses, signalled, "negative");
  const cov = num(coverage(responseLabelled, signalledIds));
  const targetResults = [
    target("positive_precision", positive.precision, ">=", targets.positive_precision),
    target("coverage", cov, ">=", targets.coverage),
    target("auc", auc, ">=", targets.auc),
    target("human_fpr", bots?.human_fpr ?? null, "<=", targets.human_fpr),
  ];

  return {
    seed,
    labels: {
      received: input.labels.length,
      distinct,
      live: labels.length,
      duplicates,
      rejected: input.rejectedLabels ?? 0,
      by_kind: byKind,
      unknown_response: unknownResponse,
      from_bots: fromBots,
      raw_user_ids: rawUserIds,
    },
    responses: {
      total: responses.size,
      human: human.length,
      signalled: signalled.length,
      labelled: signalledIds.filter((id) => responseLabelled.has(id)).length,
    },
    positive,
    negative,
    coverage: cov,
    coverage_any_kind: num(coverage(anyLabelled, signalledIds)),
    preference: { pairs, accuracy: pairs === 0 ? null : pairsRight / pairs },
    score: {
      source: usedFeatures && usedLabels ? "features+labels" : usedFeatures ? "features" : "labels",
      n: signalled.length,
      auc,
      position_spearman: num(spearman(ranked.map((x) => x.s), positions)),
      quality_position_spearman: num(spearman(ranked.map((x) => x.r.quality), positions)),
      ranked_n: ranked.length,
    },
    bots,
    baselines,
    delivery: delivery(input.labels, (u) => pseudonymToUser.get(u)?.is_bot === true, input.eventsPerUser),
    targets: targetResults,
    all_pass: targetResults.every((t) => t.pass === true),
  };
}

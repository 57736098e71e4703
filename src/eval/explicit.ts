import { latestRevisions, type Label } from "../core/label.js";
import type { ResponseTruth, TruthRecord } from "../sim/truth.js";

/*
 * `tacit evaluate --explicit`: how implicit labels agree with the sparse explicit ratings
 * (explicit_feedback, held out from label inputs) on the responses that have both. In production
 * this is the only check there is; on simulated traffic the same responses' hidden truth is shown
 * beside it, so the check itself can be checked.
 */

/** Explicit ratings of one response: how many were positive (up, 4–5) and negative (down, 1–2). */
export interface Rated {
  up: number;
  down: number;
}

/** A share with its Wilson 95 % interval. */
export interface Share {
  /** Labels on responses whose explicit verdict is clear (more up than down, or the reverse). */
  n: number;
  /** Of those, labels that agree with it (positive label on an up-rated response, negative on down). */
  agree: number;
  /** agree / n; null when n = 0. */
  precision: number | null;
  /** Wilson score interval at 95 % (z = 1.96); null when n = 0. */
  ci: [number, number] | null;
}

/** Agreement of one rule's labels (or all labels of a polarity) with the explicit ratings. */
export interface AgreementRow {
  /** A rule name, or "all" for every response label of the polarity. */
  rule: string;
  label: "positive" | "negative";
  explicit: Share;
  /** On simulated traffic (truth given): the same labels judged by the hidden quality of their responses. */
  truth: Share | null;
}

/** What `tacit evaluate --explicit` reports. */
export interface ExplicitReport {
  /** Labelled responses (a response label in the final view) with at least one explicit rating. */
  rated_responses: number;
  /** Of those, responses whose ratings tie (as many up as down, or only neutral 3s): left out. */
  tied_responses: number;
  /** Response labels (latest revision, weight > 0, not retracted) in the final view. */
  labels: number;
  /** Of those, labels on a rated response with a clear verdict: what the rows count. */
  labels_rated: number;
  rows: AgreementRow[];
}

const Z95 = 1.96;

/** Wilson score interval of a binomial share (Wilson 1927): well-behaved at small n and near 0 or 1. */
export function wilson(k: number, n: number, z = Z95): [number, number] | null {
  if (n === 0) return null;
  const p = k / n;
  const z2 = z * z;
  const centre = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (z / (1 + z2 / n)) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

function share(agree: number, n: number): Share {
  return { n, agree, precision: n === 0 ? null : agree / n, ci: wilson(agree, n) };
}

/** The polarity of one explicit rating: up or 4–5 positive, down or 1–2 negative, anything else none. */
export function ratingPolarity(rating: unknown): "up" | "down" | null {
  if (rating === "up" || (typeof rating === "number" && rating >= 4)) return "up";
  if (rating === "down" || (typeof rating === "number" && rating <= 2)) return "down";
  return null;
}

/** Ratings per response_id from event JSONL (the input stream as published): explicit_feedback events only, each event_id once. */
export function ratingsFromEvents(text: string): Map<string, Rated> {
  const out = new Map<string, Rated>();
  const seen = new Set<string>();
  for (const raw of text.split("\n")) {
    if (!raw.includes("explicit_feedback")) continue;
    let ev: { event_id?: unknown; event_type?: unknown; response_id?: unknown; payload?: { rating?: unknown } };
    try {
      ev = JSON.parse(raw) as typeof ev;
    } catch {
      continue; // a malformed line: the pipeline dead-letters it too
    }
    if (ev?.event_type !== "explicit_feedback" || typeof ev.response_id !== "string") continue;
    if (typeof ev.event_id === "string") {
      if (seen.has(ev.event_id)) continue; // a duplicate delivery
      seen.add(ev.event_id);
    }
    const pol = ratingPolarity(ev.payload?.rating);
    const r = out.get(ev.response_id) ?? { up: 0, down: 0 };
    if (pol === "up") r.up++;
    else if (pol === "down") r.down++;
    out.set(ev.response_id, r);
  }
  return out;
}

/**
 * Agreement of the final view's response labels with the explicit ratings, per rule and per
 * polarity, with Wilson intervals; with `truth`, the hidden-truth precision of the same labels.
 */
export function explicitAgreement(labels: readonly Label[], ratings: ReadonlyMap<string, Rated>, truth?: readonly TruthRecord[]): ExplicitReport {
  const quality = new Map<string, ResponseTruth>();
  for (const t of truth ?? []) if (t.kind === "response") quality.set(t.response_id, t);
  const live = latestRevisions(labels).filter((l) => l.kind === "response" && l.weight > 0 && (l as { retracted?: unknown }).retracted !== true);
  const ratedIds = new Set<string>();
  let tied = 0;
  for (const l of live) {
    const r = ratings.get(l.response_id!);
    if (!r || ratedIds.has(l.response_id!)) continue;
    ratedIds.add(l.response_id!);
    if (r.up === r.down) tied++;
  }
  interface Tally {
    n: number;
    agree: number;
    tn: number;
    tagree: number;
  }
  const tallies = new Map<string, Tally>();
  const bump = (key: string, agrees: boolean, good: boolean | undefined, positive: boolean): void => {
    const t = tallies.get(key) ?? { n: 0, agree: 0, tn: 0, tagree: 0 };
    t.n++;
    if (agrees) t.agree++;
    if (good !== undefined) {
      t.tn++;
      if (good === positive) t.tagree++;
    }
    tallies.set(key, t);
  };
  let rated = 0;
  for (const l of live) {
    const r = ratings.get(l.response_id!);
    if (!r || r.up === r.down) continue;
    rated++;
    const positive = l.label === "positive";
    const agrees = positive === r.up > r.down;
    const good = quality.get(l.response_id!)?.good;
    bump(`${l.label}\u0000${l.rule}`, agrees, good, positive);
    bump(`${l.label}\u0000`, agrees, good, positive);
  }
  const rows: AgreementRow[] = [];
  for (const label of ["positive", "negative"] as const) {
    const keys = [...tallies.keys()].filter((k) => k.startsWith(`${label}\u0000`)).sort();
    for (const key of keys) {
      const t = tallies.get(key)!;
      const rule = key.slice(label.length + 1) || "all";
      rows.push({ rule, label, explicit: share(t.agree, t.n), truth: truth ? share(t.tagree, t.tn) : null });
    }
  }
  // "all" first within each polarity.
  rows.sort((a, b) => (a.label === b.label ? (a.rule === "all" ? -1 : b.rule === "all" ? 1 : 0) : a.label === "positive" ? -1 : 1));
  return { rated_responses: ratedIds.size, tied_responses: tied, labels: live.length, labels_rated: rated, rows };
}

/** The human report of `tacit evaluate --explicit`. */
export function formatExplicit(r: ExplicitReport, notes: string[] = []): string {
  const f = (x: number | null): string => (x === null ? "-" : x.toFixed(3));
  const ci = (s: Share): string => (s.ci ? `[${s.ci[0].toFixed(3)}, ${s.ci[1].toFixed(3)}]` : "-");
  const withTruth = r.rows.some((x) => x.truth !== null);
  const lines = [
    "agreement of implicit labels with explicit ratings (held out from label inputs)",
    `  rated responses: ${r.rated_responses} (${r.tied_responses} tied, left out); response labels: ${r.labels}, ${r.labels_rated} of them on a rated response`,
    "",
    `  ${"label".padEnd(10)}${"rule".padEnd(22)}${"n".padStart(6)}${"agree".padStart(7)}${"precision".padStart(11)}  ${"95 % CI (Wilson)".padEnd(18)}${withTruth ? `${"truth".padStart(9)}  truth 95 % CI` : ""}`,
    ...r.rows.map(
      (x) =>
        `  ${x.label.padEnd(10)}${x.rule.padEnd(22)}${String(x.explicit.n).padStart(6)}${String(x.explicit.agree).padStart(7)}${f(x.explicit.precision).padStart(11)}  ${ci(x.explicit).padEnd(18)}` +
        (x.truth ? `${f(x.truth.precision).padStart(9)}  ${ci(x.truth)}` : ""),
    ),
    ...(r.rows.length === 0 ? ["  no response label falls on a rated response"] : []),
    ...(withTruth ? ["", "  truth: the same labels judged by the simulator's hidden quality of their responses"] : []),
    ...notes.map((n) => `  note: ${n}`),
    "",
  ];
  return lines.join("\n");
}

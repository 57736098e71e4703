import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { liveLabels } from "../src/core/label.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../src/core/pseudonym.js";
import { simulate } from "../src/sim/simulate.js";
import type { ResponseTruth } from "../src/sim/truth.js";
import { runChain, scoreChain, scoreHumanUsers } from "../test/support/label-chain.js";

/**
 * The error analysis behind the default label rules (README "The default label rules, and why
 * their numbers"): simulated traffic (400 users, 30 % bots, 2 h per seed) through the whole chain
 * in memory (test/support/label-chain.ts), once per seed, with the default rules file or another
 * one (`--rules`, e.g. an older version taken with `git show <commit>:config/label-rules.yaml`).
 * Prints each seed's figures as `tacit evaluate` scores them (bot users' labels excluded in
 * brackets), then, over all seeds, how often each rule's live response labels were right against
 * the hidden quality: on first responses and on responses that replaced a regenerated one, by the
 * dwell that came with the label's signals, and by the rank of a ranked result. Last, the bot
 * users whose labels stay live (bot-score never flagged them): their sessions and events, and the
 * client anomalies looked at as bot indicators, counted on them and on every human; and how many
 * live labels come from users seen in one session only (what a hold until a second session costs).
 *
 *   node dist/bench/label-rules.js [--rules <file>] [seed…]    (after a build; default seeds 101–110)
 */

interface Tally {
  n: number;
  right: number;
}

const DWELL_BUCKETS: readonly [number, string][] = [
  [2_000, "< 2 s"],
  [5_000, "2–5 s"],
  [10_000, "5–10 s"],
  [30_000, "10–30 s"],
  [Number.POSITIVE_INFINITY, "≥ 30 s"],
];

function count(map: Map<string, Tally>, key: string, right: boolean): void {
  const t = map.get(key) ?? { n: 0, right: 0 };
  t.n++;
  if (right) t.right++;
  map.set(key, t);
}

const fmt = (x: number | null | undefined): string => (x === null || x === undefined ? "-" : x.toFixed(3));

interface RawEvent {
  event_id: string;
  event_type: string;
  user_id: string;
  session_id?: string;
  query_id?: string;
  response_id?: string;
  ts: number;
  payload?: { dwell_ms?: unknown };
}

/** How long a regeneration may go without a new response for its query before it counts as one without. */
const REGENERATION_ANSWER_MS = 30_000;
const USES = new Set(["accept", "copy_paste", "edit", "click", "task_complete", "share"]);

/**
 * Client anomalies of one user's events (in event time) that a bot indicator could use: a
 * regeneration no new response followed, a second accept of one response, a response used after
 * the user regenerated it.
 */
function anomalies(events: readonly RawEvent[]): { unanswered: number; second_accept: number; used_after_regenerate: number } {
  const out = { unanswered: 0, second_accept: 0, used_after_regenerate: 0 };
  const waiting = new Map<string, number>();
  const regeneratedAt = new Map<string, number>();
  const accepted = new Set<string>();
  for (const e of events) {
    for (const [q, at] of waiting) {
      if (e.ts > at + REGENERATION_ANSWER_MS) {
        out.unanswered++;
        waiting.delete(q);
      }
    }
    const rid = e.response_id ?? "";
    if (e.event_type === "regenerate") {
      waiting.set(e.query_id ?? "", e.ts);
      if (!regeneratedAt.has(rid)) regeneratedAt.set(rid, e.ts);
    } else if (e.event_type === "response_shown") waiting.delete(e.query_id ?? "");
    if (e.event_type === "accept") {
      if (accepted.has(rid)) out.second_accept++;
      accepted.add(rid);
    }
    if (USES.has(e.event_type) && e.ts > (regeneratedAt.get(rid) ?? Number.POSITIVE_INFINITY)) out.used_after_regenerate++;
  }
  // A regeneration at the end of the user's events: a timer at its time + the wait would count it.
  out.unanswered += waiting.size;
  return out;
}

/**
 * Each user's well-formed events once (the simulator's delivery noise re-sends some and breaks
 * others), in event time, and every dwell's dwell_ms by event id.
 */
function readEvents(lines: readonly string[]): { byUser: Map<string, RawEvent[]>; dwellOf: Map<string, number> } {
  const unique = new Map<string, Map<string, RawEvent>>();
  const dwellOf = new Map<string, number>();
  for (const line of lines) {
    let e: Omit<RawEvent, "ts"> & { timestamp?: unknown };
    try {
      e = JSON.parse(line) as typeof e;
    } catch {
      continue;
    }
    const ts = typeof e.timestamp === "string" ? Date.parse(e.timestamp) : Number.NaN;
    if (typeof e.event_id !== "string" || typeof e.user_id !== "string" || !Number.isFinite(ts)) continue;
    if (e.event_type === "dwell" && typeof e.payload?.dwell_ms === "number") dwellOf.set(e.event_id, e.payload.dwell_ms);
    const mine = unique.get(e.user_id) ?? new Map<string, RawEvent>();
    mine.set(e.event_id, { ...e, ts });
    unique.set(e.user_id, mine);
  }
  const byUser = new Map<string, RawEvent[]>();
  for (const [user, events] of unique) byUser.set(user, [...events.values()].sort((a, b) => a.ts - b.ts));
  return { byUser, dwellOf };
}

/** How many regenerations led to `r` (its truth names the response it replaced, if any). */
function regenerations(r: ResponseTruth, truth: ReadonlyMap<string, ResponseTruth>): number {
  let n = 0;
  for (let x: ResponseTruth | undefined = r; x?.regenerated_from; x = truth.get(x.regenerated_from)) n++;
  return n;
}

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({ options: { rules: { type: "string" } }, allowPositionals: true });
  const seeds = positionals.length > 0 ? positionals : ["101", "102", "103", "104", "105", "106", "107", "108", "109", "110"];
  const labelConfig = values.rules ? { rules_file: values.rules } : undefined;
  const byRule = new Map<string, Tally>();
  const byDwell = new Map<string, Tally>();
  const byRank = new Map<string, Tally>();
  const unflagged: string[] = [];
  const humanAnomalies = new Map<string, number>();
  let humans = 0;
  let humansWithAny = 0;
  let oneSession = 0;
  let liveLabelCount = 0;
  const pseudonymOf = (id: string) => pseudonymize(DEV_PSEUDONYM_KEY, id);
  console.log("seed | positive precision (bot users excluded) | negative precision (excluded) | coverage | AUC");
  for (const seed of seeds) {
    const sim = simulate({ seed, users: 400, durationMs: 2 * 3_600_000 });
    const r = await runChain(sim.events, { partitions: 4, ...(labelConfig ? { labelConfig } : {}) });
    const all = scoreChain(r, sim.truth);
    const human = scoreHumanUsers(r, sim.truth);
    console.log(`${seed} | ${fmt(all.positive.precision)} (${fmt(human.positive.precision)}) | ${fmt(all.negative.precision)} (${fmt(human.negative.precision)}) | ${fmt(all.coverage)} | ${fmt(all.score.auc)}`);

    const truth = new Map<string, ResponseTruth>();
    for (const t of sim.truth) if (t.kind === "response") truth.set(t.response_id, t);
    const { byUser, dwellOf } = readEvents(sim.events);
    const live = liveLabels(r.labels);
    const liveOf = new Map<string, number>();
    for (const l of live) liveOf.set(l.user, (liveOf.get(l.user) ?? 0) + 1);
    for (const u of sim.truth) {
      if (u.kind !== "user") continue;
      const events = byUser.get(u.user_id) ?? [];
      const found = anomalies(events);
      const sessions = new Set(events.map((e) => e.session_id)).size;
      const labels = liveOf.get(pseudonymOf(u.user_id)) ?? 0;
      if (sessions <= 1) oneSession += labels;
      liveLabelCount += labels;
      if (!u.is_bot) {
        humans++;
        for (const [k, n] of Object.entries(found)) if (n > 0) humanAnomalies.set(k, (humanAnomalies.get(k) ?? 0) + 1);
        if (Object.values(found).some((n) => n > 0)) humansWithAny++;
      } else if (labels > 0 && !r.botUsers.has(pseudonymOf(u.user_id))) {
        unflagged.push(`${seed} | ${u.bot_kind} | ${labels} | ${sessions} | ${events.length} | ${found.unanswered} | ${found.second_accept} | ${found.used_after_regenerate}`);
      }
    }
    for (const l of live) {
      if (l.kind !== "response") continue;
      const t = truth.get(l.response_id);
      if (!t) continue;
      const right = t.good === (l.label === "positive");
      const rule = `${l.label} ${l.rule}`;
      count(byRule, `${rule} | all`, right);
      const regens = regenerations(t, truth);
      count(byRule, `${rule} | ${regens > 0 ? "regenerated" : "first"}`, right);
      count(byRule, `${l.label} (every rule) | ${regens === 0 ? "first" : `after ${Math.min(regens, 3)}${regens >= 3 ? "+" : ""} regeneration${regens > 1 ? "s" : ""}`}`, right);
      const dwell = l.signals.map((s) => dwellOf.get(s.event_id)).find((d) => d !== undefined);
      if (dwell !== undefined) count(byDwell, `${rule} | ${DWELL_BUCKETS.find(([below]) => dwell < below)![1]}`, right);
      if (t.position !== null) count(byRank, `${rule} | rank ${t.position <= 3 ? t.position : "4+"}`, right);
    }
  }
  const table = (title: string, m: Map<string, Tally>): void => {
    console.log(`\n${title}\nrule | response | right | labels`);
    for (const [k, t] of [...m].sort(([a], [b]) => a.localeCompare(b))) console.log(`${k} | ${(t.right / t.n).toFixed(3)} | ${t.n}`);
  };
  table(`live response labels right against the hidden quality, seeds ${seeds.join(", ")}`, byRule);
  table("the same by the dwell among the label's signals", byDwell);
  table("the same by the rank of a ranked result", byRank);
  console.log(`\nbot users with live labels, never flagged\nseed | kind | live labels | sessions | events | regenerations unanswered | second accepts | uses after regenerating`);
  for (const line of unflagged) console.log(line);
  console.log(`humans (${humans}) with any of those anomalies: ${humansWithAny} (${[...humanAnomalies].map(([k, n]) => `${k} ${n}`).join(", ") || "none"})`);
  console.log(`live labels of users seen in one session only: ${oneSession} of ${liveLabelCount}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();

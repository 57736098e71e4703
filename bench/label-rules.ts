import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { liveLabels, type Label } from "../src/core/label.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../src/core/pseudonym.js";
import { evaluate } from "../src/eval/evaluate.js";
import { simulate } from "../src/sim/simulate.js";
import type { ResponseTruth } from "../src/sim/truth.js";
import { runChain, scoreChain } from "../test/support/label-chain.js";

/**
 * The error analysis behind the default label rules (README "The default label rules, and why
 * their numbers"): simulated traffic (400 users, 30 % bots, 2 h per seed) through the whole chain
 * in memory (test/support/label-chain.ts), once per seed, with the default rules file or another
 * one (`--rules`, e.g. an older version taken with `git show <commit>:config/label-rules.yaml`).
 * Prints each seed's figures as `tacit evaluate` scores them (bot users' labels excluded in
 * brackets), then, over all seeds, how often each rule's live response labels were right against
 * the hidden quality: on first responses and on responses that replaced a regenerated one, by the
 * dwell that came with the label's signals, and by the rank of a ranked result.
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
  const pseudonymOf = (id: string) => pseudonymize(DEV_PSEUDONYM_KEY, id);
  console.log("seed | positive precision (bot users excluded) | negative precision (excluded) | coverage | AUC");
  for (const seed of seeds) {
    const sim = simulate({ seed, users: 400, durationMs: 2 * 3_600_000 });
    const r = await runChain(sim.events, { partitions: 4, ...(labelConfig ? { labelConfig } : {}) });
    const all = scoreChain(r, sim.truth);
    const bots = new Set(sim.truth.flatMap((u) => (u.kind === "user" && u.is_bot ? [pseudonymOf(u.user_id)] : [])));
    const human = evaluate({ labels: r.labels.filter((l) => !bots.has(l.user)), truth: sim.truth, features: r.features, pseudonymOf });
    console.log(`${seed} | ${fmt(all.positive.precision)} (${fmt(human.positive.precision)}) | ${fmt(all.negative.precision)} (${fmt(human.negative.precision)}) | ${fmt(all.coverage)} | ${fmt(all.score.auc)}`);

    const truth = new Map<string, ResponseTruth>();
    for (const t of sim.truth) if (t.kind === "response") truth.set(t.response_id, t);
    const dwellOf = new Map<string, number>();
    for (const line of sim.events) {
      try {
        const e = JSON.parse(line) as { event_id?: unknown; event_type?: unknown; payload?: { dwell_ms?: unknown } };
        if (e.event_type === "dwell" && typeof e.event_id === "string" && typeof e.payload?.dwell_ms === "number") dwellOf.set(e.event_id, e.payload.dwell_ms);
      } catch {
        // Malformed lines are the simulator's delivery noise: no dwell to read.
      }
    }
    for (const l of liveLabels(r.labels) as Label[]) {
      if (l.kind !== "response" || l.weight <= 0) continue;
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
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();

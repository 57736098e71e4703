import type { BaselineName, CompiledRules } from "./rules.js";

/*
 * Per-user baselines: exponentially weighted counts in event time. Every observation at time ts
 * counts 0.5^((T − ts) / half_life) at the reference time T (the newest event seen), so the sums
 * do not depend on the order events arrive in, and a user's habits of two weeks ago weigh half
 * as much as today's. Rates are smoothed towards the population prior with `prior_strength`
 * pseudo-responses, so a new user starts at the prior and is not discounted on their first accept.
 */

/** Decayed sums of one user at reference time `t` (stored in label-derive's user state). */
export interface BaselineSums {
  /** Reference event time of the sums (ms). */
  t: number;
  /** Opportunities: single responses shown, plus one per ranked list. */
  n: number;
  accept: number;
  edit: number;
  regenerate: number;
  copy: number;
  /** Summed dwell (ms) and number of dwells. */
  dwell: number;
  dwell_n: number;
}

export type BaselineCounter = "n" | BaselineName | "dwell" | "dwell_n";

/** Sums of a user never seen. */
export function emptySums(): BaselineSums {
  return { t: -Infinity, n: 0, accept: 0, edit: 0, regenerate: 0, copy: 0, dwell: 0, dwell_n: 0 };
}

/** Adds `by` to counter `what` observed at event time `ts`, decaying the sums to the newer of `t` and `ts`. */
export function observe(s: BaselineSums, halfLifeMs: number, ts: number, what: BaselineCounter, by = 1): void {
  if (!Number.isFinite(s.t)) s.t = ts;
  if (ts > s.t) {
    const k = Math.pow(0.5, (ts - s.t) / halfLifeMs);
    s.n *= k;
    s.accept *= k;
    s.edit *= k;
    s.regenerate *= k;
    s.copy *= k;
    s.dwell *= k;
    s.dwell_n *= k;
    s.t = ts;
  }
  s[what] += by * Math.pow(0.5, (s.t - ts) / halfLifeMs);
}

/** The user's current view: smoothed rates and dwell, and the discount factor per baseline. */
export interface BaselineView {
  rates: Readonly<Record<BaselineName, number>>;
  dwell_ms: number;
  /** clamp(prior / rate, floor, 1): below 1 for a user who does this more than the population. */
  factors: Readonly<Record<BaselineName, number>>;
}

const NAMES: readonly BaselineName[] = ["accept", "edit", "regenerate", "copy"];

/** Rates and factors of a user from their sums (smoothed towards the priors). */
export function baselineView(s: BaselineSums, cfg: CompiledRules["baselines"]): BaselineView {
  const k = cfg.priorStrength;
  const rates = {} as Record<BaselineName, number>;
  const factors = {} as Record<BaselineName, number>;
  for (const name of NAMES) {
    const prior = cfg.priors[name];
    const rate = (s[name] + prior * k) / (s.n + k);
    rates[name] = rate;
    factors[name] = rate <= 0 ? 1 : Math.min(1, Math.max(cfg.floor, prior / rate));
  }
  const dwell_ms = (s.dwell + cfg.priors.dwell_ms * k) / (s.dwell_n + k);
  return { rates, dwell_ms, factors };
}

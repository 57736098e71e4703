import type { BaselineName, CompiledRule, CompiledRules, Fields } from "./rules.js";

/*
 * Rule evaluation: which rules a signal fires and with what weight. Pure functions, so the
 * operator and the tests share one definition of what each rule means.
 */

/** P(examined | position): the configured examination probability of the rank; ranks past the list use the last one. */
export function propensity(rules: CompiledRules, position: number | undefined): number {
  if (position === undefined || !Number.isFinite(position) || position < 1) return 1;
  const ex = rules.positionBias.examination;
  return ex[Math.min(ex.length, Math.floor(position)) - 1]!;
}

/** Inverse-propensity weight 1 / P(examined | position), clipped at `max_ips` (Joachims et al. 2017). */
export function inversePropensity(rules: CompiledRules, position: number | undefined): number {
  return Math.min(rules.positionBias.maxIps, 1 / propensity(rules, position));
}

/** One rule that fired on a signal. */
export interface Firing {
  rule: CompiledRule;
  /** Weight with every factor, clipped to the rule's [min, max]. */
  weight: number;
  /** The same without the per-user baseline factors (for measuring what the baselines add). */
  weightNoBaseline: number;
}

/** The weight of a rule for these fields; `baseline` gives the user's discount factor per baseline. */
export function ruleWeight(rule: CompiledRule, fields: Fields, baseline: (name: BaselineName) => number): { weight: number; weightNoBaseline: number } {
  let w = rule.base;
  let wn = rule.base;
  for (const f of rule.factors) {
    if (f.type === "baseline") {
      w *= baseline(f.baseline);
      continue;
    }
    let k: number;
    if (f.type === "when") k = f.when(fields) ? f.factor : 1;
    else {
      const x = fields[f.field];
      k = typeof x === "number" && Number.isFinite(x) ? Math.min(f.max, Math.max(f.min, f.offset + f.scale * x)) : typeof x === "boolean" ? Math.min(f.max, Math.max(f.min, f.offset + f.scale * (x ? 1 : 0))) : f.default;
    }
    w *= k;
    wn *= k;
  }
  const clip = (x: number): number => Math.min(rule.max, Math.max(rule.min, x));
  return { weight: clip(w), weightNoBaseline: clip(wn) };
}

/** Every enabled rule listening to `signal` whose conditions hold, with its weight, in file order. */
export function fire(rules: CompiledRules, signal: string, fields: Fields, baseline: (name: BaselineName) => number): Firing[] {
  const out: Firing[] = [];
  for (const rule of rules.bySignal.get(signal) ?? []) {
    if (!rule.when(fields)) continue;
    out.push({ rule, ...ruleWeight(rule, fields, baseline) });
  }
  return out;
}

/** Combines a label's previous weight with a new firing's, as the rule says (`sum` then clip, or `max`). */
export function combineWeight(rule: CompiledRule, previous: number | undefined, next: number): number {
  if (previous === undefined) return next;
  const w = rule.combine === "max" ? Math.max(previous, next) : previous + next;
  return Math.min(rule.max, Math.max(rule.min, w));
}

/**
 * Pure metric functions for label-quality evaluation. Undefined values (0/0, a single class,
 * constant series) are NaN here; the report turns them into null.
 */

/** Precision, recall and F1 from confusion counts. */
export interface Prf {
  precision: number;
  recall: number;
  f1: number;
}

/** Precision tp/(tp+fp), recall tp/(tp+fn) and F1; NaN where a denominator is 0. */
export function prf(tp: number, fp: number, fn: number): Prf {
  const precision = tp + fp === 0 ? NaN : tp / (tp + fp);
  const recall = tp + fn === 0 ? NaN : tp / (tp + fn);
  // 2tp / (2tp + fp + fn) equals the harmonic mean when both are defined and is 0, not NaN, when tp = 0.
  const f1 = tp + fp + fn === 0 ? NaN : (2 * tp) / (2 * tp + fp + fn);
  return { precision, recall, f1 };
}

/** Confusion counts of boolean predictions against boolean truth (same length). */
export function confusion(predicted: readonly boolean[], actual: readonly boolean[]): { tp: number; fp: number; fn: number; tn: number } {
  if (predicted.length !== actual.length) throw new RangeError(`confusion: ${predicted.length} predictions for ${actual.length} truths`);
  let tp = 0;
  let fp = 0;
  let fn = 0;
  let tn = 0;
  for (let i = 0; i < predicted.length; i++) {
    if (predicted[i]) {
      if (actual[i]) tp++;
      else fp++;
    } else if (actual[i]) fn++;
    else tn++;
  }
  return { tp, fp, fn, tn };
}

/** 1-based ranks with ties given the average of the ranks they span. */
export function averageRanks(values: readonly number[]): number[] {
  const idx = values.map((_, i) => i).sort((a, b) => values[a]! - values[b]!);
  const ranks = new Array<number>(values.length);
  let i = 0;
  while (i < idx.length) {
    let j = i;
    while (j + 1 < idx.length && values[idx[j + 1]!] === values[idx[i]!]) j++;
    const avg = (i + j) / 2 + 1;
    for (let k = i; k <= j; k++) ranks[idx[k]!] = avg;
    i = j + 1;
  }
  return ranks;
}

/**
 * ROC-AUC by the rank-sum (Mann–Whitney U) formula: the probability that a random positive
 * scores above a random negative, ties counting one half. NaN when either class is empty.
 */
export function rocAuc(scores: readonly number[], positives: readonly boolean[]): number {
  if (scores.length !== positives.length) throw new RangeError(`rocAuc: ${scores.length} scores for ${positives.length} labels`);
  const nPos = positives.filter(Boolean).length;
  const nNeg = positives.length - nPos;
  if (nPos === 0 || nNeg === 0) return NaN;
  const ranks = averageRanks(scores);
  let rankSum = 0;
  for (let i = 0; i < ranks.length; i++) if (positives[i]) rankSum += ranks[i]!;
  return (rankSum - (nPos * (nPos + 1)) / 2) / (nPos * nNeg);
}

/** Pearson correlation; NaN for fewer than two points or a constant series. */
export function pearson(x: readonly number[], y: readonly number[]): number {
  if (x.length !== y.length) throw new RangeError(`pearson: ${x.length} x for ${y.length} y`);
  const n = x.length;
  if (n < 2) return NaN;
  let mx = 0;
  let my = 0;
  for (let i = 0; i < n; i++) {
    mx += x[i]!;
    my += y[i]!;
  }
  mx /= n;
  my /= n;
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < n; i++) {
    const dx = x[i]! - mx;
    const dy = y[i]! - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  if (sxx === 0 || syy === 0) return NaN;
  return sxy / Math.sqrt(sxx * syy);
}

/** Spearman rank correlation: Pearson on average ranks (handles ties). */
export function spearman(x: readonly number[], y: readonly number[]): number {
  if (x.length !== y.length) throw new RangeError(`spearman: ${x.length} x for ${y.length} y`);
  return pearson(averageRanks(x), averageRanks(y));
}

/** Share of `eligible` that is in `covered`; NaN when nothing is eligible. */
export function coverage<T>(covered: ReadonlySet<T>, eligible: Iterable<T>): number {
  let n = 0;
  let hit = 0;
  for (const e of eligible) {
    n++;
    if (covered.has(e)) hit++;
  }
  return n === 0 ? NaN : hit / n;
}

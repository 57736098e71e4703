import { test } from "node:test";
import assert from "node:assert/strict";
import { averageRanks, confusion, coverage, pearson, prf, rocAuc, spearman } from "./metrics.js";

const close = (actual: number, expected: number, eps = 1e-12): void =>
  assert.ok(Math.abs(actual - expected) <= eps, `expected ${expected}, got ${actual}`);

test("prf: hand-computed cases, including the undefined ones", () => {
  const cases: { tp: number; fp: number; fn: number; p: number; r: number; f1: number }[] = [
    { tp: 8, fp: 2, fn: 4, p: 0.8, r: 8 / 12, f1: 16 / 22 },
    { tp: 5, fp: 0, fn: 0, p: 1, r: 1, f1: 1 },
    { tp: 0, fp: 3, fn: 2, p: 0, r: 0, f1: 0 },
    { tp: 0, fp: 0, fn: 4, p: NaN, r: 0, f1: 0 },
    { tp: 3, fp: 1, fn: 0, p: 0.75, r: 1, f1: 6 / 7 },
    { tp: 0, fp: 0, fn: 0, p: NaN, r: NaN, f1: NaN },
  ];
  for (const c of cases) {
    const m = prf(c.tp, c.fp, c.fn);
    for (const [got, want] of [[m.precision, c.p], [m.recall, c.r], [m.f1, c.f1]] as const) {
      if (Number.isNaN(want)) assert.ok(Number.isNaN(got), `${JSON.stringify(c)}: expected NaN, got ${got}`);
      else close(got, want);
    }
  }
});

test("confusion counts each cell", () => {
  assert.deepEqual(confusion([true, true, false, false, true], [true, false, true, false, true]), { tp: 2, fp: 1, fn: 1, tn: 1 });
  assert.throws(() => confusion([true], [true, false]), RangeError);
});

test("averageRanks gives tied values the mean of their ranks", () => {
  assert.deepEqual(averageRanks([10, 20, 20, 5]), [2, 3.5, 3.5, 1]);
  assert.deepEqual(averageRanks([1, 1, 1]), [2, 2, 2]);
  assert.deepEqual(averageRanks([]), []);
});

test("rocAuc: perfect, inverted, random-free hand cases and ties", () => {
  close(rocAuc([0.9, 0.8, 0.2, 0.1], [true, true, false, false]), 1);
  close(rocAuc([0.1, 0.2, 0.8, 0.9], [true, true, false, false]), 0);
  // Positives 0.9 and 0.3; negatives 0.5 and 0.1: pairs (0.9>0.5, 0.9>0.1, 0.3<0.5, 0.3>0.1) → 3/4.
  close(rocAuc([0.9, 0.3, 0.5, 0.1], [true, true, false, false]), 0.75);
  // A tie between a positive and a negative counts one half: pairs (1 vs 1: ½, 1 vs 0: 1) → 0.75.
  close(rocAuc([1, 1, 0], [true, false, false]), 0.75);
  // All scores equal: 0.5.
  close(rocAuc([3, 3, 3, 3], [true, false, true, false]), 0.5);
  assert.ok(Number.isNaN(rocAuc([1, 2], [true, true])));
});

test("rocAuc equals the pairwise definition on a larger case", () => {
  const scores = [0.3, 0.7, 0.7, 0.1, 0.9, 0.5, 0.5, 0.2, 0.8, 0.7];
  const pos = [false, true, false, false, true, true, false, false, true, true];
  let wins = 0;
  let pairs = 0;
  for (let i = 0; i < scores.length; i++) {
    for (let j = 0; j < scores.length; j++) {
      if (!pos[i] || pos[j]) continue;
      pairs++;
      wins += scores[i]! > scores[j]! ? 1 : scores[i] === scores[j] ? 0.5 : 0;
    }
  }
  close(rocAuc(scores, pos), wins / pairs);
});

test("pearson and spearman: hand-computed values", () => {
  close(pearson([1, 2, 3], [2, 4, 6]), 1);
  close(pearson([1, 2, 3], [3, 2, 1]), -1);
  // x = 1..4, y = 1,3,2,4: cov = 4/4·… → r = 0.8 (sxy = 4, sxx = syy = 5).
  close(pearson([1, 2, 3, 4], [1, 3, 2, 4]), 0.8);
  assert.ok(Number.isNaN(pearson([1, 1, 1], [1, 2, 3])));
  assert.ok(Number.isNaN(pearson([1], [1])));
  // Monotone but not linear: Spearman 1, Pearson below 1.
  close(spearman([1, 2, 3, 4], [1, 8, 27, 1000]), 1);
  assert.ok(pearson([1, 2, 3, 4], [1, 8, 27, 1000]) < 0.9);
  // With ties: ranks x = 1.5,1.5,3,4 and y = 1,2,3,4 → Pearson of ranks.
  close(spearman([5, 5, 6, 7], [1, 2, 3, 4]), pearson([1.5, 1.5, 3, 4], [1, 2, 3, 4]));
});

test("coverage is the covered share of the eligible set", () => {
  close(coverage(new Set(["a", "c", "z"]), ["a", "b", "c", "d"]), 0.5);
  close(coverage(new Set<string>(), ["a"]), 0);
  assert.ok(Number.isNaN(coverage(new Set(["a"]), [])));
});

import { test } from "node:test";
import assert from "node:assert/strict";
import { Rng, seedFrom } from "./rng.js";

const draw = (rng: Rng, n: number, f: (r: Rng) => number): number[] => Array.from({ length: n }, () => f(rng));
const mean = (xs: number[]): number => xs.reduce((s, x) => s + x, 0) / xs.length;
const variance = (xs: number[]): number => {
  const m = mean(xs);
  return xs.reduce((s, x) => s + (x - m) ** 2, 0) / (xs.length - 1);
};

test("same seed, same sequence; different seeds, different sequences", () => {
  const a = draw(new Rng(7), 50, (r) => r.next());
  const b = draw(new Rng(7), 50, (r) => r.next());
  const c = draw(new Rng(8), 50, (r) => r.next());
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  assert.ok(a.every((x) => x >= 0 && x < 1));
});

test("seedFrom: integers pass through, numeric strings equal their number, other strings hash stably", () => {
  assert.equal(seedFrom(42), 42);
  assert.equal(seedFrom("42"), 42);
  assert.equal(seedFrom("demo"), seedFrom("demo"));
  assert.notEqual(seedFrom("demo"), seedFrom("demo2"));
  assert.deepEqual(draw(new Rng("x"), 5, (r) => r.next()), draw(new Rng(seedFrom("x")), 5, (r) => r.next()));
});

test("uniform and int stay in range and cover it", () => {
  const rng = new Rng(1);
  const ints = draw(rng, 5000, (r) => r.int(3, 6));
  assert.deepEqual([...new Set(ints)].sort(), [3, 4, 5, 6]);
  assert.ok(draw(rng, 1000, (r) => r.uniform(-2, 5)).every((x) => x >= -2 && x < 5));
});

test("gamma has mean kθ and variance kθ², for shapes above and below 1", () => {
  for (const [k, theta] of [[3, 2], [1.5, 4], [0.5, 10]] as const) {
    const xs = draw(new Rng(11), 40_000, (r) => r.gamma(k, theta));
    assert.ok(xs.every((x) => x > 0), "gamma draws are positive");
    assert.ok(Math.abs(mean(xs) - k * theta) / (k * theta) < 0.03, `gamma(${k},${theta}) mean ${mean(xs)} vs ${k * theta}`);
    assert.ok(Math.abs(variance(xs) - k * theta * theta) / (k * theta * theta) < 0.08, `gamma(${k},${theta}) variance ${variance(xs)} vs ${k * theta * theta}`);
  }
  assert.throws(() => new Rng(1).gamma(0, 1), RangeError);
});

test("beta, poisson, exponential and normal have their textbook means", () => {
  const rng = new Rng(5);
  assert.ok(Math.abs(mean(draw(rng, 20_000, (r) => r.beta(4, 2))) - 4 / 6) < 0.01);
  assert.ok(Math.abs(mean(draw(rng, 20_000, (r) => r.betaMean(0.26, 12))) - 0.26) < 0.01);
  assert.ok(Math.abs(mean(draw(rng, 20_000, (r) => r.poisson(3.5))) - 3.5) < 0.08);
  assert.ok(Math.abs(mean(draw(rng, 20_000, (r) => r.poisson(50))) - 50) < 0.5);
  assert.ok(Math.abs(mean(draw(rng, 20_000, (r) => r.exponential(2))) - 2) < 0.06);
  const normals = draw(rng, 20_000, (r) => r.normal(1, 2));
  assert.ok(Math.abs(mean(normals) - 1) < 0.05 && Math.abs(Math.sqrt(variance(normals)) - 2) < 0.05);
});

test("weighted picks in proportion to the weights and never a zero weight", () => {
  const rng = new Rng(3);
  const counts = { a: 0, b: 0, c: 0 };
  for (let i = 0; i < 30_000; i++) counts[rng.weighted({ a: 1, b: 3, c: 0 })]++;
  assert.equal(counts.c, 0);
  assert.ok(Math.abs(counts.b / 30_000 - 0.75) < 0.015, JSON.stringify(counts));
});

test("shuffle permutes without losing elements", () => {
  const xs = Array.from({ length: 20 }, (_, i) => i);
  const s = new Rng(9).shuffle(xs);
  assert.notDeepEqual(s, xs);
  assert.deepEqual(s.slice().sort((a, b) => a - b), xs);
});

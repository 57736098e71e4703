import { test } from "node:test";
import assert from "node:assert/strict";
import { baselineView, emptySums, observe, type BaselineCounter } from "./baselines.js";
import { parseRules } from "./rules.js";

const cfg = parseRules("version: 1\nbaselines:\n  half_life: 1d\n  prior_strength: 5\n  floor: 0.2\nrules: []\n").baselines;
const DAY = 86_400_000;

test("a new user sits at the priors: rates equal the priors, no discount", () => {
  const v = baselineView(emptySums(), cfg);
  assert.equal(v.rates.regenerate, cfg.priors.regenerate);
  assert.equal(v.rates.accept, cfg.priors.accept);
  assert.equal(v.dwell_ms, cfg.priors.dwell_ms);
  assert.deepEqual(v.factors, { accept: 1, edit: 1, regenerate: 1, copy: 1 });
});

test("a habitual regenerator is discounted, never below the floor; a rare one is not", () => {
  const habitual = emptySums();
  const rare = emptySums();
  for (let i = 0; i < 40; i++) {
    const ts = i * 60_000;
    observe(habitual, cfg.halfLifeMs, ts, "n");
    observe(habitual, cfg.halfLifeMs, ts, "regenerate");
    observe(rare, cfg.halfLifeMs, ts, "n");
    if (i % 20 === 0) observe(rare, cfg.halfLifeMs, ts, "regenerate");
  }
  const h = baselineView(habitual, cfg);
  assert.ok(h.rates.regenerate > 0.8, String(h.rates.regenerate));
  assert.equal(h.factors.regenerate, 0.2); // prior / rate ≈ 0.13 → floor
  const r = baselineView(rare, cfg);
  assert.equal(r.factors.regenerate, 1);
});

test("sums decay with the half-life in event time", () => {
  const s = emptySums();
  observe(s, cfg.halfLifeMs, 0, "accept", 8);
  observe(s, cfg.halfLifeMs, DAY, "n", 0);
  assert.ok(Math.abs(s.accept - 4) < 1e-9);
  observe(s, cfg.halfLifeMs, 3 * DAY, "n", 0);
  assert.ok(Math.abs(s.accept - 1) < 1e-9);
});

test("the sums do not depend on the order events arrive in", () => {
  const events: [number, BaselineCounter][] = [
    [5_000, "n"],
    [1_000, "n"],
    [3 * DAY, "accept"],
    [2 * DAY, "n"],
    [DAY / 2, "regenerate"],
    [4 * DAY, "dwell"],
  ];
  const a = emptySums();
  const b = emptySums();
  for (const [ts, what] of events) observe(a, cfg.halfLifeMs, ts, what, what === "dwell" ? 12_000 : 1);
  for (const [ts, what] of [...events].reverse()) observe(b, cfg.halfLifeMs, ts, what, what === "dwell" ? 12_000 : 1);
  for (const k of Object.keys(a) as (keyof typeof a)[]) assert.ok(Math.abs(a[k] - b[k]) < 1e-9, k);
});

test("dwell baseline: the user's exponentially weighted mean dwell, smoothed towards the prior", () => {
  const s = emptySums();
  for (let i = 0; i < 200; i++) {
    observe(s, cfg.halfLifeMs, i * 1000, "dwell", 10_000);
    observe(s, cfg.halfLifeMs, i * 1000, "dwell_n");
  }
  const v = baselineView(s, cfg);
  assert.ok(v.dwell_ms > 10_000 && v.dwell_ms < 11_000, String(v.dwell_ms));
});

import { test } from "node:test";
import assert from "node:assert/strict";
import { combineWeight, fire, inversePropensity, propensity, ruleWeight } from "./engine.js";
import { parseRules } from "./rules.js";

const rules = parseRules(`version: 1
position_bias:
  examination: [0.68, 0.61, 0.48, 0.34, 0.28, 0.20, 0.11, 0.10, 0.08, 0.06]
  max_ips: 5
rules:
  - name: copy
    version: 1
    signal: copy_paste
    kind: response
    target: response
    label: positive
    conditions:
      - { field: copied_share, op: ">=", value: 0.2 }
    weight:
      base: 1
      factors:
        - { field: copied_share, scale: 1.4, offset: 0.4, min: 0.5, max: 1.5 }
        - { baseline: copy }
      max: 2
  - name: accept
    version: 1
    signal: accept
    kind: response
    target: response
    label: positive
    weight:
      base: 1
      factors:
        - when: [{ field: ms_since_shown, op: "<", value: 2000 }]
          factor: 0.5
  - name: click
    version: "2026-01"
    signal: click_dwell
    kind: response
    target: response
    label: positive
    weight:
      base: 0.7
      factors:
        - { field: ips }
      max: 3.5
    combine: max
`);

test("examination probabilities by rank; ranks past the list use the last value; single responses are always examined", () => {
  assert.equal(propensity(rules, 1), 0.68);
  assert.equal(propensity(rules, 4), 0.34);
  assert.equal(propensity(rules, 10), 0.06);
  assert.equal(propensity(rules, 25), 0.06);
  assert.equal(propensity(rules, undefined), 1);
});

test("inverse propensity is 1/P, clipped at max_ips", () => {
  assert.ok(Math.abs(inversePropensity(rules, 1) - 1 / 0.68) < 1e-12);
  assert.ok(Math.abs(inversePropensity(rules, 5) - 1 / 0.28) < 1e-12);
  assert.equal(inversePropensity(rules, 7), 5); // 1/0.11 ≈ 9.1 → clipped
  assert.equal(inversePropensity(rules, 10), 5); // 1/0.06 ≈ 16.7 → clipped
  assert.equal(inversePropensity(rules, undefined), 1);
});

test("a field factor is linear and clamped; the baseline factor is left out of the baseline-free weight", () => {
  const copy = rules.rules.find((r) => r.name === "copy")!;
  const w = (share: number, base = 1) => ruleWeight(copy, { copied_share: share }, () => base);
  assert.ok(Math.abs(w(0.5).weight - (0.4 + 1.4 * 0.5)) < 1e-12);
  assert.equal(w(0.05).weight, 0.5); // clamped at min
  assert.equal(w(1).weight, 1.5); // clamped at max
  const discounted = w(0.5, 0.25);
  assert.ok(Math.abs(discounted.weight - 1.1 * 0.25) < 1e-12);
  assert.ok(Math.abs(discounted.weightNoBaseline - 1.1) < 1e-12);
});

test("a `when` factor applies only when its conditions hold (quick accept weighs half)", () => {
  const accept = rules.rules.find((r) => r.name === "accept")!;
  assert.equal(ruleWeight(accept, { ms_since_shown: 1500 }, () => 1).weight, 0.5);
  assert.equal(ruleWeight(accept, { ms_since_shown: 15_000 }, () => 1).weight, 1);
  assert.equal(ruleWeight(accept, {}, () => 1).weight, 1);
});

test("IPS weighting of a click and the rule's clip", () => {
  const click = rules.rules.find((r) => r.name === "click")!;
  const at = (pos: number) => ruleWeight(click, { ips: inversePropensity(rules, pos) }, () => 1).weight;
  assert.ok(Math.abs(at(1) - 0.7 / 0.68) < 1e-12);
  assert.ok(Math.abs(at(3) - 0.7 / 0.48) < 1e-12);
  assert.equal(at(10), 3.5); // 0.7 × 5 (ips clip) = 3.5 (rule max)
  assert.ok(at(3) > at(1), "a click lower in the list is worth more");
});

test("fire returns only the rules whose conditions hold, listening to that signal", () => {
  assert.deepEqual(fire(rules, "copy_paste", { copied_share: 0.1 }, () => 1), []);
  assert.deepEqual(fire(rules, "copy_paste", { copied_share: 0.6 }, () => 1).map((f) => f.rule.name), ["copy"]);
  assert.deepEqual(fire(rules, "accept", {}, () => 1).map((f) => f.rule.name), ["accept"]);
  assert.deepEqual(fire(rules, "regenerate", {}, () => 1), []);
});

test("combine: sum then clip, or max", () => {
  const copy = rules.rules.find((r) => r.name === "copy")!;
  const click = rules.rules.find((r) => r.name === "click")!;
  assert.equal(combineWeight(copy, undefined, 1.2), 1.2);
  assert.equal(combineWeight(copy, 1.2, 0.5), 1.7);
  assert.equal(combineWeight(copy, 1.2, 1.2), 2); // clipped at max 2
  assert.equal(combineWeight(click, 1, 0.5), 1);
  assert.equal(combineWeight(click, 1, 2), 2);
});

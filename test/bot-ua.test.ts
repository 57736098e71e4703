import { test } from "node:test";
import assert from "node:assert/strict";
import { crawlerAgents, evaluateBotUa, flagAgents, sampleBrowserAgents } from "../bench/bot-ua-eval.js";

test("user-agent indicator on real agent lists: human FPR ≤ 0.5 %, recall ≥ 0.9", async () => {
  const r = await evaluateBotUa({ negatives: 10_000, seed: 42 });
  assert.equal(r.positives, crawlerAgents().length);
  assert.ok(r.positives > 1_000, `crawler list has ${r.positives} instances`);
  assert.equal(r.negatives, 10_000);
  assert.equal(r.tp + r.fn, r.positives);
  assert.equal(r.fp + r.tn, r.negatives);
  assert.ok(r.human_fpr <= 0.005, `human FPR ${r.human_fpr}`);
  assert.ok(r.distinct_browser_fpr <= 0.005, `distinct browser FPR ${r.distinct_browser_fpr}`);
  assert.ok(r.recall >= 0.9, `recall ${r.recall}`);
  assert.ok(r.precision >= 0.99, `precision ${r.precision}`);
  assert.equal(r.missed.length, r.fn);
});

test("the browser sample is deterministic for a seed and differs across seeds", () => {
  const a = sampleBrowserAgents(200, 7);
  assert.deepEqual(sampleBrowserAgents(200, 7), a);
  assert.notDeepEqual(sampleBrowserAgents(200, 8), a);
  assert.ok(a.every((ua) => ua.startsWith("Mozilla/5.0")));
});

test("flagAgents routes a crawler to bots and a browser on", async () => {
  const flags = await flagAgents([
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
  ]);
  assert.deepEqual(flags, [true, false]);
});

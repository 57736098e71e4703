import { test } from "node:test";
import assert from "node:assert/strict";
import { formatDelivery, measureDelivery } from "../bench/label-delivery.js";

// The hold vs emit-and-retract measurement (bench/label-delivery.ts) on a small run: the figures
// the README reports come from this code, so its direction is checked here.
test("hold vs emit-and-retract: emit publishes light users' labels at once but takes back more; both end in the same final view", async (t) => {
  const [hold, emit] = await measureDelivery("9", { users: 150, durationMs: 3_600_000 });
  for (const line of formatDelivery([hold!, emit!]).split("\n")) t.diagnostic(line);
  assert.deepEqual([hold!.mode, emit!.mode], ["hold", "emit"]);
  const h = hold!.delivery;
  const e = emit!.delivery;
  assert.ok(h.light_latency!.n > 0 && e.light_latency!.n === h.light_latency!.n, "the same light users' labels in both");
  // At once, after the event-time hold: the watermark (5 s out-of-orderness) must reach the event.
  assert.ok(e.light_latency!.p50_ms! >= 5_000 && e.light_latency!.p50_ms! < 60_000, `emit: once the watermark reaches the event, p50 ${e.light_latency!.p50_ms}`);
  assert.ok(h.light_latency!.p50_ms! >= 30 * 60_000, `hold: until the session closes (session_gap 30m), p50 ${h.light_latency!.p50_ms}`);
  assert.ok(e.published_then_retracted > h.published_then_retracted, `retracted: emit ${e.published_then_retracted}, hold ${h.published_then_retracted}`);
  assert.equal(e.published_then_retracted, e.published_then_retracted_bots, "only bots' labels are retracted");
  assert.deepEqual([emit!.live, emit!.live_from_bots, emit!.positive_precision], [hold!.live, hold!.live_from_bots, hold!.positive_precision], "the same final view");
  assert.deepEqual([hold!.live_from_flagged, emit!.live_from_flagged], [0, 0], "no live label of a flagged user");
});

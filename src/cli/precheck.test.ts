import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { findOperator } from "../../operators/index.js";
import { compileEnrichConfig } from "../../operators/enrich.js";
import { loadPipelineOrThrow } from "../config/load.js";
import { simulate } from "../sim/simulate.js";
import { projectRoot } from "../config/paths.js";
import { inputEnrichConfig, precheckLine, precheckLines, precheckWarning } from "./precheck.js";

const NOW = Date.parse("2026-12-02T12:00:00Z");
const DAY = 86_400_000;
const CFG = compileEnrichConfig({});

function event(timestamp: string, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({ event_id: "e1", session_id: "s1", user_id: "u1", timestamp, query_id: "q1", event_type: "query", payload: { text: "hi" }, ...extra });
}

test("precheckLine: enrich's reasons for a line alone, with the timestamp bounds taken against now", () => {
  assert.equal(precheckLine(event(new Date(NOW - DAY).toISOString()), CFG, NOW), undefined);
  assert.equal(precheckLine("{not json", CFG, NOW)?.kind, "malformed_json");
  assert.equal(precheckLine(event("2026-12-01T00:00:00Z", { event_type: "hover" }), CFG, NOW)?.kind, "unknown_event_type");
  assert.equal(precheckLine(event("2026-12-01T00:00:00Z", { user_id: undefined }), CFG, NOW)?.kind, "schema_violation");
  assert.equal(precheckLine(event("yesterday"), CFG, NOW)?.kind, "bad_timestamp");
  const old = precheckLine(event("2026-01-01T00:00:00Z"), CFG, NOW);
  assert.equal(old?.kind, "too_old");
  assert.match(old!.message, /older than now \(max_past_age 30d\)/);
  assert.equal(precheckLine(event(new Date(NOW + 2 * 3_600_000).toISOString()), CFG, NOW)?.kind, "in_future");
  assert.equal(precheckLine(event(new Date(NOW + 30 * 60_000).toISOString()), CFG, NOW), undefined);
  assert.equal(precheckLine(event("2026-12-01T00:00:00Z", { context: { note: "x".repeat(70_000) } }), CFG, NOW)?.kind, "oversized");
  // The stage's own bounds decide.
  assert.equal(precheckLine(event("2026-01-01T00:00:00Z"), compileEnrichConfig({ max_past_age: "400d" }), NOW), undefined);
});

test("a file that is mostly too old gets one warning line naming the reason, the count and the fix", async () => {
  const lines = [...Array.from({ length: 8 }, () => event("2026-01-01T00:00:00Z")), event(new Date(NOW).toISOString()), "", "{oops"];
  const s = await precheckLines(lines, CFG, NOW);
  assert.equal(s.lines, 10);
  assert.deepEqual(s.failures.get("too_old"), { count: 8, line: 1, message: s.failures.get("too_old")!.message });
  assert.equal(s.failures.get("malformed_json")?.line, 11);
  const w = precheckWarning(s, CFG)!;
  assert.equal(w.split("\n").length, 1);
  assert.match(w, /^tacit: warning: 8 of 10 lines \(80 %\) would be dead-lettered by enrich as bad_timestamp \(older than max_past_age 30d\) \(line 1: timestamp 2026-01-01T00:00:00Z is .* older than now/);
  assert.match(w, /run `tacit simulate` without --start .* or pass --start within the last 30d/);
});

test("no warning when at most half the lines would fail for one reason", async () => {
  const half = await precheckLines([event("2026-01-01T00:00:00Z"), "{", event(new Date(NOW).toISOString()), event(new Date(NOW).toISOString())], CFG, NOW);
  assert.equal(precheckWarning(half, CFG), undefined);
  // Two reasons that together pass half do not make one reason.
  const mixed = await precheckLines([event("2026-01-01T00:00:00Z"), "{", event(new Date(NOW).toISOString())], CFG, NOW);
  assert.equal(precheckWarning(mixed, CFG), undefined);
  assert.equal(precheckWarning(await precheckLines([], CFG, NOW), CFG), undefined);
});

test("malformed and future files get their own fix", async () => {
  const json = precheckWarning(await precheckLines(['[{"event_type":"query"},', "{"], CFG, NOW), CFG)!;
  assert.match(json, /as malformed_json .* one JSON object per line/);
  const future = precheckWarning(await precheckLines([event("2027-06-01T00:00:00Z")], CFG, NOW), CFG)!;
  assert.match(future, /as bad_timestamp \(ahead by more than max_future_skew 1h\) \(line 1: timestamp 2027-06-01T00:00:00Z is .* ahead of now .*producer's clock/);
});

test("the default pipeline's enrich config is read from the loaded pipeline, overrides included", () => {
  const file = join(projectRoot(), "pipelines", "feedback.yaml");
  const env = { NATS_URL: "nats://127.0.0.1:4222", REDIS_URL: "redis://127.0.0.1:6379" };
  assert.equal(inputEnrichConfig(loadPipelineOrThrow(file, { env, operators: findOperator }))!.maxPastAgeMs, 30 * DAY);
  const raised = loadPipelineOrThrow(file, { env, operators: findOperator, set: ["stages.enrich.config.max_past_age=400d"] });
  assert.equal(inputEnrichConfig(raised)!.maxPastAgeMs, 400 * DAY);
});

test("simulated traffic ending now passes; the same traffic from a fixed old start would be dead-lettered", async () => {
  // The simulator's deliberately malformed lines (some with 1970 or 2126 timestamps) are left out.
  const wellFormed = (o: { endTime?: number; startTime?: string }): string[] => {
    const r = simulate({ seed: 4, users: 30, durationMs: 3_600_000, malformedFraction: 0.05, ...o });
    const bad = new Set(r.truth.flatMap((t) => (t.kind === "noise" && t.noise === "malformed" ? [t.line] : [])));
    assert.ok(bad.size > 0);
    return r.events.filter((_, i) => !bad.has(i + 1));
  };
  const fresh = await precheckLines(wellFormed({ endTime: NOW }), CFG, NOW);
  assert.deepEqual([...fresh.failures.keys()], []);
  assert.equal(precheckWarning(fresh, CFG), undefined);
  const old = await precheckLines(wellFormed({ startTime: "2026-01-01T00:00:00Z" }), CFG, NOW);
  assert.equal(old.failures.get("too_old")?.count, old.lines);
  assert.match(precheckWarning(old, CFG)!, /would be dead-lettered by enrich as bad_timestamp \(older than max_past_age 30d\)/);
});

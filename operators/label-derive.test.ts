import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { newConfigAjv } from "../src/config/ajv.js";
import { loadPipeline, formatProblem } from "../src/config/load.js";
import { ConfigError } from "../src/core/errors.js";
import type { Envelope, EventType, TacitEvent } from "../src/core/event.js";
import { labelSchema, type Label } from "../src/core/label.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../src/core/pseudonym.js";
import { partitionKey } from "../src/core/state.js";
import { fieldNames, readFeatures, userFeaturesKey } from "../src/labels/features.js";
import { simulate } from "../src/sim/simulate.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { ManualClock } from "../src/core/clock.js";
import { isKeyedProcessor, type KeyedInput } from "../src/core/operator.js";
import { decodeStoredValue } from "../src/runtime/keyed-state.js";
import { KeyedChain, emptyResult } from "../src/runtime/chain.js";
import { StageState } from "../src/runtime/keyed-state.js";
import { OperatorHarness, type CrashPoint } from "../test/support/operator-harness.js";
import { runChain } from "../test/support/label-chain.js";
import { OPERATORS } from "./index.js";
import { isBotMarker } from "../src/core/event.js";
import { labelDerive, labelId, type LabelDeriveConfig } from "./label-derive.js";

const T0 = Date.parse("2026-01-01T10:00:00Z");
const SEC = 1000;
const MIN = 60 * SEC;
const ALICE = pseudonymize(DEV_PSEUDONYM_KEY, "alice");
const BOB = pseudonymize(DEV_PSEUDONYM_KEY, "bob");
const validateLabel = newConfigAjv().compile(labelSchema(2));
const validateLabelV1 = newConfigAjv().compile(labelSchema(1));
const ROOT = fileURLToPath(new URL("../../", import.meta.url));

// ---------------------------------------------------------------------------------------------
// Building inputs

let seq = 0;

interface Opts {
  rid?: string;
  qid?: string;
  payload?: Record<string, unknown>;
  user?: string;
  session?: string;
  /** "bot": bot-score's flag marker (no session yet: it comes from before sessionize). */
  band?: "human" | "ambivalent" | "bot";
  reformulation?: Record<string, unknown>;
}

/** One envelope as label-derive receives it (after bot-score, sessionize and reformulation). */
function e(type: EventType, atSec: number, o: Opts = {}): Envelope {
  seq++;
  const ts = T0 + atSec * SEC;
  const event: TacitEvent = {
    event_id: `e-${seq}`,
    session_id: "raw-session",
    user: o.user ?? ALICE,
    user_key_version: "dev",
    timestamp: new Date(ts).toISOString(),
    ts,
    event_type: type,
    payload: o.payload ?? {},
    ...(o.qid !== undefined ? { query_id: o.qid } : {}),
    ...(o.rid !== undefined ? { response_id: o.rid } : {}),
  };
  const attrs: Record<string, unknown> =
    o.band === "bot"
      ? { bot: { score: 0.95, band: "bot", indicators: [{ name: "regularity", strength: 1, weight: 1, detail: "metronome" }], flagged: true } }
      : {
          bot: { score: o.band === "ambivalent" ? 0.5 : 0.01, band: o.band ?? "human", indicators: [] },
          session: { id: o.session ?? "s-1", seq_in_session: 1 },
        };
  if (o.reformulation) attrs.reformulation = o.reformulation;
  return { v: 1, event, src: { seq: 10_000 + seq }, partition: 0, attrs };
}

/** A single (LLM) response shown. */
const shown = (at: number, rid: string, qid = "q-1", extra: Opts = {}) => e("response_shown", at, { rid, qid, payload: { text_length: 1000 }, ...extra });
/** A ranked list of responses for one query (positions 1…n), shown 1 ms apart. */
const list = (at: number, rids: string[], qid = "q-1") =>
  rids.map((rid, i) => e("response_shown", at + i / 1000, { rid, qid, payload: { position: i + 1, candidates: rids.length, text_length: 500 } }));
const on = (type: EventType, at: number, rid: string, payload: Record<string, unknown> = {}, extra: Opts = {}) => e(type, at, { rid, qid: extra.qid ?? "q-1", payload, ...extra });
const reformulation = (at: number, prevRid: string, decision: string, kind: string, extra: Opts = {}) =>
  e("query", at, {
    qid: "q-2",
    payload: { text: "follow up" },
    reformulation: { previous_query_id: "q-1", previous_response_id: prevRid, kind, decision, levenshtein: 0.2, jaccard3: 0.6, token_overlap: 0.5, gap_ms: 20_000 },
    ...extra,
  });

/**
 * The rule and feature tests judge a few events at a time, where probation would hold every label
 * until the session closes: they run without it unless the config says otherwise. Probation has
 * its own tests below, and the determinism and redelivery tests run with the default (on).
 */
const NO_PROBATION: LabelDeriveConfig = { probation: { enabled: false } };

function harness(config: LabelDeriveConfig = {}, opts: { partitions?: number } = {}): OperatorHarness<LabelDeriveConfig> {
  return new OperatorHarness(labelDerive, { ...NO_PROBATION, ...config }, { stage: "label-derive", prefix: "feedback", ...opts });
}

/** Every label published, deduplicated by emit id; each is checked against label.v2.json (and a v1 label against label.v1.json too). */
function labels(h: OperatorHarness<LabelDeriveConfig>): Label[] {
  const out: Label[] = [];
  for (const to of ["labels.response", "labels.preference", "labels.session"] as const) {
    for (const em of h.emits(to)) {
      const l = em.value as Label;
      assert.ok(validateLabel(l), `label ${em.id} does not match label.v2.json: ${JSON.stringify(validateLabel.errors)}`);
      if (l.schema_version === 1) assert.ok(validateLabelV1(l), `v1 label ${em.id} does not match label.v1.json: ${JSON.stringify(validateLabelV1.errors)}`);
      assert.equal(em.id, `label:${l.label_id}:${l.revision}`);
      assert.equal(to, `labels.${l.kind}`);
      out.push(l);
    }
  }
  return out;
}

/** The highest revision of each label. */
function latest(ls: Label[]): Label[] {
  const m = new Map<string, Label>();
  for (const l of ls) if ((m.get(l.label_id)?.revision ?? -1) < l.revision) m.set(l.label_id, l);
  return [...m.values()];
}

async function run(envs: Envelope[], o: { close?: boolean; config?: LabelDeriveConfig; batchSize?: number } = {}) {
  const h = harness(o.config);
  await h.push(0, envs, { batchSize: o.batchSize ?? 100 });
  if (o.close) await h.advanceWatermark(0, T0 + 24 * 3600 * SEC);
  return { h, labels: latest(labels(h)) };
}

const near = (a: number, b: number) => Math.abs(a - b) < 1e-6;

/** A user's stored state: the runtime's `<applied seq>:<encoding>`, the encoding (JSON) parsed. */
async function storedState<T>(store: MemoryStateStore, user: string): Promise<{ applied: number; state: T }> {
  const raw = (await store.get([`tacit:{feedback:u:${user}}:label-derive:state`]))[0];
  assert.ok(raw, `no state stored for ${user}`);
  const { applied, payload } = decodeStoredValue(raw);
  return { applied, state: JSON.parse(payload) as T };
}

// ---------------------------------------------------------------------------------------------
// Table tests: every default rule, with inputs that fire it and inputs that must not

interface Case {
  rule: string;
  title: string;
  events: () => Envelope[];
  /** Expected weight when it fires; undefined: must not fire. */
  weight?: number;
  /** The labelled response (response labels) or [chosen, rejected] (preference labels). */
  target?: string | [string, string];
  close?: boolean;
}

const CASES: Case[] = [
  { rule: "task_complete", title: "task completion", events: () => [shown(0, "r1"), on("task_complete", 40, "r1", { outcome: "success" })], weight: 2, target: "r1" },
  { rule: "task_complete", title: "not after a heavy rewrite", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 800, original_length: 1000 }), on("task_complete", 40, "r1")] },
  { rule: "task_complete", title: "not a failed outcome", events: () => [shown(0, "r1"), on("task_complete", 40, "r1", { outcome: "failure" })] },
  { rule: "copy", title: "copy of 60 % of the response: 0.4 + 1.4 × 0.6", events: () => [shown(0, "r1"), on("copy_paste", 30, "r1", { span_start: 0, span_end: 600, span_length: 600 })], weight: 1.24, target: "r1" },
  { rule: "copy", title: "copy of the whole response: clipped at 1.5", events: () => [shown(0, "r1"), on("copy_paste", 30, "r1", { span_start: 0, span_end: 1000 })], weight: 1.5, target: "r1" },
  { rule: "copy", title: "not a snippet (10 %)", events: () => [shown(0, "r1"), on("copy_paste", 30, "r1", { span_start: 0, span_end: 100, span_length: 100 })] },
  { rule: "copy", title: "not after a glance", events: () => [shown(0, "r1"), on("dwell", 2, "r1", { dwell_ms: 2000 }), on("copy_paste", 3, "r1", { span_length: 600, span_start: 0, span_end: 600 })] },
  { rule: "accept", title: "accept after reading", events: () => [shown(0, "r1"), on("accept", 35, "r1")], weight: 1, target: "r1" },
  { rule: "accept", title: "not a quick accept (< 30 s after shown: no full reading)", events: () => [shown(0, "r1"), on("accept", 29.5, "r1")] },
  { rule: "accept", title: "accept 30 s after shown", events: () => [shown(0, "r1"), on("accept", 30, "r1")], weight: 1, target: "r1" },
  { rule: "accept", title: "not after a glance", events: () => [shown(0, "r1"), on("dwell", 3, "r1", { dwell_ms: 3000 }), on("accept", 4, "r1")] },
  { rule: "edit_light", title: "edit distance 10 %", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 100, original_length: 1000 })], weight: 0.8, target: "r1" },
  { rule: "edit_light", title: "edit given as texts", events: () => [shown(0, "r1"), on("edit", 30, "r1", { original_text: "abcdefghij", edited_text: "abcdefghiX" })], weight: 0.8, target: "r1" },
  { rule: "edit_light", title: "not a 50 % edit", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 500, original_length: 1000 })] },
  { rule: "edit_heavy", title: "not a 50 % edit", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 500, original_length: 1000 })] },
  { rule: "edit_heavy", title: "rewrite of 80 %", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 800 })], weight: 0.5, target: "r1" },
  { rule: "edit_light", title: "not a rewrite", events: () => [shown(0, "r1"), on("edit", 30, "r1", { edit_distance: 800 })] },
  { rule: "regenerate", title: "not a regenerate naming no response", events: () => [shown(0, "r1"), e("regenerate", 10, { qid: "q-1" })] },
  { rule: "regenerate", title: "regenerate: negative for the replaced response", events: () => [shown(0, "r1"), on("regenerate", 10, "r1")], weight: 1, target: "r1" },
  {
    rule: "regenerate_then_use",
    title: "regenerate then accept: new over old",
    events: () => [shown(0, "r1"), on("regenerate", 10, "r1"), shown(12, "r2"), on("accept", 40, "r2")],
    // Discounted by the regenerate baseline: 1 regeneration in 2 responses, smoothed with 5 at the
    // prior 0.12, is a rate of (1 + 0.6) / (2 + 5); the factor is 0.12 / rate.
    weight: 0.12 / (1.6 / 7),
    target: ["r2", "r1"],
  },
  {
    rule: "regenerate_then_use",
    title: "regenerate then copy: new over old",
    events: () => [shown(0, "r1"), on("regenerate", 10, "r1"), shown(12, "r2"), on("copy_paste", 40, "r2", { span_length: 500 })],
    weight: 0.12 / (1.6 / 7),
    target: ["r2", "r1"],
  },
  { rule: "regenerate_then_use", title: "not without a regenerate", events: () => [shown(0, "r1"), shown(12, "r2"), on("accept", 40, "r2")] },
  { rule: "regenerate_then_use", title: "not a heavy rewrite of the new one", events: () => [shown(0, "r1"), on("regenerate", 10, "r1"), shown(12, "r2"), on("edit", 40, "r2", { edit_distance: 900 })] },
  { rule: "regenerate_then_use", title: "not when the new response answers another query", events: () => [shown(0, "r1"), on("regenerate", 10, "r1"), shown(12, "r2", "q-9"), on("accept", 40, "r2", {}, { qid: "q-9" })] },
  { rule: "reformulation", title: "reformulation: negative for the previous response", events: () => [shown(0, "r1"), reformulation(20, "r1", "reformulation", "substitution")], weight: 0.8, target: "r1" },
  { rule: "reformulation", title: "a spelling fix weighs half", events: () => [shown(0, "r1"), reformulation(20, "r1", "reformulation", "spelling_correction")], weight: 0.4, target: "r1" },
  { rule: "reformulation", title: "not a clarification", events: () => [shown(0, "r1"), reformulation(20, "r1", "clarification", "words_added")] },
  { rule: "reformulation", title: "not a new topic", events: () => [shown(0, "r1"), reformulation(20, "r1", "new_topic", "new_topic")] },
  { rule: "reformulation", title: "not after a ranked list", events: () => [...list(0, ["r1", "r2"]), reformulation(20, "r2", "reformulation", "substitution")] },
  { rule: "reformulation", title: "not after a long read of the previous response", events: () => [shown(0, "r1"), on("dwell", 45, "r1", { dwell_ms: 45_000 }), reformulation(50, "r1", "reformulation", "substitution")] },
  {
    rule: "click_satisfied",
    title: "long dwell after a click at rank 3: 0.7 / P(3)",
    events: () => [...list(0, ["r1", "r2", "r3"]), on("click", 5, "r3", { position: 3 }), on("dwell", 50, "r3", { dwell_ms: 45_000 })],
    weight: 0.7 / 0.48,
    target: "r3",
  },
  {
    rule: "click_satisfied",
    title: "rank 9: inverse propensity clipped at 5",
    events: () => [...list(0, ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]), on("click", 5, "r9", { position: 9 }), on("dwell", 50, "r9", { dwell_ms: 45_000 })],
    weight: 3.5,
    target: "r9",
  },
  { rule: "click_satisfied", title: "not a 20 s dwell", events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r1", { position: 1 }), on("dwell", 25, "r1", { dwell_ms: 20_000 })] },
  {
    rule: "click_last",
    title: "the session's last click, 20 s dwell: satisfied at session end",
    events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r2", { position: 2 }), on("dwell", 25, "r2", { dwell_ms: 20_000 })],
    close: true,
    weight: 0.5 / 0.61,
    target: "r2",
  },
  { rule: "click_last", title: "not before the session ends", events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r2", { position: 2 }), on("dwell", 25, "r2", { dwell_ms: 20_000 })] },
  { rule: "click_last", title: "not a quick back", events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r2", { position: 2 }), on("dwell", 9, "r2", { dwell_ms: 4000 })], close: true },
  { rule: "click_last", title: "not when the dwell already decided it", events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r2", { position: 2 }), on("dwell", 50, "r2", { dwell_ms: 45_000 })], close: true },
  {
    rule: "click_last",
    title: "only the last click of the session",
    events: () => [...list(0, ["r1", "r2"]), on("click", 5, "r1", { position: 1 }), on("dwell", 25, "r1", { dwell_ms: 20_000 }), on("click", 30, "r2", { position: 2 })],
    close: true,
    weight: 0.5 / 0.61,
    target: "r2",
  },
  { rule: "click_skip_above", title: "click at rank 3 with nothing clicked above: 3 over 2", events: () => [...list(0, ["r1", "r2", "r3"]), on("click", 5, "r3", { position: 3 })], weight: 0.5, target: ["r3", "r2"] },
  { rule: "click_skip_above", title: "not when a result above was clicked first", events: () => [...list(0, ["r1", "r2", "r3"]), on("click", 3, "r1", { position: 1 }), on("click", 5, "r3", { position: 3 })] },
  { rule: "click_skip_above", title: "not a click at rank 1", events: () => [...list(0, ["r1", "r2", "r3"]), on("click", 5, "r1", { position: 1 })] },
  { rule: "abandon_unread", title: "abandoned after a glance", events: () => [shown(0, "r1"), on("dwell", 3, "r1", { dwell_ms: 3000 }), on("abandon", 5, "r1")], weight: 0.3, target: "r1" },
  { rule: "abandon_unread", title: "abandoned without any dwell", events: () => [shown(0, "r1"), on("abandon", 5, "r1")], weight: 0.3, target: "r1" },
  { rule: "abandon_unread", title: "good abandonment (read 40 s): unlabelled", events: () => [shown(0, "r1"), on("dwell", 40, "r1", { dwell_ms: 40_000 }), on("abandon", 42, "r1")] },
  { rule: "share", title: "share", events: () => [shown(0, "r1"), on("share", 40, "r1")], weight: 1, target: "r1" },
  { rule: "share", title: "not after a glance", events: () => [shown(0, "r1"), on("dwell", 2, "r1", { dwell_ms: 2000 }), on("share", 3, "r1")] },
  { rule: "read_long", title: "a single response read 45 s", events: () => [shown(0, "r1"), on("dwell", 45, "r1", { dwell_ms: 45_000 })], weight: 0.5, target: "r1" },
  { rule: "read_long", title: "not 20 s", events: () => [shown(0, "r1"), on("dwell", 20, "r1", { dwell_ms: 20_000 })] },
  { rule: "read_long", title: "not a ranked result (that is click_dwell's job)", events: () => [...list(0, ["r1"]), on("dwell", 45, "r1", { dwell_ms: 45_000 })] },
  { rule: "read_short", title: "a single response left after 2 s", events: () => [shown(0, "r1"), on("dwell", 2, "r1", { dwell_ms: 2000 })], weight: 0.5, target: "r1" },
  { rule: "read_short", title: "not 20 s", events: () => [shown(0, "r1"), on("dwell", 20, "r1", { dwell_ms: 20_000 })] },
  { rule: "session_satisfied", title: "a session with a completed task", events: () => [shown(0, "r1"), on("task_complete", 40, "r1")], close: true, weight: 2 },
  { rule: "session_satisfied", title: "not before the watermark passes its end + gap", events: () => [shown(0, "r1"), on("task_complete", 40, "r1")] },
  {
    rule: "session_dissatisfied",
    title: "a session of a regenerated, glanced-at response",
    events: () => [shown(0, "r1"), on("dwell", 2, "r1", { dwell_ms: 2000 }), on("regenerate", 3, "r1")],
    close: true,
    weight: 1.5,
  },
  { rule: "session_dissatisfied", title: "not a satisfied session", events: () => [shown(0, "r1"), on("task_complete", 40, "r1")], close: true },
];

for (const c of CASES) {
  test(`rule ${c.rule}: ${c.title}`, async () => {
    const { labels: ls } = await run(c.events(), { close: c.close === true });
    const mine = ls.filter((l) => l.rule === c.rule);
    if (c.weight === undefined) {
      assert.deepEqual(mine, [], `${c.rule} must not fire`);
      return;
    }
    assert.equal(mine.length, 1, `${c.rule} fires once: ${JSON.stringify(ls.map((l) => l.rule))}`);
    const l = mine[0]!;
    assert.ok(near(l.weight, c.weight), `weight ${l.weight}, expected ${c.weight}`);
    if (typeof c.target === "string") {
      assert.equal(l.kind, "response");
      assert.equal(l.response_id, c.target);
    } else if (c.target) {
      assert.equal(l.kind, "preference");
      assert.deepEqual([l.chosen_response_id, l.rejected_response_id], c.target);
    }
    assert.ok(!l.signals.some((s) => (s.event_type as string) === "explicit_feedback"));
  });
}

test("every default rule has a table case that fires it and one that must not", () => {
  const rules = (readFileSync(join(ROOT, "config/label-rules.yaml"), "utf8").match(/^ {2}- name: (\w+)/gm) ?? []).map((m) => m.split(": ")[1]!);
  assert.ok(rules.length >= 16);
  for (const r of rules) {
    assert.ok(CASES.some((c) => c.rule === r && c.weight !== undefined), `${r}: a case that fires`);
    assert.ok(CASES.some((c) => c.rule === r && c.weight === undefined), `${r}: a case that must not fire`);
  }
});

// ---------------------------------------------------------------------------------------------
// Label contents, revisions, preference signals

test("a label carries the deciding signal, deterministic id, event time and emitted_at from the stream time", async () => {
  const envs = [shown(0, "r1"), on("accept", 35, "r1")];
  const { labels: ls } = await run(envs);
  const accept = ls.find((l) => l.rule === "accept")!;
  assert.equal(accept.label_id, labelId("feedback", "response", ["r1"], "accept"));
  assert.deepEqual(accept, {
    schema_version: 2,
    label_id: accept.label_id,
    revision: 0,
    pipeline: "feedback",
    kind: "response",
    response_id: "r1",
    query_id: "q-1",
    session_id: "s-1",
    user: ALICE,
    label: "positive",
    weight: 1,
    rule: "accept",
    rule_version: 4,
    signals: [{ event_id: envs[1]!.event.event_id, event_type: "accept" }],
    event_time: "2026-01-01T10:00:35.000Z",
    // The harness stores each input at its event time: emitted_at is when the deciding input was stored.
    emitted_at: "2026-01-01T10:00:35.000Z",
    // A single response: no position, nothing to correct for.
    propensity: 1,
  });
  assert.notEqual(labelId("feedback", "response", ["r1"], "accept"), labelId("feedback", "response", ["r1"], "copy"));
  assert.notEqual(labelId("feedback", "response", ["r1"], "accept"), labelId("other", "response", ["r1"], "accept"));
});

test("labels v2: position, propensity, model and the user's context (event context, enrich's cohort, device) of the labelled response's earliest event; schema_version 1 publishes the v1 view", async () => {
  const ctx = (variant: string, device: string, cohort: string): Partial<TacitEvent> => ({ context: { device, experiment: { id: "exp-1", variant } }, cohort });
  const withCtx = (env: Envelope, c: Partial<TacitEvent>): Envelope => ({ ...env, event: { ...env.event, ...c } });
  const shownList = list(0, ["a", "b", "c"]).map((env) => withCtx({ ...env, event: { ...env.event, payload: { ...env.event.payload, model: "ranker-7" } } }, ctx("B", "mobile", "new")));
  // A later click carries another context: the response's earliest event decides, whatever the arrival order.
  const click = withCtx(on("click", 10, "c", { position: 3 }), ctx("A", "desktop", "old"));
  const dwell = on("dwell", 80, "c", { dwell_ms: 70_000 });
  for (const order of [[...shownList, click, dwell], [click, ...shownList, dwell]]) {
    const { labels: ls } = await run(order, { close: true });
    const resp = ls.filter((l) => l.kind === "response" && l.response_id === "c");
    assert.ok(resp.length > 0, "the click on c makes labels");
    for (const l of resp) {
      assert.equal(l.schema_version, 2);
      assert.deepEqual([l.position, l.propensity, l.model, l.experiment, l.cohort, l.device], [3, 0.48, "ranker-7", { id: "exp-1", variant: "B" }, "new", "mobile"], l.rule);
    }
    // (A click before its list arrives cannot tell what it skipped: no preference then.)
    const pref = ls.find((l) => l.kind === "preference");
    assert.ok(pref || order[0] === click, "a click below skipped results makes a preference");
    if (pref) assert.deepEqual([pref.position, pref.propensity, pref.model], [3, 0.48, "ranker-7"]);
    const sess = ls.find((l) => l.kind === "session");
    if (sess) assert.deepEqual([sess.position, sess.propensity, sess.experiment?.variant, sess.device], [undefined, undefined, "B", "mobile"]);
  }
  const { labels: v1 } = await run([...shownList, click, dwell], { close: true, config: { schema_version: 1 } });
  assert.ok(v1.length > 0);
  for (const l of v1) {
    assert.equal(l.schema_version, 1);
    assert.ok(validateLabelV1(l), JSON.stringify(validateLabelV1.errors));
  }
});

/** A rules file with one rule (YAML of the rule's body, indented by 4). */
function rulesFile(body: string): string {
  const file = join(mkdtempSync(join(tmpdir(), "tacit-ld-")), "rules.yaml");
  writeFileSync(file, `version: 1\nrules:\n  - name: ${body.trimStart()}`);
  return file;
}

test("a second copy of the same response re-emits the same label_id with revision 1 and the summed weight", async () => {
  const envs = [shown(0, "r1"), on("copy_paste", 30, "r1", { span_length: 200 }), on("copy_paste", 60, "r1", { span_length: 400 })];
  // The default copy rule without its baseline, so the sum is plain.
  const file = rulesFile(`copy
    version: 1
    signal: copy_paste
    kind: response
    target: response
    label: positive
    weight:
      base: 1
      factors:
        - { field: copied_share, scale: 1.4, offset: 0.4, min: 0.5, max: 1.5 }
      max: 2
`);
  const { h } = await run(envs, { config: { rules_file: file } });
  const copies = labels(h).filter((l) => l.rule === "copy");
  assert.deepEqual(copies.map((l) => l.revision), [0, 1]);
  assert.equal(copies[0]!.label_id, copies[1]!.label_id);
  assert.ok(near(copies[0]!.weight, 0.4 + 1.4 * 0.2));
  assert.ok(near(copies[1]!.weight, 0.4 + 1.4 * 0.2 + 0.4 + 1.4 * 0.4));
  assert.deepEqual(copies[1]!.signals.map((s) => s.event_id), [envs[1]!.event.event_id, envs[2]!.event.event_id]);
  // The features hold the latest revision's weight, not the sum of both revisions.
  const f = await readFeatures(h.state, "feedback", "response", "r1");
  assert.ok(near(f!.fields.pos_weight as number, copies[1]!.weight));
});

test("a repeated event (same event_id) does not revise a label", async () => {
  const copy = on("copy_paste", 30, "r1", { span_length: 600 });
  const again: Envelope = { ...copy, src: { seq: copy.src.seq + 50_000 } };
  const { h } = await run([shown(0, "r1"), copy, again]);
  assert.deepEqual(labels(h).filter((l) => l.rule === "copy").map((l) => l.revision), [0]);
});

test("regenerate then accept: the preference carries the regenerate and the accept as its signals", async () => {
  const envs = [shown(0, "r1"), on("regenerate", 10, "r1"), shown(12, "r2"), on("accept", 45, "r2")];
  const { labels: ls } = await run(envs);
  const pref = ls.find((l) => l.kind === "preference")!;
  assert.deepEqual(pref.signals, [
    { event_id: envs[1]!.event.event_id, event_type: "regenerate" },
    { event_id: envs[3]!.event.event_id, event_type: "accept" },
  ]);
  assert.equal(pref.query_id, "q-1");
  assert.equal(pref.label, undefined);
  // The old response got its own negative; the new one no positive of its own (the default rules
  // make none about a response that replaced a regenerated one), only the pair.
  assert.deepEqual(ls.filter((l) => l.kind === "response").map((l) => [l.rule, l.response_id]).sort(), [["regenerate", "r1"]]);
});

test("click below skipped results: with the default skipped_previous, one pair; skipped_above gives one pair per skipped result", async () => {
  const envs = () => [...list(0, ["r1", "r2", "r3", "r4"]), on("click", 5, "r4", { position: 4 })];
  const { labels: ls } = await run(envs());
  assert.deepEqual(ls.filter((l) => l.kind === "preference").map((l) => [l.chosen_response_id, l.rejected_response_id]), [["r4", "r3"]]);
  const file = rulesFile("skip_all\n    version: 1\n    signal: click\n    kind: preference\n    target: skipped_above\n    weight: 0.5\n");
  const all = await run(envs(), { config: { rules_file: file } });
  assert.deepEqual(all.labels.map((l) => [l.chosen_response_id, l.rejected_response_id]).sort(), [["r4", "r1"], ["r4", "r2"], ["r4", "r3"]]);
});

test("good vs bad abandonment", async () => {
  const good = await run([shown(0, "r1"), on("dwell", 40, "r1", { dwell_ms: 40_000, scroll_depth: 0.9 }), on("abandon", 42, "r1")]);
  assert.deepEqual(good.labels.filter((l) => l.label === "negative"), []);
  assert.ok(good.labels.every((l) => l.rule !== "abandon_unread"));
  const bad = await run([shown(0, "r1"), on("dwell", 4, "r1", { dwell_ms: 4000 }), on("abandon", 6, "r1")]);
  assert.deepEqual(bad.labels.filter((l) => l.kind === "response").map((l) => [l.rule, l.label]).sort(), [["abandon_unread", "negative"], ["read_short", "negative"]]);
  // Abandonment is never positive, whatever the dwell.
  for (const r of [good, bad]) assert.ok(!r.labels.some((l) => l.label === "positive" && l.signals.some((s) => s.event_type === "abandon")));
});

test("per-user baselines: a habitual regenerator's regenerations weigh less; the baseline-free features keep the full weight", async () => {
  const envs: Envelope[] = [];
  for (let i = 0; i < 30; i++) envs.push(shown(i * 60, `r${i}`, `q${i}`), on("regenerate", i * 60 + 20, `r${i}`, {}, { qid: `q${i}` }));
  const { h, labels: ls } = await run(envs);
  const regen = ls.filter((l) => l.rule === "regenerate").sort((a, b) => a.event_time.localeCompare(b.event_time));
  assert.equal(regen.length, 30);
  assert.equal(regen[0]!.weight, 1, "a new user is at the prior: no discount");
  const last = regen[regen.length - 1]!;
  assert.ok(last.weight < 0.35 && last.weight >= 0.2, `habitual regenerator's weight ${last.weight}`);
  const f = await readFeatures(h.state, "feedback", "response", last.response_id!);
  assert.ok(near(f!.fields.neg_weight as number, last.weight));
  assert.equal(f!.fields.neg_weight_nobase, 1);
  const u = await readFeatures(h.state, "feedback", "user", ALICE);
  assert.ok((u!.fields.regenerate_rate as number) > 0.7);
  assert.ok(near(u!.fields.baseline_regenerate as number, 0.2));
  // Another user's first regenerate is not affected by Alice's habits.
  const other = await run([shown(0, "x1", "qx", { user: BOB }), on("regenerate", 20, "x1", {}, { user: BOB, qid: "qx" })]);
  assert.equal(other.labels.find((l) => l.rule === "regenerate")!.weight, 1);
});

test("per-user dwell baseline: a fast reader's 5 s read is not a glance", async () => {
  const envs: Envelope[] = [];
  // A fast reader: their reads take 8 s (smoothed with 5 reads at the 30 s prior: about 11.7 s).
  for (let i = 0; i < 25; i++) envs.push(shown(i * 60, `f${i}`, `q${i}`), on("dwell", i * 60 + 8, `f${i}`, { dwell_ms: 8000 }, { qid: `q${i}` }));
  envs.push(shown(2000, "r-last", "q-last"), on("dwell", 2005, "r-last", { dwell_ms: 5000 }, { qid: "q-last" }), on("accept", 2031, "r-last", {}, { qid: "q-last" }));
  const { h, labels: ls } = await run(envs);
  // 5 s is under 10 s but not under a third of this user's usual dwell: not read_short; the accept counts.
  assert.ok(!ls.some((l) => l.response_id === "r-last" && l.rule === "read_short"));
  assert.ok(ls.some((l) => l.response_id === "r-last" && l.rule === "accept"));
  // Judged against the population's 30 s, the same read is a glance: the baseline-free features say so.
  const f = await readFeatures(h.state, "feedback", "response", "r-last");
  assert.deepEqual([f!.fields.pos_weight, f!.fields.neg_weight, f!.fields.pos_weight_nobase, f!.fields.neg_weight_nobase], [1, 0, 0, 0.5]);
});

test("ambivalent users get features and metrics but no labels", async () => {
  const o = { band: "ambivalent" as const };
  const { h } = await run([shown(0, "r1", "q-1", o), on("copy_paste", 30, "r1", { span_length: 900 }, o), on("task_complete", 40, "r1", {}, o)], { close: true });
  assert.deepEqual(labels(h), []);
  assert.ok(h.metric("label_inputs_unlabelled") >= 3);
  const u = await readFeatures(h.state, "feedback", "user", ALICE);
  assert.equal(u!.fields.count_copy_paste, 1);
  assert.equal(u!.fields.bot_band, "ambivalent");
  assert.equal(u!.fields.bot_score, 0.5);
  const r = await readFeatures(h.state, "feedback", "response", "r1");
  assert.equal(r!.fields.signal_count, 2);
  assert.equal(r!.fields.pos_weight, undefined);
});

test("explicit feedback never produces a label; it is counted in the features", async () => {
  const { h } = await run([shown(0, "r1"), on("explicit_feedback", 30, "r1", { rating: "up" }), on("explicit_feedback", 31, "r1", { rating: 1 })], { close: true });
  const ls = labels(h);
  assert.deepEqual(ls.filter((l) => l.kind !== "session"), []);
  for (const l of ls) assert.ok(!l.signals.some((s) => (s.event_type as string) === "explicit_feedback"));
  const r = await readFeatures(h.state, "feedback", "response", "r1");
  assert.equal(r!.fields.explicit_up, 1);
  assert.equal(r!.fields.explicit_down, 1);
  assert.equal(r!.fields.signal_count, undefined, "explicit feedback is not a signal");
});

test("inputs without a bot verdict produce no labels (bot-score must run first)", async () => {
  const envs = [shown(0, "r1"), on("accept", 35, "r1")];
  for (const x of envs) delete x.attrs.bot;
  const { h } = await run(envs);
  assert.deepEqual(labels(h), []);
});

// ---------------------------------------------------------------------------------------------
// Sessions at the watermark

test("session labels are decided when the watermark passes the last event + session_gap, then the state is cleaned", async () => {
  const h = harness({ session_gap: "10m" });
  await h.push(0, [shown(0, "r1"), on("task_complete", 40, "r1")]);
  assert.deepEqual(labels(h).filter((l) => l.kind === "session"), []);
  await h.advanceWatermark(0, T0 + 40 * SEC + 10 * MIN);
  assert.deepEqual(labels(h).filter((l) => l.kind === "session"), [], "not at exactly end + gap");
  await h.advanceWatermark(0, T0 + 40 * SEC + 10 * MIN + 1);
  const s = labels(h).filter((l) => l.kind === "session");
  assert.equal(s.length, 1);
  assert.deepEqual([s[0]!.rule, s[0]!.label, s[0]!.session_id, s[0]!.revision, s[0]!.response_id, s[0]!.event_time], ["session_satisfied", "positive", "s-1", 0, "r1", "2026-01-01T10:00:40.000Z"]);
  const timers = partitionKey("feedback", "label-derive", 0, "timers");
  const f = await readFeatures(h.state, "feedback", "session", "s-1");
  assert.deepEqual([f!.fields.events, f!.fields.count_task_complete, f!.fields.duration_ms, f!.fields.pos_weight], [2, 1, 40_000, 2]);
  // The decided session is kept one more gap (for late events), then forgotten, and its timer removed.
  const forget = T0 + 40 * SEC + 20 * MIN + 1;
  assert.deepEqual(await h.state.zrangeByScore(timers, -Infinity, Infinity), [{ member: ALICE, score: forget }]);
  await h.advanceWatermark(0, forget);
  assert.deepEqual(await h.state.zrangeByScore(timers, -Infinity, Infinity), []);
  const stored = await storedState<{ sess: { id: string }[] }>(h.state, ALICE);
  assert.deepEqual(stored.state.sess.map((x) => x.id), [], "decided sessions forgotten");
  assert.equal(stored.applied, 2, "the guard: the last input applied");
  assert.equal(labels(h).filter((l) => l.kind === "session").length, 1);
});

test("a late event of a decided session revises its session label (same label_id, revision 1)", async () => {
  const h = harness({ session_gap: "10m" });
  await h.push(0, [shown(0, "r1"), on("task_complete", 40, "r1")]);
  await h.advanceWatermark(0, T0 + 11 * MIN);
  // Late, within sessionize's allowed lateness: it still carries the session's id.
  await h.push(0, [on("share", 50, "r1")]);
  await h.advanceWatermark(0, T0 + 25 * MIN);
  const s = labels(h).filter((l) => l.kind === "session");
  assert.deepEqual(s.map((l) => [l.rule, l.revision, l.weight]), [["session_satisfied", 0, 2], ["session_satisfied", 1, 3]]);
  assert.equal(s[0]!.label_id, s[1]!.label_id);
  assert.equal(h.metric("label_sessions_reopened"), 1);
});

test("a late event in the same batch as the input that passed its session's deadline: same revisions whatever the batch size", async () => {
  const envs = () => [
    shown(0, "r1"),
    on("task_complete", 40, "r1"),
    shown(40 + 11 * 60, "b1", "qb", { user: BOB }),
    // Alice, late: event time inside her session, arriving after Bob moved the watermark past its deadline.
    on("share", 50, "r1"),
  ];
  const sessionLabels = async (batchSize: number) => {
    const h = harness({ session_gap: "10m" });
    await h.push(0, envs(), { batchSize });
    await h.advanceWatermark(0, T0 + 3600 * SEC);
    return labels(h).filter((l) => l.kind === "session" && l.user === ALICE).map((l) => [l.revision, l.weight]);
  };
  const one = await sessionLabels(1);
  assert.deepEqual(one, [[0, 2], [1, 3]]);
  assert.deepEqual(await sessionLabels(4), one);
});

test("sessions of several users in one partition close from their timers, whether or not the user is in the batch", async () => {
  const h = harness({ session_gap: "10m" });
  await h.push(0, [shown(0, "a1", "qa"), on("task_complete", 30, "a1", {}, { qid: "qa" }), shown(60, "b1", "qb", { user: BOB }), on("task_complete", 90, "b1", {}, { user: BOB, qid: "qb" })], { batchSize: 2 });
  // Alice's session is due first; an input of Bob's moves the watermark past it.
  await h.push(0, [on("share", 11 * 60, "b1", {}, { user: BOB, qid: "qb" })]);
  assert.deepEqual(labels(h).filter((l) => l.kind === "session").map((l) => l.user), [ALICE]);
  await h.advanceWatermark(0, T0 + 3600 * SEC);
  assert.deepEqual(labels(h).filter((l) => l.kind === "session").map((l) => l.user).sort(), [ALICE, BOB].sort());
});

test("one processor serving two partitions: another partition's batch between a batch and its commit changes nothing", async () => {
  const store = new MemoryStateStore();
  const noop = (): void => {};
  const log = { debug: noop, info: noop, warn: noop, error: noop };
  const ctx = { pipeline: "feedback", prefix: "feedback", stage: "label-derive", partitions: 2, state: store, clock: new ManualClock(T0), log, metrics: { count: noop }, env: {}, devMode: true };
  const proc = await labelDerive.create({ session_gap: "10m" }, ctx);
  assert.ok(isKeyedProcessor(proc));
  // The worker's way: one KeyedChain and StageState per partition, the processor shared.
  const chain = (partition: number) =>
    new KeyedChain([{ name: "label-derive", proc, state: new StageState(store, "feedback", "label-derive", partition, proc.codec, log), counters: { count: noop }, clock: new ManualClock(T0) }], partition);
  const items = (envs: Envelope[], partition: number) =>
    envs.map((env, i) => ({ msg: i, input: { seq: i + 1, subject: "x", data: new Uint8Array(), envelope: { ...env, partition }, deliveries: 1, stream_time_ms: env.event.ts, watermark_ms: env.event.ts, partition } as KeyedInput }));
  const [c0, c1] = [chain(0), chain(1)];
  // Partition 0: Alice's whole session in one batch, whose final watermark passes its end + gap; partition 1: Bob, in between.
  const r0 = [emptyResult(), emptyResult()];
  const t0 = emptyResult();
  await c0.run(items([shown(0, "a1", "qa"), on("task_complete", 30, "a1", {}, { qid: "qa" })], 0), T0 + 15 * MIN, r0, t0);
  const r1 = [emptyResult()];
  const t1 = emptyResult();
  await c1.run(items([shown(5, "b1", "qb", { user: BOB, session: "s-b" })], 1), T0 + 5 * SEC, r1, t1);
  const session = t0.emits.filter((x) => x.emit.to === "labels.session").map((x) => x.emit.value as Label);
  assert.deepEqual(session.map((l) => [l.user, l.rule, l.weight]), [[ALICE, "session_satisfied", 2]]);
  assert.deepEqual(t1.emits, []);
  await store.commit([...c0.takeCommits(r0, t0, T0).flat(), ...c1.takeCommits(r1, t1, T0).flat()]);
  const alice = await storedState<{ resp: { id: string }[]; sess: { closed: boolean }[] }>(store, ALICE);
  assert.deepEqual(alice.state.resp.map((r) => r.id), ["a1"], "the batch's changes and the timer's land together");
  assert.deepEqual(alice.state.sess.map((x) => x.closed), [true]);
  const bob = await storedState<{ resp: { id: string }[]; sess: { closed: boolean }[] }>(store, BOB);
  assert.deepEqual([bob.state.resp.map((r) => r.id), bob.state.sess.map((x) => x.closed)], [["b1"], [false]]);
  assert.equal((await readFeatures(store, "feedback", "session", "s-1"))!.fields.pos_weight, 2, "the session's weights, released at its close");
});

// ---------------------------------------------------------------------------------------------
// Features

test("features: per response, user and session, with TTLs, findable by id", async () => {
  const wall = { t: 0 };
  const h = new OperatorHarness(labelDerive, { ...NO_PROBATION, feature_ttl: { response: "1d" } }, { stage: "label-derive", prefix: "feedback", storeNow: () => wall.t });
  await h.push(0, [...list(0, ["r1", "r2"]), on("click", 5, "r2", { position: 2 }), on("dwell", 50, "r2", { dwell_ms: 45_000 }), on("copy_paste", 60, "r2", { span_length: 250 })]);
  const r2 = await readFeatures(h.state, "feedback", "response", "r2");
  assert.equal(r2!.user, ALICE);
  assert.equal(r2!.fields.position, 2);
  assert.equal(r2!.fields.signal_count, 3);
  assert.equal(r2!.fields.query_id, "q-1");
  const click = 0.7 / 0.61;
  const copy = 0.4 + 1.4 * 0.5;
  assert.ok(near(r2!.fields.pos_weight as number, click + copy), String(r2!.fields.pos_weight));
  assert.equal(r2!.fields.neg_weight, 0);
  const u = await readFeatures(h.state, "feedback", "user", ALICE);
  assert.deepEqual([u!.fields.count_response_shown, u!.fields.count_click, u!.fields.events], [2, 1, 5]);
  for (const k of ["accept_rate", "regenerate_rate", "edit_rate", "copy_rate", "dwell_ewma_ms", "bot_score", "baseline_accept", "baseline_regenerate"]) assert.equal(typeof u!.fields[k], "number", k);
  // Every field written is documented.
  for (const [entity, rec] of [["response", r2], ["user", u], ["session", await readFeatures(h.state, "feedback", "session", "s-1")]] as const) {
    for (const k of Object.keys(rec!.fields)) assert.ok(fieldNames(entity).includes(k), `${entity}.${k} is not in FEATURE_FIELDS`);
  }
  // Response features expire after feature_ttl.response; the user's after feature_ttl.user.
  wall.t = 2 * 86_400_000;
  assert.equal(await readFeatures(h.state, "feedback", "response", "r2"), null);
  assert.notEqual(await readFeatures(h.state, "feedback", "user", ALICE), null);
});

test("a warm cache reads each user's state once, not per batch; every commit group stays within one hash tag", async () => {
  const h = harness();
  const envs: Envelope[] = [];
  for (let i = 0; i < 20; i++) envs.push(shown(i * 10, `r${i}`, `q${i}`, { user: i % 2 ? ALICE : BOB }), on("accept", i * 10 + 5, `r${i}`, {}, { user: i % 2 ? ALICE : BOB, qid: `q${i}` }));
  // 4 batches of the same two users: one read for the first (both users, one round trip), none after.
  await h.push(0, envs, { batchSize: 10 });
  assert.deepEqual([h.stateCalls.get, h.stateCalls.zrangeByScore], [1, 1]);
  assert.equal(h.stateCalls.hgetall + h.stateCalls.hgetallMany, 0, "label-derive never reads its features back");
  // A restarted worker reads them again, once.
  await h.restart();
  await h.push(0, [on("share", 300, "r19", {}, { user: ALICE, qid: "q19" }), on("share", 301, "r18", {}, { user: BOB, qid: "q18" })]);
  assert.deepEqual([h.stateCalls.get, h.stateCalls.zrangeByScore], [2, 2]);
  assert.deepEqual(labels(h).filter((l) => l.rule === "share").map((l) => l.response_id), ["r19", "r18"], "the state read back serves the new inputs");
});

// ---------------------------------------------------------------------------------------------
// Probation: labels wait until the user is settled as human; bot-score's flag drops them

const PROBATION = (minEvents = 20): LabelDeriveConfig => ({ session_gap: "10m", probation: { enabled: true, min_events: minEvents } });
/** Labels as a consumer compares them across runs: everything but emitted_at. */
const content = (ls: Label[]) => ls.map(({ emitted_at: _e, ...rest }) => rest);

test("probation: labels are held until the user's min_events-th event, then released with the ids, revisions and weights they would have had", async () => {
  const envs = [
    shown(0, "r1"),
    on("copy_paste", 10, "r1", { span_length: 600 }),
    on("copy_paste", 20, "r1", { span_length: 300 }),
    shown(30, "r2", "q-2"),
    on("accept", 60, "r2", {}, { qid: "q-2" }),
    on("share", 90, "r2", {}, { qid: "q-2" }),
  ];
  const free = harness({ session_gap: "10m" });
  await free.push(0, structuredClone(envs));
  const expected = labels(free);
  assert.deepEqual(expected.map((l) => [l.rule, l.revision]), [["copy", 0], ["copy", 1], ["accept", 0], ["share", 0]]);

  const h = harness(PROBATION(5));
  await h.push(0, structuredClone(envs.slice(0, 4)));
  assert.deepEqual(labels(h), [], "nothing before the 5th event");
  assert.equal(h.metric("labels_held"), 2);
  const before = await readFeatures(h.state, "feedback", "response", "r1");
  assert.equal(before!.fields.signal_count, 2, "event features are written at once");
  assert.equal(before!.fields.pos_weight, undefined, "label weights wait for the release");

  await h.push(0, structuredClone(envs.slice(4, 5)));
  const released = labels(h);
  assert.deepEqual(content(released), content(expected.slice(0, 3)), "the held revisions and the 5th event's own label, as they would have been");
  // Released by the 5th input: dated by its stream time (the harness stores inputs at their event time).
  assert.deepEqual(released.map((l) => l.emitted_at), Array(3).fill(envs[4]!.event.timestamp));
  assert.deepEqual(await readFeatures(h.state, "feedback", "response", "r1"), await readFeatures(free.state, "feedback", "response", "r1"));

  // Settled: the next label goes out at once.
  await h.push(0, structuredClone(envs.slice(5)));
  assert.deepEqual(content(labels(h)), content(expected));
  assert.equal(labels(h)[3]!.emitted_at, expected[3]!.emitted_at);
  assert.equal(h.metric("label_users_settled"), 1);
});

test("probation: a human with 3 events gets labels when the watermark closes the session, dated by the input that moved it past, whatever the batches", async () => {
  const alice = [shown(0, "r1"), on("accept", 32, "r1"), on("share", 40, "r1")];
  // Bob moves the watermark past Alice's end + gap (40 s + 10 min); Alice comes back in a new session.
  const rest = [shown(641, "b1", "qb", { user: BOB, session: "s-b" }), on("accept", 700, "b1", {}, { user: BOB, qid: "qb", session: "s-b" }), shown(720, "r9", "q-9", { session: "s-2" })];
  const free = harness({ session_gap: "10m" });
  await free.push(0, structuredClone(alice));
  const expected = labels(free);
  assert.ok(expected.length >= 2, JSON.stringify(expected.map((l) => l.rule)));

  const results: Label[][] = [];
  for (const batchSize of [1, 2, 3, 6]) {
    const h = harness(PROBATION());
    await h.push(0, structuredClone(alice), { batchSize });
    assert.deepEqual(labels(h), [], `batch ${batchSize}: held while the session is open`);
    await h.push(0, structuredClone(rest), { batchSize });
    const ls = labels(h).filter((l) => l.user === ALICE && l.kind !== "session");
    assert.deepEqual(content(ls), content(expected), `batch ${batchSize}: the labels the session would have had`);
    assert.ok(ls.every((l) => l.emitted_at === rest[0]!.event.timestamp), `batch ${batchSize}: emitted_at ${ls.map((l) => l.emitted_at)}`);
    results.push(labels(h));
  }
  for (const r of results.slice(1)) assert.deepEqual(r, results[0]);
  // Session labels decided at the close carry the same date.
  assert.ok(results[0]!.some((l) => l.kind === "session" && l.user === ALICE && l.emitted_at === rest[0]!.event.timestamp));

  // An idle advance (no input moved the watermark): dated by the session's last input.
  const idle = harness(PROBATION());
  await idle.push(0, structuredClone(alice));
  await idle.advanceWatermark(0, T0 + 3600 * SEC);
  assert.deepEqual(content(labels(idle).filter((l) => l.kind !== "session")), content(expected));
  assert.ok(labels(idle).every((l) => l.emitted_at === alice[2]!.event.timestamp));
});

test("probation: bot-score's flag drops the held labels; the user stays a bot (no labels, no label weights, bot_band bot)", async () => {
  const envs = [
    shown(0, "r1"),
    on("copy_paste", 10, "r1", { span_length: 600 }),
    on("accept", 31, "r1"),
    e("accept", 33, { rid: "r1", qid: "q-1", band: "bot" }),
    // Much later, after bot-score forgot the user: human again as far as bot-score knows.
    shown(4000, "r9", "q-9", { session: "s-9" }),
    on("accept", 4030, "r9", {}, { qid: "q-9", session: "s-9" }),
  ];
  const h = harness(PROBATION());
  await h.push(0, structuredClone(envs));
  await h.advanceWatermark(0, T0 + 86_400 * SEC);
  assert.deepEqual(labels(h), []);
  assert.equal(h.metric("labels_dropped_bot"), 2);
  assert.equal(h.metric("label_users_flagged"), 1);
  const u = await readFeatures(h.state, "feedback", "user", ALICE);
  assert.deepEqual([u!.fields.bot_band, u!.fields.bot_score, u!.fields.events], ["bot", 0.95, 5], "the marker is not an event of the user");
  for (const rid of ["r1", "r9"]) assert.equal((await readFeatures(h.state, "feedback", "response", rid))!.fields.pos_weight ?? 0, 0, rid);
  assert.equal((await readFeatures(h.state, "feedback", "session", "s-1"))!.fields.pos_weight ?? 0, 0);
  // The marker is not passed on: `next` carries the cleaned events.
  assert.deepEqual(h.outputs("next"), envs.filter((x) => !isBotMarker(x)));

  // Without probation the early labels are out before the flag; the flag retracts them and stops later ones.
  const free = harness({ session_gap: "10m" });
  await free.push(0, structuredClone(envs));
  await free.advanceWatermark(0, T0 + 86_400 * SEC);
  assert.deepEqual(labels(free).map((l) => [l.rule, l.response_id, l.revision, l.retracted ?? false]).sort(), [["accept", "r1", 0, false], ["accept", "r1", 1, true], ["copy", "r1", 0, false], ["copy", "r1", 1, true]]);
});

test("probation: an ambivalent event does not settle the user; the next human event does", async () => {
  const envs = [shown(0, "r1"), on("accept", 31, "r1"), on("dwell", 33, "r1", { dwell_ms: 30_000 }, { band: "ambivalent" }), on("share", 35, "r1")];
  const h = harness(PROBATION(3));
  await h.push(0, structuredClone(envs.slice(0, 3)));
  assert.deepEqual(labels(h), [], "3 events, the 3rd ambivalent: still on probation");
  await h.push(0, structuredClone(envs.slice(3)));
  assert.deepEqual(labels(h).map((l) => [l.rule, l.emitted_at]), [["accept", envs[3]!.event.timestamp], ["share", envs[3]!.event.timestamp]]);
});

test("probation through the whole chain: a regular-timing script makes no label, a human with 3 events gets them at session close", async () => {
  const t0 = Date.parse("2026-01-01T09:00:00Z");
  const at = (ms: number) => new Date(t0 + ms).toISOString();
  const lines: string[] = [];
  const raw = (user: string, n: number, ms: number, type: EventType, extra: Record<string, unknown> = {}) =>
    lines.push(JSON.stringify({ event_id: `${user}-${n}`, session_id: `${user}-s`, user_id: user, timestamp: at(ms), event_type: type, user_agent: "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36", ...extra }));
  // The script: query, response, accept, … every 2 s sharp (bot-score's regularity flags it at its 20th event).
  for (let i = 0; i < 45; i++) {
    const k = Math.floor(i / 3);
    const ids = { query_id: `bq${k}`, response_id: `br${k}` };
    if (i % 3 === 0) raw("script", i, i * 2000, "query", { query_id: `bq${k}`, payload: { text: `question number ${k}` } });
    else if (i % 3 === 1) raw("script", i, i * 2000, "response_shown", { ...ids, payload: { text_length: 800 } });
    else raw("script", i, i * 2000, "accept", ids);
  }
  raw("human", 0, 5_000, "query", { query_id: "hq", payload: { text: "how do I reset my password" } });
  raw("human", 1, 9_000, "response_shown", { query_id: "hq", response_id: "hr", payload: { text_length: 900 } });
  raw("human", 2, 40_000, "accept", { query_id: "hq", response_id: "hr" });
  const script = pseudonymize(DEV_PSEUDONYM_KEY, "script");
  const human = pseudonymize(DEV_PSEUDONYM_KEY, "human");

  const on_ = await runChain(lines, { partitions: 1 });
  assert.ok(on_.botUsers.has(script) && !on_.botUsers.has(human), "bot-score flags the script, not the human");
  assert.deepEqual(on_.labels.filter((l) => l.user === script), [], "no label from the script");
  const mine = on_.labels.filter((l) => l.user === human);
  assert.deepEqual(mine.filter((l) => l.kind === "response").map((l) => [l.rule, l.response_id]), [["accept", "hr"]]);
  // Released when the watermark closed the human's session (at the end of input here), not at the accept.
  assert.equal(on_.labelHarness.log.find((x) => x.input.envelope?.event.event_id === "human-2")!.outcome.emits.filter((x) => x.to.startsWith("labels.")).length, 0);

  // The same traffic without probation: the script's first events did become labels.
  const off = await runChain(lines, { partitions: 1, labelConfig: { probation: { enabled: false } } });
  assert.ok(off.labels.filter((l) => l.user === script).length > 0);
  assert.deepEqual(content(off.labels.filter((l) => l.user === human && l.kind === "response")), content(mine.filter((l) => l.kind === "response")));
});

/** One partition: Alice (3 events), Bob (6: settles at 5), Carol (4, then flagged, then more), Dave moving the watermark. */
function mixed(): Envelope[] {
  const A = { session: "s-a" };
  const B = { user: BOB, session: "s-b" };
  const carol = pseudonymize(DEV_PSEUDONYM_KEY, "carol");
  const dave = pseudonymize(DEV_PSEUDONYM_KEY, "dave");
  const C = { user: carol, session: "s-c" };
  const D = (s: string) => ({ user: dave, session: s });
  return [
    shown(0, "a1", "qa", A),
    shown(1, "b1", "qb", B),
    on("copy_paste", 10, "a1", { span_length: 600 }, { ...A, qid: "qa" }),
    shown(12, "c1", "qc", C),
    on("regenerate", 15, "b1", {}, { ...B, qid: "qb" }),
    shown(17, "b2", "qb", B),
    on("accept", 20, "c1", {}, { ...C, qid: "qc" }),
    on("accept", 30, "b2", {}, { ...B, qid: "qb" }),
    on("copy_paste", 31, "c1", { span_length: 400 }, { ...C, qid: "qc" }),
    on("share", 40, "a1", {}, { ...A, qid: "qa" }),
    shown(45, "c2", "qc2", C),
    e("query", 46, { user: carol, band: "bot" }),
    on("dwell", 50, "b2", { dwell_ms: 40_000 }, { ...B, qid: "qb" }),
    on("share", 60, "b2", {}, { ...B, qid: "qb" }),
    shown(300, "d1", "qd", D("s-d")),
    on("accept", 320, "b2", {}, { ...B, qid: "qb" }),
    shown(700, "d2", "qd2", D("s-d")),
    on("accept", 800, "c2", {}, { ...C, qid: "qc2" }),
    shown(1500, "d3", "qd3", D("s-d2")),
    on("accept", 1510, "d3", {}, { ...D("s-d2"), qid: "qd3" }),
  ];
}

test("probation is deterministic: batch sizes and crashes at every point give the same labels (emitted_at included) and state", async () => {
  const envs = mixed();
  const config = PROBATION(5);
  const base = await runAll(structuredClone(envs), { batchSize: 1, config });
  const users = new Set(base.ls.map((l) => l.user));
  assert.ok(users.has(ALICE) && users.has(BOB), "Alice (at the close) and Bob (settled) get labels");
  assert.ok(!users.has(pseudonymize(DEV_PSEUDONYM_KEY, "carol")), "Carol, flagged, gets none");
  assert.ok(base.h.metric("labels_dropped_bot") > 0 && base.h.metric("label_users_settled") > 0);
  const runs = [
    await runAll(structuredClone(envs), { batchSize: 2, config }),
    await runAll(structuredClone(envs), { batchSize: 3, config }),
    await runAll(structuredClone(envs), { batchSize: 7, config }),
    await runAll(structuredClone(envs), { batchSize: 100, config }),
    ...(await Promise.all((["before_commits", "mid_commits", "after_commits"] as const).map((at) => runAll(structuredClone(envs), { batchSize: 4, config, crashes: 3, crashAt: at })))),
  ];
  for (const [i, r] of runs.entries()) {
    assert.deepEqual([...r.emits.keys()].sort(), [...base.emits.keys()].sort(), `run ${i}: label ids`);
    for (const [k, v] of base.emits) assert.deepEqual(r.emits.get(k), v, `run ${i}: ${k}`);
    assert.deepEqual(r.state, base.state, `run ${i}: state and features`);
  }
});

test("lint: probation.min_events below bot-score's regularity.min_events is flagged", () => {
  const view = (regularity: Record<string, unknown> | undefined) => ({ stages: [{ name: "bot-score", operator: "bot-score", config: regularity ? { regularity } : {} }, { name: "label-derive", operator: "label-derive", config: {} }], index: 1 });
  const issues = labelDerive.lint!({ probation: { min_events: 10 } }, view(undefined));
  assert.deepEqual(issues.map((i) => i.path), [["probation", "min_events"]]);
  assert.match(issues[0]!.message, /probation\.min_events \(10\) is below bot-score's regularity\.min_events \(20\)/);
  assert.deepEqual(labelDerive.lint!({ probation: { min_events: 10 } }, view({ min_events: 10 })), []);
  assert.deepEqual(labelDerive.lint!({ probation: { min_events: 10 } }, view({ enabled: false })), []);
  assert.deepEqual(labelDerive.lint!({ probation: { enabled: false, min_events: 10 } }, view(undefined)), []);
  assert.deepEqual(labelDerive.lint!({}, view(undefined)), [], "the defaults agree");
});

// ---------------------------------------------------------------------------------------------
// Retraction: a flag withdraws what the user already published

/** bot-score's flag marker for a user, at `at` seconds (its indicators name the reason). */
const flagOf = (at: number, user = ALICE) => e("accept", at, { rid: "r9", qid: "q-9", user, band: "bot" });
const live = (ls: Label[]) => latest(ls).filter((l) => l.retracted !== true && l.weight > 0);

test("retraction: a flag retracts every label the user published (same label_id, next revision, weight 0, retracted) and takes back its feature contributions", async () => {
  const S2 = { session: "s-2" };
  const B = { user: BOB, session: "s-b" };
  const h = harness({ session_gap: "10m" });
  // Session s-1: a copy, a regenerate, an accept of the replacement (the preference), then another
  // question with an accepted answer (response labels; the session's net is positive: a session label).
  await h.push(0, [shown(0, "r1"), on("copy_paste", 10, "r1", { span_length: 600 }), on("regenerate", 15, "r1"), shown(17, "r2"), on("accept", 50, "r2"), shown(60, "r3", "q-3"), on("accept", 95, "r3", {}, { qid: "q-3" })]);
  // Bob's labels must stay; his events also move the watermark past s-1's end + 2 gaps (s-1 is forgotten, its labels kept for retraction).
  await h.push(0, [shown(1500, "b1", "qb", B), on("accept", 1540, "b1", {}, { ...B, qid: "qb" })]);
  await h.push(0, [shown(2000, "r9", "q-9", S2), on("accept", 2040, "r9", {}, { ...S2, qid: "q-9" }), on("dwell", 2045, "r9", { dwell_ms: 20_000 }, { ...S2, qid: "q-9" })]);
  const before = live(labels(h)).filter((l) => l.user === ALICE);
  assert.deepEqual([...new Set(before.map((l) => l.kind))].sort(), ["preference", "response", "session"], "every kind is published before the flag");
  assert.ok((await storedState<{ sess: { id: string }[] }>(h.state, ALICE)).state.sess.every((x) => x.id !== "s-1"), "s-1 was forgotten as a session");
  const bobBefore = await readFeatures(h.state, "feedback", "response", "b1");

  const marker = flagOf(2050);
  await h.push(0, [marker]);
  const all = labels(h);
  const retractions = all.filter((l) => l.retracted);
  assert.equal(retractions.length, before.length);
  for (const l of before) {
    const r = retractions.find((x) => x.label_id === l.label_id);
    assert.ok(r, `${l.rule} ${l.label_id} retracted`);
    const { revision, weight, emitted_at, retracted, retracted_reason, ...rest } = r;
    assert.deepEqual([revision, weight, emitted_at, retracted, retracted_reason], [l.revision + 1, 0, marker.event.timestamp, true, "bot: regularity"]);
    const { revision: _r, weight: _w, emitted_at: _e, ...was } = l;
    assert.deepEqual(rest, was, "the rest of the label as it was (ids, polarity, rule, signals, event_time)");
  }
  assert.deepEqual(live(all).filter((l) => l.user === ALICE), [], "the final view holds no label of the flagged user");
  assert.ok(live(all).some((l) => l.user === BOB), "other users' labels stay");
  assert.equal(h.metric("labels_retracted"), before.length);

  // Its contributions to the features are taken back in the same commit.
  for (const rid of ["r1", "r2", "r9"]) {
    const f = (await readFeatures(h.state, "feedback", "response", rid))!.fields;
    assert.deepEqual([f.pos_weight ?? 0, f.neg_weight ?? 0, f.pos_weight_nobase ?? 0, f.neg_weight_nobase ?? 0, f.signal_count ?? 0], [0, 0, 0, 0, 0], rid);
  }
  for (const sid of ["s-1", "s-2"]) {
    const f = (await readFeatures(h.state, "feedback", "session", sid))!.fields;
    assert.deepEqual([f.pos_weight ?? 0, f.neg_weight ?? 0], [0, 0], sid);
  }
  assert.deepEqual(await readFeatures(h.state, "feedback", "response", "b1"), bobBefore);

  // A second marker (bot-score forgot and flagged again) and later events retract and count nothing more.
  const features = await dump(h.state);
  await h.push(0, [flagOf(2060)]);
  assert.equal(labels(h).length, all.length, "no double retraction");
  const stored = (await storedState<Record<string, unknown>>(h.state, ALICE)).state;
  assert.deepEqual({ ...(await dump(h.state)), [`tacit:{feedback:u:${ALICE}}:label-derive:state`]: null }, { ...features, [`tacit:{feedback:u:${ALICE}}:label-derive:state`]: null });
  assert.ok(stored.bot);
  await h.push(0, [on("copy_paste", 2070, "r9", { span_length: 600 }, { ...S2, qid: "q-9" })]);
  assert.equal(labels(h).length, all.length);
  assert.equal((await readFeatures(h.state, "feedback", "response", "r9"))!.fields.signal_count, 0);
});

test("retraction with probation (hold): released labels are retracted, held ones dropped without a retraction", async () => {
  const B = { user: BOB, session: "s-b" };
  const S2 = { session: "s-2" };
  const h = harness(PROBATION());
  // Alice's first session is released when Bob moves the watermark past it; her second is held when the flag comes.
  await h.push(0, [shown(0, "r1"), on("accept", 35, "r1"), on("share", 40, "r1")]);
  await h.push(0, [shown(641, "b1", "qb", B), shown(700, "r2", "q-2", S2), on("accept", 735, "r2", {}, { ...S2, qid: "q-2" })]);
  const released = live(labels(h)).filter((l) => l.user === ALICE);
  assert.ok(released.length >= 2 && released.every((l) => l.session_id === "s-1"), JSON.stringify(released.map((l) => [l.rule, l.session_id])));
  await h.push(0, [flagOf(745)]);
  const retracted = labels(h).filter((l) => l.retracted);
  assert.deepEqual(retracted.map((l) => l.label_id).sort(), released.map((l) => l.label_id).sort(), "exactly the published ones");
  assert.equal(h.metric("labels_dropped_bot"), 1, "the held accept of r2 is dropped");
  assert.deepEqual(live(labels(h)).filter((l) => l.user === ALICE), []);
});

test("retraction reaches as far as the label state remembers: response_memory", async () => {
  const S2 = { session: "s-2" };
  const h = harness({ session_gap: "10m", response_memory: "1h" });
  await h.push(0, [shown(0, "r1"), on("accept", 35, "r1")]);
  // Two hours later: r1 (and session s-1) are past response_memory and forgotten.
  await h.push(0, [shown(7200, "r9", "q-9", S2), on("accept", 7240, "r9", {}, { ...S2, qid: "q-9" })]);
  await h.push(0, [flagOf(7250)]);
  const left = live(labels(h)).filter((l) => l.user === ALICE);
  assert.deepEqual(left.map((l) => [l.kind, l.response_id ?? null, l.session_id]).sort(), [["response", "r1", "s-1"], ["session", "r1", "s-1"]], "beyond the reach: not retracted");
  assert.ok(labels(h).some((l) => l.retracted && l.response_id === "r9"), "within it: retracted");
});

// ---------------------------------------------------------------------------------------------
// Determinism, redelivery, crashes — on realistic traffic from the simulator

let simInputs: Envelope[] | undefined;
/** Label-derive's inputs for a small simulated run (upstream stages run once, for all tests). */
async function simulatedInputs(): Promise<Envelope[]> {
  if (!simInputs) {
    const sim = simulate({ seed: 3, users: 40, durationMs: 3 * 3600_000, botFraction: 0.2 });
    const r = await runChain(sim.events, { partitions: 2 });
    simInputs = r.labelHarness.log.map((l) => l.input.envelope!);
  }
  return simInputs;
}

/** Everything in the store, for comparing two runs. */
async function dump(st: MemoryStateStore): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for (const k of st.keys()) {
    const [v] = await st.get([k]);
    out[k] = v ?? (await st.hgetall(k));
    if (Object.keys(out[k] as object).length === 0) out[k] = await st.zrangeByScore(k, -Infinity, Infinity);
  }
  return out;
}

async function runAll(envs: Envelope[], opts: { batchSize: number; crashes?: number; crashAt?: CrashPoint; config?: LabelDeriveConfig }) {
  const h = harness(opts.config ?? { probation: { enabled: true } }, { partitions: 2 });
  for (let p = 0; p < 2; p++) {
    const mine = envs.filter((x) => x.partition === p);
    let pos = 0;
    let round = 0;
    while (pos < mine.length) {
      const crash = opts.crashes && opts.crashAt && round < opts.crashes ? { batch: 1, at: opts.crashAt } : undefined;
      const res = await h.push(p, mine.slice(pos), { batchSize: opts.batchSize, ...(crash ? { crash } : {}) });
      pos += res.acked;
      round++;
      if (res.crashed) await h.restart();
    }
    await h.advanceWatermark(p, Date.parse("2027-01-01T00:00:00Z"));
  }
  const ls = labels(h);
  return { h, ls, emits: new Map(ls.map((l) => [`${l.label_id}:${l.revision}`, l])), state: await dump(h.state) };
}

test("determinism: the same inputs in different batch sizes give identical labels and identical state and features", async () => {
  const envs = await simulatedInputs();
  const one = await runAll(envs, { batchSize: 1 });
  assert.ok(one.ls.length > 100, `enough labels to compare (${one.ls.length})`);
  // The traffic exercises probation: bot-score's flag markers, labels released and labels dropped.
  assert.ok(envs.some(isBotMarker), "flag markers in the input");
  assert.ok(one.h.metric("labels_released") > 0 && one.h.metric("labels_dropped_bot") > 0, `released ${one.h.metric("labels_released")}, dropped ${one.h.metric("labels_dropped_bot")}`);
  for (const batchSize of [7, 13, 500]) {
    const other = await runAll(envs, { batchSize });
    assert.deepEqual([...other.emits.keys()].sort(), [...one.emits.keys()].sort(), `batch size ${batchSize}: label ids`);
    for (const [k, v] of one.emits) assert.deepEqual(other.emits.get(k), v, `batch size ${batchSize}: ${k}`);
    assert.deepEqual(other.state, one.state, `batch size ${batchSize}: state and features`);
  }
});

for (const at of ["before_commits", "mid_commits", "after_commits"] as const) {
  test(`redelivery after a crash ${at.replace("_", " ")}: no label id re-emitted with other content, identical features`, async () => {
    const envs = await simulatedInputs();
    const clean = await runAll(envs, { batchSize: 25 });
    // The harness throws if an emit id comes back with a different value.
    const crashed = await runAll(envs, { batchSize: 25, crashes: 6, crashAt: at });
    assert.ok(crashed.h.log.length > envs.length, "some inputs were redelivered");
    if (at !== "before_commits") assert.ok(crashed.h.dropped("already_applied") > 0);
    assert.deepEqual([...crashed.emits.keys()].sort(), [...clean.emits.keys()].sort());
    assert.deepEqual(crashed.state, clean.state);
  });
}

test("response_memory: what a cached state forgets, input by input, is what a state read back for every input forgets", async () => {
  const envs = (await simulatedInputs()).filter((x) => x.partition === 0);
  // Three hours of traffic against 40 minutes of memory: responses are forgotten all along.
  const config: LabelDeriveConfig = { probation: { enabled: true }, response_memory: "40m" };
  /** The stored state of each input's user once that input is committed, and how many responses it remembers. */
  const trace = async (cold: boolean) => {
    const h = harness(config);
    const after: string[] = [];
    let remembered = 0;
    for (const env of envs) {
      await h.push(0, [env], { batchSize: 1 });
      if (cold) await h.restart();
      const { payload } = await h.stored(env.event.user).catch(() => ({ payload: "" }));
      after.push(payload);
      if (payload) remembered += (JSON.parse(payload) as { resp: unknown[] }).resp.length;
    }
    return { after, remembered, emits: [...h.emits("labels.response"), ...h.emits("labels.session")].map((e) => e.id) };
  };
  const cached = await trace(false);
  const cold = await trace(true);
  cached.after.forEach((x, i) => assert.equal(x, cold.after[i], `after input ${i}`));
  assert.deepEqual(cached.emits, cold.emits);
  // Forgetting happened: fewer responses are remembered along the way than with a day of memory.
  const day = harness({ probation: { enabled: true } });
  let dayRemembered = 0;
  for (const env of envs) {
    await day.push(0, [env], { batchSize: 1 });
    const { payload } = await day.stored(env.event.user).catch(() => ({ payload: "" }));
    if (payload) dayRemembered += (JSON.parse(payload) as { resp: unknown[] }).resp.length;
  }
  assert.ok(cached.remembered < dayRemembered, `remembered: ${cached.remembered} against ${dayRemembered}`);
});

test("retraction is exactly once: emit mode on simulated traffic, batch sizes and crashes at every point give the same labels (retractions included), state and features", async () => {
  const envs = await simulatedInputs();
  const config: LabelDeriveConfig = { probation: { enabled: false } };
  const base = await runAll(envs, { batchSize: 1, config });
  const flagged = new Set(envs.filter(isBotMarker).map((x) => x.event.user));
  assert.ok(base.h.metric("labels_retracted") > 10, `retractions: ${base.h.metric("labels_retracted")}`);
  assert.deepEqual(live(base.ls).filter((l) => flagged.has(l.user)), [], "no live label of a flagged user");
  const runs = [
    await runAll(envs, { batchSize: 13, config }),
    ...(await Promise.all((["before_commits", "mid_commits", "after_commits"] as const).map((at) => runAll(envs, { batchSize: 25, config, crashes: 6, crashAt: at })))),
  ];
  for (const [i, r] of runs.entries()) {
    assert.deepEqual([...r.emits.keys()].sort(), [...base.emits.keys()].sort(), `run ${i}: label ids and revisions`);
    for (const [k, v] of base.emits) assert.deepEqual(r.emits.get(k), v, `run ${i}: ${k}`);
    assert.deepEqual(r.state, base.state, `run ${i}: state and features`);
  }
});

// ---------------------------------------------------------------------------------------------
// Config, rules file and lint

test("a rules file with an error fails create with a ConfigError naming file:line, and lint reports it", async () => {
  const dir = mkdtempSync(join(tmpdir(), "tacit-ld-"));
  const file = join(dir, "bad-rules.yaml");
  writeFileSync(file, "version: 1\nrules:\n  - name: copy\n    version: 1\n    signal: copy_pasta\n    kind: response\n    target: response\n    label: positive\n    weight: 1\n");
  const h = harness({ rules_file: file });
  await assert.rejects(h.push(0, [shown(0, "r1")]), (err: unknown) => err instanceof ConfigError && err.message.includes(`${file}:5:13`) && /copy_pasta/.test(err.message));
  const issues = labelDerive.lint!({ rules_file: file }, { stages: [], index: 0 });
  assert.equal(issues.length, 1);
  assert.deepEqual(issues[0]!.path, ["rules_file"]);
  assert.match(issues[0]!.message, /bad-rules\.yaml:5:13/);
});

test("tacit validate: the default pipeline is clean; a session_gap different from sessionize's gap is flagged", () => {
  const pipeline = readFileSync(join(ROOT, "pipelines/feedback.yaml"), "utf8");
  assert.deepEqual(loadPipeline("feedback.yaml", { source: pipeline, operators: OPERATORS, env: {}, secrets: false }).problems.map(formatProblem), []);
  const bad = pipeline.replace("session_gap: 30m", "session_gap: 20m");
  assert.notEqual(bad, pipeline);
  const problems = loadPipeline("feedback.yaml", { source: bad, operators: OPERATORS, env: {}, secrets: false }).problems.map(formatProblem);
  assert.equal(problems.length, 1, problems.join("\n"));
  assert.match(problems[0]!, /session_gap \(20m\) differs from the sessionize gap \(30m\)/);
  const badRules = pipeline.replace("rules_file: config/label-rules.yaml", "rules_file: config/no-such-rules.yaml");
  const p2 = loadPipeline("feedback.yaml", { source: badRules, operators: OPERATORS, env: {}, secrets: false }).problems.map(formatProblem);
  assert.equal(p2.length, 1);
  assert.match(p2[0]!, /cannot read the label rules file/);
});

test("a bad envelope goes to the DLQ without stopping the batch", async () => {
  const h = harness();
  const broken = shown(0, "r0");
  (broken.event as { user?: unknown }).user = undefined;
  await h.push(0, [broken, shown(1, "r1"), on("accept", 35, "r1")]);
  assert.equal(h.log[0]!.outcome.error?.code, "bad_envelope");
  assert.equal(labels(h).filter((l) => l.rule === "accept").length, 1);
});

test("events pass on unchanged to next", async () => {
  const envs = [shown(0, "r1"), on("accept", 25, "r1")];
  const { h } = await run(envs);
  assert.deepEqual(h.outputs("next"), envs);
  assert.ok(h.state.keys().includes(userFeaturesKey("feedback", ALICE)));
});

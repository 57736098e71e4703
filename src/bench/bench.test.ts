import { test } from "node:test";
import assert from "node:assert/strict";
import { attributeCpuProfile, benchEvents, cpuShares, profileWindow, stageLabels, type CpuProfile } from "./bench.js";

const ROOT = "file:///app/dist";
const frame = (functionName: string, url = "") => ({ functionName, url });

/**
 * A hand-made profile:
 *   (root) ─┬─ runChain (src/runtime/chain.js) ─┬─ process (operators/reformulation.js) ── levenshtein (node_modules/fast-levenshtein)
 *           │                                   ├─ process (operators/dedupe.js) ── get (src/runtime/keyed-state.js)
 *           │                                   └─ commit (src/state/redis.js) ── write (node_modules/ioredis)
 *           ├─ processMsg (node_modules/@nats-io/transport-node)
 *           ├─ parse (node_modules/@nats-io/jetstream)
 *           ├─ (garbage collector)
 *           ├─ (idle)
 *           ├─ (program)
 *           └─ JSON.parse (no url)
 */
const profile: CpuProfile = {
  nodes: [
    { id: 1, callFrame: frame("(root)"), children: [2, 7, 8, 9, 10, 11, 12] },
    { id: 2, callFrame: frame("runChain", `${ROOT}/src/runtime/chain.js`), children: [3, 5, 13] },
    { id: 3, callFrame: frame("process", `${ROOT}/operators/reformulation.js`), children: [4] },
    { id: 4, callFrame: frame("get", "file:///app/node_modules/fast-levenshtein/levenshtein.js") },
    { id: 5, callFrame: frame("process", `${ROOT}/operators/dedupe.js`), children: [6] },
    { id: 6, callFrame: frame("get", `${ROOT}/src/runtime/keyed-state.js`) },
    { id: 7, callFrame: frame("processMsg", "file:///app/node_modules/@nats-io/transport-node/lib/node_transport.js") },
    { id: 8, callFrame: frame("parse", "file:///app/node_modules/@nats-io/jetstream/lib/jsmsg.js") },
    { id: 9, callFrame: frame("(garbage collector)") },
    { id: 10, callFrame: frame("(idle)") },
    { id: 11, callFrame: frame("(program)") },
    { id: 12, callFrame: frame("parse") },
    { id: 13, callFrame: frame("commit", `${ROOT}/src/state/redis.js`), children: [14] },
    { id: 14, callFrame: frame("write", "file:///app/node_modules/ioredis/built/Redis.js") },
  ],
  startTime: 1_000,
  // A sample's self time is the gap to the next one; the last runs to endTime.
  samples: [4, 4, 6, 2, 7, 8, 9, 10, 11, 12, 13, 14],
  timeDeltas: [0, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100],
  endTime: 1_000 + 1_100 + 300,
};

const labels = stageLabels([
  { name: "dedupe", operator: "dedupe" },
  { name: "reformulation", operator: "reformulation" },
]);

test("attributeCpuProfile: a library or the runtime called from an operator counts for its stage; else the leaf's category; idle left out", () => {
  const a = attributeCpuProfile(profile, labels);
  assert.deepEqual(a.us, {
    reformulation: 200,
    dedupe: 100,
    runtime: 100,
    "nats client": 200,
    gc: 100,
    other: 100,
    state: 100,
    "redis client": 300,
  });
  // 1,400 µs profiled, less two idle samples (idle, program) of 100 µs each.
  assert.equal(a.total_us, 1_200);
});

test("cpuShares: fractions of the non-idle total, stages in pipeline order first", () => {
  const a = attributeCpuProfile(profile, labels);
  const s = cpuShares(a, labels);
  assert.deepEqual(Object.keys(s), ["dedupe", "reformulation", "runtime", "state", "nats client", "redis client", "gc", "other"]);
  assert.ok(Math.abs(Object.values(s).reduce((x, y) => x + y, 0) - 1) < 1e-9);
  assert.equal(s.reformulation, 200 / a.total_us);
});

test("stageLabels: stages sharing an operator are reported together", () => {
  const l = stageLabels([
    { name: "enrich", operator: "enrich" },
    { name: "dedupe-a", operator: "dedupe" },
    { name: "dedupe-b", operator: "dedupe" },
  ]);
  assert.equal(l.get("dedupe"), "dedupe-a+dedupe-b");
  assert.equal(l.get("enrich"), "enrich");
});

test("attributeCpuProfile: operator files of other packages and operators not in the pipeline are not stages", () => {
  const p: CpuProfile = {
    nodes: [
      { id: 1, callFrame: frame("(root)"), children: [2, 3] },
      { id: 2, callFrame: frame("map", "file:///app/node_modules/rxjs/dist/operators/dedupe.js") },
      { id: 3, callFrame: frame("x", `${ROOT}/operators/index.js`) },
    ],
    startTime: 0,
    samples: [2, 3],
    timeDeltas: [0, 50],
    endTime: 100,
  };
  assert.deepEqual(attributeCpuProfile(p, labels).us, { other: 100 });
});

test("benchEvents: deterministic, so the relay and the pipeline get the same events without keeping them", () => {
  assert.deepEqual([...benchEvents(50, 7, 0)], [...benchEvents(50, 7, 0)]);
  assert.equal([...benchEvents(50, 7, 0)].length, 50);
});

test("attributeCpuProfile: Node internals and native code take their nearest categorized caller's category, else other", () => {
  const p: CpuProfile = {
    nodes: [
      { id: 1, callFrame: frame("(root)"), children: [2, 5, 6] },
      { id: 2, callFrame: frame("write", "file:///app/node_modules/ioredis/built/Redis.js"), children: [3] },
      { id: 3, callFrame: frame("handleWriteReq", "node:internal/stream_base_commons"), children: [4] },
      { id: 4, callFrame: frame("writeUtf8String") },
      { id: 5, callFrame: frame("runMicrotasks") },
      { id: 6, callFrame: frame("userKey", `${ROOT}/src/core/state.js`), children: [7] },
      { id: 7, callFrame: frame("encode", "node:internal/encoding") },
    ],
    startTime: 0,
    samples: [4, 3, 5, 7],
    timeDeltas: [0, 10, 10, 10],
    endTime: 40,
  };
  // The encode under src/core stops at project code outside a category: other.
  assert.deepEqual(attributeCpuProfile(p, labels).us, { "redis client": 20, other: 20 });
});

test("profileWindow keeps the samples taken within the window, timed from its start", () => {
  const p: CpuProfile = { nodes: [], startTime: 1000, endTime: 1600, samples: [1, 2, 3, 4, 5], timeDeltas: [100, 100, 100, 100, 100] };
  // Samples at 1100, 1200, 1300, 1400, 1500.
  const w = profileWindow(p, 1150, 1420);
  assert.deepEqual(w.samples, [2, 3, 4]);
  assert.deepEqual(w.timeDeltas, [50, 100, 100]);
  assert.equal(w.startTime, 1150);
  assert.equal(w.endTime, 1420);
  assert.deepEqual(profileWindow(p, 0, 10_000).samples, [1, 2, 3, 4, 5]);
});

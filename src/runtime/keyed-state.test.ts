import { test } from "node:test";
import assert from "node:assert/strict";
import { ManualClock } from "../core/clock.js";
import type { Envelope } from "../core/event.js";
import type { KeyedInput, KeyedProcessor, KeyScope, StageInput, TimerFiring } from "../core/operator.js";
import { MemoryStateStore } from "../state/memory.js";
import { KeyedChain, emptyResult, type Item, type MsgResult } from "./chain.js";
import { CacheBudget, StageState, mergeByTag } from "./keyed-state.js";
import type { CommitGroup } from "../core/state.js";
import { BadInputError } from "../core/errors.js";
import { assignWatermarks, admitInOrder } from "./watermarks.js";

const silent = { debug() {}, info() {}, warn() {}, error() {} };
const noMetrics = { count() {} };

/** A keyed operator for the runtime's own tests: counts a user's events, closes after 10 ms of event time. */
interface Count {
  n: number;
  last: number;
}
function counter(fired: { user: string; firing: TimerFiring }[]): KeyedProcessor<Count> {
  return {
    codec: { encode: (s) => JSON.stringify(s), decode: (r) => JSON.parse(r) as Count, ttlMs: () => 60_000 },
    processElement(input: KeyedInput, key: KeyScope<Count>) {
      const s = key.get() ?? { n: 0, last: 0 };
      s.n++;
      s.last = input.envelope.event.ts;
      key.put(s);
      key.setTimer(s.last + 10);
      return { emits: [{ to: "next", id: `c:${input.seq}`, value: input.envelope }] };
    },
    onTimer(key, firing) {
      fired.push({ user: key.user, firing });
      const s = key.get()!;
      key.clear();
      return { emits: [{ to: "sessions", id: `closed:${key.user}:${s.last}`, value: { user: key.user, n: s.n } }] };
    },
  };
}

function env(user: string, ts: number, seq: number): Envelope {
  return { v: 1, event: { event_id: `e${seq}`, user, ts, event_type: "click", payload: {} } as unknown as Envelope["event"], src: { seq }, partition: 0, attrs: {} };
}

function inputs(evs: [string, number][], from = 1): StageInput[] {
  return evs.map(([u, ts], i) => ({ seq: from + i, subject: "x", data: new Uint8Array(), deliveries: 1, stream_time_ms: 1000 + from + i, envelope: env(u, ts, from + i), partition: 0 }));
}

function setup(store = new MemoryStateStore(), budget?: CacheBudget) {
  const fired: { user: string; firing: TimerFiring }[] = [];
  const proc = counter(fired);
  const state = new StageState(store, "t", "count", 0, proc.codec, silent, budget);
  const chain = new KeyedChain([{ name: "count", proc: proc as KeyedProcessor<unknown>, state: state as StageState<unknown>, counters: noMetrics, clock: new ManualClock(0) }], 0);
  return { store, fired, state, chain };
}

async function runBatch(chain: KeyedChain, batch: StageInput[], progress = { hwm: 0 } as { hwm: number; maxTs?: number; wm?: number }, boundMs = 0) {
  const after = assignWatermarks(batch, progress, boundMs);
  const results: MsgResult[] = batch.map(emptyResult);
  const sink = emptyResult();
  await chain.run(batch.map((input, msg): Item => ({ msg, input })), after.wm, results, sink);
  return { results, sink, after };
}

test("timers fire before the first input whose watermark reached them, dated by the input that moved the watermark", async () => {
  const { fired, chain } = setup();
  // a@0, b@5, then c@20 moves the watermark to 20 (bound 0): a's timer (10) and b's (15) are due
  // before the next input, dated by c's stream time; d@21 runs after them.
  const batch = inputs([["a", 0], ["b", 5], ["c", 20], ["d", 21]]);
  const { results, sink } = await runBatch(chain, batch);
  assert.deepEqual(fired.map((f) => [f.user, f.firing.at_ms, f.firing.watermark_ms, f.firing.stream_time_ms]), [
    ["a", 10, 20, batch[2]!.stream_time_ms],
    ["b", 15, 20, batch[2]!.stream_time_ms],
  ]);
  assert.deepEqual(sink.emits.map((e) => e.emit.id), ["closed:a:0", "closed:b:5"]);
  assert.ok(results.every((r) => r.emits.length === 1));
});

test("the outcome does not depend on batch boundaries", async () => {
  const evs: [string, number][] = [["a", 0], ["b", 3], ["a", 8], ["c", 30], ["b", 31], ["a", 45], ["c", 60]];
  const runIn = async (size: number) => {
    const { fired, chain } = setup();
    const all = inputs(evs);
    let progress = { hwm: 0 } as { hwm: number; maxTs?: number; wm?: number };
    for (let i = 0; i < all.length; i += size) {
      const { after } = await runBatch(chain, all.slice(i, i + size), progress);
      progress = { hwm: all[Math.min(i + size, all.length) - 1]!.seq, ...after };
    }
    return fired.map((f) => [f.user, f.firing.at_ms, f.firing.stream_time_ms]);
  };
  const one = await runIn(100);
  assert.ok(one.length >= 3);
  for (const size of [1, 2, 3]) assert.deepEqual(await runIn(size), one, `batches of ${size}`);
});

test("state is written only when changed, as '<applied seq>:<state>', with timers first; the guard skips inputs at or below it", async () => {
  const { store, chain, state } = setup();
  const first = inputs([["a", 0], ["a", 1]]);
  const { results, sink } = await runBatch(chain, first);
  const groups = chain.takeCommits(results, sink, 1).flat();
  assert.deepEqual(groups[0]!.ops, [{ op: "zadd", key: state.timersKey, score: 11, member: "a" }]);
  assert.deepEqual(groups[1]!.ops, [{ op: "set", key: state.stateKey("a"), value: `2:${JSON.stringify({ n: 2, last: 1 })}`, ttl_ms: 60_000 }]);
  await store.commit(groups);
  // Nothing changed since: nothing to write.
  assert.deepEqual(chain.takeCommits([], emptyResult(), 1).flat(), []);
  // A new chain (another worker, or after a crash) reads the committed state and skips what it applied.
  const again = setup(store);
  const rerun = await runBatch(again.chain, inputs([["a", 0], ["a", 1], ["a", 2]]));
  assert.deepEqual(rerun.results.map((r) => r.dropped), ["already_applied", "already_applied", undefined]);
  assert.equal(again.state.applied("a"), 3);
});

test("a dropped (uncommitted) state is read again from the store; the cache stays within its budget, evicting clean entries only", async () => {
  const budget = new CacheBudget(4);
  const { store, chain, state } = setup(new MemoryStateStore(), budget);
  const { results, sink } = await runBatch(chain, inputs([["a", 0], ["b", 0], ["c", 0], ["d", 0], ["e", 0], ["f", 0]]));
  assert.equal(state.size, 6, "a batch's users stay in memory until its commit");
  await store.commit(chain.takeCommits(results, sink, 0).flat());
  chain.trim();
  assert.equal(budget.size(), 4);
  // Uncommitted changes are forgotten on drop: the store's value comes back.
  await runBatch(chain, inputs([["a", 1]], 7), { hwm: 6, maxTs: 0, wm: 0 });
  chain.drop();
  await state.load(["a"]);
  assert.equal(state.scope("a", 0).get()!.n, 1);
});

test("eviction keeps an entry used since the last sweep over an older one not used (CLOCK, the LRU approximation)", async () => {
  const budget = new CacheBudget(3);
  const { store, chain, state } = setup(new MemoryStateStore(), budget);
  const held = () => [...(state as unknown as { entries: Map<string, unknown> }).entries.keys()].sort();
  const first = await runBatch(chain, inputs([["a", 0], ["b", 0], ["c", 0], ["d", 0]]));
  await store.commit(chain.takeCommits(first.results, first.sink, 0).flat());
  chain.trim();
  // All four were used in the batch: the sweep's first pass unmarks them, its second takes the oldest.
  assert.deepEqual(held(), ["b", "c", "d"]);
  // b is used again, e arrives: c, older than d and not used since the sweep, goes; b, older still, stays.
  const second = await runBatch(chain, inputs([["b", 0], ["e", 0]], 5), { hwm: 4, maxTs: 0, wm: 0 });
  await store.commit(chain.takeCommits(second.results, second.sink, 0).flat());
  chain.trim();
  assert.deepEqual(held(), ["b", "d", "e"]);
});

test("due users are found without scanning every timer; replaced timers do not pile up in the heap", async () => {
  const { state } = setup();
  await state.loadTimers();
  await state.load(["u0", "u1", "u2"]);
  for (let i = 0; i < 5000; i++) state.scope(`u${i % 3}`, 0).setTimer(1000 + i);
  assert.deepEqual(state.dueUsers(999), []);
  assert.deepEqual(new Set(state.dueUsers(10_000)), new Set(["u0", "u1", "u2"]));
  assert.ok((state as unknown as { timers: { heapSize: number } }).timers.heapSize <= 2 * 3 + 1024 + 1);
  const popped: string[] = [];
  for (let t = state.popDue(10_000); t; t = state.popDue(10_000)) popped.push(`${t.user}@${t.at}`);
  assert.deepEqual(popped, ["u2@5997", "u0@5998", "u1@5999"]);
});

test("a timer moved later is due only at its new time, one moved earlier at the earlier one; users fire in (time, user) order", async () => {
  const { state } = setup();
  await state.loadTimers();
  await state.load(["a", "b", "c"]);
  const set = (user: string, at: number) => state.scope(user, 0).setTimer(at);
  set("a", 100);
  set("b", 150);
  set("c", 120);
  set("a", 200);
  set("c", 50);
  set("b", 150);
  assert.deepEqual(state.dueUsers(100), ["c"]);
  assert.deepEqual(state.popDue(100), { user: "c", at: 50 });
  // a's first time surfaces here and is not due: a comes back at 200.
  assert.equal(state.popDue(100), undefined);
  assert.deepEqual(state.dueUsers(149), []);
  assert.deepEqual(new Set(state.dueUsers(200)), new Set(["a", "b"]));
  set("b", 200);
  const popped: string[] = [];
  for (let t = state.popDue(300); t; t = state.popDue(300)) popped.push(`${t.user}@${t.at}`);
  assert.deepEqual(popped, ["a@200", "b@200"]);
  // What the commit writes: every user's time as it is now, none of the moves in between.
  const { timersBefore, timersAfter } = state.takeChanges(0);
  assert.deepEqual(timersBefore, []);
  assert.deepEqual(timersAfter.flatMap((g) => g.ops), []);
});

test("mergeByTag puts a user's state and effects in one group; other tags stay apart", () => {
  const merged = mergeByTag([
    { ops: [{ op: "set", key: "tacit:{t:u:a}:s:state", value: "1:x" }] },
    { ops: [{ op: "set", key: "tacit:{t:u:b}:s:state", value: "1:y" }] },
    { ops: [{ op: "hincrbyfloat", key: "tacit:{t:u:a}:features:user", field: "n", by: 1 }] },
    { ops: [{ op: "set", key: "tacit:{t}:index:r", value: "a" }] },
  ]);
  assert.deepEqual(merged.map((g) => g.ops.map((o) => o.key)), [
    ["tacit:{t:u:a}:s:state", "tacit:{t:u:a}:features:user"],
    ["tacit:{t:u:b}:s:state"],
    ["tacit:{t}:index:r"],
  ]);
});

/** A stage state with users `a` and `b` loaded, for the effects tests. */
async function effectsState(): Promise<StageState<Count>> {
  const state = new StageState<Count>(new MemoryStateStore(), "t", "s", 0, { encode: (x) => JSON.stringify(x), decode: (r) => JSON.parse(r) as Count, ttlMs: () => 1000 }, silent);
  await state.load(["a", "b"]);
  return state;
}

test("a user's effects fold a key's repeated hash writes into its first (later fields win) and leave the given groups unchanged", async () => {
  const state = await effectsState();
  const key = "tacit:{t:u:a}:features:user";
  const groups: CommitGroup[] = [
    { ops: [{ op: "hset", key, fields: { a: 1, b: 1 }, ttl_ms: 10 }] },
    { ops: [{ op: "hincrbyfloat", key, field: "n", by: 1 }] },
    { ops: [{ op: "hset", key, fields: { b: 2, c: 2 } }] },
    { ops: [{ op: "hset", key, fields: { c: 3 }, ttl_ms: 20 }] },
  ];
  const before = structuredClone(groups);
  state.addEffects("a", groups);
  assert.deepEqual(state.takeChanges(0).users, [
    {
      ops: [
        { op: "set", key: "tacit:{t:u:a}:s:state", value: "0:", ttl_ms: 1000 },
        { op: "hset", key, fields: { a: 1, b: 2, c: 3 }, ttl_ms: 20 },
        { op: "hincrbyfloat", key, field: "n", by: 1 },
      ],
    },
  ]);
  assert.deepEqual(groups, before);
});

test("a user's effects fold whole-number increments of a field into its first; fractions, and what came before a set or del, stay apart", async () => {
  const state = await effectsState();
  const key = "tacit:{t:u:a}:features:user";
  const inc = (field: string, by: number, ttl_ms?: number): CommitGroup => ({ ops: [{ op: "hincrbyfloat", key, field, by, ...(ttl_ms ? { ttl_ms } : {}) }] });
  const groups: CommitGroup[] = [inc("n", 1, 10), inc("m", 0.5), inc("n", 2), inc("m", 0.25), inc("n", -1, 20), { ops: [{ op: "del", key }] }, inc("n", 4)];
  const before = structuredClone(groups);
  state.addEffects("a", groups);
  assert.deepEqual(state.takeChanges(0).users.map((g) => g.ops.slice(1)), [
    [
      { op: "hincrbyfloat", key, field: "n", by: 2, ttl_ms: 20 },
      { op: "hincrbyfloat", key, field: "m", by: 0.5 },
      { op: "hincrbyfloat", key, field: "m", by: 0.25 },
      { op: "del", key },
      { op: "hincrbyfloat", key, field: "n", by: 4 },
    ],
  ]);
  assert.deepEqual(groups, before);
});

test("a user's effects fold into its state's commit group as they are kept; effects in another tag land apart, in order", async () => {
  const store = new MemoryStateStore();
  const state = new StageState<Count>(store, "t", "count", 0, { encode: (x) => JSON.stringify(x), decode: (r) => JSON.parse(r) as Count, ttlMs: () => 1000 }, silent);
  await state.load(["a", "b"]);
  const f = "tacit:{t:u:a}:features:user";
  state.scope("a", 0).put({ n: 1, last: 1 });
  state.addEffects("a", [{ ops: [{ op: "hset", key: f, fields: { x: 1, y: 1 } }, { op: "hincrbyfloat", key: f, field: "n", by: 1 }] }, { ops: [{ op: "set", key: "tacit:{t}:index:r1", value: "a" }] }]);
  state.addEffects("a", [{ ops: [{ op: "hset", key: f, fields: { y: 2 } }, { op: "hincrbyfloat", key: f, field: "n", by: 1 }] }, { ops: [{ op: "set", key: "tacit:{t}:index:r2", value: "a" }] }]);
  const { users } = state.takeChanges(0);
  assert.deepEqual(users.map((g) => g.ops.map((o) => (o.op === "set" ? `set ${o.key}` : o.op === "hset" ? `hset ${JSON.stringify(o.fields)}` : o.op === "hincrbyfloat" ? `incr ${o.field} ${o.by}` : o.op))), [
    ["set tacit:{t:u:a}:count:state", 'hset {"x":1,"y":2}', "incr n 2"],
    ["set tacit:{t}:index:r1"],
    ["set tacit:{t}:index:r2"],
  ]);
  assert.deepEqual(state.takeChanges(0).users, [], "taken once");
});

test("admitInOrder skips what was applied and redelivered copies behind newer inputs", () => {
  const r = admitInOrder([{ seq: 3 }, { seq: 5 }, { seq: 4 }, { seq: 6 }, { seq: 5 }], 3);
  assert.deepEqual(r.run.map((m) => m.seq), [5, 6]);
  assert.deepEqual(r.done.map((m) => m.seq), [3]);
  assert.equal(r.redelivered, 2);
});

test("event-time order: inputs are held in the user's state until the watermark reaches them, survive a restart, then run in event-time order", async () => {
  const store = new MemoryStateStore();
  const order = (seen: string[]): KeyedProcessor<Count> => ({ ...counter([]), eventTimeOrder: true, processElement(input, key) {
    seen.push(`${input.envelope.event.user}@${input.envelope.event.ts}`);
    return counter([]).processElement(input, key);
  } });
  const mk = (seen: string[]) => {
    const proc = order(seen);
    const state = new StageState(store, "t", "ord", 0, proc.codec, silent);
    return { state, chain: new KeyedChain([{ name: "ord", proc: proc as KeyedProcessor<unknown>, state: state as StageState<unknown>, counters: noMetrics, clock: new ManualClock(0) }], 0) };
  };
  // Bound 10: a@20, a@5, b@12 arrive out of order; the watermark after them is 10 — only a@5 is due.
  const first: string[] = [];
  const one = mk(first);
  const { results, sink, after } = await runBatch(one.chain, inputs([["a", 20], ["a", 5], ["b", 12]]), { hwm: 0 }, 10);
  assert.deepEqual(first, ["a@5"]);
  assert.ok(results.every((r) => !r.error));
  await store.commit(one.chain.takeCommits(results, sink, 0).flat());
  const raw = (await store.get([one.state.stateKey("a")]))[0]!;
  assert.match(raw, /^2:\u0001\[.*"ts":20.*\]\n/, "a@20 is held in a's value, beside the guard");
  // Another worker takes over: the held inputs come from the store and run in event-time order.
  const second: string[] = [];
  const two = mk(second);
  const progress = { hwm: 3, maxTs: after.maxTs!, wm: after.wm! };
  await runBatch(two.chain, inputs([["c", 40]], 4), progress, 10);
  assert.deepEqual(second, ["b@12", "a@20"], "released by the watermark 30, in event-time order");
  // A late input (at or below the watermark) runs at once, with its own outputs.
  const late = await runBatch(two.chain, inputs([["a", 3]], 5), { hwm: 4, maxTs: 40, wm: 30 }, 10);
  assert.deepEqual(second, ["b@12", "a@20", "a@3"]);
  assert.equal(late.results[0]!.emits.length, 1);
});

test("features written through the scope (named among the user's keys) fold per user and land with the user's state; a failed input's writes are dropped", async () => {
  const store = new MemoryStateStore();
  const proc: KeyedProcessor<Count> = {
    codec: { encode: (s) => JSON.stringify(s), decode: (r) => JSON.parse(r) as Count, ttlMs: () => 60_000 },
    processElement(input: KeyedInput, key: KeyScope<Count>) {
      const s = key.get() ?? { n: 0, last: 0 };
      key.features.add("features:user", "events", 1, 1000);
      key.features.set("features:user", { last: input.envelope.event.ts }, 1000);
      // An effect under another hash tag is a commit group of its own.
      const commits = input.seq === 1 ? [{ ops: [{ op: "set" as const, key: "tacit:{t:ix:1}:user", value: key.user }] }] : undefined;
      // Fails after writing: its writes must not land.
      if (input.envelope.event.ts === 99) return { emits: [], error: new BadInputError("bad_input", "no") };
      s.n++;
      key.put(s);
      return commits ? { emits: [], commits } : { emits: [] };
    },
  };
  const state = new StageState(store, "t", "count", 0, proc.codec, silent);
  const chain = new KeyedChain([{ name: "count", proc: proc as KeyedProcessor<unknown>, state: state as StageState<unknown>, counters: noMetrics, clock: new ManualClock(0) }], 0);
  const { results, sink } = await runBatch(chain, inputs([["a", 1], ["a", 99], ["a", 3], ["b", 4]]));
  assert.equal(results[1]!.error?.err.code, "bad_input");
  const groups = chain.takeCommits(results, sink, 0).flat();
  const fa = "tacit:{t:u:a}:features:user";
  const fb = "tacit:{t:u:b}:features:user";
  assert.deepEqual(
    groups.map((g) => g.ops),
    [
      [
        { op: "set", key: state.stateKey("a"), value: `3:${JSON.stringify({ n: 2, last: 0 })}`, ttl_ms: 60_000 },
        { op: "hincrbyfloat", key: fa, field: "events", by: 2, ttl_ms: 1000 },
        { op: "hset", key: fa, fields: { last: 3 }, ttl_ms: 1000 },
      ],
      [
        { op: "set", key: state.stateKey("b"), value: `4:${JSON.stringify({ n: 1, last: 0 })}`, ttl_ms: 60_000 },
        { op: "hincrbyfloat", key: fb, field: "events", by: 1, ttl_ms: 1000 },
        { op: "hset", key: fb, fields: { last: 4 }, ttl_ms: 1000 },
      ],
      [{ op: "set", key: "tacit:{t:ix:1}:user", value: "a" }],
    ],
  );
  await store.commit(groups);
  assert.deepEqual(await store.hgetall(fa), { events: "2", last: "3" });
});

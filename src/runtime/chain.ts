import type { Envelope } from "../core/event.js";
import { BadInputError, TacitError, errorMessage } from "../core/errors.js";
import type { KeyedInput, KeyedProcessor, TimerFiring } from "../core/operator.js";
import type { ManualClock } from "../core/clock.js";
import type { Emit, OperatorMetrics, Outcome, Processor, StageInput } from "../core/operator.js";
import type { CommitGroup } from "../core/state.js";
import { heldOrder, mergeByTag, type StageState } from "./keyed-state.js";

/**
 * Chain execution: runs the stages of one group (Flink's operator chaining) over a batch and
 * collects, per input message, what it produced. Used by the worker and, unchanged, by the
 * operator test harness, so operators are tested through the same watermark and timer code.
 */

/** What one input message came to, across the stages of its group. */
export interface MsgResult {
  emits: { stage: string; emit: Emit }[];
  commits: CommitGroup[];
  error?: { stage: string; err: TacitError };
  /** A retryable per-message error: the runner retries the batch, in order (and dead-letters the message once it met `runtime.max_deliver`). */
  retry?: { stage: string; err: TacitError };
  /** The traceparent its outputs carry, when the input had one. */
  traceparent?: string;
  /** `Tacit-Redriven` of the input: carried to its outputs and dead letters (a redrive is not retried forever). */
  redriven?: string;
  /** The envelope the message carried (stages after the first): an output that is this very object is forwarded as the message's bytes. */
  envelope?: Envelope;
  /** Why the input was intentionally dropped (duplicate, sampled out, already applied), if it was. */
  dropped?: string;
  /** A replayed input below its durable's fence: its outputs were published before (labels excepted). */
  replayed?: boolean;
}

export function emptyResult(): MsgResult {
  return { emits: [], commits: [] };
}

/** An input travelling through a group's stages; `msg` is -1 for records born from a timer. */
export interface Item {
  msg: number;
  input: StageInput;
  /** Released from the event-time hold: its guard was applied when it was held. */
  held?: true;
  /** Where its outcome goes instead of its message's result (see KeyedChain.inOrder). */
  into?: MsgResult;
}

/**
 * The input as the next stage of a chain sees it: the same message with the envelope the stage
 * before passed on. Built field by field, so every input has one shape (a spread of inputs of
 * several shapes was a measurable share of the chain's time).
 */
function withEnvelope(i: StageInput, envelope: Envelope): StageInput {
  return { seq: i.seq, subject: i.subject, data: i.data, envelope, deliveries: i.deliveries, stream_time_ms: i.stream_time_ms, watermark_ms: i.watermark_ms, partition: i.partition };
}

/**
 * Records an outcome's commits, error or drop in the message's result; false when it failed (its
 * emits then go nowhere). The caller routes the emits (KeyedChain.route, runUnkeyed).
 */
function settle(counters: OperatorMetrics, stage: string, o: Outcome, r: MsgResult): boolean {
  if (o.commits) r.commits.push(...o.commits);
  if (o.error) {
    if (o.error.retryable) r.retry = { stage, err: o.error };
    else {
      r.error = { stage, err: o.error };
      counters.count("dlq", 1, { reason: o.error.code });
    }
    return false;
  }
  if (o.dropped) {
    counters.count("dropped", 1, { reason: o.dropped });
    r.dropped ??= o.dropped;
  }
  return true;
}

/** Counts an emit under the runtime's own names (an operator's counter of the same name, sessionize's `late`, stays apart). */
function countEmit(counters: OperatorMetrics, e: Emit): void {
  if (e.to === "next") counters.count("out");
  else counters.count("side_output", 1, { to: e.to });
}

/** One stage of an unkeyed group. */
export interface UnkeyedStage {
  name: string;
  proc: Processor;
  counters: OperatorMetrics;
  clock: ManualClock;
}

/** Runs items through an unkeyed group's stages, a batch at a time per stage. */
export async function runUnkeyed(stages: UnkeyedStage[], items: Item[], results: MsgResult[]): Promise<void> {
  let current = items;
  for (let k = 0; k < stages.length && current.length > 0; k++) {
    const { name, proc, counters, clock } = stages[k]!;
    // Event time of the batch: the latest event time among its inputs (operators never read the wall clock).
    let t = clock.now();
    for (const it of current) if (it.input.envelope && it.input.envelope.event.ts > t) t = it.input.envelope.event.ts;
    clock.set(t);
    counters.count("in", current.length);
    const outcomes = await processIsolated(proc, current.map((it) => it.input));
    const last = k === stages.length - 1;
    const next: Item[] = [];
    current.forEach((it, j) => {
      const o = outcomes[j]!;
      const r = results[it.msg]!;
      if (!settle(counters, name, o, r)) return;
      for (const e of o.emits) {
        countEmit(counters, e);
        if (e.to === "next" && !last) next.push({ msg: it.msg, input: { ...it.input, envelope: e.value as Envelope } });
        else r.emits.push({ stage: name, emit: e });
      }
    });
    current = next;
  }
}

/** Processes a batch; if the operator throws a non-retryable error, isolates the poison message. */
async function processIsolated(proc: Processor, inputs: StageInput[]): Promise<Outcome[]> {
  try {
    const out = await proc.process(inputs);
    if (out.length !== inputs.length) throw new Error(`operator returned ${out.length} outcomes for ${inputs.length} inputs`);
    return out;
  } catch (err) {
    if (err instanceof TacitError && err.retryable) throw err;
    if (inputs.length === 1) {
      return [{ emits: [], error: new TacitError("processing_failed", errorMessage(err), { cause: err }) }];
    }
    const out: Outcome[] = [];
    for (const input of inputs) out.push(...(await processIsolated(proc, [input])));
    return out;
  }
}

/** One stage of a keyed group in one partition: its operator and the runtime's state for it. */
export interface KeyedStage {
  name: string;
  proc: KeyedProcessor<unknown>;
  state: StageState<unknown>;
  counters: OperatorMetrics;
  clock: ManualClock;
}

const NO_BYTES = new Uint8Array();

/**
 * Runs one partition's batch through a keyed group, one input at a time through every stage
 * (each input is finished by the whole chain before the next starts), firing each stage's due
 * timers before the first input whose watermark reached them and, at the end, up to the
 * batch's final watermark. `finalWm` is the partition's watermark after the batch.
 *
 * Event-time order (a stage's operator sets `eventTimeOrder`): the group's first stage holds
 * each input, in its user's state, until the watermark reaches its event time (no input at or
 * below the watermark can still come within the bound). Then the held inputs of the partition
 * run in (event time, event_id, sequence) order, each seeing the watermark `event time − 1`, so
 * every timer before it fires first and none after it; timers then fire up to the watermark.
 * What the group decides is then a function of the events, not of their arrival order, for
 * every input that arrives less than `event_time.max_out_of_orderness` behind the newest event
 * of its partition. A later one (at or below the watermark) runs at once with the watermark it
 * saw (sessionize judges its lateness against it). An input that comes in order is held only
 * until the next input or the end of its batch when the bound is 0.
 */
export class KeyedChain {
  /** Stream time of the input after which what fires now became due (for TimerFiring): the batch's previous input. */
  private raisedBy: number | undefined;
  /** The group runs in event-time order (see above). */
  private readonly ordered: boolean;
  /** Inputs of this batch held so far, by sequence: their message index (released in the batch, their outputs can be theirs). */
  private readonly heldHere = new Map<number, number>();
  /**
   * Outputs are published message by message, then the sink's: the highest message that has
   * outputs so far, and whether a release went to the sink. A release keeps its own message
   * only while that keeps the publication in release order.
   */
  private top = -1;
  private toSink = false;
  /**
   * Effects outside the operators' state (features), in the order they were made, with the
   * result they belong to: they land in that order, so a field two inputs set ends as the later
   * one left it, whichever message or sink each belongs to and wherever batches begin. Per input
   * or timer of a stage: its commit groups, and its span of feature writes (StageState.keepWrites).
   */
  private readonly effects: { r: MsgResult; state: StageState<unknown>; user: string; groups: CommitGroup[] | undefined; from: number; to: number }[] = [];

  constructor(
    private readonly stages: KeyedStage[],
    private readonly partition: number,
  ) {
    this.ordered = stages.some((s) => s.proc.eventTimeOrder === true);
  }

  /** Loads every user the batch (and the timers due by `finalWm`) can touch, one round trip per stage. */
  private async prepare(items: Item[], finalWm: number | undefined): Promise<void> {
    await Promise.all(this.stages.map((s) => s.state.loadTimers()));
    const users = new Set<string>();
    for (const it of items) {
      const user = it.input.envelope?.event?.user;
      if (typeof user === "string") users.add(user);
    }
    if (finalWm !== undefined) for (const s of this.stages) for (const u of s.state.dueUsers(finalWm)) users.add(u);
    if (finalWm !== undefined && this.ordered) for (const u of this.stages[0]!.state.dueHolders(finalWm)) users.add(u);
    await Promise.all(this.stages.map((s) => s.state.load(users)));
  }

  /** Runs a batch; `items` carry envelopes and watermarks (see `assignWatermarks`). */
  async run(items: Item[], finalWm: number | undefined, results: MsgResult[], sink: MsgResult): Promise<void> {
    await this.prepare(items, finalWm);
    this.raisedBy = undefined;
    this.heldHere.clear();
    this.top = -1;
    this.toSink = false;
    let prev: StageInput | undefined;
    for (const it of items) {
      // What fires before this input became due after the previous one: a watermark it raised, or a timer it set at or below the watermark.
      if (prev) this.raisedBy = prev.stream_time_ms;
      if (this.ordered) this.admit(it, results, sink);
      else this.feed(0, it, results, sink);
      prev = it.input;
    }
    if (finalWm !== undefined) {
      if (prev) this.raisedBy = prev.stream_time_ms;
      this.advanceTo(finalWm, results, sink);
    }
    this.heldHere.clear();
  }

  /** Fires the timers due by `wm` after an idle advance (no input moved the watermark). */
  async advance(wm: number, sink: MsgResult): Promise<void> {
    await this.prepare([], wm);
    this.raisedBy = undefined;
    this.advanceTo(wm, [], sink);
  }

  private advanceTo(wm: number, results: MsgResult[], sink: MsgResult): void {
    if (this.ordered) this.release(wm, results, sink);
    else for (let k = 0; k < this.stages.length; k++) this.fireDue(k, wm, results, sink);
  }

  /**
   * Ordered group: releases what the input's watermark passed, then holds the input until the
   * watermark passes it too (marked applied with the hold, in the same write). Late inputs,
   * inputs already applied, and envelopes that lack what the operators check run at once.
   */
  private admit(it: Item, results: MsgResult[], sink: MsgResult): void {
    const wm = it.input.watermark_ms;
    if (wm !== undefined) this.release(wm, results, sink);
    const head = this.stages[0]!;
    const env = it.input.envelope;
    const ev = env?.event;
    if (!env || !ev || typeof ev.user !== "string" || !Number.isFinite(ev.ts) || typeof ev.event_id !== "string" || typeof ev.event_type !== "string" || typeof env.src?.seq !== "number" || it.input.seq <= head.state.applied(ev.user)) {
      return this.inOrder(it, results, sink);
    }
    if (wm !== undefined && ev.ts <= wm) {
      head.counters.count("late_unordered");
      return this.inOrder(it, results, sink);
    }
    head.state.hold(ev.user, { seq: it.input.seq, st: it.input.stream_time_ms, env });
    head.state.markApplied(ev.user, it.input.seq);
    if (it.msg >= 0) this.heldHere.set(it.input.seq, it.msg);
    head.counters.count("held");
  }

  /**
   * Ordered group: runs the held inputs the watermark reached, in event-time order across the
   * partition, then fires the timers up to it. An input held in this batch produces its own
   * outputs (or dead letter) where that keeps them in release order; others produce the sink's,
   * as a timer does, and if an operator rejects one, it is counted (`dlq`) and its outputs left
   * out (it was settled when it was held, so it cannot go to the dead letters).
   */
  private release(frontier: number, results: MsgResult[], sink: MsgResult): void {
    for (const h of this.stages[0]!.state.releaseDue(frontier).sort(heldOrder)) {
      const wm = h.env.event.ts - 1;
      for (let k = 0; k < this.stages.length; k++) this.fireDue(k, wm, results, sink);
      const input: StageInput = { seq: h.seq, subject: "", data: NO_BYTES, envelope: h.env, deliveries: 1, stream_time_ms: this.raisedBy ?? h.st, watermark_ms: wm, partition: this.partition };
      this.inOrder({ msg: this.heldHere.get(h.seq) ?? -1, input, held: true }, results, sink);
    }
    for (let k = 0; k < this.stages.length; k++) this.fireDue(k, frontier, results, sink);
  }

  /**
   * Runs an input of an ordered group so that the batch's outputs are published in the order
   * they were made (downstream groups then see event-time order too). Outputs are published
   * message by message, then the sink's: an input keeps its outputs on its own message while
   * that message comes after every one with outputs so far and nothing went to the sink; else
   * they go to the sink, and an error or a drop still goes to its message (dead letter, metrics).
   * An input held in an earlier batch has no message here: if an operator rejects it, it is
   * counted (`dlq`) and its outputs are left out (it was settled when it was held).
   */
  private inOrder(it: Item, results: MsgResult[], sink: MsgResult): void {
    if (it.msg >= 0 && !this.toSink && it.msg > this.top) {
      this.top = it.msg;
      return this.feed(0, it, results, sink);
    }
    this.toSink = true;
    const one = emptyResult();
    this.feed(0, { ...it, into: one }, results, sink);
    const r = it.msg >= 0 ? results[it.msg]! : undefined;
    if (r) {
      if (one.error) r.error = one.error;
      if (one.retry) r.retry = one.retry;
      if (one.dropped) r.dropped ??= one.dropped;
    }
    if (!one.error && !one.retry) sink.emits.push(...one.emits);
  }

  private feed(k: number, it: Item, results: MsgResult[], sink: MsgResult): void {
    const wm = it.input.watermark_ms;
    if (wm !== undefined) this.fireDue(k, wm, results, sink);
    const stage = this.stages[k]!;
    const input = it.input as KeyedInput;
    const r = it.into ?? (it.msg >= 0 ? results[it.msg]! : sink);
    stage.counters.count("in");
    const user = input.envelope?.event?.user;
    if (typeof user !== "string" || !Number.isFinite(input.envelope.event.ts)) {
      // Keyed state needs a user and an event time: such an input never touches it.
      settle(stage.counters, stage.name, { emits: [], error: new BadInputError("bad_envelope", `${stage.name} needs an envelope with event.user and event.ts (seq ${input.seq})`) }, r);
      return;
    }
    const scope = stage.state.scope(user, this.partition);
    // The runtime's exactly-once guard: an input at or below the user's applied sequence ran before.
    if (it.msg >= 0 && !it.held && input.seq <= scope.applied) {
      stage.counters.count("dropped", 1, { reason: "already_applied" });
      r.dropped ??= "already_applied";
      return;
    }
    if (input.envelope.event.ts > stage.clock.now()) stage.clock.set(input.envelope.event.ts);
    let o: Outcome;
    const from = stage.state.writeMark;
    try {
      o = stage.proc.processElement(input, scope);
    } catch (err) {
      if (err instanceof TacitError && err.retryable) throw err;
      o = { emits: [], error: err instanceof TacitError ? err : new TacitError("processing_failed", errorMessage(err), { cause: err }) };
    }
    if (it.msg >= 0 && !it.held && !o.error?.retryable) scope.markApplied(input.seq);
    const to = stage.state.writeMark;
    if (o.commits?.length || to > from) this.effects.push({ r, state: stage.state, user, groups: o.commits, from, to });
    if (settle(stage.counters, stage.name, o, r)) this.route(k, it, o.emits, r, results, sink);
  }

  /**
   * Passes stage k's `next` emits to the following stage and keeps the others (and, at the end of
   * the chain, every emit) as the result's outputs. An emit of the very envelope the stage was
   * given goes on as the same input (no copy per stage it passes).
   */
  private route(k: number, from: Item, emits: Emit[], r: MsgResult, results: MsgResult[], sink: MsgResult): void {
    const stage = this.stages[k]!;
    const last = k + 1 >= this.stages.length;
    for (const e of emits) {
      countEmit(stage.counters, e);
      if (e.to !== "next" || last) r.emits.push({ stage: stage.name, emit: e });
      else if (e.value === from.input.envelope) this.feed(k + 1, from, results, sink);
      else this.feed(k + 1, { msg: from.msg, input: withEnvelope(from.input, e.value as Envelope), held: from.held, into: from.into }, results, sink);
    }
  }

  /**
   * The commit of everything since the last one: new or earlier timers, then per user its state
   * with the effects it produced (features), merged by hash tag so they land in one atomic step,
   * then later or removed timers (see StageState.takeChanges). Errored and retried inputs
   * contribute no effects. `eventTimeMs` dates the state TTLs. Returned as phases, each to land
   * before the next starts (on a single Redis, one MULTI/EXEC in this order does that).
   */
  takeCommits(_results: MsgResult[], _sink: MsgResult, eventTimeMs: number): CommitGroup[][] {
    this.keepEffects();
    const before: CommitGroup[] = [];
    const users: CommitGroup[] = [];
    const after: CommitGroup[] = [];
    for (const s of this.stages) {
      const c = s.state.takeChanges(eventTimeMs);
      before.push(...c.timersBefore);
      users.push(...c.users);
      after.push(...c.timersAfter);
    }
    return [before, mergeByTag(users), after];
  }

  /**
   * Hands the effects made since the last call to their users' state, to land at the next commit,
   * except those of inputs that errored or are retried. Call it once a batch's outcomes are
   * final (after its retries were decided): until then a later stage can still fail an input.
   */
  keepEffects(): void {
    for (const x of this.effects) {
      if (x.r.retry || x.r.error) continue;
      if (x.groups?.length) x.state.addEffects(x.user, x.groups);
      if (x.to > x.from) x.state.keepWrites(x.from, x.to);
    }
    this.effects.length = 0;
    for (const s of this.stages) s.state.clearWrites();
  }

  /** Forgets the in-memory state (a failed batch, a lost lease): it is read again from Redis. */
  drop(): void {
    this.effects.length = 0;
    for (const s of this.stages) s.state.drop();
  }

  /** A stage holds more than its share of the worker's state cache: commit, so the trim after it can evict. */
  get overBudget(): boolean {
    return this.stages.some((s) => s.state.overShare);
  }

  /** After a commit: keeps the caches within their budget. */
  trim(): void {
    for (const s of this.stages) s.state.trim();
  }

  close(): void {
    for (const s of this.stages) s.state.close();
  }

  private fireDue(k: number, wm: number, results: MsgResult[], sink: MsgResult): void {
    const stage = this.stages[k]!;
    if (!stage.proc.onTimer) return;
    for (let t = stage.state.popDue(wm); t; t = stage.state.popDue(wm)) {
      const firing: TimerFiring = { at_ms: t.at, watermark_ms: wm, stream_time_ms: this.raisedBy };
      const mark = stage.state.writeMark;
      const out = stage.proc.onTimer(stage.state.scope(t.user, this.partition), firing);
      const end = stage.state.writeMark;
      if (out.commits?.length || end > mark) this.effects.push({ r: sink, state: stage.state, user: t.user, groups: out.commits, from: mark, to: end });
      // Published after every message's outputs: later inputs' outputs follow it there (see inOrder).
      if (this.ordered && out.emits.length) this.toSink = true;
      if (out.commits) sink.commits.push(...out.commits);
      if (out.emits.length === 0) continue;
      const from: Item = { msg: -1, input: { seq: 0, subject: "", data: NO_BYTES, deliveries: 1, stream_time_ms: this.raisedBy ?? 0, watermark_ms: wm, partition: this.partition } };
      this.route(k, from, out.emits, sink, results, sink);
    }
  }
}

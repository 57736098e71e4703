import type { Envelope } from "../core/event.js";
import { BadInputError, TacitError, errorMessage } from "../core/errors.js";
import type { KeyedInput, KeyedProcessor, TimerFiring } from "../core/operator.js";
import type { ManualClock } from "../core/clock.js";
import type { Emit, OperatorMetrics, Outcome, Processor, StageInput } from "../core/operator.js";
import type { CommitGroup } from "../core/state.js";
import { mergeByTag, type StageState } from "./keyed-state.js";

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
}

function record(counters: OperatorMetrics, stage: string, o: Outcome, r: MsgResult, onNext: (e: Emit) => boolean): void {
  if (o.commits) r.commits.push(...o.commits);
  if (o.error) {
    if (o.error.retryable) r.retry = { stage, err: o.error };
    else {
      r.error = { stage, err: o.error };
      counters.count("dlq", 1, { reason: o.error.code });
    }
    return;
  }
  if (o.dropped) {
    counters.count("dropped", 1, { reason: o.dropped });
    r.dropped ??= o.dropped;
  }
  for (const e of o.emits) {
    // Counted under the runtime's own names: an operator's counter of the same name (sessionize's `late`) stays apart.
    if (e.to === "next") counters.count("out");
    else counters.count("side_output", 1, { to: e.to });
    if (!(e.to === "next" && onNext(e))) r.emits.push({ stage, emit: e });
  }
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
      record(counters, name, outcomes[j]!, results[it.msg]!, (e) => {
        if (last) return false;
        next.push({ msg: it.msg, input: { ...it.input, envelope: e.value as Envelope } });
        return true;
      });
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

/**
 * Runs one partition's batch through a keyed group, one input at a time through every stage
 * (each input is finished by the whole chain before the next starts), firing each stage's due
 * timers before the first input whose watermark reached them and, at the end, up to the
 * batch's final watermark. `finalWm` is the partition's watermark after the batch.
 */
export class KeyedChain {
  /** Stream time of the input after which the watermark took its current value (for TimerFiring). */
  private raisedBy: number | undefined;

  constructor(
    private readonly stages: KeyedStage[],
    private readonly partition: number,
  ) {}

  /** Loads every user the batch (and the timers due by `finalWm`) can touch, one round trip per stage. */
  private async prepare(items: Item[], finalWm: number | undefined): Promise<void> {
    await Promise.all(this.stages.map((s) => s.state.loadTimers()));
    const users = new Set<string>();
    for (const it of items) {
      const user = it.input.envelope?.event?.user;
      if (typeof user === "string") users.add(user);
    }
    if (finalWm !== undefined) for (const s of this.stages) for (const u of s.state.dueUsers(finalWm)) users.add(u);
    await Promise.all(this.stages.map((s) => s.state.load(users)));
  }

  /** Runs a batch; `items` carry envelopes and watermarks (see `assignWatermarks`). */
  async run(items: Item[], finalWm: number | undefined, results: MsgResult[], sink: MsgResult): Promise<void> {
    await this.prepare(items, finalWm);
    this.raisedBy = undefined;
    let prev: StageInput | undefined;
    for (const it of items) {
      const wm = it.input.watermark_ms;
      if (prev && wm !== undefined && (prev.watermark_ms === undefined || wm > prev.watermark_ms)) this.raisedBy = prev.stream_time_ms;
      this.feed(0, it, results, sink);
      prev = it.input;
    }
    if (finalWm === undefined) return;
    if (prev && (prev.watermark_ms === undefined || finalWm > prev.watermark_ms)) this.raisedBy = prev.stream_time_ms;
    for (let k = 0; k < this.stages.length; k++) this.fireDue(k, finalWm, results, sink);
  }

  /** Fires the timers due by `wm` after an idle advance (no input moved the watermark). */
  async advance(wm: number, sink: MsgResult): Promise<void> {
    await this.prepare([], wm);
    this.raisedBy = undefined;
    for (let k = 0; k < this.stages.length; k++) this.fireDue(k, wm, [], sink);
  }

  private feed(k: number, it: Item, results: MsgResult[], sink: MsgResult): void {
    const wm = it.input.watermark_ms;
    if (wm !== undefined) this.fireDue(k, wm, results, sink);
    const stage = this.stages[k]!;
    const input = it.input as KeyedInput;
    const r = it.msg >= 0 ? results[it.msg]! : sink;
    stage.counters.count("in");
    const user = input.envelope?.event?.user;
    if (typeof user !== "string" || !Number.isFinite(input.envelope.event.ts)) {
      // Keyed state needs a user and an event time: such an input never touches it.
      record(stage.counters, stage.name, { emits: [], error: new BadInputError("bad_envelope", `${stage.name} needs an envelope with event.user and event.ts (seq ${input.seq})`) }, r, () => false);
      return;
    }
    // The runtime's exactly-once guard: an input at or below the user's applied sequence ran before.
    if (it.msg >= 0 && input.seq <= stage.state.applied(user)) {
      stage.counters.count("dropped", 1, { reason: "already_applied" });
      r.dropped ??= "already_applied";
      return;
    }
    if (input.envelope.event.ts > stage.clock.now()) stage.clock.set(input.envelope.event.ts);
    let o: Outcome;
    try {
      o = stage.proc.processElement(input, stage.state.scope(user, this.partition));
    } catch (err) {
      if (err instanceof TacitError && err.retryable) throw err;
      o = { emits: [], error: err instanceof TacitError ? err : new TacitError("processing_failed", errorMessage(err), { cause: err }) };
    }
    if (it.msg >= 0 && !o.error?.retryable) stage.state.markApplied(user, input.seq);
    record(stage.counters, stage.name, o, r, (e) => this.onward(k, it, e, results, sink));
  }

  /** Passes a `next` emit to the following stage; false at the end of the chain (it is an output). */
  private onward(k: number, from: Item, e: Emit, results: MsgResult[], sink: MsgResult): boolean {
    if (k + 1 >= this.stages.length) return false;
    this.feed(k + 1, { msg: from.msg, input: { ...from.input, envelope: e.value as Envelope } }, results, sink);
    return true;
  }

  /**
   * The commit of everything since the last one: new or earlier timers, then per user its state
   * with the effects it produced (features), merged by hash tag so they land in one atomic step,
   * then later or removed timers (see StageState.takeChanges). Errored and retried inputs
   * contribute no effects. `eventTimeMs` dates the state TTLs. Returned as phases, each to land
   * before the next starts (on a single Redis, one MULTI/EXEC in this order does that).
   */
  takeCommits(results: MsgResult[], sink: MsgResult, eventTimeMs: number): CommitGroup[][] {
    const before: CommitGroup[] = [];
    const users: CommitGroup[] = [];
    const after: CommitGroup[] = [];
    for (const s of this.stages) {
      const c = s.state.takeChanges(eventTimeMs);
      before.push(...c.timersBefore);
      users.push(...c.users);
      after.push(...c.timersAfter);
    }
    for (const r of results) if (!r.retry && !r.error) users.push(...r.commits);
    users.push(...sink.commits);
    return [before, mergeByTag(users), after];
  }

  /** Forgets the in-memory state (a failed batch, a lost lease): it is read again from Redis. */
  drop(): void {
    for (const s of this.stages) s.state.drop();
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
      const out = stage.proc.onTimer(stage.state.scope(t.user, this.partition), firing);
      const from: Item = { msg: -1, input: { seq: 0, subject: "", data: new Uint8Array(), deliveries: 1, stream_time_ms: this.raisedBy ?? 0, watermark_ms: wm, partition: this.partition } };
      record(stage.counters, stage.name, { emits: out.emits, commits: out.commits }, sink, (e) => this.onward(k, from, e, results, sink));
    }
  }
}

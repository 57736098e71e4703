import { TransientError, errorMessage } from "../core/errors.js";
import type { Envelope } from "../core/event.js";
import type { FeatureWriter, KeyScope, StateCodec } from "../core/operator.js";
import type { Logger } from "../core/operator.js";
import { hashTagOf, partitionKey, userKey, type CommitGroup, type StateOp, type StateStore } from "../core/state.js";

/**
 * Keyed state and timers of one keyed stage in one partition, owned by the runtime (Flink's heap
 * keyed-state backend, Kafka Streams' cached store). Valid only while the worker holds the
 * partition's lease: created when a partition starts, dropped when it stops, is lost or fenced.
 *
 * - Each user's state is one Redis string, `tacit:{<prefix>:u:<user>}:<stage>:state`, holding
 *   `<applied seq>:<encoded state>` (an empty state after the colon: cleared). It is read on the
 *   user's first touch after the partition started, then served from memory; the value carries
 *   the exactly-once guard, so an input at or below it never runs twice (also on Redis Cluster,
 *   where a batch's groups land one user at a time).
 * - Timers: one per user, in memory as a min-heap and persisted in the partition's sorted set
 *   `tacit:{<prefix>:p:<stage>:<n>}:timers` (read whole when the partition starts).
 * - Inputs held for event-time order (a group with an operator that sets `eventTimeOrder`, see
 *   KeyedChain): in the head stage's value of their user, before the operator's encoding
 *   (`<applied seq>:\u0001<held JSON>\n<encoded state>`), so an input is held in the same atomic
 *   write as the guard that says it was applied; each such user has a release time in the timers'
 *   sorted set (member `\u0000h:<user>`, score: the earliest held event time).
 * - Only what changed since the last commit is written, in the batch's atomic commit.
 * - The cache is bounded: clean entries are evicted (least recently used first, as CLOCK approximates it) after a commit;
 *   Redis stays the source of truth.
 */

interface Entry<S> {
  state: S | undefined;
  applied: number;
  /** The Redis key (built once per entry). */
  key: string;
  /** The scope operators see for this user (built on first use, then reused: no closures per input). */
  scope?: UserScope<S>;
  /** Inputs held for event-time order, sorted by heldOrder (head stage of an ordered group). */
  held?: HeldInput[];
  /** The user's effects since the last commit, folded (see addEffects). */
  effects?: UserEffects;
  /** What every key of the user starts with, `tacit:{<prefix>:u:<user>}` (built on first use, see userHead). */
  tagHead?: string;
  /** Used since the eviction sweep last passed it (CLOCK's reference bit, see `trim`). */
  used: boolean;
  /** Changed since the last commit (listed in StageState's `dirty`). */
  dirty: boolean;
}

/**
 * One user's effects (online features) since the last commit, folded as they come: a hash's
 * writes fold into its first write (later fields win), a field's whole-number increments into its
 * first increment. Whole numbers add up exactly in any order, so the sums do not depend on where
 * commits begin; fractional increments stay apart, in order (Redis would round their sum
 * differently). Folding relies on a field being either written or incremented, never both
 * (label-derive's features); a set or del of a key ends the folding of what came before it.
 * Kept with the user's cache entry, so a commit interval holds one user's folded effects, not
 * every input's.
 */
class UserEffects {
  readonly ops: StateOp[] = [];
  /** Per key of the ops handed over whole (`add`), and per hash name of the feature writes (`write`): where its writes fold. */
  private readonly at = new Map<string, Fold>();
  private readonly named = new Map<string, Fold>();

  /** Adds an input's ops. The caller's ops are never changed: a foldable op is kept as a copy. */
  add(ops: StateOp[]): void {
    for (const op of ops) {
      if (op.op === "set" || op.op === "del") {
        this.at.delete(op.key);
        this.ops.push(op);
      } else if (op.op === "hset") this.hset(this.fold(op.key), op.fields, op.ttl_ms);
      else if (op.op === "hincrbyfloat") this.incr(this.fold(op.key), op.field, op.by, op.ttl_ms);
      else this.ops.push(op);
    }
  }

  /** A feature write (see FeatureWriter) to the hash `name` of the user whose keys start with `head`. */
  write(head: string, name: string, field: string | Record<string, string | number>, by: number, ttl: number): void {
    let f = this.named.get(name);
    if (!f) this.named.set(name, (f = { key: `${head}:${name}` }));
    if (typeof field === "string") this.incr(f, field, by, ttl);
    else this.hset(f, field, ttl);
  }

  /** A hash write: folded into the key's first one (its fields copied then, later fields win). */
  private hset(f: Fold, fields: Record<string, string | number>, ttl: number | undefined): void {
    const into = f.hset === undefined ? undefined : (this.ops[f.hset] as Extract<StateOp, { op: "hset" }>);
    if (into) {
      Object.assign(into.fields, fields);
      if (ttl !== undefined) into.ttl_ms = ttl;
    } else f.hset = this.ops.push(ttl === undefined ? { op: "hset", key: f.key, fields: { ...fields } } : { op: "hset", key: f.key, fields: { ...fields }, ttl_ms: ttl }) - 1;
  }

  /** A field's increment: whole numbers fold into the field's first whole-number increment. */
  private incr(f: Fold, field: string, by: number, ttl: number | undefined): void {
    if (Number.isInteger(by)) {
      const incr = (f.incr ??= new Map());
      const i = incr.get(field);
      if (i !== undefined) {
        const into = this.ops[i] as Extract<StateOp, { op: "hincrbyfloat" }>;
        into.by += by;
        if (ttl !== undefined) into.ttl_ms = ttl;
        return;
      }
      incr.set(field, this.ops.length);
    }
    this.ops.push(ttl === undefined ? { op: "hincrbyfloat", key: f.key, field, by } : { op: "hincrbyfloat", key: f.key, field, by, ttl_ms: ttl });
  }

  private fold(key: string): Fold {
    let f = this.at.get(key);
    if (!f) this.at.set(key, (f = { key }));
    return f;
  }
}

/** Where one hash's writes fold: the index of its hash write and of each field's whole-number increment in `ops`. */
interface Fold {
  key: string;
  hset?: number;
  incr?: Map<string, number>;
}

/** An input held until the watermark passes its event time (see KeyedChain). */
export interface HeldInput {
  /** Its stream sequence and stream time. */
  seq: number;
  st: number;
  env: Envelope;
}

/** Event-time order of held inputs: event time, then event_id, then stream sequence. */
export function heldOrder(a: HeldInput, b: HeldInput): number {
  const x = a.env.event;
  const y = b.env.event;
  return x.ts - y.ts || (x.event_id < y.event_id ? -1 : x.event_id > y.event_id ? 1 : 0) || a.seq - b.seq;
}

/** Member prefix of release times in the timers' sorted set (no user id starts with NUL). */
const HOLD = "\u0000h:";
/** Marks a stored payload that starts with held inputs (no operator encoding starts with it). */
const HELD_MARK = "\u0001";

/** The bound of the in-memory state of one worker, shared by every stage and partition it runs. */
export class CacheBudget {
  private readonly members = new Set<StageState<unknown>>();
  constructor(readonly maxEntries: number) {}
  join(s: StageState<unknown>): void {
    this.members.add(s);
  }
  leave(s: StageState<unknown>): void {
    this.members.delete(s);
  }
  /** Entries each member may keep: an equal share, at least one batch's worth of users is always allowed by the caller. */
  share(): number {
    return Math.max(1, Math.floor(this.maxEntries / Math.max(1, this.members.size)));
  }
  /** Entries held now, over every member. */
  size(): number {
    let n = 0;
    for (const m of this.members) n += m.size;
    return n;
  }
}

/** Encodes the stored value: the applied sequence, a colon, then the operator's encoding ('' when cleared). */
function encodeValue(applied: number, payload: string): string {
  return `${applied}:${payload}`;
}

/** A stored keyed state: the applied sequence and the operator's encoding ('' when cleared). */
export function decodeStoredValue(raw: string): { applied: number; payload: string; held?: HeldInput[] } {
  const colon = raw.indexOf(":");
  if (colon < 0) return { applied: 0, payload: raw };
  const applied = Number(raw.slice(0, colon)) || 0;
  if (raw[colon + 1] !== HELD_MARK) return { applied, payload: raw.slice(colon + 1) };
  const nl = raw.indexOf("\n", colon);
  return { applied, payload: raw.slice(nl + 1), held: JSON.parse(raw.slice(colon + 2, nl)) as HeldInput[] };
}

/**
 * Event-time wake-ups of a stage's users (the operators' timers, or the release times of held
 * inputs): one per user, in memory as a min-heap, with what changed since the last commit.
 *
 * The heap is updated lazily (as a calendar queue defers): a wake-up moved later is not pushed
 * again, since the user's earlier element surfaces first and is then pushed back at the user's
 * time as it is by then. Operators move a user's timer later with most inputs (a session's end
 * plus the gap), so most inputs cost a map write here instead of a heap push.
 */
class Wakeups {
  readonly at = new Map<string, number>();
  /**
   * [at, user] min-heap. Every user in `at` has an element at or before its time; an element is
   * live while `at` maps its user to its time, one earlier than that is pushed back when it
   * surfaces, any other is dropped then.
   */
  private heap: [number, string][] = [];
  /** What changed since the last commit, per user: its time as last committed and now (undefined: none). */
  private readonly changes = new Map<string, { was: number | undefined; now: number | undefined }>();

  load(all: Iterable<[string, number]>): void {
    for (const [u, at] of all) this.at.set(u, at);
    this.rebuild();
  }

  private rebuild(): void {
    this.heap = [...this.at].map(([u, t]) => [t, u] as [number, string]).sort(cmp);
  }

  get heapSize(): number {
    return this.heap.length;
  }

  /** Users due at `wm` or earlier: a walk of the heap's due part only. */
  due(wm: number): string[] {
    const out = new Set<string>();
    const stack = this.heap.length && this.heap[0]![0] <= wm ? [0] : [];
    while (stack.length) {
      const i = stack.pop()!;
      const user = this.heap[i]![1];
      const at = this.at.get(user);
      if (at !== undefined && at <= wm) out.add(user);
      for (const c of [2 * i + 1, 2 * i + 2]) if (c < this.heap.length && this.heap[c]![0] <= wm) stack.push(c);
    }
    return [...out];
  }

  /** The earliest live wake-up at or before `wm`, removed; undefined when none is due. */
  popDue(wm: number): { user: string; at: number } | undefined {
    while (this.heap.length > 0) {
      const top = this.heap[0]!;
      if (top[0] > wm) return undefined;
      const user = top[1];
      const at = this.at.get(user);
      if (at !== top[0]) {
        heapPop(this.heap);
        // The user's time moved later since this element was pushed: it comes back at that time.
        if (at !== undefined && at > top[0]) {
          top[0] = at;
          heapPush(this.heap, top);
        }
        continue;
      }
      heapPop(this.heap);
      this.change(user, undefined);
      return { user, at };
    }
    return undefined;
  }

  set(user: string, at: number | undefined): void {
    const was = this.at.get(user);
    if (was === at) return;
    this.change(user, at);
    // A later time needs no element of its own: the user's earlier one comes back with it.
    if (at !== undefined && (was === undefined || at < was)) {
      heapPush(this.heap, [at, user]);
      // Replaced times stay in the heap until they surface: rebuild it before they pile up.
      if (this.heap.length > 2 * this.at.size + 1024) this.rebuild();
    }
  }

  private change(user: string, at: number | undefined): void {
    const c = this.changes.get(user);
    if (c) c.now = at;
    else this.changes.set(user, { was: this.at.get(user), now: at });
    if (at === undefined) this.at.delete(user);
    else this.at.set(user, at);
  }

  /** The changes as sorted-set ops (members prefixed): new or earlier ones to `before`, later or removed ones to `after`. */
  take(key: string, prefix: string, before: StateOp[], after: StateOp[]): void {
    for (const [user, { was, now: at }] of this.changes) {
      if (at === was) continue;
      const member = prefix + user;
      if (at === undefined) after.push({ op: "zrem", key, member });
      else (was === undefined || at < was ? before : after).push({ op: "zadd", key, score: at, member });
    }
    this.changes.clear();
  }

  clear(): void {
    this.at.clear();
    this.changes.clear();
    this.heap = [];
  }
}

export class StageState<S> {
  /** Insertion order is recency order: a touch moves an entry to the end. */
  private readonly entries = new Map<string, Entry<S>>();
  /** Users changed since the last commit, each once (its entry's `dirty` says it is listed). */
  private readonly dirty: string[] = [];
  /** Effects in another hash tag than their user's (index pointers), in the order they came. */
  private readonly otherEffects: CommitGroup[] = [];
  /**
   * Feature writes since the last `keepWrites`, flat, five slots each: the writer (its user's),
   * hash name, field (an increment) or fields (a write), increment, TTL. An input's span of them is
   * kept or dropped once its outcome is final (see KeyedChain.keepEffects).
   */
  private readonly writes: unknown[] = [];
  private readonly timers = new Wakeups();
  /** Release times of held inputs: the earliest held event time of each user holding any. */
  private readonly holds = new Wakeups();
  private loadedTimers = false;
  readonly timersKey: string;

  constructor(
    private readonly store: StateStore,
    private readonly prefix: string,
    readonly stage: string,
    readonly partition: number,
    private readonly codec: StateCodec<S>,
    private readonly log: Logger,
    private readonly budget?: CacheBudget,
  ) {
    this.timersKey = partitionKey(prefix, stage, partition, "timers");
    budget?.join(this as StageState<unknown>);
  }

  get size(): number {
    return this.entries.size;
  }

  stateKey(user: string): string {
    return userKey(this.prefix, user, this.stage, "state");
  }

  /** Reads the partition's timers once (first use after the partition started). */
  async loadTimers(): Promise<void> {
    if (this.loadedTimers) return;
    let all: { member: string; score: number }[];
    try {
      all = await this.store.zrangeByScore(this.timersKey, Number.NEGATIVE_INFINITY, Number.POSITIVE_INFINITY);
    } catch (err) {
      throw err instanceof TransientError ? err : new TransientError("state_unavailable", `${this.stage}: timers read failed: ${errorMessage(err)}`, err);
    }
    const timers: [string, number][] = [];
    const holds: [string, number][] = [];
    for (const { member, score } of all) {
      if (member.startsWith(HOLD)) holds.push([member.slice(HOLD.length), score]);
      else timers.push([member, score]);
    }
    this.timers.load(timers);
    this.holds.load(holds);
    this.loadedTimers = true;
  }

  /** Loads the users not in memory, in one round trip. */
  async load(users: Iterable<string>): Promise<void> {
    const missing: string[] = [];
    for (const u of users) if (!this.entries.has(u)) missing.push(u);
    if (missing.length === 0) return;
    const keys = missing.map((u) => this.stateKey(u));
    let values: (string | null)[];
    try {
      values = await this.store.get(keys);
    } catch (err) {
      throw err instanceof TransientError ? err : new TransientError("state_unavailable", `${this.stage}: state read failed: ${errorMessage(err)}`, err);
    }
    missing.forEach((user, i) => {
      const raw = values[i];
      // Every field from the start: one object shape for all entries, whatever is added later.
      const entry: Entry<S> = { state: undefined, applied: 0, key: keys[i]!, scope: undefined, held: undefined, effects: undefined, tagHead: undefined, used: true, dirty: false };
      if (raw != null) {
        const { applied, payload, held } = decodeStoredValue(raw);
        entry.applied = applied;
        if (held?.length) entry.held = held;
        if (payload !== "") {
          try {
            entry.state = this.codec.decode(payload);
          } catch (err) {
            this.log.warn({ stage: this.stage, user, err: errorMessage(err) }, "unreadable state, starting afresh");
          }
        }
      }
      this.entries.set(user, entry);
    });
  }

  /** Users whose timer is due at `wm` or earlier (loaded or not): a walk of the heap's due part only. */
  dueUsers(wm: number): string[] {
    return this.timers.due(wm);
  }

  /** The earliest live timer at or before `wm`, removed; undefined when none is due. */
  popDue(wm: number): { user: string; at: number } | undefined {
    return this.timers.popDue(wm);
  }

  /** Users holding inputs with an event time at or before `frontier` (loaded or not). */
  dueHolders(frontier: number): string[] {
    return this.holds.due(frontier);
  }

  /** Holds an input of a loaded user until the frontier passes its event time. */
  hold(user: string, input: HeldInput): void {
    const e = this.entry(user);
    const held = (e.held ??= []);
    let i = held.length;
    while (i > 0 && heldOrder(held[i - 1]!, input) > 0) i--;
    held.splice(i, 0, input);
    this.holds.set(user, held[0]!.env.event.ts);
    this.changed(e, user);
  }

  /** Every held input with an event time at or before `frontier`, taken out of the holds (in no particular order across users). */
  releaseDue(frontier: number): HeldInput[] {
    const out: HeldInput[] = [];
    for (let h = this.holds.popDue(frontier); h; h = this.holds.popDue(frontier)) {
      const e = this.entry(h.user);
      const held = e.held ?? [];
      let n = 0;
      while (n < held.length && held[n]!.env.event.ts <= frontier) n++;
      out.push(...held.splice(0, n));
      if (held.length) this.holds.set(h.user, held[0]!.env.event.ts);
      else e.held = undefined;
      this.changed(e, h.user);
    }
    return out;
  }

  /** The guard: the highest input sequence applied to the user's state. */
  applied(user: string): number {
    return this.entry(user).applied;
  }

  /** Records that an input was applied to the user (its state is written with the next commit). */
  markApplied(user: string, seq: number): void {
    this.applyTo(this.entry(user), user, seq);
  }

  /** @internal (markApplied, UserScope) */
  applyTo(e: Entry<S>, user: string, seq: number): void {
    if (seq > e.applied) e.applied = seq;
    this.changed(e, user);
  }

  /** The scope an operator sees for one user (the runtime's own view of it: see UserScope). */
  scope(user: string, partition: number): UserScope<S> {
    const e = this.entry(user);
    e.used = true;
    return (e.scope ??= new UserScope(this, e, user, partition));
  }

  /** @internal (UserScope, the writes): the user's entry is to be written with the next commit. */
  changed(e: Entry<S>, user: string): void {
    if (e.dirty) return;
    e.dirty = true;
    this.dirty.push(user);
  }

  /**
   * Keeps the effects (commit groups) an input or timer of `user` made, to land with the user's
   * state at the next commit: folded into the user's own when all their keys are in the user's
   * hash tag, else kept apart, in order.
   */
  addEffects(user: string, groups: CommitGroup[]): void {
    const e = this.entry(user);
    const head = this.userHead(e, user);
    for (const g of groups) {
      if (g.guard || !g.ops.every((op) => op.key.startsWith(head))) this.otherEffects.push(g);
      else (e.effects ??= new UserEffects()).add(g.ops);
    }
    this.changed(e, user);
  }

  /** Where the next feature write goes: an input's writes are the span between two marks. */
  get writeMark(): number {
    return this.writes.length;
  }

  /** @internal (UserFeatures) */
  write(w: UserFeatures<S>, hash: string, field: string | Record<string, string | number>, by: number, ttl: number): void {
    this.writes.push(w, hash, field, by, ttl);
  }

  /** Hands the feature writes in [from, to) to their users' effects, to land at the next commit with each user's state. */
  keepWrites(from: number, to: number): void {
    const w = this.writes;
    for (let i = from; i < to; i += 5) {
      const { e, user } = w[i] as UserFeatures<S>;
      (e.effects ??= new UserEffects()).write(this.userHead(e, user), w[i + 1] as string, w[i + 2] as string | Record<string, string | number>, w[i + 3] as number, w[i + 4] as number);
      this.changed(e, user);
    }
  }

  private userHead(e: Entry<S>, user: string): string {
    return (e.tagHead ??= userKey(this.prefix, user));
  }

  /** Forgets the feature writes (their spans were kept or dropped). */
  clearWrites(): void {
    this.writes.length = 0;
  }

  /** @internal (UserScope) */
  setTimer(user: string, at: number | undefined): void {
    this.timers.set(user, at);
  }

  private entry(user: string): Entry<S> {
    const e = this.entries.get(user);
    if (!e) throw new Error(`${this.stage}: state of ${user} used before it was loaded (a runtime bug)`);
    return e;
  }

  /**
   * What changed since the last commit, as commit groups: timers that are new or earlier than
   * committed go before the users' states, timers that are later or gone after them. On Redis
   * Cluster the parts land one after another, and a crash in between then leaves only a timer
   * that fires too early and finds nothing to do, never a state whose timer is missing or late.
   * `eventTimeMs` dates the TTLs. Clears the change sets: call `drop` if the commit then fails.
   */
  takeChanges(eventTimeMs: number): { timersBefore: CommitGroup[]; users: CommitGroup[]; timersAfter: CommitGroup[] } {
    const before: StateOp[] = [];
    const after: StateOp[] = [];
    this.timers.take(this.timersKey, "", before, after);
    this.holds.take(this.timersKey, HOLD, before, after);
    const users: CommitGroup[] = [];
    for (const user of this.dirty) {
      const e = this.entries.get(user)!;
      e.dirty = false;
      let payload = e.state === undefined ? "" : this.codec.encode(e.state);
      if (e.held?.length) payload = `${HELD_MARK}${JSON.stringify(e.held)}\n${payload}`;
      const ttl = Math.max(1, Math.round(this.codec.ttlMs(e.state, eventTimeMs)));
      const ops: StateOp[] = [{ op: "set", key: e.key, value: encodeValue(e.applied, payload), ttl_ms: ttl }];
      if (e.effects) ops.push(...e.effects.ops);
      e.effects = undefined;
      users.push({ ops });
    }
    this.dirty.length = 0;
    users.push(...this.otherEffects);
    this.otherEffects.length = 0;
    const group = (ops: StateOp[]): CommitGroup[] => (ops.length ? [{ ops }] : []);
    return { timersBefore: group(before), users, timersAfter: group(after) };
  }

  /** More entries than this stage's share of the budget: changed ones can go only after a commit. */
  get overShare(): boolean {
    const keep = this.budget?.share();
    return keep !== undefined && this.entries.size > keep;
  }

  /**
   * After a commit: evicts clean entries beyond this stage's share of the budget, the least
   * recently used first as CLOCK approximates it: the sweep goes in insertion order; an entry
   * used since the sweep last passed it loses its mark and goes to the end (a second chance), one
   * not used goes. A use then costs a flag, not a move of the entry in the map on every input.
   */
  trim(): void {
    const keep = this.budget?.share();
    if (keep === undefined || this.entries.size <= keep) return;
    // Entries moved to the end come round again in this same sweep, unmarked; at most two passes.
    for (const [user, e] of this.entries) {
      if (this.entries.size <= keep) break;
      if (e.dirty) continue;
      this.entries.delete(user);
      if (e.used) {
        e.used = false;
        this.entries.set(user, e);
      }
    }
  }

  /** Forgets everything in memory (lease lost, failed batch): the next use reads Redis again. */
  drop(): void {
    this.entries.clear();
    this.dirty.length = 0;
    this.otherEffects.length = 0;
    this.writes.length = 0;
    this.timers.clear();
    this.holds.clear();
    this.loadedTimers = false;
  }

  close(): void {
    this.drop();
    this.budget?.leave(this as StageState<unknown>);
  }
}

/**
 * One user's scope: a view of its cache entry (the entry lives as long as the scope can be used).
 * Operators see it as a KeyScope; the chain also reads and moves the user's guard through it.
 */
export class UserScope<S> implements KeyScope<S> {
  constructor(
    private readonly owner: StageState<S>,
    private readonly e: Entry<S>,
    readonly user: string,
    readonly partition: number,
  ) {}
  get(): S | undefined {
    return this.e.state;
  }
  put(state: S): void {
    this.e.state = state;
    this.owner.changed(this.e, this.user);
  }
  clear(): void {
    this.e.state = undefined;
    this.owner.changed(this.e, this.user);
  }
  /** The guard: the highest input sequence applied to the user's state. */
  get applied(): number {
    return this.e.applied;
  }
  /** Records that an input was applied to the user (its state is written with the next commit). */
  markApplied(seq: number): void {
    this.owner.applyTo(this.e, this.user, seq);
  }
  setTimer(at: number | undefined): void {
    this.owner.setTimer(this.user, at);
  }
  get features(): FeatureWriter {
    return (this.fw ??= new UserFeatures(this.owner, this.e, this.user));
  }
  private fw?: UserFeatures<S>;
}

/** One user's feature writer: records the writes in its stage's journal (see StageState.writes). */
class UserFeatures<S> implements FeatureWriter {
  constructor(
    private readonly owner: StageState<S>,
    readonly e: Entry<S>,
    readonly user: string,
  ) {}
  add(hash: string, field: string, by: number, ttlMs: number): void {
    if (by !== 0) this.owner.write(this, hash, field, by, ttlMs);
  }
  set(hash: string, fields: Record<string, string | number>, ttlMs: number): void {
    this.owner.write(this, hash, fields, Number.NaN, ttlMs);
  }
}

/**
 * Merges commit groups that share a hash tag into one group each, in first-seen order: a user's
 * state and the features it writes land together (one atomic step per user, on Cluster too).
 * (A user's effects arrive folded: see UserEffects.)
 */
export function mergeByTag(groups: CommitGroup[]): CommitGroup[] {
  /** The merged group of each tag; `shared` while its ops array is still the caller's (copied on the first merge). */
  const byTag = new Map<string, { group: CommitGroup; shared: boolean }>();
  const out: CommitGroup[] = [];
  for (const g of groups) {
    if (g.guard || g.ops.length === 0) {
      if (g.ops.length || g.guard) out.push(g);
      continue;
    }
    const first = g.ops[0]!.key;
    const tag = hashTagOf(first);
    // A key that starts like the first up to the end of its tag has that tag (no slice per op).
    const close = tag === first ? -1 : first.indexOf("}", first.indexOf("{") + 1);
    const head = close > 0 ? first.slice(0, close + 1) : undefined;
    let same = true;
    for (let i = 1; i < g.ops.length && same; i++) {
      const k = g.ops[i]!.key;
      same = (head !== undefined && k.startsWith(head)) || hashTagOf(k) === tag;
    }
    const into = same ? byTag.get(tag) : undefined;
    if (!into) {
      const group: CommitGroup = { ops: g.ops };
      if (same) byTag.set(tag, { group, shared: true });
      out.push(group);
      continue;
    }
    if (into.shared) {
      into.group.ops = into.group.ops.slice();
      into.shared = false;
    }
    into.group.ops.push(...g.ops);
  }
  return out;
}

function cmp(a: [number, string], b: [number, string]): number {
  return a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0);
}

/** Swaps two heap elements (through a temporary: a destructuring swap allocated an array each time, every input). */
function swap(h: [number, string][], i: number, j: number): void {
  const t = h[i]!;
  h[i] = h[j]!;
  h[j] = t;
}

function heapPush(h: [number, string][], x: [number, string]): void {
  h.push(x);
  let i = h.length - 1;
  while (i > 0) {
    const p = (i - 1) >> 1;
    if (cmp(h[p]!, h[i]!) <= 0) break;
    swap(h, p, i);
    i = p;
  }
}

function heapPop(h: [number, string][]): void {
  const last = h.pop()!;
  if (h.length === 0) return;
  h[0] = last;
  let i = 0;
  for (;;) {
    const l = 2 * i + 1;
    const r = l + 1;
    let m = i;
    if (l < h.length && cmp(h[l]!, h[m]!) < 0) m = l;
    if (r < h.length && cmp(h[r]!, h[m]!) < 0) m = r;
    if (m === i) return;
    swap(h, m, i);
    i = m;
  }
}

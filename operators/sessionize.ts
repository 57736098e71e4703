import { createHash } from "node:crypto";
import type { JSONSchemaType } from "ajv";
import { DURATION_SCHEMA, formatDuration, parseDuration } from "../src/core/duration.js";
import { BadInputError } from "../src/core/errors.js";
import { isBotMarker, type Envelope, type TacitEvent } from "../src/core/event.js";
import type {
  Emit,
  KeyScope,
  KeyedInput,
  KeyedProcessor,
  LintIssue,
  OperatorContext,
  OperatorSpec,
  Outcome,
  StateCodec,
  TimerFiring,
  TimerOutcome,
} from "../src/core/operator.js";

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/** Config of a `sessionize` stage as written in the pipeline YAML (durations as strings). */
export interface SessionizeConfig {
  /** Inactivity gap that ends a session. @default "30m" */
  gap: string;
  /** How far behind the watermark an event may arrive and still update its session. @default "5m" */
  allowed_lateness: string;
  /** Sessions longer than this are split; both parts are flagged `split`. @default "4h" */
  max_session_length: string;
  /** Emit a revised summary when a late event changes an already emitted session. @default true */
  emit_updates: boolean;
}

/** The compiled config: durations in ms. */
export interface SessionizeOptions {
  gap_ms: number;
  allowed_lateness_ms: number;
  max_session_ms: number;
  emit_updates: boolean;
}

export const SESSIONIZE_DEFAULTS: SessionizeConfig = {
  gap: "30m",
  allowed_lateness: "5m",
  max_session_length: "4h",
  emit_updates: true,
};

/** JSON Schema of the stage config: the single source for validation, defaults and docs. */
export const sessionizeSchema: JSONSchemaType<SessionizeConfig> = {
  type: "object",
  additionalProperties: false,
  properties: {
    gap: {
      ...DURATION_SCHEMA,
      default: SESSIONIZE_DEFAULTS.gap,
      description: "Inactivity gap: events of one user closer than this (in event time) belong to the same session.",
      examples: ["30m", "10m"],
    },
    allowed_lateness: {
      ...DURATION_SCHEMA,
      default: SESSIONIZE_DEFAULTS.allowed_lateness,
      description:
        "How far behind the partition watermark an event may be and still update its session (producing a revised summary). Later events go to <p>.late. Must be smaller than `gap`.",
      examples: ["5m", "0s"],
    },
    max_session_length: {
      ...DURATION_SCHEMA,
      default: SESSIONIZE_DEFAULTS.max_session_length,
      description:
        "Cap on a session's extent (last event time minus first). An event that would stretch a session past it starts a new session; both parts are flagged `split: true`.",
      examples: ["4h", "2h"],
    },
    emit_updates: {
      type: "boolean",
      default: SESSIONIZE_DEFAULTS.emit_updates,
      description:
        "When a late event (within allowed_lateness) changes a session whose summary was already emitted, emit a revised summary (same session_id, revision + 1).",
      examples: [true],
    },
  },
  required: [],
};

/** Normalizes a (possibly partial) config into ms; throws ConfigError naming the field at fault. */
export function compileSessionizeConfig(config: Partial<SessionizeConfig>): SessionizeOptions {
  const c = { ...SESSIONIZE_DEFAULTS, ...config };
  return {
    gap_ms: parseDuration(c.gap, "gap"),
    allowed_lateness_ms: parseDuration(c.allowed_lateness, "allowed_lateness"),
    max_session_ms: parseDuration(c.max_session_length, "max_session_length"),
    emit_updates: c.emit_updates,
  };
}

/**
 * How long past a session's deadline (end + gap + allowed_lateness, in event time) a user's state
 * lives in Redis: the timer closes sessions explicitly, the TTL is the safety net, long enough
 * that a pipeline stopped for most of a day resumes without losing open sessions. Once the last
 * session is closed, the applied sequence the runtime keeps for the user lives this long too.
 */
export const STATE_TTL_MARGIN_MS = 24 * 3_600_000;

// ---------------------------------------------------------------------------------------------
// Output shapes
// ---------------------------------------------------------------------------------------------

/** Published on `<p>.sessions` (emit id `session:<session_id>:<revision>`). Carries no raw text. */
export interface SessionSummary {
  session_id: string;
  user: string;
  /** Event time of the first and last event (ms since the epoch). */
  start: number;
  end: number;
  duration_ms: number;
  event_count: number;
  counts: Record<string, number>;
  query_ids: string[];
  response_ids: string[];
  /** The last event (by event time) is `abandon`, or a `response_shown` with nothing after it. */
  ended_in_abandonment: boolean;
  /** The session hit `max_session_length` and was cut. */
  split: boolean;
  /** Session ids merged into this one (retracted: consumers drop their summaries and events' provisional ids map here). */
  merged_from: string[];
  /** 0 on close; +1 for every revision (late event, merge). The highest revision supersedes the rest. */
  revision: number;
}

/** Published on `<p>.late` (emit id `<stage>:<src.seq>`). */
export interface LateRecord {
  event: TacitEvent;
  src: Envelope["src"];
  lateness_ms: number;
  watermark_ms: number;
  reason: "beyond_allowed_lateness" | "session_closed";
}

/** Added to `attrs.session` of every event passed on: a provisional id (the summary gives the final grouping). */
export interface SessionAttr {
  id: string;
  seq_in_session: number;
}

// ---------------------------------------------------------------------------------------------
// Metadata and lint
// ---------------------------------------------------------------------------------------------

export const sessionize: OperatorSpec<SessionizeConfig> = {
  name: "sessionize",
  summary: "Event-time session windows per user, with merging, watermarks, allowed lateness and a length cap.",
  description:
    "Groups each user's events into sessions separated by an inactivity gap, in event time (Flink event-time " +
    "session windows, Kafka Streams session windows with grace). Out-of-order events that bridge two sessions merge " +
    "them; the merged-away id is listed in `merged_from`. When the partition watermark passes a session's end + gap " +
    "its summary goes to <p>.sessions (revision 0); the session is kept for `allowed_lateness` more so late events " +
    "can revise it (revision 1, 2, …), then removed. Events later than that go to <p>.late with their lateness. " +
    "Every other event is passed on with `attrs.session = {id, seq_in_session}`. bot-score's flag marker (attrs.bot.band = \"bot\") " +
    "is passed on unchanged and joins no session.",
  keyed: true,
  schema: sessionizeSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:state",
      holds:
        "<applied seq>:<JSON of the user's open sessions (interval, counts, ids, emitted revision)>; only \"<applied seq>:\" (the exactly-once guard) once the last session has closed",
      ttl: "event-time deadline (last end + gap + allowed_lateness) minus the stage's event time, + 24h; 24h once no session is left",
    },
    {
      key: "tacit:{<prefix>:p:<stage>:<partition>}:timers",
      holds: "sorted set: member = user, score = watermark at which the user's next session fires or closes",
      ttl: "none: a user's member is removed when its timer fires and no session is left",
    },
  ],
  outputs: ["late", "sessions"],
  examples: [
    { title: "Defaults: 30 min gap, 5 min lateness, 4 h cap", config: {} },
    {
      title: "Writing assistant with long pauses between edits",
      config: { gap: "45m", allowed_lateness: "10m", max_session_length: "8h", emit_updates: true },
    },
    { title: "Only final summaries (no revisions)", config: { gap: "30m", allowed_lateness: "5m", emit_updates: false } },
  ],

  lint(config) {
    const issues: LintIssue[] = [];
    let o: SessionizeOptions;
    try {
      o = compileSessionizeConfig(config);
    } catch {
      return issues; // malformed durations are reported by the schema
    }
    if (o.allowed_lateness_ms >= o.gap_ms) {
      issues.push({
        path: ["allowed_lateness"],
        message: `allowed_lateness (${config.allowed_lateness ?? SESSIONIZE_DEFAULTS.allowed_lateness}) must be smaller than gap (${config.gap ?? SESSIONIZE_DEFAULTS.gap})`,
        hint: `a late event could then reopen sessions already closed and emitted; use at most ${formatDuration(Math.max(0, o.gap_ms - 1000))}, or raise event_time.max_out_of_orderness instead`,
      });
    }
    if (o.max_session_ms < o.gap_ms) {
      issues.push({
        path: ["max_session_length"],
        message: `max_session_length (${config.max_session_length ?? SESSIONIZE_DEFAULTS.max_session_length}) is shorter than gap`,
        hint: "sessions would be split almost always; use a cap of several gaps (the default is 4h)",
      });
    }
    return issues;
  },

  create(config, ctx) {
    return new Sessionizer(compileSessionizeConfig(config), ctx);
  },
};

// ---------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------

/** One open session of a user. */
interface Session {
  id: string;
  start: number;
  end: number;
  count: number;
  counts: Record<string, number>;
  query_ids: string[];
  response_ids: string[];
  /** Latest event by (ts, event_id): decides `ended_in_abandonment` independently of arrival order. */
  last: { ts: number; event_id: string; type: string };
  /** Revision of the last emitted summary; -1 when none was emitted yet. */
  rev: number;
  /** Changed since the last emitted summary. */
  changed: boolean;
  split: boolean;
  merged_from: string[];
}

/** A user's state: the open sessions, sorted by start. Stored as is (JSON), so a write allocates no copy. */
interface UserSessions {
  v: 1;
  sessions: Session[];
}

function sessionIdOf(user: string, eventId: string): string {
  return "s:" + createHash("sha256").update(user).update("\u0000").update(eventId).digest("hex").slice(0, 16);
}

function insertSorted(list: string[], value: string | undefined): void {
  if (value === undefined || value === "") return;
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid]! < value) lo = mid + 1;
    else hi = mid;
  }
  if (list[lo] !== value) list.splice(lo, 0, value);
}

function unionSorted(a: string[], b: string[]): string[] {
  const out = [...a];
  for (const v of b) insertSorted(out, v);
  return out;
}

function laterEvent(a: Session["last"], b: Session["last"]): Session["last"] {
  return b.ts > a.ts || (b.ts === a.ts && b.event_id > a.event_id) ? b : a;
}

function byStart(a: Session, b: Session): number {
  return a.start - b.start || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

/** The fields sessionize relies on; a bad envelope is an error outcome (DLQ), not a crash. */
function checkEnvelope(env: Envelope): void {
  const e = env.event;
  if (!e || typeof e.user !== "string" || e.user === "") {
    throw new BadInputError("bad_envelope", "sessionize: envelope has no event.user");
  }
  if (typeof e.ts !== "number" || !Number.isFinite(e.ts)) {
    throw new BadInputError("bad_envelope", "sessionize: envelope has no numeric event.ts");
  }
  if (typeof e.event_id !== "string" || typeof e.event_type !== "string") {
    throw new BadInputError("bad_envelope", "sessionize: envelope has no event_id or event_type");
  }
  if (typeof env.src?.seq !== "number") throw new BadInputError("bad_envelope", "sessionize: envelope has no src.seq");
}

class Sessionizer implements KeyedProcessor<UserSessions> {
  readonly codec: StateCodec<UserSessions>;
  /** Session ids (the first event's) and splits are decided on the user's events in event-time order. */
  readonly eventTimeOrder = true;

  constructor(
    private readonly o: SessionizeOptions,
    private readonly ctx: OperatorContext,
  ) {
    this.codec = {
      encode: (state) => JSON.stringify(state),
      decode: (raw) => {
        const state = JSON.parse(raw) as UserSessions;
        if (state?.v !== 1 || !Array.isArray(state.sessions)) throw new Error("sessionize: not a v1 sessions state");
        return state;
      },
      ttlMs: (state, eventTimeMs) => this.ttl(state, eventTimeMs),
    };
  }

  processElement(input: KeyedInput, key: KeyScope<UserSessions>): Outcome {
    const env = input.envelope;
    try {
      checkEnvelope(env);
    } catch (err) {
      return { emits: [], error: err as BadInputError };
    }
    // bot-score's flag for label-derive: passed on as is; it belongs to no session.
    if (isBotMarker(env)) return { emits: [{ to: "next", id: `${this.ctx.stage}:${env.src.seq}`, value: env }] };

    const ev = env.event;
    const wm = input.watermark_ms;
    const { gap_ms: gap, allowed_lateness_ms: lateness } = this.o;
    // Sessions the watermark has passed were summarized (and removed past the lateness) by the
    // user's timer, which the runtime fires before this input.
    if (wm !== undefined && ev.ts < wm && wm - ev.ts > lateness) {
      return { emits: [this.late(env, wm, "beyond_allowed_lateness")] };
    }
    const state = key.get() ?? { v: 1, sessions: [] };
    const targets = state.sessions.filter((s) => ev.ts >= s.start - gap && ev.ts <= s.end + gap);
    if (wm !== undefined && targets.some((s) => wm >= s.end + gap + lateness)) {
      return { emits: [this.late(env, wm, "session_closed")] };
    }

    const session = this.place(key.user, state, targets, env);
    key.put(state);
    // With allowed_lateness ≥ gap (lint rejects it) this can be at or below `wm`: the runtime
    // then fires it before the next input or at the end of the batch.
    key.setTimer(this.nextDue(state.sessions));
    const attr: SessionAttr = { id: session.id, seq_in_session: session.count };
    return { emits: [{ to: "next", id: `${this.ctx.stage}:${env.src.seq}`, value: { ...env, attrs: { ...env.attrs, session: attr } } }] };
  }

  /** Summarizes the sessions the watermark has passed, forgets those past the lateness, and sets the next timer. */
  onTimer(key: KeyScope<UserSessions>, firing: TimerFiring): TimerOutcome {
    const emits: Emit[] = [];
    const state = key.get();
    // A timer left behind by a crash between the timer and the state commit: nothing to do.
    if (!state) return { emits };
    const changed = this.advance(key.user, state, firing.watermark_ms, emits);
    if (state.sessions.length === 0) {
      key.clear();
      return { emits };
    }
    if (changed) key.put(state);
    key.setTimer(this.nextDue(state.sessions));
    return { emits };
  }

  /** Adds the event to the sessions it touches (merging them) or to a new one; returns its session. */
  private place(user: string, state: UserSessions, targets: Session[], env: Envelope): Session {
    const ev = env.event;
    const cap = this.o.max_session_ms;
    const extentWith = (group: Session[]): number => {
      let lo = ev.ts;
      let hi = ev.ts;
      for (const s of group) {
        lo = Math.min(lo, s.start);
        hi = Math.max(hi, s.end);
      }
      return hi - lo;
    };

    let host: Session | undefined;
    if (targets.length > 0 && extentWith(targets) <= cap) {
      host = this.merge(state, targets);
    } else if (targets.length > 0) {
      // Merging everything would exceed the cap: join the nearest session that still fits and
      // keep the others apart; every session involved is flagged as split.
      const dist = (s: Session): number => (ev.ts < s.start ? s.start - ev.ts : ev.ts > s.end ? ev.ts - s.end : 0);
      const fits = targets.filter((s) => extentWith([s]) <= cap).sort((a, b) => dist(a) - dist(b) || byStart(a, b));
      host = fits[0];
      for (const s of targets) {
        if (!s.split) {
          s.split = true;
          s.changed = true;
        }
      }
      this.ctx.metrics.count("sessions_split");
    }
    if (!host) {
      host = this.newSession(user, state, env, targets.length > 0);
      state.sessions.push(host);
      state.sessions.sort(byStart);
    }
    host.start = Math.min(host.start, ev.ts);
    host.end = Math.max(host.end, ev.ts);
    host.count += 1;
    host.counts[ev.event_type] = (host.counts[ev.event_type] ?? 0) + 1;
    insertSorted(host.query_ids, ev.query_id);
    insertSorted(host.response_ids, ev.response_id);
    host.last = laterEvent(host.last, { ts: ev.ts, event_id: ev.event_id, type: ev.event_type });
    host.changed = true;
    return host;
  }

  private newSession(user: string, state: UserSessions, env: Envelope, split: boolean): Session {
    const ev = env.event;
    let id = sessionIdOf(user, ev.event_id);
    // A repeated event_id (dedupe missed it) must not reuse an open session's id.
    if (state.sessions.some((s) => s.id === id)) id = sessionIdOf(user, `${ev.event_id}#${env.src.seq}`);
    return {
      id,
      start: ev.ts,
      end: ev.ts,
      count: 0,
      counts: {},
      query_ids: [],
      response_ids: [],
      last: { ts: ev.ts, event_id: ev.event_id, type: ev.event_type },
      rev: -1,
      changed: true,
      split,
      merged_from: [],
    };
  }

  /** Merges sessions into the earliest-starting one (tie: smaller id); the others are retracted. */
  private merge(state: UserSessions, group: Session[]): Session {
    // Most events extend the one session they fall in: nothing to merge.
    if (group.length === 1) return group[0]!;
    const [keep, ...gone] = [...group].sort(byStart);
    for (const s of gone) {
      keep!.start = Math.min(keep!.start, s.start);
      keep!.end = Math.max(keep!.end, s.end);
      keep!.count += s.count;
      for (const [t, n] of Object.entries(s.counts)) keep!.counts[t] = (keep!.counts[t] ?? 0) + n;
      keep!.query_ids = unionSorted(keep!.query_ids, s.query_ids);
      keep!.response_ids = unionSorted(keep!.response_ids, s.response_ids);
      keep!.last = laterEvent(keep!.last, s.last);
      keep!.split ||= s.split;
      keep!.merged_from = unionSorted(keep!.merged_from, [s.id, ...s.merged_from]);
    }
    keep!.changed = true;
    const goneIds = new Set(gone.map((s) => s.id));
    state.sessions = state.sessions.filter((s) => !goneIds.has(s.id));
    this.ctx.metrics.count("sessions_merged", gone.length);
    return keep!;
  }

  /**
   * Emits the summary of every session the watermark has passed (end + gap < wm) that has not
   * been emitted since its last change, then drops sessions past end + gap + lateness.
   * Returns whether the state changed.
   */
  private advance(user: string, state: UserSessions, wm: number, emits: Emit[]): boolean {
    const { gap_ms: gap, allowed_lateness_ms: lateness } = this.o;
    let changed = false;
    for (const s of state.sessions) {
      if (this.needsEmit(s) && wm > s.end + gap) {
        s.rev += 1;
        s.changed = false;
        changed = true;
        emits.push({ to: "sessions", id: `session:${s.id}:${s.rev}`, value: this.summary(user, s) });
        this.ctx.metrics.count(s.rev === 0 ? "sessions_closed" : "sessions_revised");
      }
    }
    const before = state.sessions.length;
    state.sessions = state.sessions.filter((s) => wm <= s.end + gap + lateness);
    return changed || state.sessions.length !== before;
  }

  private needsEmit(s: Session): boolean {
    return s.rev < 0 || (s.changed && this.o.emit_updates);
  }

  /** The smallest watermark at which something happens to one of these sessions (undefined: none open). */
  private nextDue(sessions: Session[]): number | undefined {
    const { gap_ms: gap, allowed_lateness_ms: lateness } = this.o;
    let due: number | undefined;
    for (const s of sessions) {
      const at = this.needsEmit(s) ? s.end + gap + 1 : s.end + gap + lateness + 1;
      if (due === undefined || at < due) due = at;
    }
    return due;
  }

  /**
   * The stored state's TTL: until the last session's deadline (in event time), plus the margin.
   * With no session left, the runtime keeps only the applied sequence (the exactly-once guard
   * for inputs whose partition progress is not committed yet) for the margin.
   */
  private ttl(state: UserSessions | undefined, nowEventMs: number): number {
    let lastEnd: number | undefined;
    for (const s of state?.sessions ?? []) if (lastEnd === undefined || s.end > lastEnd) lastEnd = s.end;
    if (lastEnd === undefined) return STATE_TTL_MARGIN_MS;
    const deadline = lastEnd + this.o.gap_ms + this.o.allowed_lateness_ms;
    return Math.max(0, deadline - nowEventMs) + STATE_TTL_MARGIN_MS;
  }

  private late(env: Envelope, wm: number, reason: LateRecord["reason"]): Emit {
    this.ctx.metrics.count("late", 1, { reason });
    const value: LateRecord = { event: env.event, src: env.src, lateness_ms: wm - env.event.ts, watermark_ms: wm, reason };
    return { to: "late", id: `${this.ctx.stage}:${env.src.seq}`, value };
  }

  private summary(user: string, s: Session): SessionSummary {
    return {
      session_id: s.id,
      user,
      start: s.start,
      end: s.end,
      duration_ms: s.end - s.start,
      event_count: s.count,
      counts: Object.fromEntries(Object.entries(s.counts).sort(([a], [b]) => (a < b ? -1 : 1))),
      query_ids: [...s.query_ids],
      response_ids: [...s.response_ids],
      ended_in_abandonment: s.last.type === "abandon" || s.last.type === "response_shown",
      split: s.split,
      merged_from: [...s.merged_from],
      revision: s.rev,
    };
  }
}

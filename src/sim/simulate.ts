import { ConfigError } from "../core/errors.js";
import type { EventType } from "../core/event.js";
import { Rng, seedFrom } from "./rng.js";
import {
  BOT_KINDS,
  type BotKind,
  type Habit,
  type MetaTruth,
  type NoiseKind,
  type NoiseTruth,
  type QueryTruth,
  type ResponseTruth,
  type TruthRecord,
  type UserTruth,
} from "./truth.js";
import {
  CRAWLER_UAS,
  DESKTOP_BROWSER_UAS,
  MOBILE_BROWSER_UAS,
  PII_SNIPPETS,
  clarify,
  newTopicQuery,
  reformulate,
  withTypo,
  type QueryChange,
} from "./vocab.js";

/** Options of `simulate` as a caller gives them. */
export interface SimulateOptions {
  /** Seed of the one PRNG everything is drawn from (integer, or any string). */
  seed: number | string;
  /** Number of users (humans and bots). */
  users: number;
  /** Span of event time over which sessions start (ms). Sessions that start late may run past it. */
  durationMs: number;
  /** Share of users that are bots. @default 0.3 */
  botFraction?: number;
  /** Exponent η of the examination probability (1/rank)^η of ranked results. @default 1 */
  positionBiasEta?: number;
  /** Event time of the start of the simulation (RFC 3339 or ms). @default "2026-01-01T00:00:00Z" (when endTime is absent) */
  startTime?: string | number;
  /**
   * Instead of startTime: the event time the traffic ends at (RFC 3339 or ms). The whole run is
   * shifted so that its last event carries exactly this time (sessions that start late run past
   * the span of session starts, so that span ends earlier). Only the timestamps depend on it:
   * the same seed and options give the same events otherwise.
   */
  endTime?: string | number;
  /** Share of events delivered minutes to hours after their event time. @default 0.01 */
  lateFraction?: number;
  /** Share of events delivered a few seconds out of order. @default 0.05 */
  outOfOrderFraction?: number;
  /** Share of events re-sent with the same event_id. @default 0.02 */
  duplicateFraction?: number;
  /** Malformed lines added, as a share of well-formed events. @default 0.005 */
  malformedFraction?: number;
}

/** Options with defaults applied and times in ms. */
export interface CompiledSimOptions {
  seed: number;
  users: number;
  durationMs: number;
  botFraction: number;
  positionBiasEta: number;
  startMs: number;
  /** Set when the caller gave endTime: the time the last event must carry (startMs is then a first guess). */
  endMs?: number;
  lateFraction: number;
  outOfOrderFraction: number;
  duplicateFraction: number;
  malformedFraction: number;
}

/** Counts describing one simulated run (what `tacit simulate` prints). */
export interface SimSummary {
  seed: number;
  lines: number;
  /** Distinct well-formed events (duplicates and malformed lines excluded). */
  events: number;
  human_events: number;
  bot_events: number;
  users: number;
  humans: number;
  bots: number;
  bots_by_kind: Record<BotKind, number>;
  sessions: number;
  queries: number;
  responses: number;
  good_responses: number;
  noise: Record<NoiseKind, number>;
  first_event_time: string | null;
  last_event_time: string | null;
}

/** What `simulate` returns: the events file, the truth file and a summary. */
export interface SimResult {
  /** JSONL lines in publish order, without trailing newlines. */
  events: string[];
  truth: TruthRecord[];
  summary: SimSummary;
}

/** Event time of the start when none is given: fixed, so output never depends on the wall clock. */
export const DEFAULT_START_TIME = "2026-01-01T00:00:00Z";

/** Event types that count as a signal about the response they name (SPEC §3). */
const SIGNAL_TYPES: ReadonlySet<EventType> = new Set<EventType>([
  "click", "copy_paste", "accept", "edit", "regenerate", "dwell", "abandon", "task_complete", "share",
]);

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
/** Most sessions one user opens, whatever the duration. */
const MAX_SESSIONS_PER_USER = 12;
/** Most regenerations of one query before the user gives up on regenerating. */
const MAX_REGENERATIONS = 3;
/** Most follow-up queries (reformulations, clarifications) in one task. */
const MAX_FOLLOW_UPS = 4;

function fraction(value: number | undefined, fallback: number, field: string): number {
  const v = value ?? fallback;
  if (!Number.isFinite(v) || v < 0 || v > 1) throw new ConfigError(`${field}: ${v} is not a fraction between 0 and 1`);
  return v;
}

/** An RFC 3339 time or ms as whole ms (event times stay whole ms, so a shift moves every timestamp by the same amount). */
function timeMs(value: string | number, field: string): number {
  const ms = typeof value === "number" ? value : Date.parse(value);
  if (!Number.isFinite(ms) || (typeof value === "string" && !/^\d{4}-\d\d-\d\dT/.test(value))) {
    throw new ConfigError(`${field}: "${value}" is not an RFC 3339 time or a number of ms`);
  }
  return Math.floor(ms);
}

/** Applies defaults and checks ranges; errors name the option at fault. */
export function compileSimOptions(o: SimulateOptions): CompiledSimOptions {
  if (!Number.isInteger(o.users) || o.users < 1) throw new ConfigError(`users: ${o.users} is not a positive integer`);
  if (!Number.isFinite(o.durationMs) || o.durationMs <= 0) throw new ConfigError(`durationMs: ${o.durationMs} is not a positive number of ms`);
  const eta = o.positionBiasEta ?? 1;
  if (!Number.isFinite(eta) || eta < 0) throw new ConfigError(`positionBiasEta: ${eta} is not a non-negative number`);
  if (o.startTime !== undefined && o.endTime !== undefined) throw new ConfigError("startTime and endTime: give one of them, not both");
  const endMs = o.endTime === undefined ? undefined : timeMs(o.endTime, "endTime");
  const startMs = endMs === undefined ? timeMs(o.startTime ?? DEFAULT_START_TIME, "startTime") : endMs - o.durationMs;
  const late = fraction(o.lateFraction, 0.01, "lateFraction");
  const ooo = fraction(o.outOfOrderFraction, 0.05, "outOfOrderFraction");
  if (late + ooo > 1) throw new ConfigError(`lateFraction + outOfOrderFraction: ${late + ooo} exceeds 1`);
  return {
    seed: seedFrom(o.seed),
    users: o.users,
    durationMs: o.durationMs,
    botFraction: fraction(o.botFraction, 0.3, "botFraction"),
    positionBiasEta: eta,
    startMs,
    ...(endMs === undefined ? {} : { endMs }),
    lateFraction: late,
    outOfOrderFraction: ooo,
    duplicateFraction: fraction(o.duplicateFraction, 0.02, "duplicateFraction"),
    malformedFraction: fraction(o.malformedFraction, 0.005, "malformedFraction"),
  };
}

/** A well-formed event as the simulator writes it (SPEC §3; key order fixed for stable bytes). */
interface SimEvent {
  event_id: string;
  session_id: string;
  user_id: string;
  timestamp: string;
  query_id?: string;
  response_id?: string;
  event_type: EventType;
  payload: Record<string, unknown>;
  user_agent: string;
  context: { device: string; app_version: string; experiment: { id: string; variant: string } };
}

interface Generated {
  t: number;
  seq: number;
  ev: SimEvent;
  bot: boolean;
}

interface SimUser {
  truth: UserTruth;
  habit: Habit | null;
  botKind: BotKind | null;
  /** Per-user base rate of accepting a response (Ziegler et al.: mean ≈ 26 %, p10–p90 12–42 %). */
  acceptRate: number;
  /** Multiplier on reading time: fast readers read in under half the time. */
  readSpeed: number;
  searchShare: number;
  appVersion: string;
  variant: "A" | "B";
}

interface Session {
  user: SimUser;
  id: string;
}

interface QueryState {
  id: string;
  answerable: boolean;
  typo: boolean;
}

type Next = "end" | "new_topic" | "reformulate" | "clarify";

interface TurnResult {
  t: number;
  next: Next;
  /** The response a reformulation would be dissatisfaction with (single LLM responses). */
  lastResponse: string | null;
}

const EXPERIMENT_ID = "exp-assistant-2026q1";
const APP_VERSIONS = ["5.12.0", "5.12.1", "5.13.0"] as const;
const COPY_DESTINATIONS = ["editor", "terminal", "document", "email", "chat"] as const;
const HABIT_WEIGHTS: Record<Habit, number> = {
  typical: 0.35,
  fast_reader: 0.15,
  heavy_editor: 0.12,
  regenerator: 0.1,
  copier: 0.15,
  mobile: 0.13,
};
const BOT_KIND_WEIGHTS: Record<BotKind, number> = { ua_bot: 0.4, regular_script: 0.3, human_paced_script: 0.3 };

const clamp = (x: number, lo: number, hi: number): number => Math.min(hi, Math.max(lo, x));
const sigmoid = (x: number): number => 1 / (1 + Math.exp(-x));
const round4 = (x: number): number => Math.round(x * 10_000) / 10_000;

/** Probability that a reader is satisfied by a response of hidden quality q. */
function satisfaction(q: number): number {
  return clamp(sigmoid(12 * (q - 0.5)), 0.03, 0.97);
}

/** Probability of clicking an examined result of quality q (attractiveness). */
function attractiveness(q: number): number {
  return 0.05 + 0.8 * sigmoid(10 * (q - 0.5));
}

class World {
  readonly rng: Rng;
  readonly opts: CompiledSimOptions;
  private readonly tag: string;
  private readonly counters = new Map<string, number>();
  readonly generated: Generated[] = [];
  readonly users: SimUser[] = [];
  readonly queries: QueryTruth[] = [];
  readonly responses = new Map<string, ResponseTruth>();
  sessions = 0;

  constructor(opts: CompiledSimOptions) {
    this.opts = opts;
    this.rng = new Rng(opts.seed);
    // Ids carry the seed so that runs with different seeds never collide in one stream.
    this.tag = opts.seed.toString(36);
  }

  id(prefix: string): string {
    const n = (this.counters.get(prefix) ?? 0) + 1;
    this.counters.set(prefix, n);
    return `${prefix}-${this.tag}-${n}`;
  }

  emit(
    s: Session,
    t: number,
    type: EventType,
    fields: { query_id?: string; response_id?: string; payload?: Record<string, unknown> } = {},
  ): void {
    const ms = Math.round(t);
    const u = s.user;
    const ev: SimEvent = {
      event_id: this.id("e"),
      session_id: s.id,
      user_id: u.truth.user_id,
      timestamp: new Date(ms).toISOString(),
      ...(fields.query_id !== undefined ? { query_id: fields.query_id } : {}),
      ...(fields.response_id !== undefined ? { response_id: fields.response_id } : {}),
      event_type: type,
      payload: fields.payload ?? {},
      user_agent: u.truth.user_agent,
      context: { device: u.truth.device, app_version: u.appVersion, experiment: { id: EXPERIMENT_ID, variant: u.variant } },
    };
    this.generated.push({ t: ms, seq: this.generated.length, ev, bot: u.truth.is_bot });
    if (fields.response_id !== undefined && SIGNAL_TYPES.has(type)) {
      const r = this.responses.get(fields.response_id);
      if (r) r.signals++;
    }
  }

  newQuery(s: Session, previous: string | null, change: QueryChange, answerable: boolean): string {
    const id = this.id("q");
    this.queries.push({
      kind: "query",
      query_id: id,
      session_id: s.id,
      user_id: s.user.truth.user_id,
      previous_query_id: previous,
      change,
      answerable,
      is_bot_user: s.user.truth.is_bot,
    });
    return id;
  }

  newResponse(s: Session, queryId: string, quality: number, position: number | null, regeneratedFrom: string | null): string {
    const id = this.id("r");
    const q = round4(quality);
    this.responses.set(id, {
      kind: "response",
      response_id: id,
      query_id: queryId,
      session_id: s.id,
      user_id: s.user.truth.user_id,
      quality: q,
      good: q >= 0.5,
      position,
      regenerated_from: regeneratedFrom,
      is_bot_user: s.user.truth.is_bot,
      signals: 0,
      outcome: null,
    });
    return id;
  }

  /** Hidden quality: answerable questions mostly get good answers; a typo degrades them. */
  quality(answerable: boolean, typo: boolean): number {
    const q = answerable ? this.rng.beta(4, 2) : this.rng.beta(1.6, 4);
    return typo ? q * 0.55 : q;
  }

  textLength(): number {
    return Math.round(clamp(this.rng.logNormal(900, 0.6), 80, 8000));
  }

  /** Reading time: long gamma for a satisfied read, short gamma for a quick back. */
  dwell(u: SimUser, satisfied: boolean, textLength: number): number {
    const lengthFactor = Math.pow(textLength / 900, 0.3);
    return satisfied
      ? this.rng.gamma(3, 12 * SECOND * u.readSpeed * lengthFactor)
      : this.rng.gamma(1.6, 3.5 * SECOND * u.readSpeed);
  }

  copyPayload(quality: number | null, textLength: number): Record<string, unknown> {
    // Span grows with quality (a good answer is copied whole, a bad one for a line at most).
    const share = quality === null ? this.rng.next() : this.rng.betaMean(0.1 + 0.7 * quality, 6);
    const spanLength = Math.max(1, Math.min(textLength, Math.round(share * textLength)));
    const spanStart = this.rng.int(0, textLength - spanLength);
    return {
      span_start: spanStart,
      span_end: spanStart + spanLength,
      span_length: spanLength,
      destination: this.rng.pick(COPY_DESTINATIONS),
    };
  }

  feedbackPayload(positive: boolean): Record<string, unknown> {
    if (this.rng.chance(0.7)) return { rating: positive ? "up" : "down" };
    return { rating: positive ? this.rng.int(4, 5) : this.rng.int(1, 2) };
  }
}

// ───────────────────────────── users ─────────────────────────────

function makeUsers(w: World): void {
  const { rng, opts } = w;
  const botCount = Math.round(opts.users * opts.botFraction);
  const isBot = rng.shuffle(Array.from({ length: opts.users }, (_, i) => i < botCount));
  for (let i = 0; i < opts.users; i++) {
    const userId = w.id("u");
    const bot = isBot[i]!;
    const botKind = bot ? rng.weighted(BOT_KIND_WEIGHTS) : null;
    const habit = bot ? null : rng.weighted(HABIT_WEIGHTS);
    const device: "desktop" | "mobile" = habit === "mobile" || (!bot && rng.chance(0.15)) ? "mobile" : "desktop";
    const ua =
      botKind === "ua_bot" ? rng.pick(CRAWLER_UAS) : device === "mobile" ? rng.pick(MOBILE_BROWSER_UAS) : rng.pick(DESKTOP_BROWSER_UAS);
    const propensity = round4(clamp(rng.logNormal(1, 0.3), 0.4, 2.2));
    w.users.push({
      truth: { kind: "user", user_id: userId, is_bot: bot, bot_kind: botKind, habit, propensity, device, user_agent: ua },
      habit,
      botKind,
      acceptRate: rng.betaMean(0.26, 12),
      readSpeed: (habit === "fast_reader" ? 0.45 : 1) * (device === "mobile" ? 0.8 : 1),
      searchShare: device === "mobile" ? 0.3 : 0.35,
      appVersion: rng.pick(APP_VERSIONS),
      variant: rng.chance(0.5) ? "A" : "B",
    });
  }
}

// ───────────────────────────── humans ─────────────────────────────

/** One single-response LLM turn, including regenerations, until the user moves on. */
function llmTurn(w: World, s: Session, start: number, qs: QueryState): TurnResult {
  const { rng } = w;
  const u = s.user;
  const prop = u.truth.propensity;
  let t = start;
  let previous: string | null = null;
  let regens = 0;
  for (;;) {
    const quality = w.quality(qs.answerable, qs.typo);
    const rid = w.newResponse(s, qs.id, quality, null, previous);
    const textLength = w.textLength();
    t += rng.uniform(400, 3500);
    w.emit(s, t, "response_shown", {
      query_id: qs.id,
      response_id: rid,
      payload: { model: u.variant === "A" ? "assistant-l-2026-01" : "assistant-l-2026-02", text_length: textLength },
    });
    const shownAt = t;
    const satisfied = rng.chance(satisfaction(quality));
    const readEnd = shownAt + w.dwell(u, satisfied, textLength);
    let te = readEnd;
    const after = (): number => (te += rng.gamma(1.5, 1200));
    const dwellEvent = (always = false): void => {
      if (always || rng.chance(0.85)) {
        w.emit(s, readEnd, "dwell", {
          query_id: qs.id,
          response_id: rid,
          payload: { dwell_ms: Math.round(readEnd - shownAt), scroll_depth: round4(satisfied ? rng.uniform(0.6, 1) : rng.uniform(0.05, 0.5)) },
        });
      }
    };
    const ids = { query_id: qs.id, response_id: rid };

    // Habitual regenerators regenerate whatever the quality; others mostly after a bad read.
    const regenerate =
      regens < MAX_REGENERATIONS &&
      (u.habit === "regenerator" ? rng.chance(satisfied ? 0.45 : 0.85) : !satisfied && rng.chance(clamp(0.35 * prop, 0, 0.9)));
    if (regenerate) {
      dwellEvent();
      w.emit(s, after(), "regenerate", ids);
      regens++;
      previous = rid;
      t = te;
      continue;
    }

    if (satisfied) {
      // The answer was in the response: read and left, nothing else needed.
      const goodAbandonment = qs.answerable && quality >= 0.5 && rng.chance(u.truth.device === "mobile" ? 0.4 : 0.15);
      if (goodAbandonment) {
        dwellEvent(true);
        w.emit(s, after(), "abandon", ids);
        w.responses.get(rid)!.outcome = "good_abandonment";
        return { t: te, next: rng.chance(0.5) ? "new_topic" : "end", lastResponse: rid };
      }
      dwellEvent();
      let used = false;
      const copyP = u.habit === "copier" ? 0.85 : u.truth.device === "mobile" ? 0.15 : 0.35;
      if (rng.chance(clamp(copyP * prop, 0, 0.95))) {
        w.emit(s, after(), "copy_paste", { ...ids, payload: w.copyPayload(quality, textLength) });
        used = true;
      }
      if (u.habit === "heavy_editor" ? rng.chance(0.9) : rng.chance(0.15)) {
        // Heavy editors touch up even good answers, but lightly.
        const d = u.habit === "heavy_editor" ? rng.betaMean(0.28, 9) : rng.betaMean(0.12, 10);
        w.emit(s, after(), "edit", { ...ids, payload: { edit_distance: Math.round(d * textLength), original_length: textLength } });
        used = true;
      } else if (rng.chance(clamp(u.acceptRate * 2.2 * prop, 0, 0.92))) {
        // Fast readers accept before they could have read it all (a quick accept).
        const at = u.habit === "fast_reader" ? shownAt + rng.gamma(2, 900) : after();
        w.emit(s, at, "accept", ids);
        used = true;
      }
      if (rng.chance(used ? 0.55 : 0.25)) w.emit(s, after(), "task_complete", { ...ids, payload: { outcome: "success" } });
      if (rng.chance(clamp(0.04 * prop, 0, 1))) w.emit(s, after(), "share", ids);
      if (rng.chance(0.04)) w.emit(s, after(), "explicit_feedback", { ...ids, payload: w.feedbackPayload(rng.chance(0.92)) });
      const r = rng.next();
      return { t: te, next: r < 0.15 ? "clarify" : r < 0.6 ? "new_topic" : "end", lastResponse: rid };
    }

    dwellEvent();
    let heavyEdit = false;
    if (rng.chance(u.habit === "heavy_editor" ? 0.7 : 0.1)) {
      const d = rng.betaMean(0.7, 8);
      w.emit(s, after(), "edit", { ...ids, payload: { edit_distance: Math.round(d * textLength), original_length: textLength } });
      heavyEdit = true;
    }
    // Implicit feedback is noisy: some users accept or copy a bad answer anyway.
    if (!heavyEdit && rng.chance(clamp(u.acceptRate * 0.3 * prop, 0, 1))) w.emit(s, after(), "accept", ids);
    if (rng.chance(clamp(0.06 * prop, 0, 1))) w.emit(s, after(), "copy_paste", { ...ids, payload: w.copyPayload(quality, textLength) });
    if (rng.chance(0.05)) w.emit(s, after(), "explicit_feedback", { ...ids, payload: w.feedbackPayload(rng.chance(0.1)) });
    if (heavyEdit) {
      if (rng.chance(0.2)) w.emit(s, after(), "task_complete", { ...ids, payload: { outcome: "success" } });
      return { t: te, next: "end", lastResponse: rid };
    }
    const choice = rng.weighted({ reformulate: 0.55, abandon: 0.25, regenerate: regens < MAX_REGENERATIONS ? 0.2 : 0 });
    if (choice === "regenerate") {
      w.emit(s, after(), "regenerate", ids);
      regens++;
      previous = rid;
      t = te;
      continue;
    }
    if (choice === "abandon") {
      w.emit(s, after(), "abandon", ids);
      return { t: te, next: "end", lastResponse: rid };
    }
    return { t: te, next: "reformulate", lastResponse: rid };
  }
}

/** One ranked-list turn: position-biased examination, clicks, dwell, quick backs. */
function searchTurn(w: World, s: Session, start: number, qs: QueryState): TurnResult {
  const { rng } = w;
  const u = s.user;
  const k = rng.int(5, 10);
  // The ranker is informative but imperfect: it orders by quality plus noise.
  const ranked = Array.from({ length: k }, () => {
    const q = w.quality(qs.answerable, qs.typo);
    return { q, score: q + rng.normal(0, 0.2) };
  }).sort((a, b) => b.score - a.score);
  const t = start + rng.uniform(300, 1500);
  const lengths = ranked.map(() => w.textLength());
  const rids = ranked.map((c, i) => {
    const rid = w.newResponse(s, qs.id, c.q, i + 1, null);
    w.emit(s, t + i, "response_shown", {
      query_id: qs.id,
      response_id: rid,
      payload: { position: i + 1, candidates: k, model: "ranker-2026-01", text_length: lengths[i]! },
    });
    return rid;
  });
  let tc = t + rng.gamma(2, 700);
  let clicked = false;
  let satisfiedAny = false;
  for (let i = 0; i < k; i++) {
    tc += rng.gamma(1.2, 500);
    const pos = i + 1;
    if (!rng.chance(Math.pow(1 / pos, w.opts.positionBiasEta))) continue;
    const c = ranked[i]!;
    if (!rng.chance(attractiveness(c.q))) continue;
    const ids = { query_id: qs.id, response_id: rids[i]! };
    w.emit(s, tc, "click", { ...ids, payload: { position: pos } });
    clicked = true;
    const satisfied = rng.chance(satisfaction(c.q));
    const d = w.dwell(u, satisfied, lengths[i]!);
    tc += d;
    if (rng.chance(0.9)) {
      w.emit(s, tc, "dwell", {
        ...ids,
        payload: { dwell_ms: Math.round(d), scroll_depth: round4(satisfied ? rng.uniform(0.5, 1) : rng.uniform(0.02, 0.3)) },
      });
    }
    if (satisfied) {
      satisfiedAny = true;
      if (rng.chance(clamp(0.15 * u.truth.propensity, 0, 0.9))) {
        tc += rng.gamma(1.5, 1000);
        w.emit(s, tc, "copy_paste", { ...ids, payload: w.copyPayload(c.q, lengths[i]!) });
      }
      if (rng.chance(0.3)) {
        tc += rng.gamma(1.5, 1000);
        w.emit(s, tc, "task_complete", { ...ids, payload: { outcome: "success" } });
      }
      if (rng.chance(0.75)) break;
    }
    tc += rng.gamma(1.5, 700);
  }
  if (!clicked) {
    const top = ranked[0]!;
    const topId = rids[0]!;
    if (qs.answerable && top.q >= 0.5 && rng.chance(u.truth.device === "mobile" ? 0.5 : 0.3)) {
      // The answer was on the page: read, then left without clicking.
      const d = w.dwell(u, true, lengths[0]!);
      tc += d;
      w.emit(s, tc, "dwell", { query_id: qs.id, response_id: topId, payload: { dwell_ms: Math.round(d), scroll_depth: round4(rng.uniform(0.2, 0.6)) } });
      tc += rng.gamma(1.5, 800);
      w.emit(s, tc, "abandon", { query_id: qs.id, response_id: topId });
      w.responses.get(topId)!.outcome = "good_abandonment";
      return { t: tc, next: rng.chance(0.5) ? "new_topic" : "end", lastResponse: null };
    }
    if (rng.chance(0.65)) return { t: tc, next: "reformulate", lastResponse: null };
    tc += rng.gamma(1.5, 800);
    w.emit(s, tc, "abandon", { query_id: qs.id, response_id: topId });
    return { t: tc, next: "end", lastResponse: null };
  }
  if (satisfiedAny) {
    const r = rng.next();
    return { t: tc, next: r < 0.1 ? "clarify" : r < 0.55 ? "new_topic" : "end", lastResponse: null };
  }
  return { t: tc, next: rng.chance(0.6) ? "reformulate" : "end", lastResponse: null };
}

/** One task: a query and its follow-ups (reformulations, clarifications). */
function task(w: World, s: Session, start: number, previousQuery: string | null): { t: number; next: Next; lastQuery: string } {
  const { rng } = w;
  let clean = newTopicQuery(rng);
  let typo = rng.chance(0.15);
  let shown = typo ? withTypo(rng, clean) : clean;
  typo = typo && shown !== clean;
  if (rng.chance(0.02)) shown = `${shown}, ${rng.pick(PII_SNIPPETS)}`;
  let answerable = rng.chance(0.7);
  let change: QueryChange = previousQuery === null ? "first" : "new_topic";
  let prev = previousQuery;
  let t = start;
  for (let depth = 0; ; depth++) {
    const qid = w.newQuery(s, prev, change, answerable);
    w.emit(s, t, "query", { query_id: qid, payload: { text: shown } });
    const qs: QueryState = { id: qid, answerable, typo };
    const res = rng.chance(s.user.searchShare) ? searchTurn(w, s, t, qs) : llmTurn(w, s, t, qs);
    prev = qid;
    t = res.t;
    if (depth >= MAX_FOLLOW_UPS || (res.next !== "reformulate" && res.next !== "clarify")) {
      return { t, next: res.next === "new_topic" ? "new_topic" : "end", lastQuery: qid };
    }
    if (res.next === "reformulate") {
      // The follow-up query is itself a signal about the response it replaces.
      if (res.lastResponse !== null) w.responses.get(res.lastResponse)!.signals++;
      if (typo) {
        shown = clean;
        typo = false;
        change = "spelling_fix";
      } else {
        const r = reformulate(rng, clean);
        clean = r.text;
        shown = clean;
        change = r.change;
        answerable = rng.chance(0.75);
      }
      t += 2 * SECOND + rng.gamma(2, 6 * SECOND);
    } else {
      clean = clarify(rng, clean);
      shown = clean;
      change = "clarification";
      t += rng.uniform(8 * SECOND, 90 * SECOND);
    }
  }
}

function humanSession(w: World, s: Session, start: number): number {
  let t = start;
  let prev: string | null = null;
  for (let i = 0; i < 4; i++) {
    const r = task(w, s, t, prev);
    prev = r.lastQuery;
    t = r.t;
    if (r.next !== "new_topic") break;
    t += w.rng.gamma(2, MINUTE);
  }
  return t;
}

// ───────────────────────────── bots ─────────────────────────────

/** Crawler user agent, uneven fast gaps, actions unrelated to quality. */
function uaBotSession(w: World, s: Session, start: number): number {
  const { rng } = w;
  let t = start;
  const gap = (): number => rng.uniform(200, 2500);
  const queries = rng.int(4, 15);
  for (let n = 0; n < queries; n++) {
    const answerable = rng.chance(0.7);
    const qid = w.newQuery(s, null, n === 0 ? "first" : "new_topic", answerable);
    w.emit(s, t, "query", { query_id: qid, payload: { text: newTopicQuery(rng) } });
    t += gap();
    if (rng.chance(0.5)) {
      const k = rng.int(5, 10);
      const rids = Array.from({ length: k }, (_, i) => {
        const rid = w.newResponse(s, qid, w.quality(answerable, false), i + 1, null);
        w.emit(s, t, "response_shown", { query_id: qid, response_id: rid, payload: { position: i + 1, candidates: k, text_length: rng.int(120, 320) } });
        return rid;
      });
      for (let c = rng.int(0, 3); c > 0; c--) {
        t += gap();
        const i = rng.int(0, k - 1);
        w.emit(s, t, "click", { query_id: qid, response_id: rids[i]!, payload: { position: i + 1 } });
        if (rng.chance(0.4)) w.emit(s, t + 300, "dwell", { query_id: qid, response_id: rids[i]!, payload: { dwell_ms: rng.int(100, 1500) } });
      }
    } else {
      const len = w.textLength();
      const rid = w.newResponse(s, qid, w.quality(answerable, false), null, null);
      w.emit(s, t, "response_shown", { query_id: qid, response_id: rid, payload: { text_length: len } });
      t += gap();
      if (rng.chance(0.5)) w.emit(s, t, "copy_paste", { query_id: qid, response_id: rid, payload: w.copyPayload(null, len) });
      if (rng.chance(0.3)) w.emit(s, t + gap(), "accept", { query_id: qid, response_id: rid });
    }
    t += gap();
  }
  return t;
}

/** Browser user agent, metronomic gaps (coefficient of variation ≈ 1 %). */
function regularScriptSession(w: World, s: Session, start: number): number {
  const { rng } = w;
  const period = rng.uniform(1000, 6000);
  let t = start;
  const tick = (): number => (t += period + rng.normal(0, period * 0.01));
  const steps = rng.int(20, 80);
  let emitted = 0;
  while (emitted < steps) {
    const answerable = rng.chance(0.7);
    const qid = w.newQuery(s, null, emitted === 0 ? "first" : "new_topic", answerable);
    w.emit(s, tick(), "query", { query_id: qid, payload: { text: newTopicQuery(rng) } });
    let rid = w.newResponse(s, qid, w.quality(answerable, false), null, null);
    let len = w.textLength();
    w.emit(s, tick(), "response_shown", { query_id: qid, response_id: rid, payload: { text_length: len } });
    emitted += 2;
    if (rng.chance(0.4)) {
      w.emit(s, tick(), "regenerate", { query_id: qid, response_id: rid });
      const prev = rid;
      rid = w.newResponse(s, qid, w.quality(answerable, false), null, prev);
      len = w.textLength();
      w.emit(s, tick(), "response_shown", { query_id: qid, response_id: rid, payload: { text_length: len } });
      emitted += 2;
    }
    const act = rng.weighted({ accept: 0.5, copy_paste: 0.4, none: 0.1 });
    if (act === "accept") w.emit(s, tick(), "accept", { query_id: qid, response_id: rid });
    else if (act === "copy_paste") w.emit(s, tick(), "copy_paste", { query_id: qid, response_id: rid, payload: w.copyPayload(null, len) });
    if (act !== "none") emitted++;
  }
  return t;
}

/** Browser user agent, human-like random gaps, but physically impossible sequences. */
function humanPacedScriptSession(w: World, s: Session, start: number): number {
  const { rng } = w;
  let t = start;
  const gap = (): number => rng.logNormal(3500, 0.7);
  const queries = rng.int(4, 12);
  for (let n = 0; n < queries; n++) {
    const answerable = rng.chance(0.7);
    const qid = w.newQuery(s, null, n === 0 ? "first" : "new_topic", answerable);
    w.emit(s, t, "query", { query_id: qid, payload: { text: newTopicQuery(rng) } });
    t += gap();
    const len = w.textLength();
    const rid = w.newResponse(s, qid, w.quality(answerable, false), null, null);
    const shownAt = t;
    w.emit(s, shownAt, "response_shown", { query_id: qid, response_id: rid, payload: { text_length: len } });
    const ids = { query_id: qid, response_id: rid };
    if (rng.chance(0.35)) {
      const impossible = rng.weighted({ click_before_shown: 2, copy_longer_than_response: 2, dwell_longer_than_elapsed: 0.5, accept_before_shown: 0.5 });
      if (impossible === "click_before_shown") w.emit(s, shownAt - rng.uniform(200, 2000), "click", { ...ids, payload: { position: 1 } });
      else if (impossible === "accept_before_shown") w.emit(s, shownAt - rng.uniform(200, 2000), "accept", ids);
      else if (impossible === "copy_longer_than_response") {
        const spanLength = len + rng.int(10, 500);
        w.emit(s, shownAt + gap(), "copy_paste", { ...ids, payload: { span_start: 0, span_end: spanLength, span_length: spanLength } });
      } else {
        const at = shownAt + rng.uniform(500, 1500);
        w.emit(s, at, "dwell", { ...ids, payload: { dwell_ms: Math.round(rng.uniform(30, 300) * SECOND) } });
      }
    }
    for (let a = rng.int(1, 2); a > 0; a--) {
      t += gap();
      const act = rng.weighted({ copy_paste: 1, accept: 1, dwell: 1, regenerate: 0.5 });
      if (act === "copy_paste") w.emit(s, t, "copy_paste", { ...ids, payload: w.copyPayload(null, len) });
      else if (act === "dwell") w.emit(s, t, "dwell", { ...ids, payload: { dwell_ms: Math.round(t - shownAt) } });
      else w.emit(s, t, act, ids);
    }
    t += gap();
  }
  return t;
}

// ───────────────────────────── noise ─────────────────────────────

interface Delivered {
  at: number;
  seq: number;
  line: string;
  eventId: string;
  noise?: NoiseKind;
  reason?: NoiseTruth["reason"];
  delayMs?: number;
  duplicateOf?: number;
}

const UNKNOWN_TYPES = ["hover", "mouse_move", "Click", "thumbs"] as const;
const BAD_TIMESTAMPS = ["2026-02-30T25:61:00Z", "yesterday", "1970-01-01T00:00:00Z", "2126-01-01T00:00:00Z", ""] as const;

/** A malformed line derived from a real event (new event_id, so it never shadows the real one). */
function malformed(w: World, ev: SimEvent): { line: string; reason: NonNullable<NoiseTruth["reason"]>; eventId: string } {
  const { rng } = w;
  const reason = rng.weighted({ malformed_json: 1, schema_violation: 1, unknown_event_type: 1, bad_timestamp: 1 });
  const copy: Record<string, unknown> = { ...ev, event_id: w.id("e") };
  const eventId = copy.event_id as string;
  switch (reason) {
    case "malformed_json": {
      const full = JSON.stringify(copy);
      // Any strict prefix of a JSON object is invalid JSON.
      return { line: full.slice(0, rng.int(1, full.length - 2)), reason, eventId };
    }
    case "schema_violation": {
      const how = rng.int(0, 2);
      if (how === 0) delete copy.user_id;
      else if (how === 1) copy.session_id = rng.int(1, 1_000_000);
      else copy.payload = "not-an-object";
      return { line: JSON.stringify(copy), reason, eventId };
    }
    case "unknown_event_type":
      copy.event_type = rng.pick(UNKNOWN_TYPES);
      return { line: JSON.stringify(copy), reason, eventId };
    default:
      copy.timestamp = rng.pick(BAD_TIMESTAMPS);
      return { line: JSON.stringify(copy), reason, eventId };
  }
}

function deliver(w: World): { lines: string[]; noise: NoiseTruth[]; events: { t: number; bot: boolean }[] } {
  const { rng, opts } = w;
  // The ratings emitted inline are replaced by the explicit-rating model (explicitRatings); they
  // still take their draws here, so every other line stays as it was.
  const replaced = new Set(w.generated.filter((g) => g.ev.event_type === "explicit_feedback").map((g) => g.ev.event_id));
  // Generation order is per user; event-time order (stable on generation order) is the baseline.
  const ordered = w.generated.slice().sort((a, b) => a.t - b.t || a.seq - b.seq);
  const out: Delivered[] = [];
  let seq = 0;
  for (const g of ordered) {
    const line = JSON.stringify(g.ev);
    const r = rng.next();
    let at = g.t;
    let noise: NoiseKind | undefined;
    if (r < opts.lateFraction) {
      at += rng.logUniform(2 * MINUTE, 3 * HOUR);
      noise = "late";
    } else if (r < opts.lateFraction + opts.outOfOrderFraction) {
      at += rng.uniform(0.5 * SECOND, 5 * SECOND);
      noise = "out_of_order";
    }
    const first: Delivered = { at, seq: seq++, line, eventId: g.ev.event_id, ...(noise ? { noise, delayMs: Math.round(at - g.t) } : {}) };
    out.push(first);
    if (rng.chance(opts.duplicateFraction)) {
      // Producer retries: mostly seconds later, sometimes much later.
      const delay = rng.chance(0.9) ? rng.uniform(50, 30 * SECOND) : rng.uniform(MINUTE, 30 * MINUTE);
      out.push({ at: at + delay, seq: seq++, line, eventId: g.ev.event_id, noise: "duplicate", duplicateOf: first.seq });
    }
    if (rng.chance(opts.malformedFraction)) {
      const m = malformed(w, g.ev);
      out.push({ at: at + rng.uniform(0, SECOND), seq: seq++, line: m.line, eventId: m.eventId, noise: "malformed", reason: m.reason });
    }
  }
  const ratings = explicitRatings(w, replaced);
  for (const g of ratings) out.push({ at: g.t, seq: seq++, line: JSON.stringify(g.ev), eventId: g.ev.event_id });
  const kept = out.filter((d) => !replaced.has(d.eventId));
  out.length = 0;
  out.push(...kept);
  out.sort((a, b) => a.at - b.at || a.seq - b.seq);
  const lineOfSeq = new Map<number, number>();
  out.forEach((d, i) => lineOfSeq.set(d.seq, i + 1));
  const noise: NoiseTruth[] = [];
  out.forEach((d, i) => {
    if (!d.noise) return;
    const rec: NoiseTruth = { kind: "noise", line: i + 1, noise: d.noise, event_id: d.eventId };
    if (d.reason) rec.reason = d.reason;
    if (d.duplicateOf !== undefined) rec.of_line = lineOfSeq.get(d.duplicateOf)!;
    if (d.delayMs !== undefined) rec.delay_ms = d.delayMs;
    noise.push(rec);
  });
  const events = [...w.generated.filter((g) => !replaced.has(g.ev.event_id)), ...ratings];
  return { lines: out.map((d) => d.line), noise, events };
}

/** Share of human users who give explicit ratings at all. */
const RATER_SHARE = 0.1;
/** Share of a rater's ratings whose polarity contradicts the response's hidden quality (a mis-tap, a mood). */
const RATING_NOISE = 0.04;

/**
 * The explicit-rating model: an observation channel, drawn from its own generator so that the
 * behaviour (every other event) is the same with or without it. A small share of human users rate
 * (RATER_SHARE), and they rate with the biases of explicit feedback in the field: self-selection
 * to extremes — a response far from average (very good or very bad) is rated far more often than
 * a middling one (the J-shaped distribution of online ratings, Hu, Pavlou & Zhang 2009) — and
 * numeric ratings mostly at the ends of the scale. The polarity follows the hidden quality except
 * for RATING_NOISE, so agreement with explicit ratings can be checked against the truth.
 */
function explicitRatings(w: World, replaced: ReadonlySet<string>): Generated[] {
  const rng = new Rng(`${w.opts.seed}/explicit-ratings`);
  const raters = new Map<string, SimUser>();
  for (const u of w.users) {
    const rates = !u.truth.is_bot && rng.chance(RATER_SHARE);
    u.truth.rates_explicitly = rates;
    if (rates) raters.set(u.truth.user_id, u);
  }
  // A rater rates a response after the last thing it did with it.
  const last = new Map<string, number>();
  const used = new Set<string>();
  for (const g of w.generated) {
    const rid = g.ev.response_id;
    if (rid === undefined || replaced.has(g.ev.event_id) || !raters.has(g.ev.user_id)) continue;
    last.set(rid, Math.max(last.get(rid) ?? -Infinity, g.t));
    if (g.ev.event_type !== "response_shown") used.add(rid);
  }
  const out: Generated[] = [];
  for (const r of w.responses.values()) {
    const u = raters.get(r.user_id);
    if (!u || !used.has(r.response_id)) continue;
    if (!rng.chance(0.1 + 0.6 * Math.abs(2 * r.quality - 1))) continue;
    const positive = rng.chance(RATING_NOISE) ? !r.good : r.good;
    const rating: string | number = rng.chance(0.4) ? (positive ? "up" : "down") : positive ? (rng.chance(0.8) ? 5 : 4) : rng.chance(0.8) ? 1 : 2;
    const t = Math.round(last.get(r.response_id)! + rng.gamma(2, 4 * SECOND));
    const ev: SimEvent = {
      event_id: w.id("e"),
      session_id: r.session_id,
      user_id: r.user_id,
      timestamp: new Date(t).toISOString(),
      query_id: r.query_id,
      response_id: r.response_id,
      event_type: "explicit_feedback",
      payload: { rating },
      user_agent: u.truth.user_agent,
      context: { device: u.truth.device, app_version: u.appVersion, experiment: { id: EXPERIMENT_ID, variant: u.variant } },
    };
    out.push({ t, seq: -1, ev, bot: false });
  }
  return out;
}

// ───────────────────────────── entry point ─────────────────────────────

/**
 * Generates seeded synthetic traffic with hidden ground truth: users with habits, queries with
 * hidden answerability, responses with hidden quality, position-biased clicks, gamma dwell,
 * LLM interactions, reformulations, good abandonment, bots of three kinds, and delivery noise
 * (duplicates, out-of-order, late and malformed lines). Same options → byte-identical output.
 */
export function simulate(options: SimulateOptions): SimResult {
  const opts = compileSimOptions(options);
  const first = generate(opts);
  if (opts.endMs === undefined || first.lastMs === undefined || first.lastMs === opts.endMs) return first.result;
  // Event times are the start plus offsets that do not depend on it: shifting the start by the
  // overshoot puts the last event exactly at endMs and changes nothing else.
  return generate({ ...opts, startMs: opts.startMs - (first.lastMs - opts.endMs) }).result;
}

/** One run from opts.startMs, and the time its last event carries. */
function generate(opts: CompiledSimOptions): { result: SimResult; lastMs: number | undefined } {
  const w = new World(opts);
  makeUsers(w);
  const end = opts.startMs + opts.durationMs;
  for (const user of w.users) {
    let t = opts.startMs + w.rng.uniform(0, opts.durationMs);
    for (let n = 0; n < MAX_SESSIONS_PER_USER; n++) {
      const s: Session = { user, id: w.id("s") };
      w.sessions++;
      const run =
        user.botKind === "ua_bot" ? uaBotSession : user.botKind === "regular_script" ? regularScriptSession : user.botKind === "human_paced_script" ? humanPacedScriptSession : humanSession;
      const sessionEnd = run(w, s, t);
      // Next session after more than the usual 30-minute inactivity gap.
      t = sessionEnd + 31 * MINUTE + w.rng.exponential(90 * MINUTE);
      if (t >= end) break;
    }
  }
  const { lines, noise, events } = deliver(w);

  const meta: MetaTruth = {
    kind: "meta",
    truth_version: 1,
    seed: opts.seed,
    users: opts.users,
    duration_ms: opts.durationMs,
    bot_fraction: opts.botFraction,
    position_bias_eta: opts.positionBiasEta,
    start_time: new Date(opts.startMs).toISOString(),
    lines: lines.length,
  };
  const responses = [...w.responses.values()];
  const truth: TruthRecord[] = [meta, ...w.users.map((u) => u.truth), ...w.queries, ...responses, ...noise];

  const botsByKind = Object.fromEntries(BOT_KINDS.map((k) => [k, 0])) as Record<BotKind, number>;
  for (const u of w.users) if (u.botKind) botsByKind[u.botKind]++;
  const noiseCounts: Record<NoiseKind, number> = { malformed: 0, duplicate: 0, late: 0, out_of_order: 0 };
  for (const n of noise) noiseCounts[n.noise]++;
  let first = Infinity;
  let last = -Infinity;
  for (const g of events) {
    first = Math.min(first, g.t);
    last = Math.max(last, g.t);
  }
  const botEvents = events.filter((g) => g.bot).length;
  const bots = w.users.filter((u) => u.truth.is_bot).length;
  const summary: SimSummary = {
    seed: opts.seed,
    lines: lines.length,
    events: events.length,
    human_events: events.length - botEvents,
    bot_events: botEvents,
    users: w.users.length,
    humans: w.users.length - bots,
    bots,
    bots_by_kind: botsByKind,
    sessions: w.sessions,
    queries: w.queries.length,
    responses: responses.length,
    good_responses: responses.filter((r) => r.good).length,
    noise: noiseCounts,
    first_event_time: events.length ? new Date(first).toISOString() : null,
    last_event_time: events.length ? new Date(last).toISOString() : null,
  };
  return { result: { events: lines, truth, summary }, lastMs: events.length ? Math.round(last) : undefined };
}

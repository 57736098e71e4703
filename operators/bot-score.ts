import type { JSONSchemaType } from "ajv";
import { isbot, isbotMatch } from "isbot";
import { DURATION_SCHEMA, formatDuration, parseDuration } from "../src/core/duration.js";
import { BadInputError, ConfigError, errorMessage } from "../src/core/errors.js";
import { EVENT_TYPES, type EventType, type Envelope, type TacitEvent } from "../src/core/event.js";
import type { Emit, KeyScope, KeyedInput, KeyedProcessor, LintIssue, OperatorContext, OperatorSpec, Outcome } from "../src/core/operator.js";

/*
 * bot-score: a graded score in [0, 1] per user, with the indicators that produced it.
 *
 * Every criterion has two thresholds (Duskin & Feitelson): past the hard one the indicator is
 * definite (strength 1); between the soft and the hard one it is ambivalent, with a strength in
 * [ambivalent_from, (ambivalent_from + threshold) / 2] that grows with the evidence, so one
 * full-weight ambivalent indicator alone lands a user in the ambivalent band and never in the
 * bot band. Indicators combine as a noisy-OR, score = 1 − Π(1 − weight_i · strength_i): monotone
 * in every indicator, 0 with none, and two ambivalent indicators add up.
 */

// ---------------------------------------------------------------------------------------------
// Config

/** One rate criterion: events of the user in any sliding event-time window of `window`. */
export interface RateRuleConfig {
  /** Window length, e.g. `1s`, `15m`. */
  window: string;
  /** More than this many events in one window is a definite indicator (hard threshold). */
  max_events: number;
  /** More than this many (up to `max_events`) is ambivalent (soft threshold). Default: half of `max_events`. */
  ambivalent_events?: number;
  /** Weight of this indicator in the score. @default 1 */
  weight?: number;
}

/** Configuration of the `bot-score` operator (durations as strings, parsed by `parseDuration`). */
export interface BotScoreConfig {
  /** A score at or above this routes the user's events to `<prefix>.bots`. @default 0.8 */
  threshold?: number;
  /** A score at or above this (and below `threshold`) is ambivalent: counted, passed on, never labelled. @default 0.4 */
  ambivalent_from?: number;
  user_agent?: {
    /** @default true */
    enabled?: boolean;
    /** @default 1 */
    weight?: number;
  };
  /** Rate criteria; an empty list disables the rate indicator. */
  rate?: RateRuleConfig[];
  regularity?: {
    /** @default true */
    enabled?: boolean;
    /** @default 1 */
    weight?: number;
    /** Number of most recent events (by event time) whose inter-event gaps are measured. @default 20 */
    min_events?: number;
    /** Coefficient of variation of the gaps below this is a definite indicator. @default 0.1 */
    max_cv?: number;
    /** Below this (and at least `max_cv`) is ambivalent. @default 0.2 */
    ambivalent_cv?: number;
  };
  impossible?: {
    /** A click on a response earlier (event time) than the response was shown. @default true */
    click_before_shown?: boolean;
    /** A copy of more characters than the response's `text_length`. @default true */
    copy_longer_than_response?: boolean;
    /**
     * An accept, copy_paste or edit of a response earlier than it was shown, or a dwell on it that
     * began (event time − dwell_ms) before it was shown. @default true
     */
    used_before_shown?: boolean;
    /** @default 1 */
    weight?: number;
    /** Clock skew forgiven between a response being shown and a click on it. @default "0ms" */
    tolerance?: string;
    /** Responses remembered per user (the least recently touched is forgotten first). @default 20 */
    max_responses?: number;
  };
  /**
   * How long a user's state (recent event times, responses, the sticky bot verdict) lives after
   * their last event; never shorter than the longest rate window. @default "1h"
   */
  state_ttl?: string;
  /**
   * Event types that are not user actions (impressions the client logs, several per page) and
   * so do not count toward the rate (they still count for timing regularity). @default ["response_shown"]
   */
  untimed_event_types?: EventType[];
}

const DEFAULT_RATE: RateRuleConfig[] = [
  { window: "1s", max_events: 10, ambivalent_events: 5, weight: 1 },
  { window: "15m", max_events: 300, ambivalent_events: 150, weight: 1 },
];

const weightSchema = { type: "number", minimum: 0, maximum: 1, default: 1, nullable: true, description: "Weight of the indicator in the score (0 disables it)." } as const;

/** JSON Schema of the stage config: validation, defaults and docs. */
export const botScoreSchema: JSONSchemaType<BotScoreConfig> = {
  type: "object",
  additionalProperties: false,
  description: "Scores each user's likelihood of being automated and routes bots to <prefix>.bots.",
  properties: {
    threshold: { type: "number", minimum: 0, maximum: 1, default: 0.8, nullable: true, description: "Score at or above which a user is a bot: their events go to <prefix>.bots and not on.", examples: [0.8] },
    ambivalent_from: { type: "number", minimum: 0, maximum: 1, default: 0.4, nullable: true, description: "Score at or above which (below threshold) a user is ambivalent: passed on, counted, never labelled.", examples: [0.4] },
    user_agent: {
      type: "object",
      additionalProperties: false,
      nullable: true,
      default: {},
      description: "User agent matched by isbot's full pattern (enrich's `ua.raw_is_bot`, re-checked on `ua.raw`).",
      properties: {
        enabled: { type: "boolean", default: true, nullable: true, description: "Use the user-agent indicator." },
        weight: weightSchema,
      },
    },
    rate: {
      type: "array",
      nullable: true,
      default: DEFAULT_RATE,
      description: "Event-rate criteria over sliding event-time windows (any window that contains the event).",
      examples: [DEFAULT_RATE],
      items: {
        type: "object",
        additionalProperties: false,
        required: ["window", "max_events"],
        properties: {
          window: { ...DURATION_SCHEMA, description: "Window length.", examples: ["1s", "15m"] },
          max_events: { type: "integer", minimum: 1, description: "More events than this in one window: definite.", examples: [10, 300] },
          ambivalent_events: { type: "integer", minimum: 0, nullable: true, description: "More events than this (up to max_events): ambivalent. Default: half of max_events.", examples: [5, 150] },
          weight: weightSchema,
        },
      },
    },
    regularity: {
      type: "object",
      additionalProperties: false,
      nullable: true,
      default: {},
      description: "Timing regularity: coefficient of variation (stddev / mean) of the gaps between the user's most recent events.",
      properties: {
        enabled: { type: "boolean", default: true, nullable: true, description: "Use the regularity indicator." },
        weight: weightSchema,
        min_events: { type: "integer", minimum: 3, default: 20, nullable: true, description: "How many most recent events are measured (none before that many).", examples: [20] },
        max_cv: { type: "number", minimum: 0, default: 0.1, nullable: true, description: "CV below this: definite.", examples: [0.1] },
        ambivalent_cv: { type: "number", minimum: 0, default: 0.2, nullable: true, description: "CV below this (and at least max_cv): ambivalent.", examples: [0.2] },
      },
    },
    impossible: {
      type: "object",
      additionalProperties: false,
      nullable: true,
      default: {},
      description: "Physically impossible sequences on one response (detected whichever event arrives first).",
      properties: {
        click_before_shown: { type: "boolean", default: true, nullable: true, description: "A click earlier than the response was shown." },
        copy_longer_than_response: { type: "boolean", default: true, nullable: true, description: "A copy_paste span longer than the response's text_length." },
        used_before_shown: {
          type: "boolean",
          default: true,
          nullable: true,
          description: "An accept, copy_paste or edit earlier than the response was shown, or a dwell that began (event time − dwell_ms) before it was shown.",
        },
        weight: weightSchema,
        tolerance: { ...DURATION_SCHEMA, default: "0ms", nullable: true, description: "Clock skew forgiven for click_before_shown and used_before_shown (raise it when clients and servers log with different clocks).", examples: ["0ms", "500ms"] },
        max_responses: { type: "integer", minimum: 1, default: 20, nullable: true, description: "Responses remembered per user (the least recently touched is forgotten first).", examples: [20] },
      },
    },
    untimed_event_types: {
      type: "array",
      items: { type: "string", enum: [...EVENT_TYPES] },
      default: ["response_shown"],
      nullable: true,
      description: "Event types that are not user actions (impressions the client logs, often several per page within milliseconds): they do not count toward the rate; they still count for timing regularity, where a script's metronome shows in every event.",
      examples: [["response_shown"]],
    },
    state_ttl: { ...DURATION_SCHEMA, default: "1h", nullable: true, description: "How long a user's state lives after their last event (at least the longest rate window); a bot verdict is sticky for as long.", examples: ["1h"] },
  },
};

/** The config with defaults applied and durations in ms. */
export interface CompiledBotScore {
  threshold: number;
  ambivalentFrom: number;
  userAgent: { enabled: boolean; weight: number };
  rate: { window: string; windowMs: number; maxEvents: number; ambivalentEvents: number; weight: number }[];
  regularity: { enabled: boolean; weight: number; minEvents: number; maxCv: number; ambivalentCv: number };
  impossible: { clickBeforeShown: boolean; copyLongerThanResponse: boolean; usedBeforeShown: boolean; weight: number; toleranceMs: number; maxResponses: number };
  /** State TTL: max(state_ttl, longest rate window). */
  ttlMs: number;
  /** Most event times kept per user: enough to decide every rate rule and the regularity rule. */
  ringSize: number;
  longestWindowMs: number;
  untimedTypes: ReadonlySet<string>;
}

/** Applies defaults and parses durations; throws ConfigError naming the field at fault. */
export function compileBotScore(config: BotScoreConfig = {}): CompiledBotScore {
  const threshold = config.threshold ?? 0.8;
  const ambivalentFrom = config.ambivalent_from ?? 0.4;
  const rate = (config.rate ?? DEFAULT_RATE).map((r, i) => {
    const maxEvents = r.max_events;
    const ambivalentEvents = r.ambivalent_events ?? Math.floor(maxEvents / 2);
    if (ambivalentEvents > maxEvents) throw new ConfigError(`rate[${i}].ambivalent_events (${ambivalentEvents}) is above max_events (${maxEvents})`);
    return { window: r.window, windowMs: parseDuration(r.window, `rate[${i}].window`), maxEvents, ambivalentEvents, weight: r.weight ?? 1 };
  });
  const reg = config.regularity ?? {};
  const regularity = {
    enabled: reg.enabled ?? true,
    weight: reg.weight ?? 1,
    minEvents: reg.min_events ?? 20,
    maxCv: reg.max_cv ?? 0.1,
    ambivalentCv: reg.ambivalent_cv ?? 0.2,
  };
  const imp = config.impossible ?? {};
  const impossible = {
    clickBeforeShown: imp.click_before_shown ?? true,
    copyLongerThanResponse: imp.copy_longer_than_response ?? true,
    usedBeforeShown: imp.used_before_shown ?? true,
    weight: imp.weight ?? 1,
    toleranceMs: parseDuration(imp.tolerance ?? "0ms", "impossible.tolerance"),
    maxResponses: imp.max_responses ?? 20,
  };
  const longestWindowMs = Math.max(0, ...rate.map((r) => r.windowMs));
  const ttlMs = Math.max(parseDuration(config.state_ttl ?? "1h", "state_ttl"), longestWindowMs);
  // Impressions share the ring with actions, so keep room for both (rate counts actions only).
  const ringSize = Math.max(regularity.enabled ? regularity.minEvents : 0, ...rate.map((r) => 2 * (r.maxEvents + 1)), 1);
  return {
    threshold,
    ambivalentFrom,
    userAgent: { enabled: config.user_agent?.enabled ?? true, weight: config.user_agent?.weight ?? 1 },
    rate,
    regularity,
    impossible,
    ttlMs,
    ringSize,
    longestWindowMs,
    untimedTypes: new Set(config.untimed_event_types ?? ["response_shown"]),
  };
}

// ---------------------------------------------------------------------------------------------
// Metadata and lint

function lintBotScore(config: BotScoreConfig): LintIssue[] {
  const issues: LintIssue[] = [];
  let c: CompiledBotScore;
  try {
    c = compileBotScore(config);
  } catch (err) {
    return [{ path: [], message: errorMessage(err) }];
  }
  if (c.ambivalentFrom >= c.threshold) {
    issues.push({ path: ["ambivalent_from"], message: `ambivalent_from (${c.ambivalentFrom}) must be below threshold (${c.threshold})`, hint: "the ambivalent band is [ambivalent_from, threshold)" });
  }
  c.rate.forEach((r, i) => {
    if (r.windowMs === 0) issues.push({ path: ["rate", String(i), "window"], message: "a rate window must be longer than 0" });
  });
  if (c.regularity.ambivalentCv < c.regularity.maxCv) {
    issues.push({ path: ["regularity", "ambivalent_cv"], message: `ambivalent_cv (${c.regularity.ambivalentCv}) is below max_cv (${c.regularity.maxCv})`, hint: "set ambivalent_cv ≥ max_cv, or equal to disable the ambivalent band" });
  }
  if (config.state_ttl !== undefined && parseDuration(config.state_ttl) < c.longestWindowMs) {
    issues.push({ path: ["state_ttl"], message: `state_ttl (${config.state_ttl}) is shorter than the longest rate window (${formatDuration(c.longestWindowMs)})`, hint: "state would expire before the window could fill; it is raised to the window" });
  }
  return issues;
}

/** One piece of evidence behind a score. */
export interface BotIndicator {
  name: "user_agent" | "rate" | "regularity" | "impossible" | "sticky";
  /** Strength in [0, 1] before weighting: 1 past the hard threshold, ambivalent strengths below. */
  strength: number;
  weight: number;
  /** What was measured (count, CV, …) and the limit it crossed. */
  value?: number;
  limit?: number;
  detail: string;
}

/**
 * The annotation on events passed on (`attrs.bot`). Band "bot" appears only on the one marker
 * emitted when a user's verdict turns to bot (`flagged: true`): downstream stages learn that the
 * user's earlier events came from a bot (label-derive drops the labels it holds for them).
 */
export interface BotAnnotation {
  score: number;
  band: "human" | "ambivalent" | "bot";
  indicators: BotIndicator[];
  /** Only on the marker: the user was flagged by this event. */
  flagged?: true;
}


/** A record on `<prefix>.bots`. */
export interface BotRecord {
  user: string;
  score: number;
  indicators: BotIndicator[];
  event: TacitEvent;
}

// ---------------------------------------------------------------------------------------------
// State

/**
 * A dwell's start is its event time minus dwell_ms, two whole-millisecond values each rounded on
 * the client: a read that began exactly at the impression can come out 1 ms before it.
 */
const USE_SLACK_MS = 1;

/** What is remembered of one response for impossible-sequence checks (short keys: stored per user). */
export interface ResponseMemo {
  /** Event time it was shown. */
  s?: number;
  /** Its text_length. */
  l?: number;
  /** Earliest click on it. */
  c?: number;
  /** Longest copy from it. */
  p?: number;
  /** Earliest use of it: an accept, copy or edit, or the start of a dwell (event time − dwell_ms). */
  u?: number;
  /** Last event time it was touched (eviction order). */
  t: number;
}

/** A user's state in memory. */
export interface UserState {
  v: 1;
  /** Recent event times, ascending (event time). */
  times: number[];
  /** Parallel to `times`: false where the event was an impression (not a user action). */
  act: boolean[];
  /** Newest event time seen. */
  max_ts: number;
  /** Responses seen, by response_id (a Map: ids come from input, so no prototype keys). */
  resp: Map<string, ResponseMemo>;
  /** The sticky verdict: once a bot, a bot for as long as the state lives. */
  bot?: { score: number; since: number; indicators: BotIndicator[] };
  /** The latest score (read by features). */
  score: number;
  /**
   * Newest event time at which no response is older than the state TTL: the TTL after the oldest
   * one. In memory only (a loaded state has none and is walked once): without it, every input
   * walked all of the user's responses.
   */
  quiet?: number;
}

function emptyState(): UserState {
  return { v: 1, times: [], act: [], max_ts: -Infinity, resp: new Map(), score: 0, quiet: undefined };
}

/**
 * The stored form of a user's state. Every time is an offset back from `at` (the newest event
 * time) and event times are gaps, so numbers stay short: state is parsed and written once per
 * user and batch, and its size is the operator's main cost.
 */
interface StoredState {
  v: 1;
  /** Newest event time seen (ms). */
  at: number;
  /** Latest score. */
  score: number;
  /** Event times: `at` − the oldest, then the gaps between consecutive times. */
  t: number[];
  /** Per event time, "1" for a user action, "0" for an impression; absent when all are actions. */
  k?: string;
  /**
   * Responses: [response_id, at − touched, at − shown, text_length, at − first click, longest copy,
   * at − first use] (null when unknown; the last one left out when unknown, as states written before it have it).
   */
  r: ([string, number, number | null, number | null, number | null, number | null] | [string, number, number | null, number | null, number | null, number | null, number])[];
  bot?: UserState["bot"];
}

const back = (at: number, x: number | undefined): number | null => (x === undefined ? null : at - x);
const fwd = (at: number, x: number | null): number | undefined => (x === null ? undefined : at - x);

/** Serializes a user's state (see StoredState). */
export function encodeBotState(s: UserState): string {
  const at = Number.isFinite(s.max_ts) ? s.max_ts : 0;
  const t = s.times.map((x, i) => (i === 0 ? at - x : x - s.times[i - 1]!));
  const r = [...s.resp].map(([id, m]): StoredState["r"][number] =>
    m.u === undefined ? [id, at - m.t, back(at, m.s), m.l ?? null, back(at, m.c), m.p ?? null] : [id, at - m.t, back(at, m.s), m.l ?? null, back(at, m.c), m.p ?? null, at - m.u],
  );
  const stored: StoredState = { v: 1, at, score: s.score, t, r };
  if (s.act.some((a) => !a)) stored.k = s.act.map((a) => (a ? "1" : "0")).join("");
  if (s.bot) stored.bot = s.bot;
  return JSON.stringify(stored);
}

/** Parses a stored user state; throws on anything else. */
export function decodeBotState(raw: string): UserState {
  const st = JSON.parse(raw) as StoredState;
  if (st?.v !== 1 || !Array.isArray(st.t) || !Array.isArray(st.r) || typeof st.at !== "number") throw new Error("unknown state version");
  const times: number[] = [];
  for (let i = 0; i < st.t.length; i++) times.push(i === 0 ? st.at - st.t[0]! : times[i - 1]! + st.t[i]!);
  const resp = new Map<string, ResponseMemo>();
  for (const [id, t, sh, l, c, p, u] of st.r) {
    const m: ResponseMemo = { t: st.at - t };
    const shown = fwd(st.at, sh);
    const click = fwd(st.at, c);
    if (shown !== undefined) m.s = shown;
    if (l !== null) m.l = l;
    if (click !== undefined) m.c = click;
    if (p !== null) m.p = p;
    if (typeof u === "number") m.u = st.at - u;
    resp.set(id, m);
  }
  const act = times.map((_, i) => st.k === undefined || st.k[i] !== "0");
  const s: UserState = { v: 1, times, act, max_ts: times.length ? st.at : -Infinity, resp, score: st.score ?? 0, quiet: undefined };
  if (st.bot) s.bot = st.bot;
  return s;
}

/** Inserts `t` keeping ascending order (usually appends: events arrive roughly in time order). */
function insertSorted(times: number[], t: number, act: boolean[], isAct: boolean): void {
  let i = times.length;
  while (i > 0 && times[i - 1]! > t) i--;
  times.splice(i, 0, t);
  act.splice(i, 0, isAct);
}

/** Largest number of events in any window [s, s + w) that contains `t` (events in `times`, ascending). */
export function maxInWindowContaining(times: readonly number[], t: number, w: number): number {
  let best = 0;
  let j = 0;
  for (let i = 0; i < times.length; i++) {
    const s = times[i]!;
    if (s <= t - w) continue;
    if (s > t) break;
    if (j < i) j = i;
    while (j < times.length && times[j]! < s + w) j++;
    best = Math.max(best, j - i);
  }
  return best;
}

/** Coefficient of variation (population stddev / mean) of the gaps between consecutive times; 0 when the mean gap is 0. */
export function gapCv(times: readonly number[]): number {
  const n = times.length - 1;
  if (n < 1) return NaN;
  let sum = 0;
  for (let i = 1; i < times.length; i++) sum += times[i]! - times[i - 1]!;
  const mean = sum / n;
  if (mean === 0) return 0;
  let sq = 0;
  for (let i = 1; i < times.length; i++) sq += (times[i]! - times[i - 1]! - mean) ** 2;
  return Math.sqrt(sq / n) / mean;
}

/** Noisy-OR of weighted strengths: 1 − Π(1 − w·s), in [0, 1]. */
export function combineIndicators(indicators: readonly Pick<BotIndicator, "strength" | "weight">[]): number {
  let keep = 1;
  for (const i of indicators) keep *= 1 - Math.min(1, Math.max(0, i.weight * i.strength));
  return 1 - keep;
}

const round = (x: number): number => Math.round(x * 1e4) / 1e4;

// ---------------------------------------------------------------------------------------------
// Operator

/** The bot-score operator. */
export const botScore: OperatorSpec<BotScoreConfig, KeyedProcessor<UserState>> = {
  name: "bot-score",
  summary: "Graded per-user bot score from user agent, event rate, timing regularity and impossible sequences; bots go to <prefix>.bots.",
  description:
    "Scores every event's user in [0, 1] from four indicators, each with a soft and a hard threshold (Duskin & Feitelson): " +
    "a user agent matched by isbot's full pattern; more than max_events events in any sliding event-time window; gaps between the " +
    "last min_events events with a coefficient of variation below max_cv; physically impossible sequences (a click, accept, copy or edit " +
    "before the response was shown, a dwell that began before it, a copy longer than the response). Past its hard threshold an indicator's strength is 1; in its " +
    "ambivalent band it grows from ambivalent_from to halfway to threshold, so one ambivalent indicator alone never makes a " +
    "bot. Indicators combine as 1 − Π(1 − weight·strength). At or above " +
    "`threshold` the event goes to <prefix>.bots (not on), and the verdict sticks for the state TTL; in [ambivalent_from, threshold) " +
    "it goes on with attrs.bot.band = \"ambivalent\" (label-derive makes no labels from it); below, band \"human\". " +
    "The event that turns a user's verdict to bot (once per state lifetime) also goes on, once, as a marker to `next`: the same " +
    "envelope with attrs.bot = {score, band: \"bot\", indicators, flagged: true} and emit id <stage>:<src.seq>:flagged. Later " +
    "keyed stages pass the marker on without using it; label-derive drops the labels it holds for the user on probation and " +
    "makes no more labels of that user.",
  keyed: true,
  schema: botScoreSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:state",
      holds:
        "`<applied seq>:<JSON>`: the stream sequence of the last input applied (the runtime's exactly-once guard), then recent event times " +
        "(at most max(min_events, 2 × (max_events + 1))), responses seen (shown time, text_length, first click, first use, longest copy; at most max_responses), " +
        "the sticky bot verdict, the latest score",
      ttl: "state_ttl (≥ the longest rate window) after the user's latest event time: an event later than that starts afresh; the key expires state_ttl after its last write",
    },
  ],
  outputs: ["bots"],
  examples: [
    { title: "Defaults (10 events in 1 s or 300 in 15 min, CV < 0.1 over 20 events)", config: {} },
    {
      title: "Stricter, ignoring the user agent",
      config: {
        threshold: 0.7,
        ambivalent_from: 0.3,
        user_agent: { enabled: false },
        rate: [{ window: "1s", max_events: 8, ambivalent_events: 4 }, { window: "15m", max_events: 200 }],
        regularity: { min_events: 16, max_cv: 0.15, ambivalent_cv: 0.3 },
        impossible: { tolerance: "250ms" },
        state_ttl: "2h",
      },
    },
  ],
  lint: lintBotScore,
  create: (config, ctx) => createBotScore(compileBotScore(config), ctx),
};

function createBotScore(c: CompiledBotScore, ctx: OperatorContext): KeyedProcessor<UserState> {
  // Counters start at zero: every band (README "SLIs and alerts", M5 bot-filter ratio).
  for (const band of ["human", "ambivalent", "bot"]) ctx.metrics.count("bot_band", 0, { band });
  /** Ambivalent strength: from ambivalent_from up to halfway to threshold as `frac` goes 0 → 1. */
  const ambivalent = (frac: number): number => c.ambivalentFrom + ((c.threshold - c.ambivalentFrom) / 2) * Math.min(1, Math.max(0, frac));

  function rememberResponse(s: UserState, id: string, ts: number): ResponseMemo {
    let memo = s.resp.get(id);
    if (!memo) {
      s.resp.set(id, (memo = { t: ts }));
      if (s.quiet !== undefined) s.quiet = Math.min(s.quiet, ts + c.ttlMs);
    }
    memo.t = Math.max(memo.t, ts);
    if (s.resp.size > c.impossible.maxResponses) {
      const ids = [...s.resp.keys()].sort((a, b) => s.resp.get(a)!.t - s.resp.get(b)!.t || (a < b ? -1 : 1));
      for (const old of ids.slice(0, ids.length - c.impossible.maxResponses)) if (old !== id) s.resp.delete(old);
    }
    return memo;
  }

  /** Updates the user's state with the event and returns the indicators it triggers. */
  function observe(s: UserState, ev: TacitEvent): BotIndicator[] {
    const found: BotIndicator[] = [];
    const ts = ev.ts;

    if (c.userAgent.enabled && c.userAgent.weight > 0) {
      const raw = ev.ua?.raw;
      if (ev.ua?.raw_is_bot === true || (raw !== undefined && isbot(raw))) {
        const match = raw !== undefined ? isbotMatch(raw) : null;
        found.push({ name: "user_agent", strength: 1, weight: c.userAgent.weight, detail: match ? `user agent matches isbot ("${match}")` : "user agent flagged as a bot by enrich" });
      }
    }

    // Impressions are logged by the client (a results page sends several within milliseconds),
    // not done by the user: they do not count toward the rate. They do count for timing
    // regularity, where a script's metronome shows in every event it sends.
    const isAction = !c.untimedTypes.has(ev.event_type);
    insertSorted(s.times, ts, s.act, isAction);
    s.max_ts = Math.max(s.max_ts, ts);
    const keepAtLeast = c.regularity.enabled ? c.regularity.minEvents : 0;
    while (s.times.length > keepAtLeast && s.times[0]! <= s.max_ts - c.longestWindowMs) {
      s.times.shift();
      s.act.shift();
    }
    while (s.times.length > c.ringSize) {
      s.times.shift();
      s.act.shift();
    }
    const actions = s.act.every((a) => a) ? s.times : s.times.filter((_, i) => s.act[i]);

    for (const r of isAction ? c.rate : []) {
      if (r.weight <= 0) continue;
      const n = maxInWindowContaining(actions, ts, r.windowMs);
      if (n > r.maxEvents) {
        found.push({ name: "rate", strength: 1, weight: r.weight, value: n, limit: r.maxEvents, detail: `${n} events in ${r.window} (more than ${r.maxEvents})` });
      } else if (n > r.ambivalentEvents) {
        const frac = (n - r.ambivalentEvents) / (r.maxEvents - r.ambivalentEvents + 1);
        found.push({ name: "rate", strength: round(ambivalent(frac)), weight: r.weight, value: n, limit: r.ambivalentEvents, detail: `${n} events in ${r.window} (ambivalent: more than ${r.ambivalentEvents}, at most ${r.maxEvents})` });
      }
    }

    if (c.regularity.enabled && c.regularity.weight > 0 && s.times.length >= c.regularity.minEvents) {
      const cv = gapCv(s.times.slice(-c.regularity.minEvents));
      const { maxCv, ambivalentCv, minEvents } = c.regularity;
      if (cv < maxCv) {
        found.push({ name: "regularity", strength: 1, weight: c.regularity.weight, value: round(cv), limit: maxCv, detail: `gap CV ${round(cv)} over the last ${minEvents} events (below ${maxCv})` });
      } else if (cv < ambivalentCv) {
        const frac = (ambivalentCv - cv) / (ambivalentCv - maxCv);
        found.push({ name: "regularity", strength: round(ambivalent(frac)), weight: c.regularity.weight, value: round(cv), limit: ambivalentCv, detail: `gap CV ${round(cv)} over the last ${minEvents} events (ambivalent: below ${ambivalentCv})` });
      }
    }

    const rid = ev.response_id;
    const imp = c.impossible;
    if (rid !== undefined && (imp.clickBeforeShown || imp.copyLongerThanResponse || imp.usedBeforeShown)) {
      const memo = rememberResponse(s, rid, ts);
      const impossible = (detail: string) => found.push({ name: "impossible", strength: 1, weight: imp.weight, detail });
      if (ev.event_type === "response_shown") {
        memo.s = memo.s === undefined ? ts : Math.min(memo.s, ts);
        const len = ev.payload.text_length;
        if (typeof len === "number" && Number.isFinite(len)) memo.l = len;
        if (imp.clickBeforeShown && memo.c !== undefined && memo.c + imp.toleranceMs < memo.s) impossible(`click on ${rid} ${memo.s - memo.c} ms before it was shown`);
        if (imp.copyLongerThanResponse && memo.p !== undefined && memo.l !== undefined && memo.p > memo.l) impossible(`copy of ${memo.p} characters from ${rid}, which has ${memo.l}`);
        if (imp.usedBeforeShown && memo.u !== undefined && memo.u + imp.toleranceMs + USE_SLACK_MS < memo.s) impossible(`${rid} used ${memo.s - memo.u} ms before it was shown`);
      } else if (ev.event_type === "click") {
        memo.c = memo.c === undefined ? ts : Math.min(memo.c, ts);
        if (imp.clickBeforeShown && memo.s !== undefined && ts + imp.toleranceMs < memo.s) impossible(`click on ${rid} ${memo.s - ts} ms before it was shown`);
      } else if (ev.event_type === "copy_paste") {
        const p = ev.payload;
        const span = typeof p.span_length === "number" ? p.span_length : typeof p.span_end === "number" && typeof p.span_start === "number" ? p.span_end - p.span_start : undefined;
        if (span !== undefined && Number.isFinite(span)) {
          memo.p = Math.max(memo.p ?? 0, span);
          if (imp.copyLongerThanResponse && memo.l !== undefined && span > memo.l) impossible(`copy of ${span} characters from ${rid}, which has ${memo.l}`);
        }
      }
      if (imp.usedBeforeShown) {
        const d = ev.event_type === "dwell" ? ev.payload.dwell_ms : undefined;
        const start =
          ev.event_type === "accept" || ev.event_type === "copy_paste" || ev.event_type === "edit"
            ? ts
            : typeof d === "number" && Number.isFinite(d) && d >= 0
              ? ts - d
              : undefined;
        if (start !== undefined) {
          memo.u = memo.u === undefined ? start : Math.min(memo.u, start);
          if (memo.s !== undefined && start + imp.toleranceMs + USE_SLACK_MS < memo.s) impossible(`${rid} used ${memo.s - start} ms before it was shown`);
        }
      }
    }
    // Forget responses not touched for the state TTL: the key's own TTL only runs from the last event.
    // A response's time only grows (`rememberResponse`), so none is due before `quiet`.
    if (s.quiet === undefined || s.max_ts > s.quiet) {
      let oldest = Infinity;
      for (const [id, m] of s.resp) {
        if (m.t < s.max_ts - c.ttlMs) s.resp.delete(id);
        else oldest = Math.min(oldest, m.t);
      }
      s.quiet = oldest + c.ttlMs;
    }
    return found;
  }

  return {
    codec: { encode: encodeBotState, decode: decodeBotState, ttlMs: () => c.ttlMs },
    // Rate windows, regularity and impossible sequences are judged on the user's events in event-time order.
    eventTimeOrder: true,
    processElement(input: KeyedInput, key: KeyScope<UserState>): Outcome {
      const env = input.envelope;
      if (!env || typeof env.event?.user !== "string" || !Number.isFinite(env.event.ts)) {
        return { emits: [], error: new BadInputError("bad_envelope", `bot-score needs an envelope with event.user and event.ts (seq ${input.seq})`) };
      }
      let s = key.get();
      // The state lives state_ttl of event time after the user's latest event: the key's own TTL
      // (wall clock, from the last write) only collects it, and a cached or replayed state must
      // not outlive it either.
      if (s === undefined || env.event.ts - s.max_ts >= c.ttlMs) s = emptyState();
      const indicators = observe(s, env.event);
      let score = round(combineIndicators(indicators));
      s.score = score;
      let flagged = false;
      if (score >= c.threshold && !s.bot) {
        s.bot = { score, since: env.event.ts, indicators };
        flagged = true;
      } else if (s.bot && score >= c.threshold) s.bot.score = Math.max(s.bot.score, score);
      if (s.bot && score < c.threshold) {
        indicators.push({ name: "sticky", strength: 1, weight: 1, value: s.bot.score, detail: `a bot since ${new Date(s.bot.since).toISOString()} (${s.bot.indicators.map((x) => x.name).join(", ")})` });
        score = s.bot.score;
      }
      key.put(s);
      const id = `${ctx.stage}:${env.src.seq}`;
      if (score >= c.threshold) {
        ctx.metrics.count("bot_band", 1, { band: "bot" });
        const record: BotRecord = { user: env.event.user, score, indicators, event: env.event };
        const emits: Emit[] = [{ to: "bots", id, value: record }];
        if (flagged) {
          // The user's earlier events went on as human or ambivalent: tell the later stages, once.
          ctx.metrics.count("bot_flagged", 1);
          const bot: BotAnnotation = { score, band: "bot", indicators, flagged: true };
          emits.push({ to: "next", id: `${id}:flagged`, value: { ...env, attrs: { ...env.attrs, bot } } satisfies Envelope });
        }
        return { emits };
      }
      const band = score >= c.ambivalentFrom ? "ambivalent" : "human";
      ctx.metrics.count("bot_band", 1, { band });
      const bot: BotAnnotation = { score, band, indicators };
      return { emits: [{ to: "next", id, value: { ...env, attrs: { ...env.attrs, bot } } satisfies Envelope }] };
    },
  };
}

import type { JSONSchemaType } from "ajv";
import { DURATION_SCHEMA, parseDuration } from "../src/core/duration.js";
import { BadInputError, errorMessage } from "../src/core/errors.js";
import type { Envelope, TacitEvent } from "../src/core/event.js";
import type { KeyScope, KeyedInput, KeyedProcessor, LintIssue, OperatorContext, OperatorSpec, Outcome, PipelineView, StateCodec } from "../src/core/operator.js";
import { compareTexts, REFORMULATION_KINDS, type ReformulationKind } from "../src/core/text.js";
import { isBotMarker } from "../src/core/event.js";

/*
 * reformulation: compares each query with the previous query of the same session and decides
 * whether it reformulates it (a similar follow-up within a short gap: dissatisfaction with the
 * previous response, Hassan et al. 2013), clarifies it (only adds context: not dissatisfaction),
 * or starts a new topic. The kind of change follows Huang & Efthimiadis (2009), tried in a fixed
 * order (see src/core/text.ts).
 */

// ---------------------------------------------------------------------------------------------
// Config

/** Configuration of the `reformulation` operator (durations as strings, parsed by `parseDuration`). */
export interface ReformulationConfig {
  /** A follow-up later than this after the previous query is a new task, whatever its text. @default "300s" */
  max_gap?: string;
  /** Character-3-gram Jaccard similarity at or above which two queries are similar. @default 0.5 */
  jaccard_min?: number;
  /** Normalized Levenshtein distance at or below which two queries are similar. @default 0.35 */
  levenshtein_max?: number;
  /** Largest edit distance (characters) of a spelling correction. @default 2 */
  spelling_max_edits?: number;
  /** Kinds that only add context: a clarification, not dissatisfaction. @default ["words_added", "superstring"] */
  clarification_kinds?: ReformulationKind[];
  /** How long the previous query of a session (its redacted text) is kept: the session gap. @default "30m" */
  state_ttl?: string;
  /** Sessions remembered per user (the oldest is forgotten first). @default 8 */
  max_sessions?: number;
}

const DEFAULT_CLARIFICATION_KINDS: ReformulationKind[] = ["words_added", "superstring"];

/** JSON Schema of the stage config: validation, defaults and docs. */
export const reformulationSchema: JSONSchemaType<ReformulationConfig> = {
  type: "object",
  additionalProperties: false,
  description: "Similarity and kind of change between consecutive queries of a session, and the decision drawn from them.",
  properties: {
    max_gap: { ...DURATION_SCHEMA, default: "300s", nullable: true, description: "Largest time between two queries for the second to be a reformulation or clarification of the first (Webis task splitting uses 300 s).", examples: ["300s", "5m"] },
    jaccard_min: { type: "number", minimum: 0, maximum: 1, default: 0.5, nullable: true, description: "Character-3-gram Jaccard at or above which queries are similar (literature: 0.5–0.75).", examples: [0.5] },
    levenshtein_max: { type: "number", minimum: 0, maximum: 1, default: 0.35, nullable: true, description: "Normalized Levenshtein distance at or below which queries are similar.", examples: [0.35] },
    spelling_max_edits: { type: "integer", minimum: 0, default: 2, nullable: true, description: "Largest Levenshtein distance, in characters, classified as a spelling correction.", examples: [2] },
    clarification_kinds: {
      type: "array",
      nullable: true,
      uniqueItems: true,
      default: DEFAULT_CLARIFICATION_KINDS,
      description: "Kinds of change that only add context: decided as clarification (scored separately, not dissatisfaction).",
      examples: [DEFAULT_CLARIFICATION_KINDS],
      items: { type: "string", enum: [...REFORMULATION_KINDS] },
    },
    state_ttl: { ...DURATION_SCHEMA, default: "30m", nullable: true, description: "How long a session's previous query is kept after it was asked; set it to the session gap so no query text outlives its session.", examples: ["30m"] },
    max_sessions: { type: "integer", minimum: 1, default: 8, nullable: true, description: "Sessions remembered per user.", examples: [8] },
  },
};

/** The config with defaults applied and durations in ms. */
export interface CompiledReformulation {
  maxGapMs: number;
  jaccardMin: number;
  levenshteinMax: number;
  spellingMaxEdits: number;
  clarificationKinds: ReadonlySet<ReformulationKind>;
  ttlMs: number;
  maxSessions: number;
}

/** Applies defaults and parses durations; throws ConfigError naming the field at fault. */
export function compileReformulation(config: ReformulationConfig = {}): CompiledReformulation {
  return {
    maxGapMs: parseDuration(config.max_gap ?? "300s", "max_gap"),
    jaccardMin: config.jaccard_min ?? 0.5,
    levenshteinMax: config.levenshtein_max ?? 0.35,
    spellingMaxEdits: config.spelling_max_edits ?? 2,
    clarificationKinds: new Set(config.clarification_kinds ?? DEFAULT_CLARIFICATION_KINDS),
    ttlMs: parseDuration(config.state_ttl ?? "30m", "state_ttl"),
    maxSessions: config.max_sessions ?? 8,
  };
}

function lintReformulation(config: ReformulationConfig, view: PipelineView): LintIssue[] {
  let c: CompiledReformulation;
  try {
    c = compileReformulation(config);
  } catch (err) {
    return [{ path: [], message: errorMessage(err) }];
  }
  const issues: LintIssue[] = [];
  if (c.maxGapMs > c.ttlMs) {
    issues.push({ path: ["max_gap"], message: `max_gap (${config.max_gap}) is longer than state_ttl (${config.state_ttl ?? "30m"})`, hint: "the previous query is forgotten after state_ttl, so no gap longer than it can be seen" });
  }
  // Query text must not outlive its session: compare with the gap of a sessionize stage, if any.
  const gap = view.stages.find((st) => st.operator === "sessionize")?.config.gap;
  if ((typeof gap === "string" || typeof gap === "number") && c.ttlMs > safeDuration(gap)) {
    issues.push({ path: ["state_ttl"], message: `state_ttl (${config.state_ttl ?? "30m"}) is longer than the session gap (${gap})`, hint: "query text would be kept after its session ended: set state_ttl to the sessionize gap" });
  }
  if (c.clarificationKinds.has("new_topic")) {
    issues.push({ path: ["clarification_kinds"], message: "new_topic cannot be a clarification", hint: "remove new_topic from clarification_kinds" });
  }
  return issues;
}

function safeDuration(value: string | number): number {
  try {
    return parseDuration(value);
  } catch {
    return Infinity; // sessionize's own schema reports a bad gap
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata

/** What the operator concludes about a query. */
export type ReformulationDecision = "reformulation" | "clarification" | "new_topic" | "none";

/** The annotation on query events (`attrs.reformulation`); null fields when there is no previous query. */
export interface ReformulationAnnotation {
  previous_query_id: string | null;
  /** The last response shown for the previous query: the one a reformulation is dissatisfied with. */
  previous_response_id: string | null;
  kind: ReformulationKind | null;
  decision: ReformulationDecision;
  /** Normalized Levenshtein distance (0 identical … 1). */
  levenshtein: number | null;
  /** Character-3-gram Jaccard similarity. */
  jaccard3: number | null;
  /** Jaccard similarity of the token sets. */
  token_overlap: number | null;
  gap_ms: number | null;
}

/** The previous query of one session (short keys: stored per user). */
export interface PrevQuery {
  /** Redacted query text. */
  text: string;
  ts: number;
  qid?: string;
  /** Last response shown for it, and when. */
  rid?: string;
  rts?: number;
}

/**
 * The previous query per session id, as `[session id, PrevQuery]` pairs (at most max_sessions, a
 * handful: a list scanned by id is as quick as a map, keeps ids from input off any prototype, and
 * is stored as it is: `{"v":1,"sessions":[[id, PrevQuery], …]}`).
 */
export interface UserState {
  v: 1;
  sessions: [string, PrevQuery][];
  /**
   * Responses shown for a query that has not arrived yet (`[session id, query_id, response_id,
   * time]`, at most MAX_EARLY): out of order, a response_shown can come before its query. When the
   * query comes, the latest of its early responses becomes the one a later reformulation refers to,
   * as it would have in event-time order.
   */
  early?: [string, string, string, number][];
}

/** Early responses (shown before their query arrived) remembered per user. */
const MAX_EARLY = 16;

/** The reformulation-similarity operator. */
export const reformulation: OperatorSpec<ReformulationConfig, KeyedProcessor<UserState>> = {
  name: "reformulation",
  summary: "Similarity, kind of change and decision (reformulation, clarification, new topic) between consecutive queries of a session.",
  description:
    "For each query, compares its (redacted) text with the previous query of the same session (attrs.session.id, else " +
    "session_id): normalized Levenshtein distance, character-3-gram Jaccard, token overlap, the time gap, and the kind of " +
    "change by the Huang & Efthimiadis (2009) taxonomy tried in a fixed order. Within max_gap, a clarification kind (words " +
    "added, superstring) is a clarification; any other kind but new_topic, or a 3-gram Jaccard ≥ jaccard_min, or a " +
    "normalized Levenshtein ≤ levenshtein_max, is a reformulation (dissatisfaction with the previous response); the rest, " +
    "and anything after max_gap, is a new topic. The first query of a session is `none`. Other events pass through; " +
    "response_shown events record the response a later reformulation refers to (one that arrives before its query is kept " +
    "until the query comes, so arrival order does not change which response that is). bot-score's flag marker (attrs.bot.band = " +
    "\"bot\") is passed on unchanged and changes no state.",
  keyed: true,
  schema: reformulationSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:state",
      holds:
        "`<applied seq>:<JSON>`: the stream sequence of the last input applied (the runtime's exactly-once guard), then per session (at most max_sessions) " +
        "the previous query's redacted text, time, query_id and last response shown (nothing after the colon while the user has no query); " +
        "responses shown before their query arrived (session, query_id, response_id, time; at most 16), until the query comes",
      ttl: "state_ttl from the last write; each session is also dropped once state_ttl of event time has passed since its query",
    },
  ],
  outputs: [],
  examples: [
    { title: "Literature defaults (300 s, 3-gram Jaccard ≥ 0.5, normalized Levenshtein ≤ 0.35)", config: {} },
    { title: "Stricter similarity, 2-minute follow-ups, spelling fixes as clarifications", config: { max_gap: "2m", jaccard_min: 0.75, levenshtein_max: 0.25, clarification_kinds: ["words_added", "superstring", "spelling_correction"], state_ttl: "30m" } },
  ],
  lint: lintReformulation,
  create: (config, ctx) => createReformulation(compileReformulation(config), ctx),
};

// ---------------------------------------------------------------------------------------------
// Implementation

const round = (x: number): number => Math.round(x * 1e4) / 1e4;

const NO_PREVIOUS: ReformulationAnnotation = {
  previous_query_id: null,
  previous_response_id: null,
  kind: null,
  decision: "none",
  levenshtein: null,
  jaccard3: null,
  token_overlap: null,
  gap_ms: null,
};

/** Compares a query with the previous one of its session and decides (exported for tests and docs). */
export function compareQueries(c: CompiledReformulation, prev: { text: string; ts: number; query_id?: string; response_id?: string }, text: string, ts: number): ReformulationAnnotation {
  const { levenshtein: lev, jaccard3: j3, tokenOverlap: overlap, kind } = compareTexts(prev.text, text, { spelling_max_edits: c.spellingMaxEdits });
  const gap = ts - prev.ts;
  let decision: ReformulationDecision;
  if (gap > c.maxGapMs) decision = "new_topic";
  else if (c.clarificationKinds.has(kind)) decision = "clarification";
  else if (kind !== "new_topic" || j3 >= c.jaccardMin || lev <= c.levenshteinMax) decision = "reformulation";
  else decision = "new_topic";
  return {
    previous_query_id: prev.query_id ?? null,
    previous_response_id: prev.response_id ?? null,
    kind,
    decision,
    levenshtein: round(lev),
    jaccard3: round(j3),
    token_overlap: round(overlap),
    gap_ms: gap,
  };
}

function sessionOf(env: Envelope): string {
  const s = env.attrs.session;
  if (s && typeof s === "object" && typeof (s as { id?: unknown }).id === "string") return (s as { id: string }).id;
  return env.event.session_id;
}

function findSession(s: UserState, sid: string): PrevQuery | undefined {
  for (const [id, q] of s.sessions) if (id === sid) return q;
  return undefined;
}

function createReformulation(c: CompiledReformulation, ctx: OperatorContext): KeyedProcessor<UserState> {
  const codec: StateCodec<UserState> = {
    encode: (s) => JSON.stringify(s),
    decode(raw) {
      const s = JSON.parse(raw) as { v?: unknown; sessions?: unknown };
      if (s?.v === 1 && Array.isArray(s.sessions)) return s as UserState;
      throw new Error("unknown state version");
    },
    ttlMs: () => c.ttlMs,
  };

  /** Forgets early responses older than the TTL (event time) and the oldest beyond MAX_EARLY. */
  function pruneEarly(s: UserState, now: number): void {
    if (!s.early) return;
    const kept = s.early.filter((e) => e[3] >= now - c.ttlMs).sort((a, b) => a[3] - b[3] || (a[2] < b[2] ? -1 : a[2] > b[2] ? 1 : 0));
    if (kept.length > MAX_EARLY) kept.splice(0, kept.length - MAX_EARLY);
    if (kept.length) s.early = kept;
    else delete s.early;
  }

  /** Moves the early responses of the query `q` (same session) onto it: the latest shown is its last response. */
  function takeEarly(s: UserState, sid: string, q: PrevQuery): void {
    if (!s.early) return;
    const rest: [string, string, string, number][] = [];
    for (const e of s.early) {
      if (e[0] !== sid || e[1] !== q.qid) rest.push(e);
      else if (q.rts === undefined || e[3] > q.rts || (e[3] === q.rts && e[2] > q.rid!)) {
        q.rid = e[2];
        q.rts = e[3];
      }
    }
    if (rest.length) s.early = rest;
    else delete s.early;
  }

  /** Forgets sessions whose query is older than the TTL (event time) and the oldest beyond max_sessions. */
  function prune(s: UserState, now: number): void {
    let n = 0;
    for (const entry of s.sessions) if (entry[1].ts >= now - c.ttlMs) s.sessions[n++] = entry;
    s.sessions.length = n;
    while (s.sessions.length > c.maxSessions) {
      let oldest = 0;
      for (let i = 1; i < s.sessions.length; i++) {
        const [sid, q] = s.sessions[i]!;
        const [osid, o] = s.sessions[oldest]!;
        if (q.ts < o.ts || (q.ts === o.ts && sid < osid)) oldest = i;
      }
      s.sessions.splice(oldest, 1);
    }
  }

  /** Applies one event to the user's state; returns the annotation for a query, or undefined. */
  function apply(key: KeyScope<UserState>, env: Envelope): ReformulationAnnotation | undefined {
    const ev: TacitEvent = env.event;
    const s = key.get();
    const sid = sessionOf(env);
    if (ev.event_type === "response_shown") {
      const prev = s && findSession(s, sid);
      if (ev.response_id === undefined) return undefined;
      if (s && prev && (ev.query_id === undefined || ev.query_id === prev.qid)) {
        // The latest shown wins (ties by response id, so arrival order does not decide).
        if (prev.rts === undefined || ev.ts > prev.rts || (ev.ts === prev.rts && ev.response_id > prev.rid!)) {
          prev.rid = ev.response_id;
          prev.rts = ev.ts;
          key.put(s);
        }
      } else if (ev.query_id !== undefined && !(prev && ev.ts < prev.ts)) {
        // Its query has not arrived yet (or is not remembered): kept until it does.
        const st = s ?? { v: 1, sessions: [] };
        const early = (st.early ??= []);
        early.push([sid, ev.query_id, ev.response_id, ev.ts]);
        pruneEarly(st, ev.ts);
        key.put(st);
      }
      return undefined;
    }
    if (ev.event_type !== "query") return undefined;

    const text = ev.payload.text as string;
    let prev: PrevQuery | undefined = s && findSession(s, sid);
    if (prev && prev.ts < ev.ts - c.ttlMs) prev = undefined;
    if (prev && ev.ts < prev.ts) {
      // Arrived after a later query of its session: which query it followed is unknown, so no comparison.
      ctx.metrics.count("reformulation_out_of_order", 1);
      return NO_PREVIOUS;
    }
    const note = prev ? compareQueries(c, { text: prev.text, ts: prev.ts, query_id: prev.qid, response_id: prev.rid }, text, ev.ts) : NO_PREVIOUS;
    const next: PrevQuery = { text, ts: ev.ts };
    const st = s ?? { v: 1, sessions: [] };
    if (ev.query_id !== undefined) {
      next.qid = ev.query_id;
      takeEarly(st, sid, next);
    }
    const at = st.sessions.findIndex(([id]) => id === sid);
    if (at >= 0) st.sessions[at]![1] = next;
    else st.sessions.push([sid, next]);
    prune(st, ev.ts);
    pruneEarly(st, ev.ts);
    key.put(st);
    return note;
  }

  return {
    codec,
    processElement(input: KeyedInput, key: KeyScope<UserState>): Outcome {
      const env = input.envelope;
      if (!env || typeof env.event?.user !== "string" || !Number.isFinite(env.event.ts)) {
        return { emits: [], error: new BadInputError("bad_envelope", `reformulation needs an envelope with event.user and event.ts (seq ${input.seq})`) };
      }
      if (isBotMarker(env)) {
        // bot-score's flag for label-derive: passed on as is, no query remembered from it.
        return { emits: [{ to: "next", id: `${ctx.stage}:${env.src.seq}`, value: env }] };
      }
      if (env.event.event_type === "query" && typeof env.event.payload?.text !== "string") {
        return { emits: [], error: new BadInputError("schema_violation", `query event ${env.event.event_id} has no payload.text (seq ${input.seq})`) };
      }
      const note = apply(key, env);
      if (note) ctx.metrics.count("reformulation_decision", 1, { decision: note.decision });
      const value: Envelope = note ? { ...env, attrs: { ...env.attrs, reformulation: note } } : env;
      return { emits: [{ to: "next", id: `${ctx.stage}:${env.src.seq}`, value }] };
    },
  };
}

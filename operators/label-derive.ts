import { createHash } from "node:crypto";
import { isAbsolute, join } from "node:path";
import type { JSONSchemaType } from "ajv";
import { projectRoot } from "../src/config/paths.js";
import { DURATION_SCHEMA, formatDuration, parseDuration } from "../src/core/duration.js";
import { BadInputError, errorMessage } from "../src/core/errors.js";
import { isBotMarker, type Envelope, type EventType, type TacitEvent } from "../src/core/event.js";
import { toLabelV1, type Label, type LabelExperiment, type LabelSignal, type SignalEventType } from "../src/core/label.js";
import type {
  Emit,
  FeatureWriter,
  KeyScope,
  KeyedInput,
  KeyedProcessor,
  LintIssue,
  OperatorContext,
  OperatorSpec,
  Outcome,
  OutputName,
  PipelineView,
  StageInput,
  StateCodec,
  TimerFiring,
  TimerOutcome,
} from "../src/core/operator.js";
import type { CommitGroup } from "../src/core/state.js";
import { editDistance } from "../src/core/text.js";
import { baselineView, emptySums, observe, type BaselineSums, type BaselineView } from "../src/labels/baselines.js";
import { combineWeight, fire, inversePropensity, propensity, type Firing } from "../src/labels/engine.js";
import { USER_FEATURES, countField, indexKey, responseFeatures, sessionFeatures } from "../src/labels/features.js";
import { loadRulesFile, loadRulesFileOnce, type CompiledRules, type FieldValue, type Fields } from "../src/labels/rules.js";

/*
 * label-derive: turns the signals of human users into weak labels with the rules of a YAML file
 * (config/label-rules.yaml by default), and keeps online features per user, response and session.
 *
 * Per user it remembers the responses it was shown (position, length, clicks, dwell, which
 * response replaced which) and its open sessions, so a signal can be judged in context; the
 * labels it has emitted (id, revision, weight), so a later signal on the same label re-emits it
 * with a higher revision; and exponentially weighted baselines of the user's habits. All of it
 * is the user's keyed state, which the runtime keeps (and writes with the user's features in one
 * atomic step); the user's event-time timer decides its sessions when the watermark passes them.
 */

// ---------------------------------------------------------------------------------------------
// Config

/** Configuration of the `label-derive` operator (durations as strings, parsed by `parseDuration`). */
export interface LabelDeriveConfig {
  /** The label rules, relative to the project root unless absolute. @default "config/label-rules.yaml" */
  rules_file?: string;
  /** Inactivity gap after which a session's labels are decided: the sessionize gap. @default "30m" */
  session_gap?: string;
  feature_ttl?: {
    /** TTL of the user's features hash and state, from its last write. @default "30d" */
    user?: string;
    /** TTL of a response's features hash. @default "7d" */
    response?: string;
    /** TTL of a session's features hash. @default "7d" */
    session?: string;
  };
  /** How long (event time) after its last signal a response is remembered for later signals and revisions. @default "24h" */
  response_memory?: string;
  /** Responses remembered per user (the least recently touched is forgotten first). @default 500 */
  max_responses?: number;
  /**
   * Hold or emit-and-retract. Held (enabled): labels of a user wait until the user is settled as
   * human: after `min_events` events, or when the watermark closes the session they belong to (a
   * flag first drops them). Emitted (disabled): labels go out at once. Either way a later flag
   * retracts what was published.
   */
  probation?: {
    /** Hold labels until the user is settled (false: emit at once, retract on a flag). @default true */
    enabled?: boolean;
    /** Events of a user (seen by this stage) after which the user is settled. @default 20 */
    min_events?: number;
  };
  /**
   * Label schema of the published labels: 2 (label.v2.json) or 1 (label.v1.json, the v2 fields
   * left out) for consumers that still validate against v1. @default 2
   */
  schema_version?: 1 | 2;
}

export const DEFAULT_RULES_FILE = "config/label-rules.yaml";

/** JSON Schema of the stage config: validation, defaults and docs. */
export const labelDeriveSchema: JSONSchemaType<LabelDeriveConfig> = {
  type: "object",
  additionalProperties: false,
  description: "Label rules, session gap, feature TTLs and the per-user memory of label-derive.",
  properties: {
    rules_file: {
      type: "string",
      nullable: true,
      minLength: 1,
      default: DEFAULT_RULES_FILE,
      description: "YAML file of label rules, relative to the project root unless absolute; loaded and validated when the stage starts and by `tacit validate`.",
      examples: [DEFAULT_RULES_FILE],
    },
    session_gap: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "30m",
      description: "A session is decided (session labels, last-click labels) when the watermark passes its last event + this gap; use the sessionize stage's gap.",
      examples: ["30m"],
    },
    feature_ttl: {
      type: "object",
      nullable: true,
      additionalProperties: false,
      default: {},
      description: "Retention of the online features (refreshed on every write).",
      properties: {
        user: { ...DURATION_SCHEMA, nullable: true, default: "30d", description: "TTL of a user's features and label state (baselines, remembered responses).", examples: ["30d"] },
        response: { ...DURATION_SCHEMA, nullable: true, default: "7d", description: "TTL of a response's features.", examples: ["7d"] },
        session: { ...DURATION_SCHEMA, nullable: true, default: "7d", description: "TTL of a session's features.", examples: ["7d"] },
      },
    },
    response_memory: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "24h",
      description:
        "How long after its last event (in event time) a response is remembered: its position, length, clicks, dwell and the labels emitted on it. A signal on a forgotten response is judged without that context.",
      examples: ["24h"],
    },
    max_responses: { type: "integer", nullable: true, minimum: 10, default: 500, description: "Responses remembered per user; the least recently touched is forgotten first.", examples: [500] },
    probation: {
      type: "object",
      nullable: true,
      additionalProperties: false,
      default: {},
      description:
        "bot-score needs evidence before it flags a user (a regular-timing script shows only after regularity.min_events events), so a " +
        "user's labels are held in its state until the user is settled as human: after min_events events of the user, or when the " +
        "watermark closes the session a label belongs to (its last event + session_gap), whichever comes first. When bot-score flags " +
        "the user before that, the held labels are dropped and the user makes no labels for as long as its state lives. The label-derived " +
        "feature weights (pos_weight, neg_weight, their *_nobase twins) count a label only once it is released. Whether held or not, a " +
        "flag retracts every label of the user already published (a revision with weight 0 and retracted: true) as far back as the " +
        "label state remembers it (response_memory). Hold or emit is a trade of label latency against labels published and later " +
        "retracted: see the README (Labels for ML teams) for both measured.",
      properties: {
        enabled: {
          type: "boolean",
          nullable: true,
          default: true,
          description: "true: hold a user's labels until it is settled (hold). false: emit them at once; a later flag retracts them (emit-and-retract).",
        },
        min_events: {
          type: "integer",
          nullable: true,
          minimum: 1,
          default: 20,
          description: "Events of a user after which it is settled and its labels flow at once: at least bot-score's regularity.min_events, so a regular-timing script is flagged first.",
          examples: [20],
        },
      },
    },
    schema_version: {
      type: "integer",
      nullable: true,
      enum: [1, 2],
      default: 2,
      description:
        "Label schema of the published labels: 2 = config/schemas/label.v2.json (the v1 fields unchanged, plus retracted, position, propensity, model, experiment, cohort, device); " +
        "1 = label.v1.json exactly (the v2 fields left out), for consumers that still validate against v1 during their migration (README: Labels for ML teams).",
      examples: [2],
    },
  },
};

/** The config with defaults applied, durations in ms and the rules file resolved. */
export interface CompiledLabelDerive {
  rulesFile: string;
  gapMs: number;
  ttl: { userMs: number; responseMs: number; sessionMs: number };
  responseMemoryMs: number;
  maxResponses: number;
  probation: { enabled: boolean; minEvents: number };
  schemaVersion: 1 | 2;
}

/** Applies defaults, parses durations and resolves the rules file; throws ConfigError naming the field. */
export function compileLabelDerive(config: LabelDeriveConfig = {}): CompiledLabelDerive {
  const file = config.rules_file ?? DEFAULT_RULES_FILE;
  const t = config.feature_ttl ?? {};
  return {
    rulesFile: isAbsolute(file) ? file : join(projectRoot(), file),
    gapMs: parseDuration(config.session_gap ?? "30m", "session_gap"),
    ttl: {
      userMs: parseDuration(t.user ?? "30d", "feature_ttl.user"),
      responseMs: parseDuration(t.response ?? "7d", "feature_ttl.response"),
      sessionMs: parseDuration(t.session ?? "7d", "feature_ttl.session"),
    },
    responseMemoryMs: parseDuration(config.response_memory ?? "24h", "response_memory"),
    maxResponses: config.max_responses ?? 500,
    probation: { enabled: config.probation?.enabled ?? true, minEvents: config.probation?.min_events ?? 20 },
    schemaVersion: config.schema_version ?? 2,
  };
}

function lintLabelDerive(config: LabelDeriveConfig, view: PipelineView): LintIssue[] {
  let c: CompiledLabelDerive;
  try {
    c = compileLabelDerive(config);
  } catch (err) {
    return [{ path: [], message: errorMessage(err) }];
  }
  const issues: LintIssue[] = [];
  try {
    loadRulesFile(c.rulesFile);
  } catch (err) {
    issues.push({ path: ["rules_file"], message: errorMessage(err), hint: "fix the rules file; its reference is in the README (Label rules)" });
  }
  const gap = view.stages.find((s) => s.operator === "sessionize")?.config.gap ?? (view.stages.some((s) => s.operator === "sessionize") ? "30m" : undefined);
  if (typeof gap === "string") {
    let gapMs: number | undefined;
    try {
      gapMs = parseDuration(gap);
    } catch {
      // sessionize's own schema reports a bad gap
    }
    if (gapMs !== undefined && gapMs !== c.gapMs) {
      issues.push({
        path: ["session_gap"],
        message: `session_gap (${formatDuration(c.gapMs)}) differs from the sessionize gap (${gap})`,
        hint: "sessions would be decided before (or long after) sessionize closes them: use the same gap",
      });
    }
  }
  if (c.responseMemoryMs < c.gapMs) {
    issues.push({ path: ["response_memory"], message: `response_memory (${formatDuration(c.responseMemoryMs)}) is shorter than session_gap`, hint: "a response would be forgotten before its session is decided" });
  }
  const bots = view.stages.find((st) => st.operator === "bot-score");
  const regularity = bots?.config.regularity as { enabled?: unknown; min_events?: unknown } | undefined;
  const regularityMin = bots && regularity?.enabled !== false ? (typeof regularity?.min_events === "number" ? regularity.min_events : 20) : undefined;
  if (c.probation.enabled && regularityMin !== undefined && c.probation.minEvents < regularityMin) {
    issues.push({
      path: ["probation", "min_events"],
      message: `probation.min_events (${c.probation.minEvents}) is below bot-score's regularity.min_events (${regularityMin})`,
      hint: "a regular-timing script is flagged only at its regularity.min_events-th event: labels released before then may come from bots",
    });
  }
  if (c.ttl.userMs < c.responseMemoryMs) {
    issues.push({ path: ["feature_ttl", "user"], message: `feature_ttl.user (${formatDuration(c.ttl.userMs)}) is shorter than response_memory`, hint: "the user's state (which holds the remembered responses) would expire first" });
  }
  return issues;
}

// ---------------------------------------------------------------------------------------------
// Metadata

/** The label-derive operator. */
export const labelDerive: OperatorSpec<LabelDeriveConfig> = {
  name: "label-derive",
  summary: "Turns human signals into weak labels (response, preference, session) with YAML rules, and keeps online features per user, response and session.",
  description:
    "Evaluates the rules of `rules_file` (config/label-rules.yaml: signal, conditions, label, weight, version) on every event of a " +
    "human user (attrs.bot.band = human; ambivalent users update features and metrics only). Signals are event types and derived " +
    "ones: click_dwell (a dwell after a click), query (with reformulation's verdict, about the previous response), last_click and " +
    "session_end (decided when the partition watermark passes a session's last event + session_gap). Weights are de-biased by " +
    "clipped inverse propensity of the position and by per-user exponentially weighted baselines. Each label has a deterministic " +
    "label_id (hash of pipeline, kind, target ids and rule); a later signal on the same label re-emits it with revision + 1. " +
    "explicit_feedback is never a label input: it only feeds the explicit_up / explicit_down features. emitted_at is the stream " +
    "time of the input that decided the label (the time it was stored), so a replay re-emits byte-identical labels. Events pass on " +
    "unchanged to `next` (the pipeline's cleaned events). Session labels use the provisional session ids of sessionize: sessions " +
    "sessionize merges later stay two sessions here. Probation: a user's labels are held in its state until the user is settled as " +
    "human (probation.min_events events, or the watermark closing the label's session) and dropped if bot-score's flag marker " +
    "(attrs.bot.band = \"bot\") arrives first; a flagged user makes no labels for as long as its state lives and its features say " +
    "bot_band = bot. Retraction: the flag also retracts every label of the user already published (released or emitted without " +
    "probation) that the state remembers (response labels while their response is remembered, response_memory; session labels for " +
    "response_memory after the session's end): the same label_id, the next revision, weight 0, retracted: true and retracted_reason " +
    "(\"bot: <bot-score indicators>\"), dated by the marker's stream time and keeping the label's event_time; in the same commit the " +
    "user's response pos/neg weights (and *_nobase), its responses' signal_count and its sessions' pos/neg weights go back to 0, " +
    "and its later signals are not counted. A second marker retracts nothing more. Held labels keep the ids and revisions they would have had; a label released at a session's close (like every " +
    "label decided there) takes as emitted_at the stream time of the input after which the watermark passed the session's end + " +
    "session_gap (on an idle advance, with no such input: the stream time of the session's last input). The marker is not passed on. " +
    "Labels follow config/schemas/label.v2.json (schema_version: 1 publishes the v1 view): a response or preference label carries the " +
    "(chosen) response's position, the propensity behind its ips factor and its model (response_shown.payload.model); every label carries " +
    "the user's experiment, cohort and device as of the earliest event of its response (session labels: of its session) that had them.",
  keyed: true,
  schema: labelDeriveSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:state",
      holds: "<applied seq>:<JSON>: the stream sequence of the user's last input applied (the runtime's exactly-once guard), then per-user baselines (decayed sums), remembered responses (position, length, clicks, dwell, regenerations, labels emitted: id, revision, weight, signals), open and recently closed sessions (aggregates, session labels), the live labels of forgotten sessions (for retraction); per label, what its latest published revision said; probation: events seen, settled or flagged as a bot, and the labels and feature weights held until release",
      ttl: "feature_ttl.user from the last write; responses are forgotten after response_memory, closed sessions after two session gaps (their live labels after response_memory)",
    },
    { key: "tacit:{<prefix>:u:<user>}:features:user", holds: "hash: user features (see `tacit features`)", ttl: "feature_ttl.user" },
    { key: "tacit:{<prefix>:u:<user>}:features:response:<response_id>", holds: "hash: response features", ttl: "feature_ttl.response" },
    { key: "tacit:{<prefix>:u:<user>}:features:session:<session_id>", holds: "hash: session features", ttl: "feature_ttl.session" },
    { key: "tacit:{<prefix>:ix:response|session:<id>}:user", holds: "the user a response or session belongs to (for `tacit features get response|session`)", ttl: "feature_ttl.response / feature_ttl.session" },
    {
      key: "tacit:{<prefix>:p:<stage>:<partition>}:timers",
      holds: "sorted set of the runtime's event-time timers: member = user, score = watermark at which the user's next session is decided (end + session_gap + 1 ms) or forgotten (end + 2 × session_gap + 1 ms)",
      ttl: "none: a member is removed when its timer fires or the user keeps no session",
    },
  ],
  outputs: ["labels.response", "labels.preference", "labels.session"],
  examples: [
    { title: "Default rules, 30-minute sessions", config: {} },
    { title: "Longer probation (a bot-score with regularity.min_events 30)", config: { probation: { enabled: true, min_events: 30 } } },
    {
      title: "Shorter feature retention, longer response memory",
      config: { rules_file: DEFAULT_RULES_FILE, session_gap: "30m", feature_ttl: { user: "14d", response: "3d", session: "3d" }, response_memory: "48h", max_responses: 1000 },
    },
  ],
  lint: lintLabelDerive,
  create: (config, ctx) => {
    const c = compileLabelDerive(config);
    return new LabelDeriver(c, loadRulesFileOnce(c.rulesFile), ctx);
  },
};

// ---------------------------------------------------------------------------------------------
// State

/** A label emitted (or re-emitted) on a response or session: what a later revision needs. */
interface LabelRec {
  id: string;
  rev: number;
  w: number;
  /** Signals: [event_id, event_type, ts], in event-time order (at most MAX_SIGNALS). */
  sig: [string, SignalEventType, number][];
  /** Its latest published revision (absent: never published, e.g. held and dropped): what a retraction re-states. */
  p?: Published;
}

/** What the latest published revision of a label said, besides its id, rule and signals. */
interface Published {
  /** Its weight: > 0 while the label is live (a flag then retracts it). */
  w: number;
  /** session_id, event_time (ms). */
  s: string;
  t: number;
  /** query_id and response_id, where the label has them. */
  q?: string;
  r?: string;
  /** Polarity (response and session labels) and rule_version. */
  l?: "positive" | "negative";
  v: string | number;
}

/** A session label state forgot (two gaps after its end), kept while a flag could still retract its labels. */
interface Retired {
  id: string;
  end: number;
  /** Its session labels that are live. */
  labels: [string, LabelRec][];
  /** Its features hash holds label weights (pos_weight or neg_weight ≠ 0). */
  w?: 1;
}

/** What is remembered of one response (short keys: stored per user). */
interface Resp {
  id: string;
  /** query_id, session id (provisional). */
  q?: string;
  s?: string;
  /** Shown at, text_length, position in its list. */
  shown?: number;
  len?: number;
  pos?: number;
  /** Last event time it was touched (eviction order). */
  t: number;
  /** Earliest click; latest dwell; deepest scroll. */
  click?: number;
  dwell?: number;
  scroll?: number;
  /** Largest normalized edit distance of its edits. */
  edit?: number;
  /** A click_dwell rule labelled it. */
  decided?: boolean;
  /** The response this one replaced (regenerate), and the one that replaced it. */
  replaced?: string;
  by?: string;
  /** The regenerate event on it: [event_id, ts]. */
  regen?: [string, number];
  /** Labels on it, by rule (response) or rule + rejected id (preference). */
  labels: Map<string, LabelRec>;
  /**
   * The response labels as they would be without per-user baselines (rates and dwell at the
   * population priors, baseline factors 1): [rule, weight, event ids]. They feed only the
   * *_nobase features, so evaluation can measure what the baselines add.
   */
  nb?: [string, number, string[]][];
  /** Summed weights of its current response labels: [pos, neg, pos without baselines, neg without]. */
  tot?: [number, number, number, number];
  /** response_shown.payload.model. */
  m?: string;
  /** The user's context at the response's earliest event that carried one (labels v2). */
  cx?: Ctx;
  /** What this state added to its signal_count feature (a flag takes it back). */
  sc?: number;
}

/**
 * The user's context at one event, for labels v2: event time and id (the earliest event wins, so
 * arrival order does not matter), experiment, cohort, device.
 */
interface Ctx {
  t: number;
  e: string;
  x?: LabelExperiment;
  c?: string;
  d?: string;
}

/** One session's aggregates (provisional session id from sessionize). */
interface Sess {
  id: string;
  start: number;
  end: number;
  n: number;
  counts: Record<string, number>;
  /** Weights of the response labels decided in it. */
  pos: number;
  neg: number;
  /** The latest event that may be a label signal: [event_id, type, ts, response_id]. */
  last?: [string, SignalEventType, number, string | undefined];
  /** The latest click: [event_id, ts, response_id]. */
  click?: [string, number, string];
  /** Stream time of the latest input applied to it: emitted_at of its session labels. */
  st: number;
  /** Any event of it came from a non-human band: no session labels. */
  amb: boolean;
  /** Signals of the response labels decided in it (capped), for the session label. */
  sig: [string, SignalEventType, number][];
  closed: boolean;
  /** Session labels, by rule; and the response last labelled by a last_click rule. */
  labels: Map<string, LabelRec>;
  lastClick?: string;
  /** The user's context at the session's earliest event that carried one (labels v2). */
  cx?: Ctx;
}

/**
 * Something held while the user is on probation, with the session it belongs to: a label (its
 * emitted_at is set when it is released) or a change of a response's summed label weights
 * ([response_id, which sum, by]; see addWeight).
 */
interface Held {
  s: string;
  l?: Label;
  w?: [string, 0 | 1 | 2 | 3, number];
}

interface UserState {
  /** Newest event time seen. */
  at: number;
  b: BaselineSums;
  resp: Map<string, Resp>;
  sess: Map<string, Sess>;
  /** Events seen (bot-score's flag marker excluded): probation ends at probation.min_events. */
  n: number;
  /** Settled as human: labels are emitted at once. */
  ok: boolean;
  /**
   * Flagged by bot-score (sticky while the state lives): no labels, held ones dropped, published
   * ones retracted; `why` is the retractions' reason.
   */
  bot?: { since: number; score: number; why?: string };
  /** Held labels and weight changes, in the order they were made. */
  held: Held[];
  /** Forgotten sessions with live labels or label weights, for response_memory after their end. */
  old: Retired[];
  /**
   * Newest event time at which `prune` has nothing to forget by age: response_memory after the
   * oldest response or forgotten session. Kept in memory only (a loaded state has none, and is
   * pruned in full once): without it, every input walked all of the user's responses.
   */
  quiet?: number;
}

interface StoredResp extends Omit<Resp, "labels"> {
  labels: [string, LabelRec][];
}
interface StoredSess extends Omit<Sess, "labels"> {
  labels: [string, LabelRec][];
}
interface StoredState {
  v: 1;
  at: number;
  b: BaselineSums;
  resp: StoredResp[];
  sess: StoredSess[];
  /** Probation (absent in states written before it existed: such a user starts on probation). */
  n?: number;
  ok?: boolean;
  bot?: UserState["bot"];
  held?: Held[];
  old?: Retired[];
}

function emptyState(): UserState {
  return { at: -Infinity, b: emptySums(), resp: new Map(), sess: new Map(), n: 0, ok: false, held: [], old: [], quiet: undefined };
}

/** Serializes a user's state (Maps as entry lists; -Infinity as null through JSON). */
function encodeLabelState(s: UserState): string {
  const stored: StoredState = {
    v: 1,
    at: s.at,
    b: s.b,
    resp: [...s.resp.values()].map((r) => ({ ...r, labels: [...r.labels] })),
    sess: [...s.sess.values()].map((x) => ({ ...x, labels: [...x.labels] })),
    n: s.n,
  };
  if (s.ok) stored.ok = true;
  if (s.bot) stored.bot = s.bot;
  if (s.held.length) stored.held = s.held;
  if (s.old.length) stored.old = s.old;
  return JSON.stringify(stored);
}

/** Parses a stored user state; throws on anything else. */
function decodeLabelState(raw: string): UserState {
  const st = JSON.parse(raw) as StoredState;
  if (st?.v !== 1 || !Array.isArray(st.resp) || !Array.isArray(st.sess)) throw new Error("unknown state version");
  const b = { ...emptySums(), ...st.b };
  if (b.t === null) b.t = -Infinity;
  return {
    at: st.at ?? -Infinity,
    b,
    resp: new Map(st.resp.map((r) => [r.id, { ...r, labels: new Map(r.labels) }])),
    sess: new Map(st.sess.map((x) => [x.id, { ...x, labels: new Map(x.labels) }])),
    n: typeof st.n === "number" ? st.n : 0,
    ok: st.ok === true,
    ...(st.bot ? { bot: st.bot } : {}),
    held: Array.isArray(st.held) ? st.held : [],
    old: Array.isArray(st.old) ? st.old : [],
    quiet: undefined,
  };
}

// ---------------------------------------------------------------------------------------------
// Implementation

/** Most signals kept on one label (the oldest are dropped first). */
const MAX_SIGNALS = 32;
/** Event types that are signals about the response they name (the features' signal_count). */
const SIGNAL_EVENT_TYPES: ReadonlySet<EventType> = new Set<EventType>(["click", "copy_paste", "accept", "edit", "regenerate", "dwell", "abandon", "task_complete", "share"]);

const round = (x: number): number => Math.round(x * 1e6) / 1e6;
const iso = (ms: number): string => new Date(ms).toISOString();
const num = (v: unknown): number | undefined => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
const str = (v: unknown): string | undefined => (typeof v === "string" && v !== "" ? v : undefined);

/** The context an event carries (enrich puts experiment in context, cohort on the event, the parsed user agent in ua); undefined when none. */
function contextOf(ev: TacitEvent): Ctx | undefined {
  const c = ev.context ?? {};
  const ex = c.experiment as { id?: unknown; variant?: unknown } | undefined;
  const id = str(ex?.id);
  const variant = str(ex?.variant);
  const x: LabelExperiment | undefined = id !== undefined ? (variant !== undefined ? { id, variant } : { id }) : undefined;
  const cohort = str(ev.cohort);
  const device = str(c.device) ?? str(ev.ua?.device);
  if (!x && cohort === undefined && device === undefined) return undefined;
  return { t: ev.ts, e: ev.event_id, ...(x ? { x } : {}), ...(cohort !== undefined ? { c: cohort } : {}), ...(device !== undefined ? { d: device } : {}) };
}

/** The earlier of two contexts (event time, then event id). */
function earlier(a: Ctx | undefined, b: Ctx | undefined): Ctx | undefined {
  if (!a || !b) return a ?? b;
  return b.t < a.t || (b.t === a.t && b.e < a.e) ? b : a;
}

/** The v2 context fields of a label. */
function contextFields(cx: Ctx | undefined): Pick<Label, "experiment" | "cohort" | "device"> {
  if (!cx) return {};
  return { ...(cx.x ? { experiment: cx.x } : {}), ...(cx.c !== undefined ? { cohort: cx.c } : {}), ...(cx.d !== undefined ? { device: cx.d } : {}) };
}

/**
 * Deterministic label id: a short hash of pipeline, kind, target ids and rule name (session labels
 * include the user: a producer's session ids need not be unique across users).
 */
export function labelId(pipeline: string, kind: string, targets: readonly string[], rule: string): string {
  const h = createHash("sha256").update(JSON.stringify([pipeline, kind, ...targets, rule])).digest("base64url").slice(0, 22);
  return `lbl-${h}`;
}

/** A user's work in one call: its state, its features, and the index pointers it creates. */
interface Slot {
  user: string;
  state: UserState;
  features: FeatureWriter;
  /** New pointers from a response or session id to the user: a commit group each (another hash tag each, idempotent). */
  pointers: CommitGroup[];
}

/** The deciding signal of a label: which event, when, and the stream time of the input. */
interface Deciding {
  eid: string;
  type: SignalEventType;
  ts: number;
  st: number;
  sid: string;
  extra?: [string, SignalEventType, number][];
}

class LabelDeriver implements KeyedProcessor<UserState> {
  readonly codec: StateCodec<UserState>;
  /** Signals are judged on what came before them in event time (a dwell after its click, baselines as of then). */
  readonly eventTimeOrder = true;
  /** A user exactly at the population priors: what the *_nobase features assume of everyone. */
  private readonly population: BaselineView;

  constructor(
    private readonly c: CompiledLabelDerive,
    private readonly rules: CompiledRules,
    private readonly ctx: OperatorContext,
  ) {
    const pr = rules.baselines.priors;
    this.population = {
      rates: { accept: pr.accept, edit: pr.edit, regenerate: pr.regenerate, copy: pr.copy },
      dwell_ms: pr.dwell_ms,
      factors: { accept: 1, edit: 1, regenerate: 1, copy: 1 },
    };
    const userMs = c.ttl.userMs;
    this.codec = { encode: encodeLabelState, decode: decodeLabelState, ttlMs: () => userMs };
    // Counters start at zero (README "SLIs and alerts": coverage and explicit agreement per rule).
    ctx.metrics.count("responses_shown", 0);
    for (const r of rules.rules) {
      ctx.metrics.count("labels", 0, { kind: r.kind, rule: r.name });
      if (r.kind === "response") for (const outcome of ["agree", "disagree"]) ctx.metrics.count("explicit_agreement", 0, { rule: r.name, outcome });
    }
  }

  /** An explicit rating met a response with labels: does each live response label agree with it? */
  private countAgreement(r: Resp, up: boolean): void {
    for (const [name, rec] of r.labels) {
      if (rec.w === 0) continue;
      const rule = this.rules.rules.find((x) => x.name === name);
      if (rule?.kind !== "response" || rule.label === undefined) continue;
      this.ctx.metrics.count("explicit_agreement", 1, { rule: name, outcome: (rule.label === "positive") === up ? "agree" : "disagree" });
    }
  }

  processElement(input: KeyedInput, key: KeyScope<UserState>): Outcome {
    const env = input.envelope;
    const e = env.event;
    if (!e || typeof e.user !== "string" || !Number.isFinite(e.ts) || typeof e.event_id !== "string" || typeof e.event_type !== "string") {
      return { emits: [], error: new BadInputError("bad_envelope", `label-derive needs an envelope with event.user, event.ts, event_id and event_type (seq ${input.seq})`) };
    }
    const slot: Slot = { user: key.user, state: key.get() ?? emptyState(), features: key.features, pointers: [] };
    const emits: Emit[] = [];
    if (isBotMarker(env)) {
      // bot-score's flag: acted on here, not passed on (`next` carries the cleaned events).
      this.flag(slot, env, input.stream_time_ms, emits);
    } else {
      this.apply(slot, env, input, emits);
      emits.push({ to: "next", id: `${this.ctx.stage}:${env.src.seq}`, value: env });
    }
    return this.done(slot, key, emits);
  }

  /**
   * The user's timer: decides the sessions the watermark has passed, dated by the input after
   * which it passed them (the stream time of the session's last input after an idle advance).
   */
  onTimer(key: KeyScope<UserState>, firing: TimerFiring): TimerOutcome {
    const state = key.get();
    if (state === undefined) {
      key.setTimer(undefined);
      return { emits: [] };
    }
    const slot: Slot = { user: key.user, state, features: key.features, pointers: [] };
    const emits: Emit[] = [];
    this.closeDue(slot, firing.watermark_ms, firing.stream_time_ms, emits);
    return this.done(slot, key, emits);
  }

  /** Records the user's state and next timer; the outcome carries the new index pointers. */
  private done(slot: Slot, key: KeyScope<UserState>, emits: Emit[]): Outcome {
    key.put(slot.state);
    key.setTimer(this.nextDue(slot.state));
    return slot.pointers.length ? { emits, commits: slot.pointers } : { emits };
  }

  /** Points a response's or session's id at the user. */
  private point(slot: Slot, entity: "response" | "session", id: string, ttlMs: number): void {
    slot.pointers.push({ ops: [{ op: "set", key: indexKey(this.ctx.prefix, entity, id), value: slot.user, ttl_ms: ttlMs }] });
  }

  /**
   * The watermark at which something next happens to the user's sessions: an open one is decided
   * (end + gap), a decided one is forgotten (end + 2 gaps). Undefined: no session kept.
   */
  private nextDue(s: UserState): number | undefined {
    let due: number | undefined;
    for (const x of s.sess.values()) {
      const at = x.end + (x.closed ? 2 : 1) * this.c.gapMs + 1;
      if (due === undefined || at < due) due = at;
    }
    return due;
  }

  // -------------------------------------------------------------------------------------------
  // Events

  private resp(slot: Slot, id: string, ts: number, ev?: TacitEvent, sid?: string): Resp {
    const s = slot.state;
    let r = s.resp.get(id);
    if (!r) {
      r = { id, t: ts, labels: new Map() };
      s.resp.set(id, r);
      if (s.quiet !== undefined) s.quiet = Math.min(s.quiet, ts + this.c.responseMemoryMs);
      this.point(slot, "response", id, this.c.ttl.responseMs);
    }
    r.t = Math.max(r.t, ts);
    if (ev?.query_id !== undefined && r.q === undefined) r.q = ev.query_id;
    if (sid !== undefined && r.s === undefined) r.s = sid;
    return r;
  }

  private sessionOf(slot: Slot, env: Envelope, input: StageInput): Sess {
    const a = env.attrs.session as { id?: unknown } | undefined;
    const id = typeof a?.id === "string" ? a.id : env.event.session_id;
    const ts = env.event.ts;
    let x = slot.state.sess.get(id);
    if (!x) {
      x = { id, start: ts, end: ts, n: 0, counts: {}, pos: 0, neg: 0, st: input.stream_time_ms, amb: false, sig: [], closed: false, labels: new Map() };
      slot.state.sess.set(id, x);
      this.point(slot, "session", id, this.c.ttl.sessionMs);
    }
    if (x.closed) {
      // A late event (within sessionize's allowed lateness) reopens a decided session: its labels get a new revision.
      x.closed = false;
      this.ctx.metrics.count("label_sessions_reopened", 1);
    }
    return x;
  }

  private apply(slot: Slot, env: Envelope, input: StageInput, emits: Emit[]): void {
    const ev = env.event;
    const s = slot.state;
    const f = slot.features;
    const ttl = this.c.ttl;
    const bot = env.attrs.bot as { score?: unknown; band?: unknown } | undefined;
    // A user bot-score flagged stays a bot here for as long as this state lives, whatever later events say.
    const band = s.bot ? "bot" : typeof bot?.band === "string" ? bot.band : "unknown";
    const human = band === "human";
    if (!human) this.ctx.metrics.count("label_inputs_unlabelled", 1, { band });
    s.at = Math.max(s.at, ev.ts);
    s.n++;

    const sess = this.sessionOf(slot, env, input);
    sess.start = Math.min(sess.start, ev.ts);
    sess.end = Math.max(sess.end, ev.ts);
    sess.n++;
    sess.counts[ev.event_type] = (sess.counts[ev.event_type] ?? 0) + 1;
    sess.st = Math.max(sess.st, input.stream_time_ms);
    if (!human) sess.amb = true;
    if (ev.event_type !== "explicit_feedback" && (!sess.last || ev.ts >= sess.last[2])) sess.last = [ev.event_id, ev.event_type, ev.ts, ev.response_id];
    const cx = contextOf(ev);
    if (cx) sess.cx = earlier(sess.cx, cx);

    // Features every event updates.
    const uk = USER_FEATURES;
    const sk = sessionFeatures(sess.id);
    f.add(uk, countField(ev.event_type), 1, ttl.userMs);
    f.add(uk, "events", 1, ttl.userMs);
    f.add(sk, countField(ev.event_type), 1, ttl.sessionMs);
    f.add(sk, "events", 1, ttl.sessionMs);
    f.set(sk, { start: sess.start, end: sess.end, duration_ms: sess.end - sess.start }, ttl.sessionMs);
    const userSet: Record<string, string | number> = { bot_band: band, last_event_time: s.at };
    if (s.bot) userSet.bot_score = s.bot.score;
    else if (typeof bot?.score === "number") userSet.bot_score = bot.score;

    const view = baselineView(s.b, this.rules.baselines);
    const hl = this.rules.baselines.halfLifeMs;
    const rid = ev.response_id;
    const r = rid !== undefined ? this.resp(slot, rid, ev.ts, ev, sess.id) : undefined;
    const deciding: Deciding = { eid: ev.event_id, type: ev.event_type as SignalEventType, ts: ev.ts, st: input.stream_time_ms, sid: sess.id };
    const p = ev.payload ?? {};

    if (r) {
      if (cx) r.cx = earlier(r.cx, cx);
      const rk = responseFeatures(r.id);
      const rs: Record<string, string | number> = { last_event_time: r.t };
      if (r.q !== undefined) rs.query_id = r.q;
      if (r.s !== undefined) rs.session_id = r.s;
      // A flagged user's signals are not counted (the flag took back those it had).
      if (SIGNAL_EVENT_TYPES.has(ev.event_type) && !s.bot) this.countSignal(slot, r);
      if (ev.event_type === "explicit_feedback") {
        const up = p.rating === "up" || (typeof p.rating === "number" && p.rating >= 4);
        const down = p.rating === "down" || (typeof p.rating === "number" && p.rating <= 2);
        if (up || down) {
          f.add(rk, up ? "explicit_up" : "explicit_down", 1, ttl.responseMs);
          f.add(uk, up ? "explicit_up" : "explicit_down", 1, ttl.userMs);
          if (r.labels.size) this.countAgreement(r, up);
        }
      }
      if (ev.event_type === "response_shown") {
        if (r.shown === undefined) this.ctx.metrics.count("responses_shown");
        r.shown = r.shown === undefined ? ev.ts : Math.min(r.shown, ev.ts);
        const len = num(p.text_length);
        if (len !== undefined && len > 0) r.len = len;
        const pos = num(p.position);
        if (pos !== undefined && pos >= 1) r.pos = pos;
        r.m ??= str(p.model);
        if (r.pos === undefined || r.pos === 1) observe(s.b, hl, ev.ts, "n");
        if (r.pos === undefined) this.linkRegeneration(s, r, ev.ts);
      }
      if (r.pos !== undefined) rs.position = r.pos;
      f.set(rk, rs, ttl.responseMs);
    }

    let signal: string | undefined;
    let extra: Record<string, FieldValue | undefined> = {};
    switch (ev.event_type) {
      case "click": {
        if (!r) break;
        r.click = r.click === undefined ? ev.ts : Math.min(r.click, ev.ts);
        if (r.pos === undefined) {
          const pos = num(p.position);
          if (pos !== undefined && pos >= 1) r.pos = pos;
        }
        if (!sess.click || ev.ts >= sess.click[1]) sess.click = [ev.event_id, ev.ts, r.id];
        signal = "click";
        extra = { skipped_above: this.skippedAbove(s, r, ev.ts).length };
        break;
      }
      case "dwell": {
        if (!r) break;
        const d = num(p.dwell_ms);
        if (d !== undefined) {
          r.dwell = d;
          observe(s.b, hl, ev.ts, "dwell", d);
          observe(s.b, hl, ev.ts, "dwell_n");
        }
        const sc = num(p.scroll_depth);
        if (sc !== undefined) r.scroll = Math.max(r.scroll ?? 0, sc);
        signal = r.click !== undefined ? "click_dwell" : "dwell";
        break;
      }
      case "copy_paste": {
        if (!r) break;
        const span = num(p.span_length) ?? (num(p.span_end) !== undefined && num(p.span_start) !== undefined ? (p.span_end as number) - (p.span_start as number) : undefined);
        extra = { span_length: span, copied_share: span !== undefined && r.len ? Math.min(1, span / r.len) : undefined };
        observe(s.b, hl, ev.ts, "copy");
        signal = "copy_paste";
        break;
      }
      case "accept":
        if (!r) break;
        observe(s.b, hl, ev.ts, "accept");
        signal = "accept";
        break;
      case "edit": {
        if (!r) break;
        let dist = num(p.edit_distance);
        let orig = num(p.original_length);
        if (typeof p.original_text === "string" && typeof p.edited_text === "string") {
          dist ??= editDistance(p.original_text, p.edited_text);
          orig ??= Math.max(p.original_text.length, p.edited_text.length);
        }
        orig ??= r.len;
        const share = dist !== undefined && orig ? Math.min(1, dist / orig) : undefined;
        extra = { edit_distance: dist, edit_share: share };
        if (share !== undefined) r.edit = Math.max(r.edit ?? 0, share);
        observe(s.b, hl, ev.ts, "edit");
        signal = "edit";
        break;
      }
      case "regenerate":
        if (!r) break;
        r.regen = [ev.event_id, ev.ts];
        observe(s.b, hl, ev.ts, "regenerate");
        signal = "regenerate";
        break;
      case "abandon":
      case "share":
        if (r) signal = ev.event_type;
        break;
      case "task_complete":
        if (!r) break;
        extra = { outcome: typeof p.outcome === "string" ? p.outcome : undefined };
        signal = "task_complete";
        break;
      case "query":
        this.onQuery(slot, env, deciding, view, human, emits);
        break;
      default:
        break;
    }

    if (signal !== undefined && r && human) {
      // respFields returns a new object: extended in place (a spread copy per rule input was a measurable cost).
      const fields = Object.assign(this.respFields(r, ev.ts, view), extra);
      const nbFields = Object.assign(this.respFields(r, ev.ts, this.population), extra);
      this.fireAll(slot, signal, fields, nbFields, r, deciding, view, emits);
    }

    // Settled as human: what was held goes out, dated by this input; later labels go out at once.
    const prob = this.c.probation;
    if (prob.enabled && human && !s.ok && s.n >= prob.minEvents) {
      s.ok = true;
      this.ctx.metrics.count("label_users_settled", 1);
      this.release(slot, undefined, input.stream_time_ms, emits);
    }

    const after = baselineView(s.b, this.rules.baselines);
    // Added to userSet in place (a spread copy of it per input was a measurable cost); the field order is unchanged.
    userSet.accept_rate = round(after.rates.accept);
    userSet.edit_rate = round(after.rates.edit);
    userSet.regenerate_rate = round(after.rates.regenerate);
    userSet.copy_rate = round(after.rates.copy);
    userSet.dwell_ewma_ms = Math.round(after.dwell_ms);
    userSet.baseline_accept = round(after.factors.accept);
    userSet.baseline_edit = round(after.factors.edit);
    userSet.baseline_regenerate = round(after.factors.regenerate);
    userSet.baseline_copy = round(after.factors.copy);
    f.set(uk, userSet, ttl.userMs);
    // On probation the session's weights are written when its labels are released; a bot's never.
    if (!this.holding(s) && !s.bot) this.putSessionWeights(slot, sess);
    this.prune(s);
  }

  /** Counts a signal about a response in its features (and remembers it, for a flag to take back). */
  private countSignal(slot: Slot, r: Resp): void {
    slot.features.add(responseFeatures(r.id), "signal_count", 1, this.c.ttl.responseMs);
    r.sc = (r.sc ?? 0) + 1;
  }

  /** On probation: labels and their feature weights are held (see release). */
  private holding(s: UserState): boolean {
    return this.c.probation.enabled && !s.ok && s.bot === undefined;
  }

  /**
   * bot-score flagged the user: the held labels and weights are dropped, every label of the user
   * still live is retracted and its feature contributions taken back (see retractAll), the
   * user's sessions make no session labels, and no later event of the user makes a label while
   * this state lives. A second marker finds nothing left to retract.
   */
  private flag(slot: Slot, env: Envelope, st: number, emits: Emit[]): void {
    const s = slot.state;
    const bot = env.attrs.bot as { score?: unknown; indicators?: unknown };
    if (!s.bot) {
      const names = Array.isArray(bot.indicators) ? bot.indicators.flatMap((i: { name?: unknown; strength?: unknown }) => (typeof i?.name === "string" && (num(i.strength) ?? 0) > 0 ? [i.name] : [])) : [];
      s.bot = { since: env.event.ts, score: num(bot.score) ?? 1, why: names.length ? `bot: ${[...new Set(names)].join(", ")}` : "bot" };
      this.ctx.metrics.count("label_users_flagged", 1);
    }
    const dropped = s.held.filter((h) => h.l !== undefined).length;
    if (dropped) this.ctx.metrics.count("labels_dropped_bot", dropped);
    s.held = [];
    for (const x of s.sess.values()) x.amb = true;
    this.retractAll(slot, st, emits);
    slot.features.set(USER_FEATURES, { bot_band: "bot", bot_score: s.bot.score }, this.c.ttl.userMs);
  }

  /**
   * Retracts every live label the user published that its state still remembers (response and
   * preference labels while their response is remembered, session labels for response_memory
   * after the session's end): the same label_id, the next revision, weight 0, `retracted: true`,
   * dated `st`. The user's label weights (response and session features) and its responses'
   * signal counts go back to 0 in the same commit.
   */
  private retractAll(slot: Slot, st: number, emits: Emit[]): void {
    const s = slot.state;
    const ttl = this.c.ttl;
    for (const r of s.resp.values()) {
      for (const [key, rec] of r.labels) {
        const sep = key.indexOf("\u0000");
        const out = this.retract(slot, rec, st, emits, sep < 0 ? { kind: "response", rule: key, response_id: r.id } : { kind: "preference", rule: key.slice(0, sep), response_id: r.id, rejected: key.slice(sep + 1) }, this.responseFields(r));
        if (out) r.labels.set(key, out);
      }
      if (r.nb) for (const x of r.nb) x[1] = 0;
      const key = responseFeatures(r.id);
      if (r.tot) {
        r.tot = [0, 0, 0, 0];
        slot.features.set(key, { pos_weight: 0, neg_weight: 0, pos_weight_nobase: 0, neg_weight_nobase: 0 }, ttl.responseMs);
      }
      // An increment, not a write: signal_count is only ever added to.
      if (r.sc) slot.features.add(key, "signal_count", -r.sc, ttl.responseMs);
      delete r.sc;
    }
    // Forgotten sessions (s.old) are dropped once retracted: nothing of them is left to take back.
    for (const x of [...s.sess.values(), ...s.old]) {
      for (const [rule, rec] of x.labels) {
        const out = this.retract(slot, rec, st, emits, { kind: "session", rule }, "cx" in x ? contextFields(x.cx) : {});
        if (out && x.labels instanceof Map) x.labels.set(rule, out);
      }
      if ("pos" in x ? x.pos !== 0 || x.neg !== 0 : x.w) slot.features.set(sessionFeatures(x.id), { pos_weight: 0, neg_weight: 0 }, ttl.sessionMs);
      if ("pos" in x) x.pos = x.neg = 0;
    }
    s.old = [];
  }

  /** The retraction of one live label (the record's next revision), published; undefined when it is not live. */
  private retract(
    slot: Slot,
    rec: LabelRec,
    st: number,
    emits: Emit[],
    at: { kind: Label["kind"]; rule: string; response_id?: string; rejected?: string },
    v2: Partial<Label>,
  ): LabelRec | undefined {
    const p = rec.p;
    if (!p || p.w <= 0) return undefined;
    const next: LabelRec = { ...rec, rev: rec.rev + 1, w: 0, p: { ...p, w: 0 } };
    const label = {
      schema_version: 2,
      label_id: rec.id,
      revision: next.rev,
      pipeline: this.ctx.pipeline,
      kind: at.kind,
      ...(at.kind === "session" ? (p.r !== undefined ? { response_id: p.r } : {}) : { response_id: at.response_id }),
      ...(p.q !== undefined ? { query_id: p.q } : {}),
      session_id: p.s,
      user: slot.user,
      ...(p.l !== undefined ? { label: p.l } : {}),
      ...(at.kind === "preference" ? { chosen_response_id: at.response_id, rejected_response_id: at.rejected } : {}),
      weight: 0,
      rule: at.rule,
      rule_version: p.v,
      signals: signalsOf(rec.sig),
      event_time: iso(p.t),
      emitted_at: iso(st),
      ...v2,
      retracted: true,
      retracted_reason: slot.state.bot?.why ?? "bot",
    } as Label;
    this.ctx.metrics.count("labels_retracted", 1, { kind: at.kind });
    this.send(label, emits);
    return next;
  }

  /**
   * Emits what is held for one session (or, with `sid` undefined, for all), in the order it was
   * made, with `st` as emitted_at, and writes the feature weights it carries.
   */
  private release(slot: Slot, sid: string | undefined, st: number, emits: Emit[]): void {
    const s = slot.state;
    if (s.held.length === 0) return;
    const keep: Held[] = [];
    const sessions = new Set<string>();
    for (const h of s.held) {
      if (sid !== undefined && h.s !== sid) {
        keep.push(h);
        continue;
      }
      sessions.add(h.s);
      if (h.l) {
        this.ctx.metrics.count("labels_released", 1, { kind: h.l.kind });
        this.publish(slot, { ...h.l, emitted_at: iso(st) }, emits);
      }
      if (h.w) {
        // A response forgotten meanwhile (response_memory) has no sums left to add to.
        const r = s.resp.get(h.w[0]);
        if (r) this.writeWeight(slot, r, h.w[1], h.w[2]);
      }
    }
    s.held = keep;
    for (const id of sessions) {
      const x = s.sess.get(id);
      if (x) this.putSessionWeights(slot, x);
    }
  }

  private putSessionWeights(slot: Slot, x: Sess): void {
    slot.features.set(sessionFeatures(x.id), { pos_weight: round(x.pos), neg_weight: round(x.neg) }, this.c.ttl.sessionMs);
  }

  /** A single response shown after a regenerate of another for the same query replaced it. */
  private linkRegeneration(s: UserState, r: Resp, ts: number): void {
    if (r.replaced !== undefined || r.q === undefined) return;
    let best: Resp | undefined;
    for (const o of s.resp.values()) {
      if (o === r || o.q !== r.q || o.regen === undefined || o.by !== undefined || o.regen[1] > ts) continue;
      if (!best || o.regen[1] > best.regen![1]) best = o;
    }
    if (best) {
      r.replaced = best.id;
      best.by = r.id;
    }
  }

  /** Results shown above `r` for the same query that were not clicked before it (Joachims' skip-above). */
  private skippedAbove(s: UserState, r: Resp, ts: number): Resp[] {
    if (r.pos === undefined || r.pos <= 1 || r.q === undefined) return [];
    const out: Resp[] = [];
    for (const o of s.resp.values()) {
      if (o === r || o.q !== r.q || o.pos === undefined || o.pos >= r.pos) continue;
      if (o.click !== undefined && o.click <= ts) return [];
      out.push(o);
    }
    return out.sort((a, b) => a.pos! - b.pos!);
  }

  private onQuery(slot: Slot, env: Envelope, deciding: Deciding, view: BaselineView, human: boolean, emits: Emit[]): void {
    const note = env.attrs.reformulation as Record<string, unknown> | undefined;
    const prevId = note?.previous_response_id;
    if (!note || typeof prevId !== "string") return;
    const ev = env.event;
    const prev = this.resp(slot, prevId, ev.ts, undefined, undefined);
    if (prev.q === undefined && typeof note.previous_query_id === "string") prev.q = note.previous_query_id;
    if (note.decision === "reformulation" && !slot.state.bot) this.countSignal(slot, prev);
    const reform = {
      decision: typeof note.decision === "string" ? note.decision : undefined,
      kind: typeof note.kind === "string" ? note.kind : undefined,
      levenshtein: num(note.levenshtein),
      jaccard3: num(note.jaccard3),
      token_overlap: num(note.token_overlap),
      gap_ms: num(note.gap_ms),
      previous_ranked: prev.pos !== undefined,
    };
    if (human) this.fireAll(slot, "query", Object.assign(this.respFields(prev, ev.ts, view), reform), Object.assign(this.respFields(prev, ev.ts, this.population), reform), prev, deciding, view, emits);
  }

  private respFields(r: Resp, ts: number, view: BaselineView): Record<string, FieldValue | undefined> {
    return {
      ranked: r.pos !== undefined,
      position: r.pos,
      propensity: propensity(this.rules, r.pos),
      ips: inversePropensity(this.rules, r.pos),
      text_length: r.len,
      ms_since_shown: r.shown !== undefined ? ts - r.shown : undefined,
      dwell_ms: r.dwell,
      scroll_depth: r.scroll,
      clicked: r.click !== undefined,
      regenerated: r.replaced !== undefined,
      max_edit_share: r.edit,
      decided: r.decided === true,
      user_accept_rate: view.rates.accept,
      user_edit_rate: view.rates.edit,
      user_regenerate_rate: view.rates.regenerate,
      user_copy_rate: view.rates.copy,
      user_dwell_ms: view.dwell_ms,
      dwell_ratio: r.dwell !== undefined && view.dwell_ms > 0 ? r.dwell / view.dwell_ms : undefined,
    };
  }

  /**
   * Fires every rule of a signal about response `r` and emits (or revises) the labels; `nbFields`
   * are the same fields at the population priors, for the baseline-free shadow weights.
   */
  private fireAll(slot: Slot, signal: string, fields: Fields, nbFields: Fields, r: Resp, d: Deciding, view: BaselineView, emits: Emit[]): void {
    if (r.q !== undefined) {
      for (const f of fire(this.rules, signal, nbFields, () => 1)) {
        if (f.rule.target === "response" || f.rule.target === "previous_response") this.shadow(slot, r, f, d);
      }
    }
    const firings = fire(this.rules, signal, fields, (name) => view.factors[name]);
    for (const firing of firings) {
      const rule = firing.rule;
      switch (rule.target) {
        case "response":
        case "previous_response":
          if (signal === "click_dwell") r.decided = true;
          this.responseLabel(slot, r, firing, d, emits);
          break;
        case "replaced_pair": {
          const old = r.replaced !== undefined ? slot.state.resp.get(r.replaced) : undefined;
          if (!old) break;
          const extra: [string, SignalEventType, number][] = old.regen ? [[old.regen[0], "regenerate", old.regen[1]]] : [];
          this.preferenceLabel(slot, r, old, firing, { ...d, extra }, emits);
          break;
        }
        case "skipped_above":
        case "skipped_previous": {
          const skipped = this.skippedAbove(slot.state, r, d.ts);
          const list = rule.target === "skipped_previous" ? skipped.filter((o) => o.pos === r.pos! - 1) : skipped;
          for (const o of list) this.preferenceLabel(slot, r, o, firing, d, emits);
          break;
        }
        case "session":
          break;
      }
    }
  }

  /** Updates the baseline-free weight of a response label (no emit: it only feeds *_nobase features). */
  private shadow(slot: Slot, r: Resp, firing: Firing, d: Deciding): void {
    const rule = firing.rule;
    r.nb ??= [];
    let rec = r.nb.find((x) => x[0] === rule.name);
    if (rec?.[2].includes(d.eid)) return;
    const before = rec?.[1] ?? 0;
    const w = round(combineWeight(rule, rec?.[1], firing.weight));
    if (!rec) r.nb.push((rec = [rule.name, w, []]));
    rec[1] = w;
    rec[2].push(d.eid);
    if (rec[2].length > MAX_SIGNALS) rec[2].shift();
    this.addWeight(slot, r, rule.label === "positive" ? 2 : 3, w - before, d.sid);
  }

  /**
   * Adds to one of a response's summed label weights and writes the sums as absolute values: the
   * same label updates in the same order give the same numbers whatever the batch boundaries
   * (increments in Redis would round differently).
   */
  private addWeight(slot: Slot, r: Resp, which: 0 | 1 | 2 | 3, by: number, sid: string): void {
    // On probation the features count a label only once it is released: the change waits with it.
    if (this.holding(slot.state)) slot.state.held.push({ s: sid, w: [r.id, which, by] });
    else this.writeWeight(slot, r, which, by);
  }

  private writeWeight(slot: Slot, r: Resp, which: 0 | 1 | 2 | 3, by: number): void {
    const tot = (r.tot ??= [0, 0, 0, 0]);
    tot[which] = round(tot[which] + by);
    slot.features.set(
      responseFeatures(r.id),
      { pos_weight: tot[0], neg_weight: tot[1], pos_weight_nobase: tot[2], neg_weight_nobase: tot[3] },
      this.c.ttl.responseMs,
    );
  }

  private addSignal(rec: LabelRec, sig: [string, SignalEventType, number]): boolean {
    if (rec.sig.some((x) => x[0] === sig[0])) return false;
    rec.sig.push(sig);
    rec.sig.sort((a, b) => a[2] - b[2] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    if (rec.sig.length > MAX_SIGNALS) rec.sig.splice(0, rec.sig.length - MAX_SIGNALS);
    return true;
  }

  /** Creates or revises a label record; returns it, or undefined when nothing changed (the same event again). */
  private revise(labels: Map<string, LabelRec>, key: string, id: string, firing: Firing, d: Deciding): LabelRec | undefined {
    const prev = labels.get(key);
    const rec: LabelRec = prev
      ? { ...prev, sig: [...prev.sig] }
      : { id, rev: -1, w: 0, sig: [] };
    let changed = false;
    for (const x of d.extra ?? []) changed = this.addSignal(rec, x) || changed;
    if (!this.addSignal(rec, [d.eid, d.type, d.ts]) && !changed) return undefined;
    rec.rev += 1;
    rec.w = round(combineWeight(firing.rule, prev?.w, firing.weight));
    labels.set(key, rec);
    return rec;
  }

  private responseLabel(slot: Slot, r: Resp, firing: Firing, d: Deciding, emits: Emit[]): void {
    const rule = firing.rule;
    if (r.q === undefined) {
      this.ctx.metrics.count("label_skipped", 1, { reason: "no_query_id", rule: rule.name });
      return;
    }
    const prev = r.labels.get(rule.name);
    const rec = this.revise(r.labels, rule.name, labelId(this.ctx.pipeline, "response", [r.id], rule.name), firing, d);
    if (!rec) return;
    const dw = rec.w - (prev?.w ?? 0);
    const positive = rule.label === "positive";
    this.addWeight(slot, r, positive ? 0 : 1, dw, d.sid);
    const sess = slot.state.sess.get(d.sid);
    if (sess) {
      if (positive) sess.pos = round(sess.pos + dw);
      else sess.neg = round(sess.neg + dw);
      if (!sess.sig.some((x) => x[0] === d.eid)) {
        sess.sig.push([d.eid, d.type, d.ts]);
        if (sess.sig.length > MAX_SIGNALS) sess.sig.shift();
      }
    }
    const label: Label = {
      schema_version: 2,
      label_id: rec.id,
      revision: rec.rev,
      pipeline: this.ctx.pipeline,
      kind: "response",
      response_id: r.id,
      query_id: r.q,
      session_id: d.sid,
      user: slot.user,
      label: rule.label!,
      weight: rec.w,
      rule: rule.name,
      rule_version: rule.version,
      signals: signalsOf(rec.sig),
      event_time: iso(d.ts),
      emitted_at: iso(d.st),
      ...this.responseFields(r),
    };
    this.emit(slot, label, emits);
  }

  private preferenceLabel(slot: Slot, chosen: Resp, rejected: Resp, firing: Firing, d: Deciding, emits: Emit[]): void {
    const rule = firing.rule;
    const q = chosen.q ?? rejected.q;
    if (q === undefined || chosen.id === rejected.id) {
      this.ctx.metrics.count("label_skipped", 1, { reason: "no_query_id", rule: rule.name });
      return;
    }
    const rec = this.revise(chosen.labels, `${rule.name}\u0000${rejected.id}`, labelId(this.ctx.pipeline, "preference", [chosen.id, rejected.id], rule.name), firing, d);
    if (!rec) return;
    const label: Label = {
      schema_version: 2,
      label_id: rec.id,
      revision: rec.rev,
      pipeline: this.ctx.pipeline,
      kind: "preference",
      response_id: chosen.id,
      query_id: q,
      session_id: d.sid,
      user: slot.user,
      chosen_response_id: chosen.id,
      rejected_response_id: rejected.id,
      weight: rec.w,
      rule: rule.name,
      rule_version: rule.version,
      signals: signalsOf(rec.sig),
      event_time: iso(d.ts),
      emitted_at: iso(d.st),
      ...this.responseFields(chosen),
    };
    this.emit(slot, label, emits);
  }

  /** Emits a label, or holds it while the user is on probation; a flagged user's labels go nowhere. */
  private emit(slot: Slot, label: Label, emits: Emit[]): void {
    const s = slot.state;
    if (s.bot) return;
    if (this.holding(s)) {
      s.held.push({ s: label.session_id, l: label });
      this.ctx.metrics.count("labels_held", 1, { kind: label.kind });
      return;
    }
    this.publish(slot, label, emits);
  }

  /** Publishes a label and records in its state what was published (what a retraction would re-state). */
  private publish(slot: Slot, label: Label, emits: Emit[]): void {
    const rec = this.recOf(slot.state, label);
    if (rec) {
      const p: Published = { w: label.weight, s: label.session_id, t: Date.parse(label.event_time), v: label.rule_version };
      if (label.query_id !== undefined) p.q = label.query_id;
      if (label.kind === "session" && label.response_id !== undefined) p.r = label.response_id;
      if (label.label !== undefined) p.l = label.label;
      rec.p = p;
    }
    this.ctx.metrics.count("labels", 1, { kind: label.kind, rule: label.rule });
    this.send(label, emits);
  }

  private send(label: Label, emits: Emit[]): void {
    const value = this.c.schemaVersion === 1 ? toLabelV1(label) : label;
    emits.push({ to: `labels.${label.kind}` as OutputName, id: `label:${label.label_id}:${label.revision}`, value });
  }

  /**
   * The v2 fields of a label on response `r` (for a preference, the chosen one): its position and
   * the examination probability its ips factor came from, its model, the user's context.
   */
  private responseFields(r: Resp): Pick<Label, "position" | "propensity" | "model" | "experiment" | "cohort" | "device"> {
    return {
      ...(r.pos !== undefined && Number.isInteger(r.pos) ? { position: r.pos } : {}),
      propensity: propensity(this.rules, r.pos),
      ...(r.m !== undefined ? { model: r.m } : {}),
      ...contextFields(r.cx),
    };
  }

  /** The state's record of a label (undefined when its response or session was forgotten meanwhile). */
  private recOf(s: UserState, l: Label): LabelRec | undefined {
    const rec =
      l.kind === "session"
        ? s.sess.get(l.session_id)?.labels.get(l.rule)
        : l.kind === "preference"
          ? s.resp.get(l.chosen_response_id)?.labels.get(`${l.rule}\u0000${l.rejected_response_id}`)
          : s.resp.get(l.response_id)?.labels.get(l.rule);
    return rec?.id === l.label_id ? rec : undefined;
  }

  // -------------------------------------------------------------------------------------------
  // Sessions

  /**
   * Decides every open session of the user that the watermark has passed (last event + gap < wm),
   * and releases what probation held for it. Labels decided or released at the close take as
   * emitted_at `st`, the stream time of the input after which the watermark passed the session
   * (undefined when no input moved it there, an idle advance: the session's last input's).
   */
  private closeDue(slot: Slot, wm: number, st: number | undefined, emits: Emit[]): void {
    const s = slot.state;
    for (const x of s.sess.values()) {
      if (x.closed || wm <= x.end + this.c.gapMs) continue;
      x.closed = true;
      this.ctx.metrics.count("label_sessions_decided", 1);
      const at = st ?? x.st;
      if (!x.amb && !s.bot) this.decideSession(slot, x, at, emits);
      // No flag came before the session closed: what it held is settled.
      this.release(slot, x.id, at, emits);
      if (!s.bot) this.putSessionWeights(slot, x);
    }
    // Closed sessions are kept for one more gap so a late event (within sessionize's allowed lateness) revises them.
    for (const [id, x] of s.sess) {
      if (x.closed && wm > x.end + 2 * this.c.gapMs) {
        s.sess.delete(id);
        // What a flag would still have to retract stays, without the session's aggregates.
        const live = [...x.labels].filter(([, r]) => (r.p?.w ?? 0) > 0);
        if (!s.bot && (live.length || x.pos !== 0 || x.neg !== 0)) {
          s.old.push({ id, end: x.end, labels: live, ...(x.pos !== 0 || x.neg !== 0 ? { w: 1 as const } : {}) });
          if (s.quiet !== undefined) s.quiet = Math.min(s.quiet, x.end + this.c.responseMemoryMs);
        }
      }
    }
  }

  private decideSession(slot: Slot, x: Sess, st: number, emits: Emit[]): void {
    const view = baselineView(slot.state.b, this.rules.baselines);
    // The last click of the session (Yandex's grading: the last action of a session is a satisfied click).
    if (x.click) {
      const [eid, ts, rid] = x.click;
      // A late click changed which click was last: the earlier last-click labels no longer hold.
      if (x.lastClick !== undefined && x.lastClick !== rid) this.retractLastClick(slot, x, st, emits);
      const r = slot.state.resp.get(rid);
      if (r) {
        const d: Deciding = { eid, type: "click", ts, st, sid: x.id };
        this.fireAll(slot, "last_click", this.respFields(r, ts, view), this.respFields(r, ts, this.population), r, d, view, emits);
        x.lastClick = rid;
      }
    }
    const fields: Record<string, FieldValue | undefined> = {
      pos_weight: round(x.pos),
      neg_weight: round(x.neg),
      net: round(x.pos - x.neg),
      events: x.n,
      queries: x.counts.query ?? 0,
      responses: x.counts.response_shown ?? 0,
      duration_ms: x.end - x.start,
      abandoned: x.last?.[1] === "abandon",
    };
    const firings = fire(this.rules, "session_end", fields, (name) => view.factors[name]);
    const fired = new Set(firings.map((f) => f.rule.name));
    const sig: [string, SignalEventType, number][] = x.sig.length ? x.sig : x.last ? [[x.last[0], x.last[1], x.last[2]]] : [];
    if (sig.length === 0) return;
    const emitSession = (rec: LabelRec, rule: Firing["rule"]): void => {
      const label: Label = {
        schema_version: 2,
        label_id: rec.id,
        revision: rec.rev,
        pipeline: this.ctx.pipeline,
        kind: "session",
        ...(typeof x.last?.[3] === "string" ? { response_id: x.last[3] } : {}),
        session_id: x.id,
        user: slot.user,
        label: rule.label!,
        weight: rec.w,
        rule: rule.name,
        rule_version: rule.version,
        signals: signalsOf(rec.sig),
        event_time: iso(x.end),
        emitted_at: iso(st),
        ...contextFields(x.cx),
      };
      this.emit(slot, label, emits);
    };
    for (const firing of firings) {
      const prev = x.labels.get(firing.rule.name);
      const rec: LabelRec = { id: labelId(this.ctx.pipeline, "session", [slot.user, x.id], firing.rule.name), rev: (prev?.rev ?? -1) + 1, w: round(firing.weight), sig: [...sig], ...(prev?.p ? { p: prev.p } : {}) };
      if (prev && prev.w === rec.w && JSON.stringify(prev.sig) === JSON.stringify(rec.sig)) continue;
      x.labels.set(firing.rule.name, rec);
      emitSession(rec, firing.rule);
    }
    // A session label that no longer holds after a late event is re-emitted with weight 0 (labels are never retracted silently).
    for (const [name, prev] of x.labels) {
      if (fired.has(name) || prev.w === 0) continue;
      const rule = this.rules.rules.find((r) => r.name === name);
      if (!rule) continue;
      const rec: LabelRec = { ...prev, rev: prev.rev + 1, w: 0 };
      x.labels.set(name, rec);
      emitSession(rec, rule);
    }
  }

  /** Re-emits the last_click labels of the session's previous last click with weight 0. */
  private retractLastClick(slot: Slot, x: Sess, st: number, emits: Emit[]): void {
    const r = slot.state.resp.get(x.lastClick!);
    x.lastClick = undefined;
    if (!r || r.q === undefined) return;
    for (const rule of this.rules.bySignal.get("last_click") ?? []) {
      const prev = r.labels.get(rule.name);
      if (!prev || prev.w === 0 || rule.kind !== "response") continue;
      const rec: LabelRec = { ...prev, rev: prev.rev + 1, w: 0 };
      r.labels.set(rule.name, rec);
      const positive = rule.label === "positive";
      this.addWeight(slot, r, positive ? 0 : 1, -prev.w, x.id);
      const nb = r.nb?.find((x) => x[0] === rule.name);
      if (nb) {
        this.addWeight(slot, r, positive ? 2 : 3, -nb[1], x.id);
        nb[1] = 0;
      }
      if (positive) x.pos = round(x.pos - prev.w);
      else x.neg = round(x.neg - prev.w);
      const last = prev.sig[prev.sig.length - 1]!;
      this.emit(
        slot,
        {
          schema_version: 2,
          label_id: rec.id,
          revision: rec.rev,
          pipeline: this.ctx.pipeline,
          kind: "response",
          response_id: r.id,
          query_id: r.q,
          session_id: x.id,
          user: slot.user,
          label: rule.label!,
          weight: 0,
          rule: rule.name,
          rule_version: rule.version,
          signals: signalsOf(rec.sig),
          event_time: iso(last[2]),
          emitted_at: iso(st),
          ...this.responseFields(r),
        },
        emits,
      );
    }
  }

  /** Forgets responses not touched for response_memory (unless their session is open) and the oldest beyond max_responses. */
  private prune(s: UserState): void {
    const memory = this.c.responseMemoryMs;
    if (s.quiet !== undefined && s.at <= s.quiet && s.resp.size <= this.c.maxResponses) return;
    const open = new Set([...s.sess.values()].filter((x) => !x.closed).map((x) => x.id));
    // Response times only grow (`resp`), so nothing ages out before the oldest kept one does (a new
    // response or forgotten session lowers it; the trim below can only raise the true oldest).
    let oldest = Infinity;
    for (const [id, r] of s.resp) {
      if (r.t < s.at - memory && !(r.s !== undefined && open.has(r.s))) s.resp.delete(id);
      else oldest = Math.min(oldest, r.t);
    }
    s.old = s.old.filter((o) => o.end >= s.at - memory);
    for (const o of s.old) oldest = Math.min(oldest, o.end);
    s.quiet = oldest + memory;
    if (s.resp.size > this.c.maxResponses) {
      const ids = [...s.resp.keys()].sort((a, b) => s.resp.get(a)!.t - s.resp.get(b)!.t || (a < b ? -1 : 1));
      for (const id of ids.slice(0, ids.length - this.c.maxResponses)) s.resp.delete(id);
    }
  }
}

function signalsOf(sig: readonly [string, SignalEventType, number][]): LabelSignal[] {
  return sig.map(([event_id, event_type]) => ({ event_id, event_type }));
}

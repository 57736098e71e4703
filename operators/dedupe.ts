import type { JSONSchemaType } from "ajv";
import { DURATION_SCHEMA, parseDuration } from "../src/core/duration.js";
import { BadInputError, errorMessage } from "../src/core/errors.js";
import type { KeyScope, KeyedInput, KeyedProcessor, LintIssue, OperatorContext, OperatorSpec, Outcome, PipelineView, StateCodec } from "../src/core/operator.js";

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/** Config of a `dedupe` stage as written in the pipeline YAML. */
export interface DedupeConfig {
  /**
   * How long a repeat is still dropped: until the user's latest event time is this much past the
   * first copy's event time. @default "24h"
   */
  window?: string;
}

/** Ids remembered per user, besides the window: a user past it forgets the earliest claimed first. */
export const MAX_IDS_PER_USER = 10_000;

/** JSON Schema of the `dedupe` config; ajv fills in the defaults. */
export const dedupeConfigSchema: JSONSchemaType<DedupeConfig> = {
  type: "object",
  additionalProperties: false,
  properties: {
    window: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "24h",
      description:
        "Repeats of an event_id (or fingerprint) are dropped until the user's latest event time is this much past the first copy's event time (event time, " +
        "so a replay decides the same). " +
        `Each user's state keeps the ids of this window, at most ${MAX_IDS_PER_USER} (the earliest claimed is forgotten first), ` +
        "so memory grows with events per user per window.",
      examples: ["24h", "1h", "7d"],
    },
  },
};

/** The config with defaults applied, in ms. */
export interface CompiledDedupeConfig {
  windowMs: number;
}

/** Applies defaults (also when the runtime has not) and parses the window. */
export function compileDedupeConfig(c: DedupeConfig = {}): CompiledDedupeConfig {
  const windowMs = parseDuration(c.window ?? "24h", "window");
  return { windowMs };
}

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

/**
 * How long a user's state outlives the window (wall clock, from its last write): time for
 * redeliveries of the user's last inputs (the exactly-once guard is stored with the state) and
 * for the batch's event time running ahead of the user's.
 */
export const STATE_TTL_MARGIN_MS = 3_600_000;

/** The `dedupe` operator: drops repeated events, but never a redelivered or replayed copy of the same input. */
export const dedupe: OperatorSpec<DedupeConfig, KeyedProcessor<DedupeState>> = {
  name: "dedupe",
  summary: "Drops repeats of an event_id (or fingerprint) within an event-time window; redeliveries and replays of the same input pass.",
  description: [
    "Keyed by user. The user's state remembers, per recent event_id, the first copy: its sequence in dedupe's own input stream, its origin sequence in the " +
      "pipeline's input stream (`src.seq`) and its event time. Each event is decided against it in stream order:",
    "",
    "- not remembered: the first copy, it passes and is remembered;",
    "- the same input sequence and `src.seq`: this very message again, it passes again with the same output id " +
      "(the runtime's exactly-once guard already keeps an applied input from running twice, and a rebuild starts from empty state);",
    "- the same `src.seq` but another input sequence: the stage before re-published an input it had already passed on (its replay, beyond the stream's " +
      "duplicate window), it is dropped as `republished`, so the stages after dedupe never count one event twice;",
    "- another `src.seq`: a producer re-sent the event (a retry, a double tap), it is dropped as `duplicate`.",
    "",
    "The window is event time: an id is forgotten once the user's latest event time is `window` or more past the first copy's event time, and an event " +
      "already that old when it arrives is passed without being remembered. Nothing depends on the wall clock or on batch boundaries, so a replay or a " +
      "rebuild (state wiped, input read again from the start) decides every copy as the live run did. Besides the window, a user keeps at most " +
      `${MAX_IDS_PER_USER} ids: past that the earliest claimed is forgotten first (a repeat of it would pass). ` +
      "The state expires `window` plus an hour after the user's latest event, so an idle user's ids are gone from Redis too.",
  ].join("\n"),
  keyed: true,
  schema: dedupeConfigSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:state",
      holds:
        "`<applied seq>:<JSON>`: the stream sequence of the last input applied (the runtime's exactly-once guard), then the user's latest event time and, " +
        `per remembered event_id (at most ${MAX_IDS_PER_USER}, in claim order), the first copy's sequence in dedupe's input stream, its src.seq and its event time`,
      ttl: "window + 1h after the user's latest event time",
    },
  ],
  outputs: [],
  examples: [
    { title: "Default: one day", config: {} },
    { title: "A week, for producers that retry from offline queues", config: { window: "7d" } },
  ],
  lint: lintDedupe,
  create: createDedupe,
};

// ---------------------------------------------------------------------------------------------
// Lint
// ---------------------------------------------------------------------------------------------

const MIN_WINDOW_MS = 60_000;

function lintDedupe(config: DedupeConfig, view: PipelineView): LintIssue[] {
  const issues: LintIssue[] = [];
  let windowMs: number | undefined;
  try {
    windowMs = compileDedupeConfig(config).windowMs;
  } catch (err) {
    issues.push({ path: ["window"], message: errorMessage(err) });
  }
  if (windowMs !== undefined && windowMs < MIN_WINDOW_MS) {
    issues.push({
      path: ["window"],
      message: `window ${config.window} is shorter than a minute: producers' retries and redeliveries usually arrive later and would pass as new events`,
      hint: "use at least 1m; the default is 24h",
    });
  }
  const enrichAt = view.stages.findIndex((s) => s.operator === "enrich");
  if (enrichAt === -1 || enrichAt > view.index) {
    issues.push({
      path: [],
      message: "dedupe needs an enrich stage before it: it reads event ids and pseudonymized users from enrich's envelopes",
      hint: "put an enrich stage first",
    });
  }
  return issues;
}

// ---------------------------------------------------------------------------------------------
// Processing
// ---------------------------------------------------------------------------------------------

/** The first copy of an event id: its sequence in dedupe's input stream, its origin sequence, its event time. */
export interface Claim {
  seq: number;
  src: number;
  ts: number;
}

/** One user's recent event ids. */
export interface DedupeState {
  /** The user's latest event time (ms). */
  at: number;
  /**
   * First copies by event_id, in claim order (a Map: ids come from input, and a plain object
   * would put integer-like ids first instead of keeping the order the eviction relies on).
   */
  ids: Map<string, Claim>;
}

/**
 * Stored as `{"v":1,"at":<ms>,"ids":[[<event_id>,<seq>,<src.seq>,<ts>],…]}` in claim order. A busy
 * user holds thousands of ids: one array handed to JSON.stringify encodes them about three times
 * faster than concatenating a string per id.
 */
export const dedupeCodec = (windowMs: number): StateCodec<DedupeState> => ({
  encode(s) {
    const ids = new Array<[string, number, number, number]>(s.ids.size);
    let i = 0;
    for (const [id, c] of s.ids) ids[i++] = [id, c.seq, c.src, c.ts];
    return JSON.stringify({ v: 1, at: s.at, ids });
  },
  decode(raw) {
    const st = JSON.parse(raw) as { v?: unknown; at?: unknown; ids?: unknown };
    if (st?.v !== 1 || typeof st.at !== "number" || !Array.isArray(st.ids)) throw new Error("unknown state version");
    const ids = new Map<string, Claim>();
    for (const [id, seq, src, ts] of st.ids as [string, number, number, number][]) ids.set(id, { seq, src, ts });
    return { at: st.at, ids };
  },
  ttlMs: (s, eventTimeMs) => (s ? Math.max(STATE_TTL_MARGIN_MS, s.at + windowMs + STATE_TTL_MARGIN_MS - eventTimeMs) : STATE_TTL_MARGIN_MS),
});

function createDedupe(config: DedupeConfig, ctx: OperatorContext): KeyedProcessor<DedupeState> {
  const { windowMs } = compileDedupeConfig(config);

  return {
    codec: dedupeCodec(windowMs),
    processElement(input: KeyedInput, key: KeyScope<DedupeState>): Outcome {
      const env = input.envelope;
      if (!env || typeof env.event?.event_id !== "string" || typeof env.event.user !== "string" || !Number.isFinite(env.event.ts) || typeof env.src?.seq !== "number") {
        return { emits: [], error: new BadInputError("bad_envelope", "dedupe needs an envelope with event.event_id, event.user, event.ts and src.seq") };
      }
      const { event_id: id, ts } = env.event;
      const src = env.src.seq;
      const s = key.get() ?? { at: ts, ids: new Map<string, Claim>() };
      if (ts > s.at) s.at = ts;
      const horizon = s.at - windowMs;
      // Forget from the earliest claimed while they are out of the window; a later claim that is
      // out of it too (events arrive a little out of order) is ignored below until its turn.
      for (const [old, c] of s.ids) {
        if (c.ts > horizon) break;
        s.ids.delete(old);
      }

      let out: Outcome;
      const prior = s.ids.get(id);
      if (prior !== undefined && prior.ts > horizon) {
        if (prior.seq === input.seq && prior.src === src) out = { emits: [{ to: "next", id: `${ctx.stage}:${src}`, value: env }] };
        else out = { emits: [], dropped: prior.src === src ? "republished" : "duplicate" };
      } else {
        // Claimed anew at the end of the claim order (a forgotten claim is replaced).
        if (prior !== undefined) s.ids.delete(id);
        if (ts > horizon) {
          s.ids.set(id, { seq: input.seq, src, ts });
          if (s.ids.size > MAX_IDS_PER_USER) s.ids.delete(s.ids.keys().next().value!);
        }
        out = { emits: [{ to: "next", id: `${ctx.stage}:${src}`, value: env }] };
      }
      key.put(s);
      return out;
    },
  };
}

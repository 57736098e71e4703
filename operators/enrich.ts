import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Ajv, type ErrorObject, type JSONSchemaType, type ValidateFunction } from "ajv";
import { isbot } from "isbot";
import { LRUCache } from "lru-cache";
import UAParser from "ua-parser-js";
import { DURATION_SCHEMA, formatDuration, parseDuration } from "../src/core/duration.js";
import { BadInputError, ConfigError, TransientError, errorMessage, type TacitError } from "../src/core/errors.js";
import { EVENT_TYPES, type Envelope, type EventType, type RawEvent, type TacitEvent } from "../src/core/event.js";
import type { Emit, LintIssue, OperatorContext, OperatorSpec, Outcome, PipelineView, Processor, StageInput } from "../src/core/operator.js";
import { partitionOf, unitHash } from "../src/core/partition.js";
import { redactPii, type RedactKinds } from "../src/core/pii.js";
import { PseudonymCache, resolvePseudonymKey, weakKeyReason } from "../src/core/pseudonym.js";
import { userKey } from "../src/core/state.js";

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/** Config of an `enrich` stage as written in the pipeline YAML (every field has a default). */
export interface EnrichConfig {
  /** Largest accepted message in bytes. @default 65536 */
  max_event_bytes?: number;
  /** How far an event's timestamp may lie ahead of the time the stream stored it. @default "1h" */
  max_future_skew?: string;
  /** How far an event's timestamp may lie behind the time the stream stored it. @default "30d" */
  max_past_age?: string;
  /** Environment variable holding the pseudonymization key (`<version>:<secret>`). @default "TACIT_PSEUDONYM_KEY" */
  pseudonym_key_env?: string;
  redact?: {
    emails?: boolean;
    phones?: boolean;
    cards?: boolean;
    ips?: boolean;
    /** Payload fields scanned for PII. */
    fields?: string[];
  };
  sampling?: {
    /** Fraction of events kept for event types without their own rate. @default 1 */
    default_rate?: number;
    /** Fraction kept per event type. */
    rates?: Partial<Record<EventType, number>>;
  };
  /** Look up cohort and experiment per user in Redis. @default true */
  context_lookup?: boolean;
}

/** The payload fields that hold free text (the candidates for `redact.fields`). */
export const FREE_TEXT_FIELDS = ["text", "original_text", "edited_text", "destination", "outcome", "model"] as const;
const DEFAULT_REDACT_FIELDS = ["text", "original_text", "edited_text", "destination"];

const rate = (description: string) => ({ type: "number", minimum: 0, maximum: 1, nullable: true, description }) as const;

/** JSON Schema of the `enrich` config; ajv fills in the defaults. */
export const enrichConfigSchema: JSONSchemaType<EnrichConfig> = {
  type: "object",
  additionalProperties: false,
  properties: {
    max_event_bytes: {
      type: "integer",
      minimum: 256,
      maximum: 8_388_608,
      nullable: true,
      default: 65536,
      description: "Largest accepted message in bytes; larger ones go to the DLQ with reason `oversized`.",
      examples: [65536],
    },
    max_future_skew: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "1h",
      description:
        "How far an event's timestamp may lie ahead of the time the input stream stored the message (clock skew of producers). " +
        "Beyond it: DLQ, reason `bad_timestamp`. Measured against the stream's time, so replays decide the same.",
      examples: ["1h", "5m"],
    },
    max_past_age: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "30d",
      description: "How far an event's timestamp may lie behind the time the stream stored the message (buffered clients, backfills). Beyond it: DLQ, reason `bad_timestamp`.",
      examples: ["30d", "2d"],
    },
    pseudonym_key_env: {
      type: "string",
      pattern: "^[A-Za-z_][A-Za-z0-9_]*$",
      nullable: true,
      default: "TACIT_PSEUDONYM_KEY",
      description:
        "Environment variable holding the HMAC key that pseudonymizes user_id, as `<version>:<secret>` (the version is recorded on every event as " +
        "`user_key_version`) or a bare secret (version `v0`); use at least 16 characters (shorter ones are accepted with a warning). Required outside dev mode.",
      examples: ["TACIT_PSEUDONYM_KEY"],
    },
    redact: {
      type: "object",
      additionalProperties: false,
      nullable: true,
      default: {},
      description: "PII redaction in free-text payload fields, before anything is stored or published.",
      properties: {
        emails: { type: "boolean", nullable: true, default: true, description: "Replace e-mail addresses with `[email]`." },
        phones: { type: "boolean", nullable: true, default: true, description: "Replace phone numbers (international and common national formats) with `[phone]`." },
        cards: { type: "boolean", nullable: true, default: true, description: "Replace payment card numbers (13–19 digits, Luhn-checked) with `[card]`." },
        ips: { type: "boolean", nullable: true, default: true, description: "Replace IPv4 and IPv6 addresses with `[ip]`." },
        fields: {
          type: "array",
          nullable: true,
          uniqueItems: true,
          items: { type: "string", enum: [...FREE_TEXT_FIELDS] },
          default: DEFAULT_REDACT_FIELDS,
          description: "Payload fields scanned for PII. Fields that hold PII are listed on the event as `redacted` (e.g. `payload.text`).",
          examples: [DEFAULT_REDACT_FIELDS],
        },
      },
    },
    sampling: {
      type: "object",
      additionalProperties: false,
      nullable: true,
      default: {},
      description:
        "Deterministic stratified sampling: an event is kept iff murmurhash3(event_id) / 2^32 < the rate of its type, so a replay keeps exactly " +
        "the same events. `explicit_feedback` is never sampled out (it is held out for calibration).",
      properties: {
        default_rate: { ...rate("Fraction of events kept, for event types without their own rate."), default: 1, examples: [1, 0.25] },
        rates: {
          type: "object",
          nullable: true,
          required: [],
          additionalProperties: false,
          description: "Fraction kept per event type (0–1).",
          examples: [{ dwell: 0.1, response_shown: 0.5 }],
          properties: Object.fromEntries(EVENT_TYPES.map((t) => [t, rate(`Fraction of ${t} events kept.`)])) as Record<EventType, ReturnType<typeof rate>>,
        },
      },
    },
    context_lookup: {
      type: "boolean",
      nullable: true,
      default: true,
      description: "Look up each user's cohort and experiment in Redis (one round trip per batch) and add them to the event.",
    },
  },
};

/** The config with defaults applied and durations in ms. */
export interface CompiledEnrichConfig {
  maxEventBytes: number;
  maxFutureSkewMs: number;
  maxPastAgeMs: number;
  pseudonymKeyEnv: string;
  redactKinds: Required<RedactKinds>;
  redactFields: string[];
  defaultRate: number;
  rates: Partial<Record<EventType, number>>;
  contextLookup: boolean;
}

/** Applies defaults (also when the runtime has not) and parses durations. */
export function compileEnrichConfig(c: EnrichConfig = {}): CompiledEnrichConfig {
  const r = c.redact ?? {};
  const s = c.sampling ?? {};
  return {
    maxEventBytes: c.max_event_bytes ?? 65536,
    maxFutureSkewMs: parseDuration(c.max_future_skew ?? "1h", "max_future_skew"),
    maxPastAgeMs: parseDuration(c.max_past_age ?? "30d", "max_past_age"),
    pseudonymKeyEnv: c.pseudonym_key_env ?? "TACIT_PSEUDONYM_KEY",
    redactKinds: { emails: r.emails ?? true, phones: r.phones ?? true, cards: r.cards ?? true, ips: r.ips ?? true },
    redactFields: r.fields ?? DEFAULT_REDACT_FIELDS,
    defaultRate: s.default_rate ?? 1,
    rates: s.rates ?? {},
    contextLookup: c.context_lookup ?? true,
  };
}

// ---------------------------------------------------------------------------------------------
// Event schema and checks (usable on their own, e.g. by producers' tests)
// ---------------------------------------------------------------------------------------------

let eventSchemaCache: Record<string, unknown> | undefined;

/**
 * `config/schemas/event.v1.json`, read from the repository root at run time (this module runs
 * from `dist/operators/` or `operators/`).
 */
export function eventSchemaV1(): Record<string, unknown> {
  if (!eventSchemaCache) {
    let lastError: unknown;
    for (const rel of ["../../config/schemas/event.v1.json", "../config/schemas/event.v1.json"]) {
      try {
        eventSchemaCache = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as Record<string, unknown>;
        break;
      } catch (err) {
        lastError = err;
      }
    }
    if (!eventSchemaCache) throw new ConfigError("config/schemas/event.v1.json not found", lastError);
  }
  return eventSchemaCache;
}

let eventValidatorCache: ValidateFunction | undefined;

function eventValidator(): ValidateFunction {
  if (!eventValidatorCache) {
    const ajv = new Ajv({ allErrors: true, strict: true, strictTypes: false, strictRequired: false, verbose: true, logger: false });
    eventValidatorCache = ajv.compile(eventSchemaV1());
  }
  return eventValidatorCache;
}

const MAX_LISTED_ERRORS = 8;

/** ajv errors as one readable line: `/payload/position must be integer; / must have required property 'user_id'`. */
export function formatSchemaErrors(errors: readonly ErrorObject[]): string {
  const unions = errors.filter((e) => e.keyword === "anyOf" || e.keyword === "oneOf").map((e) => e.schemaPath + "/");
  const lines: string[] = [];
  for (const e of errors) {
    // `if` only says "must match then"; branch errors of a union restate the union's own error.
    if (e.keyword === "if" || unions.some((u) => e.schemaPath.startsWith(u))) continue;
    const path = e.instancePath || "/";
    let msg: string;
    switch (e.keyword) {
      case "additionalProperties":
        msg = `must NOT have additional property '${(e.params as { additionalProperty: string }).additionalProperty}'`;
        break;
      case "enum":
        msg = `must be one of ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(", ")}`;
        break;
      case "anyOf":
      case "oneOf": {
        const desc = (e.parentSchema as { description?: string } | undefined)?.description;
        msg = desc ? `must be: ${desc}` : (e.message ?? "is invalid");
        break;
      }
      case "pattern":
        msg = path === "/event_id" ? "must not start with the reserved prefix 'fp:'" : (e.message ?? "is invalid");
        break;
      default:
        msg = e.message ?? "is invalid";
    }
    const line = `${path} ${msg}`;
    if (!lines.includes(line)) lines.push(line);
  }
  const shown = lines.slice(0, MAX_LISTED_ERRORS);
  if (lines.length > shown.length) shown.push(`(${lines.length - shown.length} more)`);
  return shown.join("; ");
}

const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
const RFC3339_RE = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|([+-])(\d{2}):(\d{2}))$/;

/**
 * Parses an RFC 3339 date-time (with a time zone; calendar-checked, leap second allowed) to ms
 * since the epoch; null when it is not one. Fractions beyond ms are truncated.
 */
export function parseRfc3339(s: string): number | null {
  const m = RFC3339_RE.exec(s);
  if (!m) return null;
  const year = Number(m[1]);
  const month = Number(m[2]);
  const day = Number(m[3]);
  const hour = Number(m[4]);
  const minute = Number(m[5]);
  const second = Number(m[6]);
  if (month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || second > 60) return null;
  const leap = (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
  if (day > (month === 2 ? (leap ? 29 : 28) : DAYS_IN_MONTH[month - 1]!)) return null;
  let offsetMin = 0;
  if (m[9]) {
    const oh = Number(m[10]);
    const om = Number(m[11]);
    if (oh > 23 || om > 59) return null;
    offsetMin = (m[9] === "+" ? 1 : -1) * (oh * 60 + om);
  }
  const ms = m[7] ? Math.floor(Number(m[7]) * 1000) : 0;
  let t: number;
  if (year >= 100) {
    t = Date.UTC(year, month - 1, day, hour, minute);
  } else {
    const d = new Date(Date.UTC(2000, month - 1, day, hour, minute));
    d.setUTCFullYear(year); // Date.UTC would map years 0–99 to 1900–1999
    t = d.getTime();
  }
  // Seconds are added last so a leap second (:60) becomes the instant after :59.999.
  return t + second * 1000 + ms - offsetMin * 60_000;
}

/** A raw event that passed the checks, with its parsed event time. */
export interface CheckedEvent {
  event: RawEvent;
  ts: number;
}

/**
 * How deep `context` (the one field passed through as sent) may nest. Deeper values would
 * overflow the stack of every later JSON.stringify and block the stage's batches.
 */
export const MAX_CONTEXT_DEPTH = 32;

/** The nesting depth of a JSON value (a scalar is 0), counted without recursion, up to `limit + 1`. */
function depthOf(value: unknown, limit: number): number {
  let max = 0;
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length) {
    const [v, d] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    if (d + 1 > max) max = d + 1;
    if (max > limit) return max;
    for (const child of Object.values(v)) stack.push([child, d + 1]);
  }
  return max;
}

/**
 * Checks a parsed message against the v1 event contract: unknown event type first (the most
 * specific reason), then the JSON Schema, cross-field rules, and the timestamp format.
 * Stream-time bounds (skew, age) are the stage's and are checked by the processor.
 */
export function checkEvent(value: unknown): CheckedEvent | BadInputError {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    const t = (value as { event_type?: unknown }).event_type;
    if (typeof t === "string" && !(EVENT_TYPES as readonly string[]).includes(t)) {
      return new BadInputError("unknown_event_type", `event_type "${t.slice(0, 64)}" is not one of the v1 event types (${EVENT_TYPES.join(", ")})`);
    }
  }
  const validate = eventValidator();
  if (!validate(value)) return new BadInputError("schema_violation", formatSchemaErrors(validate.errors ?? []));
  const event = value as unknown as RawEvent;
  if (event.context !== undefined && depthOf(event.context, MAX_CONTEXT_DEPTH) > MAX_CONTEXT_DEPTH) {
    return new BadInputError("schema_violation", `/context nests deeper than ${MAX_CONTEXT_DEPTH} levels`);
  }
  if (event.event_type === "copy_paste") {
    const p = event.payload as { span_start: number; span_end: number };
    if (p.span_end < p.span_start) return new BadInputError("schema_violation", "/payload/span_end must be >= span_start");
  }
  const ts = parseRfc3339(event.timestamp);
  if (ts === null) return new BadInputError("bad_timestamp", `timestamp "${event.timestamp}" is not a valid RFC 3339 date-time (a real calendar time with a time zone, e.g. 2024-05-01T12:00:00Z)`);
  return { event, ts };
}

/** JSON with object keys sorted at every level: the same event always serializes the same way. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map((v) => (v === undefined ? "null" : canonicalJson(v))).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

/** The id of an event without `event_id`: `fp:` + the first 32 hex digits of sha256 of its canonical JSON. */
export function fingerprint(event: unknown): string {
  return "fp:" + createHash("sha256").update(canonicalJson(event)).digest("hex").slice(0, 32);
}

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

const CONTEXT_KEY = "tacit:{<prefix>:u:<user>}:context";

/** The `enrich` operator: validation, pseudonymization, PII redaction, UA parsing, context lookup, sampling. */
export const enrich: OperatorSpec<EnrichConfig, Processor> = {
  name: "enrich",
  summary: "Validates raw events, pseudonymizes users, redacts PII, parses the user agent, adds cohort/experiment context and samples per event type.",
  description: [
    "The first stage of a pipeline: it reads the producers' raw JSON from `<prefix>.in.<event_type>` and emits envelopes partitioned by the pseudonymized user.",
    "",
    "Per message, in order: size check (`oversized`), JSON parse (`malformed_json`), event type (`unknown_event_type`), JSON Schema `config/schemas/event.v1.json` " +
      "(`schema_violation`, listing every error as `/payload/position must be integer`), timestamp (`bad_timestamp`: not RFC 3339, or beyond " +
      "`max_future_skew` / `max_past_age` of the time the stream stored the message, which is deterministic on replay). Each failure goes to `<prefix>.dlq.<stage>` with the original bytes; the batch goes on.",
    "",
    "`user_id` becomes `user` = HMAC-SHA256(key, user_id), base64url, 22 characters, with `user_key_version`; the raw id never leaves this stage. " +
      "E-mails, phone numbers, card numbers and IP addresses in the configured payload fields are replaced by `[email]`, `[phone]`, `[card]`, `[ip]` and the fields listed in `redacted`. " +
      "The user agent is parsed (browser, OS, device type) and checked against the `isbot` pattern list, then dropped. " +
      "Events without `event_id` get `fp:<sha256 of the canonical event>`, so a re-sent copy gets the same id and dedupe catches it.",
    "",
    "Sampling keeps an event iff murmurhash3(event_id) / 2^32 < the rate of its type: the same events are kept on every run and replay, and a rate change keeps a superset or subset. " +
      "`explicit_feedback` is never sampled out. Sampled-out events are counted as dropped (`sampled_out`).",
  ].join("\n"),
  keyed: false,
  schema: enrichConfigSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: CONTEXT_KEY,
      holds:
        "Read only: a hash with the user's `cohort`, `experiment_id` and `variant`, written by the product's assignment service. " +
        "Copied to the event as `cohort` and `context.experiment` (an experiment sent on the event wins).",
      ttl: "set by the writer",
    },
  ],
  outputs: [],
  examples: [
    { title: "Defaults (key from TACIT_PSEUDONYM_KEY, everything redacted, nothing sampled out)", config: {} },
    {
      title: "Sample high-volume signals, keep every query",
      config: { sampling: { default_rate: 1, rates: { response_shown: 0.2, dwell: 0.5 } } },
    },
    {
      title: "Tighter time bounds and a custom key variable",
      config: { max_future_skew: "5m", max_past_age: "2d", pseudonym_key_env: "FEEDBACK_PSEUDONYM_KEY", max_event_bytes: 16384 },
    },
  ],
  lint: lintEnrich,
  create: createEnrich,
};

// ---------------------------------------------------------------------------------------------
// Lint
// ---------------------------------------------------------------------------------------------

function lintEnrich(config: EnrichConfig, view: PipelineView): LintIssue[] {
  const issues: LintIssue[] = [];
  if (view.index !== 0) {
    issues.push({
      path: [],
      message: "enrich must be the first stage: it parses the producers' raw events, later stages receive envelopes",
      hint: "move this stage to the top of `stages`",
    });
  }
  const rates = config.sampling?.rates;
  if (rates?.explicit_feedback !== undefined && rates.explicit_feedback !== null && rates.explicit_feedback < 1) {
    issues.push({
      path: ["sampling", "rates", "explicit_feedback"],
      message: "explicit_feedback is never sampled out (it is held out for calibration and evaluation); this rate would be ignored",
      hint: "remove sampling.rates.explicit_feedback",
    });
  }
  const def = config.sampling?.default_rate;
  if (def === 0 && !(rates && Object.values(rates).some((r) => typeof r === "number" && r > 0))) {
    issues.push({
      path: ["sampling", "default_rate"],
      message: "default_rate 0 with no positive per-type rate drops every event except explicit_feedback",
      hint: "set default_rate above 0 or give the event types you need a rate",
    });
  }
  return issues;
}

// ---------------------------------------------------------------------------------------------
// Processing
// ---------------------------------------------------------------------------------------------

type ParsedUa = NonNullable<TacitEvent["ua"]>;

/** Browser, OS, device type and isbot verdict of a user agent, uncached. */
export function parseUserAgent(ua: string): ParsedUa {
  const r = new UAParser(ua).getResult();
  const parsed: ParsedUa = { device: r.device.type ?? "desktop", raw_is_bot: isbot(ua) };
  if (r.browser.name) parsed.browser = r.browser.name;
  if (r.os.name) parsed.os = r.os.name;
  return parsed;
}

/**
 * User agents whose parse and isbot verdict are kept. Parsing costs 10–20 µs and isbot another
 * 2 µs, while real traffic repeats a small set of agent strings (a handful of browser
 * versions on a handful of systems make up most of it), so 1,000 covers the common agents of a
 * worker's recent batches. Bounded in entries because agent strings come from clients: a bot
 * sending a new string per request only evicts.
 */
export const UA_CACHE_ENTRIES = 1_000;

/** {@link parseUserAgent} with a bounded LRU of recent agents (see {@link UA_CACHE_ENTRIES}). */
export class UserAgentCache {
  private readonly lru: LRUCache<string, ParsedUa>;

  constructor(maxEntries = UA_CACHE_ENTRIES) {
    this.lru = new LRUCache({ max: maxEntries });
  }

  /** What `parseUserAgent(ua)` returns, as a new object each call. */
  parse(ua: string): ParsedUa {
    let parsed = this.lru.get(ua);
    if (!parsed) {
      parsed = parseUserAgent(ua);
      this.lru.set(ua, parsed);
    }
    // A copy: the cached entry must not change if a later stage edits the event it is on.
    return { ...parsed };
  }

  /** Entries held now (never more than the bound). */
  get size(): number {
    return this.lru.size;
  }
}

interface Pending {
  index: number;
  input: StageInput;
  raw: RawEvent;
  ts: number;
  eventId: string;
  user: string;
}

const decoder = new TextDecoder("utf-8", { fatal: true });

function createEnrich(config: EnrichConfig, ctx: OperatorContext): Processor {
  const cfg = compileEnrichConfig(config);
  const { key, dev } = resolvePseudonymKey(ctx.env, cfg.pseudonymKeyEnv, ctx.devMode);
  if (dev) {
    ctx.log.warn(
      { stage: ctx.stage, env: cfg.pseudonymKeyEnv, key_version: key.version },
      `${cfg.pseudonymKeyEnv} is not set: pseudonymizing with the built-in development key (user_key_version "dev"). Never use this outside development.`,
    );
  }
  const weak = dev ? undefined : weakKeyReason(key);
  if (weak) ctx.log.warn({ stage: ctx.stage, env: cfg.pseudonymKeyEnv, key_version: key.version }, `${cfg.pseudonymKeyEnv}: ${weak}`);
  // Compile the event schema now so a broken schema fails at start-up, not on the first message.
  eventValidator();
  // Counters start at zero: a redaction count per kind (README "SLIs and alerts", M8).
  for (const kind of ["email", "phone", "card", "ip"]) ctx.metrics.count("pii_redacted", 0, { kind });

  // Bounded caches of what repeats per user and per agent (the bounds' reasons are on each class).
  const pseudonyms = new PseudonymCache();
  const userAgents = new UserAgentCache(UA_CACHE_ENTRIES);

  const rateOf = (t: EventType): number => (t === "explicit_feedback" ? 1 : (cfg.rates[t] ?? cfg.defaultRate));
  // unitHash is below 1, so a rate of 1 keeps every event without hashing its id.
  const keeps = (p: Pending): boolean => {
    const rate = rateOf(p.raw.event_type);
    return rate >= 1 || unitHash(p.eventId) < rate;
  };

  /** Parses and checks one message: the pending event, or the outcome that ends it. */
  const admit = (input: StageInput, index: number): Pending | Outcome => {
    const fail = (err: TacitError): Outcome => ({ emits: [], error: err });
    if (input.data.byteLength > cfg.maxEventBytes) {
      return fail(new BadInputError("oversized", `message is ${input.data.byteLength} bytes; max_event_bytes is ${cfg.maxEventBytes}`));
    }
    let value: unknown;
    try {
      value = JSON.parse(decoder.decode(input.data));
    } catch (err) {
      return fail(new BadInputError("malformed_json", `not valid UTF-8 JSON: ${errorMessage(err)}`));
    }
    const checked = checkEvent(value);
    if (checked instanceof BadInputError) return fail(checked);
    const { event, ts } = checked;
    if (ts > input.stream_time_ms + cfg.maxFutureSkewMs) {
      return fail(
        new BadInputError(
          "bad_timestamp",
          `timestamp ${event.timestamp} is ${formatDuration(ts - input.stream_time_ms)} ahead of the stream time ${new Date(input.stream_time_ms).toISOString()} (max_future_skew ${formatDuration(cfg.maxFutureSkewMs)})`,
        ),
      );
    }
    if (ts < input.stream_time_ms - cfg.maxPastAgeMs) {
      return fail(
        new BadInputError(
          "bad_timestamp",
          `timestamp ${event.timestamp} is ${formatDuration(input.stream_time_ms - ts)} older than the stream time ${new Date(input.stream_time_ms).toISOString()} (max_past_age ${formatDuration(cfg.maxPastAgeMs)})`,
        ),
      );
    }
    const eventId = event.event_id ?? fingerprint(value);
    return { index, input, raw: event, ts, eventId, user: pseudonyms.pseudonymize(key, event.user_id) };
  };

  const build = (p: Pending, context: Record<string, string> | undefined): Emit => {
    const raw = p.raw;
    const payload: Record<string, unknown> = { ...(raw.payload ?? {}) };
    const redacted: string[] = [];
    for (const field of cfg.redactFields) {
      const v = payload[field];
      if (typeof v !== "string") continue;
      const r = redactPii(v, cfg.redactKinds);
      if (r.found.length === 0) continue;
      payload[field] = r.text;
      redacted.push(`payload.${field}`);
      for (const kind of r.found) ctx.metrics.count("pii_redacted", 1, { kind });
    }
    const event: TacitEvent = {
      event_id: p.eventId,
      session_id: raw.session_id,
      user: p.user,
      user_key_version: key.version,
      timestamp: raw.timestamp,
      ts: p.ts,
      event_type: raw.event_type,
      payload,
    };
    if (raw.query_id !== undefined) event.query_id = raw.query_id;
    if (raw.response_id !== undefined) event.response_id = raw.response_id;
    let eventContext = raw.context ? { ...raw.context } : undefined;
    if (context?.experiment_id && !eventContext?.experiment) {
      eventContext = { ...eventContext, experiment: context.variant ? { id: context.experiment_id, variant: context.variant } : { id: context.experiment_id } };
    }
    if (eventContext) event.context = eventContext;
    if (raw.user_agent) event.ua = userAgents.parse(raw.user_agent);
    if (context?.cohort) event.cohort = context.cohort;
    if (redacted.length) event.redacted = redacted;
    const envelope: Envelope = { v: 1, event, src: { seq: p.input.seq }, partition: partitionOf(p.user, ctx.partitions), attrs: {} };
    return { to: "next", id: `${ctx.stage}:${p.input.seq}`, value: envelope };
  };

  return {
    async process(batch: StageInput[]): Promise<Outcome[]> {
      const outcomes: (Outcome | undefined)[] = new Array(batch.length);
      const kept: Pending[] = [];
      batch.forEach((input, i) => {
        let r: Pending | Outcome;
        try {
          r = admit(input, i);
        } catch (err) {
          r = { emits: [], error: new BadInputError("processing_failed", `enrich failed on this message: ${errorMessage(err)}`, err) };
        }
        if ("emits" in r) outcomes[i] = r;
        else if (keeps(r)) kept.push(r);
        else outcomes[i] = { emits: [], dropped: "sampled_out" };
      });

      let contexts: Map<string, Record<string, string>> | undefined;
      if (cfg.contextLookup && kept.length > 0) {
        const users = [...new Set(kept.map((p) => p.user))];
        try {
          const hashes = await ctx.state.hgetallMany(users.map((u) => userKey(ctx.prefix, u, "context")));
          contexts = new Map(users.map((u, i) => [u, hashes[i] ?? {}]));
        } catch (err) {
          // Redis is down for the whole batch: retry it rather than emit events without context.
          const retry = err instanceof TransientError ? err : new TransientError("context_lookup_failed", `context lookup: ${errorMessage(err)}`, err);
          for (const p of kept) outcomes[p.index] = { emits: [], error: retry };
          return outcomes as Outcome[];
        }
      }

      for (const p of kept) {
        try {
          outcomes[p.index] = { emits: [build(p, contexts?.get(p.user))] };
        } catch (err) {
          outcomes[p.index] = { emits: [], error: new BadInputError("processing_failed", `enrich failed on this message: ${errorMessage(err)}`, err) };
        }
      }
      return outcomes as Outcome[];
    },
  };
}

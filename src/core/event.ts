/** The v1 event types (SPEC §3). `config/schemas/event.v1.json` is the schema; this list mirrors its enum. */
export const EVENT_TYPES = [
  "query",
  "response_shown",
  "click",
  "copy_paste",
  "accept",
  "edit",
  "regenerate",
  "dwell",
  "abandon",
  "task_complete",
  "share",
  "explicit_feedback",
] as const;
export type EventType = (typeof EVENT_TYPES)[number];

/** An input event as producers send it (after schema validation). */
export interface RawEvent {
  event_id?: string;
  session_id: string;
  user_id: string;
  timestamp: string;
  query_id?: string;
  response_id?: string;
  event_type: EventType;
  payload?: Record<string, unknown>;
  user_agent?: string;
  context?: Record<string, unknown>;
}

/** An event after enrich: the raw user id is gone, PII is redacted, time is parsed. */
export interface TacitEvent {
  /** The producer's event_id, or `fp:<hash>` of the canonical event when absent. */
  event_id: string;
  session_id: string;
  /** Pseudonym of user_id (keyed HMAC); the raw user_id never leaves enrich. */
  user: string;
  /** Version of the pseudonymization key that produced `user`. */
  user_key_version: string;
  timestamp: string;
  /** Event time in ms since the epoch, parsed from `timestamp`. */
  ts: number;
  query_id?: string;
  response_id?: string;
  event_type: EventType;
  payload: Record<string, unknown>;
  context?: Record<string, unknown>;
  /** Parsed user agent, when one was sent. */
  ua?: { browser?: string; os?: string; device?: string; raw_is_bot?: boolean; raw?: string };
  /** Cohort and experiment context looked up from Redis. */
  cohort?: string;
  /** Names of fields where PII was redacted. */
  redacted?: string[];
}

/**
 * The record passed between stages on `<p>.x.<stage>.<partition>` subjects.
 * `src` identifies the input message the event came from, which makes every output id and
 * every state change deterministic under redelivery and replay.
 */
export interface Envelope {
  v: 1;
  event: TacitEvent;
  /** Origin: the sequence of the event in the pipeline's input stream. */
  src: { seq: number };
  /** Partition of the keyed stages (murmurhash3 of `event.user` mod partitions). */
  partition: number;
  /** Annotations added by stages, by operator name (`bot`, `session`, `reformulation`, …). */
  attrs: Record<string, unknown>;
}

/**
 * True for the marker bot-score sends on when it flags a user (attrs.bot.band = "bot"). Later
 * keyed stages pass it on unchanged and keep no state from it; label-derive acts on it.
 */
export function isBotMarker(env: Envelope): boolean {
  const bot = env.attrs?.bot as { band?: unknown } | undefined;
  return bot?.band === "bot";
}

/** The keys of an envelope in the order every stage writes them (enrich's, kept by spreads). */
const ENVELOPE_KEYS = ["v", "event", "src", "partition", "attrs"];
/** How an envelope's bytes end when it carries no annotations yet (enrich's output). */
const NO_ATTRS_TAIL = Buffer.from(',"attrs":{}}');

/**
 * The bytes of `out`, an envelope that stages made from `input` (decoded from `bytes`) by adding
 * annotations only: `bytes` with the annotations spliced in, the same bytes `JSON.stringify(out)`
 * gives when `bytes` came from `JSON.stringify` — without encoding the event again, most of an
 * envelope. Undefined unless `out` shares `input`'s event, source and partition (the same objects:
 * operators never change their input in place), keeps the key order, and `bytes` ends with
 * empty annotations; the caller then encodes `out` whole.
 */
export function spliceAttrs(bytes: Uint8Array, input: Envelope, out: unknown): Buffer | undefined {
  const o = out as Envelope | null;
  if (o === null || typeof o !== "object" || o.v !== input.v || o.event !== input.event || o.src !== input.src || o.partition !== input.partition) return undefined;
  let n = 0;
  for (const k in o) if (k !== ENVELOPE_KEYS[n++]) return undefined;
  if (n !== ENVELOPE_KEYS.length) return undefined;
  for (const _ in input.attrs) return undefined;
  const tail = NO_ATTRS_TAIL.length;
  const at = bytes.length - tail;
  if (at < 0) return undefined;
  // Byte by byte: a view of the tail to compare cost more than the comparison.
  for (let i = 0; i < tail; i++) if (bytes[at + i] !== NO_ATTRS_TAIL[i]) return undefined;
  // Kept: everything up to `"attrs":`; replaced: the empty `{}` and the closing brace.
  const head = bytes.length - "{}}".length;
  const attrs = JSON.stringify(o.attrs);
  const len = Buffer.byteLength(attrs);
  // At least as long as `bytes` ("{}" is the shortest annotation): copied whole (no view), its
  // last three bytes then overwritten.
  const buf = Buffer.allocUnsafe(head + len + 1);
  buf.set(bytes);
  buf.write(attrs, head);
  buf[head + len] = 0x7d;
  return buf;
}

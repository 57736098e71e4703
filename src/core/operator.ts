import type { Clock } from "./clock.js";
import type { Envelope } from "./event.js";
import type { TacitError } from "./errors.js";
import type { CommitGroup, StateStore } from "./state.js";

/** Where an operator can send a record. `next` is the following stage (or the end of the pipeline). */
export type OutputName =
  | "next"
  | "late"
  | "bots"
  | "sessions"
  | "labels.response"
  | "labels.preference"
  | "labels.session";

/**
 * The label outputs (for ML teams). Their records go through the runtime's published-label
 * registry: a label computed again with the same content is not published again, so they are
 * still computed and published (as new revisions where they changed) below a replay fence.
 */
export const LABEL_OUTPUTS: ReadonlySet<OutputName> = new Set<OutputName>(["labels.response", "labels.preference", "labels.session"]);

/** One record an operator sends out. `id` must be deterministic: it becomes the `Nats-Msg-Id`. */
export interface Emit {
  to: OutputName;
  id: string;
  /** For `next`: the envelope passed to the next stage. For side outputs: any JSON value. */
  value: unknown;
}

/** One message handed to an operator. */
export interface StageInput {
  /** Stream sequence of this message in the stage's input stream. */
  seq: number;
  subject: string;
  /** The raw bytes (the first stage parses them; later stages get `envelope`). */
  data: Uint8Array;
  /** The decoded envelope for stages after the first. */
  envelope?: Envelope;
  /** How many times this message has been delivered (1 the first time). */
  deliveries: number;
  /** When the stream stored this message (ms). Deterministic across replays, unlike the wall clock. */
  stream_time_ms: number;
  /**
   * Event-time watermark of this input's partition just before this input (keyed stages):
   * max event time seen in the partition's stream order minus the pipeline's
   * `event_time.max_out_of_orderness`. Undefined before the first event. Deterministic:
   * it depends only on the order of the partition's stream, not on batch boundaries.
   */
  watermark_ms?: number;
  /** Partition of this input (keyed stages). */
  partition?: number;
}

/**
 * What happened to one input: the records it produced, the effects it makes outside the
 * operator's own state, or the error that stopped it. The runtime publishes every emit of a batch
 * first, then commits (keyed state, these effects and the partition's progress together), then
 * acks: a crash before the commit recomputes the same emits (same ids, deduplicated by
 * JetStream), a crash after it finds the input already applied. Operators never write to Redis
 * themselves.
 */
export interface Outcome {
  emits: Emit[];
  /** Effects outside the operator's own state (online features), applied with the batch's commit. */
  commits?: CommitGroup[];
  /** Set when the input failed: retryable → nak; otherwise → dead letter with this error's code. */
  error?: TacitError;
  /** True when the input was intentionally dropped (duplicate, sampled out); counted, not an error. */
  dropped?: string;
}

export interface Logger {
  debug(obj: object | string, msg?: string): void;
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
}

/** Counters an operator may bump; the runtime exports them through OpenTelemetry. */
export interface OperatorMetrics {
  count(name: string, by?: number, attrs?: Record<string, string>): void;
}

/** What the runtime gives an operator. Operators never open their own connections. */
export interface OperatorContext {
  pipeline: string;
  prefix: string;
  stage: string;
  partitions: number;
  state: StateStore;
  clock: Clock;
  log: Logger;
  metrics: OperatorMetrics;
  /** Environment variables (for secrets such as the pseudonymization key). */
  env: Readonly<Record<string, string | undefined>>;
  /** Set under `tacit demo` and tests: allows development defaults (e.g. a fixed pseudonym key). */
  devMode: boolean;
}

/** The processing function an unkeyed operator returns from `create`. */
export interface Processor {
  /**
   * Processes a batch in order and returns one Outcome per input, in the same order. Batches
   * let an unkeyed operator look up what it needs in one Redis round trip for many messages.
   * (Keyed operators return a {@link KeyedProcessor} instead: their state is the runtime's.)
   */
  process(batch: StageInput[]): Promise<Outcome[]>;
  close?(): Promise<void>;
}

/** Documentation of one piece of state an operator keeps. */
export interface StateDoc {
  key: string;
  holds: string;
  ttl: string;
}

/** A problem found by an operator's cross-field lint. `path` is relative to the stage's `config`. */
export interface LintIssue {
  path: string[];
  message: string;
  hint?: string;
}

/** What an operator's lint can see of the rest of the pipeline. */
export interface PipelineView {
  stages: { name: string; operator: string; config: Record<string, unknown> }[];
  index: number;
  partitions?: number;
}

/**
 * An operator: one file under `operators/`, read top to bottom as config type and schema,
 * metadata, lint, then `create`. The schema is the single source for validation, defaults and docs.
 */
export interface OperatorSpec<C = Record<string, unknown>, P extends Processor | KeyedProcessor<any> = Processor | KeyedProcessor<any>> {
  name: string;
  summary: string;
  description: string;
  /** Keyed operators run partitioned by the pseudonymized user; state is per user. */
  keyed: boolean;
  /** JSON Schema of the stage's `config`, with defaults, descriptions and examples. */
  schema: Record<string, unknown>;
  state: StateDoc[];
  /** Side outputs this operator may emit (besides `next` and the DLQ). */
  outputs: OutputName[];
  examples: { title: string; config: Record<string, unknown> }[];
  lint?(config: C, view: PipelineView): LintIssue[];
  /** Unkeyed operators return a Processor, keyed ones a KeyedProcessor (below). */
  create(config: C, ctx: OperatorContext): P | Promise<P>;
}

// ---------------------------------------------------------------------------------------------
// Keyed operators
/**
 * Keyed operators, in the manner of Flink's `KeyedProcessFunction`: the operator holds domain
 * logic only. The runtime owns each user's state (an in-memory cache valid while the worker
 * holds the partition's lease, loaded on first touch, written back when it changed, in the
 * batch's atomic commit with the partition's progress), the exactly-once guard (an input at or
 * below the user's applied sequence never runs twice), and event-time timers (persisted with
 * the state, fired in stream order with the watermark each input saw).
 */

/** How the runtime stores one user's state of a keyed operator. */
export interface StateCodec<S> {
  encode(state: S): string;
  decode(raw: string): S;
  /**
   * How long the stored state lives after a write, in ms; `eventTimeMs` is the event time of
   * the write. A cleared (undefined) state stays this long as a tombstone `<applied seq>:` (the
   * guard of a user whose last batch was committed without its partition's progress, on Cluster).
   */
  ttlMs(state: S | undefined, eventTimeMs: number): number;
}

/** One user's state, guard and timer, as an operator sees them while it handles that user. */
export interface KeyScope<S> {
  readonly user: string;
  readonly partition: number;
  /** The user's state (undefined: none yet, or cleared). Sees this batch's earlier changes. */
  get(): S | undefined;
  /**
   * Records the user's new state. Call it after changing the state object in place too: only
   * states put since the last commit are written.
   */
  put(state: S): void;
  /** Forgets the user's state. */
  clear(): void;
  /** The user's event-time timer: `onTimer` runs once the watermark reaches `atMs`. Undefined cancels it. */
  setTimer(atMs: number | undefined): void;
  /** The user's online features, written with the user's state (see FeatureWriter). */
  readonly features: FeatureWriter;
}

/**
 * Writes a user's online features: Redis hashes among the user's own keys, named relative to
 * them (`hash` "features:user" is `tacit:{<prefix>:u:<user>}:features:user`), so they share the
 * user's hash tag. The runtime folds a user's writes in memory and lands them at the next commit,
 * in the same atomic step as the user's state; the writes of an input that fails (or whose batch
 * is retried) are dropped with its other effects. A field is either added to or set, never both.
 */
export interface FeatureWriter {
  /** Adds `by` to a field (HINCRBYFLOAT); the hash lives `ttlMs` after the write. */
  add(hash: string, field: string, by: number, ttlMs: number): void;
  /** Sets fields (HSET; a later write of a field wins); the hash lives `ttlMs` after the write. */
  set(hash: string, fields: Record<string, string | number>, ttlMs: number): void;
}

/** A writer that drops every write: for scopes outside the runtime (tests that run an operator alone). */
export const NO_FEATURES: FeatureWriter = { add() {}, set() {} };

/** A timer that fired. */
export interface TimerFiring {
  /** The time the timer was set for. */
  at_ms: number;
  /** The watermark that passed it. */
  watermark_ms: number;
  /**
   * Stream time of the input after which the timer was due (the one that moved the watermark
   * past it, or that set it at or below the watermark); undefined when no input moved it there
   * (an idle partition's advance). Deterministic on replay, whatever the batches.
   */
  stream_time_ms: number | undefined;
}

/** An input of a keyed operator: always an envelope, of the user the scope belongs to. */
export interface KeyedInput extends StageInput {
  envelope: Envelope;
}

/** What a keyed operator's timer produced. */
export interface TimerOutcome {
  emits: Emit[];
  /** Effects outside the operator's own state (online features), applied with the batch. */
  commits?: CommitGroup[];
}

/** The processing functions a keyed operator's `create` returns. */
export interface KeyedProcessor<S> {
  readonly codec: StateCodec<S>;
  /**
   * Decisions that must not depend on arrival order: the runtime holds the inputs of this
   * operator's group (from the group's first stage on) until the watermark passes their event
   * time and hands them over in (event time, event_id) order, interleaved with the timers as
   * event time dictates (each input sees `watermark_ms` = its event time − 1). An input that
   * arrives after the watermark passed it (later than `event_time.max_out_of_orderness`) is
   * late: it is handed over at once, with the watermark it missed. Costs the out-of-orderness
   * bound in latency.
   */
  readonly eventTimeOrder?: boolean;
  /**
   * One input, in the partition's stream order (event-time order with `eventTimeOrder`), with its user's scope. Synchronous: every
   * state it can touch is in memory. Return an error outcome rather than throwing for bad
   * input, before changing any state.
   */
  processElement(input: KeyedInput, key: KeyScope<S>): Outcome;
  /** The user's timer fired. */
  onTimer?(key: KeyScope<S>, firing: TimerFiring): TimerOutcome;
}

/** True when a processor is keyed (built by a keyed operator's `create`). */
export function isKeyedProcessor(p: unknown): p is KeyedProcessor<any> {
  return typeof (p as { processElement?: unknown } | null)?.processElement === "function";
}

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
 * What happened to one input: the records it produced, the state changes it makes, or the error
 * that stopped it. The runtime publishes every emit of a batch first, then applies the commits,
 * then acks: a crash before the commit recomputes the same emits (same ids, deduplicated by
 * JetStream), a crash after it finds the guard already applied. Operators therefore must not
 * write state themselves in `process` (except first-writer-wins `claim`s); they return commits.
 * Within one batch an operator must see its own earlier changes (keep them in memory).
 */
export interface Outcome {
  emits: Emit[];
  /** State changes to apply after the emits are published (each group atomic, fenced by its guard). */
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

/** The processing function an operator returns from `create`. */
export interface Processor {
  /**
   * Processes a batch in order and returns one Outcome per input, in the same order. Batches
   * let an operator read and write state in one Redis round trip for many messages.
   */
  process(batch: StageInput[]): Promise<Outcome[]>;
  /**
   * Called at the end of every batch of a keyed partition with the partition's watermark (whether
   * or not it advanced), and when an idle partition's watermark is advanced. Called BEFORE the
   * batch's commits are applied: keep the batch's uncommitted changes in memory. One operator
   * instance serves one partition. Returns what timers fired: emits (published first) and
   * commits (applied after).
   */
  onWatermark?(partition: number, watermarkMs: number): Promise<{ emits: Emit[]; commits: CommitGroup[] }>;
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
export interface OperatorSpec<C = Record<string, unknown>> {
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
  create(config: C, ctx: OperatorContext): Processor | Promise<Processor>;
}

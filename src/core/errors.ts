/**
 * Errors carry a machine-readable `code`, an optional `cause`, and whether retrying can help.
 * Retryable → the runtime naks with backoff; non-retryable (or out of retries) → dead letter.
 */
export class TacitError extends Error {
  readonly code: string;
  readonly retryable: boolean;
  constructor(code: string, message: string, opts: { retryable?: boolean; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.retryable = opts.retryable ?? false;
  }
}

/** A bad input event: it goes to `<p>.dlq.<stage>` with its bytes and this reason. */
export class BadInputError extends TacitError {
  constructor(code: string, message: string, cause?: unknown) {
    super(code, message, { retryable: false, cause });
  }
}

/** A dependency (Redis, NATS) failed in a way that may pass: nak and try again later. */
export class TransientError extends TacitError {
  constructor(code: string, message: string, cause?: unknown) {
    super(code, message, { retryable: true, cause });
  }
}

/** A configuration or usage problem: the CLI exits 2. */
export class ConfigError extends TacitError {
  constructor(message: string, cause?: unknown) {
    super("config", message, { retryable: false, cause });
  }
}

/** Reason codes for dead letters; stable, documented in the README. */
export const DLQ_REASONS = {
  malformed_json: "the message is not valid JSON",
  schema_violation: "the event does not match config/schemas/event.v1.json",
  unknown_event_type: "event_type is not one of the v1 event types",
  bad_timestamp: "timestamp is not RFC 3339 or is impossibly far from the stream's time",
  oversized: "the message is larger than the stage's max_event_bytes",
  bad_envelope: "an inter-stage message could not be decoded",
  processing_failed: "the operator failed on this message (see message)",
  max_deliveries: "a retryable error persisted past max_deliver",
} as const;
export type DlqReason = keyof typeof DLQ_REASONS;

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

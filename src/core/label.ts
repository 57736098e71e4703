import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { EventType } from "./event.js";

/**
 * A weak label as published on `<p>.labels.<kind>`; `config/schemas/label.v1.json` is the
 * contract and this type mirrors it field by field (a test keeps the two in step).
 */
export type Label = ResponseLabel | PreferenceLabel | SessionLabel;

/** What kind of thing a label is about; also the last token of its subject. */
export type LabelKind = "response" | "preference" | "session";
export const LABEL_KINDS: readonly LabelKind[] = ["response", "preference", "session"];

/** Polarity of response and session labels. */
export type LabelPolarity = "positive" | "negative";

/** Event types that may appear among a label's signals: every v1 type except explicit feedback. */
export type SignalEventType = Exclude<EventType, "explicit_feedback">;

/** One input event a label was derived from. */
export interface LabelSignal {
  event_id: string;
  event_type: SignalEventType;
}

/** Fields every label carries. */
export interface LabelBase {
  /** Always 1 for this schema. */
  schema_version: 1;
  /** Deterministic: same inputs → same id, in every run and replay. */
  label_id: string;
  /** 0 first; higher when the label is re-emitted because its inputs changed. */
  revision: number;
  /** Name of the pipeline that produced it. */
  pipeline: string;
  kind: LabelKind;
  response_id?: string;
  query_id?: string;
  session_id: string;
  /** Pseudonym of the user (22 base64url characters of HMAC-SHA256); never the raw user_id. */
  user: string;
  label?: LabelPolarity;
  chosen_response_id?: string;
  rejected_response_id?: string;
  /** ≥ 0, after de-biasing (position propensity, per-user baselines). */
  weight: number;
  rule: string;
  rule_version: string | number;
  /** At least one; never explicit_feedback. */
  signals: LabelSignal[];
  /** RFC 3339 event time of the deciding signal. */
  event_time: string;
  /** RFC 3339 wall-clock time of publication: the only field that differs on replay. */
  emitted_at: string;
  /**
   * Label schema v2 (additive): true on a retraction, the revision (weight 0) that withdraws a
   * label whose evidence is gone — above all, its user was later flagged as a bot. Absent otherwise.
   */
  retracted?: boolean;
  /** Why it was retracted (v2), e.g. `bot: rate, regularity` (the bot-score indicators of the flag). */
  retracted_reason?: string;
}

/** Fields of label schema v2 that v1 does not have (retractions). */
export const RETRACTION_FIELDS = ["retracted", "retracted_reason"] as const;

export interface ResponseLabel extends LabelBase {
  kind: "response";
  response_id: string;
  query_id: string;
  label: LabelPolarity;
  chosen_response_id?: never;
  rejected_response_id?: never;
}

export interface PreferenceLabel extends LabelBase {
  kind: "preference";
  query_id: string;
  chosen_response_id: string;
  rejected_response_id: string;
  label?: never;
}

export interface SessionLabel extends LabelBase {
  kind: "session";
  label: LabelPolarity;
  chosen_response_id?: never;
  rejected_response_id?: never;
}

/** Every field a label may carry, in schema order (a test checks the JSON Schema has exactly these). */
export const LABEL_FIELDS = [
  "schema_version",
  "label_id",
  "revision",
  "pipeline",
  "kind",
  "response_id",
  "query_id",
  "session_id",
  "user",
  "label",
  "chosen_response_id",
  "rejected_response_id",
  "weight",
  "rule",
  "rule_version",
  "signals",
  "event_time",
  "emitted_at",
] as const satisfies readonly (keyof LabelBase)[];

// Compile-time: LABEL_FIELDS names every field of LabelBase.
type MissingLabelField = Exclude<keyof LabelBase, (typeof LABEL_FIELDS)[number] | (typeof RETRACTION_FIELDS)[number]>;
const labelFieldsComplete: [MissingLabelField] extends [never] ? true : MissingLabelField = true;
void labelFieldsComplete;

/**
 * The final view of a label changelog: the highest revision of each label_id, without those
 * whose latest revision is a retraction or has weight 0 (a label whose evidence was withdrawn).
 */
export function liveLabels<L extends Pick<Label, "label_id" | "revision" | "weight" | "retracted">>(labels: Iterable<L>): L[] {
  return latestRevisions(labels).filter((l) => l.retracted !== true && l.weight > 0);
}

/** The highest revision of each label_id, in first-seen order (what a consumer should keep). */
export function latestRevisions<L extends Pick<Label, "label_id" | "revision">>(labels: Iterable<L>): L[] {
  const best = new Map<string, L>();
  for (const l of labels) {
    const cur = best.get(l.label_id);
    if (cur === undefined || l.revision > cur.revision) best.set(l.label_id, l);
  }
  return [...best.values()];
}

let labelSchemaCache: Record<string, unknown> | undefined;
let retractableCache: Record<string, unknown> | undefined;

/**
 * label.v1.json with the two retraction fields of label schema v2 (`retracted`,
 * `retracted_reason`) allowed: what label-derive publishes until label.v2.json exists.
 */
export function labelSchemaRetractable(): Record<string, unknown> {
  if (!retractableCache) {
    const v1 = labelSchemaV1() as { properties: Record<string, unknown> };
    retractableCache = {
      ...v1,
      $id: "https://tacit.dev/schemas/label.v1-retractable.json",
      properties: {
        ...v1.properties,
        retracted: { description: "True on a retraction (weight 0): the label's evidence was withdrawn; drop the label_id.", type: "boolean" },
        retracted_reason: { description: "Why the label was retracted, e.g. `bot: rate`.", type: "string", minLength: 1, maxLength: 200 },
      },
    };
  }
  return retractableCache;
}

/**
 * `config/schemas/label.v1.json`, read from the repository root at run time (this module runs
 * from `dist/src/core/` or `src/core/`; reading rather than importing keeps Node 20 quiet about
 * JSON modules).
 */
export function labelSchemaV1(): Record<string, unknown> {
  if (!labelSchemaCache) {
    let lastError: unknown;
    for (const rel of ["../../../config/schemas/label.v1.json", "../../config/schemas/label.v1.json"]) {
      try {
        labelSchemaCache = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as Record<string, unknown>;
        break;
      } catch (err) {
        lastError = err;
      }
    }
    if (!labelSchemaCache) throw new Error("config/schemas/label.v1.json not found", { cause: lastError });
  }
  return labelSchemaCache;
}

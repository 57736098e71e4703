import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { EventType } from "./event.js";

/**
 * A weak label as published on `<p>.labels.<kind>`; `config/schemas/label.v2.json` is the
 * contract (additive over label.v1.json) and this type mirrors it field by field (a test keeps the
 * two in step).
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
  /** 2 with the v2 fields; 1 for a v1 label (no v2 field), see label.v2.json. */
  schema_version: 1 | 2;
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
   * v2: true on a retraction, the revision (weight 0) that withdraws a label whose evidence is
   * gone — above all, its user was later flagged as a bot. Absent otherwise.
   */
  retracted?: boolean;
  /** v2: why it was retracted (with retracted only), e.g. `bot: rate, regularity` (bot-score's indicators). */
  retracted_reason?: string;
  /** v2: rank of the labelled (chosen) response, 1 = top. */
  position?: number;
  /** v2: P(examined | position) behind the inverse-propensity weight; 1 without a position. */
  propensity?: number;
  /** v2: response_shown.payload.model of the labelled (chosen) response. */
  model?: string;
  /** v2: the user's experiment and variant (event context or enrich's lookup). */
  experiment?: LabelExperiment;
  /** v2: the user's cohort (enrich's lookup). */
  cohort?: string;
  /** v2: device class (event context, else parsed user agent). */
  device?: string;
}

/** An A/B experiment assignment as labels carry it (v2). */
export interface LabelExperiment {
  id: string;
  variant?: string;
}

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
  "retracted",
  "retracted_reason",
  "position",
  "propensity",
  "model",
  "experiment",
  "cohort",
  "device",
] as const satisfies readonly (keyof LabelBase)[];

/** The fields label.v2.json adds to v1: a v1 label carries none of them. */
export const LABEL_V2_FIELDS = ["retracted", "retracted_reason", "position", "propensity", "model", "experiment", "cohort", "device"] as const satisfies readonly (typeof LABEL_FIELDS)[number][];

/** The v1 view of a label: the v2 fields dropped, schema_version 1 (what label.v1.json consumers accept). */
export function toLabelV1<L extends Label>(label: L): L {
  const v1 = { ...label, schema_version: 1 } as L;
  for (const f of LABEL_V2_FIELDS) delete v1[f];
  return v1;
}

// Compile-time: LABEL_FIELDS names every field of LabelBase.
type MissingLabelField = Exclude<keyof LabelBase, (typeof LABEL_FIELDS)[number]>;
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

const labelSchemaCache = new Map<1 | 2, Record<string, unknown>>();

/**
 * `config/schemas/label.v<version>.json`, read from the repository root at run time (this module
 * runs from `dist/src/core/` or `src/core/`; reading rather than importing keeps Node 20 quiet
 * about JSON modules).
 */
export function labelSchema(version: 1 | 2): Record<string, unknown> {
  let schema = labelSchemaCache.get(version);
  if (!schema) {
    let lastError: unknown;
    for (const rel of [`../../../config/schemas/label.v${version}.json`, `../../config/schemas/label.v${version}.json`]) {
      try {
        schema = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as Record<string, unknown>;
        break;
      } catch (err) {
        lastError = err;
      }
    }
    if (!schema) throw new Error(`config/schemas/label.v${version}.json not found`, { cause: lastError });
    labelSchemaCache.set(version, schema);
  }
  return schema;
}

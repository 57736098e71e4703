import type { ValidateFunction } from "ajv";
import { newConfigAjv } from "../config/ajv.js";
import { labelSchema, type Label } from "../core/label.js";
import type { ResponseFeatures } from "./evaluate.js";

/**
 * Readers for the files `tacit evaluate` takes. They accept the shapes other commands print
 * (`tacit tail … --json` may wrap a record; Redis hashes give numbers as strings) and say, per
 * line, what they could not use rather than failing the whole file.
 */

/** A line that could not be used, with why. */
export interface RejectedLine {
  line: number;
  message: string;
}

function* jsonLines(text: string): Generator<{ line: number; value: unknown } | { line: number; error: string }> {
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.trim();
    if (raw === "") continue;
    try {
      yield { line: i + 1, value: JSON.parse(raw) as unknown };
    } catch (err) {
      yield { line: i + 1, error: `not JSON: ${(err as Error).message}` };
    }
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

/** The label inside a record: the record itself, or under `label`, `value`, `data` or `json`. */
function unwrapLabel(v: unknown): unknown {
  if (!isObject(v) || "label_id" in v) return v;
  for (const k of ["value", "data", "json", "label"]) {
    const inner = v[k];
    if (isObject(inner) && "label_id" in inner) return inner;
  }
  return v;
}

let labelValidator: ValidateFunction | undefined;

/** Validates one value against config/schemas/label.v2.json (which v1 labels also match); returns the error text or null. */
export function labelSchemaErrors(value: unknown): string | null {
  labelValidator ??= newConfigAjv().compile(labelSchema(2));
  if (labelValidator(value)) return null;
  return (labelValidator.errors ?? []).map((e) => `${e.instancePath || "/"} ${e.message ?? "is invalid"}`).join("; ");
}

/** Labels from JSONL; lines that are not labels matching label.v2.json are rejected with the reason. */
export function parseLabels(text: string): { labels: Label[]; rejected: RejectedLine[] } {
  const labels: Label[] = [];
  const rejected: RejectedLine[] = [];
  for (const l of jsonLines(text)) {
    if ("error" in l) {
      rejected.push({ line: l.line, message: l.error });
      continue;
    }
    const value = unwrapLabel(l.value);
    const errors = labelSchemaErrors(value);
    if (errors !== null) rejected.push({ line: l.line, message: errors });
    else labels.push(value as Label);
  }
  return { labels, rejected };
}

function toNumber(v: unknown): number | null {
  if (typeof v === "number" && Number.isFinite(v)) return v;
  if (typeof v === "string" && v.trim() !== "" && Number.isFinite(Number(v))) return Number(v);
  return null;
}

/**
 * Per-response features from JSONL: `{response_id, pos_weight, neg_weight, signal_count}`, or
 * `{entity: "response", id, fields: {…}}` as `tacit features --json` prints; other entities are skipped.
 */
export function parseFeatures(text: string): { features: Map<string, ResponseFeatures>; rejected: RejectedLine[] } {
  const features = new Map<string, ResponseFeatures>();
  const rejected: RejectedLine[] = [];
  for (const l of jsonLines(text)) {
    if ("error" in l) {
      rejected.push({ line: l.line, message: l.error });
      continue;
    }
    const v = l.value;
    if (!isObject(v)) {
      rejected.push({ line: l.line, message: "not a JSON object" });
      continue;
    }
    if (v.entity !== undefined && v.entity !== "response") continue;
    const id = v.response_id ?? v.id;
    const fields = isObject(v.fields) ? v.fields : isObject(v.features) ? v.features : v;
    const pos = toNumber(fields.pos_weight ?? 0);
    const neg = toNumber(fields.neg_weight ?? 0);
    const count = toNumber(fields.signal_count ?? 0);
    if (typeof id !== "string" || pos === null || neg === null || count === null) {
      rejected.push({ line: l.line, message: "needs response_id (or id) and numeric pos_weight, neg_weight, signal_count" });
      continue;
    }
    features.set(id, { pos_weight: pos, neg_weight: neg, signal_count: count });
  }
  return { features, rejected };
}

/**
 * Pseudonyms of users routed to `<p>.bots`: one per line, as a bare string, a JSON string, or an
 * object with `user` (top level, or under `event` / `envelope.event` / `value`).
 */
export function parseUserSet(text: string): { users: Set<string>; rejected: RejectedLine[] } {
  const users = new Set<string>();
  const rejected: RejectedLine[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.trim();
    if (raw === "") continue;
    let v: unknown = raw;
    if (raw.startsWith("{") || raw.startsWith('"')) {
      try {
        v = JSON.parse(raw);
      } catch (err) {
        rejected.push({ line: i + 1, message: `not JSON: ${(err as Error).message}` });
        continue;
      }
    }
    const candidates: unknown[] = isObject(v)
      ? [v.user, isObject(v.event) ? v.event.user : undefined, isObject(v.envelope) && isObject(v.envelope.event) ? v.envelope.event.user : undefined, isObject(v.value) ? v.value.user : undefined]
      : [v];
    const user = candidates.find((c): c is string => typeof c === "string" && c !== "");
    if (user === undefined) rejected.push({ line: i + 1, message: "no user pseudonym found" });
    else users.add(user);
  }
  return { users, rejected };
}

/** Per-response scores from JSONL lines `{response_id, score}`. */
export function parseScores(text: string): { scores: Map<string, number>; rejected: RejectedLine[] } {
  const scores = new Map<string, number>();
  const rejected: RejectedLine[] = [];
  for (const l of jsonLines(text)) {
    if ("error" in l) {
      rejected.push({ line: l.line, message: l.error });
      continue;
    }
    const v = l.value;
    const score = isObject(v) ? toNumber(v.score) : null;
    if (!isObject(v) || typeof v.response_id !== "string" || score === null) {
      rejected.push({ line: l.line, message: "needs response_id and a numeric score" });
      continue;
    }
    scores.set(v.response_id, score);
  }
  return { scores, rejected };
}

/**
 * Events per user in raw event lines (the simulator's events.jsonl): user_id → count, keyed by
 * `pseudonymOf(user_id)` so it matches the labels' users. Lines that are not events are skipped.
 */
export function eventsPerUser(lines: Iterable<string>, pseudonymOf: (userId: string) => string): Map<string, number> {
  const raw = new Map<string, number>();
  for (const line of lines) {
    if (line.trim() === "") continue;
    try {
      const u = (JSON.parse(line) as { user_id?: unknown } | null)?.user_id;
      if (typeof u === "string") raw.set(u, (raw.get(u) ?? 0) + 1);
    } catch {
      // not JSON: not an event
    }
  }
  return new Map([...raw].map(([u, n]) => [pseudonymOf(u), n]));
}

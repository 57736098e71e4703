import type { ErrorObject, ValidateFunction } from "ajv";
import { readFileSync, statSync } from "node:fs";
import { LineCounter, parseDocument } from "yaml";
import { newConfigAjv, pruneErrors } from "../config/ajv.js";
import { closest, formatProblem, sortProblems, type Problem } from "../config/problems.js";
import { SourceMap, type DocPath } from "../config/source.js";
import { DURATION_SCHEMA, parseDuration } from "../core/duration.js";
import { ConfigError, errorMessage } from "../core/errors.js";
import type { LabelKind, LabelPolarity } from "../core/label.js";

/*
 * Label rules: a YAML file (config/label-rules.yaml by default) of declarative rules that turn
 * signals into labels. This module holds the file's types and JSON Schema, the catalogue of
 * signals and the fields each one offers to conditions and weights, and the loader that turns
 * the file into compiled rules, reporting every mistake with file:line.
 */

// ---------------------------------------------------------------------------------------------
// The file as written

/** Comparison operators of the condition language. */
export const CONDITION_OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "exists", "missing"] as const;
export type ConditionOp = (typeof CONDITION_OPS)[number];

/** A scalar a condition compares with. */
export type ConditionValue = number | string | boolean;

/** One comparison of a field with a value; a field that is absent takes `default` (or fails every op but `missing`). */
export interface Comparison {
  field: string;
  op: ConditionOp;
  value?: ConditionValue | ConditionValue[];
  default?: ConditionValue;
}

/** Any of the nested conditions holds. */
export interface AnyOf {
  any: Condition[];
}

/** A rule's conditions are a list that must all hold; `any` nests an alternative. */
export type Condition = Comparison | AnyOf;

/** A multiplicative factor of a label's weight. */
export type WeightFactor =
  /** clamp(offset + scale × field, min, max); `default` is the factor when the field is absent. */
  | { field: string; scale?: number; offset?: number; min?: number; max?: number; default?: number }
  /** The per-user baseline discount: clamp(prior / user's rate, floor, 1) (see `baselines`). */
  | { baseline: BaselineName }
  /** `factor` when every condition holds, else 1 (context weighting such as a quick accept). */
  | { when: Condition[]; factor: number };

/** A rule's weight: a number, or a base multiplied by factors and clipped to [min, max]. */
export interface WeightSpec {
  base: number;
  factors?: WeightFactor[];
  min?: number;
  max?: number;
}

/** Names of the per-user baselines a weight can be discounted by. */
export const BASELINE_NAMES = ["accept", "edit", "regenerate", "copy"] as const;
export type BaselineName = (typeof BASELINE_NAMES)[number];

/** What a rule's label is about. */
export const TARGETS = ["response", "previous_response", "replaced_pair", "skipped_above", "skipped_previous", "session"] as const;
export type TargetName = (typeof TARGETS)[number];

/** One rule as written. */
export interface RuleFile {
  name: string;
  version: string | number;
  description?: string;
  /** The signal (or signals) the rule listens to. */
  signal: string | string[];
  kind: LabelKind;
  target: TargetName;
  /** Polarity for response and session labels; absent for preference labels. */
  label?: LabelPolarity;
  conditions?: Condition[];
  weight: number | WeightSpec;
  /** How repeated firings on one label combine: summed (then clipped) or the largest. @default "sum" */
  combine?: "sum" | "max";
  /** @default true */
  enabled?: boolean;
}

/** The rules file as written. */
export interface RulesFile {
  version: 1;
  description?: string;
  position_bias?: {
    /** P(examined | rank) for ranks 1, 2, …; ranks past the list use the last value. */
    examination?: number[];
    /** Largest inverse-propensity weight (1 / P), the clip. */
    max_ips?: number;
  };
  baselines?: {
    /** Event-time half-life of the per-user exponentially weighted rates. */
    half_life?: string;
    /** Pseudo-count of responses at the prior rate a new user starts with. */
    prior_strength?: number;
    /** Smallest baseline factor. */
    floor?: number;
    priors?: { accept?: number; edit?: number; regenerate?: number; copy?: number; dwell_ms?: number };
  };
  rules: RuleFile[];
}

// ---------------------------------------------------------------------------------------------
// Signals and their fields

/** Fields every signal about a response offers (derived by label-derive from what it remembers). */
export const RESPONSE_FIELDS: Readonly<Record<string, string>> = {
  ranked: "true when the response was shown in a ranked list (response_shown carried a position)",
  position: "rank of the response in its list (1 = top); absent for single responses",
  propensity: "P(examined | position) from position_bias.examination; 1 for single responses",
  ips: "inverse propensity 1 / propensity, clipped at position_bias.max_ips; 1 for single responses",
  text_length: "text_length of the response, from response_shown",
  ms_since_shown: "event time of the signal minus the time the response was shown",
  dwell_ms: "the latest dwell_ms reported on the response",
  scroll_depth: "the deepest scroll_depth reported on the response",
  clicked: "true when the response was clicked",
  regenerated: "true when the response replaced another through regenerate",
  max_edit_share: "the largest normalized edit distance of the user's edits of the response so far",
  user_accept_rate: "the user's exponentially weighted accept rate before this signal",
  user_edit_rate: "the user's exponentially weighted edit rate before this signal",
  user_regenerate_rate: "the user's exponentially weighted regenerate rate before this signal",
  user_copy_rate: "the user's exponentially weighted copy rate before this signal",
  user_dwell_ms: "the user's exponentially weighted dwell (ms) before this signal",
  dwell_ratio: "dwell_ms divided by user_dwell_ms",
};

/** A signal: an event type or a signal label-derive derives, with the fields it offers and the targets it can label. */
export interface SignalDoc {
  description: string;
  fields: Readonly<Record<string, string>>;
  targets: readonly TargetName[];
}

const RESPONSE_TARGETS: readonly TargetName[] = ["response", "replaced_pair"];

/** Every signal a rule may listen to. `explicit_feedback` is deliberately absent: it is never a label input. */
export const SIGNALS: Readonly<Record<string, SignalDoc>> = {
  copy_paste: {
    description: "the user copied part of a response",
    fields: {
      ...RESPONSE_FIELDS,
      span_length: "characters copied (span_length, else span_end − span_start)",
      copied_share: "span_length / text_length of the response (capped at 1)",
    },
    targets: RESPONSE_TARGETS,
  },
  accept: { description: "the user used the response as is", fields: RESPONSE_FIELDS, targets: RESPONSE_TARGETS },
  edit: {
    description: "the user changed the response",
    fields: {
      ...RESPONSE_FIELDS,
      edit_distance: "characters changed (edit_distance, else Levenshtein of original_text and edited_text)",
      edit_share: "normalized edit distance: edit_distance / original length (original_length, original_text or text_length), capped at 1",
    },
    targets: RESPONSE_TARGETS,
  },
  regenerate: { description: "the user asked for a new response in place of this one", fields: RESPONSE_FIELDS, targets: ["response"] },
  click: {
    description: "a click on a ranked result",
    fields: { ...RESPONSE_FIELDS, skipped_above: "results shown above this one for the same query that were not clicked before it" },
    targets: ["response", "skipped_above", "skipped_previous"],
  },
  click_dwell: {
    description: "a dwell reported on a clicked result: how long the user stayed after the click",
    fields: RESPONSE_FIELDS,
    targets: ["response"],
  },
  dwell: { description: "a dwell reported on a response that was not clicked (a single response read in place)", fields: RESPONSE_FIELDS, targets: ["response"] },
  last_click: {
    description: "at session end (watermark past the last event + session_gap): the last clicked result of the session (Yandex's grading: the last click of a session counts as satisfied)",
    fields: { ...RESPONSE_FIELDS, decided: "true when a click_dwell rule already labelled this response" },
    targets: ["response"],
  },
  abandon: { description: "the user left without using the response", fields: RESPONSE_FIELDS, targets: ["response"] },
  task_complete: { description: "the downstream task finished", fields: { ...RESPONSE_FIELDS, outcome: "payload.outcome" }, targets: RESPONSE_TARGETS },
  share: { description: "the user shared the response", fields: RESPONSE_FIELDS, targets: RESPONSE_TARGETS },
  query: {
    description: "a follow-up query, with reformulation's verdict on it (attrs.reformulation); its target is the previous response",
    fields: {
      ...RESPONSE_FIELDS,
      decision: "reformulation | clarification | new_topic | none",
      kind: "kind of change (spelling_correction, words_added, substitution, …)",
      levenshtein: "normalized Levenshtein distance to the previous query",
      jaccard3: "character-3-gram Jaccard similarity to the previous query",
      token_overlap: "token Jaccard similarity to the previous query",
      gap_ms: "time since the previous query",
      previous_ranked: "true when the previous response was one of a ranked list (its fields are the previous response's)",
    },
    targets: ["previous_response"],
  },
  session_end: {
    description: "the partition watermark passed the session's last event + session_gap",
    fields: {
      pos_weight: "summed weight of the session's positive response labels",
      neg_weight: "summed weight of the session's negative response labels",
      net: "pos_weight − neg_weight",
      events: "events in the session",
      queries: "query events in the session",
      responses: "response_shown events in the session",
      duration_ms: "last event time − first event time",
      abandoned: "true when the session's last event is an abandon",
    },
    targets: ["session"],
  },
};

/** Which label kind each target produces. */
export const TARGET_KIND: Readonly<Record<TargetName, LabelKind>> = {
  response: "response",
  previous_response: "response",
  replaced_pair: "preference",
  skipped_above: "preference",
  skipped_previous: "preference",
  session: "session",
};

// ---------------------------------------------------------------------------------------------
// JSON Schema

const conditionSchema = {
  description: "A comparison {field, op, value} or an alternative {any: [conditions]}.",
  anyOf: [
    {
      type: "object",
      additionalProperties: false,
      required: ["field", "op"],
      properties: {
        field: { type: "string", minLength: 1, description: "A field of the rule's signal (see the signal catalogue)." },
        op: { type: "string", enum: [...CONDITION_OPS], description: "Comparison operator." },
        value: {
          description: "What the field is compared with (a list for in / not_in; none for exists / missing).",
          anyOf: [{ type: ["number", "string", "boolean"] }, { type: "array", items: { type: ["number", "string", "boolean"] } }],
        },
        default: { type: ["number", "string", "boolean"], description: "Value of the field when the signal does not carry it." },
      },
    },
    {
      type: "object",
      additionalProperties: false,
      required: ["any"],
      properties: { any: { type: "array", minItems: 1, items: { $ref: "#/definitions/condition" }, description: "Holds when any nested condition holds." } },
    },
  ],
} as const;

/** JSON Schema of a rules file (validated with ajv before compiling). */
export const RULES_SCHEMA: Record<string, unknown> = {
  $schema: "http://json-schema.org/draft-07/schema#",
  title: "tacit label rules",
  type: "object",
  additionalProperties: false,
  required: ["version", "rules"],
  definitions: { condition: conditionSchema },
  properties: {
    version: { const: 1, description: "Format version of this file." },
    description: { type: "string", description: "What this rule set is for." },
    position_bias: {
      type: "object",
      additionalProperties: false,
      description: "Position-bias correction of clicks by inverse propensity.",
      properties: {
        examination: { type: "array", minItems: 1, items: { type: "number", exclusiveMinimum: 0, maximum: 1 }, description: "P(examined | rank) for ranks 1, 2, …; ranks past the list use the last value." },
        max_ips: { type: "number", minimum: 1, description: "Clip of the inverse-propensity weight 1 / P." },
      },
    },
    baselines: {
      type: "object",
      additionalProperties: false,
      description: "Per-user exponentially weighted rates, and the priors they are compared with.",
      properties: {
        half_life: { ...DURATION_SCHEMA, description: "Event-time half-life of the per-user rates." },
        prior_strength: { type: "number", minimum: 0, description: "Pseudo-count of responses at the prior rate that every user starts with." },
        floor: { type: "number", minimum: 0, maximum: 1, description: "Smallest baseline factor." },
        priors: {
          type: "object",
          additionalProperties: false,
          description: "Population rates per response (accept, edit, regenerate, copy) and typical dwell.",
          properties: {
            accept: { type: "number", exclusiveMinimum: 0, maximum: 1, description: "Accepts per response." },
            edit: { type: "number", exclusiveMinimum: 0, maximum: 1, description: "Edits per response." },
            regenerate: { type: "number", exclusiveMinimum: 0, maximum: 1, description: "Regenerations per response." },
            copy: { type: "number", exclusiveMinimum: 0, maximum: 1, description: "Copies per response." },
            dwell_ms: { type: "number", exclusiveMinimum: 0, description: "Typical dwell in ms." },
          },
        },
      },
    },
    rules: {
      type: "array",
      description: "The rules, evaluated for every signal they listen to.",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["name", "version", "signal", "kind", "target", "weight"],
        properties: {
          name: { type: "string", pattern: "^[a-z][a-z0-9_]*$", maxLength: 128, description: "Unique name; part of every label_id the rule produces." },
          version: { anyOf: [{ type: "string", minLength: 1, maxLength: 64 }, { type: "integer", minimum: 0 }], description: "Changes whenever the rule's conditions or weight change." },
          description: { type: "string", description: "Why the rule exists and where its numbers come from." },
          signal: {
            description: "Signal (or list of signals) the rule listens to.",
            anyOf: [{ type: "string", enum: Object.keys(SIGNALS) }, { type: "array", minItems: 1, items: { type: "string", enum: Object.keys(SIGNALS) } }],
          },
          kind: { type: "string", enum: ["response", "preference", "session"], description: "Kind of label produced." },
          target: { type: "string", enum: [...TARGETS], description: "What the label is about." },
          label: { type: "string", enum: ["positive", "negative"], description: "Polarity (response and session labels)." },
          conditions: { type: "array", items: { $ref: "#/definitions/condition" }, description: "All must hold for the rule to fire." },
          weight: {
            description: "A number, or {base, factors, min, max}.",
            anyOf: [
              { type: "number", minimum: 0 },
              {
                type: "object",
                additionalProperties: false,
                required: ["base"],
                properties: {
                  base: { type: "number", minimum: 0, description: "Weight before factors." },
                  min: { type: "number", minimum: 0, description: "Lower clip of the weight." },
                  max: { type: "number", minimum: 0, description: "Upper clip of the weight." },
                  factors: {
                    type: "array",
                    description: "Multiplied into the base in order.",
                    items: {
                      anyOf: [
                        {
                          type: "object",
                          additionalProperties: false,
                          required: ["field"],
                          properties: {
                            field: { type: "string", minLength: 1, description: "A numeric field of the signal." },
                            scale: { type: "number", description: "Multiplier of the field." },
                            offset: { type: "number", description: "Added after scaling." },
                            min: { type: "number", description: "Lower clip of the factor." },
                            max: { type: "number", description: "Upper clip of the factor." },
                            default: { type: "number", description: "Factor when the field is absent." },
                          },
                        },
                        { type: "object", additionalProperties: false, required: ["baseline"], properties: { baseline: { type: "string", enum: [...BASELINE_NAMES], description: "Per-user baseline." } } },
                        {
                          type: "object",
                          additionalProperties: false,
                          required: ["when", "factor"],
                          properties: { when: { type: "array", minItems: 1, items: { $ref: "#/definitions/condition" }, description: "Conditions." }, factor: { type: "number", minimum: 0, description: "Factor when they hold." } },
                        },
                      ],
                    },
                  },
                },
              },
            ],
          },
          combine: { type: "string", enum: ["sum", "max"], description: "How repeated firings on one label combine." },
          enabled: { type: "boolean", description: "Set false to keep a rule in the file without using it." },
        },
      },
    },
  },
};

// ---------------------------------------------------------------------------------------------
// Compiled form

/** A field value a signal carries. */
export type FieldValue = number | string | boolean;
/** The fields of one signal occurrence. */
export type Fields = Readonly<Record<string, FieldValue | undefined>>;

/** A compiled condition: a predicate over fields. */
export type Predicate = (f: Fields) => boolean;

/** One compiled weight factor. */
export type CompiledFactor =
  | { type: "field"; field: string; scale: number; offset: number; min: number; max: number; default: number }
  | { type: "baseline"; baseline: BaselineName }
  | { type: "when"; when: Predicate; factor: number };

/** A rule ready to evaluate. */
export interface CompiledRule {
  name: string;
  version: string | number;
  signals: readonly string[];
  kind: LabelKind;
  target: TargetName;
  label?: LabelPolarity;
  when: Predicate;
  base: number;
  factors: readonly CompiledFactor[];
  min: number;
  max: number;
  combine: "sum" | "max";
}

/** A rules file ready to use: settings with defaults applied (durations in ms) and enabled rules by signal. */
export interface CompiledRules {
  file: string;
  positionBias: { examination: readonly number[]; maxIps: number };
  baselines: {
    halfLifeMs: number;
    priorStrength: number;
    floor: number;
    priors: Readonly<Record<BaselineName, number>> & { dwell_ms: number };
  };
  rules: readonly CompiledRule[];
  bySignal: ReadonlyMap<string, readonly CompiledRule[]>;
}

/** ULTRA toolkit's position-based model, ranks 1–10 (RESEARCH.md, "Position bias"). */
export const DEFAULT_EXAMINATION = [0.68, 0.61, 0.48, 0.34, 0.28, 0.2, 0.11, 0.1, 0.08, 0.06] as const;
export const DEFAULT_MAX_IPS = 5;
export const DEFAULT_BASELINES = {
  half_life: "14d",
  prior_strength: 5,
  floor: 0.2,
  priors: { accept: 0.26, edit: 0.15, regenerate: 0.12, copy: 0.3, dwell_ms: 30_000 },
} as const;

/** A rules file that could not be used, with every problem located (file:line:col). */
export class RulesConfigError extends ConfigError {
  readonly problems: Problem[];
  constructor(file: string, problems: Problem[]) {
    const n = problems.length;
    super(`label rules ${file}: ${n} problem${n === 1 ? "" : "s"}\n${problems.map((p) => `  ${formatProblem(p)}`).join("\n")}`);
    this.problems = problems;
  }
}

let validator: ValidateFunction | undefined;
function validate(): ValidateFunction {
  validator ??= newConfigAjv().compile(RULES_SCHEMA);
  return validator;
}

/** Reads and compiles a rules file; throws RulesConfigError (a ConfigError) listing every problem with file:line. */
/** Compiled rules by file, path and modification: every partition's label-derive instance shares one compilation. */
const compiledFiles = new Map<string, { stamp: string; rules: CompiledRules }>();

/**
 * Like {@link loadRulesFile}, compiled once per file version (path, size and mtime): a worker
 * creates one label-derive instance per partition, and each compiled the same YAML again.
 */
export function loadRulesFileOnce(file: string): CompiledRules {
  let stamp: string;
  try {
    const st = statSync(file);
    stamp = `${st.size}:${st.mtimeMs}`;
  } catch {
    return loadRulesFile(file);
  }
  const hit = compiledFiles.get(file);
  if (hit?.stamp === stamp) return hit.rules;
  const rules = loadRulesFile(file);
  compiledFiles.set(file, { stamp, rules });
  return rules;
}

export function loadRulesFile(file: string): CompiledRules {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new RulesConfigError(file, [{ file, line: 1, col: 1, message: `cannot read the label rules file: ${errorMessage(err)}` }]);
  }
  return parseRules(text, file);
}

/** Parses and compiles rules from YAML text; `file` names it in messages. */
export function parseRules(text: string, file = "label-rules.yaml"): CompiledRules {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  const sm = new SourceMap(file, doc, lines);
  if (doc.errors.length > 0) {
    // One cause often yields several errors on a line: report the first of each line.
    const byLine = new Map<number, Problem>();
    for (const e of doc.errors) {
      const at = sm.pos(e.pos[0]);
      if (!byLine.has(at.line)) byLine.set(at.line, { file, ...at, message: `YAML: ${e.message.split("\n")[0]!.replace(/ at line \d+, column \d+.*$/, "")}` });
    }
    throw new RulesConfigError(file, sortProblems([...byLine.values()]));
  }
  const data = doc.toJS() as unknown;
  const v = validate();
  if (!v(data)) throw new RulesConfigError(file, sortProblems(ajvProblems(sm, v.errors ?? [])));
  const problems: Problem[] = [];
  const compiled = compile(data as RulesFile, file, (path, message, hint) => {
    problems.push({ file, ...sm.locate(path), message, ...(hint ? { hint } : {}), path: path.join(".") });
  });
  if (problems.length > 0) throw new RulesConfigError(file, sortProblems(problems));
  return compiled;
}

function pointer(instancePath: string): string[] {
  return instancePath === "" ? [] : instancePath.slice(1).split("/").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/** ajv errors located in the YAML, with a hint for unknown keys and enum values. */
function ajvProblems(sm: SourceMap, errors: ErrorObject[]): Problem[] {
  const out: Problem[] = [];
  const seen = new Set<string>();
  for (const e of pruneErrors(errors)) {
    const path: (string | number)[] = pointer(e.instancePath);
    const p = e.params as Record<string, unknown>;
    let message = `${path.join(".") || "file"}: ${e.message ?? e.keyword}`;
    let hint: string | undefined;
    let at: "value" | "key" = "value";
    if (e.keyword === "additionalProperties") {
      const key = String(p.additionalProperty);
      const known = Object.keys(((e.parentSchema ?? {}) as { properties?: object }).properties ?? {});
      path.push(key);
      at = "key";
      message = `${path.slice(0, -1).join(".") || "file"}: unknown field "${key}"`;
      const guess = closest(key, known);
      hint = `${guess ? `did you mean "${guess}"? ` : ""}known fields: ${known.join(", ")}`;
    } else if (e.keyword === "enum") {
      const allowed = (p.allowedValues as unknown[]).filter((x): x is string => typeof x === "string");
      const guess = typeof e.data === "string" ? closest(e.data, allowed) : undefined;
      message = `${path.join(".")}: ${JSON.stringify(e.data)} is not one of ${allowed.join(", ")}`;
      if (guess) hint = `did you mean "${guess}"?`;
    } else if (e.keyword === "required") {
      message = `${path.join(".") || "file"}: missing required field "${String(p.missingProperty)}"`;
    } else if (e.keyword === "anyOf") {
      message = `${path.join(".")}: ${JSON.stringify(e.data)} matches none of the allowed forms`;
      const d = (e.parentSchema as { description?: string } | undefined)?.description;
      if (d) hint = d;
    } else if (e.data !== undefined && typeof e.data !== "object") {
      message += `, got ${JSON.stringify(e.data)}`;
    }
    const loc = sm.locate(path as DocPath, at);
    const key = `${loc.line}:${loc.col}:${message}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ file: sm.file, line: loc.line, col: loc.col, message, ...(hint ? { hint } : {}), path: path.join(".") });
  }
  return out;
}

type Report = (path: DocPath, message: string, hint?: string) => void;

/**
 * Fields a rule listening to `signals` may use: those any of its signals offers (a signal that
 * lacks one gives the condition's `default`).
 */
export function fieldsOf(signals: readonly string[]): Set<string> {
  return new Set(signals.flatMap((s) => Object.keys(SIGNALS[s]?.fields ?? {})));
}

function compileCondition(c: Condition, fields: ReadonlySet<string>, path: DocPath, report: Report): Predicate {
  if ("any" in c) {
    const parts = c.any.map((x, i) => compileCondition(x, fields, [...path, "any", i], report));
    return (f) => parts.some((p) => p(f));
  }
  if (!fields.has(c.field)) {
    const guess = closest(c.field, fields);
    report([...path, "field"], `unknown field "${c.field}" for this rule's signal`, `${guess ? `did you mean "${guess}"? ` : ""}fields: ${[...fields].join(", ")}`);
  }
  const { field, op } = c;
  const needsList = op === "in" || op === "not_in";
  const needsNone = op === "exists" || op === "missing";
  if (needsList && !Array.isArray(c.value)) report([...path, "value"], `op "${op}" needs a list value`);
  if (!needsList && !needsNone && (c.value === undefined || Array.isArray(c.value))) report([...path, "value"], `op "${op}" needs a single value`);
  const ordered = op === "<" || op === "<=" || op === ">" || op === ">=";
  if (ordered && typeof c.value !== "number") report([...path, "value"], `op "${op}" compares numbers: value must be a number`);
  const value = c.value;
  const dflt = c.default;
  return (f) => {
    const raw = f[field];
    if (op === "exists") return raw !== undefined;
    if (op === "missing") return raw === undefined;
    const x = raw === undefined ? dflt : raw;
    if (x === undefined) return false;
    switch (op) {
      case "==":
        return x === value;
      case "!=":
        return x !== value;
      case "<":
        return typeof x === "number" && x < (value as number);
      case "<=":
        return typeof x === "number" && x <= (value as number);
      case ">":
        return typeof x === "number" && x > (value as number);
      case ">=":
        return typeof x === "number" && x >= (value as number);
      case "in":
        return (value as ConditionValue[]).includes(x);
      case "not_in":
        return !(value as ConditionValue[]).includes(x);
    }
  };
}

function compileConditions(list: readonly Condition[] | undefined, fields: ReadonlySet<string>, path: DocPath, report: Report): Predicate {
  const parts = (list ?? []).map((c, i) => compileCondition(c, fields, [...path, i], report));
  return (f) => parts.every((p) => p(f));
}

function compile(file: RulesFile, name: string, report: Report): CompiledRules {
  const pb = file.position_bias ?? {};
  const bl = file.baselines ?? {};
  let halfLifeMs = 0;
  try {
    halfLifeMs = parseDuration(bl.half_life ?? DEFAULT_BASELINES.half_life, "baselines.half_life");
  } catch (err) {
    report(["baselines", "half_life"], errorMessage(err));
  }
  if (halfLifeMs <= 0) report(["baselines", "half_life"], "half_life must be longer than 0");
  const maxIps = pb.max_ips ?? DEFAULT_MAX_IPS;
  const rules: CompiledRule[] = [];
  const names = new Map<string, number>();
  file.rules.forEach((r, i) => {
    const at: DocPath = ["rules", i];
    const first = names.get(r.name);
    if (first !== undefined) report([...at, "name"], `duplicate rule name "${r.name}" (first at rules.${first})`, "rule names are part of label ids: each must be unique");
    else names.set(r.name, i);
    const signals = Array.isArray(r.signal) ? r.signal : [r.signal];
    const fields = fieldsOf(signals);
    for (const s of signals) {
      if (!SIGNALS[s]!.targets.includes(r.target)) {
        report([...at, "target"], `signal "${s}" cannot label target "${r.target}"`, `targets of ${s}: ${SIGNALS[s]!.targets.join(", ")}`);
      }
    }
    if (TARGET_KIND[r.target] !== r.kind) report([...at, "kind"], `target "${r.target}" makes ${TARGET_KIND[r.target]} labels, not ${r.kind}`, `set kind: ${TARGET_KIND[r.target]}`);
    if (r.kind === "preference" && r.label !== undefined) report([...at, "label"], "preference labels have no polarity", "remove label: the pair says which response was preferred");
    if (r.kind !== "preference" && r.label === undefined) report(at, `a ${r.kind} rule needs label: positive or negative`);
    const when = compileConditions(r.conditions, fields, [...at, "conditions"], report);
    const w: WeightSpec = typeof r.weight === "number" ? { base: r.weight } : r.weight;
    const factors: CompiledFactor[] = (w.factors ?? []).map((f, k): CompiledFactor => {
      const fp: DocPath = [...at, "weight", "factors", k];
      if ("baseline" in f) return { type: "baseline", baseline: f.baseline };
      if ("when" in f) return { type: "when", when: compileConditions(f.when, fields, [...fp, "when"], report), factor: f.factor };
      if (!fields.has(f.field)) {
        const guess = closest(f.field, fields);
        report([...fp, "field"], `unknown field "${f.field}" for this rule's signal`, `${guess ? `did you mean "${guess}"? ` : ""}fields: ${[...fields].join(", ")}`);
      }
      return { type: "field", field: f.field, scale: f.scale ?? 1, offset: f.offset ?? 0, min: f.min ?? 0, max: f.max ?? Infinity, default: f.default ?? 1 };
    });
    const min = w.min ?? 0;
    const max = w.max ?? Infinity;
    if (min > max) report([...at, "weight", "min"], `weight.min (${min}) is above weight.max (${max})`);
    if (r.enabled === false) return;
    rules.push({
      name: r.name,
      version: r.version,
      signals,
      kind: r.kind,
      target: r.target,
      ...(r.label !== undefined ? { label: r.label } : {}),
      when,
      base: w.base,
      factors,
      min,
      max,
      combine: r.combine ?? "sum",
    });
  });
  const bySignal = new Map<string, CompiledRule[]>();
  for (const r of rules) for (const s of r.signals) bySignal.set(s, [...(bySignal.get(s) ?? []), r]);
  const priors = { ...DEFAULT_BASELINES.priors, ...(bl.priors ?? {}) };
  return {
    file: name,
    positionBias: { examination: pb.examination ?? DEFAULT_EXAMINATION, maxIps },
    baselines: { halfLifeMs, priorStrength: bl.prior_strength ?? DEFAULT_BASELINES.prior_strength, floor: bl.floor ?? DEFAULT_BASELINES.floor, priors },
    rules,
    bySignal,
  };
}

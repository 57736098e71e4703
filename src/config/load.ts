import type { ErrorObject, ValidateFunction } from "ajv";
import { readFileSync } from "node:fs";
import { isMap, LineCounter, parseDocument, type YAMLError } from "yaml";
import { DURATION_SCHEMA } from "../core/duration.js";
import { errorMessage } from "../core/errors.js";
import type { OperatorSpec } from "../core/operator.js";
import { OPERATORS } from "../../operators/index.js";
import { newConfigAjv, pipelineSchema, pruneErrors } from "./ajv.js";
import { checkConnections, compilePipeline } from "./compile.js";
import { lintPipeline, type LintStage } from "./lint.js";
import { applySetOverrides, expandEnvironment } from "./overrides.js";
import { closest, PipelineConfigError, sortProblems, type Problem } from "./problems.js";
import { SourceMap, type DocPath } from "./source.js";
import type { Pipeline, PipelineFile } from "./types.js";

export { formatProblem, PipelineConfigError, type Problem } from "./problems.js";

/** Finds an operator by name. */
export type OperatorLookup = (name: string) => OperatorSpec<any> | undefined;

export interface LoadOptions {
  /** `dotted.path=value` overrides, applied in order before validation. */
  set?: readonly string[];
  /** Environment for `${VAR}` expansion and `*_env` secrets. @default process.env */
  env?: Readonly<Record<string, string | undefined>>;
  /** The operators stages may use: a lookup or a list. @default the registry (operators/index.ts) */
  operators?: OperatorLookup | readonly OperatorSpec<any>[];
  /** Read `*_file` / `*_env` secrets and check referenced files exist. @default true */
  secrets?: boolean;
  /** The file's text, when it is not to be read from `file` (tests, stdin). */
  source?: string;
}

export interface LoadResult {
  /** Set only when there are no problems. */
  pipeline?: Pipeline;
  problems: Problem[];
}

/**
 * Loads a pipeline file: YAML with positions, `--set` overrides, `${VAR}` expansion, schema
 * validation (pipeline and each stage's operator config, defaults applied), cross-stage lint,
 * then compilation. Every problem found is returned, located at the YAML node at fault.
 */
export function loadPipeline(file: string, opts: LoadOptions = {}): LoadResult {
  const env = opts.env ?? process.env;
  const { lookup, names } = operatorsOf(opts.operators);

  let text: string;
  try {
    text = opts.source ?? readFileSync(file, "utf8");
  } catch (err) {
    return { problems: [{ file, line: 1, col: 1, message: `cannot read the pipeline file: ${errorMessage(err)}` }] };
  }
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true, merge: true });
  const sm = new SourceMap(file, doc, lines);
  if (doc.errors.length > 0) return { problems: sortProblems(yamlProblems(sm, text, doc.errors)) };
  if (!isMap(doc.contents)) {
    return { problems: [{ file, ...sm.locate([]), message: "a pipeline file is a mapping (version, name, stages, …)", hint: "see the pipeline reference in the README" }] };
  }

  const problems: Problem[] = [];
  problems.push(...applySetOverrides(sm, opts.set ?? []));
  problems.push(...expandEnvironment(sm, env));
  const data = doc.toJS() as Record<string, unknown>;

  const validatePipeline = pipelineValidator();
  if (!validatePipeline(data)) problems.push(...ajvProblems(sm, data, [], validatePipeline.errors ?? []));

  // Each stage's config against its operator's schema; its defaults are applied in place.
  const stages = Array.isArray(data.stages) ? (data.stages as unknown[]) : [];
  const lintStages: LintStage[] = [];
  const configs: Record<string, unknown>[] = [];
  stages.forEach((raw, i) => {
    if (!isPlainObject(raw) || typeof raw.name !== "string" || typeof raw.operator !== "string") return;
    const config = isPlainObject(raw.config) ? raw.config : undefined;
    const spec = lookup(raw.operator);
    let configValid = false;
    if (spec && config) {
      const r = runOperatorSchema(spec, config);
      if (r.compileError) {
        problems.push({ file, ...sm.locate(["stages", i, "operator"]), message: `operator ${spec.name}'s config schema does not compile: ${r.compileError}`, hint: "this is a bug in the operator" });
      } else {
        problems.push(...ajvProblems(sm, data, ["stages", i, "config"], r.errors));
        configValid = r.errors.length === 0;
      }
    }
    configs[i] = config ?? {};
    lintStages.push({ name: raw.name, operator: raw.operator, fuse_with_previous: raw.fuse_with_previous === true, config: config ?? {}, index: i, configValid });
  });

  const name = typeof data.name === "string" ? data.name : "pipeline";
  const lint = lintPipeline(
    {
      name,
      subject_prefix: typeof data.subject_prefix === "string" ? data.subject_prefix : name,
      partitions: typeof data.partitions === "number" ? data.partitions : 0,
      partitionsStated: sm.has(["partitions"]),
      stages: lintStages,
    },
    { file, locate: (p, at) => sm.locate(p, at), operator: lookup, operatorNames: names },
  );
  lint.push(...checkConnections(data as unknown as PipelineFile, sm));
  // When the schema already flagged a value (say a stage name), lint's view of the same value adds nothing.
  const flagged = new Set(problems.map((p) => p.path).filter((p) => p !== undefined));
  // …and a partition count that is not a number has been reported whatever lint says about it.
  const partitionsBad = flagged.has("partitions") || typeof data.partitions !== "number";
  if (partitionsBad) flagged.add("partitions");
  for (const p of lint) if (p.path === undefined || !flagged.has(p.path)) problems.push(p);
  if (problems.length > 0) return { problems: sortProblems(problems) };

  const compiled = compilePipeline(data as unknown as PipelineFile, sm, { env, secrets: opts.secrets ?? true, configs });
  if (compiled.problems.length > 0) return { problems: sortProblems(compiled.problems) };
  return { pipeline: compiled.pipeline, problems: [] };
}

/** Like `loadPipeline`, but throws a `PipelineConfigError` (a ConfigError: exit 2) listing every problem. */
export function loadPipelineOrThrow(file: string, opts: LoadOptions = {}): Pipeline {
  const r = loadPipeline(file, opts);
  if (!r.pipeline) throw new PipelineConfigError(file, r.problems);
  return r.pipeline;
}

/** A problem in an operator config, relative to the config (for tests and the examples check). */
export interface ConfigIssue {
  path: string[];
  message: string;
  hint?: string;
}

/**
 * Validates (and fills the defaults of, in place) one stage config against its operator's
 * schema. `compileError` is set when the schema itself is invalid.
 */
export function validateStageConfig(spec: OperatorSpec<any>, config: Record<string, unknown>): { errors: ConfigIssue[]; compileError?: string } {
  const r = runOperatorSchema(spec, config);
  if (r.compileError !== undefined) return { errors: [], compileError: r.compileError };
  return {
    errors: pruneErrors(r.errors).map((e) => {
      const d = describeError(e);
      return { path: [...pointer(e.instancePath), ...(d.key !== undefined ? [d.key] : [])], message: d.message, ...(d.hint ? { hint: d.hint } : {}) };
    }),
  };
}

function runOperatorSchema(spec: OperatorSpec<any>, config: Record<string, unknown>): { errors: ErrorObject[]; compileError?: string } {
  const v = operatorValidator(spec);
  if (typeof v === "string") return { errors: [], compileError: v };
  return v(config) ? { errors: [] } : { errors: v.errors ?? [] };
}

// --- validators ---------------------------------------------------------------------------

const ajv = newConfigAjv();
let pipelineValidate: ValidateFunction | undefined;
const operatorValidators = new WeakMap<object, ValidateFunction | string>();

function pipelineValidator(): ValidateFunction {
  pipelineValidate ??= ajv.compile(pipelineSchema());
  return pipelineValidate;
}

function operatorValidator(spec: OperatorSpec<any>): ValidateFunction | string {
  let v = operatorValidators.get(spec);
  if (v === undefined) {
    try {
      v = ajv.compile(spec.schema);
    } catch (err) {
      v = errorMessage(err);
    }
    operatorValidators.set(spec, v);
  }
  return v;
}

function operatorsOf(ops: LoadOptions["operators"]): { lookup: OperatorLookup; names: readonly string[] } {
  // A lookup cannot be listed: name the registry's operators it knows, for hints.
  if (typeof ops === "function") return { lookup: ops, names: OPERATORS.map((o) => o.name).filter((n) => ops(n) !== undefined) };
  const list = ops ?? OPERATORS;
  return { lookup: (name) => list.find((o) => o.name === name), names: list.map((o) => o.name) };
}

// --- YAML syntax errors -------------------------------------------------------------------

const YAML_HINTS: Record<string, string> = {
  TAB_AS_INDENT: "indent with spaces: YAML does not allow tabs",
  DUPLICATE_KEY: "a key may appear once per mapping: remove or merge the repeated one",
  BAD_INDENT: "align this line with the other entries of the same mapping or list",
  MISSING_CHAR: "check the indentation: keys of one mapping must line up, list items start with -",
  BLOCK_AS_IMPLICIT_KEY: "the next line is indented deeper than this key's siblings: line them up",
  MULTILINE_IMPLICIT_KEY: "a key must fit on one line: check the indentation of the following line",
  UNEXPECTED_TOKEN: "check for a stray character or a missing colon",
  BAD_DQ_ESCAPE: "use \\\\ for a backslash inside double quotes, or single quotes",
};

function yamlProblems(sm: SourceMap, text: string, errors: readonly YAMLError[]): Problem[] {
  const out: Problem[] = [];
  const lines = new Set<number>();
  for (const e of errors) {
    let offset = e.pos[0];
    // Indentation errors point at the start of the line: the first non-blank character is clearer.
    while (offset < text.length && text[offset] === " ") offset++;
    const { line, col } = sm.pos(offset);
    if (lines.has(line)) continue; // one cause often yields several errors on a line
    lines.add(line);
    let message = e.message.split("\n")[0]!.replace(/ at line \d+, column \d+.*$/, "");
    let hint = YAML_HINTS[e.code];
    if (e.code === "MISSING_CHAR" && /quote/i.test(message)) hint = "close the quoted string";
    if (e.code === "DUPLICATE_KEY") {
      message = `duplicate key ${JSON.stringify(keyAt(text, offset))}`;
    }
    out.push({ file: sm.file, line, col, message: `YAML: ${message}`, ...(hint ? { hint } : {}) });
  }
  return out;
}

function keyAt(text: string, offset: number): string {
  return /^["']?([^:"'\n]*)/.exec(text.slice(offset))?.[1]?.trim() ?? "";
}

// --- ajv errors → problems ----------------------------------------------------------------

const NAME_PATTERN = "^[a-z][a-z0-9_-]*$";
const SECRET_KEYS = /^(password|pass|passwd|token|secret|auth_token|nkey|seed|key)$/i;

function pointer(instancePath: string): string[] {
  if (instancePath === "") return [];
  return instancePath.slice(1).split("/").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/** `stages.dedupe.config.window`: the same dotted path `--set` accepts, with stage names for readability. */
function pathLabel(data: Record<string, unknown>, path: readonly (string | number)[]): string {
  if (path.length === 0) return "pipeline";
  const parts = path.map(String);
  if (parts[0] === "stages" && parts.length > 1 && Array.isArray(data.stages)) {
    const st = (data.stages as unknown[])[Number(parts[1])];
    if (isPlainObject(st) && typeof st.name === "string" && /^[a-z][a-z0-9_-]*$/.test(st.name)) parts[1] = st.name;
  }
  return parts.join(".");
}

/** A readable message for one ajv error, with a hint, and the key it is about (for unknown/missing keys). */
function describeError(e: ErrorObject): { message: string; hint?: string; key?: string; at?: "key" } {
  const p = e.params as Record<string, unknown>;
  const parent = (e.parentSchema ?? {}) as Record<string, unknown>;
  switch (e.keyword) {
    case "additionalProperties": {
      const key = String(p.additionalProperty);
      const known = Object.keys((parent.properties ?? {}) as Record<string, unknown>);
      if (SECRET_KEYS.test(key)) {
        const refs = known.filter((k) => /_(file|env)$/.test(k));
        const same = refs.filter((k) => k.startsWith(`${key.toLowerCase()}_`));
        const fields = same.length ? same : refs;
        return { key, at: "key", message: `unknown field "${key}"`, hint: `secrets are never written in the YAML: use ${fields.length ? fields.join(" or ") : "a *_file or *_env field"}` };
      }
      const guess = closest(key, known);
      const list = known.length ? `known fields: ${known.join(", ")}` : "this mapping takes no fields";
      return { key, at: "key", message: `unknown field "${key}"`, hint: guess ? `did you mean "${guess}"? ${list}` : list };
    }
    case "required":
      return { message: `missing required field "${String(p.missingProperty)}"` };
    case "type": {
      const got = e.data === null ? "null" : Array.isArray(e.data) ? "a list" : typeof e.data === "object" ? "a mapping" : `${typeof e.data} ${JSON.stringify(e.data)}`;
      return { message: `must be ${article(String(p.type))}, got ${got}` };
    }
    case "pattern": {
      const pattern = String(p.pattern);
      if (pattern === DURATION_SCHEMA.pattern) return { message: `${JSON.stringify(e.data)} is not a duration`, hint: "use a number and a unit: 250ms, 30s, 30m, 2h, 7d" };
      if (pattern === NAME_PATTERN) return { message: `${JSON.stringify(e.data)} is not a valid name`, hint: "lower case letters, digits, - and _, starting with a letter" };
      return { message: `${JSON.stringify(e.data)} does not match ${pattern}` };
    }
    case "enum": {
      const allowed = (p.allowedValues as unknown[]).map((v) => JSON.stringify(v));
      const guess = typeof e.data === "string" ? closest(e.data, (p.allowedValues as unknown[]).filter((v): v is string => typeof v === "string")) : undefined;
      return { message: `${JSON.stringify(e.data)} is not one of ${allowed.join(", ")}`, ...(guess ? { hint: `did you mean "${guess}"?` } : {}) };
    }
    case "const":
      return { message: `must be ${JSON.stringify(p.allowedValue)}, got ${JSON.stringify(e.data)}` };
    case "anyOf":
    case "oneOf":
      return { message: `${JSON.stringify(e.data)} matches none of the allowed forms`, ...(typeof parent.description === "string" ? { hint: parent.description } : {}) };
    default:
      return { message: `${e.message ?? e.keyword}${e.data !== undefined && typeof e.data !== "object" ? `, got ${JSON.stringify(e.data)}` : ""}` };
  }
}

function article(type: string): string {
  const t = type.replace(/,/g, " or ");
  if (t === "object") return "a mapping";
  if (t === "array") return "a list";
  return /^[aeiou]/.test(t) ? `an ${t}` : `a ${t}`;
}

function ajvProblems(sm: SourceMap, data: Record<string, unknown>, base: DocPath, errors: readonly ErrorObject[]): Problem[] {
  const out: Problem[] = [];
  const seen = new Set<string>();
  for (const e of pruneErrors([...errors])) {
    const path = [...base, ...pointer(e.instancePath)];
    const d = describeError(e);
    const full = d.key !== undefined ? [...path, d.key] : path;
    const loc = sm.locate(full, d.at ?? "value");
    if (loc.unresolved) continue; // the unset variable is the problem, already reported
    const hints = [d.hint];
    if (loc.expandedFrom !== undefined) hints.push(`expanded from ${JSON.stringify(loc.expandedFrom)}`);
    if (loc.setBy !== undefined) hints.push(`value from --set ${loc.setBy}`);
    const hint = hints.filter((h): h is string => !!h).join("; ");
    const message = `${pathLabel(data, path)}: ${d.message}`;
    const key = `${loc.line}:${loc.col}:${message}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ file: sm.file, line: loc.line, col: loc.col, message, ...(hint ? { hint } : {}), path: full.join(".") });
  }
  return out;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

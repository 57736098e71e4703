import { stringify } from "yaml";
import type { OperatorSpec } from "../core/operator.js";
import { DURATION_SCHEMA } from "../core/duration.js";
import { OPERATORS } from "../../operators/index.js";
import { pipelineSchema } from "./ajv.js";

/**
 * The README's pipeline reference, generated from the pipeline schema and the operator registry
 * (the schemas are the single source; nothing here repeats them). `scripts/gen-readme.mjs` writes
 * it between the markers; test/readme.test.ts fails when the README is stale.
 */

export const BEGIN_MARKER = "<!-- BEGIN GENERATED: pipeline-reference -->";
export const END_MARKER = "<!-- END GENERATED: pipeline-reference -->";

type Schema = Record<string, unknown>;

/** Renders the whole reference: pipeline fields, then each registered operator. */
export function renderPipelineReference(operators: readonly OperatorSpec<any>[] = OPERATORS): string {
  const schema = pipelineSchema();
  const out: string[] = [];
  out.push("_Generated from `config/schemas/pipeline.v1.json` and `operators/index.ts` by `node scripts/gen-readme.mjs`: edit those, not this section._");
  out.push("");
  out.push("### Pipeline file");
  out.push("");
  if (typeof schema.description === "string") out.push(md(schema.description), "");
  out.push(...fieldTable(schema));
  out.push("");
  out.push("### Operators");
  out.push("");
  if (operators.length === 0) {
    out.push("_No operator is registered yet._");
  } else {
    out.push(operators.map((o) => `[\`${o.name}\`](#operator-${o.name})`).join(" · "));
    for (const op of operators) out.push("", ...renderOperator(op));
  }
  return out.join("\n");
}

function renderOperator(op: OperatorSpec<any>): string[] {
  const out: string[] = [];
  out.push(`#### Operator \`${op.name}\``, "");
  out.push(`**${md(op.summary)}**`, "");
  out.push(md(op.description), "");
  out.push(
    op.keyed
      ? "Keyed: runs partitioned by the pseudonymized user (one worker owns a partition at a time); its state is per user."
      : "Unkeyed: workers share one durable consumer.",
    "",
  );
  const rows = fieldTable(op.schema);
  if (rows.length > 2) out.push("Config (`stages[].config`):", "", ...rows, "");
  else out.push("Config: none.", "");
  if (op.state.length > 0) {
    out.push("State it keeps:", "", "| key | holds | TTL |", "|---|---|---|");
    for (const s of op.state) out.push(`| \`${cell(s.key)}\` | ${cell(md(s.holds))} | ${cell(md(s.ttl))} |`);
    out.push("");
  } else {
    out.push("State: none.", "");
  }
  const side = op.outputs.filter((o) => o !== "next");
  out.push(`Side outputs: ${side.length ? side.map((o) => `\`<p>.${o}\``).join(", ") : "none"} (besides the next stage and \`<p>.dlq.<stage>\`).`);
  // An example with a config says more than one showing the defaults.
  const ex = op.examples.find((e) => Object.keys(e.config).length > 0) ?? op.examples[0];
  if (ex) {
    const stage: Record<string, unknown> = { name: op.name, operator: op.name };
    if (Object.keys(ex.config).length > 0) stage.config = ex.config;
    out.push("", `Example — ${md(ex.title)}:`, "", "```yaml", stringify([stage]).trimEnd(), "```");
  }
  return out;
}

/** `| field | type | default | description |` rows of an object schema, nested fields flattened as `a.b` / `a[].b`. */
function fieldTable(schema: Schema): string[] {
  const rows: string[] = [];
  walkFields(schema, "", rows);
  if (rows.length === 0) return [];
  return ["| field | type | default | description |", "|---|---|---|---|", ...rows];
}

function walkFields(schema: Schema, prefix: string, rows: string[]): void {
  const props = (schema.properties ?? {}) as Record<string, Schema>;
  const required = new Set((schema.required ?? []) as string[]);
  for (const [name, prop] of Object.entries(props)) {
    const field = `${prefix}${name}`;
    const dflt = required.has(name) ? "required" : prop.default === undefined || isEmptyObject(prop.default) ? "" : `\`${cell(formatValue(prop.default))}\``;
    rows.push(`| \`${field}\` | ${cell(typeOf(prop))} | ${dflt} | ${cell(md(String(prop.description ?? "")))} |`);
    if (prop.properties) walkFields(prop, `${field}.`, rows);
    const items = prop.items as Schema | undefined;
    if (items && typeof items === "object" && items.properties) walkFields(items, `${field}[].`, rows);
  }
}

/** A short human type: `duration`, `integer ≥ 1`, `list of string`, `"a" \| "b"`. */
function typeOf(s: Schema): string {
  if (s.const !== undefined) return `\`${formatValue(s.const)}\``;
  if (Array.isArray(s.enum)) return s.enum.map((v) => `\`${formatValue(v)}\``).join(", ");
  for (const k of ["anyOf", "oneOf"] as const) {
    if (Array.isArray(s[k])) return (s[k] as Schema[]).map(typeOf).join(" or ");
  }
  const type = Array.isArray(s.type) ? (s.type as string[]).join(" or ") : (s.type as string | undefined);
  if (type === "string" && s.pattern === DURATION_SCHEMA.pattern) return "duration";
  if (type === "array") {
    const items = s.items as Schema | undefined;
    return items && typeof items === "object" && !items.properties ? `list of ${typeOf(items)}` : "list";
  }
  if (type === "object") {
    const ap = s.additionalProperties;
    return ap && typeof ap === "object" ? `map of ${typeOf(ap as Schema)}` : "mapping";
  }
  if (type === "integer" || type === "number") {
    const lo = s.minimum ?? s.exclusiveMinimum;
    const hi = s.maximum ?? s.exclusiveMaximum;
    if (lo !== undefined && hi !== undefined) return `${type} ${lo}–${hi}`;
    if (lo !== undefined) return `${type} ${s.exclusiveMinimum !== undefined ? ">" : "≥"} ${lo}`;
    if (hi !== undefined) return `${type} ${s.exclusiveMaximum !== undefined ? "<" : "≤"} ${hi}`;
  }
  return type ?? "any";
}

function formatValue(v: unknown): string {
  if (typeof v === "string") return v;
  if (Array.isArray(v) && v.every((x) => typeof x === "string")) return `[${v.join(", ")}]`;
  return JSON.stringify(v);
}

function isEmptyObject(v: unknown): boolean {
  return typeof v === "object" && v !== null && !Array.isArray(v) && Object.keys(v).length === 0;
}

/** Escapes text for a table cell. */
function cell(s: string): string {
  return s.replace(/\|/g, "\\|").replace(/\s*\n\s*/g, " ");
}

/** Escapes `<`/`>` outside code spans so `<p>.bots` is not read as an HTML tag. */
function md(s: string): string {
  return s
    .split(/(`[^`]*`)/)
    .map((part) => (part.startsWith("`") ? part : part.replace(/</g, "&lt;").replace(/>/g, "&gt;")))
    .join("");
}

/** The README with the generated section replaced; throws when the markers are missing. */
export function replaceGenerated(readme: string, content: string): string {
  const begin = readme.indexOf(BEGIN_MARKER);
  const end = readme.indexOf(END_MARKER);
  if (begin < 0 || end < begin) throw new Error(`README.md lacks the markers ${BEGIN_MARKER} … ${END_MARKER}`);
  return `${readme.slice(0, begin + BEGIN_MARKER.length)}\n${content}\n${readme.slice(end)}`;
}

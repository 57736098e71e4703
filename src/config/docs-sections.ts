import { readFileSync } from "node:fs";
import { isMap, isSeq, parseDocument, type Node as YamlNode } from "yaml";
import { join } from "node:path";
import { DLQ_REASONS } from "../core/errors.js";
import { projectRoot } from "./paths.js";
import { renderPipelineReference } from "./docs.js";
import { FEATURE_FIELDS, FEATURE_ENTITIES } from "../labels/features.js";

/**
 * Every generated section of the README, by marker name. Each renders from its single source
 * (schemas, registry, reason codes); `scripts/gen-readme.mjs` writes them and test/readme.test.ts
 * fails when one is stale.
 */
export const GENERATED_SECTIONS: Record<string, () => string> = {
  "pipeline-reference": () => renderPipelineReference(),
  "label-schema": renderLabelSchema,
  "dlq-reasons": renderDlqReasons,
  features: renderFeatures,
  "label-rules": renderLabelRules,
};

export function markers(name: string): { begin: string; end: string } {
  return { begin: `<!-- BEGIN GENERATED: ${name} -->`, end: `<!-- END GENERATED: ${name} -->` };
}

/** The README with section `name` replaced; throws when its markers are missing. */
export function replaceSection(readme: string, name: string, content: string): string {
  const { begin, end } = markers(name);
  const b = readme.indexOf(begin);
  const e = readme.indexOf(end);
  if (b < 0 || e < b) throw new Error(`README.md lacks the markers ${begin} … ${end}`);
  return `${readme.slice(0, b + begin.length)}\n${content}\n${readme.slice(e)}`;
}

/**
 * Every generated section rewritten.
 * @public imported at run time by scripts/gen-readme.mjs (from dist/), which knip cannot follow.
 */
export function regenerate(readme: string): string {
  let out = readme;
  for (const [name, render] of Object.entries(GENERATED_SECTIONS)) out = replaceSection(out, name, render());
  return out;
}

type Schema = { description?: string; type?: string | string[]; enum?: unknown[]; const?: unknown; properties?: Record<string, Schema>; items?: Schema; required?: string[]; minimum?: number };

function typeOf(s: Schema): string {
  if (s.const !== undefined) return `\`${JSON.stringify(s.const)}\``;
  if (s.enum) return s.enum.map((v) => `\`${JSON.stringify(v)}\``).join(" \\| ");
  if (s.type === "array" && s.items) return `array of ${s.items.type ?? "object"}`;
  return Array.isArray(s.type) ? s.type.join(" \\| ") : (s.type ?? "any");
}

const cell = (t: string | undefined) => (t ?? "").replace(/\|/g, "\\|").replace(/\n/g, " ");

/** The label schema for ML teams, from config/schemas/label.v2.json (v2 fields marked). */
export function renderLabelSchema(): string {
  const read = (v: number) => JSON.parse(readFileSync(join(projectRoot(), "config", "schemas", `label.v${v}.json`), "utf8")) as Schema & { examples?: unknown[] };
  const schema = read(2);
  const v1 = new Set(Object.keys(read(1).properties ?? {}));
  const required = new Set(schema.required ?? []);
  const out = ["_Generated from `config/schemas/label.v2.json` by `node scripts/gen-readme.mjs`._", "", cell(schema.description), "", "| field | type | required | since | meaning |", "|---|---|---|---|---|"];
  for (const [name, s] of Object.entries(schema.properties ?? {})) {
    const since = v1.has(name) ? "v1" : "v2";
    out.push(`| \`${name}\` | ${typeOf(s)} | ${required.has(name) ? "yes" : ""} | ${since} | ${cell(s.description)} |`);
    const sub = s.type === "array" ? { path: `${name}[]`, of: s.items } : { path: name, of: s };
    for (const [f, ss] of Object.entries(sub.of?.properties ?? {})) out.push(`| \`${sub.path}.${f}\` | ${typeOf(ss)} | ${sub.of?.required?.includes(f) ? "yes" : ""} | ${since} | ${cell(ss.description)} |`);
  }
  if (schema.examples?.length) out.push("", "Example:", "", "```json", JSON.stringify(schema.examples[0], null, 2), "```");
  return out.join("\n");
}

/** Dead-letter reason codes, from src/core/errors.ts. */
export function renderDlqReasons(): string {
  const out = ["_Generated from `DLQ_REASONS` in `src/core/errors.ts`._", "", "| `Tacit-Reason` | meaning |", "|---|---|"];
  for (const [code, meaning] of Object.entries(DLQ_REASONS)) out.push(`| \`${code}\` | ${meaning} |`);
  return out.join("\n");
}

/** Online feature fields per entity, from FEATURE_FIELDS in src/labels/features.ts. */
export function renderFeatures(): string {
  const out = ["_Generated from `FEATURE_FIELDS` in `src/labels/features.ts`._"];
  for (const entity of FEATURE_ENTITIES) {
    out.push("", `**${entity}**`, "", "| field | meaning |", "|---|---|");
    for (const f of FEATURE_FIELDS.filter((x) => x.entity === entity)) out.push(`| \`${f.name}\` | ${cell(f.meaning)} |`);
  }
  return out.join("\n");
}

/** A comment the rules file puts before a node, on one line (`#` and line breaks dropped). */
function commentOf(n: unknown): string {
  const c = (n as { commentBefore?: string | null } | null)?.commentBefore ?? "";
  return c
    .split("\n")
    .map((l) => l.replace(/^\s*#?\s?/, "").trim())
    .filter((l) => l && !/^[─-]+/.test(l) && !/^──/.test(l))
    .join(" ");
}

/** A condition or factor as one short line of code. */
function inline(v: unknown): string {
  if (v === null || typeof v !== "object") return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(inline).join(", ")}]`;
  return `{ ${Object.entries(v as Record<string, unknown>).map(([k, x]) => `${k}: ${inline(x)}`).join(", ")} }`;
}

/**
 * The default label rules, from config/label-rules.yaml: what each rule listens to and emits,
 * its conditions and weight, and the reasons the file gives for its numbers (rule descriptions
 * and the comments on conditions, factors and settings).
 */
export function renderLabelRules(): string {
  const rel = "config/label-rules.yaml";
  const doc = parseDocument(readFileSync(join(projectRoot(), rel), "utf8"));
  const out = [`_Generated from \`${rel}\` by \`node scripts/gen-readme.mjs\`; the file's own comments hold the sources (RESEARCH.md)._`, ""];
  const top = doc.contents;
  if (!isMap(top)) return out.join("\n");
  const plain = top.toJSON() as { description?: string; position_bias?: Record<string, unknown>; baselines?: Record<string, unknown> };
  if (plain.description) out.push(cell(plain.description), "");
  for (const section of ["position_bias", "baselines"] as const) {
    const m = top.get(section, true);
    if (!isMap(m)) continue;
    out.push(`**${section}**`, "", "| setting | value | why |", "|---|---|---|");
    for (const [i, pair] of m.items.entries()) {
      const key = String((pair.key as { value?: unknown }).value ?? pair.key);
      // A comment before a collection's first entry belongs to the collection in the YAML model.
      const lead = i === 0 ? commentOf(m) : "";
      const value = pair.value as YamlNode | null;
      if (isMap(value)) {
        for (const sub of value.items) {
          const subKey = String((sub.key as { value?: unknown }).value ?? sub.key);
          const why = [commentOf(sub.key) || (sub === value.items[0] ? commentOf(value) : ""), (sub.value as { comment?: string } | null)?.comment?.trim()].filter(Boolean).join(" ");
          out.push(`| \`${key}.${subKey}\` | \`${inline((sub.value as YamlNode).toJSON())}\` | ${cell(why)} |`);
        }
      } else {
        out.push(`| \`${key}\` | \`${inline(value?.toJSON())}\` | ${cell(commentOf(pair.key) || lead)} |`);
      }
    }
    out.push("");
  }
  const rules = top.get("rules", true);
  if (!isSeq(rules)) return out.join("\n");
  out.push("| rule (version) | signal → label | conditions | weight | why |", "|---|---|---|---|---|");
  for (const item of rules.items) {
    if (!isMap(item)) continue;
    const r = item.toJSON() as { name: string; version: unknown; description?: string; signal: string | string[]; kind: string; target?: string; label?: string; weight: unknown };
    const conds = item.get("conditions", true);
    const why = (list: unknown, n: unknown, i: number) => commentOf(n) || (i === 0 ? commentOf(list) : "");
    const condLines = isSeq(conds) ? conds.items.map((c, i) => `\`${inline((c as YamlNode).toJSON())}\`${why(conds, c, i) ? ` — ${why(conds, c, i)}` : ""}`) : [];
    const w = item.get("weight", true);
    let weight = `\`${inline(r.weight)}\``;
    if (isMap(w)) {
      const factors = w.get("factors", true);
      const parts = Object.entries(w.toJSON() as Record<string, unknown>).filter(([k]) => k !== "factors").map(([k, v]) => `${k} ${inline(v)}`);
      const fl = isSeq(factors) ? factors.items.map((f, i) => `× \`${inline((f as YamlNode).toJSON())}\`${why(factors, f, i) ? ` — ${why(factors, f, i)}` : ""}`) : [];
      weight = [parts.join(", "), ...fl].join("<br>");
    }
    out.push(`| \`${r.name}\` (${String(r.version)}) | ${[r.signal].flat().join(", ")} → ${r.label ? `${r.label} ` : ""}${r.kind}${r.target && r.target !== r.kind ? ` (${r.target})` : ""} | ${cell(condLines.join("<br>")) || "—"} | ${cell(weight)} | ${cell(r.description?.trim())} |`);
  }
  return out.join("\n");
}

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { DLQ_REASONS } from "../core/errors.js";
import { projectRoot } from "../cli/paths.js";
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

/** Every generated section rewritten. */
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

/** The label schema for ML teams, from config/schemas/label.v1.json. */
export function renderLabelSchema(): string {
  const schema = JSON.parse(readFileSync(join(projectRoot(), "config", "schemas", "label.v1.json"), "utf8")) as Schema & { examples?: unknown[] };
  const required = new Set(schema.required ?? []);
  const out = ["_Generated from `config/schemas/label.v1.json` by `node scripts/gen-readme.mjs`._", "", cell(schema.description), "", "| field | type | required | meaning |", "|---|---|---|---|"];
  for (const [name, s] of Object.entries(schema.properties ?? {})) {
    out.push(`| \`${name}\` | ${typeOf(s)} | ${required.has(name) ? "yes" : ""} | ${cell(s.description)} |`);
    if (s.type === "array" && s.items?.properties) {
      for (const [sub, ss] of Object.entries(s.items.properties)) out.push(`| \`${name}[].${sub}\` | ${typeOf(ss)} | ${s.items.required?.includes(sub) ? "yes" : ""} | ${cell(ss.description)} |`);
    }
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

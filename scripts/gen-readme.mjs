#!/usr/bin/env node
// Regenerates the README's pipeline reference (between the GENERATED markers) from the compiled
// registry and config/schemas/pipeline.v1.json. Run after `npm run build`.
//   node scripts/gen-readme.mjs           rewrite README.md
//   node scripts/gen-readme.mjs --check   exit 1 if README.md is stale
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const docs = join(root, "dist", "src", "config", "docs.js");
if (!existsSync(docs)) {
  process.stderr.write("gen-readme: dist/ is not built: run `npm run build` first\n");
  process.exit(2);
}
const { renderPipelineReference, replaceGenerated, BEGIN_MARKER, END_MARKER } = await import(docs);

const readmePath = join(root, "README.md");
const current = existsSync(readmePath)
  ? readFileSync(readmePath, "utf8")
  : `# tacit\n\n## Pipeline reference\n\n${BEGIN_MARKER}\n${END_MARKER}\n`;
const next = replaceGenerated(current, renderPipelineReference());

if (process.argv.includes("--check")) {
  if (next !== current) {
    process.stderr.write("gen-readme: README.md is stale: run `npm run build && node scripts/gen-readme.mjs`\n");
    process.exit(1);
  }
  process.stdout.write("README.md: pipeline reference is up to date\n");
} else if (next === current) {
  process.stdout.write("README.md: pipeline reference already up to date\n");
} else {
  writeFileSync(readmePath, next);
  process.stdout.write("README.md: pipeline reference regenerated\n");
}

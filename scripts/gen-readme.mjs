#!/usr/bin/env node
// Regenerates the README's generated sections (between `<!-- BEGIN GENERATED: name -->` markers)
// from their sources: the pipeline schema and operator registry, the label schema, the DLQ reason
// codes. Run after `npm run build`.
//   node scripts/gen-readme.mjs           rewrite README.md
//   node scripts/gen-readme.mjs --check   exit 1 if README.md is stale
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const docs = join(root, "dist", "src", "config", "docs-sections.js");
if (!existsSync(docs)) {
  process.stderr.write("gen-readme: dist/ is not built: run `npm run build` first\n");
  process.exit(2);
}
const { regenerate } = await import(docs);
const readmePath = join(root, "README.md");
const current = readFileSync(readmePath, "utf8");
const next = regenerate(current);
if (process.argv.includes("--check")) {
  if (next !== current) {
    process.stderr.write("gen-readme: README.md is stale: run `npm run build && node scripts/gen-readme.mjs`\n");
    process.exit(1);
  }
  process.stdout.write("README.md: generated sections are up to date\n");
} else if (next === current) {
  process.stdout.write("README.md: generated sections already up to date\n");
} else {
  writeFileSync(readmePath, next);
  process.stdout.write("README.md: generated sections regenerated\n");
}

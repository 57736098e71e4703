#!/usr/bin/env -S node --max-semi-space-size=64 --initial-old-space-size=512
// The flags size a worker's young generation and its old generation's floor (WORKER_NODE_FLAGS in src/config/paths.ts says why).
// Entry point: the compiled CLI lives in dist/ (built by `npm run build` or scripts/bootstrap.mjs).
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const main = join(root, "dist", "src", "cli", "main.js");
if (!existsSync(main)) {
  process.stderr.write("tacit is not built yet: run `npm run build` (or `npm run demo`, which builds first)\n");
  process.exit(2);
}
await import(main);

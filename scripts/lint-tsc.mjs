#!/usr/bin/env node
// Type-checks with tsconfig.lint.json: the build's settings plus noUnusedLocals and
// noUnusedParameters. Fails on any error except those listed in KNOWN, which are in files being
// rewritten elsewhere; once they are gone, delete KNOWN and move the two flags into tsconfig.json.
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));

/** Temporarily allowed findings: file and the full message, without the line (which moves). */
const KNOWN = [
  ["src/runtime/replay.ts", "error TS6133: 'JetStreamManager' is declared but its value is never read."],
  ["src/runtime/replay.ts", "error TS6133: 'SIDE_OUTPUTS' is declared but its value is never read."],
];

const tsc = join(root, "node_modules", "typescript", "bin", "tsc");
const res = spawnSync(process.execPath, [tsc, "-p", join(root, "tsconfig.lint.json"), "--pretty", "false"], { cwd: root, encoding: "utf8" });
const out = `${res.stdout ?? ""}${res.stderr ?? ""}`;
const lines = out.split("\n").filter((l) => l.trim() !== "");

const seen = new Set();
const errors = [];
for (const line of lines) {
  const m = /^(.+?)\(\d+,\d+\): (error TS\d+: .*)$/.exec(line);
  const k = m ? KNOWN.findIndex(([file, msg]) => file === m[1] && msg === m[2]) : -1;
  if (k >= 0) seen.add(k);
  else errors.push(line);
}

for (const k of seen) process.stderr.write(`lint-tsc: known, allowed for now: ${KNOWN[k][0]}: ${KNOWN[k][1]}\n`);
KNOWN.forEach(([file, msg], k) => {
  if (!seen.has(k)) process.stderr.write(`lint-tsc: fixed, remove it from KNOWN in scripts/lint-tsc.mjs: ${file}: ${msg}\n`);
});
if (errors.length > 0 || (res.status !== 0 && seen.size === 0)) {
  process.stderr.write(`${errors.join("\n")}\nlint-tsc: type check failed (tsconfig.lint.json)\n`);
  process.exit(1);
}
process.stderr.write("lint-tsc: ✔ no type errors, unused locals or unused parameters\n");

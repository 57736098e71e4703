#!/usr/bin/env node
// Makes a fresh clone runnable with nothing but Node.js: installs npm dependencies when they are
// missing or stale, then compiles the TypeScript. Used by `npm run demo` and `npm test`.
import { execFileSync } from "node:child_process";
import { existsSync, rmSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: ["ignore", "inherit", "inherit"] });

const lock = join(root, "package-lock.json");
const installed = join(root, "node_modules", ".package-lock.json");
if (!existsSync(installed) || (existsSync(lock) && statSync(lock).mtimeMs > statSync(installed).mtimeMs)) {
  process.stderr.write("tacit: installing npm dependencies (npm ci)…\n");
  run(npm, ["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
}
// A clean build, so a deleted source file leaves no stale compiled test behind.
rmSync(join(root, "dist"), { recursive: true, force: true });
try {
  run(process.execPath, [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", join(root, "tsconfig.json")]);
} catch {
  process.stderr.write("tacit: the TypeScript build failed (see above)\n");
  process.exit(1);
}

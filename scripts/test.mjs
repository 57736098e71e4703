#!/usr/bin/env node
// Runs the whole suite with node's test runner: unit tests (fakes) and integration / end-to-end
// tests against real nats-server and redis-server processes that the harness starts on free ports.
// The servers must be installed (and prometheus/promtool for the SLI tests): as root on Debian
// they are installed here, else the exact command to run is printed.
import { spawnSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const dist = join(root, "dist");

const { ensureBinaries, ensurePrometheus } = await import(join(dist, "src", "services", "binaries.js"));
try {
  await ensureBinaries({ install: true, log: (m) => process.stderr.write(`tacit: ${m}\n`) });
  // Only the tests need Prometheus (test/prometheus.test.ts); `tacit demo` never asks for it.
  await ensurePrometheus({ install: true, log: (m) => process.stderr.write(`tacit: ${m}\n`) });
} catch (err) {
  process.stderr.write(`tacit: ${err.message}\n`);
  process.exit(2);
}

function find(dir, out = []) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) find(p, out);
    else if (name.endsWith(".test.js")) out.push(p);
  }
  return out;
}
const only = process.argv.slice(2);
const files = find(dist)
  .filter((f) => only.length === 0 || only.some((o) => relative(dist, f).includes(o)))
  .sort();
if (files.length === 0) {
  process.stderr.write("tacit: no test files found\n");
  process.exit(1);
}
// Unit tests run two files at a time. Integration and end-to-end tests (test/) run one file at a
// time: they start servers and worker processes whose timing (leases, idle partitions) a second
// heavy file on a 2-core machine would distort.
const integration = join(dist, "test") + "/";
const unit = files.filter((f) => !f.startsWith(integration));
const heavy = files.filter((f) => f.startsWith(integration));
const env = { ...process.env, TACIT_LOG_LEVEL: process.env.TACIT_LOG_LEVEL ?? "silent" };
let status = 0;
for (const [group, conc] of [[unit, 2], [heavy, 1]]) {
  if (group.length === 0) continue;
  const res = spawnSync(process.execPath, ["--test", `--test-concurrency=${conc}`, ...group], { cwd: root, stdio: "inherit", env });
  if (res.status !== 0) status = res.status ?? 1;
}
process.exit(status);

#!/usr/bin/env node
// Label trust on simulated traffic, as a new user would run it (issue 9's "what it must show"):
// simulate → publish → run the default pipeline, with traffic continuing after the simulated span
// (a second simulated population whose event time goes on past the first one's); then
// `tacit evaluate` live against the first span's truth, `tacit export … labels` of the final view,
// and an independent count of that export against the truth files, which uses none of tacit's
// evaluation code. Servers: embedded (`tacit services up`) under a temporary TACIT_HOME.
//
//   npm run build && node scripts/trust-check.mjs --seed 7301 [--users 400] [--json]
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { tacitArgv } from "../dist/src/config/paths.js";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const { values: args } = parseArgs({ options: { seed: { type: "string", default: "7301" }, users: { type: "string", default: "400" }, json: { type: "boolean", default: false } } });
const HOUR = 3_600_000;
const pipeline = join(root, "pipelines", "feedback.yaml");
const dir = mkdtempSync(join(tmpdir(), "tacit-trust-"));
const env = { ...process.env, TACIT_HOME: join(dir, "home"), TACIT_PSEUDONYM_KEY: `t1:trust-check-${args.seed}-0123456789abcdef`, TACIT_LOG_LEVEL: "warn" };
const say = (s) => process.stderr.write(`trust-check: ${s}\n`);
const tacit = (...a) => execFileSync(process.execPath, [join(root, "bin", "tacit.js"), ...a], { env, cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], maxBuffer: 1 << 28 });
const readJsonl = (f) => readFileSync(f, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));

const services = JSON.parse(tacit("services", "up", "--json"));
env.NATS_URL = services.nats.url;
env.REDIS_URL = services.redis.url;
let worker;
try {
  tacit("deploy", pipeline);
  // The simulated span: sessions start over 2 h, from 4 h ago. The continuation: other users whose
  // sessions start over the 80 minutes after it, so event time (and the watermark) goes on well past
  // the first span's last session gap, as live traffic would.
  const now = Date.now();
  const main = { out: join(dir, "main.jsonl"), truth: join(dir, "main.truth.jsonl") };
  const cont = { out: join(dir, "cont.jsonl"), truth: join(dir, "cont.truth.jsonl") };
  tacit("simulate", "--seed", args.seed, "--users", args.users, "--duration", "2h", "--start", new Date(now - 4 * HOUR).toISOString(), "--out", main.out, "--truth", main.truth);
  tacit("simulate", "--seed", `${args.seed}-continued`, "--users", String(Math.ceil(Number(args.users) / 4)), "--duration", "80m", "--start", new Date(now - 100 * 60_000).toISOString(), "--out", cont.out, "--truth", cont.truth);
  say(`simulated seed ${args.seed} (${args.users} users) and its continuation in ${dir}`);
  worker = spawn(process.execPath, tacitArgv(["run", pipeline, "--metrics-port", "0"]), { env, cwd: root, stdio: ["ignore", "ignore", "inherit"] });
  tacit("publish", pipeline, "--input", main.out);
  tacit("publish", pipeline, "--input", cont.out);
  say("published both; waiting for the pipeline to drain");
  // Drained: every stage's durables at 0 pending and 0 ack-pending, five polls in a row.
  for (let streak = 0; streak < 5; ) {
    await new Promise((r) => setTimeout(r, 1000));
    if (worker.exitCode !== null) throw new Error(`the worker exited with code ${worker.exitCode}`);
    const st = JSON.parse(tacit("status", pipeline, "--json"));
    streak = st.stages.every((s) => s.pending === 0 && s.ack_pending === 0) ? streak + 1 : 0;
  }
  // Evaluated once, in the form asked for.
  const evaluate = tacit("evaluate", pipeline, "--truth", main.truth, "--events", main.out, ...(args.json ? ["--json"] : []));
  const exported = join(dir, "labels.jsonl");
  tacit("export", pipeline, "labels", "--format", "jsonl", "--out", exported);

  // --- the independent count: the exported final view against the truth files ---
  const mainTruth = readJsonl(main.truth);
  const truth = [...mainTruth, ...readJsonl(cont.truth)];
  const response = new Map(truth.filter((t) => t.kind === "response").map((t) => [t.response_id, t]));
  const query = new Map(truth.filter((t) => t.kind === "query").map((t) => [t.query_id, t]));
  const inMain = new Set(mainTruth.filter((t) => t.kind === "response").map((t) => t.response_id));
  const labels = readJsonl(exported).filter((l) => !l.retracted && l.weight > 0);
  const botOf = (l) => response.get(l.response_id)?.is_bot_user ?? response.get(l.chosen_response_id)?.is_bot_user ?? query.get(l.query_id)?.is_bot_user;
  const fromBots = labels.filter((l) => botOf(l) === true).length;
  const unknown = labels.filter((l) => botOf(l) === undefined).length;
  const scored = labels.filter((l) => l.kind === "response" && inMain.has(l.response_id) && !response.get(l.response_id).is_bot_user);
  const pos = scored.filter((l) => l.label === "positive");
  const neg = scored.filter((l) => l.label === "negative");
  const signalled = [...response.values()].filter((r) => inMain.has(r.response_id) && !r.is_bot_user && r.signals > 0);
  const labelled = new Set(scored.map((l) => l.response_id));
  const count = {
    live_labels: labels.length,
    live_labels_from_bot_users: fromBots,
    live_labels_unmatched: unknown,
    positive: { labels: pos.length, precision: pos.filter((l) => response.get(l.response_id).good).length / pos.length },
    negative: { labels: neg.length, precision: neg.filter((l) => !response.get(l.response_id).good).length / neg.length },
    coverage: { signalled: signalled.length, labelled: signalled.filter((r) => labelled.has(r.response_id)).length },
  };
  count.coverage.value = count.coverage.labelled / count.coverage.signalled;
  const result = { seed: args.seed, users: Number(args.users), evaluate: args.json ? JSON.parse(evaluate) : undefined, independent: count };
  if (args.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else {
    const f = (x) => (Number.isFinite(x) ? x.toFixed(3) : String(x));
    process.stdout.write(`${evaluate}\n`);
    process.stdout.write(
      `independent count (seed ${args.seed}, exported final view against the truth files): ${count.live_labels} live labels, ${fromBots} from bot users, ${unknown} matching no truth record; ` +
        `positive precision ${f(count.positive.precision)} (${count.positive.labels}), negative precision ${f(count.negative.precision)} (${count.negative.labels}), ` +
        `coverage ${f(count.coverage.value)} (${count.coverage.labelled} of ${count.coverage.signalled} signalled human responses)\n`,
    );
  }
} finally {
  if (worker && worker.exitCode === null) {
    worker.kill("SIGTERM");
    await new Promise((r) => worker.once("exit", r));
  }
  tacit("services", "down");
  rmSync(dir, { recursive: true, force: true });
}

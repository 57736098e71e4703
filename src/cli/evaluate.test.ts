import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { DEV_PSEUDONYM_KEY, parsePseudonymKey, pseudonymize } from "../core/pseudonym.js";
import { simulate } from "../sim/simulate.js";
import type { Report } from "../eval/evaluate.js";
import { registerEvaluate } from "./evaluate.js";

async function cli(args: string[], env: Record<string, string> = {}): Promise<{ out: string; err: string; code: number | undefined }> {
  let out = "";
  let err = "";
  const program = new Command().exitOverride();
  registerEvaluate(program, { out: (t) => (out += t), err: (t) => (err += t) }, env);
  const saved = process.exitCode;
  process.exitCode = undefined;
  try {
    await program.parseAsync(["node", "tacit", ...args]);
    return { out, err, code: process.exitCode as number | undefined };
  } finally {
    process.exitCode = saved;
  }
}

/** Labels an oracle would give: positive for good, negative for bad, for every signalled human response. */
function oracleLabels(key = DEV_PSEUDONYM_KEY) {
  const sim = simulate({ seed: 3, users: 60, durationMs: 600_000 });
  const labels = sim.truth.flatMap((t, i) =>
    t.kind === "response" && !t.is_bot_user && t.signals > 0
      ? [{
          schema_version: 1, label_id: `l${i}`, revision: 0, pipeline: "feedback", kind: "response", response_id: t.response_id, query_id: t.query_id,
          session_id: t.session_id, user: pseudonymize(key, t.user_id), label: t.good ? "positive" : "negative", weight: 1, rule: "oracle", rule_version: 1,
          signals: [{ event_id: "e", event_type: "accept" }], event_time: "2026-01-01T00:00:00Z", emitted_at: "2026-01-01T00:00:00Z",
        }]
      : [],
  );
  const bots = sim.truth.flatMap((t) => (t.kind === "user" && t.is_bot ? [JSON.stringify({ user: pseudonymize(key, t.user_id) })] : []));
  return { sim, labels, bots };
}

test("tacit evaluate reads files, matches users through the pseudonym key and reports targets", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "tacit-eval-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { sim, labels, bots } = oracleLabels();
  await writeFile(join(dir, "truth.jsonl"), sim.truth.map((r) => JSON.stringify(r)).join("\n"));
  await writeFile(join(dir, "labels.jsonl"), labels.map((l) => JSON.stringify(l)).join("\n") + "\n{oops\n");
  await writeFile(join(dir, "bots.jsonl"), bots.join("\n"));
  const base = ["evaluate", "--truth", join(dir, "truth.jsonl"), "--labels", join(dir, "labels.jsonl"), "--bots", join(dir, "bots.jsonl")];

  const json = await cli([...base, "--json", "--check"]);
  assert.equal(json.code, undefined, json.err);
  const report = JSON.parse(json.out) as Report & { notes: string[] };
  assert.equal(report.positive.precision, 1);
  assert.equal(report.coverage, 1);
  assert.equal(report.score.auc, 1);
  assert.equal(report.bots!.human_fpr, 0);
  assert.equal(report.all_pass, true);
  assert.equal(report.labels.rejected, 1);
  assert.ok(report.notes.some((n) => n.includes("development pseudonym key")));

  const human = await cli(base);
  assert.match(human.out, /positive-label precision\s+1\.000\s+≥ 0\.85\s+pass/);
  assert.match(human.out, /human false-positive rate\s+0\.00 %\s+≤ 0\.50 %\s+pass/);

  // Another key: no user matches, so no bot is recognised; the report says why and --check exits 1.
  const other = await cli([...base, "--check"], { TACIT_PSEUDONYM_KEY: "k9:another-secret-of-enough-length" });
  assert.equal(other.code, 1);
  assert.match(other.out, /no label's user matches/);
  assert.match(other.out, /bot filter: 0 users filtered/);
  assert.notEqual(parsePseudonymKey("k9:another-secret-of-enough-length").secret, DEV_PSEUDONYM_KEY.secret);
});

test("tacit evaluate: missing or unreadable inputs are usage errors (exit 2)", async () => {
  assert.equal((await cli(["evaluate", "--labels", "x"])).code, 2);
  const missing = await cli(["evaluate", "--truth", "/nonexistent/truth.jsonl", "--labels", "x"]);
  assert.equal(missing.code, 2);
  assert.match(missing.err, /--truth: \/nonexistent\/truth.jsonl does not exist/);
});

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

test("tacit evaluate --explicit on files: agreement per rule with intervals, the truth beside it when given; usage errors exit 2", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "tacit-eval-explicit-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { sim, labels } = oracleLabels();
  // Ratings on three labelled responses: two agree with the oracle, one does not; a duplicate delivery counts once.
  const targets = labels.slice(0, 3);
  const rating = (i: number, rid: string, r: unknown) => JSON.stringify({ event_id: `x${i}`, event_type: "explicit_feedback", response_id: rid, payload: { rating: r } });
  const events = [
    ...sim.events.filter((l) => !l.includes("explicit_feedback")),
    rating(1, targets[0]!.response_id, targets[0]!.label === "positive" ? 5 : 1),
    rating(2, targets[1]!.response_id, targets[1]!.label === "positive" ? "up" : "down"),
    rating(2, targets[1]!.response_id, targets[1]!.label === "positive" ? "up" : "down"),
    rating(3, targets[2]!.response_id, targets[2]!.label === "positive" ? "down" : "up"),
  ];
  await writeFile(join(dir, "events.jsonl"), events.join("\n"));
  await writeFile(join(dir, "labels.jsonl"), labels.map((l) => JSON.stringify(l)).join("\n"));
  await writeFile(join(dir, "truth.jsonl"), sim.truth.map((r) => JSON.stringify(r)).join("\n"));
  const base = ["evaluate", "--explicit", "--labels", join(dir, "labels.jsonl"), "--events", join(dir, "events.jsonl")];

  const json = await cli([...base, "--json"]);
  assert.equal(json.code, undefined, json.err);
  const report = JSON.parse(json.out) as { labels_rated: number; rated_responses: number; rows: { rule: string; label: string; explicit: { n: number; agree: number; ci: number[] }; truth: unknown }[] };
  assert.equal(report.labels_rated, 3);
  assert.equal(report.rated_responses, 3);
  const oracle = report.rows.filter((r) => r.rule === "oracle");
  assert.deepEqual([oracle.reduce((s, r) => s + r.explicit.n, 0), oracle.reduce((s, r) => s + r.explicit.agree, 0)], [3, 2]);
  assert.ok(oracle.every((r) => r.truth === null && r.explicit.ci.length === 2));

  // With the truth: the oracle's labels are all right, whatever the raters said.
  const human = await cli([...base, "--truth", join(dir, "truth.jsonl")]);
  assert.equal(human.code, undefined, human.err);
  assert.match(human.out, /rated responses: 3 \(0 tied, left out\)/);
  assert.match(human.out, /(positive|negative)\s+oracle\s+\d\s+\d\s+[\d.]+\s+\[[\d.]+, [\d.]+\]\s+1\.000/);

  for (const args of [["evaluate", "--explicit", "--labels", join(dir, "labels.jsonl")], ["evaluate", "--explicit", "--events", join(dir, "events.jsonl")]]) {
    const r = await cli(args);
    assert.equal(r.code, 2);
    assert.match(r.err, /--explicit on files needs --labels <file> and --events <file>/);
  }
});

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { parseTruth } from "../sim/truth.js";
import { registerSimulate } from "./simulate.js";

async function cli(args: string[]): Promise<{ out: string; err: string; code: number | undefined }> {
  let out = "";
  let err = "";
  const program = new Command().exitOverride();
  registerSimulate(program, { out: (t) => (out += t), err: (t) => (err += t) });
  const saved = process.exitCode;
  process.exitCode = undefined;
  try {
    await program.parseAsync(["node", "tacit", ...args]);
    return { out, err, code: process.exitCode as number | undefined };
  } finally {
    process.exitCode = saved;
  }
}

test("tacit simulate writes events and truth, the same bytes for the same seed, and a JSON summary", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "tacit-sim-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  // An explicit --start: without it the timestamps follow the wall clock.
  const args = (name: string): string[] => ["simulate", "--seed", "7", "--users", "40", "--duration", "10m", "--bots", "0.25", "--start", "2026-01-01T00:00:00Z", "--out", join(dir, `${name}.events.jsonl`), "--truth", join(dir, `${name}.truth.jsonl`)];
  const a = await cli([...args("a"), "--json"]);
  assert.equal(a.code, undefined, a.err);
  const summary = JSON.parse(a.out) as { users: number; bots: number; lines: number; seed: number };
  assert.deepEqual([summary.users, summary.bots, summary.seed], [40, 10, 7]);
  const events = await readFile(join(dir, "a.events.jsonl"), "utf8");
  assert.equal(events.trimEnd().split("\n").length, summary.lines);
  const truth = parseTruth(await readFile(join(dir, "a.truth.jsonl"), "utf8"));
  assert.equal(truth.filter((r) => r.kind === "user").length, 40);
  const b = await cli(args("b"));
  assert.match(b.out, /simulated 40 users over 10m \(seed 7\): 30 humans, 10 bots/);
  assert.equal(await readFile(join(dir, "b.events.jsonl"), "utf8"), events);
});

test("tacit simulate without --start: the traffic ends now, and the seed still fixes everything but the timestamps", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "tacit-sim-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const args = (name: string): string[] => ["simulate", "--seed", "7", "--users", "40", "--duration", "10m", "--out", join(dir, `${name}.events.jsonl`), "--truth", join(dir, `${name}.truth.jsonl`), "--json"];
  type Summary = { lines: number; events: number; first_event_time: string; last_event_time: string };
  const before = Date.now();
  const a = await cli(args("a"));
  const after = Date.now();
  assert.equal(a.code, undefined, a.err);
  const sa = JSON.parse(a.out) as Summary;
  const last = Date.parse(sa.last_event_time);
  assert.ok(last >= before && last <= after, `last event ${sa.last_event_time} is not the moment simulate ran`);
  assert.ok(last - Date.parse(sa.first_event_time) < 3_600_000, `${sa.first_event_time} → ${sa.last_event_time}`);
  const b = await cli(args("b"));
  const sb = JSON.parse(b.out) as Summary;
  const { first_event_time: fa, last_event_time: la, ...restA } = sa;
  const { first_event_time: fb, last_event_time: lb, ...restB } = sb;
  assert.deepEqual({ ...restB, out: "", truth: "" }, { ...restA, out: "", truth: "" });
  assert.equal(Date.parse(lb) - Date.parse(la), Date.parse(fb) - Date.parse(fa));
  const ids = async (name: string) => (await readFile(join(dir, `${name}.events.jsonl`), "utf8")).match(/"event_id":"[^"]+"/g);
  assert.deepEqual(await ids("b"), await ids("a"));
});

test("tacit simulate: bad usage exits 2 with a message naming the flag", async () => {
  for (const [args, flag] of [
    [["simulate", "--users", "0", "--out", "x", "--truth", "y"], "--users"],
    [["simulate", "--duration", "soon", "--out", "x", "--truth", "y"], "--duration"],
    [["simulate", "--bots", "2", "--out", "x", "--truth", "y"], "--bots"],
    [["simulate", "--truth", "y"], "--out"],
  ] as const) {
    const r = await cli([...args]);
    assert.equal(r.code, 2, args.join(" "));
    assert.match(r.err, new RegExp(flag));
  }
});

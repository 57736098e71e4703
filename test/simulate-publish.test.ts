// The new user's path on real nats-server and redis-server: `tacit simulate` with its defaults,
// `tacit publish` of that file to the default pipeline, a worker. No well-formed event may be
// dead-lettered (above all not as bad_timestamp for being older than max_past_age, issue 10);
// only the simulator's deliberately malformed lines go to the DLQ. The worker runs only the
// enrich group: that is where timestamps are judged, and it keeps the test short.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findOperator } from "../operators/index.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { readDeadLetters } from "../src/runtime/dlq.js";
import { connectNats } from "../src/runtime/nats.js";
import { stageGroups } from "../src/config/topology.js";
import { parseTruth } from "../src/sim/truth.js";
import { withServers } from "./harness.js";
import { consumersDrained, eventually } from "./support/streams.js";
import { spawnTacit, type TacitProcess } from "./support/tacit-process.js";

const PIPELINE = join(projectRoot(), "pipelines", "feedback.yaml");
const KEY = "t1:simulate-publish-test-secret-0123";

async function finished(p: TacitProcess): Promise<{ code: number | null; out: string; err: string }> {
  const code = await p.exited();
  return { code, out: p.stdout(), err: p.stderr() };
}

test("tacit simulate (defaults) → tacit publish → worker: no well-formed event is dead-lettered, none for its age", { timeout: 120_000 }, (t) =>
  withServers(t, async (servers) => {
    const dir = mkdtempSync(join(tmpdir(), "tacit-simpub-"));
    const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY, TACIT_HOME: join(dir, "home"), TACIT_LOG_LEVEL: "warn" };
    const events = join(dir, "events.jsonl");
    const truthFile = join(dir, "truth.jsonl");

    const sim = await finished(spawnTacit(["simulate", "--out", events, "--truth", truthFile], env));
    assert.equal(sim.code, 0, sim.err);
    const deploy = await finished(spawnTacit(["deploy", PIPELINE], env));
    assert.equal(deploy.code, 0, deploy.err);
    const pub = await finished(spawnTacit(["publish", PIPELINE, "--input", events], env));
    assert.equal(pub.code, 0, pub.err);
    assert.doesNotMatch(pub.err, /warning/, "publish warns about a fresh simulated file");

    // As published: each line trimmed (a malformed line cut short may end in a space).
    const lines = readFileSync(events, "utf8").trimEnd().split("\n");
    const malformed = new Set(parseTruth(readFileSync(truthFile, "utf8")).flatMap((r) => (r.kind === "noise" && r.noise === "malformed" ? [lines[r.line - 1]!.trim()] : [])));
    assert.ok(malformed.size > 0, "the simulator emits some malformed lines");

    const p: Pipeline = loadPipelineOrThrow(PIPELINE, { env, operators: findOperator });
    const worker = spawnTacit(["run", PIPELINE, "--stage", "enrich", "--metrics-port", "0"], env);
    t.after(() => void (worker.running() && worker.child.kill("SIGKILL")));
    const nats = await connectNats(p, "simulate-publish-test");
    try {
      const input = stageGroups(p, findOperator)[0]!.inputStream;
      let streak = 0;
      await eventually(
        "enrich to drain its input",
        async () => {
          if (!worker.running()) throw new Error(`the worker exited: ${worker.stderr()}`);
          streak = (await consumersDrained(nats, [input])) ? streak + 1 : 0;
          return streak >= 2;
        },
        90_000,
        200,
      );
      worker.child.kill("SIGTERM");
      assert.equal(await worker.exited(), 0, worker.stderr());

      const letters = await readDeadLetters(p, nats);
      const dec = new TextDecoder();
      const wellFormed = letters.filter((l) => !malformed.has(dec.decode(l.data)));
      assert.deepEqual(
        wellFormed.map((l) => `${l.reason}: ${l.message}`),
        [],
        "well-formed simulated events were dead-lettered",
      );
      // Too old for max_past_age: only the simulator's deliberately bad 1970 timestamps.
      for (const l of letters.filter((x) => /older than the stream time/.test(x.message))) assert.match(l.message, /^timestamp 1970-01-01T00:00:00Z /);
      assert.ok(letters.length > 0 && letters.length <= malformed.size, `${letters.length} dead letters for ${malformed.size} malformed lines`);
    } finally {
      await nats.nc.drain();
    }
  }),
);

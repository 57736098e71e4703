// `tacit bench` end to end, small: it starts its own nats-server and redis-server (no URLs
// given), pushes the events through the relay and the default pipeline, and reports each phase's
// figures, the servers' CPU among them. The targets themselves are the bench's to show, never a
// test's (SPEC §9): this only checks that the command measures what it says.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { WORKER_NODE_FLAGS } from "../src/config/paths.js";
import { spawnTacit } from "./support/tacit-process.js";

/** Ten events per user, as in the default bench: below bot-score's regularity.min_events, so none is flagged and held back. */
const EVENTS = 2000;

/** Runs `tacit bench` on its own servers (no URLs given) and returns its JSON. */
async function bench(t: { after(fn: () => void): void }, args: string[], nodeFlags?: string[]): Promise<BenchJson> {
  const p = spawnTacit(
    ["bench", "--events", String(EVENTS), "--users", "200", "--latency-events", "40", "--json", "--no-profile", ...args],
    {
      NATS_URL: "",
      REDIS_URL: "",
      TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")),
      TACIT_LOG_LEVEL: "warn",
    },
    nodeFlags,
  );
  t.after(() => {
    if (p.running()) p.child.kill("SIGKILL");
  });
  assert.equal(await p.exited(), 0, p.stderr());
  return JSON.parse(p.stdout()) as BenchJson;
}

interface BenchJson {
  warmup_events: number;
  machine: { node_flags: string[] };
  relay: { events: number; servers_cpu_us_per_event?: { nats: number; redis: number } };
  pipeline: { events: number; stages: string[]; outputs: number; dlq: number; latency: { events: number }; servers_cpu_us_per_event?: { nats: number; redis: number } };
  ratio: number;
}

test("tacit bench on its own servers: the timed window after the warm-up, its events and outputs only, the servers' CPU per event reported", { timeout: 180_000 }, async (t) => {
  const r = await bench(t, ["--warmup-events", "700"]);
  assert.equal(r.warmup_events, 700);
  assert.deepEqual(r.pipeline.stages, ["enrich", "dedupe", "bot-score", "sessionize", "reformulation", "label-derive"]);
  // The same relay and worker go on from the warm-up to the timed events; a window starts at the
  // first check past the relay's 700 warm-up outputs, or once the pipeline's timed events are
  // loaded, so it times the run's last events, a batch or two fewer than 2,000 at most, and
  // reports those events' outputs only.
  for (const events of [r.relay.events, r.pipeline.events]) assert.ok(events > EVENTS - 2 * 500 && events <= EVENTS, JSON.stringify({ relay: r.relay.events, pipeline: r.pipeline.events }));
  assert.equal(r.pipeline.outputs, r.pipeline.events);
  assert.equal(r.pipeline.dlq, 0);
  assert.equal(r.pipeline.latency.events, 40);
  assert.ok(r.ratio > 0);
  // JetStream works in both phases; only the pipeline keeps state in Redis.
  const relay = r.relay.servers_cpu_us_per_event;
  const pipe = r.pipeline.servers_cpu_us_per_event;
  assert.ok(relay && pipe, "servers_cpu_us_per_event missing");
  assert.ok(relay.nats > 0 && pipe.nats > 0, JSON.stringify({ relay, pipe }));
  assert.ok(pipe.redis > 0, JSON.stringify(pipe));
});

test("tacit bench --stages 2, cold, started by plain `node`: the first two stages only, in a process relaunched with the worker's flags", { timeout: 180_000 }, async (t) => {
  const r = await bench(t, ["--stages", "2", "--warmup-events", "0"], []);
  assert.equal(r.warmup_events, 0);
  assert.deepEqual(r.machine.node_flags, [...WORKER_NODE_FLAGS]);
  assert.deepEqual(r.pipeline.stages, ["enrich", "dedupe"]);
  // Cold: timed from the start, every event.
  assert.equal(r.relay.events, EVENTS);
  assert.equal(r.pipeline.events, EVENTS);
  assert.equal(r.pipeline.outputs, EVENTS);
  assert.equal(r.pipeline.dlq, 0);
});

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
import { CPU_CATEGORIES, type BenchResult } from "../src/bench/bench.js";

/** Ten events per user, as in the default bench: below bot-score's regularity.min_events, so none is flagged and held back. */
const EVENTS = 2000;

/** Runs `tacit bench` on its own servers (no URLs given) and returns its JSON. */
async function bench(t: { after(fn: () => void): void }, args: string[], nodeFlags?: string[]): Promise<BenchResult> {
  const p = spawnTacit(
    ["bench", "--events", String(EVENTS), "--users", "200", "--latency-events", "40", "--json", ...args],
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
  return JSON.parse(p.stdout()) as BenchResult;
}

test("tacit bench on its own servers: the timed window after the warm-up, its events and outputs only, timed to the last output and to drained, the servers' CPU per event reported, then a profiled window", { timeout: 180_000 }, async (t) => {
  const r = await bench(t, ["--warmup-events", "700"]);
  assert.equal(r.warmup_events, 700);
  assert.deepEqual(r.pipeline.stages, ["enrich", "dedupe", "bot-score", "sessionize", "reformulation", "label-derive"]);
  // The same relay and worker go on from the warm-up to the timed events; a window starts at the
  // batch that completes the relay's 700 warm-up outputs, or once the pipeline's timed events are
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
  // Read from each server thread's schedstat (ns), not /proc's 10 ms ticks: a relay window of two
  // ticks (2,000 events at 100,000 events/s) read none of nats-server's CPU once.
  assert.ok(relay.nats > 0 && pipe.nats > 0, JSON.stringify({ relay, pipe, seconds: r.relay.seconds }));
  assert.ok(pipe.redis > 0, JSON.stringify(pipe));
  // The rate runs to the last output, the CPU on to the last input settled (the pipeline's last
  // commit comes once its input pauses).
  for (const w of [r.relay, r.pipeline]) {
    assert.ok(w.seconds > 0 && w.seconds <= w.drained_seconds, JSON.stringify(w));
    assert.equal(w.events_per_s, w.events / w.seconds);
  }
  // The worker's CPU by thread (each thread's schedstat, ns): the main thread, enrich's own thread
  // (runtime.threads auto on a machine of more than one core), V8's and libuv's helpers; together
  // the process's CPU (a thread that ended in the window would be missing from the sum: none of
  // these ends). And the cores each side used up to the last output, the machine's at most its cores.
  const threads = r.pipeline.threads_cpu_us_per_event;
  assert.ok(threads, "threads_cpu_us_per_event missing (Linux)");
  assert.deepEqual(Object.keys(threads), r.machine.cpus > 1 ? ["main", "thread enrich", "helpers"] : ["main", "helpers"]);
  assert.ok(Object.values(threads).every((v) => Number.isFinite(v) && v >= 0) && threads.main! > 0, JSON.stringify(threads));
  const threadSum = Object.values(threads).reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(threadSum - r.pipeline.in_process_cpu_us_per_event) <= 0.02 * r.pipeline.in_process_cpu_us_per_event, JSON.stringify({ threads, in_process: r.pipeline.in_process_cpu_us_per_event }));
  const cores = r.pipeline.cores_to_last_output;
  assert.ok(cores && cores.workers > 0 && cores.nats! > 0 && cores.redis! >= 0, JSON.stringify(cores));
  assert.ok(cores.machine! > 0 && cores.machine! <= r.machine.cpus + 0.5, JSON.stringify(cores));
  // The main thread's time on a core and waiting for one: shares of the same window (the kernel's
  // schedstat); and the share it was paused for garbage collection (a window of 2,000 events may
  // hold no scavenge).
  const main = cores.main_thread;
  assert.ok(main && main.running > 0 && main.waiting_for_a_core >= 0 && main.running + main.waiting_for_a_core <= 1.05, JSON.stringify(main));
  assert.ok(main.gc_pauses !== undefined && main.gc_pauses >= 0 && main.gc_pauses <= 1.05, JSON.stringify(main));
  // The per-stage shares come from a window of their own after the timed one: as many events
  // again (a batch or two fewer timed, as above), with the profiler on.
  const prof = r.pipeline.profiled;
  assert.ok(prof && prof.events > EVENTS - 2 * 500 && prof.events <= EVENTS && prof.cpu_us_per_event > 0, JSON.stringify(prof));
  const share = r.pipeline.cpu_share ?? {};
  // Shares are counts of 1 ms samples: this window of 2,000 events gives 130–300 of them on the
  // 2-core machine, so a stage of 1–3 % can get none (and is left out); the two heaviest always get some.
  for (const k of Object.keys(share)) assert.ok(r.pipeline.stages.includes(k) || (CPU_CATEGORIES as readonly string[]).includes(k), `unknown share ${k}`);
  for (const stage of ["enrich", "label-derive"]) assert.ok((share[stage] ?? 0) > 0, `no share for ${stage}: ${JSON.stringify(share)}`);
  const sum = Object.values(share).reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(sum - 1) < 1e-9, String(sum));
});

test("tacit bench --stages 2, cold, started by plain `node`: the first two stages only, in a process relaunched with the worker's flags", { timeout: 180_000 }, async (t) => {
  const r = await bench(t, ["--stages", "2", "--warmup-events", "0", "--no-profile"], []);
  assert.equal(r.warmup_events, 0);
  assert.deepEqual(r.machine.node_flags, [...WORKER_NODE_FLAGS]);
  assert.deepEqual(r.pipeline.stages, ["enrich", "dedupe"]);
  // Cold: timed from the start, every event.
  assert.equal(r.relay.events, EVENTS);
  assert.equal(r.pipeline.events, EVENTS);
  assert.equal(r.pipeline.outputs, EVENTS);
  assert.equal(r.pipeline.dlq, 0);
  assert.equal(r.pipeline.profiled, undefined);
});

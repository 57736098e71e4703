import { AckPolicy, DeliverPolicy, RetentionPolicy, StorageType, type JsMsg } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import type { Logger, OperatorSpec } from "../core/operator.js";
import { percentile } from "../telemetry/metrics.js";
import { applyDeploy, planDeploy } from "../runtime/deploy.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { publisherFor } from "../runtime/jspub.js";
import { publishLines } from "../runtime/publisher.js";
import { durableName, stageGroups, streamName } from "../config/topology.js";
import { Worker } from "../runtime/worker.js";
import { openPipelineRedis } from "../state/redis.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface BenchOptions {
  events: number;
  users: number;
  /** Events published at a steady rate for the latency phase. */
  latencyEvents: number;
  latencyRate: number;
  log: Logger;
  env: Readonly<Record<string, string | undefined>>;
}

export interface RateResult {
  events: number;
  seconds: number;
  events_per_s: number;
  /**
   * CPU time of this process (user + system) per event over the timed phase: what the work costs
   * the worker, which a busy machine changes far less than it changes the rate. The servers'
   * CPU is not included.
   */
  cpu_us_per_event: number;
}

export interface LatencyResult {
  events: number;
  rate_per_s: number;
  p50_ms: number;
  p99_ms: number;
}

export interface BenchResult {
  events: number;
  relay: RateResult & { latency: LatencyResult };
  pipeline: RateResult & { latency: LatencyResult; stages: string[]; outputs: number; dlq: number; dropped: number };
  /** pipeline events/s ÷ relay events/s, measured in the same run. */
  ratio: number;
  machine: { cpus: number; node: string };
}

const TYPES = ["query", "response_shown", "click", "dwell", "copy_paste", "accept", "edit", "regenerate"] as const;

/**
 * Deterministic synthetic events for throughput runs: sessions of query → shown → interaction,
 * spread over `users` users, one second of event time apart per user. Not realistic traffic
 * (that is `tacit simulate`), just valid events with per-user order.
 */
export function* benchEvents(n: number, users: number, t0: number, stamp?: () => number): Generator<string> {
  for (let i = 0; i < n; i++) {
    const u = i % users;
    const k = Math.floor(i / users);
    const type = TYPES[k % TYPES.length]!;
    const ts = stamp ? stamp() : t0 + k * 1000;
    const q = `q${u}-${Math.floor(k / TYPES.length)}`;
    const payload: Record<string, unknown> =
      type === "query" ? { text: `how to tune nats consumers ${k % 7}` }
      : type === "response_shown" ? { position: 1, text_length: 400 }
      : type === "click" ? { position: 1 }
      // Ended 2 s after the response was shown (a dwell's timestamp is its end): no longer than that.
      : type === "dwell" ? { dwell_ms: 1_500 }
      : type === "copy_paste" ? { span_start: 0, span_end: 40, span_length: 40 }
      : type === "edit" ? { edit_distance: 12, original_length: 400 }
      : {};
    const ev: Record<string, unknown> = {
      event_id: `b${i}`,
      session_id: `s${u}`,
      user_id: `user-${u}`,
      timestamp: new Date(ts).toISOString(),
      query_id: q,
      event_type: type,
      payload,
    };
    if (type !== "query") ev.response_id = `${q}-r1`;
    yield JSON.stringify(ev);
  }
}

function cpuMicros(since: NodeJS.CpuUsage): number {
  const d = process.cpuUsage(since);
  return d.user + d.system;
}

async function waitUntil(pred: () => Promise<boolean>, timeoutMs: number, everyMs = 50): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error("bench timed out waiting for the pipeline to drain");
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function ensureStream(nats: NatsHandles, name: string, subjects: string[]): Promise<void> {
  await nats.jsm.streams.delete(name).catch(() => undefined);
  await nats.jsm.streams.add({ name, subjects, retention: RetentionPolicy.Limits, storage: StorageType.File, duplicate_window: 120_000_000_000 });
}

/**
 * The do-nothing relay: consume → publish → ack, written with the runtime's batching and publisher
 * (micro-batches from `consume`, all publishes of a batch in flight at once, then the acks). The
 * yardstick for the pipeline.
 */
async function relay(nats: NatsHandles, inStream: string, outSubject: string, batch: number, signal: { stop: boolean }): Promise<void> {
  await nats.jsm.consumers.add(inStream, { durable_name: "relay", ack_policy: AckPolicy.Explicit, deliver_policy: DeliverPolicy.All, max_ack_pending: batch * 4, ack_wait: 30_000_000_000 });
  const c = await nats.js.consumers.get(inStream, "relay");
  let buffer: JsMsg[] = [];
  let wake: (() => void) | undefined;
  const msgs = await c.consume({ max_messages: batch * 2, expires: 5000, callback: (m) => { buffer.push(m); wake?.(); } });
  while (!signal.stop) {
    if (buffer.length === 0) {
      await new Promise<void>((r) => { wake = r; setTimeout(r, 100); });
      continue;
    }
    const take = buffer.splice(0, batch);
    const pub = publisherFor(nats.nc);
    await Promise.all(take.map((m) => pub.publish(outSubject, m.data, { msgID: `relay:${m.seq}` })));
    for (const m of take) m.ack();
  }
  await msgs.close();
  buffer = [];
}

async function streamMessages(nats: NatsHandles, name: string): Promise<number> {
  try {
    return (await nats.jsm.streams.info(name)).state.messages;
  } catch {
    return 0;
  }
}

/** Reads a stream's new messages and records now − event time for each (latency phase). */
async function latencyProbe(nats: NatsHandles, stream: string, tsOf: (data: Uint8Array) => number | undefined, expected: number, timeoutMs: number): Promise<number[]> {
  const name = `lat_${Date.now().toString(36)}`;
  await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.New, inactive_threshold: 30_000_000_000 });
  const c = await nats.js.consumers.get(stream, name);
  const out: number[] = [];
  const end = Date.now() + timeoutMs;
  const msgs = await c.consume({ max_messages: 1000, expires: 1000 });
  const done = (async () => {
    for await (const m of msgs) {
      const ts = tsOf(m.data);
      if (ts !== undefined) out.push(Date.now() - ts);
      if (out.length >= expected || Date.now() > end) break;
    }
  })();
  await Promise.race([done, new Promise((r) => setTimeout(r, timeoutMs))]);
  await msgs.close().catch(() => undefined);
  return out;
}

/** Publishes events at a steady rate with event time = publish time. */
async function pacedPublish(pipeline: Pipeline, nats: NatsHandles, n: number, rate: number, users: number, subject?: string): Promise<void> {
  const lines = [...benchEvents(n, users, 0, () => Date.now())];
  const perTick = Math.max(1, Math.round(rate / 100));
  let i = 0;
  while (i < lines.length) {
    const t = Date.now();
    const chunk = lines.slice(i, i + perTick).map((l) => {
      // Re-stamp at send time so latency starts when the event is published.
      const ev = JSON.parse(l) as Record<string, unknown>;
      ev.timestamp = new Date().toISOString();
      ev.event_id = `lat-${ev.event_id as string}`;
      return JSON.stringify(ev);
    });
    if (subject) await Promise.all(chunk.map((l, j) => nats.js.publish(subject, encoder.encode(l), { msgID: `lat:${i + j}` })));
    else await publishLines(pipeline, nats.js, chunk, { idPrefix: `lat-${i}` });
    i += chunk.length;
    const wait = 10 - (Date.now() - t);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}

const tsOfEnvelope = (d: Uint8Array): number | undefined => {
  try {
    const v = JSON.parse(decoder.decode(d)) as { event?: { ts?: number }; timestamp?: string };
    return v.event?.ts ?? (v.timestamp ? Date.parse(v.timestamp) : undefined);
  } catch {
    return undefined;
  }
};

/**
 * Runs the benchmark: N pre-loaded events through the do-nothing relay, then through the deployed
 * pipeline (one in-process worker), each timed from start to fully drained; then a latency phase
 * at a steady rate for both. Both run against the same servers in the same process.
 */
export async function runBench(pipeline: Pipeline, operators: (n: string) => OperatorSpec<any> | undefined, opts: BenchOptions): Promise<BenchResult> {
  const nats = await connectNats(pipeline, "tacit-bench");
  const redis = openPipelineRedis(pipeline);
  try {
    // Event time ends about now, so enrich's max_past_age accepts every event.
    const t0 = Date.now() - Math.ceil(opts.events / opts.users) * 1000 - 60_000;
    const lines = [...benchEvents(opts.events, opts.users, t0)];
    const batch = pipeline.runtime.batch_size;

    // --- relay -----------------------------------------------------------------------------
    const rin = `${pipeline.name}_relay_in`;
    const rout = `${pipeline.name}_relay_out`;
    await ensureStream(nats, rin, [`${pipeline.subject_prefix}.relay.in`]);
    await ensureStream(nats, rout, [`${pipeline.subject_prefix}.relay.out`]);
    await publishRaw(nats, `${pipeline.subject_prefix}.relay.in`, lines);
    const sig = { stop: false };
    const cpu0 = process.cpuUsage();
    const start = performance.now();
    const relayDone = relay(nats, rin, `${pipeline.subject_prefix}.relay.out`, batch, sig);
    await waitUntil(async () => (await streamMessages(nats, rout)) >= opts.events, 600_000);
    const relaySecs = (performance.now() - start) / 1000;
    const relayCpu = cpuMicros(cpu0);
    const relayLat = latencyProbe(nats, rout, tsOfEnvelope, opts.latencyEvents, 60_000);
    await pacedPublish(pipeline, nats, opts.latencyEvents, opts.latencyRate, opts.users, `${pipeline.subject_prefix}.relay.in`);
    const relayLatencies = await relayLat;
    sig.stop = true;
    await relayDone;

    // --- pipeline --------------------------------------------------------------------------
    const plan = await planDeploy(pipeline, nats.jsm, operators);
    await applyDeploy(pipeline, nats.jsm, operators, plan);
    await publishLines(pipeline, nats.js, lines, { idPrefix: "bench" });
    const groups = stageGroups(pipeline, operators);
    const durables = groups.flatMap((g) => (g.keyed ? [...Array(pipeline.partitions).keys()].map((n) => [g.inputStream, durableName(g, n)]) : [[g.inputStream, durableName(g)]]));
    const worker = new Worker({ pipeline, operators, log: opts.log, env: opts.env, devMode: true, redis, nats });
    const pcpu0 = process.cpuUsage();
    const pstart = performance.now();
    await worker.start();
    const first = groups[0]!;
    await waitUntil(async () => {
      const c0 = await nats.jsm.consumers.info(first.inputStream, durableName(first));
      if (c0.ack_floor.stream_seq < opts.events) return false;
      for (const [s, d] of durables) {
        const ci = await nats.jsm.consumers.info(s!, d!);
        if (ci.num_pending > 0 || ci.num_ack_pending > 0) return false;
      }
      return true;
    }, 900_000, 100);
    const pipeSecs = (performance.now() - pstart) / 1000;
    const pipeCpu = cpuMicros(pcpu0);
    const outputs = await streamMessages(nats, streamName(pipeline, "events"));
    const dlq = await streamMessages(nats, streamName(pipeline, "dlq"));
    let dropped = 0;
    for (const c of worker.stageCounters.values()) dropped += c.get("dropped");
    const pipeLat = latencyProbe(nats, streamName(pipeline, "events"), tsOfEnvelope, opts.latencyEvents, 60_000);
    await pacedPublish(pipeline, nats, opts.latencyEvents, opts.latencyRate, opts.users);
    const pipeLatencies = await pipeLat;
    await worker.stop();

    const relayRate = opts.events / relaySecs;
    const pipeRate = opts.events / pipeSecs;
    const { cpus } = await import("node:os");
    return {
      events: opts.events,
      relay: {
        events: opts.events,
        seconds: relaySecs,
        cpu_us_per_event: relayCpu / opts.events,
        events_per_s: relayRate,
        latency: { events: relayLatencies.length, rate_per_s: opts.latencyRate, p50_ms: percentile(relayLatencies, 50), p99_ms: percentile(relayLatencies, 99) },
      },
      pipeline: {
        events: opts.events,
        seconds: pipeSecs,
        cpu_us_per_event: pipeCpu / opts.events,
        events_per_s: pipeRate,
        stages: pipeline.stages.map((s) => s.name),
        outputs,
        dlq,
        dropped,
        latency: { events: pipeLatencies.length, rate_per_s: opts.latencyRate, p50_ms: percentile(pipeLatencies, 50), p99_ms: percentile(pipeLatencies, 99) },
      },
      ratio: pipeRate / relayRate,
      machine: { cpus: cpus().length, node: process.version },
    };
  } finally {
    redis.disconnect();
    await nats.nc.drain().catch(() => undefined);
  }
}

async function publishRaw(nats: NatsHandles, subject: string, lines: string[]): Promise<void> {
  let inflight: Promise<unknown>[] = [];
  for (let i = 0; i < lines.length; i++) {
    inflight.push(nats.js.publish(subject, encoder.encode(lines[i]!), { msgID: `raw:${i}` }));
    if (inflight.length >= 4096) {
      await Promise.all(inflight);
      inflight = [];
    }
  }
  await Promise.all(inflight);
}

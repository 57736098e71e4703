// What a pipeline run ended with, to compare two runs of the same events (keyed-state and
// worker-threads tests): its durables drained, its cleaned events, final labels and features.
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { findOperator } from "../../operators/index.js";
import { stageGroups, streamName } from "../../src/config/topology.js";
import type { Pipeline } from "../../src/config/types.js";
import type { NatsHandles } from "../../src/runtime/nats.js";
import { consumersDrained, readLabelStream, readStream } from "./streams.js";

/** Every input was read by enrich (passed on or dead-lettered) and every durable is drained. */
export async function drained(p: Pipeline, nats: NatsHandles, n: number): Promise<boolean> {
  const streams = stageGroups(p, findOperator).map((g) => g.inputStream);
  const first = await nats.jsm.consumers.info(streams[0]!, "enrich");
  return first.ack_floor.stream_seq >= n && (await consumersDrained(nats, streams));
}

type Snapshot = { events: Record<string, unknown>; labels: string[]; state: Record<string, string> };

/** What a pipeline ended with: cleaned events (by event id), final labels (without emitted_at), and the online features. */
export async function snapshot(p: Pipeline, nats: NatsHandles, redis: Redis): Promise<Snapshot> {
  const events: Record<string, unknown> = {};
  for (const m of await readStream(nats, streamName(p, "events"))) {
    const env = JSON.parse(m.data) as { event: { event_id: string }; src: unknown; partition: unknown };
    events[env.event.event_id] = { ...env, src: undefined };
  }
  const latest: Record<string, { revision: number }> = {};
  for (const m of await readLabelStream(nats, streamName(p, "labels"))) {
    const l = JSON.parse(m.data) as { label_id: string; revision: number };
    if (!latest[l.label_id] || latest[l.label_id]!.revision < l.revision) latest[l.label_id] = l;
  }
  // Label ids hash the pipeline's name, which differs between the two runs; the rest must not.
  const labels = Object.values(latest).map((l) => JSON.stringify({ ...l, label_id: undefined, pipeline: undefined, emitted_at: undefined })).sort();
  const state: Record<string, string> = {};
  const keys = await redis.keys(`tacit:{${p.subject_prefix}:u:*`);
  // Online features (hashes). The keyed state strings hold label ids and stream times, which
  // differ between two pipelines by name; what they decide shows in the outputs and features.
  const types = (await redis.pipeline(keys.map((k) => ["type", k])).exec()) ?? [];
  const hashes = keys.filter((_, i) => {
    const [err, type] = types[i]!;
    if (err) throw err;
    return type === "hash";
  });
  const values = (await redis.pipeline(hashes.map((k) => ["hgetall", k])).exec()) ?? [];
  hashes.forEach((k, i) => {
    const [err, h] = values[i]!;
    if (err) throw err;
    state[k.replace(`{${p.subject_prefix}:`, "{P:")] = JSON.stringify(Object.entries(h as Record<string, string>).sort());
  });
  return { events, labels, state };
}

/**
 * Asserts a run ended as the reference run did (`like`: "one worker", "one thread"), after
 * checking the reference made something: more cleaned events than half the inputs, more than
 * `minLabels` labels, some online features.
 */
export function assertSameResult(got: Snapshot, want: Snapshot, inputs: number, minLabels: number, like: string): void {
  assert.ok(Object.keys(want.events).length > inputs / 2 && want.labels.length > minLabels, "the day makes cleaned events and labels");
  assert.deepEqual(got.events, want.events, `cleaned events (sessions, reformulations, bot scores) as ${like} made them`);
  assert.deepEqual(got.labels, want.labels, `labels as ${like} made them`);
  assert.ok(Object.keys(want.state).length > 0);
  assert.deepEqual(got.state, want.state, `online features as ${like} left them`);
}

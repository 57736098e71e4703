import type { Redis, Cluster } from "ioredis";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import type { Label } from "../core/label.js";
import type { NatsHandles } from "../runtime/nats.js";
import { streamName } from "../config/topology.js";
import { responseFeaturesKey } from "../labels/features.js";
import type { TruthRecord } from "../sim/truth.js";
import type { ResponseFeatures } from "./evaluate.js";
import type { Rated } from "./explicit.js";
import { labelSchemaErrors } from "./inputs.js";

const decoder = new TextDecoder();

/** Every message of a stream, decoded as JSON (skipping what is not), via an ephemeral consumer. */
async function readAll(nats: NatsHandles, stream: string): Promise<unknown[]> {
  let total: number;
  try {
    total = (await nats.jsm.streams.info(stream)).state.messages;
  } catch {
    return [];
  }
  if (total === 0) return [];
  const name = `eval_${Math.random().toString(36).slice(2, 10)}`;
  await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.All, inactive_threshold: 30_000_000_000 });
  const c = await nats.js.consumers.get(stream, name);
  const out: unknown[] = [];
  let seen = 0;
  while (seen < total) {
    let got = 0;
    for await (const m of await c.fetch({ max_messages: 5000, expires: 2000 })) {
      got++;
      seen++;
      try {
        out.push(JSON.parse(decoder.decode(m.data)));
      } catch {
        // not JSON: not a label
      }
    }
    if (got === 0) break;
  }
  await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
  return out;
}

export interface LiveInputs {
  labels: Label[];
  rejectedLabels: number;
  features: Map<string, ResponseFeatures>;
  scoresWithoutBaselines: Map<string, number>;
  botUsers: Set<string>;
}

/**
 * What `evaluate` needs, read from a running pipeline: labels from `<name>_labels`, the users
 * routed to `<name>_bots`, and per-response features from Redis for every response in the truth.
 */
export async function collectLive(p: Pipeline, nats: NatsHandles, redis: Redis | Cluster, truth: readonly TruthRecord[], pseudonymOf: (userId: string) => string): Promise<LiveInputs> {
  const { labels, rejectedLabels } = await readLabels(p, nats);
  const botUsers = new Set<string>();
  for (const v of await readAll(nats, streamName(p, "bots"))) {
    const u = (v as { user?: unknown; event?: { user?: unknown } }).user ?? (v as { event?: { user?: unknown } }).event?.user;
    if (typeof u === "string") botUsers.add(u);
  }
  const responses = truth.filter((t): t is Extract<TruthRecord, { kind: "response" }> => t.kind === "response");
  const features = new Map<string, ResponseFeatures>();
  const scoresWithoutBaselines = new Map<string, number>();
  const BATCH = 500;
  for (let i = 0; i < responses.length; i += BATCH) {
    const chunk = responses.slice(i, i + BATCH);
    const pipe = redis.pipeline();
    for (const r of chunk) pipe.hgetall(responseFeaturesKey(p.subject_prefix, pseudonymOf(r.user_id), r.response_id));
    const res = (await pipe.exec()) ?? [];
    res.forEach(([err, h], j) => {
      const f = h as Record<string, string> | null;
      if (err || !f || Object.keys(f).length === 0) return;
      const id = chunk[j]!.response_id;
      features.set(id, { pos_weight: Number(f.pos_weight ?? 0), neg_weight: Number(f.neg_weight ?? 0), signal_count: Number(f.signal_count ?? 0) });
      scoresWithoutBaselines.set(id, Number(f.pos_weight_nobase ?? 0) - Number(f.neg_weight_nobase ?? 0));
    });
  }
  return { labels, rejectedLabels, features, scoresWithoutBaselines, botUsers };
}

/** Labels from `<name>_labels` (those matching label.v1.json) and how many did not match. */
async function readLabels(p: Pipeline, nats: NatsHandles): Promise<{ labels: Label[]; rejectedLabels: number }> {
  const labels: Label[] = [];
  let rejectedLabels = 0;
  for (const v of await readAll(nats, streamName(p, "labels"))) {
    if (labelSchemaErrors(v) === null) labels.push(v as Label);
    else rejectedLabels++;
  }
  return { labels, rejectedLabels };
}

/**
 * What `evaluate --explicit` needs from a running pipeline, no truth involved: the labels, and for
 * every labelled response the explicit ratings label-derive counted in its features
 * (explicit_up / explicit_down in Redis).
 */
export async function collectLiveExplicit(p: Pipeline, nats: NatsHandles, redis: Redis | Cluster): Promise<{ labels: Label[]; rejectedLabels: number; ratings: Map<string, Rated> }> {
  const { labels, rejectedLabels } = await readLabels(p, nats);
  const targets = new Map<string, string>();
  for (const l of labels) if (l.kind === "response" && l.response_id !== undefined) targets.set(l.response_id, l.user);
  const ids = [...targets.keys()];
  const ratings = new Map<string, Rated>();
  const BATCH = 500;
  for (let i = 0; i < ids.length; i += BATCH) {
    const chunk = ids.slice(i, i + BATCH);
    const pipe = redis.pipeline();
    for (const id of chunk) pipe.hmget(responseFeaturesKey(p.subject_prefix, targets.get(id)!, id), "explicit_up", "explicit_down");
    const res = (await pipe.exec()) ?? [];
    res.forEach(([err, v], j) => {
      const [up, down] = (v as (string | null)[] | null) ?? [];
      const r = { up: Number(up ?? 0), down: Number(down ?? 0) };
      if (!err && r.up + r.down > 0) ratings.set(chunk[j]!, r);
    });
  }
  return { labels, rejectedLabels, ratings };
}

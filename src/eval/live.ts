import type { Redis, Cluster } from "ioredis";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import type { Label } from "../core/label.js";
import type { NatsHandles } from "../runtime/nats.js";
import { streamName } from "../config/topology.js";
import { responseFeaturesKey } from "../labels/features.js";
import type { TruthRecord } from "../sim/truth.js";
import type { ResponseFeatures } from "./evaluate.js";
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
  const labels: Label[] = [];
  let rejectedLabels = 0;
  for (const v of await readAll(nats, streamName(p, "labels"))) {
    if (labelSchemaErrors(v) === null) labels.push(v as Label);
    else rejectedLabels++;
  }
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

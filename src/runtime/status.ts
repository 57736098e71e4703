import type { JetStreamManager } from "@nats-io/jetstream";
import type { Redis, Cluster } from "ioredis";
import type { Pipeline } from "../config/types.js";
import type { OperatorSpec } from "../core/operator.js";
import { partitionKey } from "../core/state.js";
import { durableName, stageGroups, streamName, SIDE_OUTPUTS } from "../config/topology.js";

export interface PartitionStatus {
  partition: number;
  pending: number;
  ack_pending: number;
  redelivered: number;
  delivered_seq: number;
  ack_floor_seq: number;
  watermark?: string;
  /** How far the watermark is behind the wall clock (ms): the stage's event-time lag. */
  watermark_lag_ms?: number;
  idle?: boolean;
}

export interface StageStatus {
  group: string;
  stages: string[];
  keyed: boolean;
  input_stream: string;
  pending: number;
  ack_pending: number;
  redelivered: number;
  /** Stage watermark: the minimum over non-idle partitions (keyed groups). */
  watermark?: string;
  partitions: PartitionStatus[];
  dlq: Record<string, number>;
}

export interface PipelineStatus {
  pipeline: string;
  stages: StageStatus[];
  outputs: Record<string, number>;
}

async function streamCount(jsm: JetStreamManager, name: string): Promise<number> {
  try {
    return (await jsm.streams.info(name)).state.messages;
  } catch {
    return 0;
  }
}

/** Per stage: pending, ack-pending, redeliveries, watermark and its lag, DLQ counts; plus output totals. */
export async function pipelineStatus(p: Pipeline, jsm: JetStreamManager, redis: Redis | Cluster | undefined, operators: (n: string) => OperatorSpec<any> | undefined, now = Date.now()): Promise<PipelineStatus> {
  const groups = stageGroups(p, operators);
  let dlqBySubject: Record<string, number> = {};
  try {
    const info = await jsm.streams.info(streamName(p, "dlq"), { subjects_filter: `${p.subject_prefix}.dlq.>` });
    dlqBySubject = info.state.subjects ?? {};
  } catch {
    // not deployed yet
  }
  const stages: StageStatus[] = [];
  for (const g of groups) {
    const parts: PartitionStatus[] = [];
    const durables = g.keyed ? [...Array(p.partitions).keys()].map((n) => ({ n, d: durableName(g, n) })) : [{ n: 0, d: durableName(g) }];
    for (const { n, d } of durables) {
      try {
        const ci = await jsm.consumers.info(g.inputStream, d);
        const ps: PartitionStatus = {
          partition: n,
          pending: ci.num_pending,
          ack_pending: ci.num_ack_pending,
          redelivered: ci.num_redelivered,
          delivered_seq: ci.delivered.stream_seq,
          ack_floor_seq: ci.ack_floor.stream_seq,
        };
        if (g.keyed && redis) {
          const h = await redis.hgetall(partitionKey(p.subject_prefix, g.name, n, "wm"));
          if (h.wm) {
            ps.watermark = new Date(Number(h.wm)).toISOString();
            ps.watermark_lag_ms = now - Number(h.wm);
            ps.idle = now - Number(h.last_input_at ?? 0) >= p.event_time.idle_timeout_ms;
          }
        }
        parts.push(ps);
      } catch {
        parts.push({ partition: n, pending: 0, ack_pending: 0, redelivered: 0, delivered_seq: 0, ack_floor_seq: 0 });
      }
    }
    const active = parts.filter((x) => x.watermark && !x.idle);
    const wms = (active.length ? active : parts.filter((x) => x.watermark)).map((x) => Date.parse(x.watermark!));
    const dlq: Record<string, number> = {};
    for (const s of g.stages) dlq[s.name] = dlqBySubject[`${p.subject_prefix}.dlq.${s.name}`] ?? 0;
    stages.push({
      group: g.name,
      stages: g.stages.map((s) => s.name),
      keyed: g.keyed,
      input_stream: g.inputStream,
      pending: parts.reduce((a, x) => a + x.pending, 0),
      ack_pending: parts.reduce((a, x) => a + x.ack_pending, 0),
      redelivered: parts.reduce((a, x) => a + x.redelivered, 0),
      watermark: wms.length ? new Date(Math.min(...wms)).toISOString() : undefined,
      partitions: parts,
      dlq,
    });
  }
  const outputs: Record<string, number> = {};
  for (const o of ["events", "labels", "dlq", ...SIDE_OUTPUTS]) outputs[o] = await streamCount(jsm, streamName(p, o));
  return { pipeline: p.name, stages, outputs };
}

/** A fixed-width table of a status, for terminals and logs. */
export function formatStatus(s: PipelineStatus): string {
  const rows = [["stage", "pending", "ack-pend", "redeliv", "dlq", "watermark"]];
  for (const st of s.stages) {
    rows.push([
      st.stages.join("+"),
      String(st.pending),
      String(st.ack_pending),
      String(st.redelivered),
      String(Object.values(st.dlq).reduce((a, b) => a + b, 0)),
      st.watermark ?? "-",
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  "));
  lines.push("outputs: " + Object.entries(s.outputs).map(([k, v]) => `${k}=${v}`).join("  "));
  return lines.join("\n");
}

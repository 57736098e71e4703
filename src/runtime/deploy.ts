import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  ReplayPolicy,
  RetentionPolicy,
  StorageType,
  type ConsumerConfig,
  type JetStreamManager,
  type StreamConfig,
} from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import type { OperatorSpec } from "../core/operator.js";
import { ConfigError } from "../core/errors.js";
import { durableName, maxAckPending, pipelineStreams, stageGroups, stageSubject, type StageGroup } from "../config/topology.js";

const NS_PER_MS = 1_000_000;

/**
 * A worker of a pipeline that was never deployed would wait for its input streams forever, so a
 * worker started from the CLI checks them first and fails with the command that creates them.
 */
export async function assertDeployed(p: Pipeline, jsm: JetStreamManager, groups: StageGroup[]): Promise<void> {
  const missing: string[] = [];
  for (const g of groups) {
    try {
      await jsm.streams.info(g.inputStream);
    } catch (err) {
      if (!isNotFound(err)) throw err;
      missing.push(g.inputStream);
    }
  }
  if (missing.length > 0) {
    throw new ConfigError(`pipeline "${p.name}" is not deployed: stream ${missing.join(", ")} not found (run: tacit deploy ${p.file ?? "<pipeline.yaml>"})`);
  }
}

export interface FieldChange {
  field: string;
  from: unknown;
  to: unknown;
}

/** One step of a deploy: what exists, what the pipeline wants, and what will be done. */
export interface DeployChange {
  kind: "stream" | "consumer";
  /** Stream name, or `stream/durable` for consumers. */
  name: string;
  action: "create" | "update" | "unchanged" | "conflict";
  changes: FieldChange[];
  /** Why a conflict cannot be applied, and what to do instead. */
  reason?: string;
}

export interface DesiredConsumer {
  stream: string;
  config: Partial<ConsumerConfig> & { durable_name: string };
}

/** The streams the pipeline needs, as JetStream stream configs. */
export function desiredStreams(p: Pipeline, groups: StageGroup[]): Partial<StreamConfig>[] {
  return pipelineStreams(p, groups).map((s) => ({
    name: s.name,
    description: `tacit ${p.name}: ${s.role}`,
    subjects: s.subjects,
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    max_age: p.streams.max_age_ms * NS_PER_MS,
    duplicate_window: p.streams.duplicate_window_ms * NS_PER_MS,
    num_replicas: p.streams.replicas,
    max_bytes: p.streams.max_bytes,
  }));
}

/**
 * The durable pull consumer of a group's input (`partition`: of a keyed group's partition), as
 * `tacit deploy` creates it. A keyed partition whose durable is gone recreates it from this too.
 */
export function consumerConfig(p: Pipeline, g: StageGroup, partition?: number): DesiredConsumer["config"] {
  return {
    durable_name: durableName(g, partition),
    description: `tacit ${p.name}: input of ${g.name}${partition === undefined ? "" : `, partition ${partition}`}`,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    replay_policy: ReplayPolicy.Instant,
    ack_wait: p.runtime.ack_wait_ms * NS_PER_MS,
    // Retries are counted by the runtime, which dead-letters; the server must never give up silently.
    max_deliver: -1,
    max_ack_pending: maxAckPending(p.runtime),
    ...(partition === undefined ? {} : { filter_subject: stageSubject(p, g.name, partition) }),
  };
}

/** The durable pull consumers: one per unkeyed group, one per partition of a keyed group. */
export function desiredConsumers(p: Pipeline, groups: StageGroup[]): DesiredConsumer[] {
  const out: DesiredConsumer[] = [];
  for (const g of groups) {
    if (!g.keyed) out.push({ stream: g.inputStream, config: consumerConfig(p, g) });
    else for (let n = 0; n < p.partitions; n++) out.push({ stream: g.inputStream, config: consumerConfig(p, g, n) });
  }
  return out;
}

/** JetStream answered that the consumer does not exist. */
export function isConsumerNotFound(err: unknown): boolean {
  return err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound;
}

/** JetStream answered that the stream or the consumer does not exist. */
export function isNotFound(err: unknown): boolean {
  return isConsumerNotFound(err) || (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound);
}

const STREAM_FIELDS = ["subjects", "max_age", "duplicate_window", "num_replicas", "max_bytes", "description"] as const;
const STREAM_FIXED = ["retention", "storage"] as const;
// Fields a 2.9 server can update on a durable; deliver policy and filter need a new durable.
const CONSUMER_MUTABLE = ["ack_wait", "max_ack_pending", "max_deliver", "description"] as const;
const CONSUMER_FIXED = ["ack_policy", "deliver_policy", "filter_subject", "replay_policy"] as const;

function differs(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) !== JSON.stringify(b ?? null);
}

/** Compares what the server has with what the pipeline wants; changes nothing. */
export async function planDeploy(p: Pipeline, jsm: JetStreamManager, operators: (n: string) => OperatorSpec<any> | undefined): Promise<DeployChange[]> {
  const groups = stageGroups(p, operators);
  const plan: DeployChange[] = [];
  for (const want of desiredStreams(p, groups)) {
    let have: StreamConfig | undefined;
    try {
      have = (await jsm.streams.info(want.name!)).config;
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
    if (!have) {
      plan.push({ kind: "stream", name: want.name!, action: "create", changes: [] });
      continue;
    }
    const fixed = STREAM_FIXED.filter((f) => differs(have![f], want[f])).map((f) => ({ field: f, from: have![f], to: want[f] }));
    const changes = STREAM_FIELDS.filter((f) => differs(have![f], want[f])).map((f) => ({ field: f, from: have![f], to: want[f] }));
    if (fixed.length > 0) {
      plan.push({ kind: "stream", name: want.name!, action: "conflict", changes: fixed, reason: "retention and storage cannot change on an existing stream: delete it (after draining) or rename the pipeline" });
    } else {
      plan.push({ kind: "stream", name: want.name!, action: changes.length ? "update" : "unchanged", changes });
    }
  }
  const wanted = desiredConsumers(p, groups);
  for (const want of wanted) {
    const name = `${want.stream}/${want.config.durable_name}`;
    let have: ConsumerConfig | undefined;
    try {
      have = (await jsm.consumers.info(want.stream, want.config.durable_name)).config;
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
    if (!have) {
      plan.push({ kind: "consumer", name, action: "create", changes: [] });
      continue;
    }
    const fixed = CONSUMER_FIXED.filter((f) => differs(have![f], want.config[f])).map((f) => ({ field: f, from: have![f], to: want.config[f] }));
    const changes = CONSUMER_MUTABLE.filter((f) => differs(have![f], want.config[f])).map((f) => ({ field: f, from: have![f], to: want.config[f] }));
    if (fixed.length > 0 && !(fixed.length === 1 && fixed[0]!.field === "deliver_policy")) {
      plan.push({ kind: "consumer", name, action: "conflict", changes: fixed, reason: "these consumer fields cannot be updated in place: use `tacit replay` (which recreates the durable) or delete the consumer" });
    } else {
      // A replayed durable starts at a sequence (deliver_policy by_start_sequence); that is ours, not drift.
      plan.push({ kind: "consumer", name, action: changes.length ? "update" : "unchanged", changes });
    }
  }
  // Durables of this pipeline that the file no longer wants (e.g. fewer partitions) are a conflict:
  // the partition count is fixed per pipeline.
  const wantedNames = new Set(wanted.map((w) => `${w.stream}/${w.config.durable_name}`));
  for (const g of groups) {
    try {
      for await (const ci of jsm.consumers.list(g.inputStream)) {
        const n = `${g.inputStream}/${ci.name}`;
        if (!wantedNames.has(n) && ci.config.durable_name && !/_g\d+$/.test(ci.name)) {
          plan.push({ kind: "consumer", name: n, action: "conflict", changes: [], reason: "this durable is not in the pipeline any more (was the partition count or a stage name changed?); partitions are fixed per pipeline — delete it by hand if that is intended" });
        }
      }
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }
  return plan;
}

/** Applies a plan (creates and updates); refuses when it has conflicts. Idempotent. */
export async function applyDeploy(p: Pipeline, jsm: JetStreamManager, operators: (n: string) => OperatorSpec<any> | undefined, plan: DeployChange[]): Promise<void> {
  const conflicts = plan.filter((c) => c.action === "conflict");
  if (conflicts.length > 0) {
    throw new ConfigError(`deploy has ${conflicts.length} conflict(s):\n` + conflicts.map((c) => `  ${c.kind} ${c.name}: ${c.reason}`).join("\n"));
  }
  const groups = stageGroups(p, operators);
  const streams = new Map(desiredStreams(p, groups).map((s) => [s.name!, s]));
  const consumers = new Map(desiredConsumers(p, groups).map((c) => [`${c.stream}/${c.config.durable_name}`, c]));
  for (const c of plan) {
    if (c.action === "unchanged") continue;
    if (c.kind === "stream") {
      const cfg = streams.get(c.name)!;
      if (c.action === "create") await jsm.streams.add({ ...cfg, name: c.name });
      else await jsm.streams.update(c.name, cfg);
    } else {
      const want = consumers.get(c.name)!;
      if (c.action === "create") await jsm.consumers.add(want.stream, want.config);
      else {
        const upd: Record<string, unknown> = {};
        for (const ch of c.changes) upd[ch.field] = ch.to;
        await jsm.consumers.update(want.stream, want.config.durable_name, upd);
      }
    }
  }
}

/** Renders a plan for humans: `+ create`, `~ update (field: a → b)`, `! conflict`. */
export function formatPlan(plan: DeployChange[], dryRun: boolean): string {
  const lines: string[] = [];
  const sym = { create: "+", update: "~", unchanged: "=", conflict: "!" } as const;
  for (const c of plan) {
    if (c.action === "unchanged") continue;
    const detail = c.changes.map((ch) => `${ch.field}: ${JSON.stringify(ch.from)} → ${JSON.stringify(ch.to)}`).join(", ");
    lines.push(`${sym[c.action]} ${c.kind} ${c.name}${detail ? `  (${detail})` : ""}${c.reason ? `\n    ${c.reason}` : ""}`);
  }
  const counts = (a: DeployChange["action"]) => plan.filter((c) => c.action === a).length;
  lines.push(
    `${dryRun ? "would create" : "created"} ${counts("create")}, ${dryRun ? "would update" : "updated"} ${counts("update")}, unchanged ${counts("unchanged")}` +
      (counts("conflict") ? `, conflicts ${counts("conflict")}` : ""),
  );
  return lines.join("\n");
}

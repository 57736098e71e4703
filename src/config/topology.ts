import type { Pipeline, Stage } from "../config/types.js";
import type { OperatorSpec, OutputName } from "../core/operator.js";

/**
 * Names of every subject, stream and durable consumer of a pipeline, derived in one place.
 *
 *   <p>.in.<event_type>        producers → first stage            stream <name>_in
 *   <p>.x.<stage>.<partition>  stage → next stage (or group)      stream <name>_x_<stage>
 *   <p>.events.<partition>     the last stage's cleaned events    stream <name>_events
 *   <p>.labels.<kind>          labels for ML teams                stream <name>_labels
 *   <p>.dlq.<stage>            dead letters                       stream <name>_dlq
 *   <p>.late / .bots / .sessions   side outputs                   stream <name>_<output>
 */

/** A run of stages executed in one worker: the first reads a stream, the rest are fused to it. */
export interface StageGroup {
  /** Name of the group's first stage; names its stream and durable consumers. */
  name: string;
  stages: Stage[];
  keyed: boolean;
  /** Stream the group reads, and its subject filter. */
  inputStream: string;
  inputSubjects: string[];
  /** Index of the group in the pipeline. */
  index: number;
}

export const SIDE_OUTPUTS = ["late", "bots", "sessions"] as const;

export function streamName(p: Pipeline, suffix: string): string {
  return `${p.name}_${suffix}`.replace(/[^A-Za-z0-9_-]/g, "_");
}

export function inputSubject(p: Pipeline, eventType = ">"): string {
  return `${p.subject_prefix}.in.${eventType}`;
}

export function stageSubject(p: Pipeline, stage: string, partition: number): string {
  return `${p.subject_prefix}.x.${stage}.${partition}`;
}

export function eventsSubject(p: Pipeline, partition: number): string {
  return `${p.subject_prefix}.events.${partition}`;
}

export function dlqSubject(p: Pipeline, stage: string): string {
  return `${p.subject_prefix}.dlq.${stage}`;
}

/** Subject of an operator output other than `next`. */
export function outputSubject(p: Pipeline, to: Exclude<OutputName, "next">): string {
  return `${p.subject_prefix}.${to}`;
}

type OperatorLookup = (name: string) => OperatorSpec<any> | undefined;

/** Compiled topologies, per pipeline object and operator lookup: a pipeline is compiled once. */
const compiled = new WeakMap<Pipeline, WeakMap<OperatorLookup, readonly StageGroup[]>>();

/**
 * The stage groups of a pipeline, split at every stage not marked `fuse_with_previous`:
 * compiled once per loaded pipeline (deploy, bench, the worker, status and replay all ask for
 * it; they get the same frozen groups). Treat the result as read-only.
 */
export function stageGroups(p: Pipeline, operators: OperatorLookup): StageGroup[] {
  let byOps = compiled.get(p);
  if (!byOps) compiled.set(p, (byOps = new WeakMap()));
  let groups = byOps.get(operators);
  if (!groups) byOps.set(operators, (groups = Object.freeze(compileGroups(p, operators))));
  return groups as StageGroup[];
}

function compileGroups(p: Pipeline, operators: OperatorLookup): StageGroup[] {
  const groups: StageGroup[] = [];
  for (const s of p.stages) {
    const keyed = operators(s.operator)?.keyed ?? false;
    const last = groups[groups.length - 1];
    if (last && s.fuse_with_previous) {
      last.stages.push(s);
      continue;
    }
    const first = groups.length === 0;
    groups.push({
      name: s.name,
      stages: [s],
      keyed,
      inputStream: first ? streamName(p, "in") : streamName(p, `x_${s.name}`),
      inputSubjects: first ? [inputSubject(p)] : [`${p.subject_prefix}.x.${s.name}.*`],
      index: groups.length,
    });
  }
  return groups;
}

/**
 * Unacknowledged messages a durable allows: the runtime's buffer (two batches) plus what a keyed
 * partition may hold uncommitted for `runtime.commit_interval`.
 */
export function maxAckPending(rt: Pipeline["runtime"]): number {
  return Math.max(rt.batch_size * (rt.commit_interval_ms > 0 ? 20 : 4), 1000);
}

/** Durable consumer of a group: one shared for unkeyed groups, one per partition for keyed ones. */
export function durableName(group: StageGroup, partition?: number, generation = 0): string {
  const base = partition === undefined ? group.name : `${group.name}_p${partition}`;
  return generation > 0 ? `${base}_g${generation}` : base;
}

/** Where the group's `next` emits go: the next group's input, or the events stream at the end. */
export function nextSubject(p: Pipeline, groups: StageGroup[], group: StageGroup, partition: number): string {
  const following = groups[group.index + 1];
  return following ? stageSubject(p, following.name, partition) : eventsSubject(p, partition);
}

/** Every stream of the pipeline with its subjects. */
export function pipelineStreams(p: Pipeline, groups: StageGroup[]): { name: string; subjects: string[]; role: string }[] {
  const out = groups.map((g) => ({ name: g.inputStream, subjects: g.inputSubjects, role: `input of ${g.name}` }));
  out.push({ name: streamName(p, "events"), subjects: [`${p.subject_prefix}.events.*`], role: "cleaned events" });
  out.push({ name: streamName(p, "labels"), subjects: [`${p.subject_prefix}.labels.*`], role: "labels" });
  out.push({ name: streamName(p, "dlq"), subjects: [`${p.subject_prefix}.dlq.*`], role: "dead letters" });
  for (const o of SIDE_OUTPUTS) out.push({ name: streamName(p, o), subjects: [`${p.subject_prefix}.${o}`], role: o });
  return out;
}

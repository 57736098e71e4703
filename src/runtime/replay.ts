import { hostname } from "node:os";
import { AckPolicy, DeliverPolicy, type ConsumerConfig, type ConsumerInfo } from "@nats-io/jetstream";
import type { Redis, Cluster } from "ioredis";
import type { Pipeline } from "../config/types.js";
import { ConfigError, TacitError, errorMessage } from "../core/errors.js";
import type { OperatorSpec } from "../core/operator.js";
import { unlinkMatching } from "../state/redis.js";
import { partitionKey } from "../core/state.js";
import { pauseGroups, resumeGroups, liveWorkers, type PauseResult } from "./control.js";
import { desiredConsumers, isNotFound } from "./deploy.js";
import { OP_REVISION_HEADER, fenceField, fencesKey, labelContentHash, parseFence, publishedKey, seedLabel, type Fence, type PublishedLabel } from "./label-registry.js";
import type { NatsHandles } from "./nats.js";
import { durableName, pipelineStreams, stageGroups, streamName, type StageGroup } from "../config/topology.js";
import { REPLAY_OUTCOMES, replayRunsKey } from "../telemetry/slis.js";

/*
 * Replay, rebuild and what the worker needs to make them exact.
 *
 * Three records make re-reading an input harmless, whatever state survived:
 *
 * - the partition high-water mark (`applied_seq` in a keyed partition's `wm` hash, written by the
 *   worker after a batch's commits): inputs at or below it have every effect in Redis, so a
 *   re-read skips them without running the operators;
 * - the replay fence (`tacit:{<prefix>}:fences`, one field per durable, written by `tacit replay`
 *   from the durable's ack floor before it rewinds it): inputs at or below it have had their
 *   outputs published, so when they are processed again (Redis was wiped) their state changes
 *   are applied but their outputs are not published a second time — except labels, which go
 *   through the registry below. The fence lives outside the wiped namespace and only grows;
 * - the published-label registry (`tacit:{<prefix>:u:<user>}:published:<label_id>`): per label,
 *   the highest revision published and a hash of each revision's content, so a label computed
 *   again is published only when its content differs, as a new revision. It is kept through a
 *   rebuild and can be rebuilt from the label stream after a Redis loss.
 */

// --- planning ----------------------------------------------------------------------------------

const NS_PER_MS = 1_000_000;
/** Ephemeral consumers used to count and locate messages go away by themselves after this. */
const PROBE_INACTIVE_NS = 30_000 * NS_PER_MS;

/** Where a replay starts: a stream sequence (of the first replayed group's stream), a time, or the start of every stream. */
export type ReplayPoint = { kind: "seq"; seq: number } | { kind: "time"; ms: number } | { kind: "start" };

/** Parses `--from` / `--to`: a stream sequence, an RFC 3339 time, or `start` (from only). */
export function parseReplayPoint(text: string, flag: string): ReplayPoint {
  const t = text.trim();
  if (t === "start" && flag === "--from") return { kind: "start" };
  if (/^\d+$/.test(t)) {
    const seq = Number(t);
    if (seq < 1) throw new ConfigError(`${flag} ${text}: stream sequences start at 1`);
    return { kind: "seq", seq };
  }
  const ms = Date.parse(t);
  if (!/^\d{4}-\d\d-\d\dT/.test(t) || Number.isNaN(ms)) {
    throw new ConfigError(`${flag} ${text}: expected a stream sequence (e.g. 1042)${flag === "--from" ? ", start" : ""} or an RFC 3339 time (e.g. 2026-01-01T09:30:00Z)`);
  }
  return { kind: "time", ms };
}

/** One durable of a replay: where it stood, where it restarts, and how much it reads again. */
export interface DurablePlan {
  group: string;
  stream: string;
  durable: string;
  partition?: number;
  exists: boolean;
  /** Ack floor before the replay (every input up to it was processed). */
  ack_floor: number;
  /** Inputs up to here were processed and published: re-read, they publish nothing again (labels: only if changed). */
  fence: number;
  /** The partition watermark when the replay began (keyed groups), ms. */
  fence_wm?: number;
  /** First stream sequence delivered again. */
  start: number;
  /** Messages of this durable in [start, fence]: what is read again. */
  reread: number;
  /** Where progress is measured to (the fence, or `--to`). */
  target: number;
}

/** What a replay does, stage group by stage group. */
export interface ReplayPlan {
  pipeline: string;
  mode: "replay" | "rebuild";
  groups: string[];
  from: string;
  to?: string;
  durables: DurablePlan[];
  /** Inputs read again, per group. */
  reread: Record<string, number>;
  /** Event-stream time span that is read again, per group (stream times of the first and last message). */
  span: Record<string, { from?: string; to?: string }>;
  /** Workers of each group whose heartbeat is fresh (they obey the pause). */
  live_workers: Record<string, string[]>;
  /** True when the server has a consumer reset API (nats-server ≥ 2.14); else durables are deleted and recreated. */
  reset_api: boolean;
  /** Rebuild: the Redis keys it wipes (documented keys, placeholders for any value); enrich's context and the label registry are kept. */
  wipe?: string[];
}

export interface ReplayRequest {
  from?: ReplayPoint;
  to?: ReplayPoint;
  /** A stage group (its first stage's name); every group when absent. */
  stage?: string;
  /**
   * Wipe the state (of `stage`'s group, or all of it) and read the streams from their start.
   * Outputs other than labels are not published again, so the groups after a rebuilt one keep
   * what they received; labels that come out different are published as new revisions.
   */
  rebuild?: boolean;
}

/** Compares dotted versions (`2.9.10` < `2.14.0`). */
export function versionAtLeast(version: string, min: string): boolean {
  const a = version.split(/[.-]/).map((x) => Number.parseInt(x, 10) || 0);
  const b = min.split(".").map((x) => Number(x));
  for (let i = 0; i < b.length; i++) {
    if ((a[i] ?? 0) !== b[i]!) return (a[i] ?? 0) > b[i]!;
  }
  return true;
}

/** The groups a replay covers, in pipeline order; a fused (non-first) stage is refused with a hint. */
export function selectGroups(p: Pipeline, operators: (n: string) => OperatorSpec<any> | undefined, stage?: string): StageGroup[] {
  const groups = stageGroups(p, operators);
  if (stage === undefined) return groups;
  const g = groups.find((x) => x.name === stage);
  if (g) return [g];
  const host = groups.find((x) => x.stages.some((s) => s.name === stage));
  if (host) {
    throw new ConfigError(`stage ${stage} is fused into group ${host.name} (no stream between them): replay the group with --stage ${host.name}`);
  }
  throw new ConfigError(`unknown stage ${stage}: the stage groups of ${p.name} are ${groups.map((x) => x.name).join(", ")}`);
}

async function probe<T>(nats: NatsHandles, stream: string, cfg: Partial<ConsumerConfig>, use: (name: string, info: ConsumerInfo) => Promise<T>): Promise<T> {
  const name = `replay_probe_${Math.random().toString(36).slice(2, 10)}`;
  const info = await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, inactive_threshold: PROBE_INACTIVE_NS, mem_storage: true, ...cfg });
  try {
    return await use(name, info);
  } finally {
    await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
  }
}

/**
 * The first stream sequence stored at or after `ms`. nats-server 2.9 has no message-get by time,
 * so an ephemeral consumer that starts at that time reports it.
 */
export async function seqAtTime(nats: NatsHandles, stream: string, ms: number): Promise<number> {
  const st = (await nats.jsm.streams.info(stream)).state;
  if (st.messages === 0) return st.last_seq + 1;
  return probe(nats, stream, { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(ms).toISOString() }, async (name, info) => {
    if (info.num_pending === 0) return st.last_seq + 1;
    const m = await (await nats.js.consumers.get(stream, name)).next({ expires: 2000 });
    return m ? m.seq : st.last_seq + 1;
  });
}

/** How many messages (of `filter`) the stream holds from sequence `from` on. */
export async function countFrom(nats: NatsHandles, stream: string, filter: string | undefined, from: number): Promise<number> {
  const st = (await nats.jsm.streams.info(stream)).state;
  if (from > st.last_seq) return 0;
  return probe(nats, stream, { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: Math.max(1, from), ...(filter ? { filter_subject: filter } : {}) }, async (_n, info) => info.num_pending);
}

async function streamTime(nats: NatsHandles, stream: string, seq: number): Promise<string | undefined> {
  try {
    const m = await nats.jsm.streams.getMessage(stream, { seq });
    return m ? m.time.toISOString() : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Works out, for every durable of the groups, where it stands and where it restarts. Reads
 * nothing but server and Redis state; changes nothing. Run it again after the pause to get
 * settled ack floors.
 */
export async function planReplay(p: Pipeline, nats: NatsHandles, redis: Redis | Cluster, operators: (n: string) => OperatorSpec<any> | undefined, req: ReplayRequest): Promise<ReplayPlan> {
  const groups = selectGroups(p, operators, req.stage);
  const wipe = req.rebuild ? wipedState(p, groups, operators, req.stage) : undefined;
  const from: ReplayPoint = req.rebuild ? { kind: "start" } : (req.from ?? { kind: "start" });
  const desired = new Map(desiredConsumers(p, stageGroups(p, operators)).map((d) => [fenceField(d.stream, d.config.durable_name), d]));
  const fences = await redis.hgetall(fencesKey(p.subject_prefix));

  // A sequence names a message of the first group's stream; the others start at its time.
  let fromMs: number | undefined = from.kind === "time" ? from.ms : undefined;
  if (from.kind === "seq") {
    const t = await streamTime(nats, groups[0]!.inputStream, from.seq);
    if (t === undefined && groups.length > 1) {
      throw new ConfigError(`--from ${from.seq}: no message with that sequence in ${groups[0]!.inputStream} (aged out or never stored); use a time instead`);
    }
    fromMs = t === undefined ? undefined : Date.parse(t);
  }
  let toMs: number | undefined = req.to?.kind === "time" ? req.to.ms : undefined;
  if (req.to?.kind === "seq") {
    const t = await streamTime(nats, groups[0]!.inputStream, req.to.seq);
    toMs = t === undefined ? undefined : Date.parse(t);
  }

  const durables: DurablePlan[] = [];
  const reread: Record<string, number> = {};
  const span: ReplayPlan["span"] = {};
  const live: Record<string, string[]> = {};
  for (const [gi, g] of groups.entries()) {
    const st = (await nats.jsm.streams.info(g.inputStream)).state;
    let groupStart: number;
    if (from.kind === "start") groupStart = st.first_seq;
    else if (from.kind === "seq" && gi === 0) groupStart = from.seq;
    else groupStart = fromMs === undefined ? st.last_seq + 1 : await seqAtTime(nats, g.inputStream, fromMs);
    groupStart = Math.max(groupStart, st.first_seq);
    let toSeq: number | undefined;
    if (req.to?.kind === "seq" && gi === 0) toSeq = req.to.seq;
    else if (toMs !== undefined) toSeq = (await seqAtTime(nats, g.inputStream, toMs + 1)) - 1;

    const parts = g.keyed ? [...Array(p.partitions).keys()] : [undefined];
    let groupCount = 0;
    let lastFence = 0;
    for (const n of parts) {
      const durable = durableName(g, n);
      const field = fenceField(g.inputStream, durable);
      const filter = desired.get(field)?.config.filter_subject;
      let exists = true;
      let ackFloor = 0;
      try {
        ackFloor = (await nats.jsm.consumers.info(g.inputStream, durable)).ack_floor.stream_seq;
      } catch (err) {
        if (!isNotFound(err)) throw err;
        exists = false;
      }
      const stored = parseFence(fences[field]);
      const fence = Math.max(stored?.seq ?? 0, ackFloor);
      let fenceWm: number | undefined = stored?.wm;
      if (n !== undefined) {
        const wm = Number((await redis.hget(partitionKey(p.subject_prefix, g.name, n, "wm"), "wm")) ?? NaN);
        if (Number.isFinite(wm)) fenceWm = Math.max(fenceWm ?? wm, wm);
      }
      // Never start past what was processed: that would skip inputs nobody has read.
      const start = Math.min(groupStart, fence + 1);
      const upper = toSeq === undefined ? fence : Math.min(fence, toSeq);
      const count = upper >= start ? (await countFrom(nats, g.inputStream, filter, start)) - (await countFrom(nats, g.inputStream, filter, upper + 1)) : 0;
      groupCount += count;
      lastFence = Math.max(lastFence, upper);
      durables.push({ group: g.name, stream: g.inputStream, durable, ...(n !== undefined ? { partition: n } : {}), exists, ack_floor: ackFloor, fence, ...(fenceWm !== undefined ? { fence_wm: fenceWm } : {}), start, reread: count, target: upper });
    }
    reread[g.name] = groupCount;
    const firstStart = Math.min(...durables.filter((d) => d.group === g.name).map((d) => d.start));
    span[g.name] = groupCount > 0 ? { from: await streamTime(nats, g.inputStream, Math.max(firstStart, st.first_seq)), to: await streamTime(nats, g.inputStream, lastFence) } : {};
    live[g.name] = await liveWorkers(redis, p.subject_prefix, g.name);
  }
  const version = nats.nc.info?.version ?? "0.0.0";
  const describe = (pt: ReplayPoint | undefined) => (pt === undefined ? undefined : pt.kind === "start" ? "start" : pt.kind === "seq" ? `seq ${pt.seq}` : new Date(pt.ms).toISOString());
  return {
    pipeline: p.name,
    mode: req.rebuild ? "rebuild" : "replay",
    groups: groups.map((g) => g.name),
    from: describe(from)!,
    ...(req.to ? { to: describe(req.to) } : {}),
    durables,
    reread,
    span,
    live_workers: live,
    reset_api: versionAtLeast(version, "2.14.0"),
    ...(wipe ? { wipe: wipe === "all" ? [`tacit:{${p.subject_prefix}:*`] : wipe.map((m) => m.key) } : {}),
  };
}

// --- executing ---------------------------------------------------------------------------------

/** Message counts (last sequence) of every stream of the pipeline, to tell what a replay added. */
export async function streamMarks(p: Pipeline, nats: NatsHandles, operators: (n: string) => OperatorSpec<any> | undefined): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const s of pipelineStreams(p, stageGroups(p, operators))) {
    try {
      out[s.name] = (await nats.jsm.streams.info(s.name)).state.last_seq;
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }
  return out;
}

/** Keys a rebuild keeps: enrich's context lookup (an input, not derived state) and the published-label registry. */
export function keptByRebuild(prefix: string): RegExp {
  const p = prefix.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp(`^tacit:\\{${p}:u:[^}]*\\}:(context|published:.*)$`);
}

/** Keys of one piece of documented state: a SCAN glob for the server and an exact test for each key found. */
export interface StateMatcher {
  /** The documented key, with the pipeline's prefix and the stage filled in (for plans and errors). */
  key: string;
  glob: string;
  re: RegExp;
}

const PLACEHOLDER = /<([a-z_]+)>|([\w-]+(?:\|[\w-]+)+)/g;
const reEscape = (t: string) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const globEscape = (t: string) => t.replace(/[*?[\]\\]/g, "\\$&");

/**
 * The keys of one state doc (`tacit:{<prefix>:u:<user>}:<stage>:state`, as operators write it in
 * `state`) for one stage: prefix and stage filled in, `a|b` either word, `<partition>` digits,
 * any other placeholder any value. A placeholder inside the hash tag never spans its `}`: a user
 * or id cannot carry the tail of another stage's key, so the exact test never takes another
 * stage's key even when the SCAN glob (whose `*` spans anything) does. Undefined for a key
 * outside the pipeline's keyed state (`tacit:{<prefix>:…`): pipeline-wide keys are never wiped.
 */
export function stateMatcher(template: string, prefix: string, stage: string): StateMatcher | undefined {
  let key = "";
  let glob = "";
  let re = "";
  let inTag = false;
  const literal = (t: string) => {
    for (const ch of t) {
      if (ch === "{") inTag = true;
      else if (ch === "}") inTag = false;
    }
    key += t;
    glob += globEscape(t);
    re += reEscape(t);
  };
  let at = 0;
  for (const m of template.matchAll(PLACEHOLDER)) {
    literal(template.slice(at, m.index));
    at = m.index + m[0].length;
    const name = m[1];
    if (name === "prefix" || name === "p") literal(prefix);
    else if (name === "stage") literal(stage);
    else {
      key += m[0];
      glob += "*";
      re += name === undefined ? `(?:${m[2]!.split("|").map(reEscape).join("|")})` : name === "partition" ? "\\d+" : inTag ? "[^{}]+" : ".+";
    }
  }
  literal(template.slice(at));
  return key.startsWith(`tacit:{${prefix}:`) ? { key, glob, re: new RegExp(`^${re}$`) } : undefined;
}

/** One key a doc names, placeholders filled with sample values (`a|b`: one key per word). */
function sampleKeys(template: string, prefix: string, stage: string): string[] {
  const alt = /[\w-]+(?:\|[\w-]+)+/.exec(template);
  if (alt) return alt[0].split("|").flatMap((w) => sampleKeys(template.slice(0, alt.index) + w + template.slice(alt.index + alt[0].length), prefix, stage));
  return [template.replace(/<([a-z_]+)>/g, (_m, n: string) => (n === "prefix" || n === "p" ? prefix : n === "stage" ? stage : n === "partition" ? "0" : `x-${n}`))];
}

/** Every state doc of a group's stages, plus the runtime's per-partition keys (watermarks, applied marks) under the group's name. */
function groupDocs(g: StageGroup, operators: (n: string) => OperatorSpec<any> | undefined): { template: string; stage: string }[] {
  const docs = [{ template: "tacit:{<prefix>:p:<stage>:<partition>}:<key>", stage: g.name }];
  for (const s of g.stages) for (const d of operators(s.operator)?.state ?? []) docs.push({ template: d.key, stage: s.name });
  return docs;
}

/**
 * What `--rebuild --stage` wipes of one group: its operators' documented state and the runtime's
 * per-partition keys of the group, without what every rebuild keeps (`keptByRebuild`). A key
 * that does not name its stage (label-derive's features and feature index) belongs to the group
 * only while no stage of another group writes the same key; otherwise wiping it would drop the
 * other group's part, which a replay of this group does not recompute — so that is a ConfigError
 * (rebuild the whole pipeline instead). Wiping label-derive's features with its state is
 * what makes the rebuild right: they are increments applied in the same commits as the state,
 * so kept, the replay would count every input a second time.
 */
export function groupState(p: Pipeline, g: StageGroup, operators: (n: string) => OperatorSpec<any> | undefined): StateMatcher[] {
  const prefix = p.subject_prefix;
  const keep = keptByRebuild(prefix);
  const matchers = (x: StageGroup) =>
    groupDocs(x, operators)
      .filter((d) => sampleKeys(d.template, prefix, d.stage).some((k) => !keep.test(k)))
      .flatMap((d) => stateMatcher(d.template, prefix, d.stage) ?? []);
  const samples = (x: StageGroup) => groupDocs(x, operators).flatMap((d) => sampleKeys(d.template, prefix, d.stage)).filter((k) => !keep.test(k));
  const mine = matchers(g);
  for (const other of stageGroups(p, operators)) {
    if (other.name === g.name) continue;
    const theirs = matchers(other);
    const shared = [
      ...samples(other).flatMap((k) => mine.filter((m) => m.re.test(k))),
      ...samples(g).flatMap((k) => theirs.filter((m) => m.re.test(k))),
    ];
    if (shared.length > 0) {
      throw new ConfigError(
        `the state of stage group ${g.name} is shared with group ${other.name} (${shared[0]!.key}): a rebuild of ${g.name} alone would wipe what ${other.name} wrote there; rebuild the whole pipeline (--rebuild without --stage)`,
      );
    }
  }
  return mine;
}

/**
 * Deletes the pipeline's state (`tacit:{<prefix>:*`: users, partitions, feature indexes), or only
 * the keys of `only` (a group's state), except what `keptByRebuild` names. Pipeline-wide keys
 * (`tacit:{<prefix>}:…`: leases, control, fences) are never matched. Returns how many were deleted.
 */
export async function wipeState(redis: Redis | Cluster, prefix: string, only?: StateMatcher[]): Promise<number> {
  const keep = keptByRebuild(prefix);
  const scans = only?.map((m) => ({ glob: m.glob, test: (k: string) => m.re.test(k) })) ?? [{ glob: `tacit:{${globEscape(prefix)}:*`, test: () => true }];
  let n = 0;
  for (const scan of scans) n += await unlinkMatching(redis, scan.glob, (k) => scan.test(k) && !keep.test(k));
  return n;
}

/** What a rebuild wipes: everything (no stage given), or the state of the stage's group. */
function wipedState(p: Pipeline, groups: StageGroup[], operators: (n: string) => OperatorSpec<any> | undefined, stage: string | undefined): StateMatcher[] | "all" {
  return stage === undefined ? "all" : groups.flatMap((g) => groupState(p, g, operators));
}

/**
 * Fills the published-label registry from the label stream, for labels it does not know (after
 * a Redis loss). Returns how many labels were added.
 */
export async function seedRegistry(p: Pipeline, nats: NatsHandles, redis: Redis | Cluster): Promise<number> {
  const stream = streamName(p, "labels");
  let info;
  try {
    info = await nats.jsm.streams.info(stream);
  } catch (err) {
    if (isNotFound(err)) return 0;
    throw err;
  }
  if (info.state.messages === 0) return 0;
  const regs = new Map<string, PublishedLabel>();
  const dec = new TextDecoder();
  await probe(nats, stream, { deliver_policy: DeliverPolicy.All }, async (name) => {
    const c = await nats.js.consumers.get(stream, name);
    let seen = 0;
    while (seen < info.state.messages) {
      let got = 0;
      for await (const m of await c.fetch({ max_messages: 1000, expires: 1000 })) {
        got++;
        seen++;
        let label: Record<string, unknown>;
        try {
          label = JSON.parse(dec.decode(m.data)) as Record<string, unknown>;
        } catch {
          continue;
        }
        if (typeof label.label_id !== "string" || typeof label.user !== "string" || typeof label.revision !== "number") continue;
        const key = publishedKey(p.subject_prefix, label.user, label.label_id);
        const k = Number(m.headers?.get(OP_REVISION_HEADER) ?? label.revision);
        regs.set(key, seedLabel(regs.get(key), Number.isFinite(k) ? k : label.revision, label.revision, labelContentHash(label)));
      }
      if (got === 0) break;
    }
  });
  const ttl = p.streams.max_age_ms + 86_400_000;
  let added = 0;
  const entries = [...regs];
  for (let i = 0; i < entries.length; i += 500) {
    const chunk = entries.slice(i, i + 500);
    // Keys of many users: one command each (Cluster spreads them over slots).
    const res = await Promise.all(chunk.map(([key, reg]) => redis.set(key, JSON.stringify(reg), "PX", ttl, "NX")));
    added += res.filter((r) => r === "OK").length;
  }
  return added;
}

/** Moves one durable to `start`: the reset API where the server has one, else delete and recreate. */
async function rewind(p: Pipeline, nats: NatsHandles, d: DurablePlan, desired: Partial<ConsumerConfig> & { durable_name: string }, resetApi: boolean, fromStart: boolean): Promise<"reset" | "recreated" | "created"> {
  if (resetApi && d.exists) {
    try {
      await nats.jsm.consumers.reset(d.stream, d.durable, d.start);
      return "reset";
    } catch {
      // a durable whose deliver policy does not allow it (or an older server): recreate it
    }
  }
  if (d.exists) await nats.jsm.consumers.delete(d.stream, d.durable);
  const cfg: Partial<ConsumerConfig> = fromStart ? { ...desired, deliver_policy: DeliverPolicy.All } : { ...desired, deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: d.start };
  await nats.jsm.consumers.add(d.stream, cfg);
  void p;
  return d.exists ? "recreated" : "created";
}

/** Progress of a replay's catch-up: messages re-read so far out of the total. */
export interface CatchUp {
  done: number;
  total: number;
  finished: boolean;
  /** Durables still behind their target. */
  behind: string[];
}

/** Reads every replayed durable's progress (ack floor vs. target). */
export async function catchUp(nats: NatsHandles, plan: ReplayPlan, initialPending: Map<string, number>): Promise<CatchUp> {
  let done = 0;
  let total = 0;
  const behind: string[] = [];
  for (const d of plan.durables) {
    total += d.reread;
    if (d.reread === 0) continue;
    let ci: ConsumerInfo;
    try {
      ci = await nats.jsm.consumers.info(d.stream, d.durable);
    } catch {
      behind.push(d.durable);
      continue;
    }
    const finished = ci.ack_floor.stream_seq >= d.target || (ci.num_pending === 0 && ci.num_ack_pending === 0);
    if (finished) {
      done += d.reread;
      continue;
    }
    behind.push(d.durable);
    const p0 = initialPending.get(fenceField(d.stream, d.durable)) ?? d.reread;
    done += Math.max(0, Math.min(d.reread, p0 - ci.num_pending - ci.num_ack_pending));
  }
  return { done, total, finished: behind.length === 0, behind };
}

/** What a replay did. */
export interface ReplayReport {
  plan: ReplayPlan;
  paused: PauseResult;
  rewound: Record<string, number>;
  how: Record<string, "reset" | "recreated" | "created">;
  wiped_keys?: number;
  seeded_labels?: number;
  /** False when there was no live worker to catch up, or the wait timed out. */
  caught_up: boolean;
  reread: number;
  /** New messages per stream while the replay ran (live traffic included). */
  new_messages: Record<string, number>;
  labels: { published: number; new_revisions: number; distinct_labels: number };
  seconds: number;
}

export interface ExecuteOptions {
  pauseTimeoutMs?: number;
  /** How long to wait for the catch-up; 0 = do not wait. */
  waitMs?: number;
  onPauseWait?: (waiting: Record<string, string[]>) => void;
  onProgress?: (c: CatchUp) => void;
  log?: (line: string) => void;
}

/**
 * Pauses the groups (every live worker acknowledges), plans on settled ack floors, wipes and
 * seeds for a rebuild, writes the fences, rewinds every durable, resumes, waits for the
 * catch-up and reports. The groups are resumed whatever happens after the pause.
 */
export async function executeReplay(
  p: Pipeline,
  nats: NatsHandles,
  redis: Redis | Cluster,
  operators: (n: string) => OperatorSpec<any> | undefined,
  req: ReplayRequest,
  opts: ExecuteOptions = {},
): Promise<ReplayReport> {
  const t0 = Date.now();
  const groups = selectGroups(p, operators, req.stage);
  const names = groups.map((g) => g.name);
  // Before the pause: a group whose state is shared with another is refused with nothing changed.
  const wipe = req.rebuild ? wipedState(p, groups, operators, req.stage) : undefined;
  const log = opts.log ?? (() => undefined);
  const paused = await pauseGroups(redis, p.subject_prefix, names, {
    reason: req.rebuild ? `tacit replay --rebuild${req.stage ? ` --stage ${req.stage}` : ""}` : `tacit replay --from ${req.from?.kind === "seq" ? req.from.seq : req.from?.kind === "time" ? new Date(req.from.ms).toISOString() : "start"}`,
    by: `${hostname()}:${process.pid}`,
    timeoutMs: opts.pauseTimeoutMs,
    onWait: opts.onPauseWait,
  });
  log(`paused ${names.join(", ")} (${Object.values(paused.workers).flat().length} worker acknowledgements)`);
  let resumed = false;
  try {
    const plan = await planReplay(p, nats, redis, operators, req);
    const before = await streamMarks(p, nats, operators);
    let wiped: number | undefined;
    let seeded: number | undefined;
    if (wipe) {
      wiped = await wipeState(redis, p.subject_prefix, wipe === "all" ? undefined : wipe);
      seeded = await seedRegistry(p, nats, redis);
      log(`wiped ${wiped} state keys${wipe === "all" ? "" : ` of ${names.join(", ")}`}; the label registry knows ${seeded} more labels from the label stream`);
    }
    // Fences first: a durable must never deliver again before its fence is in place.
    const fences = new Map<string, string>();
    for (const d of plan.durables) {
      if (d.fence > 0) fences.set(fenceField(d.stream, d.durable), JSON.stringify({ seq: d.fence, ...(d.fence_wm !== undefined ? { wm: d.fence_wm } : {}) } satisfies Fence));
    }
    if (fences.size) await redis.hset(fencesKey(p.subject_prefix), Object.fromEntries(fences));
    const desired = new Map(desiredConsumers(p, stageGroups(p, operators)).map((d) => [fenceField(d.stream, d.config.durable_name), d.config]));
    const how: ReplayReport["how"] = {};
    const rewound: Record<string, number> = {};
    const initialPending = new Map<string, number>();
    for (const d of plan.durables) {
      const field = fenceField(d.stream, d.durable);
      how[d.durable] = await rewind(p, nats, d, desired.get(field)!, plan.reset_api, !!req.rebuild);
      rewound[d.durable] = d.start;
      initialPending.set(field, (await nats.jsm.consumers.info(d.stream, d.durable)).num_pending);
    }
    await resumeGroups(redis, p.subject_prefix, names);
    resumed = true;
    log(`rewound ${plan.durables.length} durables and resumed ${names.join(", ")}`);

    const total = plan.durables.reduce((a, d) => a + d.reread, 0);
    const anyLive = Object.values(plan.live_workers).some((w) => w.length > 0) || Object.values(paused.workers).some((w) => w.length > 0);
    let caught = total === 0;
    const waitMs = opts.waitMs ?? 600_000;
    if (!caught && anyLive && waitMs > 0) {
      const deadline = Date.now() + waitMs;
      for (;;) {
        const c = await catchUp(nats, plan, initialPending);
        opts.onProgress?.(c);
        if (c.finished) {
          caught = true;
          break;
        }
        if (Date.now() > deadline) break;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    const after = await streamMarks(p, nats, operators);
    const newMessages: Record<string, number> = {};
    for (const [s, n] of Object.entries(after)) newMessages[s] = n - (before[s] ?? 0);
    const labels = await labelsSince(p, nats, before[streamName(p, "labels")] ?? 0);
    await recordReplay(redis, p.subject_prefix, caught ? "caught_up" : "not_caught_up");
    return {
      plan,
      paused,
      rewound,
      how,
      ...(wiped !== undefined ? { wiped_keys: wiped } : {}),
      ...(seeded !== undefined ? { seeded_labels: seeded } : {}),
      caught_up: caught,
      reread: total,
      new_messages: newMessages,
      labels,
      seconds: (Date.now() - t0) / 1000,
    };
  } catch (err) {
    await recordReplay(redis, p.subject_prefix, "failed").catch(() => undefined);
    if (!resumed) {
      await resumeGroups(redis, p.subject_prefix, names).catch(() => undefined);
      throw new TacitError("replay_failed", `replay failed, groups resumed: ${errorMessage(err)}`, { cause: err });
    }
    throw err;
  }
}

/** Counts a replay's outcome in Redis, where every worker reads it for `tacit_replay_runs_total` (M9). */
async function recordReplay(redis: Redis | Cluster, prefix: string, outcome: (typeof REPLAY_OUTCOMES)[number]): Promise<void> {
  const key = replayRunsKey(prefix);
  await redis.hincrby(key, outcome, 1);
  await redis.hset(key, { last_at: Date.now(), last_outcome: outcome });
}

/** Labels published after a stream sequence: how many, how many are new revisions, of how many labels. */
async function labelsSince(p: Pipeline, nats: NatsHandles, afterSeq: number): Promise<ReplayReport["labels"]> {
  const stream = streamName(p, "labels");
  const out = { published: 0, new_revisions: 0, distinct_labels: 0 };
  let last: number;
  try {
    last = (await nats.jsm.streams.info(stream)).state.last_seq;
  } catch {
    return out;
  }
  if (last <= afterSeq) return out;
  const ids = new Set<string>();
  const dec = new TextDecoder();
  await probe(nats, stream, { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: afterSeq + 1 }, async (name) => {
    const c = await nats.js.consumers.get(stream, name);
    for (;;) {
      let got = 0;
      for await (const m of await c.fetch({ max_messages: 1000, expires: 1000 })) {
        got++;
        out.published++;
        try {
          const l = JSON.parse(dec.decode(m.data)) as { label_id?: string; revision?: number };
          if (l.label_id) ids.add(l.label_id);
          if ((l.revision ?? 0) > 0) out.new_revisions++;
        } catch {
          // not a label: counted as published only
        }
        if (m.seq >= last) break;
      }
      if (got === 0 || out.published >= last - afterSeq) break;
    }
  });
  out.distinct_labels = ids.size;
  return out;
}

/** Human text of a plan (dry run). */
export function formatPlan(plan: ReplayPlan): string {
  const lines: string[] = [];
  lines.push(`${plan.mode === "rebuild" ? "rebuild" : "replay"} of ${plan.pipeline} from ${plan.from}${plan.to ? ` to ${plan.to}` : ""}${plan.reset_api ? " (consumer reset API)" : " (durables deleted and recreated at the start sequence)"}`);
  for (const g of plan.groups) {
    const ds = plan.durables.filter((d) => d.group === g);
    const s = plan.span[g];
    const live = plan.live_workers[g] ?? [];
    lines.push(`  ${g}: ${plan.reread[g]} messages to read again${s?.from ? `, stored ${s.from} … ${s.to ?? "?"}` : ""}; ${live.length} live worker(s)`);
    for (const d of ds) {
      if (ds.length > 1 && d.reread === 0) continue;
      lines.push(`    ${d.durable}: from seq ${d.start} to ${d.target} (${d.reread} msgs; ack floor ${d.ack_floor}${d.exists ? "" : ", durable missing: will be created"})`);
    }
  }
  if (plan.wipe) lines.push(`  wipes: ${plan.wipe.join(", ")} (keeps enrich's context and the label registry)`);
  lines.push(`  total: ${Object.values(plan.reread).reduce((a, b) => a + b, 0)} messages`);
  return lines.join("\n");
}

/** Human text of a finished replay. */
export function formatReport(r: ReplayReport): string {
  const lines: string[] = [];
  lines.push(`${r.plan.mode} of ${r.plan.pipeline} (${r.plan.groups.join(", ")}) from ${r.plan.from}: ${r.reread} inputs read again in ${r.seconds.toFixed(1)} s${r.caught_up ? "" : " — NOT caught up yet (workers continue; follow with `tacit status`)"}`);
  if (r.wiped_keys !== undefined) lines.push(`  wiped ${r.wiped_keys} state keys; ${r.seeded_labels ?? 0} labels added to the registry from the label stream`);
  const changed = Object.entries(r.new_messages).filter(([, n]) => n > 0);
  lines.push(changed.length === 0 ? "  outputs changed: none (no stream got a new message)" : `  new messages (live traffic included): ${changed.map(([s, n]) => `${s} +${n}`).join(", ")}`);
  lines.push(`  labels published: ${r.labels.published} (${r.labels.new_revisions} new revisions of ${r.labels.distinct_labels} labels)`);
  return lines.join("\n");
}

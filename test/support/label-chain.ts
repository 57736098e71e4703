import { ManualClock } from "../../src/core/clock.js";
import type { Envelope } from "../../src/core/event.js";
import type { Label } from "../../src/core/label.js";
import type { OperatorContext, OperatorSpec, StageInput } from "../../src/core/operator.js";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../../src/core/pseudonym.js";
import { evaluate, type Report, type ResponseFeatures } from "../../src/eval/evaluate.js";
import { labelSchemaErrors } from "../../src/eval/inputs.js";
import { readFeatures } from "../../src/labels/features.js";
import type { TruthRecord } from "../../src/sim/truth.js";
import { MemoryStateStore } from "../../src/state/memory.js";
import { findOperator } from "../../operators/index.js";
import { OperatorHarness } from "./operator-harness.js";

/**
 * Runs simulated events through the whole default chain in memory — enrich → dedupe → bot-score
 * → sessionize → reformulation → label-derive — with the real operator specs from the registry:
 * enrich's Processor called directly, then one OperatorHarness per keyed stage (the runtime's own
 * per-partition stream order, watermarks, keyed state and timers; emit dedup by id), and scores
 * the labels and features with `evaluate`.
 */

export interface ChainOptions {
  partitions?: number;
  outOfOrdernessMs?: number;
  /** label-derive's stage config. */
  labelConfig?: Record<string, unknown>;
  /** Inputs per batch in the keyed stages. @default 200 */
  batchSize?: number;
  prefix?: string;
  /**
   * At the end of input, advance every watermark far past it, so every session is decided (as a
   * pipeline that keeps running eventually does). Off: stop where the events left the watermark,
   * as a live run seen at one moment. @default true
   */
  endOfInput?: boolean;
}

export interface ChainResult {
  labels: Label[];
  /** Labels that did not validate against label.v1.json, with the reason. */
  invalid: { label: unknown; errors: string }[];
  /** Every emit on labels.* (deduplicated by id): [id, label]. */
  labelEmits: [string, Label][];
  botUsers: Set<string>;
  features: Map<string, ResponseFeatures>;
  scoresWithoutBaselines: Map<string, number>;
  labelState: MemoryStateStore;
  labelHarness: OperatorHarness;
  dlq: number;
}

const KEYED = ["dedupe", "bot-score", "sessionize", "reformulation", "label-derive"] as const;

function spec(name: string): OperatorSpec<Record<string, unknown>> {
  const s = findOperator(name);
  if (!s) throw new Error(`operator ${name} is not registered`);
  return s;
}

/** Runs the chain over JSONL event lines (in publish order). */
export async function runChain(lines: readonly string[], opts: ChainOptions = {}): Promise<ChainResult> {
  const partitions = opts.partitions ?? 4;
  const prefix = opts.prefix ?? "feedback";
  const batchSize = opts.batchSize ?? 200;
  const noop = (): void => {};
  const enrichCtx: OperatorContext = {
    pipeline: prefix,
    prefix,
    stage: "enrich",
    partitions,
    state: new MemoryStateStore(),
    clock: new ManualClock(),
    log: { debug: noop, info: noop, warn: noop, error: noop },
    metrics: { count: noop },
    env: {},
    devMode: true,
  };
  const enrichProc = await spec("enrich").create({}, enrichCtx);
  if (!("process" in enrichProc)) throw new Error("enrich is expected to be unkeyed");
  // Stream time: when the line was published, approximated by the latest event time seen so far.
  let streamTime = 0;
  const inputs: StageInput[] = lines.map((line, i) => {
    const m = /"timestamp":"([^"]*)"/.exec(line);
    const t = m ? Date.parse(m[1]!) : NaN;
    if (Number.isFinite(t) && t > streamTime && t < Date.parse("2100-01-01")) streamTime = t;
    return { seq: i + 1, subject: `${prefix}.in.x`, data: new TextEncoder().encode(line), deliveries: 1, stream_time_ms: streamTime };
  });
  let envelopes: Envelope[] = [];
  let dlq = 0;
  for (let off = 0; off < inputs.length; off += 500) {
    const outs = await enrichProc.process(inputs.slice(off, off + 500));
    for (const o of outs) {
      if (o.error) dlq++;
      for (const e of o.emits) if (e.to === "next") envelopes.push(e.value as Envelope);
    }
  }

  let harness: OperatorHarness | undefined;
  let botUsers = new Set<string>();
  for (const name of KEYED) {
    const h = new OperatorHarness(spec(name), name === "label-derive" ? (opts.labelConfig ?? {}) : {}, {
      partitions,
      outOfOrdernessMs: opts.outOfOrdernessMs ?? 5000,
      stage: name,
      prefix,
    });
    for (let p = 0; p < partitions; p++) {
      await h.push(p, envelopes.filter((e) => e.partition === p), { batchSize });
      // End of input: every session is decided, and every input a stage held for event-time order runs.
      const wm = h.watermark(p);
      if (opts.endOfInput !== false && wm !== undefined) await h.advanceWatermark(p, wm + 365 * 86_400_000);
    }
    if (name === "bot-score") botUsers = new Set(h.outputs("bots").map((b) => (b as { user: string }).user));
    dlq += h.log.filter((l) => l.outcome.error).length;
    envelopes = h.outputs("next") as Envelope[];
    harness = h;
  }
  const h = harness!;

  const labelEmits: [string, Label][] = [];
  for (const to of ["labels.response", "labels.preference", "labels.session"] as const) {
    for (const e of h.emits(to)) labelEmits.push([e.id, e.value as Label]);
  }
  const labels: Label[] = [];
  const invalid: ChainResult["invalid"] = [];
  for (const [, l] of labelEmits) {
    const errors = labelSchemaErrors(l);
    if (errors === null) labels.push(l);
    else invalid.push({ label: l, errors });
  }

  const features = new Map<string, ResponseFeatures>();
  const scoresWithoutBaselines = new Map<string, number>();
  const responseIds = new Set<string>();
  for (const env of envelopes) if (env.event.response_id !== undefined) responseIds.add(env.event.response_id);
  for (const id of [...responseIds].sort()) {
    const rec = await readFeatures(h.state, prefix, "response", id);
    if (!rec) continue;
    const n = (k: string): number => (typeof rec.fields[k] === "number" ? (rec.fields[k] as number) : 0);
    features.set(id, { pos_weight: n("pos_weight"), neg_weight: n("neg_weight"), signal_count: n("signal_count") });
    scoresWithoutBaselines.set(id, n("pos_weight_nobase") - n("neg_weight_nobase"));
  }
  return { labels, invalid, labelEmits, botUsers, features, scoresWithoutBaselines, labelState: h.state, labelHarness: h, dlq };
}

/** Scores a chain result against the simulator's truth (users matched with the development pseudonym key). */
export function scoreChain(r: ChainResult, truth: readonly TruthRecord[], eventsPerUser?: ReadonlyMap<string, number>): Report {
  const cache = new Map<string, string>();
  return evaluate({
    ...(eventsPerUser ? { eventsPerUser } : {}),
    labels: r.labels,
    truth,
    features: r.features,
    botUsers: r.botUsers,
    scoresWithoutBaselines: r.scoresWithoutBaselines,
    rejectedLabels: r.invalid.length,
    pseudonymOf: (id) => {
      let p = cache.get(id);
      if (p === undefined) cache.set(id, (p = pseudonymize(DEV_PSEUDONYM_KEY, id)));
      return p;
    },
  });
}

/**
 * The same as scoreChain on the labels of the users the truth says are human: what label-derive
 * makes of what bot-score lets through as human (bot users' labels left out, not counted against).
 */
export function scoreHumanUsers(r: ChainResult, truth: readonly TruthRecord[]): Report {
  const pseudonymOf = (id: string) => pseudonymize(DEV_PSEUDONYM_KEY, id);
  const bots = new Set(truth.flatMap((u) => (u.kind === "user" && u.is_bot ? [pseudonymOf(u.user_id)] : [])));
  return evaluate({ labels: r.labels.filter((l) => !bots.has(l.user)), truth, features: r.features, pseudonymOf });
}

import { createReadStream, mkdtempSync, openSync, closeSync, writeSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { DeliverPolicy } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import { outputSubject, streamName } from "../config/topology.js";
import { murmur32 } from "../core/partition.js";
import type { Label, LabelKind } from "../core/label.js";
import { labelSchemaErrors } from "../eval/inputs.js";
import type { NatsHandles } from "../runtime/nats.js";
import { scalar, timestampMs, utf8, type ColumnSpec, type RowSink } from "./sink.js";

/*
 * The final view of a label stream: one row per label_id at its highest revision (ties: the later
 * message), retractions left out unless asked for, filtered by kind and event time.
 *
 * Bounded memory. The stream is read once, in order, through an ordered consumer. When it holds
 * more messages than `maxLabelsInMemory`, each message is spilled to one of
 * P = ceil(messages / maxLabelsInMemory) temporary JSONL files by hash of its label_id, so every
 * revision of a label lands in the same file; each file is then reduced on its own (a map of
 * label_id → latest line) and written out. Peak memory is one partition's messages (about
 * maxLabelsInMemory lines, ≈ 1 KB each) plus one Parquet row group; disk is one copy of the
 * stream's label bytes. With fewer messages than that, the map is kept in memory and nothing is
 * spilled.
 */

/** @default 100_000 */
export const DEFAULT_MAX_LABELS_IN_MEMORY = 100_000;

export interface LabelExportOptions {
  /** Only this kind (read from its subject alone). */
  kind?: LabelKind;
  /** Event-time window of the latest revision: from ≤ event_time < to (ms since the epoch). */
  fromMs?: number;
  toMs?: number;
  /** Keep retracted labels (their retraction revision). @default false */
  includeRetracted?: boolean;
  /** Messages held in memory at once (see above). */
  maxLabelsInMemory?: number;
  /** Where spill files go. @default the OS temp dir */
  tmpDir?: string;
  /** Called while reading: messages read so far, and how many the stream held at the start. */
  onProgress?: (read: number, total: number) => void;
}

export interface LabelExportSummary {
  stream: string;
  /** Messages read (every revision). */
  messages: number;
  /** Messages that did not match label.v2.json (skipped). */
  invalid: number;
  /** Distinct label ids. */
  labels: number;
  rows: number;
  /** Latest revisions left out because they are retractions. */
  retracted_left_out: number;
  /** Latest revisions left out by --from/--to. */
  outside_window: number;
  /** Spill partitions (1: everything stayed in memory). */
  partitions: number;
}

/** The latest line per label_id among the lines offered. */
class LatestByLabel {
  readonly best = new Map<string, { rev: number; line: string }>();

  offer(id: string, rev: number, line: string): void {
    const cur = this.best.get(id);
    if (cur === undefined || rev >= cur.rev) this.best.set(id, { rev, line });
  }
}

/** Reads every message of a label stream once, with an ordered consumer, up to its last sequence at the start. */
async function* labelMessages(nats: NatsHandles, stream: string, filter: string, onTotal: (n: number) => void): AsyncGenerator<string> {
  const info = await nats.jsm.streams.info(stream, { subjects_filter: filter });
  const total = Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
  onTotal(total);
  if (total === 0) return;
  const lastSeq = info.state.last_seq;
  const consumer = await nats.js.consumers.get(stream, { filter_subjects: filter, deliver_policy: DeliverPolicy.All });
  const decoder = new TextDecoder();
  const iter = await consumer.consume({ max_messages: 1000, expires: 5000 });
  try {
    for await (const m of iter) {
      yield decoder.decode(m.data);
      if (m.info.pending === 0 || m.seq >= lastSeq) break;
    }
  } finally {
    await iter.close();
  }
}

/**
 * Writes the final view of the pipeline's labels to `sink` (rows: the labels as published, v1
 * or v2). Throws when the label stream does not exist.
 */
export async function exportLabels(p: Pipeline, nats: NatsHandles, sink: RowSink<Label>, opts: LabelExportOptions = {}): Promise<LabelExportSummary> {
  const stream = streamName(p, "labels");
  const filter = opts.kind ? outputSubject(p, `labels.${opts.kind}`) : `${p.subject_prefix}.labels.*`;
  const max = opts.maxLabelsInMemory ?? DEFAULT_MAX_LABELS_IN_MEMORY;
  const summary: LabelExportSummary = { stream, messages: 0, invalid: 0, labels: 0, rows: 0, retracted_left_out: 0, outside_window: 0, partitions: 1 };
  let total = 0;
  let spill: { dir: string; fds: number[]; buf: string[][] } | undefined;
  const inMemory = new LatestByLabel();
  const flushPart = (i: number) => {
    const b = spill!.buf[i]!;
    if (b.length) writeSync(spill!.fds[i]!, b.join(""));
    spill!.buf[i] = [];
  };
  try {
    for await (const line of labelMessages(nats, stream, filter, (n) => {
      total = n;
      summary.partitions = Math.max(1, Math.ceil(n / max));
      if (summary.partitions > 1) {
        const dir = mkdtempSync(join(opts.tmpDir ?? tmpdir(), "tacit-export-"));
        spill = { dir, fds: [], buf: [] };
        for (let i = 0; i < summary.partitions; i++) {
          spill.fds.push(openSync(join(dir, `part-${i}.jsonl`), "w"));
          spill.buf.push([]);
        }
      }
    })) {
      summary.messages++;
      if (summary.messages % 1000 === 0) opts.onProgress?.(summary.messages, total);
      let label: Label;
      try {
        label = JSON.parse(line) as Label;
      } catch {
        summary.invalid++;
        continue;
      }
      if (labelSchemaErrors(label) !== null || (opts.kind && label.kind !== opts.kind)) {
        summary.invalid++;
        continue;
      }
      if (!spill) {
        inMemory.offer(label.label_id, label.revision, line);
        continue;
      }
      // Revision first, so the reduce pass need not parse a line to compare it.
      const i = murmur32(label.label_id) % summary.partitions;
      spill.buf[i]!.push(`${label.revision}\t${label.label_id}\t${line}\n`);
      if (spill.buf[i]!.length >= 256) flushPart(i);
    }
    opts.onProgress?.(summary.messages, total);
    if (!spill) {
      writeLatest(inMemory, sink, opts, summary);
      return summary;
    }
    for (let i = 0; i < summary.partitions; i++) {
      flushPart(i);
      closeSync(spill.fds[i]!);
    }
    spill.fds = [];
    for (let i = 0; i < summary.partitions; i++) {
      const part = new LatestByLabel();
      const rl = createInterface({ input: createReadStream(join(spill.dir, `part-${i}.jsonl`), "utf8"), crlfDelay: Infinity });
      for await (const rec of rl) {
        const a = rec.indexOf("\t");
        const b = rec.indexOf("\t", a + 1);
        part.offer(rec.slice(a + 1, b), Number(rec.slice(0, a)), rec.slice(b + 1));
      }
      writeLatest(part, sink, opts, summary);
    }
    return summary;
  } finally {
    if (spill) {
      for (const fd of spill.fds) closeSync(fd);
      rmSync(spill.dir, { recursive: true, force: true });
    }
  }
}

/** Writes one partition's latest revisions (sorted by label_id) that pass the filters. */
function writeLatest(part: LatestByLabel, sink: RowSink<Label>, opts: LabelExportOptions, summary: LabelExportSummary): void {
  summary.labels += part.best.size;
  const ids = [...part.best.keys()].sort();
  const rows: Label[] = [];
  for (const id of ids) {
    const l = JSON.parse(part.best.get(id)!.line) as Label;
    if (l.retracted === true && !opts.includeRetracted) {
      summary.retracted_left_out++;
      continue;
    }
    const t = Date.parse(l.event_time);
    if ((opts.fromMs !== undefined && t < opts.fromMs) || (opts.toMs !== undefined && t >= opts.toMs)) {
      summary.outside_window++;
      continue;
    }
    rows.push(l);
    summary.rows++;
    if (rows.length >= 10_000) sink.write(rows.splice(0));
  }
  sink.write(rows);
  part.best.clear();
}

const LIST = (name: string, children: ReturnType<typeof utf8>[]) => [
  { name, repetition_type: "REQUIRED" as const, converted_type: "LIST" as const, num_children: 1 },
  { name: "list", repetition_type: "REPEATED" as const, num_children: 1 },
  { name: "element", repetition_type: "REQUIRED" as const, num_children: children.length },
  ...children,
];

const str = (v: unknown): string | null => (typeof v === "string" ? v : null);

/**
 * The Parquet columns of a label: every field of label.v2.json in schema order, typed (revision
 * INT64, weight DOUBLE, event_time and emitted_at UTC timestamps, signals a list of structs,
 * experiment a struct, rule_version as text since it may be either). A v1 label has the v2
 * columns null (retracted false).
 */
export const LABEL_COLUMNS: readonly ColumnSpec<Label>[] = [
  { schema: [scalar("schema_version", "INT32", true)], value: (l) => l.schema_version },
  { schema: [utf8("label_id", true)], value: (l) => l.label_id },
  { schema: [scalar("revision", "INT64", true)], value: (l) => BigInt(l.revision) },
  { schema: [utf8("pipeline", true)], value: (l) => l.pipeline },
  { schema: [utf8("kind", true)], value: (l) => l.kind },
  { schema: [utf8("response_id")], value: (l) => str(l.response_id) },
  { schema: [utf8("query_id")], value: (l) => str(l.query_id) },
  { schema: [utf8("session_id", true)], value: (l) => l.session_id },
  { schema: [utf8("user", true)], value: (l) => l.user },
  { schema: [utf8("label")], value: (l) => str(l.label) },
  { schema: [utf8("chosen_response_id")], value: (l) => str(l.chosen_response_id) },
  { schema: [utf8("rejected_response_id")], value: (l) => str(l.rejected_response_id) },
  { schema: [scalar("weight", "DOUBLE", true)], value: (l) => l.weight },
  { schema: [utf8("rule", true)], value: (l) => l.rule },
  { schema: [utf8("rule_version", true)], value: (l) => String(l.rule_version) },
  { schema: LIST("signals", [utf8("event_id", true), utf8("event_type", true)]), value: (l) => l.signals.map((s) => ({ event_id: s.event_id, event_type: s.event_type })) },
  { schema: [timestampMs("event_time", true)], value: (l) => new Date(l.event_time) },
  { schema: [timestampMs("emitted_at", true)], value: (l) => new Date(l.emitted_at) },
  { schema: [scalar("retracted", "BOOLEAN", true)], value: (l) => l.retracted === true },
  { schema: [utf8("retracted_reason")], value: (l) => str(l.retracted_reason) },
  { schema: [scalar("position", "INT32")], value: (l) => l.position ?? null },
  { schema: [scalar("propensity", "DOUBLE")], value: (l) => l.propensity ?? null },
  { schema: [utf8("model")], value: (l) => str(l.model) },
  {
    schema: [{ name: "experiment", repetition_type: "OPTIONAL", num_children: 2 }, utf8("id", true), utf8("variant")],
    value: (l) => (l.experiment ? { id: l.experiment.id, variant: l.experiment.variant ?? null } : null),
  },
  { schema: [utf8("cohort")], value: (l) => str(l.cohort) },
  { schema: [utf8("device")], value: (l) => str(l.device) },
];

import type { Command } from "commander";
import cliProgress from "cli-progress";
import { renameSync, rmSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { ConfigError, errorMessage } from "../core/errors.js";
import { LABEL_KINDS, type Label, type LabelKind } from "../core/label.js";
import { FEATURE_ENTITIES, type FeatureEntity } from "../labels/features.js";
import { exportFeatures, featureColumns, type FeatureRow } from "../export/features.js";
import { DEFAULT_MAX_LABELS_IN_MEMORY, LABEL_COLUMNS, exportLabels } from "../export/labels.js";
import { EXPORT_FORMATS, JsonlSink, ParquetSink, type ExportFormat, type RowSink } from "../export/sink.js";
import { connectNats } from "../runtime/nats.js";
import { openPipelineRedis } from "../state/redis.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";

interface ExportFlags extends PipelineOptions {
  format?: string;
  out: string;
  from?: string;
  to?: string;
  kind?: string;
  includeRetracted?: boolean;
  entity: string;
  maxInMemory: number;
}

const WHAT = ["labels", "features"] as const;

/** An RFC 3339 time option in ms; ConfigError (exit 2) when it is not one. */
export function parseTimeOption(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const t = Date.parse(v);
  if (!/^\d{4}-\d{2}-\d{2}/.test(v) || Number.isNaN(t)) throw new ConfigError(`${name} ${v}: expected an RFC 3339 time, e.g. 2026-01-01T00:00:00Z`);
  return t;
}

/** The format: --format, else from the file name (.jsonl / .ndjson / .json → jsonl), else parquet. */
export function formatOf(flag: string | undefined, file: string): ExportFormat {
  if (flag !== undefined) {
    if (!(EXPORT_FORMATS as readonly string[]).includes(flag)) throw new ConfigError(`--format ${flag}: use ${EXPORT_FORMATS.join(" or ")}`);
    return flag as ExportFormat;
  }
  return /\.(jsonl|ndjson|json)$/i.test(file) ? "jsonl" : "parquet";
}

/** Adds `tacit export <pipeline> labels|features --out FILE`. */
export function registerExport(program: Command): void {
  pipelineCommand(
    program
      .command("export <pipeline> <what>")
      .description(
        "write the final view for training: labels (one row per label_id at its latest revision, retracted ones left out) from the label stream, " +
          "or features (a snapshot of one entity's online features from Redis), as Parquet or JSONL",
      )
      .requiredOption("--out <file>", "the file to write (replaced only once the export succeeded)")
      .option("--format <format>", "parquet | jsonl (default: jsonl for a .jsonl/.ndjson/.json file, else parquet)")
      .option("--from <time>", "labels: latest revisions with event_time ≥ this RFC 3339 time")
      .option("--to <time>", "labels: latest revisions with event_time < this RFC 3339 time")
      .option("--kind <kind>", `labels: only this kind (${LABEL_KINDS.join(" | ")})`)
      .option("--include-retracted", "labels: keep retracted labels (their retraction revision, weight 0)")
      .option("--entity <entity>", `features: ${FEATURE_ENTITIES.join(" | ")}`, "response")
      .option("--max-in-memory <n>", "labels: messages deduplicated in memory at once; larger streams spill to temp files by hash of label_id", (v) => Number(v), DEFAULT_MAX_LABELS_IN_MEMORY),
  ).action(
    action(async (file: string, what: string, opts: ExportFlags) => {
      if (!(WHAT as readonly string[]).includes(what)) throw new ConfigError(`unknown export "${what}": use tacit export <pipeline> labels|features --out FILE`);
      const format = formatOf(opts.format, opts.out);
      const fromMs = parseTimeOption("--from", opts.from);
      const toMs = parseTimeOption("--to", opts.to);
      if (fromMs !== undefined && toMs !== undefined && toMs <= fromMs) throw new ConfigError("--to must be after --from");
      if (opts.kind !== undefined && !(LABEL_KINDS as readonly string[]).includes(opts.kind)) throw new ConfigError(`--kind ${opts.kind}: use one of ${LABEL_KINDS.join(", ")}`);
      if (!(FEATURE_ENTITIES as readonly string[]).includes(opts.entity)) throw new ConfigError(`--entity ${opts.entity}: use one of ${FEATURE_ENTITIES.join(", ")}`);
      if (!Number.isInteger(opts.maxInMemory) || opts.maxInMemory < 1) throw new ConfigError("--max-in-memory: a positive integer");
      if (what === "features" && (opts.from || opts.to || opts.kind || opts.includeRetracted)) throw new ConfigError("--from, --to, --kind and --include-retracted apply to labels only");
      const p = loadForCli(file, opts);

      const tty = process.stderr.isTTY && !opts.json;
      const bar = tty ? new cliProgress.SingleBar({ format: `export ${what} [{bar}] {value}/{total} {eta_formatted}` }, cliProgress.Presets.shades_classic) : undefined;
      // Written beside the target and renamed at the end: a failed export leaves the old file as it was.
      const tmp = join(dirname(opts.out), `.${basename(opts.out)}.${process.pid}.tmp`);
      const t0 = performance.now();
      let summary: object;
      try {
        if (what === "labels") {
          const sink: RowSink<Label> =
            format === "parquet" ? new ParquetSink<Label>(tmp, LABEL_COLUMNS, [{ key: "tacit.schema", value: "config/schemas/label.v2.json" }]) : new JsonlSink<Label>(tmp, (l) => JSON.stringify(l));
          const nats = await connectNats(p, "tacit-export");
          try {
            let started = false;
            summary = await exportLabels(p, nats, sink, {
              ...(opts.kind ? { kind: opts.kind as LabelKind } : {}),
              ...(fromMs !== undefined ? { fromMs } : {}),
              ...(toMs !== undefined ? { toMs } : {}),
              includeRetracted: opts.includeRetracted === true,
              maxLabelsInMemory: opts.maxInMemory,
              onProgress: (read, total) => {
                if (!started) bar?.start(total, 0);
                started = true;
                bar?.update(read);
              },
            });
          } catch (err) {
            if (/stream not found/i.test(errorMessage(err))) throw new Error(`the label stream of pipeline ${p.name} does not exist: run tacit deploy first`, { cause: err });
            throw err;
          } finally {
            await nats.nc.close();
          }
          sink.close();
        } else {
          const entity = opts.entity as FeatureEntity;
          const columns = featureColumns(entity);
          const sink: RowSink<FeatureRow> = format === "parquet" ? new ParquetSink<FeatureRow>(tmp, columns) : new JsonlSink<FeatureRow>(tmp, (r) => JSON.stringify(r));
          const redis = openPipelineRedis(p);
          bar?.start(0, 0);
          try {
            summary = await exportFeatures(p, redis, entity, sink, (n) => {
              bar?.setTotal(n);
              bar?.update(n);
            });
          } finally {
            redis.disconnect();
          }
          sink.close();
        }
        bar?.stop();
        renameSync(tmp, opts.out);
      } catch (err) {
        bar?.stop();
        rmSync(tmp, { force: true });
        throw err;
      }
      const result = { what, format, out: opts.out, ...summary, seconds: Math.round(performance.now() - t0) / 1000 };
      out(opts.json, result, () => {
        const r = result as typeof result & { rows: number; messages?: number; labels?: number; retracted_left_out?: number; outside_window?: number; invalid?: number; partitions?: number };
        if (what === "features") return `wrote ${r.rows} ${opts.entity} rows to ${opts.out} (${format}) in ${result.seconds.toFixed(1)} s`;
        return (
          `wrote ${r.rows} labels to ${opts.out} (${format}) in ${result.seconds.toFixed(1)} s: ${r.messages} messages, ${r.labels} label ids, ` +
          `${r.retracted_left_out} retracted and ${r.outside_window} outside --from/--to left out${r.invalid ? `, ${r.invalid} messages not matching label.v2.json skipped` : ""}` +
          `${(r.partitions ?? 1) > 1 ? `; deduplicated in ${r.partitions} spill partitions` : ""}`
        );
      });
      return 0;
    }),
  );
}

import { Cluster, type Redis } from "ioredis";
import type { Pipeline } from "../config/types.js";
import { fieldNames, type FeatureEntity } from "../labels/features.js";
import { scalar, timestampMs, utf8, type ColumnSpec, type RowSink } from "./sink.js";

/*
 * A snapshot of the online features of one entity (user, response or session): one row per
 * entity found in Redis, one typed column per documented field (README, Online features). Keys
 * are found with SCAN (on every master of a cluster) and read with HGETALL in pipelined batches,
 * so memory holds one batch of rows plus the set of keys seen (SCAN may return a key twice).
 */

/** One entity's features as exported: its id, its user and the fields, typed. */
export type FeatureRow = Record<string, string | number | Date | null>;

export type FeatureColumnType = "string" | "timestamp" | "integer" | "double";

/** How a stored feature field is typed in the export (fields not named here are doubles). */
export function featureColumnType(field: string): FeatureColumnType {
  if (field === "query_id" || field === "session_id" || field === "bot_band") return "string";
  if (field === "last_event_time" || field === "start" || field === "end") return "timestamp";
  if (field.startsWith("count_") || ["events", "signal_count", "explicit_up", "explicit_down", "position", "duration_ms"].includes(field)) return "integer";
  return "double";
}

/** The id column of an entity. */
export function featureIdColumn(entity: FeatureEntity): string {
  return entity === "user" ? "user" : `${entity}_id`;
}

/** Every column of an entity's export, in order: its id, its user (responses, sessions), then the documented fields. */
export function featureColumns(entity: FeatureEntity): ColumnSpec<FeatureRow>[] {
  const id = featureIdColumn(entity);
  const cols: ColumnSpec<FeatureRow>[] = [{ schema: [utf8(id, true)], value: (r) => r[id] }];
  if (entity !== "user") cols.push({ schema: [utf8("user", true)], value: (r) => r.user });
  for (const f of fieldNames(entity)) {
    const t = featureColumnType(f);
    const schema = t === "string" ? utf8(f) : t === "timestamp" ? timestampMs(f) : scalar(f, t === "integer" ? "INT64" : "DOUBLE");
    cols.push({ schema: [schema], value: t === "integer" ? (r) => (typeof r[f] === "number" ? BigInt(r[f]) : null) : (r) => r[f] ?? null });
  }
  return cols;
}

/** A stored hash as a row: documented fields only, typed; null for fields not stored. */
function toRow(entity: FeatureEntity, id: string, user: string, hash: Record<string, string>): FeatureRow {
  const row: FeatureRow = { [featureIdColumn(entity)]: id };
  if (entity !== "user") row.user = user;
  for (const f of fieldNames(entity)) {
    const v = hash[f];
    const t = featureColumnType(f);
    if (v === undefined) row[f] = null;
    else if (t === "string") row[f] = v;
    else {
      const n = Number(v);
      row[f] = !Number.isFinite(n) ? null : t === "timestamp" ? new Date(n) : t === "integer" ? Math.round(n) : n;
    }
  }
  return row;
}

export interface FeatureExportSummary {
  entity: FeatureEntity;
  rows: number;
}

/** Writes every stored entity of one kind to `sink`; `onProgress` gets the rows written so far. */
export async function exportFeatures(p: Pipeline, redis: Redis | Cluster, entity: FeatureEntity, sink: RowSink<FeatureRow>, onProgress?: (rows: number) => void): Promise<FeatureExportSummary> {
  const head = `tacit:{${p.subject_prefix}:u:`;
  const tail = entity === "user" ? "}:features:user" : `}:features:${entity}:`;
  const match = `${head.replace(/[*?[\]\\]/g, "\\$&")}*${tail}${entity === "user" ? "" : "*"}`;
  const nodes: Redis[] = redis instanceof Cluster ? redis.nodes("master") : [redis];
  const seen = new Set<string>();
  let rows = 0;
  for (const node of nodes) {
    let cursor = "0";
    do {
      const [next, keys] = await node.scan(cursor, "MATCH", match, "COUNT", 1000);
      cursor = next;
      const fresh = keys.filter((k) => !seen.has(k) && k.startsWith(head) && k.includes(tail));
      if (fresh.length === 0) continue;
      for (const k of fresh) seen.add(k);
      const pipe = node.pipeline();
      for (const k of fresh) pipe.hgetall(k);
      const res = (await pipe.exec()) ?? [];
      const batch: FeatureRow[] = [];
      res.forEach(([err, h], i) => {
        const hash = h as Record<string, string> | null;
        if (err || !hash || Object.keys(hash).length === 0) return;
        const k = fresh[i]!;
        const cut = k.indexOf(tail);
        const user = k.slice(head.length, cut);
        const id = entity === "user" ? user : k.slice(cut + tail.length);
        batch.push(toRow(entity, id, user, hash));
      });
      sink.write(batch);
      rows += batch.length;
      onProgress?.(rows);
    } while (cursor !== "0");
  }
  return { entity, rows };
}

import { closeSync, openSync, writeSync } from "node:fs";
import { ParquetWriter, fileWriter, type SchemaElement } from "hyparquet-writer";

/*
 * Where `tacit export` writes its rows: JSON Lines, or Parquet through hyparquet-writer (pure
 * JavaScript, one dependency, streaming row groups, dictionary encoding per column chunk when it
 * at least halves the encoded size). Rows are buffered up to one row group, so memory is bounded
 * by the row-group size, not by the file.
 */

/** One Parquet column: its schema elements (the column first, then its children, depth first) and how a row gives its value. */
export interface ColumnSpec<R> {
  schema: SchemaElement[];
  value: (row: R) => unknown;
}

/** Rows out, in batches. */
export interface RowSink<R> {
  write(rows: readonly R[]): void;
  /** Flushes what is buffered and closes the file. */
  close(): void;
}

export type ExportFormat = "parquet" | "jsonl";
export const EXPORT_FORMATS: readonly ExportFormat[] = ["parquet", "jsonl"];

/** Rows per Parquet row group. */
const ROW_GROUP_ROWS = 20_000;

/** A nullable UTF-8 column, or a required one. */
export const utf8 = (name: string, required = false): SchemaElement => ({ name, type: "BYTE_ARRAY", converted_type: "UTF8", repetition_type: required ? "REQUIRED" : "OPTIONAL" });
/** A UTC timestamp in milliseconds (DuckDB: TIMESTAMP WITH TIME ZONE; pandas: datetime64[ms, UTC]). */
export const timestampMs = (name: string, required = false): SchemaElement => ({
  name,
  type: "INT64",
  logical_type: { type: "TIMESTAMP", isAdjustedToUTC: true, unit: "MILLIS" },
  repetition_type: required ? "REQUIRED" : "OPTIONAL",
});
export const scalar = (name: string, type: "DOUBLE" | "INT32" | "INT64" | "BOOLEAN", required = false): SchemaElement => ({ name, type, repetition_type: required ? "REQUIRED" : "OPTIONAL" });

/** A Parquet file of typed columns. */
export class ParquetSink<R> implements RowSink<R> {
  private readonly writer: ParquetWriter;
  /** The buffered row group, column by column (values, not rows: a row's other fields are not kept). */
  private data: unknown[][];
  private rows = 0;

  constructor(
    file: string,
    private readonly columns: readonly ColumnSpec<R>[],
    kvMetadata: { key: string; value: string }[] = [],
  ) {
    const schema: SchemaElement[] = [{ name: "root", num_children: columns.length }, ...columns.flatMap((c) => c.schema)];
    this.writer = new ParquetWriter({ writer: fileWriter(file), schema, kvMetadata, createdBy: "tacit export (hyparquet-writer)" });
    this.data = columns.map(() => []);
  }

  write(rows: readonly R[]): void {
    for (const r of rows) {
      this.columns.forEach((c, i) => this.data[i]!.push(c.value(r)));
      if (++this.rows >= ROW_GROUP_ROWS) this.flush();
    }
  }

  private flush(): void {
    if (this.rows === 0) return;
    const columnData = this.columns.map((c, i) => ({ name: c.schema[0]!.name, data: this.data[i]! }));
    this.data = this.columns.map(() => []);
    this.rows = 0;
    void this.writer.write({ columnData, rowGroupSize: ROW_GROUP_ROWS });
  }

  close(): void {
    this.flush();
    this.writer.finish();
  }
}

/** One JSON object per line. */
export class JsonlSink<R> implements RowSink<R> {
  private readonly fd: number;
  private pending: string[] = [];
  private size = 0;

  constructor(
    file: string,
    private readonly toJson: (row: R) => string,
  ) {
    this.fd = openSync(file, "w");
  }

  write(rows: readonly R[]): void {
    for (const r of rows) {
      const line = this.toJson(r) + "\n";
      this.pending.push(line);
      this.size += line.length;
      if (this.size >= 1 << 20) this.flush();
    }
  }

  private flush(): void {
    if (this.pending.length) writeSync(this.fd, this.pending.join(""));
    this.pending = [];
    this.size = 0;
  }

  close(): void {
    this.flush();
    closeSync(this.fd);
  }
}

import type { StageInput } from "../core/operator.js";

/**
 * Event-time progress of one keyed partition, as the worker persists it with every commit and
 * the operator harness keeps it: the highest input sequence applied, the highest event time
 * seen, and the watermark (max event time − the pipeline's bounded out-of-orderness; it never
 * goes back, also after an idle partition was advanced past it).
 */
export interface PartitionProgress {
  /** Highest input sequence whose batch is fully applied (inputs at or below it are skipped). */
  hwm: number;
  maxTs?: number;
  wm?: number;
}

/**
 * Which inputs of a partition's batch run. Inputs at or below the high-water mark have every
 * effect in Redis and every output published (a replay re-reads them, or a takeover finds them
 * delivered but not acked). Redeliveries are out of stream order: an input whose ack_wait ran
 * out while it waited (a loaded machine) comes again behind newer inputs, in any batch, even in
 * its first copy's. Run again, it would meet a later watermark, so only inputs past every
 * earlier one run; the first copy's ack settles a copy (acks go by stream sequence). That an
 * input behind a newer one is a copy holds only while the partition has missed no delivery of
 * its durable: the runner restarts the durable when it has (`gap` in runner.ts).
 */
export function admitInOrder<T extends { seq: number }>(batch: T[], hwm: number): { run: T[]; done: T[]; redelivered: number } {
  let top = hwm;
  const run: T[] = [];
  const done: T[] = [];
  for (const m of batch) {
    if (m.seq <= hwm) done.push(m);
    else if (m.seq > top) {
      top = m.seq;
      run.push(m);
    }
  }
  return { run, done, redelivered: batch.length - run.length - done.length };
}

/**
 * Gives each input the partition's watermark just before it (in stream order, so it does not
 * depend on where batches begin or end) and returns the progress after the batch.
 */
export function assignWatermarks(inputs: StageInput[], progress: PartitionProgress, boundMs: number): { maxTs?: number; wm?: number } {
  let maxTs = progress.maxTs;
  const floor = progress.wm;
  const wmOf = (max: number | undefined) => (max === undefined ? floor : floor === undefined ? max - boundMs : Math.max(floor, max - boundMs));
  for (const input of inputs) {
    input.watermark_ms = wmOf(maxTs);
    const ts = input.envelope?.event?.ts;
    if (typeof ts === "number" && Number.isFinite(ts)) maxTs = maxTs === undefined ? ts : Math.max(maxTs, ts);
  }
  return { maxTs, wm: wmOf(maxTs) };
}

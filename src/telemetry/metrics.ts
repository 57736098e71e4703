import type { OperatorMetrics } from "../core/operator.js";

/**
 * In-process counters and latency samples per stage. The worker exports them through
 * OpenTelemetry (see telemetry/otel.ts); `tacit status` and `tacit bench` read them too.
 * Names follow the standard set every stage emits: in, out, dropped, dlq, side outputs.
 */
export class StageCounters implements OperatorMetrics {
  readonly counts = new Map<string, number>();
  /** Processing latency per batch (ms) and event-time → output latency (ms), bounded reservoirs. */
  readonly batchMs: number[] = [];
  readonly e2eMs: number[] = [];

  constructor(readonly stage: string) {
    // Counters start at zero: every stage's in, out and the runtime's own dead-letter reason exist from the start.
    this.counts.set("in", 0);
    this.counts.set("out", 0);
    this.counts.set("dlq{reason=processing_failed}", 0);
  }

  count(name: string, by = 1, attrs?: Record<string, string>): void {
    let key = name;
    if (attrs) {
      // Built by hand: counted for most inputs, so no arrays per call.
      let sep = "{";
      for (const k in attrs) {
        key += `${sep}${k}=${attrs[k]}`;
        sep = ",";
      }
      key += sep === "{" ? "{}" : "}";
    }
    this.counts.set(key, (this.counts.get(key) ?? 0) + by);
  }

  get(name: string): number {
    let n = 0;
    for (const [k, v] of this.counts) if (k === name || k.startsWith(`${name}{`)) n += v;
    return n;
  }

  sample(into: number[], v: number): void {
    if (into.length >= 10_000) into[Math.floor(Math.random() * into.length)] = v;
    else into.push(v);
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries(this.counts);
  }
}

/** Percentile of a sample (nearest rank); NaN when empty. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

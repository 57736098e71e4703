import { createServer, type Server } from "node:http";
import { PrometheusExporter } from "@opentelemetry/exporter-prometheus";
import { MeterProvider } from "@opentelemetry/sdk-metrics";
import type { Histogram } from "@opentelemetry/api";
import type { StageCounters } from "./metrics.js";

/** What the runtime reports besides counters; implemented by WorkerTelemetry, optional in tests. */
export interface RuntimeObserver {
  batch(stageGroup: string, ms: number, size: number): void;
  /** Event time → output published, for records leaving the last group or a label. */
  endToEnd(stageGroup: string, ms: number): void;
  watermarkLag(stageGroup: string, partition: number, ms: number): void;
  partitionsOwned(stageGroup: string, n: number): void;
}

/** Splits a StageCounters key `dropped{reason=duplicate}` into name and attributes. */
export function parseCounterKey(key: string): { name: string; attrs: Record<string, string> } {
  const open = key.indexOf("{");
  if (open < 0) return { name: key, attrs: {} };
  const attrs: Record<string, string> = {};
  for (const kv of key.slice(open + 1, -1).split(",")) {
    const [k, v] = kv.split("=");
    if (k) attrs[k] = v ?? "";
  }
  return { name: key.slice(0, open), attrs };
}


/**
 * OpenTelemetry metrics for one worker, exported for Prometheus on `/metrics`, with `/healthz`
 * (the process answers) and `/readyz` (connected and consuming) on the same port. Instrumentation
 * wraps the runtime from outside: the worker only bumps plain counters and calls the observer.
 */
export class WorkerTelemetry implements RuntimeObserver {
  private readonly exporter = new PrometheusExporter({ preventServerStart: true });
  private readonly provider = new MeterProvider({ readers: [this.exporter] });
  private readonly batchHist: Histogram;
  private readonly e2eHist: Histogram;
  private readonly lag = new Map<string, { group: string; partition: number; ms: number }>();
  private readonly owned = new Map<string, number>();
  private server?: Server;

  constructor(
    private readonly counters: () => Iterable<StageCounters>,
    private readonly ready: () => boolean,
  ) {
    const meter = this.provider.getMeter("tacit");
    const boundaries = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 300000];
    this.batchHist = meter.createHistogram("tacit_batch_duration_ms", { description: "time to process, publish, commit and ack one batch", unit: "ms", advice: { explicitBucketBoundaries: boundaries } });
    this.e2eHist = meter.createHistogram("tacit_event_to_output_ms", { description: "event time to output published", unit: "ms", advice: { explicitBucketBoundaries: boundaries } });
    const counter = (name: string, description: string, pick: (n: string) => boolean, attr: (n: string, a: Record<string, string>) => Record<string, string>) =>
      meter.createObservableCounter(name, { description }).addCallback((obs) => {
        for (const c of this.counters()) {
          for (const [key, v] of c.counts) {
            const { name: n, attrs } = parseCounterKey(key);
            if (pick(n)) obs.observe(v, { stage: c.stage, ...attr(n, attrs) });
          }
        }
      });
    counter("tacit_stage_in_total", "records into a stage", (n) => n === "in", () => ({}));
    counter("tacit_stage_out_total", "records passed to the next stage", (n) => n === "out", () => ({}));
    counter("tacit_stage_dropped_total", "records dropped on purpose (duplicate, sampled out, …)", (n) => n === "dropped", (_, a) => ({ reason: a.reason ?? "unknown" }));
    counter("tacit_stage_dlq_total", "records dead-lettered", (n) => n === "dlq", (_, a) => ({ reason: a.reason ?? "unknown" }));
    counter("tacit_stage_side_output_total", "records sent to a side output", (n) => n === "side_output", (_, a) => ({ output: a.to ?? "unknown" }));
    meter.createObservableGauge("tacit_watermark_lag_ms", { description: "newest event time seen minus the watermark, per partition" }).addCallback((obs) => {
      for (const l of this.lag.values()) obs.observe(l.ms, { group: l.group, partition: String(l.partition) });
    });
    meter.createObservableGauge("tacit_partitions_owned", { description: "partitions this worker holds a lease on" }).addCallback((obs) => {
      for (const [g, n] of this.owned) obs.observe(n, { group: g });
    });
  }

  batch(group: string, ms: number): void {
    this.batchHist.record(ms, { stage: group });
  }

  endToEnd(group: string, ms: number): void {
    this.e2eHist.record(ms, { group });
  }

  watermarkLag(group: string, partition: number, ms: number): void {
    this.lag.set(`${group}#${partition}`, { group, partition, ms });
  }

  partitionsOwned(group: string, n: number): void {
    this.owned.set(group, n);
  }

  /** Serves /metrics, /healthz and /readyz on `port` (0 = any free port); resolves to the port. */
  async listen(port: number, host = "0.0.0.0"): Promise<number> {
    this.server = createServer((req, res) => {
      const url = (req.url ?? "/").split("?")[0];
      if (url === "/metrics") return this.exporter.getMetricsRequestHandler(req, res);
      if (url === "/healthz") return void res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
      if (url === "/readyz") {
        const ok = this.ready();
        return void res.writeHead(ok ? 200 : 503, { "content-type": "text/plain" }).end(ok ? "ready\n" : "not ready\n");
      }
      res.writeHead(404).end();
    });
    await new Promise<void>((resolve, reject) => {
      this.server!.once("error", reject);
      this.server!.listen(port, host, () => resolve());
    });
    const addr = this.server.address();
    return typeof addr === "object" && addr ? addr.port : port;
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    await this.provider.shutdown().catch(() => undefined);
  }
}

import { createServer, type Server } from "node:http";
import { PrometheusExporter } from "@opentelemetry/exporter-prometheus";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { MeterProvider } from "@opentelemetry/sdk-metrics";
import type { Histogram, Meter, ObservableResult } from "@opentelemetry/api";
import type { Envelope } from "../core/event.js";
import type { StageCounters } from "./metrics.js";
import { REPLAY_OUTCOMES, SliPoller, SliState, type SliSources } from "./slis.js";

/** What the runtime reports besides counters; implemented by WorkerTelemetry, optional in tests. */
export interface RuntimeObserver {
  batch(stageGroup: string, ms: number, size: number): void;
  /** Event time → output published, for records leaving the last group (`next`) or a label (`label`). */
  endToEnd(stageGroup: string, ms: number, output: "label" | "next"): void;
  watermarkLag(stageGroup: string, partition: number, ms: number): void;
  partitionsOwned(stageGroup: string, n: number): void;
  /** The decoded inputs of a batch (freshness, sampled PII check); once per batch. */
  inputs?(stageGroup: string, items: readonly { input: { seq: number; envelope?: Envelope } }[]): void;
  /** A keyed partition committed: its state and online features reflect events up to `maxTs` (ms). */
  committed?(stageGroup: string, maxTs: number): void;
  /** A label published at revision `rev`. */
  label?(value: Record<string, unknown>, rev: number): void;
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


/** Stage counters the runtime itself bumps, exported under fixed names; every other name is an operator's. */
const RUNTIME_COUNTERS: Record<string, { metric: string; help: string; attr?: [string, string] }> = {
  in: { metric: "tacit_stage_in_total", help: "records into a stage" },
  out: { metric: "tacit_stage_out_total", help: "records passed to the next stage" },
  dropped: { metric: "tacit_stage_dropped_total", help: "records dropped on purpose (duplicate, sampled out, ...)", attr: ["reason", "reason"] },
  dlq: { metric: "tacit_stage_dlq_total", help: "records dead-lettered", attr: ["reason", "reason"] },
  side_output: { metric: "tacit_stage_side_output_total", help: "records sent to a side output", attr: ["to", "output"] },
  ingest_delivered: { metric: "tacit_ingest_delivered_total", help: "messages delivered to a stage group's durable (M1: each is settled as ok, dropped, dead_lettered, retried or handed_back)" },
  ingest_settled: { metric: "tacit_ingest_settled_total", help: "messages a stage group settled, by outcome (M1)", attr: ["outcome", "outcome"] },
  publish_resent: { metric: "tacit_publish_resent_total", help: "publishes of a stage group's outputs sent again: unanswered for 2 s (unanswered: taken by a server that died, or by a stream leader that died before storing it; the stream stores it once, by its message id) or answered 503 (no_responders: no stream listened, as while a clustered stream elects its leader)", attr: ["reason", "reason"] },
  partition_resumed: { metric: "tacit_partition_resumed_total", help: "times a keyed partition restarted its durable: at its ack floor because deliveries were missed in flight (missed_deliveries: a reconnect, a consumer leader's death), or after its committed progress because the durable was gone (durable_missing: its owner died while recreating it)", attr: ["reason", "reason"] },
};

/** Seconds buckets from a millisecond batch up to a day (event time to label spans sessions). */
const SECONDS_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400];

/** Options of {@link WorkerTelemetry}. */
export interface TelemetryOptions {
  /** The worker's id: the `service.instance.id` resource attribute (on `target_info`). */
  workerId?: string;
  /** Every n-th input after enrich (by stream sequence) is scanned for PII; 0 = never. @default 100 */
  piiSampleEvery?: number;
}

/**
 * OpenTelemetry metrics for one worker, exported for Prometheus on `/metrics`, with `/healthz`
 * (the process answers) and `/readyz` (connected and consuming) on the same port. Instrumentation
 * wraps the runtime from outside: the worker only bumps plain counters and calls the observer.
 * Names follow Prometheus conventions (base units, `_total`); the resource names the service
 * (`tacit`) and the worker. Operator counters (`labels`, `pii_redacted`, `bot_band`, ...) are
 * exported as `tacit_<name>_total` with the stage and their attributes as labels.
 */
export class WorkerTelemetry implements RuntimeObserver {
  private readonly exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true });
  private readonly provider: MeterProvider;
  private readonly meter: Meter;
  private readonly batchHist: Histogram;
  private readonly e2eHist: Histogram;
  private readonly featureHist: Histogram;
  private readonly lag = new Map<string, { group: string; partition: number; ms: number }>();
  private readonly owned = new Map<string, number>();
  private readonly operatorCounters = new Set<string>();
  readonly slis: SliState;
  private poller?: SliPoller;
  private server?: Server;

  constructor(
    private readonly counters: () => Iterable<StageCounters>,
    private readonly ready: () => boolean,
    opts: TelemetryOptions = {},
  ) {
    this.slis = new SliState(opts.piiSampleEvery ?? 100);
    this.provider = new MeterProvider({
      readers: [this.exporter],
      resource: resourceFromAttributes({ "service.name": "tacit", ...(opts.workerId ? { "service.instance.id": opts.workerId } : {}) }),
    });
    const meter = (this.meter = this.provider.getMeter("tacit"));
    const hist = (name: string, description: string) => meter.createHistogram(name, { description, unit: "s", advice: { explicitBucketBoundaries: SECONDS_BUCKETS } });
    this.batchHist = hist("tacit_batch_duration_seconds", "time to process, publish, commit and ack one batch");
    this.e2eHist = hist("tacit_event_to_output_seconds", "event time to output published (output=label: a label; next: a record leaving the last group) (M2)");
    this.featureHist = hist("tacit_event_to_feature_seconds", "event time of a committed batch's newest event to the commit of its state and online features (M2)");
    for (const [name, c] of Object.entries(RUNTIME_COUNTERS)) this.stageCounter(name, c.metric, c.help, c.attr);
    const gauge = (name: string, description: string, observe: (o: ObservableResult) => void) => meter.createObservableGauge(name, { description }).addCallback(observe);
    gauge("tacit_watermark_lag_seconds", "newest event time seen minus the watermark, per partition", (obs) => {
      for (const l of this.lag.values()) obs.observe(l.ms / 1000, { group: l.group, partition: String(l.partition) });
    });
    gauge("tacit_partitions_owned", "partitions this worker holds a lease on", (obs) => {
      for (const [g, n] of this.owned) obs.observe(n, { group: g });
    });
    const slis = this.slis;
    gauge("tacit_newest_event_timestamp_seconds", "event time of the newest event after enrich, per device (M4)", (obs) => {
      for (const [group, m] of slis.newestByDevice) for (const [device, ts] of m) obs.observe(ts / 1000, { group, device });
    });
    gauge("tacit_newest_event_by_cohort_timestamp_seconds", "event time of the newest event after enrich, per cohort (M4)", (obs) => {
      for (const [group, m] of slis.newestByCohort) for (const [cohort, ts] of m) obs.observe(ts / 1000, { group, cohort });
    });
    gauge("tacit_features_newest_event_timestamp_seconds", "event time of the newest event whose state and online features are committed (M4)", (obs) => {
      for (const [group, ts] of slis.featuresNewest) obs.observe(ts / 1000, { group });
    });
    const counter = (name: string, description: string, observe: (o: ObservableResult) => void) => meter.createObservableCounter(name, { description }).addCallback(observe);
    counter("tacit_pii_detector_checked_total", "post-enrich inputs sampled and scanned for PII (M8)", (obs) => obs.observe(slis.piiChecked));
    counter("tacit_pii_detector_hits_total", "PII found in sampled post-enrich inputs, by kind; must stay 0 (M8)", (obs) => {
      for (const [kind, n] of slis.piiHits) obs.observe(n, { kind });
    });
    counter("tacit_labels_first_published_total", "labels published for the first time (revision 0), by kind and rule (M3)", (obs) => {
      for (const [k, n] of slis.firstLabels) {
        const [kind, rule] = k.split("\u0000");
        obs.observe(n, { kind: kind!, rule: rule! });
      }
    });
    counter("tacit_label_weight_class_total", "labels published by weight class (upper bound; M6)", (obs) => {
      for (const [le, n] of slis.byWeight) obs.observe(n, { class: le });
    });
    counter("tacit_labelled_responses_by_model_total", "response labels published, by the model of the response (M10)", (obs) => {
      for (const [model, n] of slis.byModel) obs.observe(n, { model });
    });
    counter("tacit_labelled_responses_by_position_total", "response labels published, by the position of the response (M10)", (obs) => {
      for (const [position, n] of slis.byPosition) obs.observe(n, { position });
    });
    gauge("tacit_drift_psi", "population stability index of the last drift window against the reference window in Redis (M6)", (obs) => {
      for (const [dimension, v] of this.poller?.psi ?? []) obs.observe(v, { dimension });
    });
    gauge("tacit_consumer_pending", "messages not yet delivered on a durable this worker consumes", (obs) => {
      for (const p of this.poller?.pending.values() ?? []) obs.observe(p.pending, { stream: p.stream, durable: p.durable });
    });
    gauge("tacit_consumer_ack_pending", "messages delivered and not yet acknowledged on a durable this worker consumes", (obs) => {
      for (const p of this.poller?.pending.values() ?? []) obs.observe(p.ackPending, { stream: p.stream, durable: p.durable });
    });
    counter("tacit_replay_runs_total", "tacit replay runs of this pipeline, by outcome (M9; read from Redis, the same on every worker)", (obs) => {
      const r = this.poller?.replay ?? {};
      for (const outcome of REPLAY_OUTCOMES) obs.observe(Number(r[outcome] ?? 0), { outcome });
    });
    gauge("tacit_replay_last_run_timestamp_seconds", "when the last tacit replay of this pipeline ended (M9)", (obs) => {
      const at = Number(this.poller?.replay.last_at);
      if (Number.isFinite(at) && at > 0) obs.observe(at / 1000);
    });
  }

  /** Exports the counters named `name` of every stage as `metric{stage, ...}`. */
  private stageCounter(name: string, metric: string, description: string, attr?: [string, string]): void {
    this.meter.createObservableCounter(metric, { description }).addCallback((obs) => {
      for (const c of this.counters()) {
        for (const [key, v] of c.counts) {
          const { name: n, attrs } = parseCounterKey(key);
          if (n !== name) continue;
          if (attr) obs.observe(v, { stage: c.stage, [attr[1]]: attrs[attr[0]] ?? "unknown" });
          else obs.observe(v, { stage: c.stage, ...attrs });
        }
      }
    });
  }

  /** Instruments for operator counters seen since the last scrape (names are the operators' own, bounded). */
  private addOperatorCounters(): void {
    for (const c of this.counters()) {
      for (const key of c.counts.keys()) {
        const { name } = parseCounterKey(key);
        if (name in RUNTIME_COUNTERS || this.operatorCounters.has(name) || !/^[a-z][a-z0-9_]*$/.test(name)) continue;
        this.operatorCounters.add(name);
        this.stageCounter(name, `tacit_${name.replace(/_total$/, "")}_total`, `operator counter ${name} (see the operator's documentation in the README)`);
      }
    }
  }

  /** Starts the timer that polls pending counts, replay outcomes and drift (see SliPoller). */
  watch(sources: SliSources, opts: { intervalMs?: number; driftWindowMs?: number } = {}): void {
    this.poller?.stop();
    this.poller = new SliPoller(sources, this.slis, opts.intervalMs ?? 15_000, opts.driftWindowMs ?? 3_600_000);
    this.poller.start();
  }

  batch(group: string, ms: number): void {
    this.batchHist.record(ms / 1000, { stage: group });
  }

  endToEnd(group: string, ms: number, output: "label" | "next"): void {
    this.e2eHist.record(ms / 1000, { group, output });
  }

  watermarkLag(group: string, partition: number, ms: number): void {
    this.lag.set(`${group}#${partition}`, { group, partition, ms });
  }

  partitionsOwned(group: string, n: number): void {
    this.owned.set(group, n);
  }

  inputs(group: string, items: readonly { input: { seq: number; envelope?: Envelope } }[]): void {
    this.slis.inputs(group, items);
  }

  committed(group: string, maxTs: number): void {
    this.slis.committed(group, maxTs);
    this.featureHist.record(Math.max(0, Date.now() - maxTs) / 1000, { group });
  }

  label(value: Record<string, unknown>, rev: number): void {
    this.slis.label(value, rev);
  }

  /** Serves /metrics, /healthz and /readyz on `port` (0 = any free port); resolves to the port. */
  async listen(port: number, host = "0.0.0.0"): Promise<number> {
    this.server = createServer((req, res) => {
      const url = (req.url ?? "/").split("?")[0];
      if (url === "/metrics") {
        this.addOperatorCounters();
        return this.exporter.getMetricsRequestHandler(req, res);
      }
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
    this.poller?.stop();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    await this.provider.shutdown().catch(() => undefined);
  }
}

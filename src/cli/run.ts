import type { Command } from "commander";
import type { Cluster, Redis } from "ioredis";
import { hostname } from "node:os";
import { findOperator } from "../../operators/index.js";
import type { Pipeline } from "../config/types.js";
import { parseDuration } from "../core/duration.js";
import { ConfigError, TransientError, errorMessage } from "../core/errors.js";
import type { Logger } from "../core/operator.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { createWorker, type ThreadedWorker } from "../runtime/threads.js";
import { newWorkerId, type Worker } from "../runtime/worker.js";
import { redactUrl } from "../services/embedded.js";
import { openPipelineRedis } from "../state/redis.js";
import { WorkerTelemetry } from "../telemetry/otel.js";
import { WORKER_NODE_FLAGS, hasWorkerNodeFlags } from "../config/paths.js";
import { action, cliLogger, effectiveEnv, loadForCli, pipelineCommand, workerThread, type PipelineOptions } from "./common.js";

/** How long `tacit run` waits for Redis to answer at start before it gives up (exit 1). */
const REDIS_START_TIMEOUT_MS = 5_000;
/**
 * After a failed start, the longest the process may linger on handles it does not own (a
 * library's reconnect timer) before it exits anyway: a worker that cannot start must not stay.
 */
const FAILED_START_EXIT_MS = 500;

/**
 * Opens the pipeline's Redis and waits until it answers a PING. Connection errors are logged,
 * not left to ioredis's "Unhandled error event" printout; an unreachable server at start is a
 * TransientError (`redis_unavailable`, exit 1) naming the URL without its password.
 */
export async function openRedisChecked(p: Pipeline, log: Logger, timeoutMs = REDIS_START_TIMEOUT_MS): Promise<Redis | Cluster> {
  const redis = openPipelineRedis(p);
  let lastError: string | undefined;
  let up = false;
  redis.on("error", (err: unknown) => {
    const msg = errorMessage(err);
    // Once per outage, not once per reconnect attempt.
    if (up && lastError === undefined) log.warn({ err: msg }, "Redis connection lost; reconnecting");
    lastError = msg;
  });
  redis.on("ready", () => {
    if (up && lastError !== undefined) log.info("Redis connection back");
    lastError = undefined;
  });
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      redis.ping(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
    up = true;
    return redis;
  } catch (err) {
    redis.disconnect();
    throw new TransientError("redis_unavailable", `cannot connect to Redis at ${redactUrl(p.redis.url)}: ${lastError ?? errorMessage(err)}`, err);
  } finally {
    clearTimeout(timer);
  }
}

/** Closes the connections the CLI opened for a worker (the worker does not own injected ones). */
async function closeConnections(nats: NatsHandles | undefined, redis: Redis | Cluster | undefined, drain: boolean): Promise<void> {
  if (nats) await (drain ? nats.nc.drain() : nats.nc.close()).catch(() => undefined);
  redis?.disconnect();
}

export function registerRun(program: Command): void {
  pipelineCommand(
    program
      .command("run <pipeline>")
      .description(
        "run workers for the pipeline's stages; SIGTERM/SIGINT drain in-flight work and exit 0. " +
          "A worker that cannot start exits at once and binds nothing: 2 for bad config or a missing secret, 1 for an unreachable server",
      )
      .option("--stage <name...>", "run only these stage groups (by first stage name)")
      .option("--metrics-port <port>", "serve Prometheus /metrics, /healthz and /readyz on this port once the worker has started (0 = off)", (v) => Number(v), 9464)
      .option("--sli-interval <duration>", "how often the worker polls its durables' pending counts, replay outcomes and drift", "15s")
      .option("--drift-window <duration>", "length of a drift window: labels by rule and weight in one window are compared with the reference window in Redis", "1h")
      .option("--pii-sample <n>", "scan every n-th input after enrich for PII that should have been redacted (0 = off)", (v) => Number(v), 100),
  ).action(
    action(async (file: string, opts: PipelineOptions & { stage?: string[]; metricsPort: number; sliInterval: string; driftWindow: string; piiSample: number }) => {
      const p = loadForCli(file, opts);
      const log = cliLogger(process.env.TACIT_LOG_LEVEL ?? "info");
      const sliIntervalMs = Math.max(100, parseDuration(opts.sliInterval, "--sli-interval"));
      const driftWindowMs = parseDuration(opts.driftWindow, "--drift-window");
      if (!Number.isInteger(opts.piiSample) || opts.piiSample < 0) throw new ConfigError(`--pii-sample must be a whole number ≥ 0, got ${opts.piiSample}`);
      let worker: Worker | ThreadedWorker | undefined = undefined;
      const workerId = newWorkerId();
      const telemetry = new WorkerTelemetry(() => worker?.stageCounters.values() ?? [], () => worker?.ready() ?? false, { workerId, piiSampleEvery: opts.piiSample });
      // SIGTERM/SIGINT are taken from the start: one that arrives while the worker is still
      // starting (a scale-down right after a scale-up) stops it as soon as it has started, cleanly,
      // instead of killing the process half way.
      const stopRequested = new Promise<string>((resolve) => {
        process.once("SIGTERM", () => resolve("SIGTERM"));
        process.once("SIGINT", () => resolve("SIGINT"));
      });
      log.debug({ pipeline: p.name }, "starting");
      // The CLI opens (and so closes) the connections: a start that fails half way must leave no
      // reconnecting client behind to keep the process alive.
      let nats: NatsHandles | undefined;
      let redis: Redis | Cluster | undefined;
      try {
        nats = await connectNats(p, `tacit-worker-${hostname()}-${process.pid}`);
        redis = await openRedisChecked(p, log);
        const thread = workerThread(process.env.TACIT_LOG_LEVEL ?? "info", log);
        worker = createWorker({ pipeline: p, operators: findOperator, groups: opts.stage, workerId, log, env: effectiveEnv(), devMode: false, observer: telemetry, nats, redis, requireDeployed: true }, thread);
        await worker.start();
      } catch (err) {
        await worker?.stop().catch(() => undefined);
        await closeConnections(nats, redis, false);
        await telemetry.stop();
        setTimeout(() => process.exit(), FAILED_START_EXIT_MS).unref();
        throw err;
      }
      const started = worker;
      telemetry.watch(
        {
          prefix: p.subject_prefix,
          durables: () => started.durables(),
          consumerInfo: (stream, durable) => nats!.jsm.consumers.info(stream, durable),
          redis: redis!,
          warn: (obj, msg) => log.warn(obj, msg),
        },
        { intervalMs: sliIntervalMs, driftWindowMs },
      );
      // Bound only now, so a worker that cannot start never holds the port.
      if (opts.metricsPort > 0) {
        try {
          const port = await telemetry.listen(opts.metricsPort);
          log.info({ port }, "metrics on /metrics, health on /healthz and /readyz");
        } catch (err) {
          log.warn({ port: opts.metricsPort, err: String(err) }, "metrics port unavailable; running without the endpoint");
        }
      }
      log.info({ worker: worker.id, pipeline: p.name }, "worker started");
      if (!hasWorkerNodeFlags()) log.warn({ flags: WORKER_NODE_FLAGS.join(" ") }, "node started without the worker's flags (bin/tacit.js's shebang and the Dockerfile give them): more CPU per event (README, Operating it); start node with them or set NODE_OPTIONS");
      process.stderr.write(`tacit: worker ${worker.id} running ${p.name}; Ctrl-C or SIGTERM to stop\n`);
      log.info({ signal: await stopRequested }, "draining");
      await started.stop().catch((err: unknown) => log.error({ err: String(err) }, "error while draining"));
      await closeConnections(nats, redis, true);
      await telemetry.stop();
      process.stderr.write("tacit: worker stopped cleanly\n");
      return 0;
    }),
  );
}

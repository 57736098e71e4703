import type { Command } from "commander";
import { findOperator } from "../../operators/index.js";
import { Worker } from "../runtime/worker.js";
import { WorkerTelemetry } from "../telemetry/otel.js";
import { action, cliLogger, effectiveEnv, loadForCli, pipelineCommand, type PipelineOptions } from "./common.js";

export function registerRun(program: Command): void {
  pipelineCommand(
    program
      .command("run <pipeline>")
      .description("run workers for the pipeline's stages; SIGTERM/SIGINT drain in-flight work and exit 0")
      .option("--stage <name...>", "run only these stage groups (by first stage name)")
      .option("--metrics-port <port>", "serve Prometheus /metrics, /healthz and /readyz on this port (0 = off)", (v) => Number(v), 9464),
  ).action(
    action(async (file: string, opts: PipelineOptions & { stage?: string[]; metricsPort: number }) => {
      const p = loadForCli(file, opts);
      const log = cliLogger(process.env.TACIT_LOG_LEVEL ?? "info");
      let worker: Worker | undefined = undefined;
      const telemetry = new WorkerTelemetry(() => worker?.counters.values() ?? [], () => worker?.ready() ?? false);
      worker = new Worker({ pipeline: p, operators: findOperator, groups: opts.stage, log, env: effectiveEnv(), devMode: false, observer: telemetry });
      if (opts.metricsPort > 0) {
        try {
          const port = await telemetry.listen(opts.metricsPort);
          log.info({ port }, "metrics on /metrics, health on /healthz and /readyz");
        } catch (err) {
          log.warn({ port: opts.metricsPort, err: String(err) }, "metrics port unavailable; running without the endpoint");
        }
      }
      await worker.start();
      log.info({ worker: worker.id, pipeline: p.name }, "worker started");
      process.stderr.write(`tacit: worker ${worker.id} running ${p.name}; Ctrl-C or SIGTERM to stop\n`);
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          log.info({ signal: sig }, "draining");
          worker!.stop().then(resolve, (err) => {
            log.error({ err: String(err) }, "error while draining");
            resolve();
          });
        };
        process.once("SIGTERM", () => stop("SIGTERM"));
        process.once("SIGINT", () => stop("SIGINT"));
      });
      await telemetry.stop();
      process.stderr.write("tacit: worker stopped cleanly\n");
      return 0;
    }),
  );
}

import type { Command } from "commander";
import pino from "pino";
import type { Pipeline } from "../config/types.js";
import { loadPipelineOrThrow } from "../config/load.js";
import { ConfigError, TacitError, errorMessage } from "../core/errors.js";
import type { Logger } from "../core/operator.js";
import { findOperator } from "../../operators/index.js";
import type { ThreadSpec } from "../runtime/threads.js";
import { withEmbeddedEnv } from "../services/embedded.js";

/** Options every pipeline command takes. */
export interface PipelineOptions {
  set?: string[];
  json?: boolean;
}

/** Collects a repeatable `--set k=v` option. */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** Adds `--set` and `--json` to a command. */
export function pipelineCommand(cmd: Command): Command {
  return cmd
    .option("--set <path=value>", "override a pipeline value (repeatable), e.g. --set partitions=4", collect, [])
    .option("--json", "print machine-readable JSON");
}

/**
 * The environment commands expand `${VAR}` with: the process environment first (a set NATS_URL or
 * REDIS_URL always wins), then the embedded services' URLs when `tacit services up` is running.
 */
export function effectiveEnv(): Record<string, string | undefined> {
  return withEmbeddedEnv(process.env);
}

/** Loads, validates and compiles a pipeline for a command; problems become a ConfigError (exit 2). */
export function loadForCli(file: string, opts: PipelineOptions): Pipeline {
  return loadPipelineOrThrow(file, { set: opts.set ?? [], env: effectiveEnv(), operators: findOperator });
}

/**
 * How a worker starts its second thread (`runtime.threads`): from worker-thread.ts, logging at
 * `logLevel`. A thread that dies while the worker runs takes the process with it (exit 1), as a
 * crash would: the supervisor starts it again, and what was in flight is redelivered.
 */
export function workerThread(logLevel: string, log: Logger): ThreadSpec {
  return {
    entry: new URL("./worker-thread.js", import.meta.url),
    logLevel,
    onThreadExit: (err) => {
      log.error({ err: errorMessage(err) }, "worker thread died");
      process.stderr.write(`tacit: worker thread died: ${errorMessage(err)}\n`);
      process.exit(1);
    },
  };
}

/** A pino logger on stderr (stdout is for data), quiet unless TACIT_LOG_LEVEL says otherwise. */
export function cliLogger(level = process.env.TACIT_LOG_LEVEL ?? "warn"): Logger {
  return pino({ level, base: undefined }, pino.destination(2));
}

/** Prints data as JSON or as human text. */
export function out(json: boolean | undefined, data: unknown, human: () => string): void {
  process.stdout.write((json ? JSON.stringify(data, null, 2) : human()) + "\n");
}

/**
 * Runs a command body with the CLI's exit codes: 0 success, 1 failure at run time, 2 bad usage
 * or bad config. Errors are printed once, without a stack unless TACIT_DEBUG is set.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<number | void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      const code = await fn(...args);
      process.exitCode = code ?? 0;
    } catch (err) {
      const code = err instanceof ConfigError ? 2 : 1;
      const label = err instanceof TacitError ? `${err.code}: ` : "";
      process.stderr.write(`tacit: ${label}${errorMessage(err)}\n`);
      if (process.env.TACIT_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
      process.exitCode = code;
    }
  };
}

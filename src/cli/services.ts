import type { Command } from "commander";
import { ConfigError, errorMessage } from "../core/errors.js";
import { MissingBinariesError } from "../services/binaries.js";
import {
  SERVICES,
  servicesDown,
  servicesStatus,
  servicesUp,
  type DownEntry,
  type ServiceStatus,
  type UpEntry,
} from "../services/embedded.js";

/** Where the services commands write; tests pass their own. */
export interface ServicesIo {
  out: (text: string) => void;
  err: (text: string) => void;
}

const STD_IO: ServicesIo = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

/** Exit codes shared by every tacit command (SPEC §6). */
const EXIT_RUNTIME = 1;
const EXIT_USAGE = 2;

const pad = (s: string, n: number): string => s.padEnd(n);

function line(service: string, state: string, url?: string, pid?: number, note?: string): string {
  const parts = [`${pad(service, 7)}${pad(state, 9)}${url ?? ""}`.trimEnd()];
  if (pid !== undefined) parts.push(`pid ${pid}`);
  if (note !== undefined) parts.push(note);
  return `${parts.join("  ")}\n`;
}

function upLine(e: UpEntry): string {
  return line(e.service, "running", e.url, e.pid, e.reused ? "(reused)" : "(started)");
}

function statusLine(s: ServiceStatus): string {
  return line(s.service, s.state, s.url, s.pid);
}

function downLine(e: DownEntry): string {
  if (e.action === "not-ours") return line(e.service, "skipped", undefined, e.pid, "(pid now belongs to another program)");
  return line(e.service, "stopped", undefined, e.pid, e.action === "not-running" ? "(was not running)" : undefined);
}

/**
 * Prints `err` for a human and returns the exit code: 2 for usage/config problems (a missing
 * binary, with the exact install command), 1 for run-time failures.
 */
export function reportServicesError(io: ServicesIo, err: unknown): number {
  if (err instanceof MissingBinariesError) {
    io.err(`tacit: ${err.missing.join(" and ")} not found. Install ${err.missing.length > 1 ? "them" : "it"} with:\n${err.message}\n`);
    return EXIT_USAGE;
  }
  io.err(`tacit: ${errorMessage(err)}\n`);
  return err instanceof ConfigError ? EXIT_USAGE : EXIT_RUNTIME;
}

async function run(io: ServicesIo, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (err) {
    process.exitCode = reportServicesError(io, err);
  }
}

/**
 * Adds `tacit services up|down|status` (each with `--json`): the embedded default, a local
 * nats-server -js and redis-server with data under `$TACIT_HOME` (default `./.tacit`).
 */
export function registerServices(program: Command, io: ServicesIo = STD_IO): Command {
  const services = program
    .command("services")
    .description("start, stop or inspect the embedded NATS JetStream and Redis (data under $TACIT_HOME, default ./.tacit)");

  services
    .command("up")
    .description("start nats-server -js and redis-server (standard ports when free, else free ports), or reuse running ones")
    .option("--json", "print the result as JSON")
    .option("--no-install", "never install missing binaries, even as root on Debian")
    .action(async (opts: { json?: boolean; install: boolean }) =>
      run(io, async () => {
        const res = await servicesUp({ install: opts.install, log: (l) => io.err(`${l}\n`) });
        if (opts.json) {
          io.out(`${JSON.stringify(res)}\n`);
          return;
        }
        for (const s of SERVICES) io.out(upLine(res[s]));
        io.out(`export NATS_URL=${res.nats.url} REDIS_URL=${res.redis.url}   # optional: tacit finds them in ${res.home}\n`);
      }),
    );

  services
    .command("down")
    .description("stop the servers started by `services up` (only those exact processes)")
    .option("--json", "print the result as JSON")
    .action(async (opts: { json?: boolean }) =>
      run(io, async () => {
        const res = await servicesDown();
        if (opts.json) io.out(`${JSON.stringify(res)}\n`);
        else for (const s of SERVICES) io.out(downLine(res[s]));
      }),
    );

  services
    .command("status")
    .description("show whether the embedded servers are running, with their URLs")
    .option("--json", "print the result as JSON")
    .action(async (opts: { json?: boolean }) =>
      run(io, async () => {
        const res = await servicesStatus();
        if (opts.json) io.out(`${JSON.stringify(res)}\n`);
        else for (const s of SERVICES) io.out(statusLine(res[s]));
      }),
    );

  return services;
}

import { accessSync, constants, statSync } from "node:fs";
import { delimiter, join } from "node:path";
import { spawn } from "node:child_process";
import { ConfigError, TacitError } from "../core/errors.js";

/** The two server binaries the embedded default runs. */
export const SERVICE_BINARIES = { nats: "nats-server", redis: "redis-server" } as const;
export type ServiceName = keyof typeof SERVICE_BINARIES;

/**
 * Searched after `PATH`: Debian puts nats-server in /usr/sbin, which is not on a normal
 * user's PATH.
 */
export const EXTRA_BIN_DIRS: readonly string[] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];

/** The command a user runs to install both servers on Debian or Ubuntu. */
export const INSTALL_COMMAND = "sudo apt-get install -y nats-server redis-server";

/** Printed under {@link INSTALL_COMMAND}: what to do elsewhere. */
export const INSTALL_HINT_OTHER =
  "# other systems: install nats-server (https://github.com/nats-io/nats-server/releases) and redis-server (https://redis.io/download), and put both on PATH";

/** Absolute paths of both server binaries. */
export interface BinaryPaths {
  nats: string;
  redis: string;
}

/** Where to look for binaries; both default to the real environment. */
export interface FindOptions {
  /** A PATH-style list. @default process.env.PATH */
  path?: string;
  /** Searched after `path`. @default EXTRA_BIN_DIRS */
  extraDirs?: readonly string[];
}

/** Options of {@link ensureBinaries}. */
export interface EnsureOptions extends FindOptions {
  /** Install missing binaries with apt-get when running as root on a Debian-like system. */
  install: boolean;
  /** Progress lines (not apt-get's own output, which goes straight to stderr). */
  log?: (line: string) => void;
  /** @default process.getuid?.() === 0 */
  isRoot?: boolean;
}

/** Thrown when a server binary is missing and tacit may not install it; the CLI exits 2. */
export class MissingBinariesError extends ConfigError {
  /** Binary names that were not found, e.g. `["redis-server"]`. */
  readonly missing: string[];
  constructor(missing: string[], command = INSTALL_COMMAND, hint = INSTALL_HINT_OTHER) {
    // The message is exactly what to run, so a user can copy it.
    super(`${command}\n${hint}`);
    this.missing = missing;
  }
}

function isExecutableFile(file: string): boolean {
  try {
    if (!statSync(file).isFile()) return false;
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Absolute path of an executable named `name` on PATH or in the extra dirs, if any. */
export function findBinary(name: string, opts: FindOptions = {}): string | undefined {
  const pathDirs = (opts.path ?? process.env.PATH ?? "").split(delimiter).filter((d) => d !== "");
  for (const dir of [...pathDirs, ...(opts.extraDirs ?? EXTRA_BIN_DIRS)]) {
    const file = join(dir, name);
    if (isExecutableFile(file)) return file;
  }
  return undefined;
}

/** Both server binaries as far as they can be found. */
export function findBinaries(opts: FindOptions = {}): Partial<BinaryPaths> {
  return {
    nats: findBinary(SERVICE_BINARIES.nats, opts),
    redis: findBinary(SERVICE_BINARIES.redis, opts),
  };
}

function missingOf(found: Partial<BinaryPaths>): string[] {
  return (Object.keys(SERVICE_BINARIES) as ServiceName[])
    .filter((s) => found[s] === undefined)
    .map((s) => SERVICE_BINARIES[s]);
}

function runToStderr(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      // stdout is kept free for the CLI's own (possibly --json) output.
      stdio: ["ignore", 2, 2],
      env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
    });
    child.once("error", (err) => reject(new TacitError("install_failed", `${cmd}: ${err.message}`, { cause: err })));
    child.once("exit", (code, signal) => {
      if (code === 0) resolve();
      else reject(new TacitError("install_failed", `${cmd} ${args.join(" ")} failed (${signal ?? `exit ${code}`})`));
    });
  });
}

/**
 * Finds nats-server and redis-server. When one is missing, installs both with apt-get if
 * `install` is set, we are root and apt-get exists; otherwise throws
 * {@link MissingBinariesError}, whose message is the command to run.
 */
export async function ensureBinaries(opts: EnsureOptions): Promise<BinaryPaths> {
  const found = findBinaries(opts);
  let missing = missingOf(found);
  if (missing.length === 0) return found as BinaryPaths;

  const isRoot = opts.isRoot ?? process.getuid?.() === 0;
  const aptGet = opts.install && isRoot ? findBinary("apt-get", opts) : undefined;
  if (aptGet === undefined) throw new MissingBinariesError(missing);

  opts.log?.(`${missing.join(" and ")} not found: installing nats-server and redis-server with apt-get`);
  await runToStderr(aptGet, ["update"]);
  await runToStderr(aptGet, ["install", "-y", "nats-server", "redis-server"]);

  const after = findBinaries(opts);
  missing = missingOf(after);
  if (missing.length > 0) {
    throw new TacitError("install_failed", `apt-get finished but ${missing.join(" and ")} is still not on PATH or in ${EXTRA_BIN_DIRS.join(", ")}`);
  }
  return after as BinaryPaths;
}

/** The command that installs Prometheus and promtool on Debian or Ubuntu (the test suite needs them; `tacit demo` does not). */
export const PROMETHEUS_INSTALL_COMMAND = "sudo apt-get install -y prometheus";
const PROMETHEUS_HINT_OTHER = "# other systems: install prometheus and promtool (https://prometheus.io/download/) and put both on PATH";

/**
 * Finds prometheus and promtool, which only the test suite uses (test/prometheus.test.ts); like
 * {@link ensureBinaries}, installs Debian's `prometheus` package when `install` is set and we are
 * root, else throws {@link MissingBinariesError} with the command to run.
 */
export async function ensurePrometheus(opts: EnsureOptions): Promise<{ prometheus: string; promtool: string }> {
  const find = () => ({ prometheus: findBinary("prometheus", opts), promtool: findBinary("promtool", opts) });
  const missingNow = (f: ReturnType<typeof find>) => (["prometheus", "promtool"] as const).filter((n) => f[n] === undefined);
  let found = find();
  if (missingNow(found).length === 0) return found as { prometheus: string; promtool: string };
  const isRoot = opts.isRoot ?? process.getuid?.() === 0;
  const aptGet = opts.install && isRoot ? findBinary("apt-get", opts) : undefined;
  if (aptGet === undefined) throw new MissingBinariesError(missingNow(found), PROMETHEUS_INSTALL_COMMAND, PROMETHEUS_HINT_OTHER);
  opts.log?.(`${missingNow(found).join(" and ")} not found: installing prometheus with apt-get`);
  await runToStderr(aptGet, ["update"]);
  await runToStderr(aptGet, ["install", "-y", "--no-install-recommends", "prometheus"]);
  found = find();
  const still = missingNow(found);
  if (still.length > 0) throw new TacitError("install_failed", `apt-get finished but ${still.join(" and ")} is still not on PATH or in ${EXTRA_BIN_DIRS.join(", ")}`);
  return found as { prometheus: string; promtool: string };
}

import { execFileSync } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { basename, join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { TacitError, errorMessage } from "../core/errors.js";
import { SERVICE_BINARIES, ensureBinaries, type FindOptions, type ServiceName } from "./binaries.js";
import {
  freePort,
  isPidAlive,
  isPortFree,
  natsAnswers,
  redisAnswers,
  startNats,
  startRedis,
  stopPid,
  type ServiceHandle,
} from "./processes.js";

/** Ports `services up` uses when they are free. */
export const STANDARD_PORTS: Readonly<Record<ServiceName, number>> = { nats: 4222, redis: 6379 };

/** The services in the order they are started and reported. */
export const SERVICES: readonly ServiceName[] = ["nats", "redis"];

const HOST = "127.0.0.1";
const LOCK_TIMEOUT_MS = 120_000; // covers an apt-get install by a concurrent `up`
const SETTLE_TIMEOUT_MS = 5_000;

/** One server as recorded in services.json. */
export interface ServiceRecord {
  url: string;
  pid: number;
  port: number;
}

/** `<home>/services.json`: what `services up` started. */
export interface ServicesFile {
  nats: ServiceRecord;
  redis: ServiceRecord;
  /** RFC 3339 wall-clock time of the last `up` that started something. */
  started_at: string;
}

/** Options of the `services` functions. */
export interface ServicesOptions {
  /** @default tacitHome() */
  home?: string;
  /** Progress lines for humans (the CLI sends them to stderr). */
  log?: (line: string) => void;
}

/** Options of {@link servicesUp}. */
export interface UpOptions extends ServicesOptions, FindOptions {
  /** Install missing binaries with apt-get when root on Debian. @default false */
  install?: boolean;
  /** Ports to use when free; a free port is picked otherwise. @default STANDARD_PORTS */
  preferredPorts?: Partial<Record<ServiceName, number>>;
  /** @default 10_000 */
  readyTimeoutMs?: number;
}

/** What `services up` did for one server. */
export interface UpEntry extends ServiceRecord {
  service: ServiceName;
  /** True when a server from an earlier `up` was alive and answering and was kept. */
  reused: boolean;
}

/** Result of {@link servicesUp}. */
export interface UpResult {
  home: string;
  started_at: string;
  nats: UpEntry;
  redis: UpEntry;
}

/** What `services down` did for one server. */
export interface DownEntry {
  service: ServiceName;
  pid?: number;
  /**
   * `stopped`: it was ours and is gone now. `not-running`: nothing to stop.
   * `not-ours`: the recorded pid now belongs to another program, so it was left alone.
   */
  action: "stopped" | "not-running" | "not-ours";
}

/** Result of {@link servicesDown}. */
export interface DownResult {
  home: string;
  nats: DownEntry;
  redis: DownEntry;
}

/** State of one server for `services status`. */
export interface ServiceStatus {
  service: ServiceName;
  /** `unresponsive`: our process is alive but does not answer its protocol. */
  state: "running" | "stopped" | "unresponsive";
  url?: string;
  pid?: number;
  port?: number;
}

/** Result of {@link servicesStatus}. */
export interface StatusResult {
  home: string;
  nats: ServiceStatus;
  redis: ServiceStatus;
}

/** The directory of the embedded default: `$TACIT_HOME`, else `./.tacit`. */
export function tacitHome(env: NodeJS.ProcessEnv = process.env): string {
  const fromEnv = env.TACIT_HOME;
  return resolve(fromEnv !== undefined && fromEnv !== "" ? fromEnv : ".tacit");
}

/** Path of services.json in `home`. */
export function servicesFilePath(home: string = tacitHome()): string {
  return join(home, "services.json");
}

function isRecord(v: unknown): v is ServiceRecord {
  if (typeof v !== "object" || v === null) return false;
  const r = v as Record<string, unknown>;
  return typeof r.url === "string" && Number.isInteger(r.pid) && Number.isInteger(r.port);
}

/** services.json of `home`, or undefined when absent or unreadable. */
export function readServicesFile(home: string = tacitHome()): ServicesFile | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(servicesFilePath(home), "utf8"));
  } catch {
    return undefined;
  }
  const f = parsed as Partial<ServicesFile> | null;
  if (f === null || typeof f !== "object" || !isRecord(f.nats) || !isRecord(f.redis)) return undefined;
  return { nats: f.nats, redis: f.redis, started_at: typeof f.started_at === "string" ? f.started_at : "" };
}

function writeServicesFile(home: string, file: ServicesFile): void {
  const path = servicesFilePath(home);
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(file, null, 2)}\n`);
  renameSync(tmp, path); // readers never see a half-written file
}

/** argv of `pid` as one string, or undefined when it cannot be read. */
function commandLine(pid: number): string | undefined {
  try {
    // redis-server rewrites its title in place ("redis-server 127.0.0.1:6379"), so NULs and spaces both separate.
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0+/g, " ").trim();
  } catch {
    // no /proc (macOS): ask ps
  }
  try {
    return execFileSync("ps", ["-o", "command=", "-p", String(pid)], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
  } catch {
    return undefined;
  }
}

/**
 * Whether `record.pid` is still the server we started: alive, running the right binary, with
 * the recorded port on its command line. Guards against killing a recycled pid.
 */
export function isOurServer(service: ServiceName, record: ServiceRecord): boolean {
  if (!isPidAlive(record.pid)) return false;
  const cmd = commandLine(record.pid);
  if (cmd === undefined || cmd === "") return false;
  const argv0 = cmd.split(/\s+/)[0] ?? "";
  return basename(argv0) === SERVICE_BINARIES[service] && new RegExp(`(^|[\\s:])${record.port}(\\s|$)`).test(cmd);
}

function answers(service: ServiceName, port: number): Promise<boolean> {
  return service === "nats" ? natsAnswers(HOST, port) : redisAnswers(HOST, port);
}

async function answersWithin(service: ServiceName, port: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await answers(service, port)) return true;
    if (Date.now() >= deadline) return false;
    await sleep(100);
  }
}

/** `preferred` when it is free, else a free port from the OS. */
export async function choosePort(preferred: number | undefined): Promise<number> {
  if (preferred !== undefined && preferred > 0 && (await isPortFree(preferred, HOST))) return preferred;
  return freePort(HOST);
}

/** Serializes `up` and `down` on one home, so two concurrent `up`s do not start two sets. */
async function withLock<T>(home: string, fn: () => Promise<T>): Promise<T> {
  mkdirSync(home, { recursive: true });
  const lock = join(home, "services.lock");
  const deadline = Date.now() + LOCK_TIMEOUT_MS;
  for (;;) {
    try {
      const fd = openSync(lock, "wx");
      writeFileSync(fd, String(process.pid));
      closeSync(fd);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const holder = Number.parseInt(readFileSafe(lock), 10);
    if (!isPidAlive(holder)) {
      rmSync(lock, { force: true }); // left by a process that died
      continue;
    }
    if (Date.now() >= deadline) {
      throw new TacitError("services_locked", `another tacit process (pid ${holder}) holds ${lock}; wait for it or remove the file if that process is not tacit`);
    }
    await sleep(100);
  }
  try {
    return await fn();
  } finally {
    rmSync(lock, { force: true });
  }
}

function readFileSafe(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function recordOf(h: ServiceHandle): ServiceRecord {
  return { url: h.url, pid: h.pid, port: h.port };
}

/**
 * Starts the embedded default (nats-server -js and redis-server, detached, data and logs under
 * `<home>/nats` and `<home>/redis`), reusing servers from an earlier `up` that are still alive
 * and answering. Writes `<home>/services.json`.
 */
export async function servicesUp(opts: UpOptions = {}): Promise<UpResult> {
  const home = opts.home ?? tacitHome();
  return withLock(home, async () => {
    const prev = readServicesFile(home);
    const kept: Partial<Record<ServiceName, ServiceRecord>> = {};
    for (const service of SERVICES) {
      const rec = prev?.[service];
      if (rec === undefined || !isOurServer(service, rec)) continue;
      // It may still be loading its data (Redis replaying a large AOF): give it a moment.
      if (await answersWithin(service, rec.port, SETTLE_TIMEOUT_MS)) {
        kept[service] = rec;
      } else {
        opts.log?.(`${SERVICE_BINARIES[service]} (pid ${rec.pid}) does not answer: restarting it`);
        await stopPid(rec.pid);
      }
    }

    const started: ServiceHandle[] = [];
    const entries: Partial<Record<ServiceName, UpEntry>> = {};
    try {
      const toStart = SERVICES.filter((s) => kept[s] === undefined);
      const binaries = toStart.length > 0 ? await ensureBinaries({ ...opts, install: opts.install ?? false }) : undefined;
      for (const service of SERVICES) {
        const rec = kept[service];
        if (rec !== undefined) {
          entries[service] = { service, ...rec, reused: true };
          continue;
        }
        const port = await choosePort(opts.preferredPorts?.[service] ?? STANDARD_PORTS[service]);
        const common = {
          port,
          host: HOST,
          dataDir: join(home, service),
          detached: true,
          readyTimeoutMs: opts.readyTimeoutMs,
          binary: binaries?.[service],
        };
        const handle = service === "nats" ? await startNats(common) : await startRedis(common);
        started.push(handle);
        opts.log?.(`started ${SERVICE_BINARIES[service]} on ${handle.url} (pid ${handle.pid}, log ${handle.logFile})`);
        entries[service] = { service, ...recordOf(handle), reused: false };
      }
    } catch (err) {
      // Do not leave a half-started set behind without a services.json that names it.
      await Promise.allSettled(started.map((h) => h.stop()));
      throw err;
    }

    const nats = entries.nats as UpEntry;
    const redis = entries.redis as UpEntry;
    const started_at = started.length === 0 && prev?.started_at ? prev.started_at : new Date().toISOString();
    writeServicesFile(home, {
      nats: { url: nats.url, pid: nats.pid, port: nats.port },
      redis: { url: redis.url, pid: redis.pid, port: redis.port },
      started_at,
    });
    return { home, started_at, nats, redis };
  });
}

/**
 * Stops exactly the servers named in `<home>/services.json` — each only after checking that
 * its pid still runs that server — and removes the file.
 */
export async function servicesDown(opts: ServicesOptions = {}): Promise<DownResult> {
  const home = opts.home ?? tacitHome();
  if (!existsSync(servicesFilePath(home))) {
    return { home, nats: { service: "nats", action: "not-running" }, redis: { service: "redis", action: "not-running" } };
  }
  return withLock(home, async () => {
    const file = readServicesFile(home);
    const result: DownResult = {
      home,
      nats: { service: "nats", action: "not-running" },
      redis: { service: "redis", action: "not-running" },
    };
    for (const service of SERVICES) {
      const rec = file?.[service];
      if (rec === undefined) continue;
      if (isOurServer(service, rec)) {
        await stopPid(rec.pid);
        result[service] = { service, pid: rec.pid, action: "stopped" };
        opts.log?.(`stopped ${SERVICE_BINARIES[service]} (pid ${rec.pid})`);
      } else {
        result[service] = { service, pid: rec.pid, action: isPidAlive(rec.pid) ? "not-ours" : "not-running" };
        if (isPidAlive(rec.pid)) opts.log?.(`pid ${rec.pid} is no longer ${SERVICE_BINARIES[service]}: left alone`);
      }
    }
    rmSync(servicesFilePath(home), { force: true });
    return result;
  });
}

/** Whether each recorded server is running (alive, ours, answering). */
export async function servicesStatus(opts: ServicesOptions = {}): Promise<StatusResult> {
  const home = opts.home ?? tacitHome();
  const file = readServicesFile(home);
  const one = async (service: ServiceName): Promise<ServiceStatus> => {
    const rec = file?.[service];
    if (rec === undefined || !isOurServer(service, rec)) return { service, state: "stopped" };
    const state = (await answers(service, rec.port)) ? "running" : "unresponsive";
    return { service, state, url: rec.url, pid: rec.pid, port: rec.port };
  };
  const [nats, redis] = await Promise.all([one("nats"), one("redis")]);
  return { home, nats, redis };
}

/** Connection variables of the embedded servers. */
export interface EmbeddedEnv {
  NATS_URL?: string;
  REDIS_URL?: string;
}

/**
 * `NATS_URL` / `REDIS_URL` of the embedded servers whose processes are alive (no network
 * round trip, so it is cheap enough for every CLI start). Empty when `services up` was not run.
 */
export function embeddedEnv(home: string = tacitHome()): EmbeddedEnv {
  const file = readServicesFile(home);
  const out: EmbeddedEnv = {};
  if (file === undefined) return out;
  if (isOurServer("nats", file.nats)) out.NATS_URL = file.nats.url;
  if (isOurServer("redis", file.redis)) out.REDIS_URL = file.redis.url;
  return out;
}

/** `env` with the embedded URLs filled in where `env` leaves them unset or empty: a set variable always wins. */
export function withEmbeddedEnv(env: NodeJS.ProcessEnv = process.env, home: string = tacitHome(env)): NodeJS.ProcessEnv {
  const merged: NodeJS.ProcessEnv = { ...env };
  for (const [k, v] of Object.entries(embeddedEnv(home))) {
    if (merged[k] === undefined || merged[k] === "") merged[k] = v;
  }
  return merged;
}

/** Where a connection URL came from. */
export type ConnectionSource = "env" | "embedded";

/** Result of {@link resolveConnection}. */
export interface ResolvedConnection {
  natsUrl: string;
  redisUrl: string;
  source: Record<ServiceName, ConnectionSource>;
}

/** Hides the password of a URL before it is printed. */
export function redactUrl(url: string): string {
  return url.replace(/(\/\/[^:/@]*:)[^@/]*@/, "$1***@").replace(/(\/\/)([^:/@]+)@/, "$1***@");
}

/** host and port of each server in a NATS (comma-separated) or Redis URL. */
export function urlEndpoints(url: string, defaultPort: number): { host: string; port: number }[] {
  return url
    .split(",")
    .map((u) => u.trim())
    .filter((u) => u !== "")
    .map((u) => {
      const parsed = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(u) ? u : `nats://${u}`);
      return { host: parsed.hostname.replace(/^\[|\]$/g, "") || HOST, port: parsed.port === "" ? defaultPort : Number(parsed.port) };
    });
}

function tcpReachable(host: string, port: number, timeoutMs: number): Promise<string | undefined> {
  return new Promise((resolvePromise) => {
    const sock = connect({ host, port });
    const done = (problem: string | undefined): void => {
      clearTimeout(timer);
      sock.destroy();
      resolvePromise(problem);
    };
    const timer = setTimeout(() => done(`no answer within ${timeoutMs} ms`), timeoutMs);
    sock.once("connect", () => done(undefined));
    sock.once("error", (err) => done(errorMessage(err)));
  });
}

/**
 * Picks the NATS and Redis URLs (a set `NATS_URL` / `REDIS_URL` wins over the embedded
 * servers) and checks that something listens there, so a wrong variable is reported as such
 * instead of as a stream of connection retries. Throws a TacitError (`service_unreachable`).
 */
export async function resolveConnection(
  env: NodeJS.ProcessEnv = process.env,
  opts: { home?: string; timeoutMs?: number } = {},
): Promise<ResolvedConnection> {
  const emb = embeddedEnv(opts.home ?? tacitHome(env));
  const timeoutMs = opts.timeoutMs ?? 2_000;
  const pick = async (service: ServiceName): Promise<{ url: string; source: ConnectionSource }> => {
    const varName = service === "nats" ? "NATS_URL" : "REDIS_URL";
    const fromEnv = env[varName];
    if (fromEnv !== undefined && fromEnv !== "") {
      let problem: string | undefined;
      try {
        const results = await Promise.all(urlEndpoints(fromEnv, STANDARD_PORTS[service]).map((e) => tcpReachable(e.host, e.port, timeoutMs)));
        problem = results.length === 0 ? "no server in the URL" : results.every((r) => r !== undefined) ? results[0] : undefined;
      } catch (err) {
        problem = `not a valid URL (${errorMessage(err)})`;
      }
      if (problem !== undefined) {
        throw new TacitError(
          "service_unreachable",
          `${varName} is set to ${redactUrl(fromEnv)} but nothing answers there (${problem}). Start that server, or unset ${varName} to use the embedded services (tacit services up).`,
        );
      }
      return { url: fromEnv, source: "env" };
    }
    const url = emb[varName];
    if (url === undefined) {
      throw new TacitError("service_unreachable", `no ${SERVICE_BINARIES[service]} to connect to: run \`tacit services up\` or set ${varName}`);
    }
    return { url, source: "embedded" };
  };
  const [nats, redis] = await Promise.all([pick("nats"), pick("redis")]);
  return { natsUrl: nats.url, redisUrl: redis.url, source: { nats: nats.source, redis: redis.source } };
}

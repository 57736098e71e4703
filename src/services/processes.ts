import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, readSync } from "node:fs";
import { createServer, connect } from "node:net";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { TacitError, errorMessage } from "../core/errors.js";
import { SERVICE_BINARIES, findBinary, type ServiceName } from "./binaries.js";
import { within } from "../core/wait.js";

/** A running server started by {@link startNats} or {@link startRedis}. */
export interface ServiceHandle {
  /** `nats://host:port` or `redis://host:port`. */
  url: string;
  pid: number;
  port: number;
  host: string;
  /** Where a detached server writes its output. */
  logFile?: string;
  /** SIGTERM, wait, then SIGKILL after `stopTimeoutMs`. Resolves once the process is gone. */
  stop(): Promise<void>;
}

/** Options shared by both servers. */
export interface StartOptions {
  port: number;
  /** Created if missing. NATS keeps JetStream under `<dataDir>/jetstream`; Redis its AOF in `dataDir`. */
  dataDir: string;
  /** Interface to listen on. @default "127.0.0.1" */
  host?: string;
  /** Path of the server binary. @default found on PATH or in EXTRA_BIN_DIRS */
  binary?: string;
  /** @default 10_000 */
  readyTimeoutMs?: number;
  /** Grace period between SIGTERM and SIGKILL. @default 5_000 */
  stopTimeoutMs?: number;
  /**
   * Start in its own session, output appended to `logFile`, not tied to this process: it
   * keeps running after we exit (for `tacit services up`). Otherwise the server is killed
   * when this process exits.
   * @default false
   */
  detached?: boolean;
  /** Only with `detached`. @default `<dataDir>/<binary name>.log` */
  logFile?: string;
}

/** Options of {@link startNats}. */
export interface NatsStartOptions extends StartOptions {
  /** HTTP monitoring port (`-m`); none when absent. */
  monitorPort?: number;
}

/** Options of {@link startRedis}. */
export type RedisStartOptions = StartOptions;

const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_READY_TIMEOUT_MS = 10_000;
const DEFAULT_STOP_TIMEOUT_MS = 5_000;
const PROBE_TIMEOUT_MS = 1_000;
const POLL_INTERVAL_MS = 50;
const TAIL_BYTES = 4_096;

// Non-detached servers must not outlive us, even when a test throws before stop().
const attached = new Set<ChildProcess>();
let exitHookInstalled = false;
function killAttachedOnExit(child: ChildProcess): void {
  attached.add(child);
  child.once("exit", () => attached.delete(child));
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once("exit", () => {
    for (const c of attached) {
      try {
        c.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  });
}

/**
 * The range the kernel picks outgoing connections' source ports from (Linux; the IANA range
 * elsewhere). A port handed out by `listen(0)` comes from it too, so a server started on such a
 * port can find it taken by somebody's outgoing connection — for example a cluster node dialing
 * its routes before its peers have bound theirs.
 */
export function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/).map(Number);
    if (lo && hi && lo <= hi) return [lo, hi];
  } catch {
    // not Linux
  }
  return [49152, 65535];
}

const LOW_PORT = 20_000;
const PORT_PROBES = 64;

function listenOn(port: number, host: string): Promise<ReturnType<typeof createServer> | undefined> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", () => resolve(undefined));
    srv.listen({ port, host, exclusive: true }, () => resolve(srv));
  });
}

/**
 * `n` distinct ports that are free right now on `host`, chosen below the ephemeral range so no
 * outgoing connection can be holding one when a server binds it (another process may still
 * take one later: callers that start servers retry on new ports). With `pairedOffset`, port +
 * offset is free and below the range too (Redis Cluster's bus listens on port + 10000). Falls
 * back to ports the OS picks when nothing below the range is free.
 */
export async function freePorts(n: number, host = DEFAULT_HOST, pairedOffset = 0): Promise<number[]> {
  const top = ephemeralRange()[0] - pairedOffset;
  const held: ReturnType<typeof createServer>[] = [];
  const ports: number[] = [];
  const taken = (p: number) => ports.includes(p) || ports.includes(p - pairedOffset) || ports.includes(p + pairedOffset);
  try {
    for (let probes = 0; ports.length < n && probes < PORT_PROBES * n && top > LOW_PORT; probes++) {
      const port = LOW_PORT + Math.floor(Math.random() * (top - LOW_PORT));
      if (taken(port)) continue;
      const srv = await listenOn(port, host);
      if (!srv) continue;
      const pair = pairedOffset ? await listenOn(port + pairedOffset, host) : undefined;
      if (pairedOffset && !pair) {
        await new Promise((r) => srv.close(r));
        continue;
      }
      held.push(srv, ...(pair ? [pair] : []));
      ports.push(port);
    }
    while (ports.length < n) {
      const srv = await listenOn(0, host);
      const addr = srv?.address();
      if (!srv || typeof addr !== "object" || addr === null) throw new Error(`could not find a free port on ${host}`);
      held.push(srv);
      ports.push(addr.port);
    }
    return ports;
  } finally {
    await Promise.all(held.map((s) => new Promise((r) => s.close(r))));
  }
}

/** A port that is free right now on `host` (see {@link freePorts}). */
export async function freePort(host = DEFAULT_HOST): Promise<number> {
  return (await freePorts(1, host))[0]!;
}

/** Whether `port` can be listened on at `host` right now. */
export async function isPortFree(port: number, host = DEFAULT_HOST): Promise<boolean> {
  const srv = await listenOn(port, host);
  if (!srv) return false;
  await new Promise((r) => srv.close(r));
  return true;
}

/**
 * Opens a TCP connection, optionally writes `send`, and resolves with the first line the
 * server sends (without CRLF). Rejects on connection error or after `timeoutMs`.
 */
export function readFirstLine(host: string, port: number, send: string | undefined, timeoutMs = PROBE_TIMEOUT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port });
    let buf = "";
    const done = (err: Error | undefined, line?: string): void => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(line ?? "");
    };
    const timer = setTimeout(() => done(new Error(`no answer from ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
    sock.setEncoding("utf8");
    sock.once("error", (err) => done(err));
    sock.once("connect", () => {
      if (send !== undefined) sock.write(send);
    });
    sock.on("data", (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf("\n");
      if (nl >= 0) done(undefined, buf.slice(0, nl).replace(/\r$/, ""));
    });
    sock.once("end", () => done(new Error(`${host}:${port} closed the connection`)));
  });
}

/** Whether a NATS server with JetStream enabled answers at host:port (reads its INFO line). */
export async function natsAnswers(host: string, port: number, timeoutMs = PROBE_TIMEOUT_MS): Promise<boolean> {
  try {
    const line = await readFirstLine(host, port, undefined, timeoutMs);
    if (!line.startsWith("INFO ")) return false;
    const info = JSON.parse(line.slice(5)) as { jetstream?: boolean };
    return info.jetstream === true;
  } catch {
    return false;
  }
}

/** Whether a Redis server answers PING with PONG at host:port (not while it loads its AOF). */
export async function redisAnswers(host: string, port: number, timeoutMs = PROBE_TIMEOUT_MS): Promise<boolean> {
  try {
    return (await readFirstLine(host, port, "PING\r\n", timeoutMs)) === "+PONG";
  } catch {
    return false;
  }
}

/** Whether `pid` names a live process (a zombie counts as gone). */
export function isPidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
  try {
    // "pid (comm) S ..." — comm may contain spaces, so read the state after the last ')'.
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return true; // no /proc: trust kill(0)
  }
}

/**
 * Sends SIGTERM to `pid`, waits up to `timeoutMs` for it to go, then SIGKILL. For processes we
 * did not spawn in this process (`tacit services down`); the caller checks the pid is ours.
 */
export async function stopPid(pid: number, timeoutMs = DEFAULT_STOP_TIMEOUT_MS): Promise<void> {
  if (!signal(pid, "SIGTERM")) return;
  if (await waitUntil(() => !isPidAlive(pid), timeoutMs)) return;
  signal(pid, "SIGKILL");
  if (!(await waitUntil(() => !isPidAlive(pid), 2_000))) {
    throw new TacitError("service_stop_failed", `process ${pid} is still alive after SIGKILL`);
  }
}

function signal(pid: number, sig: NodeJS.Signals): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false;
  }
}

async function waitUntil(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (cond()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(POLL_INTERVAL_MS);
  }
}

/** Last bytes a server wrote, for error messages. */
class OutputTail {
  private text = "";
  constructor(
    private readonly logFile?: string,
    private readonly fromOffset = 0,
  ) {}
  push(chunk: Buffer): void {
    this.text = (this.text + chunk.toString("utf8")).slice(-TAIL_BYTES);
  }
  read(): string {
    if (this.logFile === undefined) return this.text.trim();
    try {
      const fd = openSync(this.logFile, "r");
      try {
        const size = fstatSync(fd).size;
        const start = Math.max(this.fromOffset, size - TAIL_BYTES);
        const buf = Buffer.alloc(size - start);
        readSync(fd, buf, 0, buf.length, start);
        return buf.toString("utf8").trim();
      } finally {
        closeSync(fd);
      }
    } catch {
      return "";
    }
  }
}

function withTail(message: string, tail: OutputTail): string {
  const text = tail.read();
  return text === "" ? message : `${message}\n--- server output (last lines) ---\n${text}`;
}

interface ProcessSpec {
  service: ServiceName;
  scheme: "nats" | "redis";
  args: string[];
  answers: (host: string, port: number) => Promise<boolean>;
}

async function startServer(spec: ProcessSpec, opts: StartOptions): Promise<ServiceHandle> {
  const name = SERVICE_BINARIES[spec.service];
  const host = opts.host ?? DEFAULT_HOST;
  const readyTimeoutMs = opts.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS;
  const stopTimeoutMs = opts.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT_MS;
  const binary = opts.binary ?? findBinary(name) ?? name;
  mkdirSync(opts.dataDir, { recursive: true });

  let child: ChildProcess;
  let tail: OutputTail;
  let logFile: string | undefined;
  if (opts.detached) {
    logFile = opts.logFile ?? join(opts.dataDir, `${name}.log`);
    mkdirSync(dirname(logFile), { recursive: true });
    const fd = openSync(logFile, "a");
    try {
      tail = new OutputTail(logFile, fstatSync(fd).size);
      child = spawn(binary, spec.args, { detached: true, stdio: ["ignore", fd, fd] });
    } finally {
      closeSync(fd); // the child has its own copy
    }
    child.unref();
  } else {
    tail = new OutputTail();
    child = spawn(binary, spec.args, { stdio: ["ignore", "pipe", "pipe"] });
    for (const s of [child.stdout, child.stderr]) {
      s?.on("data", (c: Buffer) => tail.push(c));
      // A forgotten handle must not keep the process (or a test run) alive; the exit hook kills it.
      (s as unknown as { unref?: () => void } | null)?.unref?.();
    }
    child.unref();
    killAttachedOnExit(child);
  }

  let exited: string | undefined;
  let spawnError: Error | undefined;
  const exitPromise = new Promise<void>((resolve) => {
    child.once("exit", (code, sig) => {
      exited = sig ?? `exit code ${code}`;
      resolve();
    });
    child.once("error", (err) => {
      spawnError = err;
      exited ??= "spawn error";
      resolve();
    });
  });

  const what = `${name} on ${host}:${opts.port}`;
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (spawnError !== undefined) {
      throw new TacitError("service_start_failed", `could not start ${binary}: ${errorMessage(spawnError)}`, { cause: spawnError });
    }
    if (exited !== undefined) {
      throw new TacitError("service_start_failed", withTail(`${what} exited during startup (${exited})`, tail));
    }
    // Race the exit: if the port belongs to someone else, the probe would wait for its timeout.
    if (await Promise.race([spec.answers(host, opts.port), exitPromise.then(() => false)])) break;
    if (Date.now() >= deadline) {
      child.kill("SIGKILL");
      await within(exitPromise, 2_000);
      throw new TacitError("service_start_failed", withTail(`${what} did not become ready within ${readyTimeoutMs} ms`, tail));
    }
    await sleep(POLL_INTERVAL_MS);
  }

  const pid = child.pid;
  if (pid === undefined) throw new TacitError("service_start_failed", `${what}: no pid`);
  return {
    url: `${spec.scheme}://${host}:${opts.port}`,
    pid,
    port: opts.port,
    host,
    logFile,
    async stop(): Promise<void> {
      if (exited !== undefined) return;
      child.kill("SIGTERM");
      await within(exitPromise, stopTimeoutMs);
      if (exited !== undefined) return;
      child.kill("SIGKILL");
      await within(exitPromise, 2_000);
      if (exited === undefined) throw new TacitError("service_stop_failed", `${what} (pid ${pid}) is still alive after SIGKILL`);
    },
  };
}

/** Starts `nats-server -js` with JetStream storage under `<dataDir>/jetstream`; resolves once it answers. */
export function startNats(opts: NatsStartOptions): Promise<ServiceHandle> {
  const host = opts.host ?? DEFAULT_HOST;
  const args = ["-js", "-a", host, "-p", String(opts.port), "-sd", join(opts.dataDir, "jetstream")];
  if (opts.monitorPort !== undefined) args.push("-m", String(opts.monitorPort));
  return startServer({ service: "nats", scheme: "nats", args, answers: (h, p) => natsAnswers(h, p) }, opts);
}

/**
 * Starts `redis-server` with an append-only file in `dataDir` (so a restart keeps its
 * state) and no RDB snapshots; resolves once it answers PING.
 */
export function startRedis(opts: RedisStartOptions): Promise<ServiceHandle> {
  const host = opts.host ?? DEFAULT_HOST;
  const args = [
    "--port", String(opts.port),
    "--bind", host,
    "--dir", opts.dataDir,
    "--appendonly", "yes",
    "--save", "",
    "--daemonize", "no",
    "--protected-mode", "no",
  ];
  return startServer({ service: "redis", scheme: "redis", args, answers: (h, p) => redisAnswers(h, p) }, opts);
}

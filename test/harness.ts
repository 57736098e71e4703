import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { ensureBinaries } from "../src/services/binaries.js";
import { freePort, startNats, startRedis, type ServiceHandle } from "../src/services/processes.js";

/** A private nats-server -js and redis-server for one test, on free ports in a fresh temp dir. */
export interface TestServers {
  natsUrl: string;
  redisUrl: string;
  natsPort: number;
  redisPort: number;
  /** Temp dir holding both servers' data; removed by stop(). */
  dir: string;
  /** Stops Redis (SIGTERM, which flushes the AOF; `hard` = SIGKILL, a crash). Same port and dir stay reserved for restartRedis. */
  stopRedis(opts?: { hard?: boolean }): Promise<void>;
  /** Starts Redis again on the same port and dir (stopping it first if it runs): its AOF brings the data back. */
  restartRedis(): Promise<void>;
  /** Stops NATS; restartNats brings it back with the same JetStream store. */
  stopNats(opts?: { hard?: boolean }): Promise<void>;
  restartNats(): Promise<void>;
  /** Kills both servers and removes `dir`. Safe to call twice. */
  stop(): Promise<void>;
}

const START_ATTEMPTS = 3;

// Another process can take a port between freePort() and the server's bind: retry on a new one.
async function startOnFreePort(start: (port: number) => Promise<ServiceHandle>): Promise<ServiceHandle> {
  let last: unknown;
  for (let i = 0; i < START_ATTEMPTS; i++) {
    try {
      return await start(await freePort());
    } catch (err) {
      last = err;
    }
  }
  throw last;
}

async function kill(h: ServiceHandle | undefined, hard: boolean): Promise<void> {
  if (h === undefined) return;
  if (hard) {
    try {
      process.kill(h.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
  await h.stop();
}

/**
 * Starts real nats-server and redis-server on free ports (never 4222/6379) with data in a new
 * mkdtemp dir. The servers die with this process even if stop() is never reached.
 */
export async function startServers(): Promise<TestServers> {
  const bins = await ensureBinaries({ install: false });
  const dir = mkdtempSync(join(tmpdir(), "tacit-test-"));
  const natsDir = join(dir, "nats");
  const redisDir = join(dir, "redis");
  let nats: ServiceHandle | undefined;
  let redis: ServiceHandle | undefined;
  let stopped = false;

  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    const results = await Promise.allSettled([kill(nats, false), kill(redis, false)]);
    rmSync(dir, { recursive: true, force: true });
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  };

  try {
    nats = await startOnFreePort((port) => startNats({ port, dataDir: natsDir, binary: bins.nats }));
    redis = await startOnFreePort((port) => startRedis({ port, dataDir: redisDir, binary: bins.redis }));
  } catch (err) {
    await stop().catch(() => undefined);
    throw err;
  }
  const natsPort = nats.port;
  const redisPort = redis.port;

  return {
    natsUrl: nats.url,
    redisUrl: redis.url,
    natsPort,
    redisPort,
    dir,
    stop,
    async stopRedis(opts = {}) {
      await kill(redis, opts.hard ?? false);
    },
    async restartRedis() {
      await kill(redis, false);
      redis = await startRedis({ port: redisPort, dataDir: redisDir, binary: bins.redis });
    },
    async stopNats(opts = {}) {
      await kill(nats, opts.hard ?? false);
    },
    async restartNats() {
      await kill(nats, false);
      nats = await startNats({ port: natsPort, dataDir: natsDir, binary: bins.nats });
    },
  };
}

/**
 * Starts servers for one node:test test and stops them when it ends, pass or fail:
 * `test("x", (t) => withServers(t, async (s) => { ... }))`.
 */
export async function withServers<T>(t: TestContext, fn: (servers: TestServers) => Promise<T>): Promise<T> {
  const servers = await startServers();
  t.after(() => servers.stop());
  try {
    return await fn(servers);
  } finally {
    await servers.stop();
  }
}

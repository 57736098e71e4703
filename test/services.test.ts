import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { Command } from "commander";
import { Redis } from "ioredis";
import { TacitError } from "../src/core/errors.js";
import {
  INSTALL_COMMAND,
  MissingBinariesError,
  ensureBinaries,
  findBinary,
} from "../src/services/binaries.js";
import {
  freePort,
  freePorts,
  ephemeralRange,
  isPidAlive,
  isPortFree,
  natsAnswers,
  readFirstLine,
  redisAnswers,
  startNats,
} from "../src/services/processes.js";
import {
  embeddedEnv,
  readServicesFile,
  resolveConnection,
  servicesDown,
  servicesStatus,
  servicesUp,
  withEmbeddedEnv,
  type ServicesFile,
} from "../src/services/embedded.js";
import { registerServices, reportServicesError } from "../src/cli/services.js";
import { startServers, withServers } from "./harness.js";

function tempDir(t: { after: (fn: () => void) => void }, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

// Detached servers outlive this process by design; if a test dies before `down`, kill them here.
const detachedPids = new Set<number>();
process.once("exit", () => {
  for (const pid of detachedPids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // gone
    }
  }
});
function remember(file: ServicesFile | undefined): void {
  if (file) for (const pid of [file.nats.pid, file.redis.pid]) detachedPids.add(pid);
}

/** `services down` in `home` when the test ends, whatever happened. */
function downAfter(t: { after: (fn: () => Promise<void>) => void }, home: string): void {
  t.after(async () => {
    remember(readServicesFile(home));
    await servicesDown({ home });
  });
}

function listen(port = 0): Promise<Server> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen({ port, host: "127.0.0.1" }, () => resolve(srv));
  });
}

function redisClient(url: string): Redis {
  return new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
}

/** Safe to call twice: a second ioredis disconnect() would leave a 2 s timer behind. */
function close(r: Redis): void {
  if (r.status !== "end") r.disconnect();
}

test("findBinary finds the installed servers and honours PATH order and the exec bit", (t) => {
  for (const name of ["nats-server", "redis-server"]) {
    const found = findBinary(name);
    assert.ok(found, `${name} should be found`);
    assert.equal(basename(found), name);
    const version = spawnSync(found, ["--version"], { encoding: "utf8" });
    assert.equal(version.status, 0);
    assert.match(version.stdout, name === "nats-server" ? /nats-server: v\d/ : /Redis server v=\d/);
  }

  const dir = tempDir(t, "tacit-bin-");
  const fake = join(dir, "nats-server");
  writeFileSync(fake, "#!/bin/sh\nexit 0\n");
  chmodSync(fake, 0o644);
  assert.notEqual(findBinary("nats-server", { path: dir }), fake, "a non-executable file is skipped");
  assert.equal(findBinary("nats-server", { path: dir, extraDirs: [] }), undefined);
  chmodSync(fake, 0o755);
  assert.equal(findBinary("nats-server", { path: dir }), fake, "PATH comes before the extra dirs");
});

test("ensureBinaries: missing binaries without install give the exact install command", async (t) => {
  const empty = { path: "", extraDirs: [] as string[] };
  await assert.rejects(ensureBinaries({ ...empty, install: false }), (err: unknown) => {
    assert.ok(err instanceof MissingBinariesError);
    assert.equal(err.code, "config");
    assert.deepEqual(err.missing, ["nats-server", "redis-server"]);
    const [first, second] = err.message.split("\n");
    assert.equal(first, INSTALL_COMMAND);
    assert.equal(INSTALL_COMMAND, "sudo apt-get install -y nats-server redis-server");
    assert.match(second ?? "", /other systems/);
    return true;
  });

  // Root with install enabled, but no apt-get on this (empty) search path: nothing is run.
  await assert.rejects(ensureBinaries({ ...empty, install: true, isRoot: true }), MissingBinariesError);

  const dir = tempDir(t, "tacit-bin-");
  const fakeRedis = join(dir, "redis-server");
  writeFileSync(fakeRedis, "#!/bin/sh\nexit 0\n", { mode: 0o755 });
  await assert.rejects(ensureBinaries({ path: dir, extraDirs: [], install: false }), (err: unknown) => {
    assert.ok(err instanceof MissingBinariesError);
    assert.deepEqual(err.missing, ["nats-server"]);
    return true;
  });

  const found = await ensureBinaries({ install: false });
  assert.equal(basename(found.nats), "nats-server");
  assert.equal(basename(found.redis), "redis-server");
});

test("freePort / isPortFree, and a server whose port is taken fails with its output", async (t) => {
  const port = await freePort();
  assert.ok(port > 0);
  assert.equal(await isPortFree(port), true);
  const srv = await listen(port);
  t.after(() => srv.close());
  assert.equal(await isPortFree(port), false);

  // A set of ports for a cluster: distinct, free, and outside the range outgoing connections use.
  const set = await freePorts(9);
  assert.equal(new Set(set).size, 9);
  const [lo, hi] = ephemeralRange();
  for (const p of set) {
    assert.ok(p < lo || p > hi, `${p} is outside the ephemeral range ${lo}-${hi}`);
    assert.equal(await isPortFree(p), true);
  }

  const dir = tempDir(t, "tacit-nats-");
  await assert.rejects(startNats({ port, dataDir: dir, readyTimeoutMs: 5_000 }), (err: Error) => {
    assert.match(err.message, new RegExp(`nats-server on 127\\.0\\.0\\.1:${port}`));
    assert.match(err.message, /address already in use/i);
    return true;
  });
});

test("harness: two independent sets of servers at once, and Redis restart keeps data", async (t) => {
  const [a, b] = await Promise.all([startServers(), startServers()]);
  t.after(() => Promise.all([a.stop(), b.stop()]).then(() => undefined));

  const ports = [a.natsPort, a.redisPort, b.natsPort, b.redisPort];
  assert.equal(new Set(ports).size, 4, `ports must differ: ${ports.join(",")}`);
  assert.notEqual(a.dir, b.dir);
  for (const s of [a, b]) {
    assert.equal(s.natsUrl, `nats://127.0.0.1:${s.natsPort}`);
    assert.equal(s.redisUrl, `redis://127.0.0.1:${s.redisPort}`);
    const info = JSON.parse((await readFirstLine("127.0.0.1", s.natsPort, undefined)).slice(5)) as { port: number; jetstream: boolean };
    assert.equal(info.port, s.natsPort);
    assert.equal(info.jetstream, true);
  }

  const ra = redisClient(a.redisUrl);
  const rb = redisClient(b.redisUrl);
  t.after(() => {
    close(ra);
    close(rb);
  });
  await ra.set("k", "from-a");
  assert.equal(await rb.get("k"), null, "the two Redis servers are independent");
  // Close before the restart: a client that watches its server die lingers on reconnect timers.
  close(ra);
  close(rb);

  await a.stopRedis();
  assert.equal(await redisAnswers("127.0.0.1", a.redisPort), false);
  await a.restartRedis();
  assert.equal(await redisAnswers("127.0.0.1", a.redisPort), true);
  const ra2 = redisClient(a.redisUrl);
  t.after(() => close(ra2));
  assert.equal(await ra2.get("k"), "from-a", "AOF brings the key back on the same port");
  close(ra2);

  const dirA = a.dir;
  await a.stop();
  assert.equal(existsSync(dirA), false, "stop() removes the temp dir");
  assert.equal(await natsAnswers("127.0.0.1", a.natsPort), false);
  assert.equal(await natsAnswers("127.0.0.1", b.natsPort), true, "stopping one set leaves the other");
});

test("withServers stops the servers when the body throws", async (t) => {
  let natsPort = 0;
  await assert.rejects(
    withServers(t, async (s) => {
      natsPort = s.natsPort;
      assert.equal(await natsAnswers("127.0.0.1", s.natsPort), true);
      throw new Error("boom");
    }),
    /boom/,
  );
  assert.ok(natsPort > 0);
  assert.equal(await natsAnswers("127.0.0.1", natsPort), false);
});

test("services up/status/down in a temp TACIT_HOME: reuse, AOF across restarts, exact pids", async (t) => {
  const home = tempDir(t, "tacit-home-");
  downAfter(t, home);
  const preferredPorts = { nats: await freePort(), redis: await freePort() };

  const up1 = await servicesUp({ home, preferredPorts });
  remember(readServicesFile(home));
  assert.equal(up1.nats.reused, false);
  assert.equal(up1.redis.reused, false);
  assert.equal(up1.nats.port, preferredPorts.nats, "a free preferred port is used");
  assert.equal(up1.redis.port, preferredPorts.redis);
  assert.equal(up1.nats.url, `nats://127.0.0.1:${preferredPorts.nats}`);
  assert.equal(up1.redis.url, `redis://127.0.0.1:${preferredPorts.redis}`);

  const file = readServicesFile(home);
  assert.deepEqual(file, {
    nats: { url: up1.nats.url, pid: up1.nats.pid, port: up1.nats.port },
    redis: { url: up1.redis.url, pid: up1.redis.pid, port: up1.redis.port },
    started_at: up1.started_at,
  });
  assert.ok(!Number.isNaN(Date.parse(up1.started_at)));
  assert.ok(existsSync(join(home, "nats", "jetstream")), "JetStream store under the home");

  const st = await servicesStatus({ home });
  assert.equal(st.nats.state, "running");
  assert.equal(st.redis.state, "running");
  assert.equal(st.nats.url, up1.nats.url);
  assert.equal(st.redis.pid, up1.redis.pid);

  assert.deepEqual(embeddedEnv(home), { NATS_URL: up1.nats.url, REDIS_URL: up1.redis.url });
  const merged = withEmbeddedEnv({ TACIT_HOME: home, NATS_URL: "nats://elsewhere:4222" }, home);
  assert.equal(merged.NATS_URL, "nats://elsewhere:4222", "a set NATS_URL wins");
  assert.equal(merged.REDIS_URL, up1.redis.url);

  const conn = await resolveConnection({}, { home });
  assert.deepEqual(conn, { natsUrl: up1.nats.url, redisUrl: up1.redis.url, source: { nats: "embedded", redis: "embedded" } });
  const closed = await freePort();
  await assert.rejects(
    resolveConnection({ NATS_URL: `nats://user:secret@127.0.0.1:${closed}` }, { home }),
    (err: Error) => {
      assert.match(err.message, new RegExp(`NATS_URL is set to nats://user:\\*\\*\\*@127\\.0\\.0\\.1:${closed} but nothing answers there`));
      assert.doesNotMatch(err.message, /secret/);
      return true;
    },
  );

  const up2 = await servicesUp({ home, preferredPorts });
  assert.equal(up2.nats.reused, true);
  assert.equal(up2.redis.reused, true);
  assert.equal(up2.nats.pid, up1.nats.pid);
  assert.equal(up2.redis.pid, up1.redis.pid);
  assert.equal(up2.started_at, up1.started_at);

  const r1 = redisClient(up1.redis.url);
  t.after(() => close(r1));
  await r1.set("tacit:test:key", "kept");
  close(r1);

  // An unrelated server of the same kind must survive `down`.
  const bystander = await startServers();
  t.after(() => bystander.stop());

  const down = await servicesDown({ home });
  assert.deepEqual(down.nats, { service: "nats", pid: up1.nats.pid, action: "stopped" });
  assert.deepEqual(down.redis, { service: "redis", pid: up1.redis.pid, action: "stopped" });
  assert.equal(isPidAlive(up1.nats.pid), false);
  assert.equal(isPidAlive(up1.redis.pid), false);
  assert.equal(existsSync(join(home, "services.json")), false);
  assert.equal(await natsAnswers("127.0.0.1", bystander.natsPort), true);
  assert.equal(await redisAnswers("127.0.0.1", bystander.redisPort), true);
  assert.deepEqual(embeddedEnv(home), {});
  const st2 = await servicesStatus({ home });
  assert.equal(st2.nats.state, "stopped");
  assert.equal(st2.redis.state, "stopped");

  const up3 = await servicesUp({ home, preferredPorts: { nats: 0, redis: 0 } });
  remember(readServicesFile(home));
  assert.equal(up3.redis.reused, false);
  assert.notEqual(up3.redis.pid, up1.redis.pid);
  const r3 = redisClient(up3.redis.url);
  t.after(() => close(r3));
  assert.equal(await r3.get("tacit:test:key"), "kept", "Redis data survives down/up (AOF)");
  close(r3);
});

test("services up falls back to a free port when the preferred one is taken", async (t) => {
  const home = tempDir(t, "tacit-home-");
  downAfter(t, home);
  const taken = await listen();
  t.after(() => taken.close());
  const addr = taken.address();
  const takenPort = typeof addr === "object" && addr !== null ? addr.port : 0;

  const up = await servicesUp({ home, preferredPorts: { nats: takenPort, redis: takenPort } });
  remember(readServicesFile(home));
  assert.notEqual(up.nats.port, takenPort);
  assert.notEqual(up.redis.port, takenPort);
  assert.notEqual(up.nats.port, up.redis.port);
  assert.equal(await natsAnswers("127.0.0.1", up.nats.port), true);
  assert.equal(await redisAnswers("127.0.0.1", up.redis.port), true);
});

test("services down never kills a pid that is no longer our server", async (t) => {
  const home = tempDir(t, "tacit-home-");
  const sleeper = spawn("sleep", ["30"], { stdio: "ignore" });
  t.after(() => sleeper.kill("SIGKILL"));
  const pid = sleeper.pid ?? 0;
  assert.ok(pid > 0);
  // A stale services.json whose pids were recycled by an unrelated program.
  const stale: ServicesFile = {
    nats: { url: "nats://127.0.0.1:4222", pid, port: 4222 },
    redis: { url: "redis://127.0.0.1:6379", pid, port: 6379 },
    started_at: "2024-01-01T00:00:00.000Z",
  };
  writeFileSync(join(home, "services.json"), JSON.stringify(stale));

  assert.deepEqual(embeddedEnv(home), {});
  assert.equal((await servicesStatus({ home })).nats.state, "stopped");
  const down = await servicesDown({ home });
  assert.equal(down.nats.action, "not-ours");
  assert.equal(down.redis.action, "not-ours");
  assert.equal(isPidAlive(pid), true, "the unrelated process is untouched");
  assert.equal(existsSync(join(home, "services.json")), false);
});

test("CLI: services status and down print short lines and JSON", async (t) => {
  const home = tempDir(t, "tacit-home-");
  downAfter(t, home);
  const saved = { home: process.env.TACIT_HOME, exitCode: process.exitCode };
  process.env.TACIT_HOME = home;
  process.exitCode = undefined; // the runner sets 1 when an earlier test failed
  t.after(() => {
    if (saved.home === undefined) delete process.env.TACIT_HOME;
    else process.env.TACIT_HOME = saved.home;
    process.exitCode = saved.exitCode;
  });

  const run = async (...args: string[]): Promise<{ out: string; err: string }> => {
    let out = "";
    let err = "";
    const program = new Command("tacit").exitOverride();
    registerServices(program, { out: (s) => void (out += s), err: (s) => void (err += s) });
    await program.parseAsync(["node", "tacit", ...args]);
    return { out, err };
  };

  const stopped = JSON.parse((await run("services", "status", "--json")).out) as { nats: { state: string }; redis: { state: string } };
  assert.equal(stopped.nats.state, "stopped");
  assert.equal(stopped.redis.state, "stopped");

  const up = await servicesUp({ home, preferredPorts: { nats: 0, redis: 0 } });
  remember(readServicesFile(home));
  const human = (await run("services", "status")).out.split("\n").filter((l) => l !== "");
  assert.deepEqual(human, [
    `nats   running  ${up.nats.url}  pid ${up.nats.pid}`,
    `redis  running  ${up.redis.url}  pid ${up.redis.pid}`,
  ]);

  const down = JSON.parse((await run("services", "down", "--json")).out) as { nats: { action: string; pid: number } };
  assert.equal(down.nats.action, "stopped");
  assert.equal(down.nats.pid, up.nats.pid);
  assert.equal(isPidAlive(up.redis.pid), false);
  assert.ok(process.exitCode === undefined || process.exitCode === 0, `exit code ${process.exitCode}`);
});

test("CLI errors: a missing binary exits 2 with the install command, a run-time failure exits 1", async () => {
  let err = "";
  const io = { out: () => undefined, err: (s: string) => void (err += s) };
  const missing = await ensureBinaries({ path: "", extraDirs: [], install: false }).then(
    () => assert.fail("expected MissingBinariesError"),
    (e: unknown) => e,
  );
  assert.equal(reportServicesError(io, missing), 2);
  const lines = err.split("\n");
  assert.equal(lines[0], "tacit: nats-server and redis-server not found. Install them with:");
  assert.equal(lines[1], "sudo apt-get install -y nats-server redis-server");

  err = "";
  assert.equal(reportServicesError(io, new TacitError("service_start_failed", "redis-server exited during startup")), 1);
  assert.equal(err, "tacit: redis-server exited during startup\n");
});

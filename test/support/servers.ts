import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { freePort, freePorts, natsAnswers, redisAnswers } from "../../src/services/processes.js";
import { onlineReplicas } from "../../src/state/redis.js";

/**
 * Servers the harness does not start (TLS servers, NATS and Redis clusters) as child processes
 * of the test, killed with it; and test certificates made by openssl.
 */

export interface Proc {
  child: ChildProcess;
  /** The last ~8 kB of its stdout and stderr. */
  output(): string;
  running(): boolean;
  /** SIGTERM (or SIGKILL with `hard`), then SIGKILL after 5 s; resolves once it is gone. */
  stop(opts?: { hard?: boolean }): Promise<void>;
}

const started = new Set<ChildProcess>();
process.once("exit", () => {
  for (const c of started) c.kill("SIGKILL");
});

export function startProcess(cmd: string, args: string[], cwd?: string): Proc {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], cwd });
  started.add(child);
  let out = "";
  let exited = false;
  child.once("exit", () => ((exited = true), started.delete(child)));
  for (const s of [child.stdout!, child.stderr!]) s.on("data", (c: Buffer) => (out = (out + c.toString()).slice(-8_000)));
  return {
    child,
    output: () => out,
    running: () => !exited,
    async stop(opts = {}) {
      if (exited) return;
      const gone = new Promise((r) => child.once("exit", r));
      child.kill(opts.hard ? "SIGKILL" : "SIGTERM");
      if (await Promise.race([gone.then(() => true), sleep(5_000, undefined, { ref: false }).then(() => false)])) return;
      child.kill("SIGKILL");
      await gone;
    },
  };
}

/** Waits until `ready` holds; fails with the process's output if it exits or takes too long. */
export async function waitReady(what: string, p: Proc, ready: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!p.running()) throw new Error(`${what} exited during start-up:\n${p.output()}`);
    if (await ready().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what} not ready within ${timeoutMs} ms:\n${p.output()}`);
    await sleep(50);
  }
}

/** Test PKI in `dir`: a CA, a server certificate for 127.0.0.1, a client certificate, another CA, and an expired server certificate. */
export interface TestCerts {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A CA that signed none of these. */
  otherCa: string;
  /** A server certificate from `ca` whose validity ended yesterday. */
  expiredCert: string;
}

function openssl(dir: string, args: string[]): void {
  const r = spawnSync("openssl", args, { cwd: dir, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.stderr}`);
}

export function makeCerts(dir: string): TestCerts {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  openssl(dir, ["req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tacit-test-ca"]);
  openssl(dir, ["req", "-x509", ...ec, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=tacit-other-ca"]);
  writeFileSync(join(dir, "server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  writeFileSync(join(dir, "client.ext"), "extendedKeyUsage=clientAuth\n");
  openssl(dir, ["req", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
  openssl(dir, ["req", ...ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=tacit-worker"]);
  const sign = (csr: string, out: string, ext: string, days: string) => openssl(dir, ["x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", out, "-days", days, "-extfile", ext]);
  sign("server.csr", "server.pem", "server.ext", "2");
  sign("server.csr", "expired.pem", "server.ext", "-1");
  sign("client.csr", "client.pem", "client.ext", "2");
  const f = (n: string) => join(dir, n);
  return { ca: f("ca.pem"), serverCert: f("server.pem"), serverKey: f("server.key"), clientCert: f("client.pem"), clientKey: f("client.key"), otherCa: f("other-ca.pem"), expiredCert: f("expired.pem") };
}

/** nats-server with JetStream, TLS (client certificates required when `verify`), and one user. */
export async function startTlsNats(dir: string, tls: { cert: string; key: string; ca: string; verify: boolean }, user: { name: string; password: string }): Promise<{ proc: Proc; url: string }> {
  const port = await freePort();
  const conf = join(dir, `nats-${port}.conf`);
  writeFileSync(
    conf,
    [
      `listen: 127.0.0.1:${port}`,
      `jetstream { store_dir: "${join(dir, `js-${port}`)}" }`,
      `tls { cert_file: "${tls.cert}", key_file: "${tls.key}", ca_file: "${tls.ca}", verify: ${tls.verify}, timeout: 2 }`,
      `authorization { users = [ { user: "${user.name}", password: "${user.password}" } ] }`,
    ].join("\n"),
  );
  const proc = startProcess("nats-server", ["-c", conf]);
  // The TLS handshake comes after the INFO line, so the plain probe still answers.
  await waitReady("nats-server (TLS)", proc, () => natsAnswers("127.0.0.1", port));
  return { proc, url: `tls://127.0.0.1:${port}` };
}

/** redis-server on a TLS port only (no plain port), with AUTH; client certificates required when `verify`. */
export async function startTlsRedis(dir: string, tls: { cert: string; key: string; ca: string; verify: boolean }, password: string): Promise<{ proc: Proc; url: string }> {
  const port = await freePort();
  const proc = startProcess("redis-server", [
    "--port", "0", "--tls-port", String(port), "--bind", "127.0.0.1",
    "--tls-cert-file", tls.cert, "--tls-key-file", tls.key, "--tls-ca-cert-file", tls.ca, "--tls-auth-clients", tls.verify ? "yes" : "no",
    "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", dir,
  ]);
  await waitReady("redis-server (TLS)", proc, async () => /Ready to accept connections/.test(proc.output()));
  return { proc, url: `rediss://127.0.0.1:${port}` };
}

/** A Redis Cluster of `masters` masters with one replica each, on loopback, from `redis-cli --cluster create`. */
export interface RedisCluster {
  /** `redis+cluster://127.0.0.1:p1,…` (all nodes). */
  url: string;
  nodes: { port: number; proc: Proc }[];
  /** The ports of the current masters (asked of a live node). */
  masters(): Promise<number[]>;
  /** The port of a master's replica (asked of the master). */
  replicaOf(port: number): number;
  stop(): Promise<void>;
}

export async function startRedisCluster(dir: string, count = 3, nodeTimeoutMs = 2_000): Promise<RedisCluster> {
  // Each node's cluster bus listens on port + 10000: both must be free.
  const ports = await freePorts(count * 2, "127.0.0.1", 10_000);
  const nodes = ports.map((port) => ({
    port,
    proc: startProcess("redis-server", [
      "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--dbfilename", `dump-${port}.rdb`, "--appendonly", "yes", "--appendfilename", `aof-${port}.aof`,
      "--appenddirname", `aof-${port}`, "--save", "", "--cluster-enabled", "yes", "--cluster-config-file", `nodes-${port}.conf`, "--cluster-node-timeout", String(nodeTimeoutMs), "--protected-mode", "no",
    ]),
  }));
  const stop = async () => {
    await Promise.all(nodes.map((n) => n.proc.stop({ hard: true })));
  };
  try {
    for (const n of nodes) await waitReady(`redis-server ${n.port}`, n.proc, () => redisAnswers("127.0.0.1", n.port));
    const create = spawnSync("redis-cli", ["--cluster", "create", ...ports.map((p) => `127.0.0.1:${p}`), "--cluster-replicas", "1", "--cluster-yes"], { encoding: "utf8", timeout: 30_000 });
    if (create.status !== 0) throw new Error(`redis-cli --cluster create: ${create.stdout}\n${create.stderr}`);
    await waitFor("the cluster to be ok", async () => {
      const r = spawnSync("redis-cli", ["--cluster", "check", `127.0.0.1:${ports[0]}`], { encoding: "utf8" });
      return r.status === 0 && /All 16384 slots covered/.test(r.stdout);
    });
    // Replicas take a moment to sync: until then a master's WAIT has no replica to answer it.
    await waitFor("every replica to be in sync", async () => {
      const online = ports.map((p) => onlineReplicas(spawnSync("redis-cli", ["-p", String(p), "info", "replication"], { encoding: "utf8" }).stdout));
      return online.reduce((a, b) => a + b, 0) === count;
    });
  } catch (err) {
    await stop();
    throw err;
  }
  const masters = async () => {
    for (const n of nodes) {
      if (!n.proc.running()) continue;
      const r = spawnSync("redis-cli", ["-p", String(n.port), "cluster", "nodes"], { encoding: "utf8" });
      if (r.status !== 0) continue;
      return r.stdout.split("\n").filter((l) => /\bmaster\b/.test(l) && !/\bfail\b/.test(l) && /\d+-\d+/.test(l)).map((l) => Number(/:(\d+)@/.exec(l)![1]));
    }
    return [];
  };
  const replicaOf = (port: number): number => {
    const r = spawnSync("redis-cli", ["-p", String(port), "info", "replication"], { encoding: "utf8" });
    const m = /^slave0:ip=[^,]+,port=(\d+)/m.exec(r.stdout);
    if (!m) throw new Error(`no replica of ${port}: ${r.stdout}`);
    return Number(m[1]);
  };
  return { url: `redis+cluster://${ports.map((p) => `127.0.0.1:${p}`).join(",")}`, nodes, masters, replicaOf, stop };
}

async function waitFor(what: string, pred: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

/** A 3-node JetStream cluster on loopback (no auth): nodes by server name, and a URL list of all of them. */
export interface NatsCluster {
  url: string;
  nodes: Map<string, { port: number; proc: Proc }>;
  stop(): Promise<void>;
}

export async function startNatsCluster(dir: string, size = 3): Promise<NatsCluster> {
  const ports = await freePorts(size * 2);
  const client = ports.slice(0, size);
  const route = ports.slice(size);
  const nodes = new Map<string, { port: number; proc: Proc }>();
  for (let i = 0; i < size; i++) {
    const name = `n${i + 1}`;
    const conf = join(dir, `${name}.conf`);
    writeFileSync(
      conf,
      [
        `server_name: ${name}`,
        `listen: 127.0.0.1:${client[i]}`,
        `jetstream { store_dir: "${join(dir, name)}" }`,
        `cluster { name: tacit-test, listen: 127.0.0.1:${route[i]}, routes: [${route.filter((_, j) => j !== i).map((r) => `nats-route://127.0.0.1:${r}`).join(", ")}] }`,
      ].join("\n"),
    );
    nodes.set(name, { port: client[i]!, proc: startProcess("nats-server", ["-c", conf]) });
  }
  const stop = async () => {
    await Promise.all([...nodes.values()].map((n) => n.proc.stop({ hard: true })));
  };
  try {
    for (const [name, n] of nodes) await waitReady(`nats-server ${name}`, n.proc, () => natsAnswers("127.0.0.1", n.port));
    // JetStream is usable once the meta group has a leader.
    await waitFor("the JetStream meta leader", async () => [...nodes.values()].every((n) => /JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader/.test(n.proc.output())) || [...nodes.values()].some((n) => /Self is new JetStream cluster metadata leader/.test(n.proc.output())));
  } catch (err) {
    await stop();
    throw err;
  }
  return { url: client.map((p) => `nats://127.0.0.1:${p}`).join(","), nodes, stop };
}

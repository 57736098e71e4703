// TLS and authentication, live (issue 12, item 3): a `tacit run` worker reaches nats-server over
// mutual TLS with user/password and redis-server over TLS only (`rediss://`, client
// certificate, AUTH), with certificates made by openssl in the test; secrets come from a file
// and the environment, never the YAML. It processes events, and neither its logs (at debug) nor
// its /metrics carry a secret. A wrong CA, an expired certificate, a wrong password, a missing
// client certificate and a missing creds file each end the worker with one line and exit 1 or 2.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import { streamName } from "../src/config/topology.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats } from "../src/runtime/nats.js";
import { publishLines } from "../src/runtime/publisher.js";
import { freePort } from "../src/services/processes.js";
import { openPipelineRedis } from "../src/state/redis.js";
import { eventually } from "./support/streams.js";
import { makeCerts, startTlsNats, startTlsRedis, type TestCerts } from "./support/servers.js";
import { spawnTacit } from "./support/tacit-process.js";

const NATS_PASSWORD = "nats-Pa55-8c1f0e2d7b";
const REDIS_PASSWORD = "redis-Pa55-5d9a3c71e4";
const KEY_SECRET = "tls-test-pseudonym-secret-0123456789";
const KEY = `t1:${KEY_SECRET}`;

interface Conn {
  natsUrl: string;
  redisUrl: string;
  natsTls?: { ca_file?: string; cert_file?: string; key_file?: string };
  redisTls?: { ca_file?: string; cert_file?: string; key_file?: string };
  creds?: string;
}

/** A pipeline file (enrich → dedupe) with the connection settings; secrets by reference only. */
function writePipeline(dir: string, name: string, c: Conn): string {
  const block = (o: Record<string, string | undefined> | undefined, indent: string) =>
    Object.entries(o ?? {})
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${indent}${k}: "${v}"`)
      .join("\n");
  const auth = c.creds ? `  creds_file: "${c.creds}"` : `  user: tacit\n  password_env: TEST_NATS_PASSWORD`;
  const file = join(dir, `${name}.yaml`);
  writeFileSync(
    file,
    [
      "version: 1",
      `name: ${name}`,
      "nats:",
      `  url: "${c.natsUrl}"`,
      auth,
      ...(c.natsTls ? ["  tls:", block(c.natsTls, "    ")] : []),
      "redis:",
      `  url: "${c.redisUrl}"`,
      `  password_file: "${join(dir, "redis-password")}"`,
      ...(c.redisTls ? ["  tls:", block(c.redisTls, "    ")] : []),
      "partitions: 2",
      "stages:",
      "  - name: enrich",
      "    operator: enrich",
      "  - name: dedupe",
      "    operator: dedupe",
      "    config:",
      "      window: 1h",
      "",
    ].join("\n"),
  );
  return file;
}

const lines = (s: string) => s.split("\n").filter((l) => l.trim() !== "");

function runEnv(natsPassword = NATS_PASSWORD): Record<string, string> {
  return { TEST_NATS_PASSWORD: natsPassword, TACIT_PSEUDONYM_KEY: KEY, TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")), NATS_URL: "", REDIS_URL: "" };
}

/** `tacit run` that must not start: its exit code and stderr lines, within 15 s. */
async function failingRun(file: string, env: Record<string, string>): Promise<{ code: number | null; out: string[] }> {
  const p = spawnTacit(["run", file, "--metrics-port", "0"], { ...env, TACIT_LOG_LEVEL: "info" });
  const timer = setTimeout(() => p.child.kill("SIGKILL"), 15_000);
  const code = await p.exited();
  clearTimeout(timer);
  return { code, out: lines(p.stderr()) };
}

test("tls: a worker over mutual TLS to NATS and Redis processes events; wrong CA, expired certificate, wrong passwords, missing client certificate and missing creds file each exit with one line; no secret in logs or /metrics", { timeout: 120_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "tacit-tls-"));
  const certs: TestCerts = makeCerts(dir);
  writeFileSync(join(dir, "redis-password"), `${REDIS_PASSWORD}\n`);
  const serverTls = { cert: certs.serverCert, key: certs.serverKey, ca: certs.ca, verify: true };
  const nats = await startTlsNats(dir, serverTls, { name: "tacit", password: NATS_PASSWORD });
  t.after(() => nats.proc.stop());
  const redis = await startTlsRedis(dir, serverTls, REDIS_PASSWORD);
  t.after(() => redis.proc.stop());
  const clientTls = { ca_file: certs.ca, cert_file: certs.clientCert, key_file: certs.clientKey };
  const good: Conn = { natsUrl: nats.url, redisUrl: redis.url, natsTls: clientTls, redisTls: clientTls };

  // --- the worker runs over TLS, with secrets from the environment and a file ---
  const file = writePipeline(dir, "tlsok", good);
  const env = runEnv();
  const p = loadPipelineOrThrow(file, { env: { ...process.env, ...env }, operators: findOperator });
  const client = await connectNats(p, "tls-test");
  t.after(() => client.nc.close());
  await applyDeploy(p, client.jsm, findOperator, await planDeploy(p, client.jsm, findOperator));
  const port = await freePort();
  const worker = spawnTacit(["run", file, "--metrics-port", String(port)], { ...env, TACIT_LOG_LEVEL: "debug" });
  t.after(() => void (worker.running() && worker.child.kill("SIGKILL")));
  await eventually("the worker to be ready", async () => {
    assert.ok(worker.running(), worker.stderr());
    return (await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.status, () => 0)) === 200;
  }, 20_000);
  await publishLines(p, client.js, benchEvents(500, 20, Date.now() - 60_000), { idPrefix: "tls" });
  await eventually("500 events out", async () => (await client.jsm.streams.info(streamName(p, "events"))).state.messages === 500, 30_000);
  // Redis really holds the state (over TLS, with AUTH).
  const r = openPipelineRedis(p) as Redis;
  t.after(() => r.disconnect());
  assert.ok((await r.dbsize()) > 0);
  const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  assert.match(metrics, /enrich/);
  worker.child.kill("SIGTERM");
  assert.equal(await worker.exited(), 0, worker.stderr());

  // A plain connection is refused by both servers: TLS is really in use.
  assert.equal((await failingRun(writePipeline(dir, "plain", { ...good, natsTls: undefined, natsUrl: nats.url.replace("tls:", "nats:") }), env)).code, 1);

  // --- each way to get it wrong: exit 1 (run time) or 2 (config), one line ---
  const expired = await startTlsRedis(dir, { ...serverTls, cert: certs.expiredCert }, REDIS_PASSWORD);
  t.after(() => expired.proc.stop());
  const cases: { what: string; conn: Conn; env?: Record<string, string>; code: number; line: RegExp }[] = [
    { what: "NATS server signed by another CA", conn: { ...good, natsTls: { ...clientTls, ca_file: certs.otherCa } }, code: 1, line: /^tacit: nats_unavailable: cannot connect to NATS at tls:\/\/127\.0\.0\.1:\d+: .*(certificate|self[- ]signed|issuer)/i },
    { what: "Redis server signed by another CA", conn: { ...good, redisTls: { ...clientTls, ca_file: certs.otherCa } }, code: 1, line: /^tacit: redis_unavailable: cannot connect to Redis at rediss:\/\/127\.0\.0\.1:\d+: .*(certificate|self[- ]signed|issuer)/i },
    { what: "expired Redis server certificate", conn: { ...good, redisUrl: expired.url }, code: 1, line: /^tacit: redis_unavailable: .*certificate has expired/i },
    { what: "wrong NATS password", conn: good, env: runEnv("not-the-password"), code: 1, line: /^tacit: nats_unavailable: .*Authorization Violation/i },
    { what: "no client certificate for NATS (mutual TLS required)", conn: { ...good, natsTls: { ca_file: certs.ca } }, code: 1, line: /^tacit: nats_unavailable: .*client certificate/i },
    // A config error is reported as the project reports every pipeline problem: a header, then the problem at file:line.
    { what: "missing creds file", conn: { ...good, creds: join(dir, "missing.creds") }, code: 2, line: /^tacit: config: .*bad5\.yaml: 1 problem\n\s+\S+bad5\.yaml:5:\d+\s+nats\.creds_file: cannot read \S+missing\.creds/ },
  ];
  const outputs: string[] = [worker.stderr(), metrics];
  for (const c of cases) {
    const run = await failingRun(writePipeline(dir, `bad${cases.indexOf(c)}`, c.conn), c.env ?? env);
    outputs.push(run.out.join("\n"));
    assert.equal(run.code, c.code, `${c.what}: ${run.out.join("\n")}`);
    assert.equal(run.out.length, c.code === 2 ? 2 : 1, `${c.what}: one line, got:\n${run.out.join("\n")}`);
    assert.match(run.out.join("\n"), c.line, c.what);
  }
  // The wrong Redis password: written to the password file.
  writeFileSync(join(dir, "redis-password"), "wrong-password\n");
  const wrongRedis = await failingRun(file, env);
  outputs.push(wrongRedis.out.join("\n"));
  assert.equal(wrongRedis.code, 1, wrongRedis.out.join("\n"));
  assert.equal(wrongRedis.out.length, 1, wrongRedis.out.join("\n"));
  assert.match(wrongRedis.out[0]!, /^tacit: redis_unavailable: .*(WRONGPASS|invalid username-password)/);

  // No secret anywhere the worker wrote or served.
  const keyBody = (f: string) => readFileSync(f, "utf8").split("\n").filter((l) => l && !l.startsWith("-----")).join("");
  const all = outputs.join("\n");
  for (const secret of [NATS_PASSWORD, REDIS_PASSWORD, KEY_SECRET, keyBody(certs.clientKey).slice(0, 40), keyBody(certs.serverKey).slice(0, 40)]) {
    assert.ok(!all.includes(secret), `a secret leaked: ${secret.slice(0, 6)}…`);
  }
  assert.ok(all.length > 2000, "the scan read the logs and metrics");
});

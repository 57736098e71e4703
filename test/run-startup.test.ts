// A `tacit run` worker that cannot start (SPEC §7): it exits at once — 2 for a config error such
// as a missing pseudonymization key, 1 for a server it cannot reach — with one clear line on
// stderr, and leaves its metrics port free, so a second `tacit run` does not run beside a
// half-started one. Real nats-server and redis-server from the harness.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { Redis } from "ioredis";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { projectRoot } from "../src/config/paths.js";
import { freePort, isPortFree } from "../src/services/processes.js";
import { startServers, type TestServers } from "./harness.js";
import { spawnTacit, type TacitProcess } from "./support/tacit-process.js";

const PIPELINE = join(projectRoot(), "pipelines", "feedback.yaml");
const KEY = "t1:run-startup-test-secret-0123456789";
/** Exit within this, process start-up included (the worker itself must give up within a second). */
const EXIT_WITHIN_MS = 5_000;

let servers: TestServers;

before(async () => {
  servers = await startServers();
});

after(async () => {
  await servers?.stop();
});

/** Runs `tacit run` and waits for it to exit; kills it (and fails) if it is still running after EXIT_WITHIN_MS. */
async function runUntilExit(env: Record<string, string>, metricsPort: number, args: string[] = []): Promise<{ code: number | null; stderr: string }> {
  const p: TacitProcess = spawnTacit(["run", PIPELINE, "--metrics-port", String(metricsPort), ...args], {
    TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")),
    TACIT_LOG_LEVEL: "info",
    ...env,
  });
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([p.exited(), new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), EXIT_WITHIN_MS)))]);
  clearTimeout(timer);
  if (code === "timeout") {
    p.child.kill("SIGKILL");
    await p.exited();
    assert.fail(`tacit run still running after ${EXIT_WITHIN_MS} ms; stderr:\n${p.stderr()}`);
  }
  return { code, stderr: p.stderr() };
}

function lines(text: string): string[] {
  return text.split("\n").filter((l) => l.trim() !== "");
}

test("tacit run without TACIT_PSEUDONYM_KEY exits 2 with one line naming the variable, and its metrics port is free", { timeout: 20_000 }, async () => {
  const port = await freePort();
  const r = await runUntilExit({ NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: "" }, port);
  assert.equal(r.code, 2, r.stderr);
  assert.deepEqual(lines(r.stderr).length, 1, r.stderr);
  assert.match(r.stderr, /^tacit: config: .*TACIT_PSEUDONYM_KEY/);
  assert.ok(await isPortFree(port, "0.0.0.0"), `metrics port ${port} is still taken after the exit`);
});

test("tacit run with an unreachable NATS exits 1 with one line naming the URL, and binds nothing", { timeout: 20_000 }, async () => {
  const [natsPort, metricsPort] = [await freePort(), await freePort()];
  const r = await runUntilExit({ NATS_URL: `nats://127.0.0.1:${natsPort}`, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY }, metricsPort);
  assert.equal(r.code, 1, r.stderr);
  assert.deepEqual(lines(r.stderr), [`tacit: nats_unavailable: cannot connect to NATS at nats://127.0.0.1:${natsPort}: connection refused`]);
  assert.ok(await isPortFree(metricsPort, "0.0.0.0"), `metrics port ${metricsPort} is still taken after the exit`);
});

test("tacit run with an unreachable Redis exits 1 with one line naming the URL (no reconnect noise), and binds nothing", { timeout: 20_000 }, async () => {
  const [redisPort, metricsPort] = [await freePort(), await freePort()];
  const r = await runUntilExit({ NATS_URL: servers.natsUrl, REDIS_URL: `redis://:hunter2-secret@127.0.0.1:${redisPort}`, TACIT_PSEUDONYM_KEY: KEY }, metricsPort);
  assert.equal(r.code, 1, r.stderr);
  const out = lines(r.stderr);
  assert.equal(out.length, 1, r.stderr);
  assert.match(out[0]!, new RegExp(`^tacit: redis_unavailable: cannot connect to Redis at redis://:\\*\\*\\*@127\\.0\\.0\\.1:${redisPort}: .*ECONNREFUSED`));
  assert.doesNotMatch(r.stderr, /hunter2/);
  assert.ok(await isPortFree(metricsPort, "0.0.0.0"), `metrics port ${metricsPort} is still taken after the exit`);
});

test("tacit run with a bad pipeline exits 2 with the problem, and binds nothing", { timeout: 20_000 }, async () => {
  const port = await freePort();
  const r = await runUntilExit({ NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY }, port, ["--set", "stages.dedupe.operator=dedup"]);
  assert.equal(r.code, 2, r.stderr);
  const line = readFileSync(PIPELINE, "utf8").split("\n").indexOf("    operator: dedupe") + 1;
  assert.match(r.stderr, new RegExp(`^tacit: config: .*feedback\\.yaml: 1 problem\n.*:${line}:15 +stage "dedupe": unknown operator "dedup"`));
  assert.ok(await isPortFree(port, "0.0.0.0"), `metrics port ${port} is still taken after the exit`);
});

test("tacit run on a pipeline that was never deployed exits 2 naming the deploy command, and binds nothing", { timeout: 20_000 }, async () => {
  const port = await freePort();
  const r = await runUntilExit({ NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY }, port);
  assert.equal(r.code, 2, r.stderr);
  assert.deepEqual(lines(r.stderr), [`tacit: config: pipeline "feedback" is not deployed: stream feedback_in, feedback_x_dedupe not found (run: tacit deploy ${PIPELINE})`]);
  assert.ok(await isPortFree(port, "0.0.0.0"), `metrics port ${port} is still taken after the exit`);
});

test("tacit run that starts serves /readyz on its metrics port, and SIGTERM exits 0 and frees the port", { timeout: 20_000 }, async (t) => {
  const port = await freePort();
  const env = { TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")), TACIT_LOG_LEVEL: "error", NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY };
  const deploy = spawnTacit(["deploy", PIPELINE], env);
  assert.equal(await deploy.exited(), 0, deploy.stderr());
  const p = spawnTacit(["run", PIPELINE, "--metrics-port", String(port)], env);
  t.after(() => void (p.running() && p.child.kill("SIGKILL")));
  const deadline = Date.now() + 10_000;
  let status = 0;
  while (Date.now() < deadline && p.running()) {
    status = await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.status, () => 0);
    if (status === 200) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(status, 200, p.stderr());
  assert.match(p.stderr(), /running feedback/);
  p.child.kill("SIGTERM");
  assert.equal(await p.exited(), 0, p.stderr());
  assert.match(p.stderr(), /worker stopped cleanly/);
  assert.ok(await isPortFree(port, "0.0.0.0"), `metrics port ${port} is still taken after the exit`);
});

test("tacit run sent SIGTERM while still starting starts, then drains and exits 0 (not killed half way)", { timeout: 30_000 }, async (t) => {
  const env = { TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")), TACIT_LOG_LEVEL: "debug", NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TACIT_PSEUDONYM_KEY: KEY };
  const deploy = spawnTacit(["deploy", PIPELINE], env);
  assert.equal(await deploy.exited(), 0, deploy.stderr());
  // Redis answers no one for 4 s (under the worker's 5 s start-up timeout): the worker waits in its start-up.
  const redis = new Redis(servers.redisUrl);
  t.after(() => redis.disconnect());
  await redis.call("CLIENT", "PAUSE", "4000", "ALL");
  const p = spawnTacit(["run", PIPELINE, "--metrics-port", "0"], env);
  t.after(() => void (p.running() && p.child.kill("SIGKILL")));
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline && p.running() && !/"msg":"starting"/.test(p.stderr())) await new Promise((r) => setTimeout(r, 20));
  const before = p.stderr();
  assert.match(before, /"msg":"starting"/, "the worker reached its start-up");
  p.child.kill("SIGTERM");
  assert.doesNotMatch(before, /running feedback/, "the signal came before the worker had started");
  assert.equal(await p.exited(), 0, p.stderr());
  assert.match(p.stderr(), /running feedback[\s\S]*worker stopped cleanly/);
});

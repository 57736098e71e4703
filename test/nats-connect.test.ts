import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { findBinary } from "../src/services/binaries.js";
import { freePort, readFirstLine } from "../src/services/processes.js";
import { startProcess, waitReady } from "./support/servers.js";

const natsModule = fileURLToPath(new URL("../src/runtime/nats.js", import.meta.url));

test("connectNats against a server without JetStream fails, and leaves no connection that keeps its process alive", { timeout: 60_000 }, async (t) => {
  const bin = findBinary("nats-server");
  assert.ok(bin, "nats-server must be installed (npm test installs it as root on Debian)");
  const port = await freePort();
  // No -js: the connection succeeds, JetStream's check after it fails (so natsAnswers, which asks for JetStream, cannot tell it is up).
  const server = startProcess(bin, ["-a", "127.0.0.1", "-p", String(port)]);
  t.after(() => server.stop({ hard: true }));
  await waitReady("nats-server", server, async () => (await readFirstLine("127.0.0.1", port, undefined, 500)).startsWith("INFO "));
  // A process of its own that only connects: it must end by itself once the call has failed
  // (the connection reconnects forever, so one left open would keep it alive).
  const script = `import { connectNats } from ${JSON.stringify(natsModule)};
try { await connectNats({ nats: { url: "nats://127.0.0.1:${port}" } }); console.log("connected"); } catch (err) { console.log("failed: " + err.message); }`;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => child.kill("SIGKILL"));
  let out = "";
  child.stdout.on("data", (b: Buffer) => (out += b.toString()));
  const code = await new Promise<number | string>((resolve) => {
    const timer = setTimeout(() => resolve("still running after 15 s"), 15_000);
    child.once("exit", (c) => {
      clearTimeout(timer);
      resolve(c ?? -1);
    });
  });
  assert.match(out, /failed: .*jetstream/i);
  assert.equal(code, 0, out);
});

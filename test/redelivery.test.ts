// A keyed partition is processed in stream order also when JetStream redelivers: an input whose
// ack_wait runs out while it waits in the worker's buffer (a slow batch, a loaded machine) comes
// again behind newer inputs, and run again it would meet a later watermark. Real nats-server and
// redis-server; the operator is the real dedupe, wrapped to record what it is given and to stall
// once, longer than ack_wait, so that redeliveries certainly happen.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Redis } from "ioredis";
import { startServers } from "./harness.js";
import { consumersDrained, eventually } from "./support/streams.js";
import { findOperator } from "../operators/index.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Envelope } from "../src/core/event.js";
import { isKeyedProcessor, type KeyedProcessor, type OperatorSpec } from "../src/core/operator.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { stageGroups, stageSubject } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:redelivery-test-secret-0123456789";
const silent = { debug() {}, info() {}, warn() {}, error() {} };
const MIN = 60_000;

test("redelivered inputs behind newer ones: each input of a partition runs once, in stream order, with the watermark of its place in the stream", { timeout: 120_000 }, async (t) => {
  const servers = await startServers();
  let nats: NatsHandles | undefined;
  let redis: Redis | undefined;
  let worker: Worker | undefined;
  t.after(async () => {
    await worker?.stop().catch(() => undefined);
    redis?.disconnect();
    await nats?.nc.close().catch(() => undefined);
    await servers.stop();
  });
  const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TEST_PIPELINE: "redeliver", TACIT_PSEUDONYM_KEY: KEY };
  // Small batches (a pull asks for two), a short ack_wait, and a stall of 2.5 ack_waits.
  const ACK_WAIT = 1000;
  const STALL = 2500;
  const p = loadPipelineOrThrow(PIPELINE, { env, set: ["runtime.batch_size=10", `runtime.ack_wait=${ACK_WAIT}ms`, "runtime.lease_ttl=10s", "event_time.max_out_of_orderness=5m"], operators: findOperator });
  const bound = p.event_time.max_out_of_orderness_ms;
  nats = await connectNats(p, "redelivery-test");
  redis = new Redis(servers.redisUrl);
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
  const group = stageGroups(p, findOperator).find((g) => g.name === "dedupe")!;

  // Partition 0's stream, one event a minute: 25 inputs, so batches of 10 do not line up with
  // what the pulls bring once redeliveries are mixed in.
  const N = 25;
  const T0 = Date.now() - 6 * 60 * MIN;
  const sent: Envelope[] = [];
  for (let i = 1; i <= N; i++) {
    const ts = T0 + i * MIN;
    const env: Envelope = {
      v: 1,
      event: { event_id: `e${i}`, session_id: "s", user: `user-${i % 3}`, user_key_version: "t1", timestamp: new Date(ts).toISOString(), ts, event_type: "click", payload: {} },
      src: { seq: i },
      partition: 0,
      attrs: {},
    };
    sent.push(env);
    await nats.js.publish(stageSubject(p, "dedupe", 0), JSON.stringify(env), { msgID: `in-${i}` });
  }

  // What the operator is given for partition 0, in order; its first batch stalls.
  const given: { id: string; seq: number; wm: number | undefined; deliveries: number }[] = [];
  let stalled = false;
  const dedupe = findOperator("dedupe")!;
  const recording: OperatorSpec<any> = {
    ...dedupe,
    async create(config, ctx) {
      const inner = await dedupe.create(config, ctx);
      assert.ok(isKeyedProcessor(inner));
      return {
        codec: inner.codec,
        processElement(x, key) {
          if (x.partition === 0) {
            given.push({ id: x.envelope.event.event_id, seq: x.seq, wm: x.watermark_ms, deliveries: x.deliveries });
            if (!stalled) {
              // A loaded machine: the event loop is busy for 2.5 ack_waits while the batch's
              // messages (and the next pull's) wait; the server redelivers them meanwhile.
              stalled = true;
              const until = Date.now() + STALL;
              while (Date.now() < until);
            }
          }
          return inner.processElement(x, key);
        },
      } satisfies KeyedProcessor<unknown>;
    },
  };
  worker = new Worker({ pipeline: p, operators: (name) => (name === "dedupe" ? recording : findOperator(name)), groups: ["dedupe"], log: silent, env, redis, nats });
  await worker.start();
  await eventually("partition 0 to be processed and acked", async () => given.length >= N && (await consumersDrained(nats!, [group.inputStream])), 60_000, 100);
  const counts = worker.stageCounters.get("dedupe")!.counts;
  const dropped = (counts.get("dropped{reason=already_applied}") ?? 0) + (counts.get("dropped{reason=redelivered}") ?? 0);
  await worker.stop();
  worker = undefined;

  // Every input once, in stream order, with the watermark its stream prefix gives (the runtime's
  // rule: the latest event time before it minus max_out_of_orderness).
  const expected = sent.map((e, i) => ({ id: e.event.event_id, wm: i === 0 ? undefined : Math.max(...sent.slice(0, i).map((x) => x.event.ts)) - bound }));
  assert.deepEqual(given.map(({ id, wm }) => ({ id, wm })), expected, `inputs as the operator got them: ${JSON.stringify(given.map((g) => [g.id, g.deliveries]))}`);
  // The run exercised what it claims to: inputs came again after ack_wait, and none reached the operator.
  assert.ok(dropped > 0, `redelivered inputs were dropped by the runtime (${dropped})`);
});

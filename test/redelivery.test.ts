// A keyed partition is processed in stream order also when JetStream redelivers: an input whose
// ack_wait runs out while it waits in the worker's buffer (a slow batch, a loaded machine) comes
// again behind newer inputs, and run again it would meet a later watermark; and an input whose
// delivery was lost in flight comes again only behind newer inputs, which must not make it look
// like a copy of an applied one. Real nats-server and redis-server; the operator is the real
// dedupe, wrapped to record what it is given (and, in the first test, to stall once, longer than
// ack_wait, so that redeliveries certainly happen).
import { test, type TestContext } from "node:test";
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
import { connectNats } from "../src/runtime/nats.js";
import { durableName, stageGroups, stageSubject } from "../src/config/topology.js";
import { Worker } from "../src/runtime/worker.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "clean.yaml");
const KEY = "t1:redelivery-test-secret-0123456789";
const silent = { debug() {}, info() {}, warn() {}, error() {} };
const MIN = 60_000;

interface Given {
  id: string;
  seq: number;
  wm: number | undefined;
  deliveries: number;
}

/**
 * Servers, the clean pipeline deployed with `set`, and a worker of its dedupe group whose
 * operator records what partition 0 is given, in order (`onInput` runs inside the operator, on
 * each of partition 0's inputs). `publish(from, to)` sends partition 0's inputs e<from>..e<to>,
 * one event a minute.
 */
async function setup(t: TestContext, name: string, set: string[], onInput: (given: Given[]) => void) {
  const servers = await startServers();
  const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TEST_PIPELINE: name, TACIT_PSEUDONYM_KEY: KEY };
  const p = loadPipelineOrThrow(PIPELINE, { env, set: [...set, "runtime.lease_ttl=10s", "event_time.max_out_of_orderness=5m"], operators: findOperator });
  const nats = await connectNats(p, `${name}-test`);
  const redis = new Redis(servers.redisUrl);
  const workers: Worker[] = [];
  t.after(async () => {
    for (const w of workers) await w.stop().catch(() => undefined);
    redis.disconnect();
    await nats.nc.close().catch(() => undefined);
    await servers.stop();
  });
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
  const group = stageGroups(p, findOperator).find((g) => g.name === "dedupe")!;
  const T0 = Date.now() - 6 * 60 * MIN;
  const sent: Envelope[] = [];
  const publish = async (from: number, to: number) => {
    for (let i = from; i <= to; i++) {
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
  };
  const given: Given[] = [];
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
            onInput(given);
          }
          return inner.processElement(x, key);
        },
      } satisfies KeyedProcessor<unknown>;
    },
  };
  /** A worker of the dedupe group (a second one stands for the process that takes over after the first died). */
  const newWorker = () => {
    const w = new Worker({ pipeline: p, operators: (name) => (name === "dedupe" ? recording : findOperator(name)), groups: ["dedupe"], log: silent, env, redis, nats });
    workers.push(w);
    return w;
  };
  const worker = newWorker();
  /** Every input once, in stream order, with the watermark its stream prefix gives (the runtime's rule: the latest event time before it minus max_out_of_orderness). */
  const assertInOrder = () => {
    const bound = p.event_time.max_out_of_orderness_ms;
    const expected = sent.map((e, i) => ({ id: e.event.event_id, wm: i === 0 ? undefined : Math.max(...sent.slice(0, i).map((x) => x.event.ts)) - bound }));
    assert.deepEqual(given.map(({ id, wm }) => ({ id, wm })), expected, `inputs as the operator got them: ${JSON.stringify(given.map((g) => [g.id, g.deliveries]))}`);
  };
  const drained = () => consumersDrained(nats, [group.inputStream]);
  return { p, nats, group, worker, newWorker, sent, given, publish, drained, assertInOrder };
}

test("redelivered inputs behind newer ones: each input of a partition runs once, in stream order, with the watermark of its place in the stream", { timeout: 120_000 }, async (t) => {
  // Small batches (a pull asks for two), a short ack_wait, and a stall of 2.5 ack_waits.
  const ACK_WAIT = 1000;
  const STALL = 2500;
  let stalled = false;
  const s = await setup(t, "redeliver", ["runtime.batch_size=10", `runtime.ack_wait=${ACK_WAIT}ms`], () => {
    if (stalled) return;
    // A loaded machine: the event loop is busy for 2.5 ack_waits while the batch's messages
    // (and the next pull's) wait; the server redelivers them meanwhile.
    stalled = true;
    const until = Date.now() + STALL;
    while (Date.now() < until);
  });
  // Partition 0's stream: 25 inputs, so batches of 10 do not line up with what the pulls bring
  // once redeliveries are mixed in.
  const N = 25;
  await s.publish(1, N);
  await s.worker.start();
  await eventually("partition 0 to be processed and acked", async () => s.given.length >= N && (await s.drained()), 60_000, 100);
  const counts = s.worker.stageCounters.get("dedupe")!.counts;
  const dropped = (counts.get("dropped{reason=already_applied}") ?? 0) + (counts.get("dropped{reason=redelivered}") ?? 0);
  await s.worker.stop();
  s.assertInOrder();
  // The run exercised what it claims to: inputs came again after ack_wait, and none reached the operator.
  assert.ok(dropped > 0, `redelivered inputs were dropped by the runtime (${dropped})`);
});

test("deliveries lost in flight (another pull request took them and never acked): the partition sees the gap in delivery sequences, restarts its durable at the ack floor, and runs every input once, in stream order", { timeout: 120_000 }, async (t) => {
  // A lost delivery stands in for one a reconnect or a consumer leader's death lost: the server
  // counts it delivered, the worker never sees it, and the server sends it again only after
  // ack_wait, behind newer inputs the worker has run (and committed) by then.
  const s = await setup(t, "lostflight", ["runtime.batch_size=5", "runtime.ack_wait=1s"], () => undefined);
  await s.publish(1, 10);
  await s.worker.start();
  await eventually("the first ten inputs processed and acked", async () => s.given.length >= 10 && (await s.drained()), 60_000, 50);
  // A second pull request on partition 0's durable, beside the worker's own; what it gets is never acked.
  const durable = durableName(s.group, 0);
  const stolen: number[] = [];
  const thief = await (await s.nats.js.consumers.get(s.group.inputStream, durable)).fetch({ max_messages: 3, expires: 5000 });
  // It may end early: once the worker sees the gap it recreates the durable, which ends every open request.
  const taking = (async () => {
    for await (const m of thief) stolen.push(m.seq);
  })().catch(() => undefined);
  await eventually("both pull requests waiting", async () => (await s.nats.jsm.consumers.info(s.group.inputStream, durable)).num_waiting >= 2, 10_000, 20);
  await s.publish(11, 30);
  await taking;
  // Drained: every input acked, the taken ones too (a worker that skips them acks them as applied).
  await eventually("partition 0 to be processed and acked", s.drained, 60_000, 100);
  const resumed = s.worker.stageCounters.get("dedupe")!.counts.get("partition_resumed{reason=missed_deliveries}") ?? 0;
  await s.worker.stop();
  // The run exercised what it claims to: the other request took inputs from the middle of the stream.
  assert.ok(stolen.length > 0 && Math.min(...stolen) < 30, `the other request took inputs before the last (${stolen.join(",")})`);
  s.assertInOrder();
  assert.ok(resumed >= 1, `the partition restarted its durable (${resumed})`);
});

test("a partition whose durable is gone (its owner died between the durable's delete and its recreate): the next owner recreates it after the committed progress, and every input runs once, in stream order", { timeout: 120_000 }, async (t) => {
  const s = await setup(t, "nodurable", ["runtime.batch_size=5"], () => undefined);
  await s.publish(1, 10);
  await s.worker.start();
  // Drained: every input acked, so committed (acks follow commits).
  await eventually("the first ten inputs processed and acked", async () => s.given.length >= 10 && (await s.drained()), 60_000, 50);
  await s.worker.stop();
  // What an owner leaves that died between the two steps of resumeInOrder (takeover, missed deliveries).
  const durable = durableName(s.group, 0);
  await s.nats.jsm.consumers.delete(s.group.inputStream, durable);
  await s.publish(11, 20);
  const next = s.newWorker();
  await next.start();
  await eventually("partition 0 to be processed and acked", async () => s.given.length >= 20 && (await s.drained()), 60_000, 100);
  const resumed = next.stageCounters.get("dedupe")!.counts.get("partition_resumed{reason=durable_missing}") ?? 0;
  const info = await s.nats.jsm.consumers.info(s.group.inputStream, durable);
  await next.stop();
  s.assertInOrder();
  assert.equal(resumed, 1, "the partition recreated its durable once");
  // As deploy made it (the filter of partition 0), and it begins after the committed inputs (the first ten were not delivered again).
  assert.equal(info.config.filter_subject, stageSubject(s.p, "dedupe", 0));
  assert.equal(info.delivered.consumer_seq, 10);
});

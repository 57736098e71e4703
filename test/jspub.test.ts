// The runtime's JetStream publisher against a real nats-server: PubAcks matched back by reply
// token, the stream's de-duplication visible, refusals and silence turned into errors.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { JetStreamPublisher, PublishGroup, publisherFor } from "../src/runtime/jspub.js";
import { TransientError } from "../src/core/errors.js";
import { startServers, type TestServers } from "./harness.js";

let servers: TestServers;
let nc: NatsConnection;
let jsm: JetStreamManager;
const enc = (s: string) => new TextEncoder().encode(s);

before(async () => {
  servers = await startServers();
  nc = await connect({ servers: servers.natsUrl, noAsyncTraces: true });
  jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "PUBT", subjects: ["pubt.>"], duplicate_window: 60_000_000_000 });
});

after(async () => {
  await nc?.close();
  await servers?.stop();
});

test("publisher: many publishes in flight, each PubAck matched to its own publish, headers kept, repeats seen as duplicates", async () => {
  const pub = publisherFor(nc);
  assert.equal(publisherFor(nc), pub, "one publisher per connection");
  const n = 2_000;
  const acks = await Promise.all(
    Array.from({ length: n }, (_, i) => pub.publish(`pubt.${i % 3}`, enc(`m${i}`), { msgID: `id-${i}`, headers: [["Tacit-Probe", `p${i}`], ["Tacit-Note", ` two\r\nlines `]] })),
  );
  assert.equal(pub.inFlight, 0);
  // One connection keeps publish order, so stream sequences follow the publishes.
  assert.deepEqual(acks.map((a) => a.seq), Array.from({ length: n }, (_, i) => i + 1));
  assert.ok(acks.every((a) => a.stream === "PUBT" && !a.duplicate));
  const m = await jsm.streams.getMessage("PUBT", { seq: 1234 });
  assert.equal(new TextDecoder().decode(m!.data), "m1233");
  assert.equal(m!.header.get("Tacit-Probe"), "p1233");
  assert.equal(m!.header.get("Nats-Msg-Id"), "id-1233");
  assert.equal(m!.header.get("Tacit-Note"), "two lines", "line breaks in a value become a space, the value trimmed");

  const again = await pub.publish("pubt.0", enc("m7"), { msgID: "id-7" });
  assert.deepEqual(again, { stream: "PUBT", seq: 8, duplicate: true });
  assert.equal((await jsm.streams.info("PUBT")).state.messages, n);
});

test("publisher: a subject no stream takes, a refused publish and no answer at all are errors, and nothing waits forever", async () => {
  const pub = publisherFor(nc);
  await assert.rejects(pub.publish("nostream.x", enc("x")), (err: Error) => err instanceof TransientError && /no stream listens/.test(err.message));

  // The stream refuses a publish whose expected stream does not match.
  await assert.rejects(pub.publish("pubt.0", enc("x"), { headers: [["Nats-Expected-Stream", "OTHER"]] }), (err: Error) => err instanceof TransientError && /refused the publish/.test(err.message));

  // A responder that never answers: the sweep times the publish out.
  const silent = nc.subscribe("silent.>", { callback: () => undefined });
  const quick = new JetStreamPublisher(nc, 300);
  const t0 = Date.now();
  await assert.rejects(quick.publish("silent.x", enc("x")), /no PubAck within 300 ms/);
  assert.ok(Date.now() - t0 < 2_000);
  assert.equal(quick.inFlight, 0);
  silent.unsubscribe();

  // Closing fails what is in flight instead of leaving it pending.
  const closing = new JetStreamPublisher(nc, 60_000);
  const silent2 = nc.subscribe("silent2.>", { callback: () => undefined });
  const p = closing.publish("silent2.x", enc("x"));
  closing.close();
  await assert.rejects(p, /closed before the PubAck/);
  silent2.unsubscribe();
});

test("publisher: a PublishGroup resolves once every publish has its PubAck and rejects at the first refused one", async () => {
  const pub = publisherFor(nc);
  const before = (await jsm.streams.info("PUBT")).state.messages;
  const ok = new PublishGroup();
  for (let i = 0; i < 500; i++) pub.send(ok, "pubt.g", enc(`g${i}`), { msgID: `group-${i}` });
  assert.equal(ok.size, 500);
  await ok.wait();
  assert.equal(ok.size, 0);
  assert.equal(pub.inFlight, 0);
  assert.equal((await jsm.streams.info("PUBT")).state.messages, before + 500);

  const bad = new PublishGroup();
  pub.send(bad, "pubt.g", enc("fine"), { msgID: "group-ok" });
  pub.send(bad, "nostream.g", enc("lost"));
  await assert.rejects(bad.wait(), (err: Error) => err instanceof TransientError && /no stream listens/.test(err.message));
  // Failed once, it stays failed for whoever waits next.
  await assert.rejects(bad.wait(), /no stream listens/);
});

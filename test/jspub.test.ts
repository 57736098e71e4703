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
  // No stream: answered 503 and sent again until the deadline, then an error that says so.
  const short = new JetStreamPublisher(nc, 600);
  const t1 = Date.now();
  await assert.rejects(short.publish("nostream.x", enc("x")), (err: Error) => err instanceof TransientError && /no stream listened on the subject \(503\) for 600 ms/.test(err.message));
  assert.ok(Date.now() - t1 >= 350 && Date.now() - t1 < 2_000, `failed after ${Date.now() - t1} ms`);
  assert.equal(short.inFlight, 0);

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
  const short = new JetStreamPublisher(nc, 500);
  short.send(bad, "pubt.g", enc("fine"), { msgID: "group-ok" });
  short.send(bad, "nostream.g", enc("lost"));
  await assert.rejects(bad.wait(), (err: Error) => err instanceof TransientError && /no stream listened/.test(err.message));
  // Failed once, it stays failed for whoever waits next.
  await assert.rejects(bad.wait(), /no stream listened/);
});

/** A connection of its own whose publishes are counted, by subject. */
async function countingConnection(): Promise<{ own: NatsConnection; sends: Map<string, number> }> {
  const own = await connect({ servers: servers.natsUrl, noAsyncTraces: true });
  const sends = new Map<string, number>();
  const publish = own.publish.bind(own);
  own.publish = (subject, payload, opts) => {
    sends.set(subject, (sends.get(subject) ?? 0) + 1);
    publish(subject, payload, opts);
  };
  return { own, sends };
}

test("publisher: a publish answered 503 (no stream listens yet, as while a clustered stream elects its leader) is sent again and lands once the stream is there, within its deadline", async () => {
  // A connection of its own, whose publishes are counted (a second subscriber on the inbox
  // would take the server's 503s away from the publisher's).
  const { own, sends } = await countingConnection();
  const pub = new JetStreamPublisher(own, 10_000);
  const heard: string[] = [];
  const group = new PublishGroup((why) => heard.push(why));
  for (let i = 0; i < 20; i++) pub.send(group, `late.${i % 2}`, enc(`late${i}`), { msgID: `late-${i}` });
  const single = pub.publish("late.x", enc("single"), { msgID: "late-single" });
  await new Promise((r) => setTimeout(r, 800));
  assert.equal(pub.inFlight, 21, "every publish is still waiting, none failed");
  const before = [...sends.values()].reduce((a, b) => a + b, 0);
  assert.ok(before >= 21 * 3, `each publish was sent again after its 503s (${before} sends of 21 publishes in 800 ms)`);
  // The group counts its own publishes' sends again (the worker exports them, tacit_publish_resent_total).
  assert.ok(group.resentNoResponders >= 20 * 2, `the group counted its 503 retries (${group.resentNoResponders})`);
  assert.equal(group.resentUnanswered, 0);
  // Heard as they happen, while the group still waits (the worker's counter moves during an election).
  assert.equal(heard.length, group.resentNoResponders);
  assert.ok(heard.every((why) => why === "no_responders"));
  await jsm.streams.add({ name: "LATE", subjects: ["late.>"] });
  const t0 = Date.now();
  await group.wait();
  const ack = await single;
  assert.ok(Date.now() - t0 < 2_000, "landed within a few retry intervals of the stream's creation");
  assert.equal(ack.stream, "LATE");
  assert.equal(pub.inFlight, 0);
  // Each landed once, in the order it was sent.
  const info = await jsm.streams.info("LATE");
  assert.equal(info.state.messages, 21);
  const first = await jsm.streams.getMessage("LATE", { seq: 1 });
  assert.equal(new TextDecoder().decode(first!.data), "late0");
  pub.close();
  await own.close();
});

test("publisher: a publish with a message id that goes unanswered (taken by a server that died, a stream leader that died before storing it) is sent again once overdue and lands once; one without an id is not sent again", async () => {
  // A connection of its own, whose publishes are counted; a subscriber that never answers stands
  // for the server or leader that took the first sends and was lost.
  const { own, sends } = await countingConnection();
  let swallowed = 0;
  const lost = own.subscribe("swallow.>", {
    callback: () => {
      swallowed++;
    },
  });
  await own.flush();
  const pub = new JetStreamPublisher(own, 10_000, 400);
  const group = new PublishGroup();
  for (let i = 0; i < 10; i++) pub.send(group, "swallow.id", enc(`s${i}`), { msgID: `swallow-${i}` });
  const noId = new JetStreamPublisher(own, 1_500, 400);
  const plain = noId.publish("swallow.plain", enc("plain"));
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(swallowed, 11, "the first sends were taken and not answered");
  lost.unsubscribe();
  await jsm.streams.add({ name: "SWAL", subjects: ["swallow.>"] });
  const t0 = Date.now();
  await group.wait();
  assert.ok(Date.now() - t0 < 2_000, `landed within a few resend intervals (${Date.now() - t0} ms)`);
  assert.equal(pub.inFlight, 0);
  assert.ok(pub.resent >= 10, `each was sent again (${pub.resent})`);
  assert.equal(group.resentUnanswered, pub.resent, "every send again was of the group's publishes, and counted there");
  assert.equal(group.resentNoResponders, 0);
  assert.ok((sends.get("swallow.id") ?? 0) >= 20);
  // Each landed once, in the order first sent.
  const info = await jsm.streams.info("SWAL");
  assert.equal(info.state.messages, 10);
  for (const seq of [1, 10]) assert.equal(new TextDecoder().decode((await jsm.streams.getMessage("SWAL", { seq }))!.data), `s${seq - 1}`);
  // Without an id a second send could be stored twice: it waits out its deadline, sent once.
  await assert.rejects(plain, /no PubAck within 1500 ms/);
  assert.equal(sends.get("swallow.plain"), 1);
  assert.equal(noId.resent, 0);
  assert.equal((await jsm.streams.info("SWAL")).state.messages, 10);
  pub.close();
  noId.close();
  await own.close();
});

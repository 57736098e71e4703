import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type { JsMsg } from "@nats-io/jetstream";
import { DeliveryInfoParser } from "./delivery-info.js";

// nats.js's own JsMsg class (not exported by the package), to compare against its parsing.
const require = createRequire(import.meta.url);
const { toJsMsg } = require(join(dirname(require.resolve("@nats-io/jetstream")), "jsmsg.js")) as { toJsMsg(m: unknown, timeout?: number): JsMsg };
const jsMsg = (reply: string): JsMsg => toJsMsg({ reply, subject: "s", data: new Uint8Array(0), sid: 1 });
const natsInfo = (reply: string) => ({ ...jsMsg(reply).info });

test("DeliveryInfoParser: each message's delivery info is what nats.js parses, in the field nats.js reads it from", () => {
  const forms = [
    // The old form (9 tokens) and the new one (domain, account, a random token at the end).
    (n: number, dc = 1) => `$JS.ACK.feedback_x_dedupe.dedupe_p3.${dc}.${1000 + n}.${500 + n}.1796377400391${String(n).padStart(6, "0")}.${n % 7}`,
    (n: number, dc = 1) => `$JS.ACK.hub.AcCoUnThAsH.feedback_in.enrich.${dc}.${n + 1}.${n + 1}.1796377400391000123.${n}.Xy7`,
    (n: number, dc = 1) => `$JS.ACK._.AcCoUnThAsH.feedback_in.enrich.${dc}.${n + 1}.${n + 1}.1796377400391000123.${n}.Xy7`,
  ];
  for (const form of forms) {
    const parser = new DeliveryInfoParser();
    for (const [n, dc] of [[0, 1], [1, 1], [2, 3], [3, 1]] as const) {
      const reply = form(n, dc);
      const m = jsMsg(reply);
      parser.apply(m);
      const got = (m as unknown as { di?: unknown }).di;
      assert.ok(got, `no delivery info set for ${reply}`);
      assert.deepEqual({ ...(got as object) }, natsInfo(reply), reply);
      assert.equal(m.seq, natsInfo(reply).streamSequence);
    }
  }
});

test("DeliveryInfoParser: a reply of another head or shape is left to nats.js", () => {
  const parser = new DeliveryInfoParser();
  parser.apply(jsMsg("$JS.ACK.s1.c1.1.10.10.1796377400391000000.0"));
  // Another consumer's head: parsed the nats.js way, which then teaches the parser that head.
  const other = jsMsg("$JS.ACK.s1.c2.2.11.11.1796377400391000000.0");
  parser.apply(other);
  assert.deepEqual({ ...other.info }, natsInfo("$JS.ACK.s1.c2.2.11.11.1796377400391000000.0"));
  // The known head but not five numbers after it: nothing set, nats.js parses it when asked.
  const odd = jsMsg("$JS.ACK.s1.c2.x.11.11.1796377400391000000.0");
  parser.apply(odd);
  assert.equal((odd as unknown as { di?: unknown }).di, undefined);
  // Not a JetStream reply at all: apply leaves it, and reading it fails as nats.js fails.
  const none = jsMsg("_INBOX.abc.1");
  parser.apply(none);
  assert.throws(() => none.info, /not a jetstream message/);
  const short = jsMsg("$JS.ACK.s1.c2.1.12");
  parser.apply(short);
  assert.equal((short as unknown as { di?: unknown }).di, undefined);
  assert.throws(() => short.info, /not a jetstream message/);
});

test("DeliveryInfoParser: a first message nats.js cannot parse does not stop the ones after it", () => {
  const parser = new DeliveryInfoParser();
  assert.doesNotThrow(() => parser.apply(jsMsg("_INBOX.abc.1")));
  const m = jsMsg("$JS.ACK.s1.c1.1.10.10.1796377400391000000.0");
  parser.apply(m);
  assert.deepEqual({ ...m.info }, natsInfo("$JS.ACK.s1.c1.1.10.10.1796377400391000000.0"));
});

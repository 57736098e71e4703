import type { DeliveryInfo, JsMsg } from "@nats-io/jetstream";

/**
 * The delivery info of one durable's messages (stream sequence, delivery count, timestamp),
 * parsed from their reply subjects without splitting them.
 *
 * nats.js splits a message's reply subject into tokens the first time its `seq` or `info` is read
 * (1.3–1.7 µs a message here) and keeps the strings. Every message of a durable has the same
 * head, `$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.`, and then five numbers: delivery
 * count, stream sequence, delivery sequence, timestamp (ns), pending. The first message is
 * parsed by nats.js and teaches the head; each later one with that head has only its numbers
 * read (0.4–0.5 µs), and shares the head's strings. The result is the object nats.js would have
 * made, in the field nats.js 3 reads it from (`di`); a message whose reply does not start with
 * the head, or a JsMsg without that field, is left to nats.js.
 */
export class DeliveryInfoParser {
  private head = "";
  private base: Pick<DeliveryInfo, "domain" | "account_hash" | "stream" | "consumer"> | undefined;
  /** The numbers of the message being parsed (doubles, as parseInt gives them). */
  private readonly numbers = new Float64Array(5);

  /** Gives `m` its delivery info, unless it has one. */
  apply(m: JsMsg): void {
    const target = m as unknown as { di?: DeliveryInfo; reply?: unknown };
    if (!("di" in target) || target.di !== undefined || typeof target.reply !== "string") return;
    const reply = target.reply;
    const base = this.base;
    if (base === undefined || !reply.startsWith(this.head)) {
      this.learn(m, reply);
      return;
    }
    // The five numbers, read in place (no closure or array per message).
    const n = this.numbers;
    let at = this.head.length;
    for (let j = 0; j < 5; j++) {
      let end = reply.indexOf(".", at);
      if (end < 0) end = reply.length;
      const v = end > at ? parseInt(reply.slice(at, end), 10) : NaN;
      // A reply of another shape: nats.js parses it (and throws on what is not a JetStream reply).
      if (Number.isNaN(v)) return;
      n[j] = v;
      at = end + 1;
    }
    const deliveryCount = n[0]!;
    target.di = {
      domain: base.domain,
      account_hash: base.account_hash,
      stream: base.stream,
      consumer: base.consumer,
      deliveryCount,
      redelivered: deliveryCount > 1,
      streamSequence: n[1]!,
      deliverySequence: n[2]!,
      timestampNanos: n[3]!,
      pending: n[4]!,
    };
  }

  /**
   * Parses `m` the nats.js way and keeps its head for the messages after it. A reply nats.js
   * cannot parse either is left as it is: whoever reads its `seq` gets nats.js's error, as before.
   */
  private learn(m: JsMsg, reply: string): void {
    let info: DeliveryInfo;
    try {
      info = m.info;
    } catch {
      return;
    }
    const tokens = reply.split(".");
    // The old form has 9 tokens ($JS ACK stream consumer + 5 numbers), the new one 11 or 12 (with domain and account, then a random token).
    const headTokens = tokens.length === 9 ? 4 : 6;
    this.head = tokens.slice(0, headTokens).join(".") + ".";
    this.base = { domain: info.domain, account_hash: info.account_hash, stream: info.stream, consumer: info.consumer };
  }
}

import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import type { NatsHandles } from "../../src/runtime/nats.js";
import { labelSchemaErrors } from "../../src/eval/inputs.js";

export interface StoredMsg {
  subject: string;
  seq: number;
  data: string;
  /** The message's bytes as stored (`data` is their UTF-8 decoding). */
  raw: Uint8Array;
  headers: Record<string, string>;
  /** When the stream stored it (ms since the epoch, the server's clock). */
  time: number;
}

/** Every message currently in a stream (optionally one subject), read with an ephemeral consumer. */
export async function readStream(nats: NatsHandles, stream: string, filter?: string): Promise<StoredMsg[]> {
  const info = await nats.jsm.streams.info(stream);
  const total = info.state.messages;
  const name = `read_${Math.random().toString(36).slice(2, 10)}`;
  await nats.jsm.consumers.add(stream, { name, ack_policy: AckPolicy.None, deliver_policy: DeliverPolicy.All, inactive_threshold: 30_000_000_000, ...(filter ? { filter_subject: filter } : {}) });
  const c = await nats.js.consumers.get(stream, name);
  const out: StoredMsg[] = [];
  const dec = new TextDecoder();
  while (out.length < total) {
    const batch = await c.fetch({ max_messages: 1000, expires: 1000 });
    let got = 0;
    for await (const m of batch) {
      got++;
      const headers: Record<string, string> = {};
      if (m.headers) for (const [k, v] of m.headers) headers[k] = v.join(",");
      out.push({ subject: m.subject, seq: m.seq, data: dec.decode(m.data), raw: m.data, headers, time: Number(m.info.timestampNanos) / 1e6 });
    }
    if (got === 0) break;
  }
  await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
  return out;
}

/**
 * Every message of a label stream, each checked against config/schemas/label.v2.json (the
 * contract): the integration tests read published labels through this, so every label the suite
 * publishes is validated.
 */
export async function readLabelStream(nats: NatsHandles, stream: string, filter?: string): Promise<StoredMsg[]> {
  const msgs = await readStream(nats, stream, filter);
  for (const m of msgs) {
    let errors: string | null;
    try {
      errors = labelSchemaErrors(JSON.parse(m.data));
    } catch (err) {
      errors = `not JSON: ${(err as Error).message}`;
    }
    if (errors !== null) throw new Error(`label at ${stream} seq ${m.seq} does not match label.v2.json: ${errors}: ${m.data}`);
  }
  return msgs;
}

/** Polls until `pred` holds, or fails with `what` after `timeoutMs`. */
export async function eventually(what: string, pred: () => Promise<boolean>, timeoutMs = 60_000, everyMs = 100): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** True when every durable of the streams has nothing pending and nothing unacknowledged. */
export async function consumersDrained(nats: NatsHandles, streams: string[]): Promise<boolean> {
  for (const s of streams) {
    for await (const ci of nats.jsm.consumers.list(s)) {
      if (!ci.config.durable_name) continue;
      if (ci.num_pending > 0 || ci.num_ack_pending > 0) return false;
    }
  }
  return true;
}

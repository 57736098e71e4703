import { test } from "node:test";
import assert from "node:assert/strict";
import { headers } from "@nats-io/transport-node";
import { pooledNatsEncoding } from "./nats-encoding.js";

test("pooledNatsEncoding: the client nats.js loads encodes through the pooled encoder, byte for byte as a TextEncoder", () => {
  assert.equal(pooledNatsEncoding(), true);
  // Idempotent: every connection calls it.
  assert.equal(pooledNatsEncoding(), true);
  // A header block is encoded by the client's `TE` at call time, in the module instance the
  // client itself uses: a Buffer (a pool slice) now, where a TextEncoder gives a plain Uint8Array.
  // Fails when a new nats.js keeps its encoder elsewhere, and the patch would do nothing.
  const h = headers();
  h.set("Nats-Msg-Id", "next:feedback_x:12");
  h.set("Tacit-Message", "résumé ✓ 😀");
  const bytes = (h as unknown as { encode(): Uint8Array }).encode();
  assert.ok(Buffer.isBuffer(bytes), "nats.js did not encode through the pooled encoder");
  assert.deepEqual(Uint8Array.from(bytes), new TextEncoder().encode(h.toString()));
});

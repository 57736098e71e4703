import { createRequire } from "node:module";
import { dirname, join } from "node:path";

/**
 * Encodes strings to UTF-8 as a TextEncoder does, into slices of Node's shared Buffer pool: for
 * strings of a few hundred bytes that is about four times faster than `TextEncoder.encode`, which
 * makes a new ArrayBuffer (with a backing store of its own, for the GC to free) every call.
 */
class PooledEncoder {
  readonly encoding = "utf-8";
  private readonly te = new TextEncoder();

  encode(input: unknown = ""): Uint8Array {
    return Buffer.from(String(input), "utf8");
  }

  encodeInto(input: string, into: Uint8Array): { read: number; written: number } {
    return this.te.encodeInto(input, into);
  }
}

/** Whether the client's encoder was pointed at a PooledEncoder (once per process). */
let applied: boolean | undefined;

/**
 * nats.js (3.x) encodes every protocol line it sends with a TextEncoder: a PUB or HPUB line per
 * publish, a PUB per acknowledgement, three or four lines per event through the default pipeline.
 * It reads that encoder as its `encoders` module's `TE` at every call, so pointing `TE` at a
 * PooledEncoder changes how each line is encoded, not its bytes. nats.deno#532 tried the same in
 * the client itself; it was not merged. Returns whether the client's module was found as this
 * expects (its `TE` a TextEncoder); when not, it is left as it is. Once per process: every
 * connection calls it.
 */
export function pooledNatsEncoding(): boolean {
  return (applied ??= pointEncoder());
}

function pointEncoder(): boolean {
  const transport = createRequire(import.meta.url).resolve("@nats-io/transport-node");
  const fromTransport = createRequire(transport);
  let encoders: { TE?: unknown };
  try {
    encoders = fromTransport(join(dirname(fromTransport.resolve("@nats-io/nats-core")), "encoders.js")) as { TE?: unknown };
  } catch {
    return false;
  }
  if (!(encoders.TE instanceof TextEncoder)) return false;
  encoders.TE = new PooledEncoder();
  return true;
}

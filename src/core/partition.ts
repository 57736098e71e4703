import murmurhash3js from "murmurhash3js";

const TWO_POW_32 = 2 ** 32;

/**
 * MurmurHash3 x86 32-bit (seed 0) of the UTF-8 bytes of `s`, as an unsigned integer.
 *
 * `murmurhash3js` hashes the low byte of each UTF-16 code unit; encoding to UTF-8 first makes
 * the result the standard MurmurHash3 of the bytes (identical for ASCII input), so producers in
 * other languages can compute the same partition and the same sampling decision.
 */
export function murmur32(s: string): number {
  const bytes = /^[\x00-\x7f]*$/.test(s) ? s : Buffer.from(s, "utf8").toString("latin1");
  return murmurhash3js.x86.hash32(bytes, 0) >>> 0;
}

/** `murmur32(s)` scaled to [0, 1): the position of `s` in a uniform hash space. */
export function unitHash(s: string): number {
  return murmur32(s) / TWO_POW_32;
}

/**
 * The partition of a (pseudonymized) user: murmurhash3 x86 32-bit of the user, modulo the
 * pipeline's partition count. Publishers and keyed stages must agree on this function.
 */
export function partitionOf(user: string, partitions: number): number {
  if (!Number.isInteger(partitions) || partitions < 1) throw new RangeError(`partitions must be a positive integer, got ${partitions}`);
  return murmur32(user) % partitions;
}

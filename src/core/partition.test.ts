import { test } from "node:test";
import assert from "node:assert/strict";
import murmurhash3js from "murmurhash3js";
import { murmur32, partitionOf, unitHash } from "./partition.js";

test("murmur32 matches the MurmurHash3 x86_32 reference vectors", () => {
  // Reference values of MurmurHash3_x86_32 with seed 0 (SMHasher / Appleby's C++ implementation).
  assert.equal(murmur32(""), 0);
  assert.equal(murmur32("hello"), 0x248bfa47);
  assert.equal(murmur32("Hello, world!"), 0xc0363e43);
  assert.equal(murmur32("The quick brown fox jumps over the lazy dog"), 0x2e4ff723);
});

test("murmur32 equals murmurhash3js for ASCII and hashes UTF-8 bytes otherwise", () => {
  for (const s of ["u1", "AbC-123_xyz", "k1:some-user-pseudonym"]) assert.equal(murmur32(s), murmurhash3js.x86.hash32(s));
  // "é" is two UTF-8 bytes; hashing the byte string keeps distinct code points distinct.
  assert.equal(murmur32("é"), murmurhash3js.x86.hash32("\xc3\xa9"));
  assert.notEqual(murmur32("\u0141"), murmur32("A")); // U+0141 and "A" share the low byte 0x41
});

test("partitionOf is stable, in range, and spreads users evenly", () => {
  const partitions = 8;
  const counts = new Array<number>(partitions).fill(0);
  for (let i = 0; i < 8000; i++) {
    const p = partitionOf(`user-${i}`, partitions);
    assert.ok(p >= 0 && p < partitions);
    assert.equal(partitionOf(`user-${i}`, partitions), p);
    counts[p]!++;
  }
  for (const c of counts) assert.ok(c > 850 && c < 1150, `uneven partition sizes: ${counts.join(",")}`);
  assert.equal(partitionOf("anyone", 1), 0);
  assert.throws(() => partitionOf("x", 0), RangeError);
});

test("unitHash lies in [0, 1)", () => {
  for (let i = 0; i < 1000; i++) {
    const u = unitHash(`e${i}`);
    assert.ok(u >= 0 && u < 1);
  }
});

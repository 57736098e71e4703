import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { ConfigError } from "./errors.js";
import {
  DEFAULT_PSEUDONYM_CACHE_ENTRIES,
  DEV_PSEUDONYM_KEY,
  PSEUDONYM_LENGTH,
  PseudonymCache,
  parsePseudonymKey,
  pseudonymize,
  resolvePseudonymKey,
  weakKeyReason,
} from "./pseudonym.js";

const SECRET = "0123456789abcdef0123456789abcdef";

test("parsePseudonymKey reads '<version>:<secret>' and bare secrets", () => {
  assert.deepEqual(parsePseudonymKey(`k1:${SECRET}`), { version: "k1", secret: SECRET });
  assert.deepEqual(parsePseudonymKey(`2024-06.a:${SECRET}`), { version: "2024-06.a", secret: SECRET });
  assert.deepEqual(parsePseudonymKey(SECRET), { version: "v0", secret: SECRET });
  // Only the first colon separates the version; the secret may contain colons.
  assert.deepEqual(parsePseudonymKey(`k3:${SECRET}:x`), { version: "k3", secret: `${SECRET}:x` });
  // A prefix that is not a valid version name is part of a bare secret.
  assert.equal(parsePseudonymKey(`not a version:${SECRET}`).version, "v0");
});

test("parsePseudonymKey rejects empty secrets, naming the source; short ones are flagged as weak", () => {
  assert.throws(() => parsePseudonymKey("k1:", "MY_KEY"), (e: unknown) => e instanceof ConfigError && /MY_KEY/.test(e.message));
  assert.throws(() => parsePseudonymKey("   "), ConfigError);
  assert.match(weakKeyReason(parsePseudonymKey("k1:short")) ?? "", /5 characters/);
  assert.equal(weakKeyReason(parsePseudonymKey(`k1:${SECRET}`)), undefined);
});

test("pseudonymize is the truncated base64url HMAC-SHA256 and depends on the key", () => {
  const key = { version: "k1", secret: SECRET };
  const expected = createHmac("sha256", SECRET).update("alice@example.com").digest("base64url").slice(0, 22);
  assert.equal(pseudonymize(key, "alice@example.com"), expected);
  assert.equal(pseudonymize(key, "alice@example.com").length, PSEUDONYM_LENGTH);
  assert.match(pseudonymize(key, "bob"), /^[A-Za-z0-9_-]{22}$/);
  assert.equal(pseudonymize(key, "bob"), pseudonymize({ ...key }, "bob"));
  assert.notEqual(pseudonymize(key, "bob"), pseudonymize({ version: "k2", secret: SECRET + "!" }, "bob"));
  assert.notEqual(pseudonymize(key, "bob"), pseudonymize(key, "bob2"));
});

test("resolvePseudonymKey: env var, dev fallback, and a ConfigError naming the variable", () => {
  assert.deepEqual(resolvePseudonymKey({ K: `k7:${SECRET}` }, "K", false), { key: { version: "k7", secret: SECRET }, dev: false });
  assert.deepEqual(resolvePseudonymKey({}, "K", true), { key: DEV_PSEUDONYM_KEY, dev: true });
  assert.deepEqual(resolvePseudonymKey({ K: "  " }, "K", true).key.version, "dev");
  assert.throws(() => resolvePseudonymKey({}, "TACIT_PSEUDONYM_KEY", false), (e: unknown) => e instanceof ConfigError && e.message.includes("TACIT_PSEUDONYM_KEY"));
});

test("PseudonymCache returns pseudonymize's result, hit or miss, and holds at most its bound", () => {
  const key = { version: "k1", secret: SECRET };
  const cache = new PseudonymCache(100);
  assert.equal(cache.maxEntries, 100);
  for (let round = 0; round < 2; round++) {
    for (let u = 0; u < 150; u++) assert.equal(cache.pseudonymize(key, `user-${u}`), pseudonymize(key, `user-${u}`));
    assert.ok(cache.size <= 100, `size ${cache.size}`);
  }
  // The most recent users are the ones kept: asking again gives the same answers.
  for (let u = 149; u >= 50; u--) assert.equal(cache.pseudonymize(key, `user-${u}`), pseudonymize(key, `user-${u}`));
  assert.equal(cache.size, 100);
  assert.equal(new PseudonymCache().maxEntries, DEFAULT_PSEUDONYM_CACHE_ENTRIES);
});

test("PseudonymCache never serves a pseudonym of another key: rotation, a reused version, look-alike cache keys", () => {
  const k1 = { version: "k1", secret: SECRET };
  const k2 = { version: "k2", secret: SECRET + "-rotated" };
  const cache = new PseudonymCache(10);
  const p1 = cache.pseudonymize(k1, "alice");
  const p2 = cache.pseudonymize(k2, "alice");
  assert.equal(p1, pseudonymize(k1, "alice"));
  assert.equal(p2, pseudonymize(k2, "alice"));
  assert.notEqual(p1, p2);
  assert.equal(cache.size, 2, "both versions are cached side by side during a rotation");
  // Same version, different secret (a misconfigured rotation): recomputed, not reused.
  const k1b = { version: "k1", secret: SECRET + "-other" };
  assert.equal(cache.pseudonymize(k1b, "alice"), pseudonymize(k1b, "alice"));
  assert.equal(cache.pseudonymize(k1, "alice"), p1);
  // Version "a" with user "b:c" and version "a:b" with user "c" (same secret) must not share an entry.
  const a = { version: "a", secret: SECRET };
  const ab = { version: "a:b", secret: SECRET };
  assert.equal(cache.pseudonymize(a, "b:c"), pseudonymize(a, "b:c"));
  assert.equal(cache.pseudonymize(ab, "c"), pseudonymize(ab, "c"));
});

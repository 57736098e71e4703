import { test } from "node:test";
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { PartitionLeases } from "./leases.js";

const silent = { debug() {}, info() {}, warn() {}, error() {} };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * The Redis commands PartitionLeases uses, in memory, with keys that expire on the wall clock and
 * a latency per round trip (half on the way there, half back): a loaded machine, where every
 * reply also waits for a busy event loop. A pipeline is one round trip.
 */
class SlowRedis {
  latencyMs = 0;
  private readonly strings = new Map<string, { value: string; expiresAt: number }>();
  private readonly zsets = new Map<string, Map<string, number>>();

  private live(key: string): { value: string; expiresAt: number } | undefined {
    const e = this.strings.get(key);
    if (e && e.expiresAt <= Date.now()) this.strings.delete(key);
    return this.strings.get(key);
  }

  private async trip<T>(run: () => T): Promise<T> {
    await sleep(this.latencyMs / 2);
    const out = run();
    await sleep(this.latencyMs / 2);
    return out;
  }

  private zset(key: string): Map<string, number> {
    let z = this.zsets.get(key);
    if (!z) this.zsets.set(key, (z = new Map()));
    return z;
  }

  private readonly now = {
    zadd: (key: string, score: number, member: string) => (this.zset(key).set(member, Number(score)), 1),
    // The worker set's own expiry does not matter here.
    pexpire: (_key: string, _ms: number) => 1,
    // RENEW_LUA and RELEASE_LUA: act only on a key the caller holds.
    eval: (script: string, _keys: number, key: string, owner: string, ttl?: number) => {
      const e = this.live(key);
      if (e?.value !== owner) return 0;
      if (script.includes("PEXPIRE")) e.expiresAt = Date.now() + Number(ttl);
      else this.strings.delete(key);
      return 1;
    },
    zrem: (key: string, member: string) => Number(this.zset(key).delete(member)),
  };

  zadd(key: string, score: number, member: string) {
    return this.trip(() => this.now.zadd(key, score, member));
  }
  pexpire(key: string, ms: number) {
    return this.trip(() => this.now.pexpire(key, ms));
  }
  eval(script: string, keys: number, key: string, owner: string, ttl?: number) {
    return this.trip(() => this.now.eval(script, keys, key, owner, ttl));
  }
  set(key: string, value: string, _px: "PX", ms: number, _nx: "NX") {
    return this.trip(() => {
      if (this.live(key)) return null;
      this.strings.set(key, { value, expiresAt: Date.now() + ms });
      return "OK";
    });
  }
  zremrangebyscore(key: string, _min: "-inf", max: number) {
    return this.trip(() => {
      const z = this.zset(key);
      for (const [m, s] of z) if (s <= max) z.delete(m);
      return 0;
    });
  }
  zcard(key: string) {
    return this.trip(() => this.zset(key).size);
  }
  pipeline() {
    const ops: (() => unknown)[] = [];
    const pipe = {
      zadd: (key: string, score: number, member: string) => (ops.push(() => this.now.zadd(key, score, member)), pipe),
      pexpire: (key: string, ms: number) => (ops.push(() => this.now.pexpire(key, ms)), pipe),
      eval: (script: string, keys: number, key: string, owner: string, ttl?: number) => (ops.push(() => this.now.eval(script, keys, key, owner, ttl)), pipe),
      zrem: (key: string, member: string) => (ops.push(() => this.now.zrem(key, member)), pipe),
      exec: () => this.trip(() => ops.map((op) => [null, op()] as [null, unknown])),
    };
    return pipe;
  }
}

// Seen in test/sessionize-e2e.test.ts (lease_ttl 2s) on a loaded 2-core machine: round trips of
// up to half a second, and a live worker that renewed lease after lease lost its leases.
test("a worker keeps its leases when every Redis round trip takes a fifth of the lease TTL", { timeout: 30_000 }, async () => {
  const redis = new SlowRedis();
  const lost: number[] = [];
  const cb = { acquired: async () => {}, releasing: async () => {}, lost: async (n: number) => void lost.push(n) };
  const leases = new PartitionLeases(redis as unknown as Redis, "p", "g", 4, "w1", 2000, cb, silent);
  await leases.start();
  assert.deepEqual(leases.owned(), [0, 1, 2, 3]);
  redis.latencyMs = 400;
  await sleep(7000);
  redis.latencyMs = 0;
  await leases.stop();
  assert.deepEqual(lost, [], "no lease ran out while its worker renewed it");
});

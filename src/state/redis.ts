import { Redis, Cluster } from "ioredis";
import type { ClaimItem, CommitGroup, StateStore } from "../core/state.js";
import { TransientError } from "../core/errors.js";

/**
 * Applies one commit group atomically. KEYS[1] is the guard key ('' when none); ARGV is
 * guard seq, guard ttl, then a flat list of ops: name, key index, and its arguments.
 * All keys share one hash tag, so this runs unchanged on Redis Cluster.
 */
const COMMIT_LUA = `
local g = KEYS[1]
if ARGV[1] ~= '' then
  local cur = redis.call('GET', g)
  if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
  if tonumber(ARGV[2]) > 0 then redis.call('SET', g, ARGV[1], 'PX', ARGV[2]) else redis.call('SET', g, ARGV[1]) end
end
local i = 3
local function ttl(k, t) if tonumber(t) > 0 then redis.call('PEXPIRE', k, t) end end
while i <= #ARGV do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'set' then
    if tonumber(ARGV[i + 3]) > 0 then redis.call('SET', k, ARGV[i + 2], 'PX', ARGV[i + 3]) else redis.call('SET', k, ARGV[i + 2]) end
    i = i + 4
  elseif op == 'del' then
    redis.call('DEL', k)
    i = i + 2
  elseif op == 'hset' then
    local n = tonumber(ARGV[i + 2])
    for j = 0, n - 1 do redis.call('HSET', k, ARGV[i + 3 + 2 * j], ARGV[i + 4 + 2 * j]) end
    ttl(k, ARGV[i + 3 + 2 * n])
    i = i + 4 + 2 * n
  elseif op == 'hincrbyfloat' then
    redis.call('HINCRBYFLOAT', k, ARGV[i + 2], ARGV[i + 3])
    ttl(k, ARGV[i + 4])
    i = i + 5
  elseif op == 'zadd' then
    redis.call('ZADD', k, ARGV[i + 2], ARGV[i + 3])
    ttl(k, ARGV[i + 4])
    i = i + 5
  elseif op == 'zrem' then
    redis.call('ZREM', k, ARGV[i + 2])
    i = i + 3
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
return 1
`;

type RedisClient = Redis | Cluster;

function transient(err: unknown): TransientError {
  return new TransientError("redis_unavailable", `Redis: ${err instanceof Error ? err.message : String(err)}`, err);
}

/** The Redis StateStore: pipelines many keys per round trip, one Lua call per commit group. */
export class RedisStateStore implements StateStore {
  constructor(readonly redis: RedisClient) {
    redis.defineCommand("tacitCommit", { lua: COMMIT_LUA });
  }

  async get(keys: string[]): Promise<(string | null)[]> {
    if (keys.length === 0) return [];
    try {
      // MGET would be cross-slot on Cluster; a pipeline of GETs works everywhere.
      const res = await this.redis.pipeline(keys.map((k) => ["get", k])).exec();
      return (res ?? []).map(([err, v]) => {
        if (err) throw err;
        return (v as string | null) ?? null;
      });
    } catch (err) {
      throw transient(err);
    }
  }

  async hgetall(key: string): Promise<Record<string, string>> {
    try {
      return await this.redis.hgetall(key);
    } catch (err) {
      throw transient(err);
    }
  }

  async hgetallMany(keys: string[]): Promise<Record<string, string>[]> {
    if (keys.length === 0) return [];
    try {
      const res = (await this.redis.pipeline(keys.map((k) => ["hgetall", k])).exec()) ?? [];
      return res.map(([err, v]) => {
        if (err) throw err;
        return (v as Record<string, string>) ?? {};
      });
    } catch (err) {
      throw transient(err);
    }
  }

  async zrangeByScore(key: string, min: number, max: number, limit?: number) {
    try {
      const args: (string | number)[] = [key, min, max, "WITHSCORES"];
      if (limit !== undefined) args.push("LIMIT", 0, limit);
      const flat = (await (this.redis as Redis).call("ZRANGEBYSCORE", ...args)) as string[];
      const out: { member: string; score: number }[] = [];
      for (let i = 0; i < flat.length; i += 2) out.push({ member: flat[i]!, score: Number(flat[i + 1]) });
      return out;
    } catch (err) {
      throw transient(err);
    }
  }

  async claim(items: ClaimItem[]): Promise<(string | null)[]> {
    if (items.length === 0) return [];
    try {
      const p = this.redis.pipeline();
      for (const it of items) p.call("SET", it.key, it.value, "NX", "PX", Math.max(1, Math.round(it.ttl_ms)), "GET");
      const res = (await p.exec()) ?? [];
      return res.map(([err, v]) => {
        if (err) throw err;
        return (v as string | null) ?? null;
      });
    } catch (err) {
      throw transient(err);
    }
  }

  async commit(groups: CommitGroup[]): Promise<boolean[]> {
    if (groups.length === 0) return [];
    const p = this.redis.pipeline();
    for (const g of groups) {
      const keys: string[] = [g.guard?.key ?? ""];
      const index = new Map<string, number>();
      const ki = (k: string): number => {
        let n = index.get(k);
        if (n === undefined) {
          keys.push(k);
          n = keys.length;
          index.set(k, n);
        }
        return n;
      };
      const argv: (string | number)[] = [g.guard ? g.guard.seq : "", g.guard?.ttl_ms ?? 0];
      for (const op of g.ops) {
        switch (op.op) {
          case "set":
            argv.push("set", ki(op.key), op.value, Math.round(op.ttl_ms ?? 0));
            break;
          case "del":
            argv.push("del", ki(op.key));
            break;
          case "hset": {
            const entries = Object.entries(op.fields);
            argv.push("hset", ki(op.key), entries.length, ...entries.flat(), Math.round(op.ttl_ms ?? 0));
            break;
          }
          case "hincrbyfloat":
            argv.push("hincrbyfloat", ki(op.key), op.field, op.by, Math.round(op.ttl_ms ?? 0));
            break;
          case "zadd":
            argv.push("zadd", ki(op.key), op.score, op.member, Math.round(op.ttl_ms ?? 0));
            break;
          case "zrem":
            argv.push("zrem", ki(op.key), op.member);
            break;
        }
      }
      // A key of '' for "no guard" still needs a slot-consistent name on Cluster: reuse the first op key.
      if (!g.guard) keys[0] = keys[1] ?? "tacit:noop";
      (p as unknown as { tacitCommit(n: number, ...a: (string | number)[]): void }).tacitCommit(keys.length, ...keys, ...argv);
    }
    try {
      const res = (await p.exec()) ?? [];
      return res.map(([err, v]) => {
        if (err) throw err;
        return v === 1;
      });
    } catch (err) {
      throw transient(err);
    }
  }

  async wipe(pattern: string): Promise<number> {
    let n = 0;
    const nodes = this.redis instanceof Cluster ? this.redis.nodes("master") : [this.redis];
    for (const node of nodes) {
      let cursor = "0";
      do {
        const [next, keys] = await node.scan(cursor, "MATCH", pattern, "COUNT", 1000);
        cursor = next;
        for (const k of keys) n += await node.del(k);
      } while (cursor !== "0");
    }
    return n;
  }
}

/** Opens a Redis client for a URL; `redis+cluster://` (or a comma list of nodes) opens a Cluster client. */
export function openRedis(url: string, opts: { lazy?: boolean } = {}): RedisClient {
  if (url.startsWith("redis+cluster://")) {
    const nodes = url.slice("redis+cluster://".length).split(",").map((hp) => {
      const [host, port] = hp.split(":");
      return { host: host!, port: Number(port ?? 6379) };
    });
    return new Cluster(nodes, { lazyConnect: opts.lazy ?? false });
  }
  return new Redis(url, { lazyConnect: opts.lazy ?? false, maxRetriesPerRequest: 2, enableAutoPipelining: false });
}

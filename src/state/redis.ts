import { Redis, Cluster, type ChainableCommander } from "ioredis";
import { LeaseLostError, hashTagOf, type CommitGroup, type CommitLease, type StateStore } from "../core/state.js";
import { TransientError } from "../core/errors.js";
import { Packr } from "msgpackr";
import { readFileSync } from "node:fs";
import type { TlsFiles } from "../config/types.js";

/** Plain MessagePack (no records or extensions): what Redis's cmsgpack reads. */
const packr = new Packr({ useRecords: false, variableMapSize: true });

/**
 * Applies one commit group atomically. KEYS[1] is the guard key ('' when none); ARGV is
 * guard seq, guard ttl, lease key index and holder ('' when none: a lease key lives outside
 * the group's hash tag, so only on a single Redis), then the ops as one MessagePack array
 * (Redis's Lua has cmsgpack): name, key index, and its arguments, flat. One packed argument
 * instead of four or five per op: the client's cost per argument was most of a commit's.
 * Without a lease all keys share one hash tag, so this runs unchanged on Redis Cluster.
 * A hash op is one HSET of all its fields, and each key's TTL is set once, after the ops (the
 * last TTL given wins; a call runs at one instant, so that is the TTL each op would have left):
 * per field and per op, they were most of the calls Redis ran (18 HSETs and 7.5 PEXPIREs per
 * event of the bench, against 5 SETs).
 * Returns 1 applied, 0 fenced off by the guard, -1 lease not held.
 */
const COMMIT_LUA = `
if ARGV[3] ~= '' and redis.call('GET', KEYS[tonumber(ARGV[3])]) ~= ARGV[4] then return -1 end
local g = KEYS[1]
if ARGV[1] ~= '' then
  local cur = redis.call('GET', g)
  if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
  if tonumber(ARGV[2]) > 0 then redis.call('SET', g, ARGV[1], 'PX', ARGV[2]) else redis.call('SET', g, ARGV[1]) end
end
local ARGV = cmsgpack.unpack(ARGV[5])
local i = 1
local ttls = {}
local function ttl(k, t) if tonumber(t) > 0 then ttls[k] = t end end
while i <= #ARGV do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'set' then
    if tonumber(ARGV[i + 3]) > 0 then redis.call('SET', k, ARGV[i + 2], 'PX', ARGV[i + 3]) else redis.call('SET', k, ARGV[i + 2]) end
    ttls[k] = nil
    i = i + 4
  elseif op == 'del' then
    redis.call('DEL', k)
    ttls[k] = nil
    i = i + 2
  elseif op == 'hset' then
    local n = tonumber(ARGV[i + 2])
    if n > 0 then redis.call('HSET', k, unpack(ARGV, i + 3, i + 2 + 2 * n)) end
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
for k, t in pairs(ttls) do redis.call('PEXPIRE', k, t) end
return 1
`;

/**
 * HGETALL of every key, as one array of field/value lists: one command for a batch of keys on a
 * single Redis. Measured against pipelined HGETALLs (330 keys, 400 rounds): the client's CPU went
 * from 4.3 to 1.1 µs per key, Redis's from 0.45 to 1.1.
 */
const HGETALL_MANY_LUA = `
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('HGETALL', k) end
return out
`;

/** Most keys one MGET or HGETALL script call reads: bounds one reply, and how long Redis spends on one call. */
const MAX_KEYS_PER_CALL = 1000;

/**
 * A hash's HGETALL reply as RESP2 gives it (field, value, …) turned into a record, as ioredis's
 * own HGETALL does: a field such as `__proto__` becomes an own property (ioredis#1267).
 */
function pairsToRecord(flat: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i + 1 < flat.length; i += 2) {
    const field = flat[i]!;
    if (field in out) Object.defineProperty(out, field, { value: flat[i + 1]!, configurable: true, enumerable: true, writable: true });
    else out[field] = flat[i + 1]!;
  }
  return out;
}

type RedisClient = Redis | Cluster;

/** How long a Cluster master's count of online replicas is trusted before INFO is asked again. */
const REPLICA_CHECK_MS = 1000;

/** Replicas online (in sync) in the text of `INFO replication` of a master. */
export function onlineReplicas(info: string): number {
  return info.match(/^slave\d+:.*state=online/gm)?.length ?? 0;
}

/** Most state ops one commit script call carries on a single Redis. */
const MAX_OPS_PER_CALL = 256;

/** One pipelined command and the key that decides where it runs on Cluster. */
interface PipelineCommand {
  key: string;
  add(p: ChainableCommander): void;
}

/** A score bound as Redis reads it (it spells infinities `-inf` / `+inf`). */
function scoreBound(n: number): string | number {
  return n === Number.POSITIVE_INFINITY ? "+inf" : n === Number.NEGATIVE_INFINITY ? "-inf" : n;
}

function transient(err: unknown): TransientError {
  return new TransientError("redis_unavailable", `Redis: ${err instanceof Error ? err.message : String(err)}`, err);
}

/** The Redis StateStore: pipelines many keys per round trip, one Lua call per commit group. */
export class RedisStateStore implements StateStore {
  readonly inOrder: boolean;
  /** Online replicas per Cluster master (`host:port`), as last asked. */
  private readonly replicas = new Map<string, { at: number; online: Promise<number> }>();
  /**
   * @param replicaWaitMs On Redis Cluster: how long a `replicated` commit waits (`WAIT 1`) for
   *   every master's writes to reach a replica; 0 does not wait.
   */
  constructor(
    readonly redis: RedisClient,
    private readonly replicaWaitMs = 0,
  ) {
    this.inOrder = !(redis instanceof Cluster);
    redis.defineCommand("tacitCommit", { lua: COMMIT_LUA });
    redis.defineCommand("tacitHgetallMany", { lua: HGETALL_MANY_LUA });
  }

  async get(keys: string[]): Promise<(string | null)[]> {
    if (keys.length === 0) return [];
    // One MGET per chunk on a single Redis: a pipelined GET per key cost the client about four
    // times as much per key (a command and a promise each). MGET would be cross-slot on Cluster.
    if (this.inOrder) return this.chunked(keys, (chunk) => (this.redis as Redis).mget(chunk));
    const res = await this.pipelined(keys.map((k) => ({ key: k, add: (p) => p.get(k) })));
    return res.map((v) => (v as string | null) ?? null);
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
    // On a single Redis, one script call per chunk reads them all (as MGET does for strings).
    if (this.inOrder) {
      const run = this.redis as unknown as { tacitHgetallMany(n: number, ...keys: string[]): Promise<string[][]> };
      return this.chunked(keys, async (chunk) => (await run.tacitHgetallMany(chunk.length, ...chunk)).map(pairsToRecord));
    }
    const res = await this.pipelined(keys.map((k) => ({ key: k, add: (p) => p.hgetall(k) })));
    return res.map((v) => (v as Record<string, string> | null) ?? {});
  }

  /** Runs `read` on chunks of at most MAX_KEYS_PER_CALL keys, one after the other; the answers in key order. */
  private async chunked<T>(keys: string[], read: (chunk: string[]) => Promise<T[]>): Promise<T[]> {
    try {
      if (keys.length <= MAX_KEYS_PER_CALL) return await read(keys);
      const out: T[] = [];
      for (let i = 0; i < keys.length; i += MAX_KEYS_PER_CALL) out.push(...(await read(keys.slice(i, i + MAX_KEYS_PER_CALL))));
      return out;
    } catch (err) {
      throw transient(err);
    }
  }

  async zrangeByScore(key: string, min: number, max: number, limit?: number) {
    try {
      const args: (string | number)[] = [key, scoreBound(min), scoreBound(max), "WITHSCORES"];
      if (limit !== undefined) args.push("LIMIT", 0, limit);
      const reply = (await (this.redis as Redis).call("ZRANGEBYSCORE", ...args)) as unknown[];
      // RESP2 answers a flat [member, score, …]; RESP3 (ioredis 6's default) [[member, score], …].
      const out: { member: string; score: number }[] = [];
      for (let i = 0; i < reply.length; i++) {
        const item = reply[i];
        if (Array.isArray(item)) out.push({ member: String(item[0]), score: Number(item[1]) });
        else out.push({ member: String(item), score: Number(reply[++i]) });
      }
      return out;
    } catch (err) {
      throw transient(err);
    }
  }

  async commit(groups: CommitGroup[], opts: { lease?: CommitLease; replicated?: boolean } = {}): Promise<boolean[]> {
    const applied = await this.apply(groups, opts.lease);
    if (opts.replicated) await this.replicated();
    return applied;
  }

  /**
   * Waits until every master's writes so far have reached one replica (`WAIT 1`: a client's
   * writes to a node travel on its one connection, which is the connection WAIT asks on). A
   * master with no replica online (its replica was promoted after a failover, or is down) has
   * nothing to wait for: what it holds has no second copy until a replica joins it again. Which
   * masters have one is asked with INFO, at most once a second per master, and again when a
   * WAIT times out.
   */
  private async replicated(): Promise<void> {
    const cluster = this.redis;
    if (!(cluster instanceof Cluster) || this.replicaWaitMs <= 0) return;
    try {
      await Promise.all(
        cluster.nodes("master").map(async (node) => {
          if ((await this.onlineReplicas(node)) === 0) return;
          if (Number(await node.call("WAIT", 1, this.replicaWaitMs)) >= 1) return;
          if ((await this.onlineReplicas(node, true)) === 0) return;
          throw new Error(`${node.options.host}:${node.options.port}: no replica acknowledged the commit within ${this.replicaWaitMs} ms`);
        }),
      );
    } catch (err) {
      throw transient(err);
    }
  }

  /** How many replicas of a master are online (in sync), from INFO at most `REPLICA_CHECK_MS` old unless `fresh`. */
  private onlineReplicas(node: Redis, fresh = false): Promise<number> {
    const key = `${node.options.host}:${node.options.port}`;
    const known = this.replicas.get(key);
    if (known && !fresh && Date.now() - known.at < REPLICA_CHECK_MS) return known.online;
    const online = node.info("replication").then(onlineReplicas);
    const entry = { at: Date.now(), online };
    this.replicas.set(key, entry);
    online.catch(() => this.replicas.get(key) === entry && this.replicas.delete(key));
    return online;
  }

  private async apply(groups: CommitGroup[], lease: CommitLease | undefined): Promise<boolean[]> {
    if (groups.length === 0) return [];
    if (lease && !this.inOrder) throw new Error("a lease-fenced commit needs a single Redis (the lease key is in another hash slot)");
    // On one Redis, consecutive unguarded groups run as one script call: the same order and the
    // same all-at-once (one MULTI/EXEC), a fraction of the calls. Bounded so no call carries an
    // ARGV large enough to slow Redis down (redis/redis#2601).
    // A chunk lists its groups (not a merged copy: copying ops group by group made building a
    // chunk quadratic in its size).
    const chunks: { groups: CommitGroup[]; ops: number }[] = [];
    for (const g of groups) {
      const last = chunks[chunks.length - 1];
      if (this.inOrder && !g.guard && last && !last.groups[0]!.guard && last.ops + g.ops.length <= MAX_OPS_PER_CALL) {
        last.groups.push(g);
        last.ops += g.ops.length;
      } else chunks.push({ groups: [g], ops: g.ops.length });
    }
    const cmds: PipelineCommand[] = [];
    for (const { groups: members } of chunks) {
      const g = members[0]!;
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
      const head: (string | number)[] = [g.guard ? g.guard.seq : "", Math.round(g.guard?.ttl_ms ?? 0), lease ? ki(lease.key) : "", lease?.holder ?? ""];
      // Numbers travel as the strings Redis would get as arguments (a float as JS prints it).
      const argv: (string | number)[] = [];
      const t = (ms: number | undefined) => String(Math.round(ms ?? 0));
      for (const member of members) {
        for (const op of member.ops) {
          switch (op.op) {
            case "set":
              argv.push("set", ki(op.key), op.value, t(op.ttl_ms));
              break;
            case "del":
              argv.push("del", ki(op.key));
              break;
            case "hset": {
              const at = argv.length + 2;
              argv.push("hset", ki(op.key), 0);
              let n = 0;
              for (const f in op.fields) {
                argv.push(f, String(op.fields[f]));
                n++;
              }
              argv[at] = n;
              argv.push(t(op.ttl_ms));
              break;
            }
            case "hincrbyfloat":
              argv.push("hincrbyfloat", ki(op.key), op.field, String(op.by), t(op.ttl_ms));
              break;
            case "zadd":
              argv.push("zadd", ki(op.key), String(op.score), op.member, t(op.ttl_ms));
              break;
            case "zrem":
              argv.push("zrem", ki(op.key), op.member);
              break;
          }
        }
      }
      // A key of '' for "no guard" still needs a slot-consistent name on Cluster: reuse the first op key.
      if (!g.guard) keys[0] = keys[1] ?? "tacit:noop";
      cmds.push({
        key: keys[0]!,
        add: (p) => (p as unknown as { tacitCommit(n: number, ...a: (string | number | Buffer)[]): void }).tacitCommit(keys.length, ...keys, ...head, packr.pack(argv)),
      });
    }
    const res = await this.pipelined(cmds, true);
    // One MULTI/EXEC: no other client ran in between, so every group saw the same lease.
    if (lease && res.some((v) => v === -1)) throw new LeaseLostError(lease);
    return chunks.flatMap((c, i) => Array<boolean>(c.groups.length).fill(res[i] === 1));
  }

  /**
   * Runs commands pipelined and returns their replies in input order. On a single Redis that is
   * one pipeline. ioredis refuses a Cluster pipeline whose keys live on different nodes, so on
   * Cluster the commands are split by hash tag (one tag, one slot) into pipelines that run in
   * parallel; commands of one tag keep their order, which is all fences rely on.
   * With `transaction` on a single Redis they run in MULTI/EXEC: an error Redis finds while
   * queueing (out of memory above all) applies none of them, so a later command (a partition's
   * progress) never lands without the earlier ones.
   */
  private async pipelined(cmds: PipelineCommand[], transaction = false): Promise<unknown[]> {
    const run = async (list: PipelineCommand[]): Promise<unknown[]> => {
      const p = transaction && !(this.redis instanceof Cluster) ? this.redis.multi() : this.redis.pipeline();
      for (const c of list) c.add(p);
      const res = (await p.exec()) ?? [];
      if (res.length !== list.length) throw new Error(`pipeline answered ${res.length} of ${list.length} commands`);
      return res.map(([err, v]) => {
        if (err) throw err;
        return v;
      });
    };
    try {
      if (!(this.redis instanceof Cluster)) return await run(cmds);
      const byTag = new Map<string, number[]>();
      cmds.forEach((c, i) => {
        const tag = hashTagOf(c.key);
        const list = byTag.get(tag);
        if (list) list.push(i);
        else byTag.set(tag, [i]);
      });
      const out: unknown[] = new Array(cmds.length);
      await Promise.all(
        [...byTag.values()].map(async (idx) => {
          const res = await run(idx.map((i) => cmds[i]!));
          idx.forEach((i, j) => (out[i] = res[j]));
        }),
      );
      return out;
    } catch (err) {
      throw transient(err);
    }
  }

  wipe(pattern: string): Promise<number> {
    return unlinkMatching(this.redis, pattern);
  }
}

/**
 * Deletes every key matching the SCAN glob `pattern` (on every master of a Cluster) for which
 * `doomed` holds, a page at a time: one round trip per scanned page rather than per key, and
 * UNLINK frees memory off the main thread. Returns how many keys were deleted.
 */
export async function unlinkMatching(redis: RedisClient, pattern: string, doomed: (key: string) => boolean = () => true): Promise<number> {
  let n = 0;
  const nodes = redis instanceof Cluster ? redis.nodes("master") : [redis];
  for (const node of nodes) {
    let cursor = "0";
    do {
      const [next, keys] = await node.scan(cursor, "MATCH", pattern, "COUNT", 1000);
      cursor = next;
      const chosen = keys.filter(doomed);
      if (chosen.length === 0) continue;
      const res = (await node.pipeline(chosen.map((k) => ["unlink", k])).exec()) ?? [];
      for (const [err, v] of res) {
        if (err) throw err;
        n += Number(v);
      }
    } while (cursor !== "0");
  }
  return n;
}


/** Connection settings beside the URL: the pipeline's `redis.password` (from a file or env) and `redis.tls`. */
export interface RedisConnectOptions {
  lazy?: boolean;
  password?: string;
  /** TLS: true (system CAs) or the PEM files of a CA and a client certificate. */
  tls?: boolean | TlsFiles;
}

/** Node TLS options from PEM files: read once, at connect time (a missing file throws here). */
function tlsOptions(files: TlsFiles): { ca?: Buffer; cert?: Buffer; key?: Buffer } {
  const out: { ca?: Buffer; cert?: Buffer; key?: Buffer } = {};
  if (files.ca_file) out.ca = readFileSync(files.ca_file);
  if (files.cert_file) out.cert = readFileSync(files.cert_file);
  if (files.key_file) out.key = readFileSync(files.key_file);
  return out;
}

/**
 * Opens a Redis client for a URL; `redis+cluster://host:port,host:port` opens a Cluster client.
 * A password in the options wins over one in the URL; `tls` (or a `rediss://` URL) turns on TLS.
 */
export function openRedis(url: string, opts: RedisConnectOptions = {}): RedisClient {
  const auth = opts.password ? { password: opts.password } : {};
  const files = typeof opts.tls === "object" ? opts.tls : {};
  const tls = opts.tls || url.startsWith("rediss://") ? { tls: tlsOptions(files) } : {};
  if (url.startsWith("redis+cluster://")) {
    const nodes = url.slice("redis+cluster://".length).split(",").map((hp) => {
      const [host, port] = hp.split(":");
      return { host: host!, port: Number(port ?? 6379) };
    });
    return new Cluster(nodes, { lazyConnect: opts.lazy ?? false, redisOptions: { ...auth, ...tls } });
  }
  return new Redis(url, { lazyConnect: opts.lazy ?? false, maxRetriesPerRequest: 2, enableAutoPipelining: false, ...auth, ...tls });
}

/** The Redis client for a pipeline's settings. */
export function openPipelineRedis(p: { redis: { url: string; password?: string; tls: false | TlsFiles } }): RedisClient {
  return openRedis(p.redis.url, { password: p.redis.password, tls: p.redis.tls });
}

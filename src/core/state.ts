/**
 * Keyed state, the operators' only way to Redis. Every key of one user carries that user's
 * Redis Cluster hash tag (see `userKey`) so one commit group updates them atomically, on a
 * single Redis and on Redis Cluster alike.
 */

export type StateOp =
  | { op: "set"; key: string; value: string; ttl_ms?: number }
  | { op: "del"; key: string }
  | { op: "hset"; key: string; fields: Record<string, string | number>; ttl_ms?: number }
  | { op: "hincrbyfloat"; key: string; field: string; by: number; ttl_ms?: number }
  | { op: "zadd"; key: string; score: number; member: string; ttl_ms?: number }
  | { op: "zrem"; key: string; member: string };

/** A set of state changes applied atomically; all keys must share one hash tag. */
export interface CommitGroup {
  /**
   * The exactly-once fence: the group is applied only if `seq` is greater than the number
   * stored at `guard.key`, which is then set to `seq`. A redelivered or replayed input whose
   * sequence was already applied changes nothing.
   */
  guard?: { key: string; seq: number; ttl_ms?: number };
  ops: StateOp[];
}

/** Who must hold which lease for a commit to apply (see {@link StateStore.commit}). */
export interface CommitLease {
  key: string;
  holder: string;
}

/** A commit refused because the lease it was fenced by is no longer held: nothing was applied. */
export class LeaseLostError extends Error {
  constructor(readonly lease: CommitLease) {
    super(`lease ${lease.key} is no longer held by ${lease.holder}; nothing was committed`);
    this.name = "LeaseLostError";
  }
}


export interface StateStore {
  /** Values of string keys (null where missing), in one round trip. */
  get(keys: string[]): Promise<(string | null)[]>;
  /** All fields of a hash ({} when missing). */
  hgetall(key: string): Promise<Record<string, string>>;
  /** All fields of many hashes in one round trip. */
  hgetallMany(keys: string[]): Promise<Record<string, string>[]>;
  /** Members of a sorted set with score in [min, max], ascending, with their scores. */
  zrangeByScore(key: string, min: number, max: number, limit?: number): Promise<{ member: string; score: number }[]>;
  /**
   * Applies commit groups (each atomically); true where applied, false where fenced off. With
   * `lease` (only where `inOrder`), every group is applied only while `lease.key` holds
   * `lease.holder`, checked inside the same atomic step: otherwise nothing is applied and it
   * rejects with LeaseLostError. That fences a stalled worker whose partition moved on.
   * With `replicated`, it resolves only once every write this store made so far (this call's
   * and earlier ones) has reached a replica, where the store replicates asynchronously and is
   * told to wait (Redis Cluster with `redis.replica_wait`); else it rejects with a TransientError.
   */
  commit(groups: CommitGroup[], opts?: { lease?: CommitLease; replicated?: boolean }): Promise<boolean[]>;
  /**
   * Whether `commit` applies its groups in the order given and together (one Redis server: one
   * MULTI/EXEC, which applies none when Redis refuses one while queueing, out of memory above
   * all), so a group put last lands with the others. A group that fails while running (a wrong
   * key type: a bug) does not undo the rest; the commit still rejects and the batch is retried.
   * False on Redis Cluster, where groups of different hash tags run in parallel on different nodes.
   */
  readonly inOrder: boolean;
  /** Deletes every key under a prefix pattern (used by rebuild); returns how many. */
  wipe(pattern: string): Promise<number>;
}

/**
 * Applies commit phases, each landing before the next starts: where `store.inOrder`, all of them
 * in one atomic step (fenced by `lease`); elsewhere (Redis Cluster) phase by phase, and with
 * `replicated` each phase is on a replica before the next is written, the last one too. So a
 * failover that promotes a lagging replica never keeps a later phase (the partition's progress,
 * which says its inputs were applied) without the earlier ones (the state and timers it vouches
 * for): a phase whose wait fails rejects before the next is written, and its inputs run again.
 */
export async function commitPhases(store: StateStore, phases: CommitGroup[][], opts: { lease?: CommitLease; replicated?: boolean } = {}): Promise<void> {
  if (store.inOrder) {
    await store.commit(phases.flat(), opts.lease ? { lease: opts.lease } : {});
    return;
  }
  for (const phase of phases) if (phase.length) await store.commit(phase, { replicated: opts.replicated === true });
}

/** The hash tag of one user in one pipeline: every key of that user contains it. */
export function userTag(prefix: string, user: string): string {
  return `{${prefix}:u:${user}}`;
}

/** A key of one user's state: `tacit:{<prefix>:u:<user>}:<parts…>`. */
export function userKey(prefix: string, user: string, ...parts: (string | number)[]): string {
  // Concatenated (not an array joined): built several times for every input.
  let key = `tacit:${userTag(prefix, user)}`;
  for (const part of parts) key += `:${part}`;
  return key;
}

/** A key of one partition's state (watermarks, timers): `tacit:{<prefix>:p:<stage>:<n>}:<parts…>`. */
export function partitionKey(prefix: string, stage: string, partition: number, ...parts: (string | number)[]): string {
  return ["tacit", `{${prefix}:p:${stage}:${partition}}`, ...parts].join(":");
}

/** A pipeline-wide key (leases, worker registry): `tacit:{<prefix>}:<parts…>`. */
export function pipelineKey(prefix: string, ...parts: (string | number)[]): string {
  return ["tacit", `{${prefix}}`, ...parts].join(":");
}

/** The hash tag inside a key, as Redis Cluster computes it (first `{…}` with content). */
export function hashTagOf(key: string): string {
  const open = key.indexOf("{");
  if (open >= 0) {
    const close = key.indexOf("}", open + 1);
    if (close > open + 1) return key.slice(open + 1, close);
  }
  return key;
}

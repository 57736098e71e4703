import type { Redis, Cluster } from "ioredis";
import { pipelineKey } from "../core/state.js";
import type { Logger } from "../core/operator.js";
import { within } from "../core/wait.js";

const RENEW_LUA = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end`;
const RELEASE_LUA = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;

export interface LeaseCallbacks {
  /** A partition is now ours: start consuming it. */
  acquired(partition: number): Promise<void>;
  /** A partition must be given up (rebalancing or shutdown): stop consuming it and settle what is in flight. */
  releasing(partition: number): Promise<void>;
  /** The lease was lost (expired while we held it): stop at once, do not settle. */
  lost(partition: number): Promise<void>;
}

/**
 * Partition ownership for keyed stage groups: one owner per partition at a time through Redis
 * `SET NX PX` leases that the owner renews; a dead worker's leases expire and move. Workers
 * announce themselves in a sorted set so each takes a fair share (ceil(partitions / workers)).
 * Leases use the wall clock; they decide only who works, never what the result is.
 */
export class PartitionLeases {
  private readonly held = new Set<number>();
  private timer: NodeJS.Timeout | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> = Promise.resolve();
  private renewing: Promise<void> = Promise.resolve();
  private stopped = false;
  /** Set by stop(): no more acquiring or rebalancing. */
  private leaving = false;

  constructor(
    private readonly redis: Redis | Cluster,
    private readonly prefix: string,
    private readonly group: string,
    private readonly partitions: number,
    private readonly workerId: string,
    private readonly ttlMs: number,
    private readonly cb: LeaseCallbacks,
    private readonly log: Logger,
  ) {}

  private key(n: number): string {
    return pipelineKey(this.prefix, "lease", this.group, n);
  }

  private get workersKey(): string {
    return pipelineKey(this.prefix, "workers", this.group);
  }

  owned(): number[] {
    return [...this.held].sort((a, b) => a - b);
  }

  async start(): Promise<void> {
    await this.renew();
    await this.tick();
    const every = Math.max(200, Math.floor(this.ttlMs / 3));
    // Renewal has its own timer: giving a partition up waits for its in-flight work, and that
    // must never delay the renewal of the other leases past their TTL.
    this.renewTimer = setInterval(() => {
      this.renewing = this.renewing.then(() => this.renew()).catch((err) => this.log.warn({ err: String(err) }, "lease renewal failed"));
    }, every);
    this.timer = setInterval(() => {
      this.ticking = this.ticking.then(() => this.tick()).catch((err) => this.log.warn({ err: String(err) }, "lease tick failed"));
    }, every);
  }

  /**
   * Heartbeat and renewal of every held lease in one round trip (the keys share a hash tag); a
   * lease found lost stops its partition at once. A round trip per lease was too slow on a loaded
   * machine, where each reply also waits for a busy event loop: the last lease of a renewal could
   * run out in a live worker.
   */
  async renew(): Promise<void> {
    if (this.stopped) return;
    const owned = this.owned();
    const pipe = this.redis.pipeline().zadd(this.workersKey, Date.now(), this.workerId).pexpire(this.workersKey, this.ttlMs * 10);
    for (const n of owned) pipe.eval(RENEW_LUA, 1, this.key(n), this.workerId, this.ttlMs);
    const replies = (await pipe.exec()) ?? [];
    owned.forEach((n, i) => {
      const [err, ok] = replies[i + 2] ?? [null, 1];
      if (!err && ok !== 1 && this.held.delete(n)) {
        this.log.warn({ partition: n, group: this.group }, "lease lost");
        this.cb.lost(n).catch((e) => this.log.error({ partition: n, err: String(e) }, "stopping a lost partition failed"));
      }
    });
    const failed = replies.find(([err]) => err)?.[0];
    if (failed) throw failed;
  }

  /** One round: give up extras, take free partitions up to a fair share. */
  async tick(): Promise<void> {
    if (this.stopped || this.leaving) return;
    const now = Date.now();
    await this.redis.zremrangebyscore(this.workersKey, "-inf", now - this.ttlMs);
    const alive = Math.max(1, await this.redis.zcard(this.workersKey));
    const fair = Math.ceil(this.partitions / alive);
    while (this.held.size > fair) {
      const n = this.owned().pop()!;
      await this.release(n);
    }
    if (this.held.size < fair) {
      // Start the scan at an offset derived from the worker id so workers don't all race for partition 0.
      const offset = [...this.workerId].reduce((a, c) => (a * 31 + c.charCodeAt(0)) >>> 0, 7) % this.partitions;
      for (let i = 0; i < this.partitions && this.held.size < fair && !this.stopped && !this.leaving; i++) {
        const n = (offset + i) % this.partitions;
        if (this.held.has(n)) continue;
        const got = await this.redis.set(this.key(n), this.workerId, "PX", this.ttlMs, "NX");
        if (got === "OK") {
          this.held.add(n);
          this.log.info({ partition: n, group: this.group }, "lease acquired");
          try {
            await this.cb.acquired(n);
          } catch (err) {
            this.log.error({ partition: n, err: String(err) }, "could not start partition; releasing it");
            await this.release(n);
          }
        }
      }
    }
  }

  private async release(n: number): Promise<void> {
    try {
      await this.cb.releasing(n);
    } finally {
      this.held.delete(n);
      await this.redis.eval(RELEASE_LUA, 1, this.key(n), this.workerId);
    }
  }

  /**
   * Gives up every partition after settling it, and leaves the worker set. Settling is waited
   * for; the Redis requests around it (the round in flight, then the releases, the last renewal
   * and leaving the set, in one round trip) a lease TTL each at most: with Redis down each
   * would take the client's retries to fail, and a lease not given up runs out by itself
   * within its TTL, as a dead worker's does.
   */
  async stop(): Promise<void> {
    // No more rebalancing; renewal goes on until every partition is settled.
    this.leaving = true;
    if (this.timer) clearInterval(this.timer);
    await within(this.ticking.catch(() => undefined), this.ttlMs);
    const owned = this.owned();
    try {
      for (const n of owned) await this.cb.releasing(n);
    } finally {
      this.stopped = true;
      if (this.renewTimer) clearInterval(this.renewTimer);
      for (const n of owned) this.held.delete(n);
      const pipe = this.redis.pipeline();
      for (const n of owned) pipe.eval(RELEASE_LUA, 1, this.key(n), this.workerId);
      pipe.zrem(this.workersKey, this.workerId);
      await within(Promise.all([this.renewing, pipe.exec()]).catch(() => undefined), this.ttlMs);
    }
  }
}

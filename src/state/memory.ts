import { LeaseLostError, type CommitGroup, type CommitLease, type StateOp, type StateStore } from "../core/state.js";

interface Entry {
  kind: "string" | "hash" | "zset";
  value: string | Map<string, string> | Map<string, number>;
  expiresAt?: number;
}

/**
 * An in-memory StateStore with the same semantics as the Redis one, for unit tests and fakes.
 * Expiry uses `now()` (a test's clock), so TTL behaviour can be tested without waiting.
 */
export class MemoryStateStore implements StateStore {
  private readonly data = new Map<string, Entry>();
  readonly inOrder = true;
  constructor(private readonly now: () => number = () => 0) {}

  private live(key: string): Entry | undefined {
    const e = this.data.get(key);
    if (e && e.expiresAt !== undefined && e.expiresAt <= this.now()) {
      this.data.delete(key);
      return undefined;
    }
    return e;
  }

  private expire(key: string, ttl?: number): void {
    const e = this.data.get(key);
    if (e && ttl !== undefined && ttl > 0) e.expiresAt = this.now() + ttl;
  }

  /** Every live key, sorted (for assertions such as "no state left"). */
  keys(): string[] {
    return [...this.data.keys()].filter((k) => this.live(k)).sort();
  }

  async get(keys: string[]): Promise<(string | null)[]> {
    return keys.map((k) => {
      const e = this.live(k);
      return e?.kind === "string" ? (e.value as string) : null;
    });
  }

  async hgetall(key: string): Promise<Record<string, string>> {
    const e = this.live(key);
    return e?.kind === "hash" ? Object.fromEntries(e.value as Map<string, string>) : {};
  }

  async hgetallMany(keys: string[]): Promise<Record<string, string>[]> {
    return Promise.all(keys.map((k) => this.hgetall(k)));
  }

  async zrangeByScore(key: string, min: number, max: number, limit?: number) {
    const e = this.live(key);
    if (e?.kind !== "zset") return [];
    const out = [...(e.value as Map<string, number>)]
      .filter(([, s]) => s >= min && s <= max)
      .sort((a, b) => a[1] - b[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
      .map(([member, score]) => ({ member, score }));
    return limit === undefined ? out : out.slice(0, limit);
  }

  async commit(groups: CommitGroup[], opts: { lease?: CommitLease } = {}): Promise<boolean[]> {
    const lease = opts.lease;
    if (lease) {
      const cur = this.live(lease.key);
      if (cur?.kind !== "string" || cur.value !== lease.holder) throw new LeaseLostError(lease);
    }
    return groups.map((g) => {
      if (g.guard) {
        const cur = this.live(g.guard.key);
        if (cur?.kind === "string" && Number(cur.value) >= g.guard.seq) return false;
        this.data.set(g.guard.key, { kind: "string", value: String(g.guard.seq) });
        this.expire(g.guard.key, g.guard.ttl_ms);
      }
      for (const op of g.ops) this.apply(op);
      return true;
    });
  }

  private apply(op: StateOp): void {
    switch (op.op) {
      case "set":
        this.data.set(op.key, { kind: "string", value: op.value });
        this.expire(op.key, op.ttl_ms);
        return;
      case "del":
        this.data.delete(op.key);
        return;
      case "hset": {
        const m = this.mapOf(op.key, "hash") as Map<string, string>;
        for (const [f, v] of Object.entries(op.fields)) m.set(f, String(v));
        this.expire(op.key, op.ttl_ms);
        return;
      }
      case "hincrbyfloat": {
        const m = this.mapOf(op.key, "hash") as Map<string, string>;
        m.set(op.field, String(Number(m.get(op.field) ?? 0) + op.by));
        this.expire(op.key, op.ttl_ms);
        return;
      }
      case "zadd": {
        const m = this.mapOf(op.key, "zset") as Map<string, number>;
        m.set(op.member, op.score);
        this.expire(op.key, op.ttl_ms);
        return;
      }
      case "zrem": {
        const e = this.live(op.key);
        if (e?.kind === "zset") {
          (e.value as Map<string, number>).delete(op.member);
          if ((e.value as Map<string, number>).size === 0) this.data.delete(op.key);
        }
        return;
      }
    }
  }

  private mapOf(key: string, kind: "hash" | "zset"): Map<string, string> | Map<string, number> {
    const e = this.live(key);
    if (e && e.kind === kind) return e.value as Map<string, string>;
    const m = new Map();
    this.data.set(key, { kind, value: m });
    return m;
  }

  async wipe(pattern: string): Promise<number> {
    const re = new RegExp("^" + pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
    let n = 0;
    for (const k of [...this.data.keys()]) {
      if (re.test(k)) {
        this.data.delete(k);
        n++;
      }
    }
    return n;
  }
}

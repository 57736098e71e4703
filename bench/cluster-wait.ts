import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import type { Cluster } from "ioredis";
import { commitPhases, userKey, partitionKey } from "../src/core/state.js";
import { openRedis, RedisStateStore } from "../src/state/redis.js";
import { startRedisCluster } from "../test/support/servers.js";

/**
 * What `redis.replica_wait` costs a keyed commit on Redis Cluster: a local cluster of 3 masters
 * with a replica each (as the failover test starts it), then commits shaped like a keyed batch's
 * (two phases through `commitPhases`, as the runner commits them: 20 users' states, then the
 * partition's progress), timed without and with the WAITs, alternating, `--runs` times each.
 *
 *   node dist/bench/cluster-wait.js [--commits 2000] [--users 20] [--runs 3]
 */
async function main(): Promise<void> {
  const arg = (name: string, dflt: number) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const [commits, users, runs] = [arg("commits", 2000), arg("users", 20), arg("runs", 3)];
  const cluster = await startRedisCluster(mkdtempSync(join(tmpdir(), "tacit-bench-cluster-")));
  const client = openRedis(cluster.url) as Cluster;
  try {
    await new Promise((resolve) => client.once("ready", resolve));
    const per: Record<string, number[]> = { "0ms": [], "1s": [] };
    for (let r = 0; r < runs; r++) {
      for (const [name, waitMs] of [["0ms", 0], ["1s", 1000]] as const) {
        const store = new RedisStateStore(client, waitMs);
        const t0 = performance.now();
        for (let i = 0; i < commits; i++) {
          const states = Array.from({ length: users }, (_, j) => ({ ops: [{ op: "set" as const, key: userKey("bench", `u${(i * users + j) % 1000}`, "s", "state"), value: String(i) }] }));
          await commitPhases(store, [states, [{ ops: [{ op: "hset", key: partitionKey("bench", "s", i % 4, "wm"), fields: { applied_seq: i } }] }]], { replicated: true });
        }
        per[name]!.push((performance.now() - t0) / commits);
      }
    }
    const fmt = (xs: number[]) => xs.map((x) => x.toFixed(3)).join(", ");
    process.stdout.write(`ms per commit (${users} users + progress), ${runs} runs each:\n  replica_wait=0ms: ${fmt(per["0ms"]!)}\n  replica_wait=1s:  ${fmt(per["1s"]!)}\n`);
  } finally {
    client.disconnect();
    await cluster.stop();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  });
}

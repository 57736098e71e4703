import { pathToFileURL } from "node:url";
import { DEV_PSEUDONYM_KEY, pseudonymize } from "../src/core/pseudonym.js";
import type { Delivery } from "../src/eval/evaluate.js";
import { eventsPerUser } from "../src/eval/inputs.js";
import { simulate } from "../src/sim/simulate.js";
import { runChain, scoreChain } from "../test/support/label-chain.js";

/**
 * Hold or emit-and-retract, measured: simulated traffic through the whole chain in memory (the
 * real operators, the runtime's keyed state, watermarks and timers; test/support/label-chain.ts)
 * once with label-derive's probation on (hold) and once off (emit at once, retract on a flag).
 * Stream time follows the traffic as if it were published as it happens (each input's stream
 * time is the latest event time published so far), so the latencies are deterministic and are
 * what a live pipeline fed in real time would show.
 *
 *   node dist/bench/label-delivery.js [seed…]    (after a build; default seeds 21 22)
 */

/** One mode's figures on one seed. */
export interface DeliveryRow {
  seed: string;
  mode: "hold" | "emit";
  /** Labels of the final view, and of those from bot users in the truth. */
  live: number;
  live_from_bots: number;
  positive_precision: number | null;
  coverage: number | null;
  delivery: Delivery;
}

/** Runs one seed in both modes (400 users, 30 % bots, 2 h, as issue 9 measured). */
export async function measureDelivery(seed: string, opts: { users?: number; durationMs?: number } = {}): Promise<DeliveryRow[]> {
  const sim = simulate({ seed, users: opts.users ?? 400, durationMs: opts.durationMs ?? 2 * 3_600_000, botFraction: 0.3 });
  const perUser = eventsPerUser(sim.events, (id) => pseudonymize(DEV_PSEUDONYM_KEY, id));
  const rows: DeliveryRow[] = [];
  for (const mode of ["hold", "emit"] as const) {
    const r = await runChain(sim.events, { partitions: 4, labelConfig: { probation: { enabled: mode === "hold" } } });
    const report = scoreChain(r, sim.truth, perUser);
    rows.push({ seed, mode, live: report.labels.live, live_from_bots: report.labels.from_bots, positive_precision: report.positive.precision, coverage: report.coverage, delivery: report.delivery });
  }
  return rows;
}

/** The figures as a table (latencies in stream time). */
export function formatDelivery(rows: readonly DeliveryRow[]): string {
  const min = (ms: number | null) => (ms === null ? "-" : `${(ms / 60_000).toFixed(1)} min`);
  const head = ["seed", "mode", "light p50", "light p99", "all p50", "all p99", "published→retracted", "bot labels ever live", "live", "live from bots", "pos. precision"];
  const lines = [head.join(" | ")];
  for (const r of rows) {
    const d = r.delivery;
    lines.push(
      [
        r.seed,
        r.mode,
        `${min(d.light_latency?.p50_ms ?? null)} (n=${d.light_latency?.n ?? 0})`,
        min(d.light_latency?.p99_ms ?? null),
        `${min(d.latency.p50_ms)} (n=${d.latency.n})`,
        min(d.latency.p99_ms),
        `${d.published_then_retracted} (bots ${d.published_then_retracted_bots})`,
        String(d.published_from_bots),
        String(r.live),
        String(r.live_from_bots),
        r.positive_precision === null ? "-" : r.positive_precision.toFixed(3),
      ].join(" | "),
    );
  }
  return lines.join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const seeds = process.argv.slice(2).length ? process.argv.slice(2) : ["21", "22"];
  const rows: DeliveryRow[] = [];
  for (const seed of seeds) rows.push(...(await measureDelivery(seed)));
  process.stdout.write(formatDelivery(rows) + "\n");
}

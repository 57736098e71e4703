import { pathToFileURL } from "node:url";
import { liveLabels } from "../src/core/label.js";
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
 * what a live pipeline fed in real time would show. An hour of other users' traffic follows the
 * simulated span, as it would in production, so the span's sessions close on the watermark (not
 * at the end of input); only the span's users are scored.
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
  /** Labels of the final view from users bot-score flagged (routed to <p>.bots): 0 with retraction. */
  live_from_flagged: number;
  positive_precision: number | null;
  coverage: number | null;
  delivery: Delivery;
}

const HOUR = 3_600_000;
const START = Date.parse("2026-01-01T00:00:00Z");

/** Runs one seed (a number) in both modes (400 users, 30 % bots, 2 h, as issue 9 measured). */
export async function measureDelivery(seed: string, opts: { users?: number; durationMs?: number } = {}): Promise<DeliveryRow[]> {
  const users = opts.users ?? 400;
  const durationMs = opts.durationMs ?? 2 * HOUR;
  const sim = simulate({ seed, users, durationMs, startTime: START, botFraction: 0.3 });
  const after = simulate({ seed: `${seed}:after`, users: Math.max(20, Math.round(users / 5)), durationMs: HOUR, startTime: START + durationMs, botFraction: 0.3 });
  const pseudonymOf = (id: string) => pseudonymize(DEV_PSEUDONYM_KEY, id);
  const perUser = eventsPerUser(sim.events, pseudonymOf);
  const rows: DeliveryRow[] = [];
  for (const mode of ["hold", "emit"] as const) {
    const r = await runChain([...sim.events, ...after.events], { partitions: 4, labelConfig: { probation: { enabled: mode === "hold" } } });
    const report = scoreChain({ ...r, labels: r.labels.filter((l) => perUser.has(l.user)) }, sim.truth, perUser);
    const flagged = liveLabels(r.labels).filter((l) => r.botUsers.has(l.user)).length;
    rows.push({ seed, mode, live: report.labels.live, live_from_bots: report.labels.from_bots, live_from_flagged: flagged, positive_precision: report.positive.precision, coverage: report.coverage, delivery: report.delivery });
  }
  return rows;
}

/** The figures as a table (latencies in stream time). */
export function formatDelivery(rows: readonly DeliveryRow[]): string {
  const min = (ms: number | null) => (ms === null ? "-" : `${(ms / 60_000).toFixed(1)} min`);
  const head = ["seed", "mode", "light p50", "light p99", "all p50", "all p99", "published→retracted", "bot labels ever live", "live", "live from bots", "from flagged", "pos. precision"];
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
        String(r.live_from_flagged),
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

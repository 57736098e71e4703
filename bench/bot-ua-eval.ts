import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { ManualClock } from "../src/core/clock.js";
import type { Envelope, TacitEvent } from "../src/core/event.js";
import { isKeyedProcessor, type OperatorContext, type StageInput } from "../src/core/operator.js";
import { KeyedChain, emptyResult } from "../src/runtime/chain.js";
import { StageState } from "../src/runtime/keyed-state.js";
import { MemoryStateStore } from "../src/state/memory.js";
import { botScore, type BotScoreConfig } from "../operators/bot-score.js";

/**
 * Measures bot-score's user-agent indicator on user agents nobody here wrote:
 * positives are every `instances` entry of the `crawler-user-agents` list, negatives are browser
 * agents from the `user-agents` package. `user-agents` draws with `Math.random` and cannot be
 * seeded, so the negatives are drawn here from its bundled data file with the same
 * traffic-weighted scheme (each agent's `weight`) and a seeded PRNG: the sample FPR estimates
 * the share of browser *traffic* flagged. Every distinct agent in that file is also checked once.
 */

const require = createRequire(import.meta.url);

/** Options of `evaluateBotUa`. */
export interface UaEvalOptions {
  /** Browser agents drawn as negatives. @default 10000 */
  negatives?: number;
  /** Seed of the draw. @default 42 */
  seed?: number;
  /** Inputs per `process` call. @default 500 */
  batch?: number;
}

/** What `evaluateBotUa` measured. */
export interface UaEvalResult {
  positives: number;
  distinct_positives: number;
  negatives: number;
  seed: number;
  tp: number;
  fn: number;
  fp: number;
  tn: number;
  precision: number;
  recall: number;
  /** False-positive rate on the traffic-weighted browser sample. */
  human_fpr: number;
  /** Every distinct browser agent of the `user-agents` data file, checked once (unweighted). */
  distinct_browser_agents: number;
  distinct_browser_fp: number;
  distinct_browser_fpr: number;
  /** Crawler agents that were not flagged (all of them), and browser agents that were. */
  missed: string[];
  false_positives: string[];
}

interface BrowserAgent {
  userAgent: string;
  weight: number;
}

/** mulberry32: a small, well-mixed 32-bit PRNG, enough for a reproducible sample. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Every crawler instance of the `crawler-user-agents` package, in file order. */
export function crawlerAgents(): string[] {
  const list = require("crawler-user-agents") as { pattern: string; instances: string[] }[];
  return list.flatMap((p) => p.instances);
}

/** The browser agents bundled with the `user-agents` package (its `dist/user-agents.json`). */
export function browserAgentData(): BrowserAgent[] {
  const file = join(dirname(require.resolve("user-agents")), "user-agents.json");
  return (JSON.parse(readFileSync(file, "utf8")) as BrowserAgent[]).map((a) => ({ userAgent: a.userAgent, weight: a.weight }));
}

/** `n` agents drawn with replacement, proportionally to weight, with a seeded PRNG. */
export function sampleBrowserAgents(n: number, seed: number, data = browserAgentData()): string[] {
  const cumulative: number[] = [];
  let total = 0;
  for (const a of data) cumulative.push((total += a.weight));
  const rand = mulberry32(seed);
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const r = rand() * total;
    let lo = 0;
    let hi = cumulative.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cumulative[mid]! > r) hi = mid;
      else lo = mid + 1;
    }
    out.push(data[lo]!.userAgent);
  }
  return out;
}

/** Only the user-agent indicator: the others are switched off so nothing else can flag a user. */
const UA_ONLY: BotScoreConfig = {
  rate: [],
  regularity: { enabled: false },
  impossible: { click_before_shown: false, copy_longer_than_response: false },
};

/**
 * Runs user agents through the bot-score operator, one user per agent with one query event
 * carrying only the raw agent (enrich's `raw_is_bot` left unset, so the operator's own isbot
 * check decides), and returns which were routed to `bots`.
 */
export async function flagAgents(agents: readonly string[], batchSize = 500): Promise<boolean[]> {
  const T0 = Date.parse("2025-01-01T00:00:00Z");
  const clock = new ManualClock(T0);
  const store = new MemoryStateStore(() => clock.now());
  const ctx: OperatorContext = {
    pipeline: "bench",
    prefix: "bench",
    stage: "bot-score",
    partitions: 1,
    state: store,
    clock,
    log: { debug() {}, info() {}, warn() {}, error() {} },
    metrics: { count() {} },
    env: {},
    devMode: true,
  };
  const proc = await botScore.create(UA_ONLY, ctx);
  if (!isKeyedProcessor(proc)) throw new Error("bot-score is a keyed operator");
  // Through the runtime's chain, as a worker runs it (each agent is its own user).
  const state = new StageState(store, "bench", "bot-score", 0, proc.codec, ctx.log);
  const chain = new KeyedChain([{ name: "bot-score", proc, state, counters: ctx.metrics, clock }], 0);
  const flagged: boolean[] = [];
  for (let start = 0; start < agents.length; start += batchSize) {
    const batch: StageInput[] = agents.slice(start, start + batchSize).map((raw, k) => {
      const seq = start + k + 1;
      const event: TacitEvent = {
        event_id: `ua-${seq}`,
        session_id: `s-${seq}`,
        user: `user-${seq}`,
        user_key_version: "bench",
        timestamp: new Date(T0).toISOString(),
        ts: T0,
        event_type: "query",
        payload: { text: "hello" },
        ua: { raw },
      };
      const envelope: Envelope = { v: 1, event, src: { seq }, partition: 0, attrs: {} };
      return { seq, subject: "bench.x.bot-score.0", data: new Uint8Array(), envelope, deliveries: 1, stream_time_ms: T0, partition: 0 };
    });
    const results = batch.map(emptyResult);
    const sink = emptyResult();
    // The watermark reaches the events (bot-score holds inputs until it does, for event-time order).
    await chain.run(batch.map((input, msg) => ({ msg, input })), T0, results, sink);
    await store.commit(chain.takeCommits(results, sink, T0).flat());
    const bots = new Set<string>();
    for (const r of [...results, sink]) {
      if (r.error) throw r.error.err;
      for (const e of r.emits) if (e.emit.to === "bots") bots.add((e.emit.value as { user: string }).user);
    }
    for (const input of batch) flagged.push(bots.has(input.envelope!.event.user));
  }
  return flagged;
}

/** Precision, recall and the human false-positive rate of the user-agent indicator. */
export async function evaluateBotUa(opts: UaEvalOptions = {}): Promise<UaEvalResult> {
  const seed = opts.seed ?? 42;
  const crawlers = crawlerAgents();
  const data = browserAgentData();
  const browsers = sampleBrowserAgents(opts.negatives ?? 10_000, seed, data);
  const distinct = [...new Set(data.map((a) => a.userAgent))];

  const posFlags = await flagAgents(crawlers, opts.batch);
  const negFlags = await flagAgents(browsers, opts.batch);
  const distinctFlags = await flagAgents(distinct, opts.batch);

  const tp = posFlags.filter(Boolean).length;
  const fp = negFlags.filter(Boolean).length;
  const fn = crawlers.length - tp;
  const tn = browsers.length - fp;
  const distinctFp = distinctFlags.filter(Boolean).length;
  return {
    positives: crawlers.length,
    distinct_positives: new Set(crawlers).size,
    negatives: browsers.length,
    seed,
    tp,
    fn,
    fp,
    tn,
    precision: tp + fp === 0 ? 1 : tp / (tp + fp),
    recall: crawlers.length === 0 ? 1 : tp / crawlers.length,
    human_fpr: browsers.length === 0 ? 0 : fp / browsers.length,
    distinct_browser_agents: distinct.length,
    distinct_browser_fp: distinctFp,
    distinct_browser_fpr: distinct.length === 0 ? 0 : distinctFp / distinct.length,
    missed: crawlers.filter((_, i) => !posFlags[i]),
    false_positives: [...new Set(browsers.filter((_, i) => negFlags[i]))],
  };
}

const pct = (x: number): string => `${(x * 100).toFixed(2)} %`;

/** `node dist/bench/bot-ua-eval.js [--json] [--seed N] [--negatives N]` */
export async function main(argv: string[] = process.argv.slice(2)): Promise<void> {
  const arg = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const r = await evaluateBotUa({ seed: arg("--seed") ? Number(arg("--seed")) : undefined, negatives: arg("--negatives") ? Number(arg("--negatives")) : undefined });
  if (argv.includes("--json")) {
    process.stdout.write(JSON.stringify(r, null, 2) + "\n");
    return;
  }
  const lines = [
    `bot-score user-agent indicator (isbot full pattern)`,
    `  positives  crawler-user-agents instances   ${r.positives} (${r.distinct_positives} distinct)`,
    `  negatives  user-agents, weighted, seed ${r.seed}   ${r.negatives}`,
    `  TP ${r.tp}  FN ${r.fn}  FP ${r.fp}  TN ${r.tn}`,
    `  precision  ${pct(r.precision)}`,
    `  recall     ${pct(r.recall)}`,
    `  human FPR  ${pct(r.human_fpr)} of sampled browser traffic; ${r.distinct_browser_fp} of ${r.distinct_browser_agents} distinct browser agents (${pct(r.distinct_browser_fpr)})`,
    `  missed crawler agents:`,
    ...r.missed.map((m) => `    ${m}`),
  ];
  if (r.false_positives.length) lines.push(`  flagged browser agents:`, ...r.false_positives.map((m) => `    ${m}`));
  process.stdout.write(lines.join("\n") + "\n");
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exit(1);
  });
}

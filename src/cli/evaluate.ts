import type { Command } from "commander";
import type { Cluster, Redis } from "ioredis";
import { readFile } from "node:fs/promises";
import { ConfigError } from "../core/errors.js";
import type { Label } from "../core/label.js";
import { pseudonymize, resolvePseudonymKey } from "../core/pseudonym.js";
import { LIGHT_USER_EVENTS, evaluate, type Delivery, type EvaluateInput, type Latency, type Report, type TargetResult } from "../eval/evaluate.js";
import { eventsPerUser, parseFeatures, parseLabels, parseScores, parseUserSet, type RejectedLine } from "../eval/inputs.js";
import { explicitAgreement, formatExplicit, ratingsFromEvents } from "../eval/explicit.js";
import { collectLive, collectLiveExplicit } from "../eval/live.js";
import { connectNats, type NatsHandles } from "../runtime/nats.js";
import { parseTruth, type TruthRecord } from "../sim/truth.js";
import { cliLogger, loadForCli, pipelineCommand, type PipelineOptions } from "./common.js";
import { openRedisChecked } from "./run.js";
import { runCommand, type CliIo } from "./simulate.js";

const STD_IO: CliIo = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

/** Default environment variable of the pseudonymization key (the same one enrich reads). */
export const DEFAULT_KEY_ENV = "TACIT_PSEUDONYM_KEY";

interface EvaluateFlags extends PipelineOptions {
  truth?: string;
  labels?: string;
  features?: string;
  bots?: string;
  scoresWithoutBaselines?: string;
  events?: string;
  keyEnv: string;
  check?: boolean;
  explicit?: boolean;
}

async function readInput(path: string, flag: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new ConfigError(`${flag}: ${path} does not exist`);
    throw err;
  }
}

const f = (x: number | null, digits = 3): string => (x === null ? "-" : x.toFixed(digits));
const pct = (x: number | null): string => (x === null ? "-" : `${(x * 100).toFixed(2)} %`);

const TARGET_NAMES: Record<TargetResult["name"], string> = {
  positive_precision: "positive-label precision",
  coverage: "coverage (signalled responses labelled)",
  auc: "ROC-AUC of the response score",
  human_fpr: "human false-positive rate",
};

export function targetRow(t: TargetResult): string {
  // A value that rounds onto its goal is shown with more digits, so the verdict never looks
  // contradictory (0.850 next to FAIL when it is 0.8497).
  const digits = t.value !== null && t.pass !== null && Number(t.value.toFixed(3)) === t.threshold ? 4 : 3;
  const value = t.name === "human_fpr" ? pct(t.value) : f(t.value, digits);
  const threshold = t.name === "human_fpr" ? pct(t.threshold) : f(t.threshold, 2);
  const verdict = t.pass === null ? "n/a" : t.pass ? "pass" : "FAIL";
  return `  ${TARGET_NAMES[t.name].padEnd(42)}${value.padStart(9)}   ${t.op === ">=" ? "≥" : "≤"} ${threshold.padEnd(8)} ${verdict}`;
}

/** The compact human report: targets first, then the figures behind them. */
export function formatReport(r: Report, notes: string[] = []): string {
  const L = r.labels;
  const lines = [
    `label quality against the simulator's truth${r.seed === null ? "" : ` (seed ${r.seed})`}`,
    `  labels: ${L.received} received, ${L.distinct} distinct (response ${L.by_kind.response}, preference ${L.by_kind.preference}, session ${L.by_kind.session}); ` +
      `${L.duplicates} duplicates, ${L.rejected} rejected by label.v2.json, ${L.unknown_response} on unknown responses; ` +
      `${L.live} in the final view (latest revision, not retracted, weight > 0), which is scored`,
    `  responses: ${r.responses.human} human, ${r.responses.signalled} with a signal, ${r.responses.labelled} of those labelled`,
    "",
    `  ${"target".padEnd(42)}${"value".padStart(9)}   ${"goal".padEnd(10)} result`,
    ...r.targets.map(targetRow),
    "",
    `  ${"".padEnd(26)}${"precision".padStart(10)}${"weighted".padStart(10)}${"recall".padStart(10)}${"F1".padStart(10)}${"labels".padStart(10)}`,
    `  ${"positive labels".padEnd(26)}${f(r.positive.precision).padStart(10)}${f(r.positive.weighted_precision).padStart(10)}${f(r.positive.recall).padStart(10)}${f(r.positive.f1).padStart(10)}${String(r.positive.labels).padStart(10)}`,
    `  ${"negative labels".padEnd(26)}${f(r.negative.precision).padStart(10)}${f(r.negative.weighted_precision).padStart(10)}${f(r.negative.recall).padStart(10)}${f(r.negative.f1).padStart(10)}${String(r.negative.labels).padStart(10)}`,
    "",
    `  coverage, any label kind: ${f(r.coverage_any_kind)}   preference pairs: ${r.preference.pairs}, accuracy ${f(r.preference.accuracy)}`,
    `  score (${r.score.source}, n=${r.score.n}): AUC ${f(r.score.auc)}; Spearman with rank ${f(r.score.position_spearman)} (hidden quality: ${f(r.score.quality_position_spearman)}, n=${r.score.ranked_n})`,
    r.baselines
      ? `  per-user baselines: AUC without ${f(r.baselines.auc_without)}, gain ${f(r.baselines.auc_gain)}`
      : "  per-user baselines: no scores without baselines given (--scores-without-baselines)",
    r.bots
      ? `  bot filter: ${r.bots.filtered} users filtered; precision ${f(r.bots.precision)}, recall ${f(r.bots.recall)} ` +
        `(user-agent ${f(r.bots.recall_by_kind.ua_bot)}, regular ${f(r.bots.recall_by_kind.regular_script)}, human-paced ${f(r.bots.recall_by_kind.human_paced_script)}), human FPR ${pct(r.bots.human_fpr)}`
      : "  bot filter: no bot decisions given (--bots)",
    `  labels from bot users in the final view: ${L.from_bots}; labels carrying a raw user id: ${L.raw_user_ids}`,
    deliveryRow(r.delivery),
    ...notes.map((n) => `  note: ${n}`),
    "",
  ];
  return lines.join("\n");
}

function deliveryRow(d: Delivery): string {
  const ms = (x: number | null) => (x === null ? "-" : x < 1000 ? `${Math.round(x)} ms` : x < 120_000 ? `${(x / 1000).toFixed(1)} s` : `${(x / 60_000).toFixed(1)} min`);
  const lat = (l: Latency) => `p50 ${ms(l.p50_ms)}, p99 ${ms(l.p99_ms)} (n=${l.n})`;
  return (
    `  retractions: ${d.retractions}; published then retracted: ${d.published_then_retracted} (of bot users ${d.published_then_retracted_bots}); ` +
    `labels of bot users ever live: ${d.published_from_bots}\n` +
    `  latency of response and preference labels (emitted_at − event_time of the first live revision): ${lat(d.latency)}; light users (${LIGHT_USER_EVENTS.join("–")} events): ${d.light_latency ? lat(d.light_latency) : "- (give --events)"}`
  );
}

function rejectedNote(what: string, rejected: RejectedLine[]): string[] {
  if (rejected.length === 0) return [];
  const first = rejected[0]!;
  return [`${rejected.length} ${what} line(s) skipped; first: line ${first.line}: ${first.message.slice(0, 200)}`];
}

/** A memoizing pseudonymOf and the pseudonyms it made, to tell whether any label's user is known. */
function pseudonymizer(key: Parameters<typeof pseudonymize>[0]): { of: (id: string) => string; known: () => Set<string> } {
  const pseudonyms = new Map<string, string>();
  return {
    of: (id) => {
      let p = pseudonyms.get(id);
      if (p === undefined) pseudonyms.set(id, (p = pseudonymize(key, id)));
      return p;
    },
    known: () => new Set(pseudonyms.values()),
  };
}

/** True when labels were given and no label's user is a pseudonym of a truth user (a wrong key). */
function keyMismatch(labels: EvaluateInput["labels"], known: Set<string>): boolean {
  const labelUsers = new Set(labels.map((l) => l.user));
  return labelUsers.size > 0 && ![...labelUsers].some((u) => known.has(u));
}

/** Evaluates, prints the report (human or JSON) and sets exit code 1 under --check when it fails. */
function report(io: CliIo, flags: EvaluateFlags, input: EvaluateInput, known: () => Set<string>, notes: string[]): void {
  const r = evaluate(input);
  // A wrong key makes every user unknown and the bot metrics meaningless: say so.
  const mismatch = keyMismatch(input.labels, known());
  if (mismatch) notes.push(`no label's user matches a pseudonym of the truth's users: is ${flags.keyEnv} the key the pipeline used?`);
  if (flags.json) io.out(`${JSON.stringify({ ...r, notes })}\n`);
  else io.out(formatReport(r, notes));
  if (flags.check && (!r.all_pass || mismatch)) process.exitCode = 1;
}

async function evaluateFiles(io: CliIo, flags: EvaluateFlags & { labels: string }, truth: TruthRecord[], env: Readonly<Record<string, string | undefined>>): Promise<void> {
  const parsedLabels = parseLabels(await readInput(flags.labels, "--labels"));
  const notes: string[] = [...rejectedNote("label", parsedLabels.rejected)];
  let features;
  if (flags.features) {
    const p = parseFeatures(await readInput(flags.features, "--features"));
    features = p.features;
    notes.push(...rejectedNote("feature", p.rejected));
  }
  let botUsers;
  if (flags.bots) {
    const p = parseUserSet(await readInput(flags.bots, "--bots"));
    botUsers = p.users;
    notes.push(...rejectedNote("bot", p.rejected));
  }
  let scoresWithoutBaselines;
  if (flags.scoresWithoutBaselines) {
    const p = parseScores(await readInput(flags.scoresWithoutBaselines, "--scores-without-baselines"));
    scoresWithoutBaselines = p.scores;
    notes.push(...rejectedNote("score", p.rejected));
  }
  const { key, dev } = resolvePseudonymKey(env, flags.keyEnv, true);
  if (dev) notes.push(`${flags.keyEnv} is not set: users matched with the development pseudonym key`);
  const ps = pseudonymizer(key);
  const events = await readEvents(flags, ps.of);
  const input: EvaluateInput = {
    labels: parsedLabels.labels,
    truth,
    pseudonymOf: ps.of,
    rejectedLabels: parsedLabels.rejected.length,
    ...(events ? { eventsPerUser: events } : {}),
    ...(features ? { features } : {}),
    ...(botUsers ? { botUsers } : {}),
    ...(scoresWithoutBaselines ? { scoresWithoutBaselines } : {}),
  };
  report(io, flags, input, ps.known, notes);
}

/** Events per user from --events (the simulator's events.jsonl), for the light users' latency. */
async function readEvents(flags: EvaluateFlags, pseudonymOf: (id: string) => string): Promise<Map<string, number> | undefined> {
  return flags.events ? eventsPerUser((await readInput(flags.events, "--events")).split("\n"), pseudonymOf) : undefined;
}

/**
 * The live path: labels from `<name>_labels`, bot decisions from `<name>_bots` and response
 * features from Redis, read with collectLive exactly as `tacit demo` evaluates.
 */
async function evaluateLive(io: CliIo, file: string, flags: EvaluateFlags, truth: TruthRecord[], env: Readonly<Record<string, string | undefined>>): Promise<void> {
  const p = loadForCli(file, flags);
  const { key, dev } = resolvePseudonymKey(env, flags.keyEnv, true);
  const ps = pseudonymizer(key);
  let nats: NatsHandles | undefined;
  let redis: Redis | Cluster | undefined;
  try {
    nats = await connectNats(p, `tacit-evaluate-${process.pid}`);
    redis = await openRedisChecked(p, cliLogger());
    const live = await collectLive(p, nats, redis, truth, ps.of);
    const input: EvaluateInput = {
      labels: live.labels,
      truth,
      pseudonymOf: ps.of,
      features: live.features,
      botUsers: live.botUsers,
      scoresWithoutBaselines: live.scoresWithoutBaselines,
      rejectedLabels: live.rejectedLabels,
    };
    const events = await readEvents(flags, ps.of);
    if (events) input.eventsPerUser = events;
    const notes: string[] = [];
    if (dev) {
      // `tacit run` never falls back to the development key; only a dev-mode worker (`tacit demo`)
      // does. Accept it only when the stream shows the pipeline used it: some label's user is a
      // development pseudonym of a truth user. Otherwise the key is missing, as for a worker.
      for (const t of truth) if (t.kind === "user") ps.of(t.user_id);
      if (live.labels.length === 0 || keyMismatch(live.labels, ps.known())) resolvePseudonymKey(env, flags.keyEnv, false);
      notes.push(`${flags.keyEnv} is not set: users matched with the development pseudonym key, which this pipeline's labels were made with (a dev-mode worker, as in tacit demo)`);
    }
    report(io, flags, input, ps.known, notes);
  } finally {
    redis?.disconnect();
    await nats?.nc.close().catch(() => undefined);
  }
}

/**
 * `--explicit`: agreement of the labels with the explicit ratings, from files (labels, and the
 * events as published for the ratings) or live (labels stream, ratings from the response features
 * in Redis). Truth is optional: given, the same labels are also judged by the hidden quality.
 */
async function evaluateExplicit(io: CliIo, pipeline: string | undefined, flags: EvaluateFlags): Promise<void> {
  const truth = flags.truth ? parseTruth(await readInput(flags.truth, "--truth")) : undefined;
  const notes: string[] = [];
  let labels: Label[];
  let ratings;
  if (pipeline === undefined) {
    const parsed = parseLabels(await readInput(flags.labels!, "--labels"));
    notes.push(...rejectedNote("label", parsed.rejected));
    labels = parsed.labels;
    ratings = ratingsFromEvents(await readInput(flags.events!, "--events"));
  } else {
    const p = loadForCli(pipeline, flags);
    let nats: NatsHandles | undefined;
    let redis: Redis | Cluster | undefined;
    try {
      nats = await connectNats(p, `tacit-evaluate-${process.pid}`);
      redis = await openRedisChecked(p, cliLogger());
      const live = await collectLiveExplicit(p, nats, redis);
      if (live.rejectedLabels) notes.push(`${live.rejectedLabels} message(s) on the labels stream did not match label.v1.json`);
      labels = live.labels;
      ratings = live.ratings;
    } finally {
      redis?.disconnect();
      await nats?.nc.close().catch(() => undefined);
    }
  }
  const r = explicitAgreement(labels, ratings, truth);
  if (flags.json) io.out(`${JSON.stringify({ ...r, notes })}\n`);
  else io.out(formatExplicit(r, notes));
}

/**
 * Adds `tacit evaluate [pipeline]`: label quality of a run against the simulator's ground truth,
 * read from files (labels, and optionally features, bot decisions and baseline-free scores) or,
 * given a pipeline, live from its labels and bots streams and its features in Redis.
 */
export function registerEvaluate(program: Command, io: CliIo = STD_IO, env: Readonly<Record<string, string | undefined>> = process.env): Command {
  return pipelineCommand(
    program
      .command("evaluate [pipeline]")
      .description(
        "score labels (and features, bot decisions) against the hidden ground truth of `tacit simulate`: " +
          "from files (--labels, --features, --bots), or live from a running pipeline (its labels and bots streams, its features in Redis)",
      )
      .option("--truth <file>", "truth.jsonl written by tacit simulate")
      .option("--labels <file>", "labels, one JSON object per line (e.g. from `tacit tail … labels --json`); without a pipeline, required")
      .option("--features <file>", "per-response features JSONL ({response_id, pos_weight, neg_weight, signal_count})")
      .option("--bots <file>", "pseudonyms routed to <p>.bots, one per line or as {user} objects")
      .option("--scores-without-baselines <file>", "per-response scores computed without per-user baselines ({response_id, score})")
      .option(
        "--events <file>",
        "events.jsonl written by tacit simulate (the events as published): events per user, for the label latency of light users (3–5 events); with --explicit on files, its explicit_feedback events are the ratings",
      )
      .option(
        "--key-env <VAR>",
        "environment variable holding the pseudonymization key (unset: the development key for files; for a pipeline only if its labels were made with it)",
        DEFAULT_KEY_ENV,
      )
      .option("--check", "exit 1 when a target is missed or cannot be computed, or the labels' users match no truth user")
      .option(
        "--explicit",
        "agreement of the labels with the explicit ratings (held out from label inputs) on the responses that have both, per rule, with Wilson 95 % intervals and counts; --truth optional (adds the hidden truth of the same labels)",
      ),
  ).action(async (pipeline: string | undefined, flags: EvaluateFlags) =>
    runCommand(io, async () => {
      if (flags.explicit) {
        if (pipeline !== undefined) {
          const files = (["labels", "features", "bots", "scoresWithoutBaselines", "events"] as const).filter((k) => flags[k] !== undefined);
          if (files.length > 0) throw new ConfigError(`a pipeline is read live: drop ${files.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`).join(", ")}, or the pipeline to score files`);
        } else if (!flags.labels || !flags.events) {
          throw new ConfigError("--explicit on files needs --labels <file> and --events <file> (the events as published, with their explicit_feedback), or a running pipeline");
        }
        await evaluateExplicit(io, pipeline, flags);
        return;
      }
      if (!flags.truth) throw new ConfigError("--truth <file> is required (the truth.jsonl written by tacit simulate)");
      if (pipeline === undefined && !flags.labels) {
        throw new ConfigError("give the labels to score: --labels <file> (one JSON object per line), or a running pipeline (tacit evaluate <pipeline.yaml> --truth <file>)");
      }
      if (pipeline !== undefined) {
        const files = (["labels", "features", "bots", "scoresWithoutBaselines"] as const).filter((k) => flags[k] !== undefined);
        if (files.length > 0) throw new ConfigError(`a pipeline is read live: drop ${files.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`).join(", ")}, or the pipeline to score files`);
      } else if (flags.set?.length) throw new ConfigError("--set applies to a pipeline: tacit evaluate <pipeline.yaml> --truth <file> --set …");
      const truth = parseTruth(await readInput(flags.truth, "--truth"));
      if (pipeline !== undefined) await evaluateLive(io, pipeline, flags, truth, env);
      else await evaluateFiles(io, { ...flags, labels: flags.labels! }, truth, env);
    }),
  );
}

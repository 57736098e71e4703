import type { Command } from "commander";
import { writeFile } from "node:fs/promises";
import { parseDuration, formatDuration } from "../core/duration.js";
import { ConfigError, errorMessage } from "../core/errors.js";
import { simulate, type SimSummary } from "../sim/simulate.js";

/** Where a command writes; tests pass their own. */
export interface CliIo {
  out: (text: string) => void;
  err: (text: string) => void;
}

const STD_IO: CliIo = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

/** Exit codes shared by every tacit command (SPEC §6). */
const EXIT_RUNTIME = 1;
const EXIT_USAGE = 2;

/** Runs one command body and maps errors to exit codes: 2 for usage/config, 1 at run time. */
export async function runCommand(io: CliIo, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (err) {
    io.err(`tacit: ${errorMessage(err)}\n`);
    process.exitCode = err instanceof ConfigError ? EXIT_USAGE : EXIT_RUNTIME;
  }
}

/** Parses a positive integer option; errors name the flag. */
export function intOption(value: string, flag: string): number {
  if (!/^\d+$/.test(value.trim()) || Number(value) < 1) throw new ConfigError(`${flag}: "${value}" is not a positive integer`);
  return Number(value);
}

/** Parses a fraction option in [0, 1]; errors name the flag. */
export function fractionOption(value: string, flag: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || n < 0 || n > 1) throw new ConfigError(`${flag}: "${value}" is not a fraction between 0 and 1 (e.g. 0.3)`);
  return n;
}

interface SimulateFlags {
  seed: string;
  users: string;
  duration: string;
  bots?: string;
  eta?: string;
  start?: string;
  late?: string;
  outOfOrder?: string;
  duplicates?: string;
  malformed?: string;
  out?: string;
  truth?: string;
  json?: boolean;
}

const n = (x: number): string => x.toLocaleString("en-US");

function humanSummary(s: SimSummary, durationMs: number, out: string, truth: string, truthRecords: number): string {
  const noise = s.noise;
  return [
    `simulated ${n(s.users)} users over ${formatDuration(durationMs)} (seed ${s.seed}): ${n(s.humans)} humans, ${n(s.bots)} bots ` +
      `(${n(s.bots_by_kind.ua_bot)} user-agent, ${n(s.bots_by_kind.regular_script)} regular-timing, ${n(s.bots_by_kind.human_paced_script)} human-paced)`,
    `${out}: ${n(s.lines)} lines = ${n(s.events)} events (${n(s.human_events)} human, ${n(s.bot_events)} bot) + ${n(noise.duplicate)} duplicates + ${n(noise.malformed)} malformed`,
    `  delivery noise: ${n(noise.late)} late, ${n(noise.out_of_order)} out of order; event time ${s.first_event_time ?? "-"} → ${s.last_event_time ?? "-"}`,
    `${truth}: ${n(truthRecords)} records: ${n(s.sessions)} sessions, ${n(s.queries)} queries, ${n(s.responses)} responses (${n(s.good_responses)} good)`,
    "",
  ].join("\n");
}

/**
 * Adds `tacit simulate`: seeded synthetic traffic with hidden ground truth, written as
 * events.jsonl (publish order) and truth.jsonl.
 */
export function registerSimulate(program: Command, io: CliIo = STD_IO): Command {
  return program
    .command("simulate")
    .description(
      "write realistic synthetic traffic (humans with habits, bots, position bias, noise) and its hidden ground truth, seeded; " +
        "without --start the traffic's event time ends at the moment it runs, ready for `tacit publish`",
    )
    .option("--seed <seed>", "seed of the generator (integer or any string); same seed, same traffic (byte-identical with the same --start)", "1")
    .option("--users <n>", "number of users, humans and bots", "1000")
    .option("--duration <duration>", "event-time span over which sessions start (e.g. 60s, 1h)", "1h")
    .option("--bots <fraction>", "share of users that are bots", "0.3")
    .option("--eta <exponent>", "position-bias exponent η: examination probability (1/rank)^η", "1")
    .option(
      "--start <time>",
      "event time of the start (RFC 3339); default: the traffic ends now (wall clock), so a fresh file passes enrich's max_past_age. " +
        "--seed fixes everything but the timestamps then; give --start too for byte-identical files",
    )
    .option("--late <fraction>", "share of events delivered minutes to hours late", "0.01")
    .option("--out-of-order <fraction>", "share of events delivered a few seconds out of order", "0.05")
    .option("--duplicates <fraction>", "share of events re-sent with the same event_id", "0.02")
    .option("--malformed <fraction>", "malformed lines added, as a share of events", "0.005")
    .option("--out <file>", "events file to write (JSONL, publish order)")
    .option("--truth <file>", "ground-truth file to write (JSONL)")
    .option("--json", "print the summary as JSON")
    .action(async (flags: SimulateFlags) =>
      runCommand(io, async () => {
        if (!flags.out) throw new ConfigError("--out <file> is required (the events file to write, e.g. --out events.jsonl)");
        if (!flags.truth) throw new ConfigError("--truth <file> is required (the ground-truth file to write, e.g. --truth truth.jsonl)");
        const eta = Number(flags.eta);
        if (!Number.isFinite(eta) || eta < 0) throw new ConfigError(`--eta: "${flags.eta}" is not a non-negative number`);
        const durationMs = parseDuration(flags.duration, "--duration");
        if (durationMs <= 0) throw new ConfigError(`--duration: "${flags.duration}" must be longer than 0`);
        const res = simulate({
          seed: flags.seed,
          users: intOption(flags.users, "--users"),
          durationMs,
          botFraction: fractionOption(flags.bots ?? "0.3", "--bots"),
          positionBiasEta: eta,
          ...(flags.start === undefined ? { endTime: Date.now() } : { startTime: flags.start }),
          lateFraction: fractionOption(flags.late ?? "0.01", "--late"),
          outOfOrderFraction: fractionOption(flags.outOfOrder ?? "0.05", "--out-of-order"),
          duplicateFraction: fractionOption(flags.duplicates ?? "0.02", "--duplicates"),
          malformedFraction: fractionOption(flags.malformed ?? "0.005", "--malformed"),
        });
        await writeFile(flags.out, res.events.length ? `${res.events.join("\n")}\n` : "");
        await writeFile(flags.truth, res.truth.map((t) => JSON.stringify(t)).join("\n") + "\n");
        if (flags.json) io.out(`${JSON.stringify({ ...res.summary, out: flags.out, truth: flags.truth, truth_records: res.truth.length })}\n`);
        else io.out(humanSummary(res.summary, durationMs, flags.out, flags.truth, res.truth.length));
      }),
    );
}

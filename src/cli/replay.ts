import type { Command } from "commander";
import cliProgress from "cli-progress";
import { createInterface } from "node:readline/promises";
import { findOperator } from "../../operators/index.js";
import { parseDuration } from "../core/duration.js";
import { ConfigError } from "../core/errors.js";
import { resumeGroups, readControl } from "../runtime/control.js";
import { connectNats } from "../runtime/nats.js";
import { executeReplay, formatPlan, formatReport, groupState, parseReplayPoint, planReplay, selectGroups, type ReplayRequest } from "../runtime/replay.js";
import { stageGroups } from "../config/topology.js";
import { openPipelineRedis } from "../state/redis.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";

interface ReplayCliOptions extends PipelineOptions {
  from?: string;
  to?: string;
  stage?: string;
  rebuild?: boolean;
  resume?: boolean;
  dryRun?: boolean;
  yes?: boolean;
  pauseTimeout: string;
  wait: string;
}

/**
 * Asks on the terminal; without one, `--yes` is required (a replay is never started by a pipe
 * that did not mean it).
 */
export async function confirm(question: string, yes: boolean | undefined): Promise<void> {
  if (yes) return;
  if (!process.stdin.isTTY || !process.stderr.isTTY) throw new ConfigError(`${question} — not a terminal: pass --yes to confirm`);
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = (await rl.question(`${question} [y/N] `)).trim().toLowerCase();
    if (answer !== "y" && answer !== "yes") throw new ConfigError("cancelled");
  } finally {
    rl.close();
  }
}

const HELP = `
Replays re-read a stage's input stream from a point; what was already applied changes nothing:
inputs at or below a keyed partition's applied mark are skipped, and inputs that had their
outputs published before (up to the durable's ack floor when the replay began) publish nothing
again, except labels whose content changed, which get a new revision. Running workers are
paused through Redis for the rewind and resume by themselves.

--from   a stream sequence of the first replayed group's input stream (other groups start at
         that message's time), an RFC 3339 time, or "start"
--to     bounds what is counted and waited for; the durables then go on with the rest of their
         stream as usual (already-processed messages after --to are skipped the same way)
--rebuild  for lost or corrupt Redis state: wipes the pipeline's state (keeps enrich's context
         lookups and the published-label registry, which is re-filled from the label stream),
         and replays every stage from the start of its stream
--rebuild --stage <group>  wipes only that group's state (what its operators document as their
         state, and its partitions' marks) and replays it from the start of its input stream:
         after a fixed label rule is deployed, \`--rebuild --stage label-derive\` recomputes labels
         and features with it; labels that change get a new revision of their label_id, the
         others are not published again. Only labels are re-published: the groups after the
         rebuilt one keep what they received. The dry run lists the keys it wipes
--resume   clears a pause left by a replay that died

Examples:
  tacit replay pipelines/feedback.yaml --from 2026-01-01T09:00:00Z --dry-run
  tacit replay pipelines/feedback.yaml --stage sessionize --from 120345 --yes
  tacit replay pipelines/feedback.yaml --rebuild --yes
  tacit replay pipelines/feedback.yaml --rebuild --stage label-derive --dry-run
`;

export function registerReplay(program: Command): void {
  pipelineCommand(
    program
      .command("replay <pipeline>")
      .description("rewind stage consumers to a time or sequence (or rebuild state); workers pause and resume by themselves")
      .option("--from <time|seq|start>", "where to start re-reading (RFC 3339 time, stream sequence, or start)")
      .option("--to <time|seq>", "where progress and the report stop counting")
      .option("--stage <group>", "only this stage group (by its first stage's name); default: the whole pipeline, in order")
      .option("--rebuild", "wipe the Redis state (of --stage's group, or all) and replay from the start of the streams")
      .option("--resume", "clear a pause left behind by a replay that died, and exit")
      .option("--dry-run", "show what would be read again (messages per durable, time span) and change nothing")
      .option("--yes", "do not ask for confirmation")
      .option("--pause-timeout <duration>", "how long to wait for every live worker to pause", "30s")
      .option("--wait <duration>", "how long to wait for the catch-up (0: do not wait)", "30m")
      .addHelpText("after", HELP),
  ).action(
    action(async (file: string, opts: ReplayCliOptions) => {
      const p = loadForCli(file, opts);
      const modes = [opts.from !== undefined, !!opts.rebuild, !!opts.resume].filter(Boolean).length;
      if (modes !== 1) throw new ConfigError("give exactly one of --from <time|seq|start>, --rebuild or --resume");
      if (opts.rebuild && opts.to) throw new ConfigError("--rebuild reads everything; leave out --to");
      const req: ReplayRequest = {
        ...(opts.from !== undefined ? { from: parseReplayPoint(opts.from, "--from") } : {}),
        ...(opts.to !== undefined ? { to: parseReplayPoint(opts.to, "--to") } : {}),
        ...(opts.stage ? { stage: opts.stage } : {}),
        rebuild: !!opts.rebuild,
      };
      const pauseTimeoutMs = parseDuration(opts.pauseTimeout, "--pause-timeout");
      const waitMs = parseDuration(opts.wait, "--wait");
      // Usage errors before connecting.
      if (opts.stage) for (const g of selectGroups(p, findOperator, opts.stage)) if (opts.rebuild) groupState(p, g, findOperator);

      const redis = openPipelineRedis(p);
      const nats = await connectNats(p, "tacit-replay");
      try {
        if (opts.resume) {
          const groups = opts.stage ? selectGroups(p, findOperator, opts.stage) : stageGroups(p, findOperator);
          const was = await Promise.all(groups.map(async (g) => ({ group: g.name, ...(await readControl(redis, p.subject_prefix, g.name)) })));
          await resumeGroups(redis, p.subject_prefix, groups.map((g) => g.name));
          out(opts.json, { resumed: was.filter((w) => w.paused).map((w) => w.group) }, () => {
            const paused = was.filter((w) => w.paused);
            return paused.length ? `resumed ${paused.map((w) => `${w.group} (paused by ${w.by ?? "?"}: ${w.reason ?? "?"})`).join(", ")}` : "no group was paused";
          });
          return 0;
        }
        const plan = await planReplay(p, nats, redis, findOperator, req);
        if (opts.dryRun) {
          out(opts.json, { dry_run: true, plan }, () => formatPlan(plan));
          return 0;
        }
        const total = Object.values(plan.reread).reduce((a, b) => a + b, 0);
        if (!opts.json) process.stderr.write(formatPlan(plan) + "\n");
        await confirm(
          opts.rebuild
            ? `Wipe the Redis state of ${opts.stage ? `stage group ${opts.stage} of ` : ""}${p.name} and replay ${total} messages?`
            : `Replay ${total} messages of ${plan.groups.join(", ")}?`,
          opts.yes,
        );
        const tty = process.stderr.isTTY && !opts.json;
        const bar = tty ? new cliProgress.SingleBar({ format: "catch-up [{bar}] {value}/{total} inputs {eta_formatted}", etaBuffer: 50 }, cliProgress.Presets.shades_classic) : undefined;
        let barStarted = false;
        let lastLine = 0;
        const report = await executeReplay(p, nats, redis, findOperator, req, {
          pauseTimeoutMs,
          waitMs,
          log: (line) => {
            if (!opts.json) process.stderr.write(`tacit: ${line}\n`);
          },
          onPauseWait: (waiting) => {
            if (!opts.json && Date.now() - lastLine > 2000) {
              lastLine = Date.now();
              process.stderr.write(`tacit: waiting for workers to pause: ${Object.entries(waiting).map(([g, w]) => `${g}: ${w.join(", ")}`).join("; ")}\n`);
            }
          },
          onProgress: (c) => {
            if (bar) {
              if (!barStarted) {
                bar.start(c.total, 0);
                barStarted = true;
              }
              bar.update(c.done);
            } else if (!opts.json && Date.now() - lastLine > 5000) {
              lastLine = Date.now();
              process.stderr.write(`tacit: caught up ${c.done}/${c.total}\n`);
            }
          },
        });
        bar?.stop();
        out(opts.json, report, () => formatReport(report));
        const noWorkers = Object.values(report.plan.live_workers).every((w) => w.length === 0) && Object.values(report.paused.workers).every((w) => w.length === 0);
        if (!report.caught_up && noWorkers && !opts.json) process.stderr.write("tacit: no worker is running these stages: the durables are rewound and will be read when `tacit run` starts\n");
        return 0;
      } finally {
        redis.disconnect();
        await nats.nc.close();
      }
    }),
  );
}

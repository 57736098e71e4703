import type { Command } from "commander";
import cliProgress from "cli-progress";
import { findOperator } from "../../operators/index.js";
import { DLQ_REASONS, ConfigError } from "../core/errors.js";
import { formatRedrive, formatSummary, readDeadLetters, redrive, summarize } from "../runtime/dlq.js";
import { connectNats } from "../runtime/nats.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";
import { confirm } from "./replay.js";

interface DlqCliOptions extends PipelineOptions {
  stage?: string;
  reason?: string;
  samples: number;
  again?: boolean;
  dryRun?: boolean;
  yes?: boolean;
}

const HELP = `
list     counts by stage and reason, and a few samples with their message
redrive  re-injects dead letters into the input of the stage that failed (original bytes, original
         subject, Nats-Msg-Id redrive:<dlq seq>) after you fixed the cause (a config change, a
         deploy), and removes them from the DLQ. An event that fails again returns to the DLQ
         marked Tacit-Redriven and is not redriven again unless you pass --again.

Reasons: ${Object.keys(DLQ_REASONS).join(", ")}

Examples:
  tacit dlq pipelines/feedback.yaml list
  tacit dlq pipelines/feedback.yaml redrive --stage enrich --reason bad_timestamp --dry-run
`;

export function registerDlq(program: Command): void {
  pipelineCommand(
    program
      .command("dlq <pipeline> <action>")
      .description("inspect dead letters (list) or re-inject them after a fix (redrive)")
      .option("--stage <name>", "only this stage's dead letters")
      .option("--reason <code>", "only this reason")
      .option("--samples <n>", "list: samples per stage and reason", (v) => Number(v), 2)
      .option("--again", "redrive: also letters of events that were redriven before and failed again")
      .option("--dry-run", "redrive: only count what would be redriven")
      .option("--yes", "redrive: do not ask for confirmation")
      .addHelpText("after", HELP),
  ).action(
    action(async (file: string, what: string, opts: DlqCliOptions) => {
      if (what !== "list" && what !== "redrive") throw new ConfigError(`unknown dlq action "${what}": use list or redrive`);
      if (opts.reason !== undefined && !(opts.reason in DLQ_REASONS)) throw new ConfigError(`unknown reason "${opts.reason}": use one of ${Object.keys(DLQ_REASONS).join(", ")}`);
      if (!Number.isInteger(opts.samples) || opts.samples < 0) throw new ConfigError("--samples: expected a whole number");
      const p = loadForCli(file, opts);
      if (opts.stage !== undefined && !p.stages.some((s) => s.name === opts.stage)) throw new ConfigError(`unknown stage ${opts.stage}: the stages of ${p.name} are ${p.stages.map((s) => s.name).join(", ")}`);
      const nats = await connectNats(p, "tacit-dlq");
      try {
        const filter = { ...(opts.stage ? { stage: opts.stage } : {}), ...(opts.reason ? { reason: opts.reason } : {}) };
        if (what === "list") {
          const s = summarize(p, await readDeadLetters(p, nats, filter), opts.samples);
          out(opts.json, s, () => formatSummary(s));
          return 0;
        }
        const plan = await redrive(p, nats, findOperator, { ...filter, again: opts.again, dryRun: true });
        if (opts.dryRun || plan.redriven === 0) {
          out(opts.json, plan, () => formatRedrive(plan));
          return 0;
        }
        await confirm(`Redrive ${plan.redriven} dead letters of ${p.name}?`, opts.yes);
        const tty = process.stderr.isTTY && !opts.json;
        const bar = tty ? new cliProgress.SingleBar({ format: "redrive [{bar}] {value}/{total}" }, cliProgress.Presets.shades_classic) : undefined;
        bar?.start(plan.redriven, 0);
        try {
          const r = await redrive(p, nats, findOperator, { ...filter, again: opts.again, onProgress: (d) => bar?.update(d) });
          bar?.stop();
          out(opts.json, r, () => formatRedrive(r));
        } finally {
          bar?.stop();
        }
        return 0;
      } finally {
        await nats.nc.close();
      }
    }),
  );
}

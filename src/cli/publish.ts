import type { Command } from "commander";
import cliProgress from "cli-progress";
import { existsSync } from "node:fs";
import { ConfigError } from "../core/errors.js";
import { fileIdPrefix, fileLines, publishLines } from "../runtime/publisher.js";
import { connectNats } from "../runtime/nats.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";
import { dlqReasonOf, inputEnrichConfig, precheckLines, precheckWarning, type PrecheckSummary } from "./precheck.js";

export function registerPublish(program: Command): void {
  pipelineCommand(
    program
      .command("publish <pipeline>")
      .description(
        "ingest a JSONL file of events onto <prefix>.in.<event_type> (progress bar on a terminal); " +
          "first checks the file as the pipeline's enrich stage would, and warns when most lines would be dead-lettered for one reason (e.g. timestamps older than max_past_age)",
      )
      .requiredOption("--input <file>", "events, one JSON object per line")
      .option("--id-prefix <prefix>", "Nats-Msg-Id prefix (default: derived from the file, so re-publishing is idempotent)"),
  ).action(
    action(async (file: string, opts: PipelineOptions & { input: string; idPrefix?: string }) => {
      const p = loadForCli(file, opts);
      if (!existsSync(opts.input)) throw new ConfigError(`--input: ${opts.input} does not exist`);
      const tty = process.stderr.isTTY && !opts.json;
      // One streamed pass before publishing: enrich's cheap checks, and the line count for the bar.
      const enrich = inputEnrichConfig(p);
      let check: PrecheckSummary | undefined;
      let total = 0;
      if (enrich) {
        check = await precheckLines(fileLines(opts.input), enrich, Date.now());
        total = check.lines;
        const warning = precheckWarning(check, enrich);
        if (warning) process.stderr.write(`${warning}\n`);
      } else if (tty) {
        for await (const l of fileLines(opts.input)) if (l.trim()) total++;
      }
      const nats = await connectNats(p, "tacit-publish");
      const bar = tty ? new cliProgress.SingleBar({ format: "publish [{bar}] {value}/{total} events {eta_formatted}" }, cliProgress.Presets.shades_classic) : undefined;
      bar?.start(total, 0);
      let lastPrint = 0;
      const t0 = performance.now();
      try {
        const res = await publishLines(p, nats.js, fileLines(opts.input), {
          idPrefix: opts.idPrefix ?? fileIdPrefix(opts.input),
          onProgress: (pr) => {
            bar?.update(pr.published);
            if (!tty && !opts.json && pr.published - lastPrint >= 10_000) {
              lastPrint = pr.published;
              process.stderr.write(`published ${pr.published}\n`);
            }
          },
        });
        bar?.stop();
        const secs = (performance.now() - t0) / 1000;
        // Expected dead letters per DLQ reason, as far as the lines alone tell (enrich decides).
        const wouldDeadLetter: Record<string, number> = {};
        for (const [kind, f] of check?.failures ?? []) wouldDeadLetter[dlqReasonOf(kind)] = (wouldDeadLetter[dlqReasonOf(kind)] ?? 0) + f.count;
        out(opts.json, { ...res, seconds: secs, ...(check ? { would_dead_letter: wouldDeadLetter } : {}) }, () => {
          const dl = Object.values(wouldDeadLetter).reduce((a, b) => a + b, 0);
          const note = dl > 0 ? `; expect ${dl} dead letters from enrich (${Object.entries(wouldDeadLetter).map(([r, c]) => `${c} ${r}`).join(", ")})` : "";
          return `published ${res.published} events (${res.bytes} bytes) in ${secs.toFixed(1)} s${note}`;
        });
        return 0;
      } finally {
        bar?.stop();
        await nats.nc.drain();
      }
    }),
  );
}

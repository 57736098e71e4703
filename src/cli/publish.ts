import type { Command } from "commander";
import cliProgress from "cli-progress";
import { readFileSync } from "node:fs";
import { fileIdPrefix, fileLines, publishLines } from "../runtime/publisher.js";
import { connectNats } from "../runtime/nats.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";

export function registerPublish(program: Command): void {
  pipelineCommand(
    program
      .command("publish <pipeline>")
      .description("ingest a JSONL file of events onto <prefix>.in.<event_type> (progress bar on a terminal)")
      .requiredOption("--input <file>", "events, one JSON object per line")
      .option("--id-prefix <prefix>", "Nats-Msg-Id prefix (default: derived from the file, so re-publishing is idempotent)"),
  ).action(
    action(async (file: string, opts: PipelineOptions & { input: string; idPrefix?: string }) => {
      const p = loadForCli(file, opts);
      const nats = await connectNats(p, "tacit-publish");
      const tty = process.stderr.isTTY && !opts.json;
      const total = tty ? readFileSync(opts.input, "utf8").split("\n").filter((l) => l.trim()).length : 0;
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
        out(opts.json, { ...res, seconds: secs }, () => `published ${res.published} events (${res.bytes} bytes) in ${secs.toFixed(1)} s`);
        return 0;
      } finally {
        bar?.stop();
        await nats.nc.drain();
      }
    }),
  );
}

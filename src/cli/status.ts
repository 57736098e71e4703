import type { Command } from "commander";
import { findOperator } from "../../operators/index.js";
import { openPipelineRedis } from "../state/redis.js";
import { connectNats } from "../runtime/nats.js";
import { formatStatus, pipelineStatus } from "../runtime/status.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";

export function registerStatus(program: Command): void {
  pipelineCommand(
    program
      .command("status <pipeline>")
      .description("per stage: pending, ack-pending, redeliveries, watermark, DLQ counts; output totals")
      .option("--watch [seconds]", "refresh every few seconds (default 2)"),
  ).action(
    action(async (file: string, opts: PipelineOptions & { watch?: boolean | string }) => {
      const p = loadForCli(file, opts);
      const nats = await connectNats(p, "tacit-status");
      const redis = openPipelineRedis(p);
      try {
        for (;;) {
          const s = await pipelineStatus(p, nats.jsm, redis, findOperator);
          if (opts.watch && !opts.json && process.stdout.isTTY) process.stdout.write("\x1b[2J\x1b[H");
          out(opts.json, s, () => formatStatus(s));
          if (!opts.watch) break;
          const secs = typeof opts.watch === "string" ? Number(opts.watch) : 2;
          await new Promise((r) => setTimeout(r, secs * 1000));
        }
        return 0;
      } finally {
        redis.disconnect();
        await nats.nc.close();
      }
    }),
  );
}

import type { Command } from "commander";
import { findOperator } from "../../operators/index.js";
import { applyDeploy, formatPlan, planDeploy } from "../runtime/deploy.js";
import { connectNats } from "../runtime/nats.js";
import { action, loadForCli, out, pipelineCommand, type PipelineOptions } from "./common.js";

export function registerDeploy(program: Command): void {
  pipelineCommand(
    program
      .command("deploy <pipeline>")
      .description("create or update the pipeline's streams and durable consumers (idempotent); prints what changes")
      .option("--dry-run", "only print what would change"),
  ).action(
    action(async (file: string, opts: PipelineOptions & { dryRun?: boolean }) => {
      const p = loadForCli(file, opts);
      const nats = await connectNats(p, "tacit-deploy");
      try {
        const plan = await planDeploy(p, nats.jsm, findOperator);
        if (!opts.dryRun) await applyDeploy(p, nats.jsm, findOperator, plan);
        out(opts.json, { dry_run: !!opts.dryRun, changes: plan }, () => formatPlan(plan, !!opts.dryRun));
        return plan.some((c) => c.action === "conflict") ? 2 : 0;
      } finally {
        await nats.nc.close();
      }
    }),
  );
}

import { Command, CommanderError } from "commander";
import { createRequire } from "node:module";
import { registerDeploy } from "./deploy.js";
import { registerPublish } from "./publish.js";
import { registerRun } from "./run.js";
import { registerServices } from "./services.js";
import { registerStatus } from "./status.js";
import { registerTail } from "./tail.js";
import { registerValidate } from "./validate.js";
import { registerBench } from "./bench.js";
import { registerDemo } from "./demo.js";
import { registerFeatures } from "./features.js";
import { registerDlq } from "./dlq.js";
import { registerReplay } from "./replay.js";
import { registerEvaluate } from "./evaluate.js";
import { registerSimulate } from "./simulate.js";
import { registerExport } from "./export.js";
import { relaunchWith } from "./relaunch.js";
import { WORKER_NODE_FLAGS, hasWorkerNodeFlags } from "../config/paths.js";

const pkg = createRequire(import.meta.url)("../../../package.json") as { version: string };

/** Builds the `tacit` command line. Exit codes: 0 success, 1 failure at run time, 2 bad usage or config. */
export function buildProgram(): Command {
  const program = new Command();
  program
    .name("tacit")
    .description("Turn implicit user feedback into de-noised weak labels and online features (NATS JetStream + Redis).")
    .version(pkg.version)
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  registerServices(program);
  registerValidate(program);
  registerDeploy(program);
  registerRun(program);
  registerPublish(program);
  registerTail(program);
  registerStatus(program);
  registerReplay(program);
  registerDlq(program);
  registerFeatures(program);
  registerSimulate(program);
  registerEvaluate(program);
  registerExport(program);
  registerBench(program);
  registerDemo(program);
  for (const c of program.commands) c.exitOverride();
  return program;
}

// `tacit … | head` closes stdout early: that is not an error.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code === "EPIPE") process.exit(0);
  throw err;
});

// `tacit bench` times a worker in this process: it runs it as a deployed worker runs.
if (process.argv[2] === "bench" && !hasWorkerNodeFlags()) process.exit(await relaunchWith(WORKER_NODE_FLAGS));

try {
  await buildProgram().parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    const ok = err.code === "commander.helpDisplayed" || err.code === "commander.version" || err.code === "commander.help";
    process.exitCode = ok ? 0 : 2;
  } else {
    process.stderr.write(`tacit: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
}

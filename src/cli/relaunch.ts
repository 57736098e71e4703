import { spawn } from "node:child_process";

/**
 * Runs this same command again in a child `node` with `flags` added (V8 reads some, such as the
 * young generation's size, only at start-up), forwarding SIGINT, SIGTERM and SIGHUP to it.
 * Resolves with its exit code; a child killed by a signal ends this process with that signal.
 */
export function relaunchWith(flags: readonly string[]): Promise<number> {
  const child = spawn(process.execPath, [...flags, ...process.execArgv, ...process.argv.slice(1)], { stdio: "inherit" });
  const forward = (sig: NodeJS.Signals) => child.kill(sig);
  const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of signals) process.on(s, forward);
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("exit", (code, signal) => {
      for (const s of signals) process.off(s, forward);
      if (signal) process.kill(process.pid, signal);
      resolve(code ?? 1);
    });
  });
}

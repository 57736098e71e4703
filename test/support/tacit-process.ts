import { spawn, type ChildProcess } from "node:child_process";
import { tacitArgv } from "../../src/config/paths.js";

/** A `tacit` CLI subprocess, with the tail of its stderr kept for assertion messages. */
export interface TacitProcess {
  child: ChildProcess;
  /** The last ~10 kB of stderr. */
  stderr(): string;
  /** Everything written to stdout (for commands that print data). */
  stdout(): string;
  /** Resolves with the exit code (null when killed by a signal) once the process has exited. */
  exited(): Promise<number | null>;
  /** True until the process has exited. */
  running(): boolean;
}

/**
 * Starts `node <nodeFlags> bin/tacit.js <args…>` (by default the worker's flags, as the shebang gives) with `env` added to this process's environment. The caller
 * owns the process: kill it in a `t.after` so none outlives the test.
 */
export function spawnTacit(args: string[], env: Record<string, string>, nodeFlags?: readonly string[]): TacitProcess {
  const child = spawn(process.execPath, tacitArgv(args, nodeFlags), {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  let out = "";
  child.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
    if (err.length > 20_000) err = err.slice(-10_000);
  });
  child.stdout!.on("data", (d: Buffer) => {
    out += d.toString();
  });
  const done = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return {
    child,
    stderr: () => err,
    stdout: () => out,
    exited: () => done,
    running: () => child.exitCode === null && child.signalCode === null,
  };
}

/** The id a `tacit run` worker gives itself is `<host>-<pid>-<hex>`: true when `workerId` is that process's. */
export function isWorkerOf(workerId: string | null, p: TacitProcess): boolean {
  if (workerId === null) return false;
  const parts = workerId.split("-");
  return parts.length >= 3 && parts[parts.length - 2] === String(p.child.pid);
}

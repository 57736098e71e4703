import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The project root (where package.json is), found from this compiled file's location. */
export function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("cannot find the tacit project root");
    dir = up;
  }
  return dir;
}

/**
 * Node flags a worker process runs with: a young generation of 2 × 64 MB instead of V8's
 * 2 × 16 MB. A worker allocates about 50 kB per event that dies within a batch or two (decoded
 * envelopes, outputs, protocol buffers); with the default, a scavenge every few hundred events
 * copies whatever a batch still holds, and much of it is promoted and marked again later. At 64
 * the bench's worker used 8–15 % less CPU per event, for 70–130 MB more RSS (README,
 * Performance). V8 reads the size only at start-up, so it is a flag, not a setting: `bin/tacit.js`
 * carries it in its shebang, the Dockerfile in its entrypoint, `tacit bench` relaunches itself
 * with it, and `tacit run` says so when it is missing.
 */
export const WORKER_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=64"];

/** The node flags this process was started with: its command line's, then NODE_OPTIONS'. */
export function nodeFlagsGiven(): string[] {
  return [...process.execArgv, ...(process.env.NODE_OPTIONS ?? "").split(/\s+/).filter(Boolean)];
}

/** Whether this process was started with each of the worker's flags set, to any value. */
export function hasWorkerNodeFlags(): boolean {
  const given = nodeFlagsGiven();
  return WORKER_NODE_FLAGS.every((f) => given.some((a) => a.split("=")[0] === f.split("=")[0]));
}

/** Arguments for `node` that start `bin/tacit.js <args…>` with `flags` (by default as a worker process runs). */
export function tacitArgv(args: readonly string[], flags: readonly string[] = WORKER_NODE_FLAGS): string[] {
  return [...flags, join(projectRoot(), "bin", "tacit.js"), ...args];
}

/** The embedded default pipeline, `pipelines/feedback.yaml`. */
export function defaultPipelinePath(): string {
  return join(projectRoot(), "pipelines", "feedback.yaml");
}

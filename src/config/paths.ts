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
 * Node flags a worker process runs with. V8 reads both only at start-up, so they are flags, not
 * settings: `bin/tacit.js` carries them in its shebang, the Dockerfile in its entrypoint, `npm run
 * demo` in its script, `tacit bench` relaunches itself with them, and `tacit run` says so when one
 * is missing.
 *
 * - `--max-semi-space-size=64`: a young generation of 2 × 64 MB instead of V8's 2 × 16 MB. A
 *   worker allocates about 30–50 kB per event that dies within a batch or two (decoded envelopes,
 *   outputs, protocol buffers); with the default, a scavenge every few hundred events copies
 *   whatever a batch still holds, and much of it is promoted and marked again later. At 64 the
 *   bench's worker used 8–15 % less CPU per event, for 70–130 MB more RSS (README, Performance).
 * - `--initial-old-space-size=512`: no full collection while the old generation is under 512 MB
 *   (V8 treats an embedder's initial size as a floor of its limit; the JVM's `-Xms`). The worker's
 *   live heap is small (35–140 MB in the bench: the state cache, modules) but a commit interval's
 *   inputs, outputs and state outlive two scavenges, so at full rate it promotes about 100 MB/s,
 *   and V8, which started the next full collection at three to five times what the last one
 *   kept, ran one every 1.5–4.5 s. With the floor, a third as many: the bench's worker used 15–25 %
 *   less CPU per event in the issue's 20,000-event window, 12 % over 100,000 events, 6 % over
 *   200,000, for 30–85 MB more RSS peak; at the cache bound (100,000 users), where the live heap
 *   is larger, the same CPU and 67 MB more (README, Performance). The worker's own thread
 *   (`runtime.threads`) gets a lower floor (see threadMaxOldGenerationMb).
 */
export const WORKER_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=64", "--initial-old-space-size=512"];

/**
 * The old generation's cap, in MB, of a worker's own thread (`runtime.threads`). The floor above
 * is a process-wide flag, and V8 lowers an isolate's floor to half its cap: the thread (enrich,
 * stateless but for two small LRUs, about 20 MB live) promotes little, and under a 512 MB floor
 * would let that much garbage pile up over hours before its first full collection. With the cap
 * it collects from 128 MB on (at the default batch size and input bound). The cap leaves room for
 * eight batches of the largest inputs the pipeline accepts.
 */
export function threadMaxOldGenerationMb(batchSize: number, maxEventBytes: number): number {
  return Math.max(256, Math.ceil((8 * batchSize * maxEventBytes) / 2 ** 20));
}

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

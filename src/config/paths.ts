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

/** The embedded default pipeline, `pipelines/feedback.yaml`. */
export function defaultPipelinePath(): string {
  return join(projectRoot(), "pipelines", "feedback.yaml");
}

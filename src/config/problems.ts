import levenshtein from "fast-levenshtein";
import { ConfigError } from "../core/errors.js";

/** One mistake in a pipeline file, located at the YAML node at fault (1-based line and column). */
export interface Problem {
  /** The pipeline file, or `--set` for a bad command-line override (then `line` is the override's index). */
  file: string;
  line: number;
  col: number;
  message: string;
  /** How to fix it. */
  hint?: string;
  /** Dotted path of the value at fault in the document (`stages.1.config.window`), when there is one. */
  path?: string;
}

/** `file:line:col  message  (hint)` — the format editors and CI annotators jump to. */
export function formatProblem(p: Problem): string {
  return `${p.file}:${p.line}:${p.col}  ${p.message}${p.hint ? `  (${p.hint})` : ""}`;
}

/** Thrown by `loadPipelineOrThrow`; the CLI exits 2 on it. */
export class PipelineConfigError extends ConfigError {
  readonly problems: Problem[];
  constructor(file: string, problems: Problem[]) {
    const n = problems.length;
    super(`${file}: ${n} problem${n === 1 ? "" : "s"}\n${problems.map((p) => `  ${formatProblem(p)}`).join("\n")}`);
    this.problems = problems;
  }
}

/**
 * The candidate closest to `word` by edit distance, if it is close enough to be a plausible typo
 * (at most a third of the word's length, and at least 2 edits allowed).
 */
export function closest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const c of candidates) {
    const d = levenshtein.get(word.toLowerCase(), c.toLowerCase());
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  const allowed = Math.max(2, Math.floor(word.length / 3));
  return bestDistance <= allowed ? best : undefined;
}

/** Sorts problems by file then position, the order a reader fixes them in. */
export function sortProblems(problems: Problem[]): Problem[] {
  return [...problems].sort((a, b) => (a.file === b.file ? a.line - b.line || a.col - b.col : a.file < b.file ? -1 : 1));
}

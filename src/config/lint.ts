import type { OperatorSpec, PipelineView } from "../core/operator.js";
import { errorMessage } from "../core/errors.js";
import { pipelineStreams, stageGroups } from "./topology.js";
import type { Pipeline, Stage } from "./types.js";
import { closest, type Problem } from "./problems.js";
import type { DocPath } from "./source.js";
import { isSubjectToken, subjectsOverlap } from "./subjects.js";

/** A stage as lint sees it: shape-checked, config with its defaults when it validated. */
export interface LintStage {
  name: string;
  operator: string;
  fuse_with_previous: boolean;
  config: Record<string, unknown>;
  /** Index of the stage in the file's `stages` list (lint may see only some of them). */
  index: number;
  /** The config passed its operator's schema, so the operator's own `lint` may run on it. */
  configValid: boolean;
}

export interface LintInput {
  name: string;
  subject_prefix: string;
  partitions: number;
  /** `partitions` is written in the file (or set with `--set`), not taken from the default. */
  partitionsStated: boolean;
  stages: LintStage[];
}

export interface LintContext {
  file: string;
  /** Line and column of a path in the file (`["stages", 2, "operator"]`). */
  locate(path: DocPath, at?: "value" | "key"): { line: number; col: number };
  operator(name: string): OperatorSpec<any> | undefined;
  /** Names of the registered operators, for hints. */
  operatorNames: readonly string[];
}

/**
 * Stage orders that must hold when both operators are in a pipeline: `first` must come before
 * `then`, for the reason given.
 */
export const ORDER_RULES: readonly { first: string; then: string; why: string }[] = [
  { first: "dedupe", then: "label-derive", why: "a duplicate reaching label-derive has already counted as a signal" },
  { first: "bot-score", then: "label-derive", why: "labels must never be built from bot traffic" },
  { first: "enrich", then: "label-derive", why: "label-derive must only see pseudonymized, redacted events" },
];

/**
 * Cross-stage checks that a schema cannot express: operators exist, names are unique subject
 * tokens, keyed stages are partitioned and not first, fusing keeps one partitioning, order
 * rules, non-overlapping stream subjects, and each operator's own `lint`.
 */
export function lintPipeline(input: LintInput, ctx: LintContext): Problem[] {
  const problems: Problem[] = [];
  const at = (path: DocPath, message: string, hint?: string, where: "value" | "key" = "value"): void => {
    problems.push({ file: ctx.file, ...ctx.locate(path, where), message, ...(hint ? { hint } : {}), path: path.join(".") });
  };
  const stagePath = (s: LintStage, ...rest: (string | number)[]): DocPath => ["stages", s.index, ...rest];

  const specs = new Map<LintStage, OperatorSpec<any> | undefined>();
  for (const s of input.stages) {
    const spec = ctx.operator(s.operator);
    specs.set(s, spec);
    if (!spec) {
      const guess = closest(s.operator, ctx.operatorNames);
      const known = ctx.operatorNames.length ? `known operators: ${ctx.operatorNames.join(", ")}` : "the operator registry is empty";
      at(stagePath(s, "operator"), `stage "${s.name}": unknown operator "${s.operator}"`, guess ? `did you mean "${guess}"? ${known}` : known);
    }
  }

  // Names: unique, and usable as a subject token (they appear in <p>.x.<stage>.<n> and <p>.dlq.<stage>).
  const firstByName = new Map<string, LintStage>();
  const duplicates = new Set<LintStage>();
  for (const s of input.stages) {
    if (!isSubjectToken(s.name)) {
      at(stagePath(s, "name"), `stage name "${s.name}" is not a valid NATS subject token`, "no dots, spaces, * or >: use lower case letters, digits, - and _");
    }
    const first = firstByName.get(s.name);
    if (first) {
      duplicates.add(s);
      at(stagePath(s, "name"), `duplicate stage name "${s.name}"`, `first used at line ${ctx.locate(stagePath(first, "name")).line}; stage names must be unique (they name streams, consumers and DLQ subjects)`);
    } else {
      firstByName.set(s.name, s);
    }
  }

  // Keyed stages and partitions.
  const keyed = (s: LintStage): boolean | undefined => specs.get(s)?.keyed;
  const firstStage = input.stages.find((s) => s.index === 0);
  if (firstStage && keyed(firstStage)) {
    at(
      stagePath(firstStage, "operator"),
      `stage "${firstStage.name}": keyed operator "${firstStage.operator}" cannot be the first stage`,
      `the first stage reads the unpartitioned ${input.subject_prefix}.in.> subjects; put an unkeyed stage (such as enrich) first`,
    );
  }
  const firstKeyed = input.stages.find((s) => keyed(s));
  if (firstKeyed && !input.partitionsStated) {
    at(
      stagePath(firstKeyed, "operator"),
      `stage "${firstKeyed.name}" is keyed but the pipeline does not state its partition count`,
      `add "partitions: ${input.partitions}" at the top level: the count is fixed for the pipeline's life, since keyed state lives with its partition`,
    );
  }
  if (firstKeyed && !(Number.isInteger(input.partitions) && input.partitions >= 1)) {
    at(["partitions"], `partitions must be an integer ≥ 1 when a stage is keyed (stage "${firstKeyed.name}")`, "for example partitions: 8");
  }

  // Fusing runs two stages as one function call: both must read the same kind of input.
  const ordered = [...input.stages].sort((a, b) => a.index - b.index);
  for (const s of ordered) {
    if (!s.fuse_with_previous) continue;
    if (s.index === 0) {
      at(stagePath(s, "fuse_with_previous"), `stage "${s.name}": the first stage has no previous stage to fuse with`, "remove fuse_with_previous", "key");
      continue;
    }
    const prev = ordered.find((p) => p.index === s.index - 1);
    if (!prev) continue;
    const a = keyed(prev);
    const b = keyed(s);
    if (a === undefined || b === undefined || a === b) continue;
    at(
      stagePath(s, "fuse_with_previous"),
      `stage "${s.name}" (${b ? "keyed" : "unkeyed"}) cannot be fused with "${prev.name}" (${a ? "keyed" : "unkeyed"})`,
      "only consecutive stages that are both keyed (same partition key) or both unkeyed can be fused: remove fuse_with_previous",
      "key",
    );
  }

  for (const rule of ORDER_RULES) {
    const thens = ordered.filter((s) => s.operator === rule.then);
    if (thens.length === 0) continue;
    const firstThen = thens[0]!;
    for (const s of ordered) {
      if (s.operator === rule.first && s.index > firstThen.index) {
        at(
          stagePath(s, "operator"),
          `stage "${s.name}" (${rule.first}) comes after "${firstThen.name}" (${rule.then})`,
          `move it before ${firstThen.name}: ${rule.why}`,
        );
      }
    }
  }

  problems.push(...lintSubjects(input, ctx, duplicates));

  // Each operator's own cross-field lint, on configs that passed their schema.
  for (const s of ordered) {
    const spec = specs.get(s);
    if (!spec?.lint || !s.configValid) continue;
    const view: PipelineView = {
      stages: ordered.map((o) => ({ name: o.name, operator: o.operator, config: o.config })),
      index: ordered.indexOf(s),
      partitions: input.partitions,
    };
    try {
      for (const issue of spec.lint(s.config, view)) {
        const label = issue.path.length ? `config.${issue.path.join(".")}` : "config";
        at(stagePath(s, "config", ...issue.path), `stage "${s.name}": ${label}: ${issue.message}`, issue.hint);
      }
    } catch (err) {
      at(stagePath(s, "operator"), `stage "${s.name}": operator ${s.operator}'s lint failed: ${errorMessage(err)}`, "this is a bug in the operator");
    }
  }
  return problems;
}

/**
 * Streams of the pipeline as the topology will create them must not share subjects: JetStream
 * refuses overlapping streams, and a stage whose output lands in its own input would loop.
 */
function lintSubjects(input: LintInput, ctx: LintContext, skip: ReadonlySet<LintStage>): Problem[] {
  const stages: Stage[] = input.stages
    .filter((s) => !skip.has(s))
    .sort((a, b) => a.index - b.index)
    .map((s) => ({ name: s.name, operator: s.operator, fuse_with_previous: s.fuse_with_previous, config: s.config }));
  if (stages.length === 0) return [];
  const byName = new Map(input.stages.map((s) => [s.name, s]));
  // The topology helpers read only name, subject_prefix and stages.
  const view = { name: input.name, subject_prefix: input.subject_prefix, stages } as Pick<Pipeline, "name" | "subject_prefix" | "stages"> as Pipeline;
  const streams = pipelineStreams(view, stageGroups(view, ctx.operator));
  const problems: Problem[] = [];
  const where = (role: string): DocPath => {
    const m = /^input of (.+)$/.exec(role);
    const s = m ? byName.get(m[1]!) : undefined;
    return s ? ["stages", s.index, "name"] : ["subject_prefix"];
  };
  for (let i = 0; i < streams.length; i++) {
    for (let j = i + 1; j < streams.length; j++) {
      const a = streams[i]!;
      const b = streams[j]!;
      if (a.name === b.name) {
        problems.push({ file: ctx.file, ...ctx.locate(where(b.role)), message: `stream ${b.name} (${b.role}) has the same name as the stream of ${a.role}`, hint: "rename the stage", path: where(b.role).join(".") });
        continue;
      }
      for (const sa of a.subjects) {
        const sb = b.subjects.find((x) => subjectsOverlap(sa, x));
        if (sb === undefined) continue;
        problems.push({
          file: ctx.file,
          ...ctx.locate(where(b.role)),
          message: `subjects of stream ${b.name} (${b.role}: ${sb}) overlap stream ${a.name} (${a.role}: ${sa})`,
          hint: "rename the stage or change subject_prefix so every stream has its own subjects",
          path: where(b.role).join("."),
        });
        break;
      }
    }
  }
  return problems;
}

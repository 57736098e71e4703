import { InvalidArgumentError, type Command } from "commander";
import { findOperator } from "../../operators/index.js";
import { loadPipeline } from "../config/load.js";
import { parseSetExpression } from "../config/overrides.js";
import { formatProblem } from "../config/problems.js";
import type { Pipeline } from "../config/types.js";
import { pipelineStreams, stageGroups } from "../config/topology.js";
import { action, effectiveEnv, out } from "./common.js";

/**
 * Commander parser of a repeatable `--set dotted.path=value`: rejects a malformed expression at
 * parse time (exit 2) and accumulates the rest in order.
 */
export function collectSet(value: string, previous: string[] = []): string[] {
  if (!parseSetExpression(value)) throw new InvalidArgumentError(`expected dotted.path=value (e.g. stages.dedupe.config.window=1h), got "${value}"`);
  return [...previous, value];
}

/** What `tacit validate` reports about a valid pipeline. */
export interface ValidateSummary {
  ok: true;
  file: string;
  pipeline: string;
  subject_prefix: string;
  partitions: number;
  stages: { name: string; operator: string; keyed: boolean; group: string }[];
  groups: { name: string; stages: string[]; keyed: boolean; input_stream: string; input_subjects: string[] }[];
  streams: { name: string; subjects: string[]; role: string }[];
}

/** Summary of a compiled pipeline: its stages, how they group into workers, and its streams. */
export function summarize(file: string, p: Pipeline): ValidateSummary {
  const groups = stageGroups(p, findOperator);
  return {
    ok: true,
    file,
    pipeline: p.name,
    subject_prefix: p.subject_prefix,
    partitions: p.partitions,
    stages: groups.flatMap((g) => g.stages.map((s) => ({ name: s.name, operator: s.operator, keyed: g.keyed, group: g.name }))),
    groups: groups.map((g) => ({ name: g.name, stages: g.stages.map((s) => s.name), keyed: g.keyed, input_stream: g.inputStream, input_subjects: g.inputSubjects })),
    streams: pipelineStreams(p, groups),
  };
}

function formatSummary(s: ValidateSummary): string {
  const fused = s.groups.filter((g) => g.stages.length > 1);
  const lines = [
    `${s.file}: ok — pipeline ${s.pipeline}, prefix ${s.subject_prefix}, ${s.partitions} partitions`,
    `${s.stages.length} stage(s) in ${s.groups.length} worker group(s)${fused.length ? `; fused: ${fused.map((g) => g.stages.join(" + ")).join(", ")}` : ""}`,
  ];
  const w = Math.max(...s.stages.map((x) => x.name.length));
  for (const g of s.groups) {
    g.stages.forEach((name, i) => {
      const st = s.stages.find((x) => x.name === name)!;
      const reads = i === 0 ? `reads ${g.input_subjects.join(", ")}` : `fused into ${g.name}`;
      lines.push(`  ${name.padEnd(w)}  ${st.operator.padEnd(w)}  ${g.keyed ? "keyed  " : "unkeyed"}  ${reads}`);
    });
  }
  lines.push("streams:");
  for (const st of s.streams) lines.push(`  ${st.name}  ${st.subjects.join(", ")}  (${st.role})`);
  return lines.join("\n");
}

/** `tacit validate <pipeline.yaml> [--set k=v …] [--skip-secrets] [--json]`: exit 0 when valid, 2 with every problem otherwise. */
export function registerValidate(program: Command): void {
  program
    .command("validate")
    .description("check a pipeline file (schema, operator configs, cross-stage rules); problems as file:line:col with a fix hint")
    .argument("<pipeline>", "the pipeline YAML file")
    .option("--set <path=value>", "override a value before validating (repeatable), e.g. --set partitions=16 --set stages.dedupe.config.window=1h", collectSet, [])
    .option("--skip-secrets", "do not read *_file / *_env secrets (for CI without the deployment's secrets)")
    .option("--json", "print machine-readable JSON")
    .action(
      action(async (file: string, opts: { set?: string[]; skipSecrets?: boolean; json?: boolean }) => {
        const r = loadPipeline(file, { set: opts.set ?? [], env: effectiveEnv(), operators: findOperator, secrets: !opts.skipSecrets });
        if (!r.pipeline) {
          const n = r.problems.length;
          out(opts.json, { ok: false, file, problems: r.problems }, () => [...r.problems.map(formatProblem), `${n} problem${n === 1 ? "" : "s"}`].join("\n"));
          return 2;
        }
        const summary = summarize(file, r.pipeline);
        out(opts.json, summary, () => formatSummary(summary));
        return 0;
      }),
    );
}

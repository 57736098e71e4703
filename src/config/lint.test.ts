import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { OperatorSpec } from "../core/operator.js";
import { FAKE_OPERATORS } from "./fake-operators.js";
import { lintPipeline, ORDER_RULES, type LintInput, type LintStage } from "./lint.js";
import { loadPipeline } from "./load.js";
import type { DocPath } from "./source.js";

const FIXTURES = fileURLToPath(new URL("../../../test/fixtures/pipelines/", import.meta.url));

function lineOf(name: string, needle: string, nth = 1): number {
  const lines = readFileSync(join(FIXTURES, name), "utf8").split("\n");
  let seen = 0;
  for (let i = 0; i < lines.length; i++) if (lines[i]!.includes(needle) && ++seen === nth) return i + 1;
  throw new Error(`${needle} not in ${name}`);
}

const problemsOf = (name: string) => loadPipeline(join(FIXTURES, name), { operators: FAKE_OPERATORS, env: {} }).problems;

test("duplicate stage names: the second one, pointing back at the first", () => {
  const ps = problemsOf("duplicate-stage.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("duplicate-stage.yaml", "name: dedupe", 2));
  assert.match(ps[0]!.message, /duplicate stage name "dedupe"/);
  assert.match(ps[0]!.hint!, new RegExp(`line ${lineOf("duplicate-stage.yaml", "name: dedupe")}`));
});

test("a keyed first stage is refused", () => {
  const ps = problemsOf("keyed-first.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("keyed-first.yaml", "operator: dedupe"));
  assert.match(ps[0]!.message, /keyed operator "dedupe" cannot be the first stage/);
  assert.match(ps[0]!.hint!, /shop\.in\.>/);
});

test("keyed stages need the partition count stated in the file (or by --set)", () => {
  const ps = problemsOf("partitions-missing.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("partitions-missing.yaml", "operator: dedupe"));
  assert.match(ps[0]!.message, /does not state its partition count/);
  const set = loadPipeline(join(FIXTURES, "partitions-missing.yaml"), { operators: FAKE_OPERATORS, env: {}, set: ["partitions=2"] });
  assert.deepEqual(set.problems, []);
  // Without keyed stages the default is fine.
  assert.deepEqual(problemsOf("minimal.yaml"), []);
});

test("fusing a keyed stage to an unkeyed one is refused; keyed to keyed is fine", () => {
  const ps = problemsOf("fuse-mismatch.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("fuse-mismatch.yaml", "fuse_with_previous", 1));
  assert.match(ps[0]!.message, /"dedupe" \(keyed\) cannot be fused with "enrich" \(unkeyed\)/);
  // valid.yaml fuses bot-score (keyed) to dedupe (keyed).
  assert.deepEqual(problemsOf("valid.yaml"), []);
});

test("dedupe after label-derive is refused at the dedupe stage", () => {
  const ps = problemsOf("dedupe-after-label.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("dedupe-after-label.yaml", "operator: dedupe"));
  assert.match(ps[0]!.hint!, /before label-derive/);
});

test("an operator's own lint is located at the config key it names", () => {
  const ps = problemsOf("operator-lint.yaml");
  assert.equal(ps.length, 1, JSON.stringify(ps));
  assert.equal(ps[0]!.line, lineOf("operator-lint.yaml", "allowed_lateness"));
  assert.match(ps[0]!.message, /config\.allowed_lateness: 15m is not shorter than gap 10m/);
});

// Direct lint calls: positions are fake (line = stage index + 1) so the paths can be checked too.
function run(stages: Partial<LintStage>[], extra: Partial<LintInput> = {}, operators: readonly OperatorSpec<any>[] = FAKE_OPERATORS) {
  const located: DocPath[] = [];
  const input: LintInput = {
    name: "shop",
    subject_prefix: "shop",
    partitions: 4,
    partitionsStated: true,
    // Operator lint only runs on configs given here (as if they had passed their schema).
    stages: stages.map((s, i) => ({ name: s.operator!, fuse_with_previous: false, config: {}, index: i, configValid: s.config !== undefined, operator: "relay", ...s })),
    ...extra,
  };
  const problems = lintPipeline(input, {
    file: "p.yaml",
    locate: (p) => {
      located.push(p);
      return { line: typeof p[1] === "number" ? p[1] + 1 : 0, col: 1 };
    },
    operator: (n) => operators.find((o) => o.name === n),
    operatorNames: operators.map((o) => o.name),
  });
  return { problems, located };
}

test("fuse_with_previous on the first stage is refused", () => {
  const { problems } = run([{ operator: "enrich", fuse_with_previous: true }]);
  assert.equal(problems.length, 1);
  assert.match(problems[0]!.message, /no previous stage/);
});

test("every order rule is enforced", () => {
  for (const rule of ORDER_RULES) {
    const { problems } = run([{ operator: "relay" }, { operator: rule.then }, { operator: rule.first }]);
    const p = problems.find((x) => x.message.includes(`(${rule.first}) comes after`));
    assert.ok(p, `${rule.first} after ${rule.then}: ${JSON.stringify(problems)}`);
  }
  assert.equal(run([{ operator: "enrich" }, { operator: "dedupe" }, { operator: "bot-score" }, { operator: "label-derive" }]).problems.length, 0);
});

test("an unknown operator with an empty registry says so", () => {
  const { problems } = run([{ operator: "enrich" }], {}, []);
  assert.equal(problems.length, 1);
  assert.match(problems[0]!.hint!, /registry is empty/);
});

test("stage names that are not subject tokens, and streams whose subjects overlap", () => {
  const { problems } = run([{ operator: "enrich" }, { operator: "relay", name: "dedupe" }, { operator: "relay", name: "*" }]);
  assert.ok(problems.some((p) => /"\*" is not a valid NATS subject token/.test(p.message)));
  const overlap = problems.find((p) => /overlap/.test(p.message));
  assert.ok(overlap, JSON.stringify(problems));
  assert.match(overlap.message, /shop\.x\.\*\.\*/);
  assert.equal(overlap.line, 3, "at the later stage");
});

test("operator lint: skipped for invalid configs, and a throwing lint is a problem, not a crash", () => {
  const boom: OperatorSpec<any> = { ...FAKE_OPERATORS.find((o) => o.name === "relay")!, name: "boom", lint: () => { throw new Error("oops"); } };
  const ops = [...FAKE_OPERATORS, boom];
  assert.equal(run([{ operator: "enrich" }, { operator: "boom", config: {}, configValid: false }], {}, ops).problems.length, 0);
  const { problems } = run([{ operator: "enrich" }, { operator: "boom", config: {} }], {}, ops);
  assert.equal(problems.length, 1);
  assert.match(problems[0]!.message, /lint failed: oops/);
});

test("operator lint sees the whole pipeline and its own index", () => {
  let seen: unknown;
  const spy: OperatorSpec<any> = { ...FAKE_OPERATORS.find((o) => o.name === "relay")!, name: "spy", lint: (_c, view) => { seen = view; return [{ path: ["x", "0"], message: "m" }]; } };
  const { problems, located } = run([{ operator: "enrich" }, { operator: "spy", config: { x: [1] } }], {}, [...FAKE_OPERATORS, spy]);
  assert.deepEqual(seen, { stages: [{ name: "enrich", operator: "enrich", config: {} }, { name: "spy", operator: "spy", config: { x: [1] } }], index: 1, partitions: 4 });
  assert.equal(problems.length, 1);
  assert.ok(located.some((p) => p.join(".") === "stages.1.config.x.0"));
});

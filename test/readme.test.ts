import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { BEGIN_MARKER, END_MARKER, renderPipelineReference, replaceGenerated } from "../src/config/docs.js";
import { OPERATORS } from "../operators/index.js";
import { GENERATED_SECTIONS, markers } from "../src/config/docs-sections.js";

const README = fileURLToPath(new URL("../../README.md", import.meta.url));

test("README.md holds exactly the current pipeline reference (run `node scripts/gen-readme.mjs` after a build)", () => {
  const readme = readFileSync(README, "utf8");
  assert.equal(readme.split(BEGIN_MARKER).length, 2, "one begin marker");
  assert.equal(readme.split(END_MARKER).length, 2, "one end marker");
  const between = readme.slice(readme.indexOf(BEGIN_MARKER) + BEGIN_MARKER.length, readme.indexOf(END_MARKER));
  assert.equal(between, `\n${renderPipelineReference()}\n`);
});

test("the reference documents every top-level pipeline field and every registered operator", () => {
  const ref = renderPipelineReference();
  for (const field of ["version", "name", "partitions", "streams.max_age", "runtime.retry_backoff", "stages[].operator", "nats.password_env"]) {
    assert.ok(ref.includes(`| \`${field}\` |`), field);
  }
  for (const op of OPERATORS) assert.ok(ref.includes(`#### Operator \`${op.name}\``), op.name);
});

test("replaceGenerated swaps only the marked section", () => {
  const doc = `# t\nbefore\n${BEGIN_MARKER}\nold\n${END_MARKER}\nafter\n`;
  assert.equal(replaceGenerated(doc, "new"), `# t\nbefore\n${BEGIN_MARKER}\nnew\n${END_MARKER}\nafter\n`);
  assert.throws(() => replaceGenerated("# no markers\n", "x"), /markers/);
});

test("README.md holds every generated section as currently rendered (label schema, DLQ reasons, …)", () => {
  const readme = readFileSync(README, "utf8");
  for (const [name, render] of Object.entries(GENERATED_SECTIONS)) {
    const { begin, end } = markers(name);
    assert.equal(readme.split(begin).length, 2, `one ${begin}`);
    const between = readme.slice(readme.indexOf(begin) + begin.length, readme.indexOf(end));
    assert.equal(between, `\n${render()}\n`, `section ${name} is stale: run node scripts/gen-readme.mjs`);
  }
});

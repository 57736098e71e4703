import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ConfigError } from "../core/errors.js";
import { DEFAULT_EXAMINATION, SIGNALS, TARGET_KIND, loadRulesFile, parseRules, RulesConfigError, type Fields } from "./rules.js";

const DEFAULT_FILE = fileURLToPath(new URL("../../../config/label-rules.yaml", import.meta.url));

/** A minimal valid rule, to which a test adds or changes fields. */
const RULE = `  - name: copy
    version: 1
    signal: copy_paste
    kind: response
    target: response
    label: positive
    weight: 1
`;

function problemsOf(text: string): { line: number; col: number; message: string; hint?: string }[] {
  try {
    parseRules(text, "rules.yaml");
  } catch (err) {
    assert.ok(err instanceof RulesConfigError, String(err));
    assert.ok(err instanceof ConfigError);
    return err.problems;
  }
  assert.fail("expected the rules to be rejected");
}

test("the default rules file loads, and every rule in it is enabled and has a description", () => {
  const r = loadRulesFile(DEFAULT_FILE);
  const names = r.rules.map((x) => x.name);
  for (const expected of [
    "task_complete",
    "copy",
    "accept",
    "edit_light",
    "edit_heavy",
    "regenerate",
    "regenerate_then_use",
    "reformulation",
    "click_satisfied",
    "click_last",
    "click_skip_above",
    "abandon_unread",
    "share",
    "session_satisfied",
    "session_dissatisfied",
  ]) {
    assert.ok(names.includes(expected), `default rule ${expected}`);
  }
  assert.deepEqual([...r.positionBias.examination], [...DEFAULT_EXAMINATION]);
  assert.equal(r.positionBias.maxIps, 5);
  assert.equal(r.baselines.halfLifeMs, 14 * 86_400_000);
  // task completion is the strongest positive: no other positive rule's base weight reaches it.
  const task = r.rules.find((x) => x.name === "task_complete")!;
  for (const x of r.rules) if (x.label === "positive" && x.name !== "task_complete" && x.kind === "response") assert.ok(x.base < task.base, x.name);
  // Nothing listens to explicit feedback.
  assert.equal(SIGNALS.explicit_feedback, undefined);
  assert.ok(r.rules.every((x) => !x.signals.includes("explicit_feedback")));
});

test("a rules file that cannot be read is a ConfigError naming it", () => {
  assert.throws(() => loadRulesFile("/nonexistent/rules.yaml"), (err: unknown) => err instanceof ConfigError && /\/nonexistent\/rules\.yaml:1:1/.test((err as Error).message));
});

test("an unknown field in a rule is reported at its line with a did-you-mean hint", () => {
  const text = `version: 1\nrules:\n${RULE}    conditons: []\n`;
  const [p] = problemsOf(text);
  assert.equal(p!.line, 10);
  assert.match(p!.message, /unknown field "conditons"/);
  assert.match(p!.hint!, /did you mean "conditions"/);
});

test("the error message carries file:line:col", () => {
  const text = `version: 1\nrules:\n${RULE.replace("kind: response", "kind: respnse")}`;
  assert.throws(
    () => parseRules(text, "config/my-rules.yaml"),
    (err: unknown) => /config\/my-rules\.yaml:6:11 {2}rules\.0\.kind: "respnse" is not one of/.test((err as Error).message) && /did you mean "response"/.test((err as Error).message),
  );
});

test("a condition on a field the signal does not offer is reported at the field", () => {
  const text = `version: 1\nrules:\n${RULE}    conditions:\n      - { field: copied_shar, op: ">=", value: 0.2 }\n`;
  const [p] = problemsOf(text);
  assert.equal(p!.line, 11);
  assert.match(p!.message, /unknown field "copied_shar"/);
  assert.match(p!.hint!, /did you mean "copied_share"/);
});

test("semantic mistakes: target of another signal, kind mismatch, preference with a polarity, duplicate names, ordered op on a string", () => {
  const text = [
    "version: 1",
    "rules:",
    RULE.replace("target: response", "target: previous_response").trimEnd(),
    RULE.replace("name: copy", "name: pair").replace("target: response", "target: replaced_pair").trimEnd(),
    RULE.trimEnd(),
    RULE.replace("name: copy", "name: lt").trimEnd(),
    "    conditions:",
    '      - { field: destination, op: "<", value: "x" }',
    "",
  ].join("\n");
  const ps = problemsOf(text);
  const msgs = ps.map((p) => `${p.line}: ${p.message}`);
  assert.ok(msgs.some((m) => /^7: signal "copy_paste" cannot label target "previous_response"/.test(m)), msgs.join("\n"));
  assert.ok(msgs.some((m) => /^13: target "replaced_pair" makes preference labels, not response/.test(m)), msgs.join("\n"));
  assert.ok(msgs.some((m) => /duplicate rule name "copy"/.test(m)), msgs.join("\n"));
  assert.ok(msgs.some((m) => /unknown field "destination"/.test(m)), msgs.join("\n"));
  assert.ok(msgs.some((m) => /op "<" compares numbers/.test(m)), msgs.join("\n"));
});

test("a YAML syntax error is reported once per line, with its position", () => {
  const ps = problemsOf("version: 1\nrules:\n  - name: copy\n    version: 1\n   signal: copy_paste\n");
  assert.equal(ps.length, 1);
  assert.equal(ps[0]!.line, 5);
  assert.match(ps[0]!.message, /^YAML: /);
});

test("response and session rules need a polarity; preference rules must not have one", () => {
  const missing = problemsOf(`version: 1\nrules:\n${RULE.replace("    label: positive\n", "")}`);
  assert.match(missing[0]!.message, /needs label: positive or negative/);
  const pref = problemsOf(`version: 1\nrules:\n${RULE.replace("target: response", "target: replaced_pair").replace("kind: response", "kind: preference")}`);
  assert.match(pref[0]!.message, /preference labels have no polarity/);
});

function condition(yaml: string): (f: Fields) => boolean {
  const r = parseRules(`version: 1\nrules:\n${RULE}    conditions:\n${yaml}`);
  return r.rules[0]!.when;
}

test("condition language: comparisons, lists, exists/missing, defaults and any", () => {
  const table: [string, Fields, boolean][] = [
    ['      - { field: copied_share, op: ">=", value: 0.2 }', { copied_share: 0.2 }, true],
    ['      - { field: copied_share, op: ">=", value: 0.2 }', { copied_share: 0.19 }, false],
    ['      - { field: copied_share, op: ">=", value: 0.2 }', {}, false],
    ['      - { field: copied_share, op: ">=", value: 0.2, default: 0.5 }', {}, true],
    ['      - { field: copied_share, op: "<", value: 0.2 }', { copied_share: 0.1 }, true],
    ['      - { field: copied_share, op: "<=", value: 0.2 }', { copied_share: 0.3 }, false],
    ['      - { field: copied_share, op: ">", value: 0.2 }', { copied_share: 0.3 }, true],
    ['      - { field: ranked, op: "==", value: false }', { ranked: false }, true],
    ['      - { field: ranked, op: "!=", value: false }', { ranked: false }, false],
    ["      - { field: position, op: in, value: [1, 2] }", { position: 2 }, true],
    ["      - { field: position, op: not_in, value: [1, 2] }", { position: 2 }, false],
    ["      - { field: position, op: exists }", { position: 3 }, true],
    ["      - { field: position, op: exists }", {}, false],
    ["      - { field: position, op: missing }", {}, true],
    ["      - any:\n          - { field: position, op: missing }\n          - { field: position, op: '>', value: 3 }", { position: 5 }, true],
    ["      - any:\n          - { field: position, op: missing }\n          - { field: position, op: '>', value: 3 }", { position: 2 }, false],
  ];
  for (const [yaml, fields, expected] of table) assert.equal(condition(yaml)(fields), expected, `${yaml.trim()} on ${JSON.stringify(fields)}`);
});

test("disabled rules are validated but not used; settings have defaults", () => {
  const r = parseRules(`version: 1\nrules:\n${RULE}    enabled: false\n`);
  assert.equal(r.rules.length, 0);
  assert.equal(r.positionBias.maxIps, 5);
  assert.equal(r.baselines.floor, 0.2);
});

test("every target maps to one label kind and every signal offers only targets of known kinds", () => {
  for (const [name, doc] of Object.entries(SIGNALS)) {
    assert.ok(doc.targets.length > 0, name);
    for (const t of doc.targets) assert.ok(TARGET_KIND[t], `${name}: ${t}`);
  }
});

test("a rules file on disk with an error fails loadRulesFile with its path and line", () => {
  const dir = mkdtempSync(join(tmpdir(), "tacit-rules-"));
  const file = join(dir, "bad.yaml");
  writeFileSync(file, `version: 1\nrules:\n${RULE.replace("weight: 1", "weight: -1")}`);
  assert.throws(() => loadRulesFile(file), (err: unknown) => err instanceof RulesConfigError && err.message.includes(`${file}:9:`));
});

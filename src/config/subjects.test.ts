import { test } from "node:test";
import assert from "node:assert/strict";
import { isSubjectToken, isValidSubject, subjectsOverlap } from "./subjects.js";

test("subjectsOverlap: literal, * and > filters", () => {
  const table: [string, string, boolean][] = [
    ["a.b", "a.b", true],
    ["a.b", "a.c", false],
    ["a.b", "a.b.c", false],
    ["a.*", "a.b", true],
    ["a.*", "a.b.c", false],
    ["a.>", "a.b.c", true],
    ["a.>", "a", false],
    ["a.>", "a.b", true],
    ["a.*.c", "a.b.*", true],
    ["a.*.c", "a.b.d", false],
    ["*.in.>", "feedback.x.dedupe.*", false],
    ["feedback.in.>", "feedback.in.click", true],
    ["feedback.x.dedupe.*", "feedback.x.dedupe.3", true],
    ["feedback.x.dedupe.*", "feedback.x.dedupe2.3", false],
    ["feedback.events.*", "feedback.x.events.*", false],
    [">", "anything.at.all", true],
    ["*", "a.b", false],
    ["*.*", "a.>", true],
  ];
  for (const [a, b, want] of table) {
    assert.equal(subjectsOverlap(a, b), want, `${a} vs ${b}`);
    assert.equal(subjectsOverlap(b, a), want, `${b} vs ${a} (symmetric)`);
  }
});

test("isSubjectToken and isValidSubject", () => {
  for (const t of ["dedupe", "bot-score", "label_derive", "a1"]) assert.ok(isSubjectToken(t), t);
  for (const t of ["", "a.b", "a b", "*", ">", "a>", "tab\t"]) assert.ok(!isSubjectToken(t), JSON.stringify(t));
  assert.ok(isValidSubject("a.*.c.>"));
  assert.ok(!isValidSubject("a.>.c"));
  assert.ok(!isValidSubject("a..c"));
  assert.ok(!isValidSubject("a.*", false));
});

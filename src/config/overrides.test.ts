import { test } from "node:test";
import assert from "node:assert/strict";
import { expandString, parseSetExpression } from "./overrides.js";

test("expandString: set, unset, defaults, $$ and malformed references", () => {
  const env = { A: "x", EMPTY: "" };
  assert.equal(expandString("${A}", env).value, "x");
  assert.equal(expandString("p-${A}-${A}", env).value, "p-x-x");
  assert.equal(expandString("${B:-dflt}", env).value, "dflt");
  assert.equal(expandString("${EMPTY:-dflt}", env).value, "dflt", ":- also covers empty");
  assert.equal(expandString("${EMPTY}", env).value, "", "set but empty, no default");
  assert.equal(expandString("${B:-}", env).value, "");
  assert.equal(expandString("cost $$5 ${A}", env).value, "cost $5 x");
  assert.deepEqual(expandString("${B}", env).unset, ["B"]);
  assert.deepEqual(expandString("${A:-${B}}", env).malformed.length, 1);
  assert.deepEqual(expandString("${1X}", env).malformed, ["${1X}"]);
  assert.equal(expandString("${A}", env).whole, true);
  assert.equal(expandString("v${A}", env).whole, false);
  assert.equal(expandString("no refs $HOME", env).value, "no refs $HOME", "only the braced form expands");
});

test("parseSetExpression", () => {
  assert.deepEqual(parseSetExpression("stages.dedupe.config.window=1h"), { path: ["stages", "dedupe", "config", "window"], value: "1h" });
  assert.deepEqual(parseSetExpression("description=a=b"), { path: ["description"], value: "a=b" });
  assert.deepEqual(parseSetExpression("name="), { path: ["name"], value: "" });
  assert.equal(parseSetExpression("=1"), undefined);
  assert.equal(parseSetExpression("a..b=1"), undefined);
  assert.equal(parseSetExpression("partitions"), undefined);
});

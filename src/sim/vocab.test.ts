import { test } from "node:test";
import assert from "node:assert/strict";
import { isbot } from "isbot";
import { Rng } from "./rng.js";
import { CRAWLER_UAS, DESKTOP_BROWSER_UAS, MOBILE_BROWSER_UAS, clarify, newTopicQuery, reformulate, withTypo } from "./vocab.js";

test("browser user agents pass isbot and crawler user agents are caught by it", () => {
  for (const ua of [...DESKTOP_BROWSER_UAS, ...MOBILE_BROWSER_UAS]) assert.equal(isbot(ua), false, ua);
  for (const ua of CRAWLER_UAS) assert.equal(isbot(ua), true, ua);
});

test("a typo changes exactly one word by swapping two adjacent letters", () => {
  const rng = new Rng(4);
  for (let i = 0; i < 200; i++) {
    const q = newTopicQuery(rng);
    const t = withTypo(rng, q);
    const a = q.split(" ");
    const b = t.split(" ");
    assert.equal(a.length, b.length);
    const changed = a.map((w, j) => [w, b[j]!] as const).filter(([x, y]) => x !== y);
    if (a.some((w) => w.length >= 4)) assert.equal(changed.length, 1, `${q} → ${t}`);
    for (const [x, y] of changed) assert.deepEqual([...x].sort(), [...y].sort(), "same letters, new order");
  }
});

test("reformulations change the text and say how; clarifications only append", () => {
  const rng = new Rng(6);
  const kinds = new Set<string>();
  for (let i = 0; i < 200; i++) {
    const q = newTopicQuery(rng);
    const r = reformulate(rng, q);
    kinds.add(r.change);
    assert.notEqual(r.text, q);
    if (r.change === "words_added") assert.ok(r.text.startsWith(`${q} `));
    else assert.equal(r.text.split(" ").length >= q.split(" ").length, true);
    const c = clarify(rng, q);
    assert.ok(c.startsWith(`${q} `) && c.length > q.length + 1);
  }
  assert.deepEqual([...kinds].sort(), ["substitution", "words_added"]);
});

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  acronymOf,
  charNgrams,
  classifyReformulation,
  compactText,
  compareTexts,
  jaccard,
  jaccard3,
  normalizedLevenshtein,
  REFORMULATION_KINDS,
  stem,
  tokenize,
  tokenOverlap,
  type ReformulationKind,
} from "./text.js";

test("tokenize folds case and width and splits on non-word characters", () => {
  assert.deepEqual(tokenize("  Ｎew-York  PIZZA, 2024! "), ["new", "york", "pizza", "2024"]);
  assert.deepEqual(tokenize("?!"), []);
  assert.equal(compactText("E-Mail  login"), "emaillogin");
});

test("normalized Levenshtein divides by the longer folded text", () => {
  assert.equal(normalizedLevenshtein("abc", "ABC"), 0);
  assert.equal(normalizedLevenshtein("kitten", "sitting"), 3 / 7);
  assert.equal(normalizedLevenshtein("", ""), 0);
  assert.equal(normalizedLevenshtein("", "abcd"), 1);
});

test("character 3-grams and Jaccard", () => {
  assert.deepEqual([...charNgrams("abcd")], ["abc", "bcd"]);
  assert.deepEqual([...charNgrams("ab")], ["ab"]);
  assert.equal(charNgrams("").size, 0);
  assert.equal(jaccard(new Set([1, 2, 3]), new Set([2, 3, 4])), 2 / 4);
  assert.equal(jaccard(new Set(), new Set()), 1);
  // "abcd" {abc,bcd} vs "abce" {abc,bce}: 1 shared of 3
  assert.equal(jaccard3("abcd", "abce"), 1 / 3);
  assert.equal(tokenOverlap("red shoes", "red boots"), 1 / 3);
});

test("stem strips common suffixes so inflections meet", () => {
  const pairs: [string, string][] = [
    ["queries", "query"],
    ["running", "run"],
    ["making", "make"],
    ["shoes", "shoe"],
    ["watches", "watch"],
    ["tested", "test"],
    ["quickly", "quick"],
    ["flights", "flight"],
  ];
  for (const [a, b] of pairs) assert.equal(stem(a), stem(b), `${a} / ${b}`);
  assert.notEqual(stem("cats"), stem("dogs"));
  assert.equal(stem("bus"), "bus");
  assert.equal(stem("glass"), "glass");
});

/** One row per kind, each chosen so that no earlier rule applies. */
const TABLE: { prev: string; next: string; kind: ReformulationKind }[] = [
  { prev: "python list sort", next: "Python  List Sort", kind: "same" },
  { prev: "new york pizza", next: "pizza new york", kind: "word_reorder" },
  { prev: "email login", next: "e-mail login", kind: "whitespace_punctuation" },
  { prev: "new york, pizza", next: "new york pizza", kind: "whitespace_punctuation" },
  { prev: "python sort", next: "python sort list by key", kind: "words_added" },
  { prev: "how to sort a python list by key", next: "sort python list", kind: "words_removed" },
  { prev: "running shoes", next: "run shoe", kind: "stemming" },
  { prev: "world health organization covid guidance", next: "who covid guidance", kind: "acronym" },
  { prev: "nasa mission", next: "national aeronautics space administration mission", kind: "acronym" },
  { prev: "univ of washington", next: "university of washington", kind: "abbreviation" },
  { prev: "javascript tutorial", next: "java tutorial", kind: "abbreviation" },
  { prev: "facebook", next: "book", kind: "substring" },
  { prev: "python tut", next: "python tutorial for beginners", kind: "superstring" },
  { prev: "cheap flights paris", next: "cheap hotels paris", kind: "substitution" },
  { prev: "pyhton tutorial", next: "python tutorial", kind: "spelling_correction" },
  { prev: "recieve", next: "receive", kind: "spelling_correction" },
  { prev: "weather in boston", next: "best pasta recipe", kind: "new_topic" },
  { prev: "ab", next: "cd", kind: "new_topic" },
];

test("reformulation taxonomy: every kind, first matching rule wins", () => {
  for (const row of TABLE) {
    assert.equal(classifyReformulation(row.prev, row.next), row.kind, `${row.prev} → ${row.next}`);
  }
  const covered = new Set(TABLE.map((r) => r.kind));
  for (const k of REFORMULATION_KINDS) assert.ok(covered.has(k), `table covers ${k}`);
});

test("rule order: an earlier rule shadows a later one that also applies", () => {
  // Also a superstring ("python sort" ⊂ "python sort list"), but words_added comes first.
  assert.equal(classifyReformulation("python sort", "python sort list"), "words_added");
  // Also within 2 edits ("cat" → "cats"), but stemming comes first.
  assert.equal(classifyReformulation("black cat", "black cats"), "stemming");
  // Also a superstring at character level ("java" ⊂ "javascript"), but abbreviation comes first.
  assert.equal(classifyReformulation("java", "javascript"), "abbreviation");
});

test("spelling_max_edits bounds the spelling rule", () => {
  assert.equal(classifyReformulation("colour theory", "color theory"), "spelling_correction");
  assert.equal(classifyReformulation("colour theory", "color theory", { spelling_max_edits: 0 }), "substitution");
  assert.equal(classifyReformulation("abcdef", "abcxyz", { spelling_max_edits: 3 }), "spelling_correction");
  assert.equal(classifyReformulation("abcdef", "abcxyz"), "new_topic");
});

test("compareTexts gives what the four measures give one by one", () => {
  // Words drawn from a few that share prefixes, stems and initials, in several cases and widths,
  // so every reformulation kind comes up; and arbitrary Unicode besides.
  const word = fc.constantFrom("python", "Python", "ＰＹＴＨＯＮ", "sort", "sorts", "sorting", "list", "lists", "ml", "machine", "learning", "colour", "color", "db", "database", "e-mail", "email", "", " ", "İstanbul", "ﬁle");
  const phrase = fc.oneof(fc.array(word, { maxLength: 5 }).map((w) => w.join(" ")), fc.string({ unit: "grapheme", maxLength: 12 }));
  fc.assert(
    fc.property(phrase, phrase, fc.integer({ min: 0, max: 4 }), (a, b, edits) => {
      const opts = { spelling_max_edits: edits };
      assert.deepEqual(compareTexts(a, b, opts), {
        levenshtein: normalizedLevenshtein(a, b),
        jaccard3: jaccard3(a, b),
        tokenOverlap: tokenOverlap(a, b),
        kind: classifyReformulation(a, b, opts),
      });
    }),
    { numRuns: 2000 },
  );
});

test("acronymOf: initials compared in place, as the run's initials joined", () => {
  // The rule as first written: the run's initials joined into a string, for every position.
  const sortedEqual = (a: readonly string[], b: readonly string[]) => a.length === b.length && [...a].sort().every((v, i) => v === [...b].sort()[i]);
  const reference = (short: readonly string[], long: readonly string[]): boolean => {
    for (let i = 0; i < short.length; i++) {
      const acr = short[i]!;
      const k = acr.length;
      if (k < 2 || !/^\p{L}+$/u.test(acr)) continue;
      for (let j = 0; j + k <= long.length; j++) {
        if (long.slice(j, j + k).map((w) => w[0]).join("") !== acr) continue;
        if (sortedEqual([...short.slice(0, i), ...short.slice(i + 1)], [...long.slice(0, j), ...long.slice(j + k)])) return true;
      }
    }
    return false;
  };
  // Few letters, so that initials line up often; an astral letter and a digit besides.
  const token = fc.oneof(fc.string({ unit: fc.constantFrom("a", "b", "c", "𝒜", "1"), minLength: 1, maxLength: 3 }));
  const tokens = fc.array(token, { maxLength: 6 });
  // Half the cases built to be acronyms (a run of `long` replaced by its initials, the rest
  // shuffled), some of them then spoiled by one changed letter.
  const built = fc.tuple(fc.array(token, { minLength: 2, maxLength: 6 }), fc.nat(), fc.nat(), fc.nat(), fc.boolean()).map(([long, a, b, c, spoil]) => {
    const k = 2 + (a % (long.length - 1));
    const j = b % (long.length - k + 1);
    let acr = long.slice(j, j + k).map((w) => w[0]).join("");
    if (spoil) acr = `${acr.slice(0, -1)}z`;
    const rest = [...long.slice(0, j), ...long.slice(j + k)];
    const short = [...rest];
    short.splice(c % (rest.length + 1), 0, acr);
    return [short.reverse(), long] as const;
  });
  let hits = 0;
  fc.assert(
    fc.property(fc.oneof(fc.tuple(tokens, tokens), built), ([short, long]) => {
      const want = reference(short, long);
      if (want) hits++;
      assert.equal(acronymOf(short, long), want);
    }),
    { numRuns: 5000 },
  );
  assert.ok(hits > 50, `acronyms among the cases: ${hits}`);
});

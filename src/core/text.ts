import levenshtein from "fast-levenshtein";

/**
 * Text-similarity helpers for query reformulation: normalization, tokens, character n-grams,
 * Jaccard, normalized Levenshtein, a tiny suffix stripper, and the reformulation taxonomy of
 * Huang & Efthimiadis (CIKM 2009), reimplemented from the paper's rule descriptions.
 */

const TOKEN_RE = /[\p{L}\p{N}]+/gu;
const NON_WORD_RE = /[^\p{L}\p{N}]+/gu;

/** Case-folded, NFKC-normalized text with runs of whitespace collapsed and the ends trimmed. */
export function foldText(text: string): string {
  return text.normalize("NFKC").toLowerCase().replace(/\s+/gu, " ").trim();
}

/** Word tokens (runs of letters and digits) of the folded text, in order. */
export function tokenize(text: string): string[] {
  return foldText(text).match(TOKEN_RE) ?? [];
}

/** The folded text with everything but letters and digits removed ("e-mail" and "e mail" → "email"). */
export function compactText(text: string): string {
  return foldText(text).replace(NON_WORD_RE, "");
}

/** Levenshtein distance (fast-levenshtein) of the two strings as given. */
export function editDistance(a: string, b: string): number {
  return levenshtein.get(a, b);
}

/** Levenshtein distance of the folded texts divided by the longer one's length: 0 identical … 1 unrelated. */
export function normalizedLevenshtein(a: string, b: string): number {
  const fa = foldText(a);
  const fb = foldText(b);
  return levenshteinShare(fa, fb, editDistance(fa, fb));
}

function levenshteinShare(fa: string, fb: string, dist: number): number {
  const longest = Math.max(fa.length, fb.length);
  return longest === 0 ? 0 : dist / longest;
}

/** Character n-grams of the folded text; a text shorter than n is its own single gram. */
export function charNgrams(text: string, n = 3): Set<string> {
  return gramsOf(foldText(text), n);
}

function gramsOf(s: string, n: number): Set<string> {
  const grams = new Set<string>();
  if (s.length === 0) return grams;
  if (s.length < n) {
    grams.add(s);
    return grams;
  }
  for (let i = 0; i + n <= s.length; i++) grams.add(s.slice(i, i + n));
  return grams;
}

/** Jaccard similarity |A ∩ B| / |A ∪ B|; two empty sets are identical (1). */
export function jaccard<T>(a: ReadonlySet<T>, b: ReadonlySet<T>): number {
  if (a.size === 0 && b.size === 0) return 1;
  let inter = 0;
  for (const x of a) if (b.has(x)) inter++;
  return inter / (a.size + b.size - inter);
}

/** Character-3-gram Jaccard similarity of two texts. */
export function jaccard3(a: string, b: string): number {
  return jaccard(charNgrams(a, 3), charNgrams(b, 3));
}

/** Token overlap: Jaccard similarity of the two texts' token sets. */
export function tokenOverlap(a: string, b: string): number {
  return jaccard(new Set(tokenize(a)), new Set(tokenize(b)));
}

const VOWEL_RE = /[aeiouy]/;
const DOUBLE_KEEP = new Set(["l", "s", "z"]);

/**
 * A tiny suffix stripper (not Porter): plural `ies`/`es`/`s`, `ly`, `ing`, `ed`, then an undoubled
 * final consonant and a dropped final `e`, so that "queries"/"query", "running"/"run",
 * "making"/"make" and "shoes"/"shoe" meet. Both sides of a comparison go through the same
 * rules, so consistency matters more than linguistic accuracy. Expects a folded token.
 */
export function stem(word: string): string {
  let w = word;
  if (w.length <= 3) return w;
  if (w.endsWith("ies") && w.length > 4) w = w.slice(0, -3) + "y";
  else if (w.endsWith("sses")) w = w.slice(0, -2);
  else if (/(?:sh|ch|x|z)es$/.test(w)) w = w.slice(0, -2);
  else if (w.endsWith("s") && !/(?:ss|us|is)$/.test(w)) w = w.slice(0, -1);
  else if (w.endsWith("ly") && w.length > 4) w = w.slice(0, -2);
  else if (w.endsWith("ing") && VOWEL_RE.test(w.slice(0, -3)) && w.length > 5) w = undouble(w.slice(0, -3));
  else if (w.endsWith("ed") && VOWEL_RE.test(w.slice(0, -2)) && w.length > 4) w = undouble(w.slice(0, -2));
  if (w.endsWith("e") && w.length > 3) w = w.slice(0, -1);
  return w;
}

function undouble(w: string): string {
  const last = w[w.length - 1]!;
  return w.length > 2 && last === w[w.length - 2] && !VOWEL_RE.test(last) && !DOUBLE_KEEP.has(last) ? w.slice(0, -1) : w;
}

/**
 * The reformulation kinds, in the fixed order the classifier tries them (Huang & Efthimiadis
 * 2009; their "URL stripped" rule is omitted: queries here are natural-language prompts).
 */
export const REFORMULATION_KINDS = [
  "same",
  "word_reorder",
  "whitespace_punctuation",
  "words_added",
  "words_removed",
  "stemming",
  "acronym",
  "abbreviation",
  "substring",
  "superstring",
  "substitution",
  "spelling_correction",
  "new_topic",
] as const;
export type ReformulationKind = (typeof REFORMULATION_KINDS)[number];

/** Options of `classifyReformulation`. */
export interface ClassifyOptions {
  /** Largest Levenshtein distance (characters) still counted as a spelling correction. @default 2 */
  spelling_max_edits?: number;
}

function sortedEqual(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  const x = [...a].sort();
  const y = [...b].sort();
  return x.every((v, i) => v === y[i]);
}

function sameSequence(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** True when every member of `a` is in `b` and `b` has more. */
function strictSubset(a: ReadonlySet<string>, b: ReadonlySet<string>): boolean {
  if (a.size === 0 || a.size >= b.size) return false;
  for (const x of a) if (!b.has(x)) return false;
  return true;
}

/** `short` has one token that is the initials of a run of ≥ 2 consecutive tokens of `long`, the rest equal. */
export function acronymOf(short: readonly string[], long: readonly string[]): boolean {
  for (let i = 0; i < short.length; i++) {
    const acr = short[i]!;
    const k = acr.length;
    if (k < 2 || !/^\p{L}+$/u.test(acr)) continue;
    for (let j = 0; j + k <= long.length; j++) {
      // The run's initials, compared in place (a run and its initials built for every position were most of a comparison's cost).
      let m = 0;
      while (m < k && long[j + m]![0] === acr[m]) m++;
      if (m < k) continue;
      const restShort = [...short.slice(0, i), ...short.slice(i + 1)];
      const restLong = [...long.slice(0, j), ...long.slice(j + k)];
      if (sortedEqual(restShort, restLong)) return true;
    }
  }
  return false;
}

/** Same number of words, each pair equal or one a prefix of the other, at least one pair abbreviated. */
function abbreviationOf(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length || a.length === 0) return false;
  let abbreviated = false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x === y) continue;
    if (x.startsWith(y) || y.startsWith(x)) abbreviated = true;
    else return false;
  }
  return abbreviated;
}

/**
 * Classifies how `next` changes `prev`, trying the kinds of `REFORMULATION_KINDS` in order and
 * returning the first that applies. Comparison is on folded text (case and Unicode width ignored).
 */
export function classifyReformulation(prev: string, next: string, opts: ClassifyOptions = {}): ReformulationKind {
  return classifyFolded(folded(prev), folded(next), opts.spelling_max_edits ?? 2);
}

/** A text folded once, with the tokens and token set the comparisons read. */
interface Folded {
  text: string;
  tokens: string[];
  set: Set<string>;
}

function folded(text: string): Folded {
  const f = foldText(text);
  const tokens = f.match(TOKEN_RE) ?? [];
  return { text: f, tokens, set: new Set(tokens) };
}

/** What `compareTexts` measures of two texts. */
export interface TextComparison {
  /** `normalizedLevenshtein`. */
  levenshtein: number;
  /** `jaccard3`. */
  jaccard3: number;
  /** `tokenOverlap`. */
  tokenOverlap: number;
  /** `classifyReformulation`. */
  kind: ReformulationKind;
}

/**
 * `normalizedLevenshtein`, `jaccard3`, `tokenOverlap` and `classifyReformulation` of the same two
 * texts, each text folded (NFKC and case, the costly part) and the edit distance computed once
 * instead of once per measure: the same values as the four calls.
 */
export function compareTexts(prev: string, next: string, opts: ClassifyOptions = {}): TextComparison {
  const a = folded(prev);
  const b = folded(next);
  let dist: number | undefined;
  const distance = () => (dist ??= editDistance(a.text, b.text));
  return {
    levenshtein: levenshteinShare(a.text, b.text, distance()),
    jaccard3: jaccard(gramsOf(a.text, 3), gramsOf(b.text, 3)),
    tokenOverlap: jaccard(a.set, b.set),
    kind: classifyFolded(a, b, opts.spelling_max_edits ?? 2, distance),
  };
}

function classifyFolded(fa: Folded, fb: Folded, maxEdits: number, distance = () => editDistance(fa.text, fb.text)): ReformulationKind {
  const a = fa.text;
  const b = fb.text;
  if (a === b) return "same";
  const ta = fa.tokens;
  const tb = fb.tokens;
  if (ta.length > 1 && sortedEqual(ta, tb) && !sameSequence(ta, tb)) return "word_reorder";
  if (a.replace(NON_WORD_RE, "") === b.replace(NON_WORD_RE, "")) return "whitespace_punctuation";
  const sa = fa.set;
  const sb = fb.set;
  if (strictSubset(sa, sb)) return "words_added";
  if (strictSubset(sb, sa)) return "words_removed";
  if (ta.length > 0 && sortedEqual(ta.map(stem), tb.map(stem))) return "stemming";
  if (acronymOf(ta, tb) || acronymOf(tb, ta)) return "acronym";
  if (abbreviationOf(ta, tb)) return "abbreviation";
  if (b.length > 0 && a.includes(b)) return "substring";
  if (a.length > 0 && b.includes(a)) return "superstring";
  const dist = distance();
  const shared = [...sa].some((t) => sb.has(t));
  const bothChanged = [...sa].some((t) => !sb.has(t)) && [...sb].some((t) => !sa.has(t));
  // A spelling-level difference is not a word substitution (there is no thesaurus here): leave it to the next rule.
  if (shared && bothChanged && dist > maxEdits) return "substitution";
  if (dist <= maxEdits && dist < Math.max(a.length, b.length)) return "spelling_correction";
  return "new_topic";
}

import type { Rng } from "./rng.js";

/**
 * Fixed text material for the simulator: words for queries, follow-up phrases and user agents.
 * Lists are written out here rather than drawn from `user-agents` / `crawler-user-agents`:
 * those packages are not seedable (Math.random) and their data changes between releases, which
 * would break "same seed → same bytes" across installs.
 */

/** Words that make up topical queries. */
export const TOPIC_WORDS = [
  "python", "javascript", "typescript", "rust", "golang", "java", "sql", "postgres", "redis", "kafka",
  "docker", "kubernetes", "linux", "bash", "git", "regex", "json", "yaml", "csv", "excel",
  "sort", "merge", "parse", "convert", "install", "configure", "deploy", "debug", "optimize", "test",
  "list", "dictionary", "array", "string", "date", "timezone", "unicode", "memory", "thread", "async",
  "function", "class", "module", "package", "error", "exception", "timeout", "connection", "certificate", "password",
  "recipe", "bread", "pasta", "vegetarian", "dinner", "oven", "flight", "hotel", "visa", "train",
  "budget", "invoice", "tax", "mortgage", "loan", "salary", "resume", "interview", "email", "meeting",
  "summary", "essay", "poem", "letter", "translate", "spanish", "german", "french", "grammar", "synonym",
  "weather", "marathon", "training", "knee", "sleep", "coffee", "garden", "tomato", "bicycle", "battery",
  "laptop", "monitor", "keyboard", "printer", "router", "wifi", "bluetooth", "camera", "phone", "backup",
  "history", "physics", "chemistry", "algebra", "calculus", "probability", "statistics", "regression", "matrix", "vector",
] as const;

/** Leading words that make a query read like a question. */
export const QUERY_STARTERS = ["how to", "what is", "why does", "best way to", "example of", "", "", ""] as const;

/** Context a clarifying follow-up adds to the previous query (not a sign of dissatisfaction). */
export const CLARIFICATIONS = [
  "in python", "for beginners", "on windows", "on mac", "step by step", "with an example",
  "in under 100 words", "for a team of five", "without libraries", "in detail", "for production", "in 2026",
] as const;

/** Word substitutions a user tries when a query did not work. */
export const SUBSTITUTES: Readonly<Record<string, readonly string[]>> = {
  sort: ["order", "rank"],
  merge: ["combine", "join"],
  convert: ["transform", "change"],
  install: ["setup", "add"],
  debug: ["fix", "troubleshoot"],
  error: ["problem", "failure"],
  optimize: ["speed up", "improve"],
  list: ["collection", "sequence"],
  summary: ["overview", "abstract"],
  translate: ["convert", "render"],
  recipe: ["dish", "meal"],
  laptop: ["notebook", "computer"],
};

/** Fake PII a few queries contain, so enrich's redaction has something to do. */
export const PII_SNIPPETS = [
  "my email is jane.doe@example.com",
  "call me at +1 415 555 0134",
  "card 4111 1111 1111 1111 was declined",
  "contact j.smith42@example.org",
] as const;

/** Realistic desktop browser user agents (none matched by isbot). */
export const DESKTOP_BROWSER_UAS = [
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.6; rv:132.0) Gecko/20100101 Firefox/132.0",
  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
  "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/129.0.0.0 Safari/537.36 OPR/115.0.0.0",
  "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
] as const;

/** Realistic mobile and tablet browser user agents (none matched by isbot). */
export const MOBILE_BROWSER_UAS = [
  "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36",
  "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
  "Mozilla/5.0 (Linux; Android 13; moto g power (2023)) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Mobile Safari/537.36",
  "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.7 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
] as const;

/** Crawler and HTTP-library user agents (every one matched by isbot). */
export const CRAWLER_UAS = [
  "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
  "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
  "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
  "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
  "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
  "Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)",
  "python-requests/2.32.3",
  "curl/8.5.0",
  "Go-http-client/1.1",
  "Scrapy/2.11.2 (+https://scrapy.org)",
  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
] as const;

/** A fresh query on a new topic: an optional starter and 2–4 topic words. */
export function newTopicQuery(rng: Rng): string {
  const starter = rng.pick(QUERY_STARTERS);
  const n = rng.int(2, 4);
  const words: string[] = [];
  while (words.length < n) {
    const w = rng.pick(TOPIC_WORDS);
    if (!words.includes(w)) words.push(w);
  }
  return [starter, ...words].filter((s) => s !== "").join(" ");
}

/** Introduces a typo: two adjacent letters of one word of four letters or more swapped. */
export function withTypo(rng: Rng, text: string): string {
  const words = text.split(" ");
  const candidates = words.map((w, i) => [w, i] as const).filter(([w]) => w.length >= 4 && /^[a-z]+$/.test(w));
  if (candidates.length === 0) return text;
  const [word, idx] = rng.pick(candidates);
  // Swap two differing adjacent letters so the typo always changes the word.
  const positions: number[] = [];
  for (let i = 1; i < word.length - 1; i++) if (word[i] !== word[i + 1]) positions.push(i);
  if (positions.length === 0) return text;
  const p = rng.pick(positions);
  words[idx] = word.slice(0, p) + word[p + 1] + word[p] + word.slice(p + 2);
  return words.join(" ");
}

/** The kinds of follow-up query the simulator produces (truth for reformulation-similarity). */
export type QueryChange = "first" | "new_topic" | "spelling_fix" | "words_added" | "substitution" | "clarification";

/** A reformulation after an unsatisfying answer: words added, or one word substituted. */
export function reformulate(rng: Rng, text: string): { text: string; change: "words_added" | "substitution" } {
  const words = text.split(" ");
  const substitutable = words.map((w, i) => [w, i] as const).filter(([w]) => SUBSTITUTES[w] !== undefined);
  if (substitutable.length > 0 && rng.chance(0.5)) {
    const [w, i] = rng.pick(substitutable);
    words[i] = rng.pick(SUBSTITUTES[w]!);
    return { text: words.join(" "), change: "substitution" };
  }
  if (rng.chance(0.3) && words.length > 1) {
    const i = rng.int(0, words.length - 1);
    let replacement = rng.pick(TOPIC_WORDS) as string;
    if (replacement === words[i]) replacement = `${replacement}s`;
    words[i] = replacement;
    return { text: words.join(" "), change: "substitution" };
  }
  const added = rng.int(1, 2);
  for (let k = 0; k < added; k++) words.push(rng.pick(TOPIC_WORDS));
  return { text: words.join(" "), change: "words_added" };
}

/** A clarifying follow-up: the previous query plus context. */
export function clarify(rng: Rng, text: string): string {
  return `${text} ${rng.pick(CLARIFICATIONS)}`;
}

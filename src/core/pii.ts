import { isIPv6 } from "node:net";

/**
 * PII redaction for free text: e-mail addresses, phone numbers, payment card numbers and IP
 * addresses are replaced by `[email]`, `[phone]`, `[card]`, `[ip]`.
 *
 * The matchers lean towards redacting (a false positive costs a little label signal, a false
 * negative leaks PII into streams and Redis) but avoid the numbers that are common in queries
 * and carry no identity: years, counts, dates, times, versions, prices, epoch timestamps.
 */

/** The kinds of PII that are redacted. */
export type PiiKind = "email" | "phone" | "card" | "ip";

/** Which kinds to redact (all by default). */
export interface RedactKinds {
  emails?: boolean;
  phones?: boolean;
  cards?: boolean;
  ips?: boolean;
}

/** The redacted text and the kinds that were found in it (in the order email, card, ip, phone). */
export interface Redaction {
  text: string;
  found: PiiKind[];
}

/** Placeholder written in place of each kind. */
export const PII_PLACEHOLDER: Readonly<Record<PiiKind, string>> = {
  email: "[email]",
  phone: "[phone]",
  card: "[card]",
  ip: "[ip]",
};

// A match must not start or end inside a longer token (ids, hashes, UUIDs, decimals, versions).
const NOT_AFTER = String.raw`(?<![\p{L}\p{N}_.+\-/@])`;
// A following ":digit" marks a time ("2024-01-15 10:30"), not the end of a number.
const NOT_BEFORE = String.raw`(?![\p{L}\p{N}_]|[.\-/:]\p{N})`;

const EMAIL_RE = new RegExp(
  String.raw`(?<![\p{L}\p{N}_.+\-])[\p{L}\p{N}_%+\-]+(?:\.[\p{L}\p{N}_%+\-]+)*@[\p{L}\p{N}](?:[\p{L}\p{N}\-]*[\p{L}\p{N}])?(?:\.[\p{L}\p{N}](?:[\p{L}\p{N}\-]*[\p{L}\p{N}])?)*\.\p{L}{2,}(?![\p{L}\p{N}_\-])`,
  "gu",
);

// 13–19 digits, optionally grouped by single spaces or dashes; issuer prefixes start with 2–6.
const CARD_RE = new RegExp(String.raw`${NOT_AFTER}[2-6]\d(?:[ \-]?\d){11,17}${NOT_BEFORE}`, "gu");

const OCTET = String.raw`(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)`;
const IPV4_RE = new RegExp(String.raw`(?<![\p{L}\p{N}_.])${OCTET}(?:\.${OCTET}){3}(?![\p{L}\p{N}_]|\.\p{N})`, "gu");
// Candidates only; `isIPv6` decides. The dotted-quad tail must be tried before a hex group.
const IPV6_RE = new RegExp(
  String.raw`(?<![\p{L}\p{N}_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})(?:%[0-9A-Za-z]+)?(?![\p{L}\p{N}_:]|\.\p{N})`,
  "gu",
);

// Phone shapes, each validated by digit count afterwards (see isPhone).
const PHONE_RES: { re: RegExp; min: number; max: number }[] = [
  // International: +<country code> then groups, e.g. +44 20 7946 0958, +1 (555) 123-4567, +33612345678.
  // Separators are mandatory between plain digit groups: optional ones would let a long digit
  // run split in exponentially many ways while the regex backtracks.
  {
    re: new RegExp(String.raw`(?<![\p{L}\p{N}_+])\+[1-9]\d{0,2}(?:[ .\-]?\(\d{1,5}\))?[ .\-]?\d{1,14}(?:[ .\-]\d{1,14}){0,5}(?![\p{L}\p{N}_]|[.\-/]\p{N})`, "gu"),
    min: 8,
    max: 15,
  },
  // Parenthesized area code: (555) 123-4567, (030) 1234 5678.
  { re: new RegExp(String.raw`(?<![\p{L}\p{N}_])\(\d{2,5}\)[ .\-]?\d{3,4}[ .\-]?\d{3,5}${NOT_BEFORE}`, "gu"), min: 9, max: 13 },
  // Three or more groups of 2–4 digits: 555-123-4567, 06 12 34 56 78, 020 7946 0958, 612 345 678.
  { re: new RegExp(String.raw`${NOT_AFTER}\d{2,4}(?:[ .\-]\d{2,4}){2,4}${NOT_BEFORE}`, "gu"), min: 9, max: 12 },
  // Trunk prefix 0 and two groups: 030 1234567, 0171-1234567.
  { re: new RegExp(String.raw`${NOT_AFTER}0\d{1,4}[ .\-]\d{4,8}${NOT_BEFORE}`, "gu"), min: 9, max: 12 },
  // Trunk prefix 0, no separators: 0612345678, 07911123456.
  { re: new RegExp(String.raw`${NOT_AFTER}0\d{9,10}${NOT_BEFORE}`, "gu"), min: 10, max: 11 },
  // Local seven digits with a dash (exchange codes start with 2–9): 555-1234.
  { re: new RegExp(String.raw`${NOT_AFTER}[2-9]\d{2}-\d{4}${NOT_BEFORE}`, "gu"), min: 7, max: 7 },
];

// Shapes that look like phone numbers but are far more often something else.
const DATE_LIKE = /^(?:\d{4}[.\-/ ]\d{1,2}[.\-/ ]\d{1,2}|\d{1,2}[.\-/ ]\d{1,2}[.\-/ ]\d{2,4})$/;
// European thousands grouping with dots: 123.456.789.
const DOT_THOUSANDS = /^\d{1,3}(?:\.\d{3})+$/;
// The tail of a number grouped in thousands ("1 000 000 000" seen from its second group).
const THOUSANDS_TAIL = /^\d{3}(?:[ .]\d{3})+$/;

function digitsOf(s: string): string {
  return s.replace(/\D/g, "");
}

/** True when the digit string passes the Luhn checksum (payment cards). */
export function luhnValid(digits: string): boolean {
  let sum = 0;
  let double = false;
  for (let i = digits.length - 1; i >= 0; i--) {
    let d = digits.charCodeAt(i) - 48;
    if (d < 0 || d > 9) return false;
    if (double) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
    double = !double;
  }
  return digits.length > 0 && sum % 10 === 0;
}

const MIN_CARD_DIGITS = 13;
const MAX_CARD_DIGITS = 19;
const MIN_PHONE_DIGITS = Math.min(...PHONE_RES.map((p) => p.min));
const MIN_IPV4_DIGITS = 4;

/** The number of ASCII digits in `s` (what `\d` matches in these patterns). */
function countDigits(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 48 && c <= 57) n++;
  }
  return n;
}

function isCardNumber(candidate: string): boolean {
  const d = digitsOf(candidate);
  if (d.length < MIN_CARD_DIGITS || d.length > MAX_CARD_DIGITS) return false;
  // A run of one repeated digit passes Luhn for some lengths but is never a card.
  if (/^(\d)\1+$/.test(d)) return false;
  return luhnValid(d);
}

/**
 * The card in a candidate, which may have swallowed a following number ("4111 1111 1111 1111 2"):
 * the longest valid prefix that ends at a group boundary, with the rest kept.
 */
function redactCard(candidate: string): string | null {
  if (isCardNumber(candidate)) return PII_PLACEHOLDER.card;
  for (let end = candidate.length - 1; end > 0; end--) {
    if (!/[ \-]/.test(candidate[end]!)) continue;
    const prefix = candidate.slice(0, end);
    if (isCardNumber(prefix)) return PII_PLACEHOLDER.card + candidate.slice(end);
  }
  return null;
}

function isIp6(candidate: string): boolean {
  const addr = candidate.split("%")[0]!;
  return /[0-9A-Fa-f]/.test(addr) && isIPv6(addr);
}

function isPhone(candidate: string, min: number, max: number, before: string): boolean {
  const n = digitsOf(candidate).length;
  if (n < min || n > max) return false;
  if (!candidate.startsWith("+") && !candidate.startsWith("(")) {
    if (DATE_LIKE.test(candidate) || DOT_THOUSANDS.test(candidate)) return false;
    if (/\d[ .]$/.test(before) && THOUSANDS_TAIL.test(candidate)) return false;
  }
  return true;
}

/**
 * Replaces every match of `re` for which `replace` returns a string (null keeps the match).
 * `before` is the text just before the match (lookbehind can only see one character class).
 */
function replaceWith(text: string, re: RegExp, replace: (m: string, before: string) => string | null): { text: string; hit: boolean } {
  let hit = false;
  const out = text.replace(re, (m: string, ...rest: unknown[]) => {
    const offset = rest[rest.length - 2] as number;
    const r = replace(m, text.slice(Math.max(0, offset - 2), offset));
    if (r === null) return m;
    hit = true;
    return r;
  });
  return { text: out, hit };
}

function replaceAll(text: string, re: RegExp, accept: (m: string) => boolean, placeholder: string): { text: string; hit: boolean } {
  return replaceWith(text, re, (m) => (accept(m) ? placeholder : null));
}

/**
 * Redacts PII in `text`. Order matters: e-mails first (their digits must not become phones),
 * cards before phones (a grouped card number also has a phone's shape), IPs before phones
 * (dotted quads).
 */
export function redactPii(text: string, kinds: RedactKinds = {}): Redaction {
  const found: PiiKind[] = [];
  let t = text;
  const step = (kind: PiiKind, enabled: boolean | undefined, run: (s: string) => { text: string; hit: boolean }): void => {
    if (enabled === false) return;
    const r = run(t);
    t = r.text;
    if (r.hit && !found.includes(kind)) found.push(kind);
  };
  // Cheap guards keep the common case (few digits, no @) fast. Each step only removes digits, so
  // the count in the original text bounds every later candidate's.
  const digits = countDigits(t);
  step("email", kinds.emails, (s) => (s.includes("@") ? replaceAll(s, EMAIL_RE, () => true, PII_PLACEHOLDER.email) : { text: s, hit: false }));
  if (digits >= MIN_CARD_DIGITS) step("card", kinds.cards, (s) => replaceWith(s, CARD_RE, redactCard));
  step("ip", kinds.ips, (s) => {
    let hit = false;
    if (s.includes(":")) {
      const r6 = replaceAll(s, IPV6_RE, isIp6, PII_PLACEHOLDER.ip);
      s = r6.text;
      hit = r6.hit;
    }
    if (digits >= MIN_IPV4_DIGITS) {
      const r4 = replaceAll(s, IPV4_RE, () => true, PII_PLACEHOLDER.ip);
      s = r4.text;
      hit ||= r4.hit;
    }
    return { text: s, hit };
  });
  if (digits >= MIN_PHONE_DIGITS) {
    step("phone", kinds.phones, (s) => {
      let hit = false;
      for (const { re, min, max } of PHONE_RES) {
        const r = replaceWith(s, re, (m, before) => (isPhone(m, min, max, before) ? PII_PLACEHOLDER.phone : null));
        s = r.text;
        hit ||= r.hit;
      }
      return { text: s, hit };
    });
  }
  return { text: t, found };
}

/**
 * NATS subject syntax: tokens separated by `.`; in filters `*` matches exactly one token and
 * `>` (last token only) matches one or more.
 */

/** A literal subject token: non-empty, no whitespace, no `.`, and not a wildcard. */
export function isSubjectToken(token: string): boolean {
  return token.length > 0 && !/[\s.*>]/.test(token);
}

/** A subject or subject filter: valid tokens, `*` anywhere, `>` only last. */
export function isValidSubject(subject: string, allowWildcards = true): boolean {
  const tokens = subject.split(".");
  return tokens.every((t, i) => {
    if (allowWildcards && t === "*") return true;
    if (allowWildcards && t === ">") return i === tokens.length - 1;
    return isSubjectToken(t);
  });
}

/**
 * Whether some subject matches both filters. Two streams whose filters overlap cannot coexist on
 * one server (JetStream refuses the second), and a stage whose output overlaps its input loops.
 */
export function subjectsOverlap(a: string, b: string): boolean {
  const ta = a.split(".");
  const tb = b.split(".");
  const n = Math.min(ta.length, tb.length);
  for (let i = 0; i < n; i++) {
    const x = ta[i]!;
    const y = tb[i]!;
    // `>` needs at least one token, which the other side has at position i.
    if (x === ">" || y === ">") return true;
    if (x !== y && x !== "*" && y !== "*") return false;
  }
  return ta.length === tb.length;
}

import { ConfigError } from "./errors.js";

const UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION_RE = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;

/** JSON Schema fragment for a duration given as `250ms`, `30s`, `30m`, `2h`, `7d`. */
export const DURATION_SCHEMA = { type: "string", pattern: "^\\d+(\\.\\d+)?(ms|s|m|h|d)$" } as const;

/** Parses a duration string (`30m`) or a number of milliseconds into milliseconds. The one place durations are parsed. */
export function parseDuration(value: string | number, field = "duration"): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value) || value < 0) throw new ConfigError(`${field}: ${value} is not a non-negative number of ms`);
    return value;
  }
  const m = DURATION_RE.exec(value.trim());
  if (!m) throw new ConfigError(`${field}: "${value}" is not a duration (use e.g. 250ms, 30s, 30m, 2h, 7d)`);
  return Math.round(Number(m[1]) * UNITS_MS[m[2]!]!);
}

/** Formats milliseconds compactly for humans (`1h30m`, `250ms`). */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const parts: string[] = [];
  let rest = Math.round(ms / 1000);
  for (const [unit, secs] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]] as const) {
    if (rest >= secs) {
      parts.push(`${Math.floor(rest / secs)}${unit}`);
      rest %= secs;
    }
  }
  return parts.join("");
}

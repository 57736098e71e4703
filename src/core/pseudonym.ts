import { createHmac } from "node:crypto";
import { LRUCache } from "lru-cache";
import { ConfigError } from "./errors.js";

/** A pseudonymization key: the secret and the version recorded on every event it pseudonymizes. */
export interface PseudonymKey {
  version: string;
  secret: string;
}

/** Length of a pseudonym: 22 base64url characters = 132 bits of the HMAC. */
export const PSEUDONYM_LENGTH = 22;

/** Shortest secret considered strong: a short HMAC key lets anyone brute-force user ids back. */
export const MIN_SECRET_LENGTH = 16;

/** Version recorded for a bare secret (one without a `<version>:` prefix). */
export const BARE_KEY_VERSION = "v0";

/**
 * The development key (`tacit demo`, tests with `devMode`). Its version, `dev`, marks every
 * event pseudonymized with it, so such data is recognisable and never mistaken for production.
 */
export const DEV_PSEUDONYM_KEY: PseudonymKey = { version: "dev", secret: "tacit-development-pseudonym-key-not-secret" };

const VERSIONED_RE = /^([A-Za-z0-9_.-]{1,32}):(.*)$/s;

/**
 * Parses a key as given in the environment: `<version>:<secret>` (e.g. `k2:9f…`) or a bare secret
 * (version `v0`). The secret is used as its UTF-8 bytes. `source` names the variable in errors.
 */
export function parsePseudonymKey(raw: string, source = "pseudonym key"): PseudonymKey {
  const trimmed = raw.trim();
  const m = VERSIONED_RE.exec(trimmed);
  const key: PseudonymKey = m ? { version: m[1]!, secret: m[2]! } : { version: BARE_KEY_VERSION, secret: trimmed };
  if (key.secret.length === 0) throw new ConfigError(`${source}: the secret is empty (set it as "<version>:<secret>", e.g. "k1:…")`);
  return key;
}

/** Why a key is weak (shorter than MIN_SECRET_LENGTH), for a warning; undefined when it is not. */
export function weakKeyReason(key: PseudonymKey): string | undefined {
  if (key.secret.length >= MIN_SECRET_LENGTH) return undefined;
  return `the pseudonymization secret is ${key.secret.length} characters; use at least ${MIN_SECRET_LENGTH} (e.g. openssl rand -base64 32) or user ids can be brute-forced back from pseudonyms`;
}

/** The pseudonym of a user id: HMAC-SHA256(secret, user_id), base64url, first 22 characters. */
export function pseudonymize(key: PseudonymKey, userId: string): string {
  return createHmac("sha256", key.secret).update(userId, "utf8").digest("base64url").slice(0, PSEUDONYM_LENGTH);
}

/** Entries a {@link PseudonymCache} keeps unless told otherwise. @default 10000 */
export const DEFAULT_PSEUDONYM_CACHE_ENTRIES = 10_000;

/**
 * {@link pseudonymize} with a bounded LRU of recent results. An HMAC costs about 2 µs, the most
 * of any step of enrich, and the same few thousand users send most events, so a worker hashes
 * each active user once instead of once per event. The bound is in entries (a few hundred bytes
 * each for ids of e-mail length, so 10,000 stay within a few MB): room for the users active in
 * recent batches, while a flood of distinct ids only evicts and never grows the heap. The raw
 * user ids stay in this worker's memory as long as their entries, and never leave the process.
 *
 * Entries are keyed by key version and user id, and a hit also requires the same secret, so a
 * rotated key (or a reused version with a new secret) never gets a pseudonym of the old key.
 */
export class PseudonymCache {
  private readonly lru: LRUCache<string, { secret: string; pseudonym: string }>;

  constructor(maxEntries = DEFAULT_PSEUDONYM_CACHE_ENTRIES) {
    this.lru = new LRUCache({ max: maxEntries });
  }

  /** The pseudonym of `userId` under `key`, exactly as {@link pseudonymize} computes it. */
  pseudonymize(key: PseudonymKey, userId: string): string {
    // Length-prefixed, so no version/user id pair can spell another's cache key.
    const k = `${key.version.length}:${key.version}${userId}`;
    const hit = this.lru.get(k);
    if (hit !== undefined && hit.secret === key.secret) return hit.pseudonym;
    const pseudonym = pseudonymize(key, userId);
    this.lru.set(k, { secret: key.secret, pseudonym });
    return pseudonym;
  }

  /** Entries held now (never more than the bound). */
  get size(): number {
    return this.lru.size;
  }

  /** The bound in entries. */
  get maxEntries(): number {
    return this.lru.max;
  }
}

/**
 * The key from the environment variable `envVar`. When it is unset: in dev mode the fixed
 * development key (the caller warns), otherwise a ConfigError naming the variable.
 */
export function resolvePseudonymKey(
  env: Readonly<Record<string, string | undefined>>,
  envVar: string,
  devMode: boolean,
): { key: PseudonymKey; dev: boolean } {
  const raw = env[envVar];
  if (raw === undefined || raw.trim() === "") {
    if (devMode) return { key: DEV_PSEUDONYM_KEY, dev: true };
    throw new ConfigError(
      `the pseudonymization key is missing: set the environment variable ${envVar} to "<version>:<secret>" ` +
        `(e.g. ${envVar}=k1:$(openssl rand -base64 32)); only dev mode falls back to a built-in key`,
    );
  }
  return { key: parsePseudonymKey(raw, envVar), dev: false };
}

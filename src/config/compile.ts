import { readFileSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { parseDuration } from "../core/duration.js";
import { errorMessage } from "../core/errors.js";
import { expandString } from "./overrides.js";
import type { Problem } from "./problems.js";
import type { DocPath, SourceMap } from "./source.js";
import type { Pipeline, PipelineFile, Stage, TlsFiles } from "./types.js";

/**
 * PipelineFile (validated, defaults applied) → Pipeline: durations in ms, secrets read from their
 * files and environment variables, file paths made absolute (relative to the pipeline file).
 */

type Env = Readonly<Record<string, string | undefined>>;

/** A URL with `user:password@` written literally (not through `${…}`). */
const PASSWORD_IN_URL = /^[a-z][a-z0-9+.-]*:\/\/[^/@\s]*:[^/@\s]+@/i;

/**
 * Checks of the connection settings that hold whatever the environment: no password in clear in
 * a URL, and one authentication method at a time.
 */
export function checkConnections(data: PipelineFile, sm: SourceMap): Problem[] {
  const problems: Problem[] = [];
  const at = (path: DocPath, message: string, hint?: string): void => {
    problems.push({ file: sm.file, ...sm.locate(path), message, ...(hint ? { hint } : {}), path: path.join(".") });
  };
  for (const [section, env] of [["nats", "NATS_URL"], ["redis", "REDIS_URL"]] as const) {
    const node = sm.node([section, "url"]) as { value?: unknown } | undefined;
    if (!node || typeof node.value !== "string") continue;
    // Judge what is written in the file: a password reaching the URL through ${VAR} is fine.
    const written = (sm.expandedFrom.get(node as object) ?? node.value).replace(/\$\{[^}]*\}/g, "");
    if (written.split(",").some((u) => PASSWORD_IN_URL.test(u.trim()))) {
      at([section, "url"], `${section}.url carries a password in clear`, `remove it from the URL and use ${section}.password_env or ${section}.password_file (or pass the whole URL in ${env})`);
    }
  }
  const n = data.nats ?? {};
  const methods = [
    n.password_file !== undefined || n.password_env !== undefined ? "user/password" : undefined,
    n.token_file !== undefined || n.token_env !== undefined ? "token" : undefined,
    n.nkey_seed_file !== undefined ? "nkey" : undefined,
    n.creds_file !== undefined ? "creds file" : undefined,
  ].filter((m): m is string => m !== undefined);
  if (methods.length > 1) at(["nats"], `nats: choose one authentication method, not ${methods.join(" and ")}`);
  const pairs: [string, unknown, unknown][] = [
    ["nats.password", n.password_file, n.password_env],
    ["nats.token", n.token_file, n.token_env],
    ["redis.password", data.redis?.password_file, data.redis?.password_env],
  ];
  for (const [what, file, env] of pairs) {
    if (file !== undefined && env !== undefined) {
      const [section, field] = what.split(".") as [string, string];
      at([section, `${field}_env`], `${what}: give ${field}_file or ${field}_env, not both`);
    }
  }
  // A clear-text `password:` is already reported as an unknown field; do not also call it missing.
  const clearText = "password" in n || "token" in n;
  if ((n.password_file !== undefined || n.password_env !== undefined) && n.user === undefined) {
    at(["nats"], "nats: a password is configured without a user", "add nats.user");
  }
  if (n.user !== undefined && n.password_file === undefined && n.password_env === undefined && !clearText) {
    at(["nats", "user"], "nats.user is set without a password", "add nats.password_env or nats.password_file");
  }
  return problems;
}

export interface CompileOptions {
  env: Env;
  /** Read secret files and variables (false: leave them unset and only check the shape). */
  secrets: boolean;
  /** Each stage's validated config (defaults applied), by index. */
  configs: Record<string, unknown>[];
}

/** Compiles a valid PipelineFile; problems are secrets that cannot be read. */
export function compilePipeline(data: PipelineFile, sm: SourceMap, opts: CompileOptions): { pipeline: Pipeline; problems: Problem[] } {
  const problems: Problem[] = [];
  const base = dirname(resolve(sm.file));
  const at = (path: DocPath, message: string, hint?: string): void => {
    problems.push({ file: sm.file, ...sm.locate(path), message, ...(hint ? { hint } : {}), path: path.join(".") });
  };
  const path = (p: string): string => (isAbsolute(p) ? p : resolve(base, p));
  const fromFile = (field: DocPath, file: string | undefined): string | undefined => {
    if (file === undefined || !opts.secrets) return undefined;
    try {
      const text = readFileSync(path(file), "utf8").replace(/\r?\n$/, "");
      if (text === "") at(field, `${field.join(".")}: ${file} is empty`);
      return text;
    } catch (err) {
      at(field, `${field.join(".")}: cannot read ${file}: ${errorMessage(err)}`, "the path is relative to the pipeline file's directory");
      return undefined;
    }
  };
  const fromEnv = (field: DocPath, name: string | undefined): string | undefined => {
    if (name === undefined || !opts.secrets) return undefined;
    const v = opts.env[name];
    if (v === undefined || v === "") at(field, `${field.join(".")}: environment variable ${name} is not set`, `export ${name}, or run validate with --skip-secrets`);
    return v;
  };
  const mustExist = (field: DocPath, file: string | undefined): string | undefined => {
    if (file === undefined) return undefined;
    const abs = path(file);
    if (opts.secrets) {
      try {
        readFileSync(abs);
      } catch (err) {
        at(field, `${field.join(".")}: cannot read ${file}: ${errorMessage(err)}`, "the path is relative to the pipeline file's directory");
      }
    }
    return abs;
  };
  // Defaults such as "${NATS_URL:-nats://127.0.0.1:4222}" never went through the document's expansion.
  const url = (field: DocPath, value: string): string => (sm.has(field) ? value : expandString(value, opts.env).value);
  const ms = (field: DocPath, value: string): number => {
    try {
      return parseDuration(value, field.join("."));
    } catch (err) {
      at(field, errorMessage(err));
      return 0;
    }
  };

  const n = data.nats ?? {};
  const nats: Pipeline["nats"] = { url: url(["nats", "url"], n.url!) };
  if (n.user !== undefined) nats.user = n.user;
  const password = fromFile(["nats", "password_file"], n.password_file) ?? fromEnv(["nats", "password_env"], n.password_env);
  if (password !== undefined) nats.password = password;
  const token = fromFile(["nats", "token_file"], n.token_file) ?? fromEnv(["nats", "token_env"], n.token_env);
  if (token !== undefined) nats.token = token;
  const seed = fromFile(["nats", "nkey_seed_file"], n.nkey_seed_file);
  if (seed !== undefined) nats.nkey_seed = seed;
  const creds = mustExist(["nats", "creds_file"], n.creds_file);
  if (creds !== undefined) nats.creds_file = creds;
  const tlsFiles = (section: "nats" | "redis", given: TlsFiles): TlsFiles => {
    const tls: TlsFiles = {};
    for (const k of ["ca_file", "cert_file", "key_file"] as const) {
      const f = mustExist([section, "tls", k], given[k]);
      if (f !== undefined) tls[k] = f;
    }
    if ((tls.cert_file === undefined) !== (tls.key_file === undefined)) at([section, "tls"], `${section}.tls: cert_file and key_file go together`, "give both for mutual TLS, or neither");
    return tls;
  };
  if (n.tls) nats.tls = tlsFiles("nats", n.tls);

  const r = data.redis ?? {};
  const redisUrl = url(["redis", "url"], r.url!);
  const redisTls = typeof r.tls === "object" ? tlsFiles("redis", r.tls) : r.tls === true || redisUrl.startsWith("rediss://") ? {} : false;
  const redis: Pipeline["redis"] = { url: redisUrl, tls: redisTls, replica_wait_ms: ms(["redis", "replica_wait"], r.replica_wait!) };
  const redisPassword = fromFile(["redis", "password_file"], r.password_file) ?? fromEnv(["redis", "password_env"], r.password_env);
  if (redisPassword !== undefined) redis.password = redisPassword;

  const s = data.streams!;
  const rt = data.runtime!;
  const et = data.event_time!;
  const stages: Stage[] = data.stages.map((st, i) => ({
    name: st.name,
    operator: st.operator,
    fuse_with_previous: st.fuse_with_previous === true,
    config: opts.configs[i] ?? st.config ?? {},
    line: sm.locate(["stages", i]).line,
  }));
  const pipeline: Pipeline = {
    version: 1,
    name: data.name,
    subject_prefix: data.subject_prefix ?? data.name,
    file: sm.file,
    nats,
    redis,
    partitions: data.partitions!,
    streams: {
      max_age_ms: ms(["streams", "max_age"], s.max_age!),
      duplicate_window_ms: ms(["streams", "duplicate_window"], s.duplicate_window!),
      replicas: s.replicas!,
      max_bytes: s.max_bytes!,
    },
    runtime: {
      batch_size: rt.batch_size!,
      max_deliver: rt.max_deliver!,
      ack_wait_ms: ms(["runtime", "ack_wait"], rt.ack_wait!),
      retry_backoff_ms: rt.retry_backoff!.map((d, i) => ms(["runtime", "retry_backoff", i], d)),
      lease_ttl_ms: ms(["runtime", "lease_ttl"], rt.lease_ttl!),
      max_event_bytes: rt.max_event_bytes!,
      max_in_flight: rt.max_in_flight!,
      state_cache: { max_entries: rt.state_cache!.max_entries! },
      commit_interval_ms: ms(["runtime", "commit_interval"], rt.commit_interval!),
      threads: rt.threads!,
    },
    event_time: {
      max_out_of_orderness_ms: ms(["event_time", "max_out_of_orderness"], et.max_out_of_orderness!),
      idle_timeout_ms: ms(["event_time", "idle_timeout"], et.idle_timeout!),
    },
    stages,
  };
  if (data.description !== undefined) pipeline.description = data.description;
  return { pipeline, problems };
}

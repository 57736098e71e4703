import type { Command } from "commander";
import { ConfigError } from "../core/errors.js";
import { pseudonymize, resolvePseudonymKey } from "../core/pseudonym.js";
import { FEATURE_ENTITIES, FEATURE_FIELDS, readFeatures, type FeatureEntity, type FeatureRecord } from "../labels/features.js";
import { RedisStateStore, openPipelineRedis } from "../state/redis.js";
import { action, effectiveEnv, loadForCli, pipelineCommand, type PipelineOptions } from "./common.js";

/** The environment variable enrich reads the pseudonymization key from unless its config says otherwise. */
const DEFAULT_KEY_ENV = "TACIT_PSEUDONYM_KEY";

interface FeaturesFlags extends PipelineOptions {
  rawUser?: string;
}

/** The meaning of a stored field, from the documented list (`count_<event_type>` patterns included). */
export function fieldMeaning(entity: FeatureEntity, field: string): string | undefined {
  for (const f of FEATURE_FIELDS) {
    if (f.entity !== entity) continue;
    if (f.name === field) return f.meaning;
    if (f.name.endsWith("<event_type>") && field.startsWith(f.name.slice(0, -"<event_type>".length))) return f.meaning;
  }
  return undefined;
}

/** Human-readable features: one field per line, value, and what it means. */
export function formatFeatures(rec: FeatureRecord): string {
  const names = Object.keys(rec.fields);
  const width = Math.max(0, ...names.map((n) => n.length));
  const values = names.map((n) => {
    const v = rec.fields[n]!;
    return typeof v === "number" && !Number.isInteger(v) ? String(Math.round(v * 10_000) / 10_000) : String(v);
  });
  const vwidth = Math.max(0, ...values.map((v) => v.length));
  const lines = [`${rec.entity} ${rec.id}${rec.entity === "user" ? "" : ` (user ${rec.user})`}`];
  names.forEach((n, i) => {
    const meaning = fieldMeaning(rec.entity, n);
    lines.push(`  ${n.padEnd(width)}  ${values[i]!.padStart(vwidth)}${meaning ? `  ${meaning}` : ""}`);
  });
  return lines.join("\n");
}

/** Resolves the entity and id of `tacit features … get` (with `--raw-user` for users). */
export function resolveTarget(
  entity: string,
  id: string | undefined,
  rawUser: string | undefined,
  env: Readonly<Record<string, string | undefined>>,
  keyEnv: string,
): { entity: FeatureEntity; id: string; note?: string } {
  if (!(FEATURE_ENTITIES as readonly string[]).includes(entity)) throw new ConfigError(`unknown entity "${entity}": use one of ${FEATURE_ENTITIES.join(", ")}`);
  const e = entity as FeatureEntity;
  if (rawUser !== undefined) {
    if (e !== "user") throw new ConfigError("--raw-user applies to `get user` only");
    if (id !== undefined) throw new ConfigError("give either a pseudonym or --raw-user, not both");
    const { key, dev } = resolvePseudonymKey(env, keyEnv, true);
    return { entity: e, id: pseudonymize(key, rawUser), ...(dev ? { note: `${keyEnv} is not set: pseudonymized with the development key` } : {}) };
  }
  if (id === undefined || id === "") throw new ConfigError(`missing id: tacit features <pipeline> get ${entity} <id>${e === "user" ? " (or --raw-user <user_id>)" : ""}`);
  return { entity: e, id };
}

/** Adds `tacit features <pipeline> get <user|response|session> <id>`. */
export function registerFeatures(program: Command): void {
  pipelineCommand(
    program
      .command("features <pipeline> <verb> <entity> [id]")
      .description("read online features: get user <pseudonym> | get response <response_id> | get session <session_id> (fields: README, Online features)")
      .option("--raw-user <user_id>", "for `get user`: the raw user id, pseudonymized with the pipeline's key (TACIT_PSEUDONYM_KEY)"),
  ).action(
    action(async (file: string, verb: string, entity: string, id: string | undefined, opts: FeaturesFlags) => {
      if (verb !== "get") throw new ConfigError(`unknown action "${verb}": use tacit features <pipeline> get <user|response|session> <id>`);
      const p = loadForCli(file, opts);
      const enrichCfg = p.stages.find((s) => s.operator === "enrich")?.config as { pseudonym_key_env?: unknown } | undefined;
      const keyEnv = typeof enrichCfg?.pseudonym_key_env === "string" ? enrichCfg.pseudonym_key_env : DEFAULT_KEY_ENV;
      const target = resolveTarget(entity, id, opts.rawUser, effectiveEnv(), keyEnv);
      if (target.note) process.stderr.write(`tacit: note: ${target.note}\n`);
      const redis = openPipelineRedis(p);
      try {
        const rec = await readFeatures(new RedisStateStore(redis), p.subject_prefix, target.entity, target.id);
        if (!rec) {
          if (opts.json) process.stdout.write(JSON.stringify({ entity: target.entity, id: target.id, found: false }) + "\n");
          else process.stderr.write(`tacit: no features for ${target.entity} ${target.id} (unknown id, or expired)\n`);
          return 1;
        }
        process.stdout.write((opts.json ? JSON.stringify(rec) : formatFeatures(rec)) + "\n");
        return 0;
      } finally {
        redis.disconnect();
      }
    }),
  );
}

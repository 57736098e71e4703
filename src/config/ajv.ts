import { Ajv, type ErrorObject } from "ajv";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/**
 * The ajv instance settings shared by pipeline and operator-config validation: every error
 * (not just the first), defaults filled in, unknown schema keywords rejected so a typo in a
 * schema is caught when it is compiled rather than silently ignored.
 */
export function newConfigAjv(): Ajv {
  const ajv = new Ajv({
    allErrors: true,
    // parentSchema and data on each error: for did-you-mean hints and readable messages.
    verbose: true,
    useDefaults: true,
    strictSchema: true,
    strictNumbers: true,
    strictTypes: false,
    strictTuples: false,
    strictRequired: false,
    allowUnionTypes: true,
    // Strict-mode notes go to the schema author through compile errors, not to the CLI's stderr.
    logger: false,
  });
  // ajv-formats is not a dependency: the formats config schemas plausibly use are defined here.
  ajv.addFormat("regex", { type: "string", validate: (s: string) => isRegex(s) });
  ajv.addFormat("date-time", { type: "string", validate: (s: string) => !Number.isNaN(Date.parse(s)) && /^\d{4}-\d\d-\d\dT/.test(s) });
  ajv.addFormat("uri", { type: "string", validate: (s: string) => URL.canParse(s) });
  return ajv;
}

function isRegex(s: string): boolean {
  try {
    new RegExp(s);
    return true;
  } catch {
    return false;
  }
}

let pipelineSchemaCache: Record<string, unknown> | undefined;

/**
 * `config/schemas/pipeline.v1.json`, read from the repository root (this module runs from
 * `dist/src/config/`; the JSON is read at run time rather than imported so Node 20 prints no
 * experimental-JSON-modules warning).
 */
export function pipelineSchema(): Record<string, unknown> {
  if (!pipelineSchemaCache) {
    const candidates = ["../../../config/schemas/pipeline.v1.json", "../../config/schemas/pipeline.v1.json"];
    let lastError: unknown;
    for (const rel of candidates) {
      try {
        pipelineSchemaCache = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as Record<string, unknown>;
        break;
      } catch (err) {
        lastError = err;
      }
    }
    if (!pipelineSchemaCache) throw new Error(`config/schemas/pipeline.v1.json not found`, { cause: lastError });
  }
  return pipelineSchemaCache;
}

/**
 * Drops errors that only restate others: the per-branch errors under an `anyOf`/`oneOf` that
 * also reported itself, and `if` errors (the `then`/`else` error says what is wrong).
 */
export function pruneErrors(errors: ErrorObject[]): ErrorObject[] {
  const unions = errors.filter((e) => e.keyword === "anyOf" || e.keyword === "oneOf").map((e) => e.schemaPath + "/");
  return errors.filter((e) => e.keyword !== "if" && !unions.some((u) => e.schemaPath.startsWith(u)));
}

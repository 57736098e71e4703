import { isCollection, isMap, isPair, isScalar, isSeq, parseDocument, visit, YAMLMap, type Node } from "yaml";
import type { Problem } from "./problems.js";
import { keyText, type SourceMap } from "./source.js";

/**
 * Command-line overrides (`--set dotted.path=value`) and `${VAR}` / `${VAR:-default}`
 * expansion, both applied to the YAML document before validation so that every problem they
 * cause is still reported against a position.
 */

/** Splits `a.b.c=value`; undefined when there is no `=` or an empty path segment. */
export function parseSetExpression(expr: string): { path: string[]; value: string } | undefined {
  const eq = expr.indexOf("=");
  if (eq <= 0) return undefined;
  const path = expr.slice(0, eq).split(".");
  if (path.some((s) => s.trim() === "")) return undefined;
  return { path: path.map((s) => s.trim()), value: expr.slice(eq + 1) };
}

/**
 * The node a `--set` value becomes: parsed as YAML (so `4` is a number, `true` a boolean and
 * `[1s, 5s]` a list), or kept as the literal string when it is not valid YAML on its own.
 */
function valueNode(sm: SourceMap, text: string): Node {
  const parsed = parseDocument(text);
  const value: unknown = parsed.errors.length > 0 ? text : parsed.toJS();
  return sm.doc.createNode(value) as Node;
}

/**
 * Applies each `--set path=value` in order. Sequence segments are indices (`stages.1`) or,
 * for a list of named maps like `stages`, names (`stages.dedupe`). Missing map keys are
 * created; missing list items are an error.
 */
export function applySetOverrides(sm: SourceMap, exprs: readonly string[]): Problem[] {
  const problems: Problem[] = [];
  exprs.forEach((expr, k) => {
    const at = (col: number, message: string, hint?: string): void => {
      problems.push({ file: "--set", line: k + 1, col, message: `${expr}: ${message}`, ...(hint ? { hint } : {}) });
    };
    const parsed = parseSetExpression(expr);
    if (!parsed) return at(1, "expected dotted.path=value", "for example --set partitions=16 or --set stages.dedupe.config.window=1h");
    const { path, value } = parsed;
    const doc = sm.doc;
    if (!isMap(doc.contents)) return at(1, "the pipeline file is not a mapping");
    let node: Node = doc.contents;
    let col = 1;
    for (let i = 0; i < path.length; i++) {
      const seg = path[i]!;
      const last = i === path.length - 1;
      const here = path.slice(0, i).join(".") || "the top level";
      if (isMap(node)) {
        const pair = node.items.find((p) => keyText(p.key) === seg);
        if (last) {
          const fresh = valueNode(sm, value);
          if (pair) {
            const old = pair.value as Node | null;
            if (old?.range) fresh.range = old.range;
            pair.value = fresh;
          } else {
            node.items.push(doc.createPair(seg, fresh));
          }
          sm.setBy.set(fresh, expr);
          return;
        }
        let next = pair?.value as Node | null | undefined;
        if (!pair || next === null || next === undefined || (isScalar(next) && next.value === null)) {
          const created = new YAMLMap();
          if (pair) pair.value = created;
          else node.items.push(doc.createPair(seg, created));
          sm.setBy.set(created, expr);
          next = created;
        } else if (!isCollection(next)) {
          return at(col, `${[...path.slice(0, i + 1)].join(".")} is a value, not a mapping or list`);
        }
        node = next;
      } else if (isSeq(node)) {
        let item: unknown;
        if (/^\d+$/.test(seg)) {
          item = node.items[Number(seg)];
          if (item === undefined) return at(col, `${here} has ${node.items.length} item(s): no index ${seg}`, "indices start at 0");
        } else {
          const names = node.items.map((it) => (isMap(it) ? it.get("name") : undefined)).filter((n): n is string => typeof n === "string");
          item = node.items.find((it) => isMap(it) && it.get("name") === seg);
          if (item === undefined) return at(col, `${here} has no item named "${seg}"`, names.length ? `names: ${names.join(", ")}` : undefined);
        }
        if (last) {
          const idx = node.items.indexOf(item);
          const fresh = valueNode(sm, value);
          const oldRange = (item as Node).range;
          if (oldRange) fresh.range = oldRange;
          node.items[idx] = fresh;
          sm.setBy.set(fresh, expr);
          return;
        }
        if (!isCollection(item)) return at(col, `${path.slice(0, i + 1).join(".")} is a value, not a mapping or list`);
        node = item;
      } else {
        return at(col, `${here} is a value, not a mapping or list`);
      }
      col += seg.length + 1;
    }
  });
  return problems;
}

const REF = /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}$]*))?\}|\$\{[^}]*\}?/g;

/** Result of expanding one string: the text, or what went wrong. */
export interface Expansion {
  value: string;
  /** Variables referenced without a default that are not set. */
  unset: string[];
  /** Malformed `${…}` references. */
  malformed: string[];
  /** True when the whole string was a single `${…}` reference (its result may be re-typed). */
  whole: boolean;
}

/**
 * Expands `${VAR}` (must be set) and `${VAR:-default}` (default when unset or empty); `$$` is a
 * literal `$`. Nested references are not supported.
 */
export function expandString(text: string, env: Readonly<Record<string, string | undefined>>): Expansion {
  const unset: string[] = [];
  const malformed: string[] = [];
  let refs = 0;
  const value = text.replace(REF, (m: string, name: string | undefined, def: string | undefined) => {
    if (m === "$$") return "$";
    refs++;
    if (name === undefined) {
      malformed.push(m);
      return m;
    }
    const v = env[name];
    if (def !== undefined) return v === undefined || v === "" ? def : v;
    if (v === undefined) {
      unset.push(name);
      return m;
    }
    return v;
  });
  const whole = refs === 1 && /^\$\{[^}]*\}$/.test(text);
  return { value, unset, malformed, whole };
}

/**
 * Expands environment references in every string value (not keys) of the document. A plain
 * scalar that is exactly one reference is re-read as YAML after expansion, so
 * `partitions: ${PARTITIONS:-8}` is a number; quote it to keep a string.
 */
export function expandEnvironment(sm: SourceMap, env: Readonly<Record<string, string | undefined>>): Problem[] {
  const problems: Problem[] = [];
  visit(sm.doc, {
    Scalar(key, node, ancestors) {
      if (key === "key" || typeof node.value !== "string" || !node.value.includes("$")) return;
      const raw = node.value;
      const r = expandString(raw, env);
      const p = node.range ? sm.pos(node.range[0]) : { line: 1, col: 1 };
      const path = docPath([...ancestors, node]);
      for (const name of r.unset) {
        problems.push({
          file: sm.file,
          ...p,
          message: `environment variable ${name} is not set`,
          hint: `set ${name}, or give a default: \${${name}:-value}`,
          path,
        });
      }
      for (const m of r.malformed) {
        problems.push({
          file: sm.file,
          ...p,
          message: `malformed reference ${m}`,
          hint: "use ${VAR} or ${VAR:-default} (VAR: letters, digits, _), and $$ for a literal $",
          path,
        });
      }
      if (r.unset.length > 0 || r.malformed.length > 0) sm.unresolved.add(node);
      if (r.value === raw) return;
      sm.expandedFrom.set(node, raw);
      if (r.whole && node.type === "PLAIN") {
        const retyped = parseDocument(r.value);
        const v: unknown = retyped.errors.length === 0 ? retyped.toJS() : r.value;
        node.value = v === null || typeof v === "object" ? r.value : v;
      } else {
        node.value = r.value;
      }
    },
  });
  return problems;
}

/** Dotted document path (`stages.1.config.window`) of a node, from the ancestors `visit` passes. */
function docPath(chain: readonly unknown[]): string {
  const parts: string[] = [];
  chain.forEach((n, i) => {
    if (isPair(n)) parts.push(keyText(n.key));
    else if (isSeq(n)) parts.push(String(n.items.indexOf(chain[i + 1] as never)));
  });
  return parts.join(".");
}

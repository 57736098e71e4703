import { isAlias, isMap, isScalar, isSeq, type Document, type LineCounter, type Node } from "yaml";

/** A path into the pipeline document: map keys as strings, sequence indices as numbers or digit strings. */
export type DocPath = readonly (string | number)[];

/** Where a path lands in the file, and where its value came from when not from the file itself. */
export interface Location {
  line: number;
  col: number;
  /** The `--set` expression that produced this value (or one of its parents). */
  setBy?: string;
  /** The raw `${…}` text this value was expanded from. */
  expandedFrom?: string;
  /** The value holds a `${VAR}` that could not be expanded. */
  unresolved?: boolean;
}

/**
 * A parsed pipeline document with position lookups. Values changed by `--set` keep the position
 * of the value they replaced; values that did not exist in the file point at their nearest
 * parent that did.
 */
export class SourceMap {
  /** Nodes created or replaced by `--set`, with the expression responsible. */
  readonly setBy = new WeakMap<object, string>();
  /** Scalars whose text was expanded from `${…}`, with the original text. */
  readonly expandedFrom = new WeakMap<object, string>();
  /** Scalars with a `${VAR}` that could not be expanded (already reported). */
  readonly unresolved = new WeakSet<object>();

  constructor(
    readonly file: string,
    readonly doc: Document,
    readonly lines: LineCounter,
  ) {}

  /** Line and column (1-based) of a byte offset of the source. */
  pos(offset: number): { line: number; col: number } {
    return this.lines.linePos(offset);
  }

  /** The node at `path`, or undefined when the path does not exist in the document. */
  node(path: DocPath): unknown {
    const r = this.walk(path);
    return r.complete ? r.node : undefined;
  }

  /** Whether `path` exists in the document (after `--set`). */
  has(path: DocPath): boolean {
    return this.walk(path).complete;
  }

  /**
   * Location of the value at `path` (or of its key with `at: "key"`); the deepest existing
   * ancestor when the path is not in the document (a missing field, a default).
   */
  locate(path: DocPath, at: "value" | "key" = "value"): Location {
    const r = this.walk(path, at);
    const loc: Location = { ...r.pos };
    for (const n of r.trail) {
      const s = this.setBy.get(n);
      if (s !== undefined) loc.setBy = s;
    }
    if (r.complete) {
      const e = this.expandedFrom.get(r.node as object);
      if (e !== undefined) loc.expandedFrom = e;
      if (this.unresolved.has(r.node as object)) loc.unresolved = true;
    }
    return loc;
  }

  private walk(path: DocPath, at: "value" | "key" = "value"): { node: unknown; pos: { line: number; col: number }; complete: boolean; trail: object[] } {
    let node: unknown = this.doc.contents;
    let pos = this.rangePos(node) ?? { line: 1, col: 1 };
    const trail: object[] = node && typeof node === "object" ? [node] : [];
    for (let i = 0; i < path.length; i++) {
      const seg = path[i]!;
      if (isAlias(node)) node = node.resolve(this.doc);
      if (isMap(node)) {
        const pair = node.items.find((p) => keyText(p.key) === String(seg));
        if (!pair) return { node, pos, complete: false, trail };
        const keyPos = this.rangePos(pair.key);
        if (at === "key" && i === path.length - 1) return { node: pair.key, pos: keyPos ?? pos, complete: true, trail };
        node = pair.value;
        // An empty value (`config:`) has no useful position of its own: use its key's.
        const valuePos = isScalar(node) && node.value === null ? undefined : this.rangePos(node);
        pos = valuePos ?? keyPos ?? pos;
      } else if (isSeq(node)) {
        const idx = typeof seg === "number" ? seg : /^\d+$/.test(seg) ? Number(seg) : -1;
        const item = idx >= 0 ? node.items[idx] : undefined;
        if (item === undefined) return { node, pos, complete: false, trail };
        node = item;
        pos = this.rangePos(node) ?? pos;
      } else {
        return { node, pos, complete: false, trail };
      }
      if (node && typeof node === "object") trail.push(node);
    }
    return { node, pos, complete: true, trail };
  }

  private rangePos(node: unknown): { line: number; col: number } | undefined {
    const range = (node as Node | null | undefined)?.range;
    return range && typeof node === "object" ? this.pos(range[0]) : undefined;
  }
}

/** The text of a map key, whether it is a Scalar node or a plain value (keys added by `--set`). */
export function keyText(key: unknown): string {
  if (isScalar(key)) return String(key.value);
  return String(key);
}

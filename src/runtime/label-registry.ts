import { createHash } from "node:crypto";
import { pipelineKey, userKey } from "../core/state.js";

/*
 * What the worker needs to make replays exact, shared with `tacit replay` (replay.ts): the
 * replay fences and the published-label registry (see replay.ts for how they work together).
 */

// --- fences ----------------------------------------------------------------------------------

/** Where replay fences are kept: one hash per pipeline, field `<stream>/<durable>`. */
export function fencesKey(prefix: string): string {
  return pipelineKey(prefix, "fences");
}

/** The field of one durable in the fences hash. */
export function fenceField(stream: string, durable: string): string {
  return `${stream}/${durable}`;
}

/** Inputs up to `seq` were processed and their outputs published; `wm`: the partition watermark then. */
export interface Fence {
  seq: number;
  wm?: number;
}

/** Parses a fence as stored (undefined when absent or unreadable). */
export function parseFence(raw: string | undefined): Fence | undefined {
  if (!raw) return undefined;
  try {
    const f = JSON.parse(raw) as Fence;
    return typeof f.seq === "number" ? f : undefined;
  } catch {
    return undefined;
  }
}

// --- published-label registry ----------------------------------------------------------------

/** Header on every published label: the revision the operator gave it (the registry maps it). */
export const OP_REVISION_HEADER = "Tacit-Op-Revision";

/**
 * What has been published of one label. `R`/`H`: highest published revision and its content
 * hash. `h`: the content hash the operator's current computation emitted at each of *its*
 * revisions (a rebuild computes them again from 0); `off`: published revision − operator
 * revision for that computation (0 unless a recomputation changed the label's history).
 */
export interface PublishedLabel {
  R: number;
  H: string;
  off: number;
  h: Record<string, string>;
}

/** Registry key of a label (under its user's hash tag, beside the user's other state). */
export function publishedKey(prefix: string, user: string, labelId: string): string {
  return userKey(prefix, user, "published", labelId);
}

function canonical(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === "object") {
    return Object.fromEntries(
      Object.keys(v as Record<string, unknown>)
        .sort()
        .map((k) => [k, canonical((v as Record<string, unknown>)[k])]),
    );
  }
  return v;
}

/** Hash of what a label says: every field but `revision` and `emitted_at`, key order ignored. */
export function labelContentHash(label: Record<string, unknown>): string {
  const { revision: _r, emitted_at: _e, ...rest } = label;
  return createHash("sha256").update(JSON.stringify(canonical(rest))).digest("base64url").slice(0, 16);
}

/**
 * Decides whether an operator's label at its revision `k` with content hash `x` is published, at
 * which revision, and what the registry then holds.
 *
 * - Seen before in this computation with the same content: not published (a redelivery, a
 *   replay, a rebuild of the same inputs with the same rules).
 * - New in this computation: published at `k + off`, but never at or below a revision already
 *   published (a new revision of the same label_id, never a second label).
 * - Content differs from what this computation emitted at `k` before (a rule changed and the
 *   state was rebuilt): what it emitted from `k` on is superseded; published as the next revision.
 * - Content equal to the latest published: not published (consumers already hold it).
 */
export function decideLabel(reg: PublishedLabel | undefined, k: number, x: string): { publishAt?: number; next: PublishedLabel } {
  if (!reg) return { publishAt: k, next: { R: k, H: x, off: 0, h: { [k]: x } } };
  const seen = reg.h[k];
  if (seen === x) return { next: reg };
  const h = { ...reg.h };
  let off = reg.off;
  if (seen !== undefined) {
    for (const j of Object.keys(h)) if (Number(j) >= k) delete h[j];
    off = reg.R + 1 - k;
  } else if (k + off <= reg.R) {
    off = reg.R + 1 - k;
  }
  h[k] = x;
  if (x === reg.H) return { next: { R: reg.R, H: reg.H, off: reg.R - k, h } };
  const at = k + off;
  return { publishAt: at, next: { R: at, H: x, off, h } };
}

/** Folds one published label (operator revision `k`, published `r`) into a registry entry (seeding). */
export function seedLabel(reg: PublishedLabel | undefined, k: number, r: number, x: string): PublishedLabel {
  const h: Record<string, string> = {};
  for (const [j, v] of Object.entries(reg?.h ?? {})) if (Number(j) < k) h[j] = v;
  h[k] = x;
  if (reg && reg.R > r) return { ...reg, h };
  return { R: r, H: x, off: r - k, h };
}

import { createReadStream, statSync } from "node:fs";
import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import type { JetStreamClient } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import { EVENT_TYPES } from "../core/event.js";
import { TransientError, errorMessage } from "../core/errors.js";
import { inputSubject } from "../config/topology.js";

const encoder = new TextEncoder();
const KNOWN = new Set<string>(EVENT_TYPES);

/**
 * The input subject for one raw line: `<p>.in.<event_type>`. Lines that are not JSON or have an
 * unknown type still go in (to `<p>.in._invalid`), so enrich dead-letters them with a reason
 * instead of the producer dropping them silently.
 */
export function subjectForLine(p: Pipeline, line: string): string {
  try {
    const t = (JSON.parse(line) as { event_type?: unknown }).event_type;
    if (typeof t === "string" && KNOWN.has(t)) return inputSubject(p, t);
  } catch {
    // not JSON: enrich reports it as malformed_json
  }
  return inputSubject(p, "_invalid");
}

export interface PublishProgress {
  published: number;
  bytes: number;
}

/**
 * Publishes lines with up to `window` publishes in flight (never one awaited round trip per
 * message). Each line's Nats-Msg-Id is `<idPrefix>:<line number>`, so publishing the same file
 * again within the stream's duplicate window adds nothing.
 */
export async function publishLines(
  p: Pipeline,
  js: JetStreamClient,
  lines: AsyncIterable<string> | Iterable<string>,
  opts: { idPrefix: string; window?: number; onProgress?: (p: PublishProgress) => void },
): Promise<PublishProgress> {
  const window = opts.window ?? p.runtime.max_in_flight;
  const progress: PublishProgress = { published: 0, bytes: 0 };
  let inflight: Promise<unknown>[] = [];
  let n = 0;
  const flush = async () => {
    try {
      await Promise.all(inflight);
    } catch (err) {
      throw new TransientError("publish_failed", `publish failed after ${progress.published} lines: ${errorMessage(err)}`, err);
    }
    progress.published += inflight.length;
    inflight = [];
    opts.onProgress?.(progress);
  };
  for await (const raw of lines) {
    n++;
    const line = raw.trim();
    if (line.length === 0) continue;
    const data = encoder.encode(line);
    progress.bytes += data.length;
    inflight.push(js.publish(subjectForLine(p, line), data, { msgID: `${opts.idPrefix}:${n}`, timeout: 30_000 }));
    if (inflight.length >= window) await flush();
  }
  await flush();
  return progress;
}

/** Lines of a file, streamed. */
export function fileLines(file: string): AsyncIterable<string> {
  return createInterface({ input: createReadStream(file), crlfDelay: Infinity });
}

/** A publish id prefix stable for one version of a file (path, size, mtime). */
export function fileIdPrefix(file: string): string {
  const st = statSync(file);
  return "pub-" + createHash("sha256").update(`${file}:${st.size}:${st.mtimeMs}`).digest("hex").slice(0, 12);
}

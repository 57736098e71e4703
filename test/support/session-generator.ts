import type { Envelope, EventType } from "../../src/core/event.js";
import { partitionOf } from "../../src/core/partition.js";
import { Random } from "./random.js";

/**
 * A seeded generator of user sessions delivered as per-partition streams, with the ground truth
 * computed here, independently of the operator: which events are on time, late within the
 * allowed lateness or beyond it follows from the stream order (watermark = max event time
 * seen − out-of-orderness), and the expected sessions are an offline sessionization (sort by
 * time, cut where the gap is exceeded) of the events that must be accepted.
 */

export interface SessionStreamOptions {
  seed: number;
  users: number;
  partitions: number;
  gapMs: number;
  allowedLatenessMs: number;
  outOfOrdernessMs: number;
  /** Sessions per user, inclusive range. @default [2, 8] */
  sessionsPerUser?: [number, number];
  /** Events per session, inclusive range. @default [1, 12] */
  eventsPerSession?: [number, number];
  /** Share of events delivered late but within the allowed lateness. @default 0.05 */
  lateWithinRate?: number;
  /** Share of events delivered later than the allowed lateness. @default 0.02 */
  lateBeyondRate?: number;
  /** Event time of the earliest session. @default 2025-01-01T00:00:00Z */
  startMs?: number;
}

export type Timeliness = "on_time" | "late_within" | "late_beyond";

export interface StreamEvent {
  envelope: Envelope;
  timeliness: Timeliness;
  /** The partition's watermark just before this event, from the stream order. */
  watermark_ms: number | undefined;
  /** watermark − ts when late, else 0. */
  lateness_ms: number;
}

/** A session as an offline sessionization of the accepted events gives it. */
export interface ExpectedSession {
  user: string;
  start: number;
  end: number;
  event_count: number;
  counts: Record<string, number>;
  query_ids: string[];
  response_ids: string[];
  ended_in_abandonment: boolean;
  /** `src.seq` of its events. */
  src_seqs: number[];
}

export interface SessionStream {
  /** Envelopes per partition in stream (arrival) order. */
  partitions: Envelope[][];
  /** Every delivered event by `src.seq`. */
  events: Map<number, StreamEvent>;
  /** Expected sessions, sorted by user then start. */
  expected: ExpectedSession[];
  /** Sessions as generated (before late events were dropped); each is shorter than `maxExtentMs`. */
  generatedSessions: number;
  /** Longest extent (last − first event time) of a generated session. */
  maxExtentMs: number;
}

const INTERACTIONS: readonly (readonly [EventType, number])[] = [
  ["query", 15],
  ["response_shown", 20],
  ["click", 10],
  ["copy_paste", 8],
  ["accept", 8],
  ["edit", 6],
  ["regenerate", 5],
  ["dwell", 10],
  ["abandon", 5],
  ["task_complete", 4],
  ["share", 3],
  ["explicit_feedback", 2],
];

interface Draft {
  envelope: Envelope;
  /** Generation order, a stable tiebreak. */
  order: number;
  target: Timeliness;
}

export function generateSessionStream(opts: SessionStreamOptions): SessionStream {
  const rng = new Random(opts.seed);
  const gap = opts.gapMs;
  const lateness = opts.allowedLatenessMs;
  const bound = opts.outOfOrdernessMs;
  if (lateness < 2) throw new Error("generator: allowedLatenessMs must be at least 2 ms");
  const [sMin, sMax] = opts.sessionsPerUser ?? [2, 8];
  const [eMin, eMax] = opts.eventsPerSession ?? [1, 12];
  const lateWithin = opts.lateWithinRate ?? 0.05;
  const lateBeyond = opts.lateBeyondRate ?? 0.02;
  const t0 = opts.startMs ?? Date.UTC(2025, 0, 1);

  const drafts: Draft[][] = Array.from({ length: opts.partitions }, () => []);
  let order = 0;
  let generatedSessions = 0;
  let maxExtentMs = 0;
  for (let u = 0; u < opts.users; u++) {
    const user = `user-${opts.seed}-${u}`;
    const partition = partitionOf(user, opts.partitions);
    let t = t0 + rng.int(0, 60 * gap);
    const sessions = rng.int(sMin, sMax);
    for (let s = 0; s < sessions; s++) {
      generatedSessions++;
      const first = t;
      let qid: string | undefined;
      let rid: string | undefined;
      const n = rng.int(eMin, eMax);
      for (let k = 0; k < n; k++) {
        if (k > 0) t += rng.int(0, gap - 1); // strictly within the gap: one generated session
        const type: EventType = k === 0 ? "query" : rng.weighted(INTERACTIONS);
        if (type === "query") {
          qid = `q-${order}`;
          rid = undefined;
        } else if (type === "response_shown") {
          rid = `r-${order}`;
        }
        const r = rng.float();
        const target: Timeliness = r < lateBeyond ? "late_beyond" : r < lateBeyond + lateWithin ? "late_within" : "on_time";
        const event_id = `ev-${opts.seed}-${order}`;
        drafts[partition]!.push({
          order: order++,
          target,
          envelope: {
            v: 1,
            event: {
              event_id,
              session_id: `client-${u}-${s}`,
              user,
              user_key_version: "k1",
              timestamp: new Date(t).toISOString(),
              ts: t,
              ...(qid ? { query_id: qid } : {}),
              ...(rid && type !== "query" ? { response_id: rid } : {}),
              event_type: type,
              payload: type === "query" ? { text: `raw query text ${event_id}` } : {},
            },
            src: { seq: 0 },
            partition,
            attrs: {},
          },
        });
      }
      maxExtentMs = Math.max(maxExtentMs, t - first);
      t += gap + 1 + rng.int(0, 10 * gap); // strictly more than the gap: a new generated session
    }
  }

  const partitions: Envelope[][] = [];
  const events = new Map<number, StreamEvent>();
  let seq = 0;
  for (const list of drafts) {
    const stream = arrange(list, rng, bound, lateness, gap);
    const ordered: Envelope[] = [];
    let max: number | undefined;
    for (const env of stream) {
      const wm = max === undefined ? undefined : max - bound;
      const late = wm !== undefined && env.event.ts < wm ? wm - env.event.ts : 0;
      // Exactly at the allowed lateness is the one boundary where "late but allowed" and
      // "session already closed" can meet; leave such events out so the truth is unambiguous.
      if (late === lateness) continue;
      const timeliness: Timeliness = late === 0 ? "on_time" : late < lateness ? "late_within" : "late_beyond";
      env.src = { seq: ++seq };
      events.set(seq, { envelope: env, timeliness, watermark_ms: wm, lateness_ms: late });
      ordered.push(env);
      max = Math.max(max ?? env.event.ts, env.event.ts);
    }
    partitions.push(ordered);
  }

  return { partitions, events, expected: expectedSessions(events, gap), generatedSessions, maxExtentMs };
}

/**
 * Stream order for one partition: on-time events shuffled within the out-of-orderness bound
 * (arrival key = ts + jitter ≤ bound, so none is ever behind the watermark); each late event
 * inserted where the watermark first reaches its ts + a drawn lateness.
 */
function arrange(list: Draft[], rng: Random, bound: number, lateness: number, gap: number): Envelope[] {
  const normal = list
    .filter((d) => d.target === "on_time")
    .map((d) => ({ d, key: d.envelope.event.ts + rng.int(0, bound) }))
    .sort((a, b) => a.key - b.key || a.d.order - b.d.order)
    .map((x) => x.d.envelope);
  const wmBefore: number[] = [];
  let max = -Infinity;
  for (const env of normal) {
    wmBefore.push(max - bound);
    max = Math.max(max, env.event.ts);
  }
  const inserts: Envelope[][] = Array.from({ length: normal.length + 1 }, () => []);
  for (const d of list) {
    if (d.target === "on_time") continue;
    const want = d.target === "late_within" ? rng.int(1, lateness - 1) : rng.int(lateness + 1, lateness + 2 * gap);
    const at = d.envelope.event.ts + want;
    let lo = 0;
    let hi = normal.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (wmBefore[mid]! >= at) hi = mid;
      else lo = mid + 1;
    }
    inserts[lo]!.push(d.envelope);
  }
  const out: Envelope[] = [];
  normal.forEach((env, i) => {
    out.push(...rng.shuffle(inserts[i]!), env);
  });
  out.push(...rng.shuffle(inserts[normal.length]!));
  return out;
}

/** Offline sessionization of the accepted events: sort per user, cut where the next event is more than the gap after. */
export function expectedSessions(events: Map<number, StreamEvent>, gap: number): ExpectedSession[] {
  const byUser = new Map<string, Envelope[]>();
  for (const e of events.values()) {
    if (e.timeliness === "late_beyond") continue;
    const list = byUser.get(e.envelope.event.user) ?? [];
    list.push(e.envelope);
    byUser.set(e.envelope.event.user, list);
  }
  const out: ExpectedSession[] = [];
  for (const user of [...byUser.keys()].sort()) {
    const list = byUser.get(user)!.sort((a, b) => a.event.ts - b.event.ts || (a.event.event_id < b.event.event_id ? -1 : 1));
    let cur: Envelope[] = [];
    const flush = (): void => {
      if (cur.length === 0) return;
      const counts: Record<string, number> = {};
      for (const e of cur) counts[e.event.event_type] = (counts[e.event.event_type] ?? 0) + 1;
      const uniq = (xs: (string | undefined)[]): string[] => [...new Set(xs.filter((x): x is string => !!x))].sort();
      const last = cur[cur.length - 1]!.event.event_type;
      out.push({
        user,
        start: cur[0]!.event.ts,
        end: cur[cur.length - 1]!.event.ts,
        event_count: cur.length,
        counts,
        query_ids: uniq(cur.map((e) => e.event.query_id)),
        response_ids: uniq(cur.map((e) => e.event.response_id)),
        ended_in_abandonment: last === "abandon" || last === "response_shown",
        src_seqs: cur.map((e) => e.src.seq).sort((a, b) => a - b),
      });
      cur = [];
    };
    for (const e of list) {
      if (cur.length > 0 && e.event.ts - cur[cur.length - 1]!.event.ts > gap) flush();
      cur.push(e);
    }
    flush();
  }
  return out;
}

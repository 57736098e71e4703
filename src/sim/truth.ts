import type { DlqReason } from "../core/errors.js";
import type { QueryChange } from "./vocab.js";

/**
 * The simulator's hidden ground truth, one JSON object per line of `truth.jsonl`. The pipeline
 * never sees it; `tacit evaluate` compares labels, features and bot decisions against it.
 */
export type TruthRecord = MetaTruth | UserTruth | QueryTruth | ResponseTruth | NoiseTruth;

/** Habits of human users; each shifts which signals the user gives and how routinely. */
export type Habit = "typical" | "fast_reader" | "heavy_editor" | "regenerator" | "copier" | "mobile";

/** How a bot gives itself away: its user agent, its metronomic timing, or impossible sequences. */
export type BotKind = "ua_bot" | "regular_script" | "human_paced_script";
/** Every bot kind, in a fixed order. */
export const BOT_KINDS: readonly BotKind[] = ["ua_bot", "regular_script", "human_paced_script"];

/** First record of a truth file: how the traffic was generated. */
export interface MetaTruth {
  kind: "meta";
  truth_version: 1;
  seed: number;
  users: number;
  duration_ms: number;
  bot_fraction: number;
  position_bias_eta: number;
  start_time: string;
  /** Lines written to events.jsonl (well-formed events, duplicates and malformed lines). */
  lines: number;
}

/** One user: human (with a habit) or bot (with a kind). */
export interface UserTruth {
  kind: "user";
  user_id: string;
  is_bot: boolean;
  bot_kind: BotKind | null;
  /** Null for bots. */
  habit: Habit | null;
  /** Hidden baseline propensity to act at all (≈ 1; > 1 acts on more responses, good or bad). */
  propensity: number;
  device: "desktop" | "mobile";
  user_agent: string;
  /** Gives explicit ratings (a small share of humans; see the simulator's explicit-rating model). */
  rates_explicitly?: boolean;
}

/** One query and how it relates to the previous query of its session. */
export interface QueryTruth {
  kind: "query";
  query_id: string;
  session_id: string;
  user_id: string;
  /** The query just before this one in the same session, if any. */
  previous_query_id: string | null;
  /** How this query relates to the previous one (`first` in a session). */
  change: QueryChange;
  /** Whether an answer exists (drives response quality and good abandonment). */
  answerable: boolean;
  is_bot_user: boolean;
}

/** One shown response with its hidden quality: what labels are scored against. */
export interface ResponseTruth {
  kind: "response";
  response_id: string;
  query_id: string;
  session_id: string;
  user_id: string;
  /** Hidden quality in [0, 1]. */
  quality: number;
  /** `quality ≥ 0.5`: what labels are scored against. */
  good: boolean;
  /** Rank in a result list (1 = top), or null for a single LLM response. */
  position: number | null;
  /** Response this one replaced through `regenerate`, if any. */
  regenerated_from: string | null;
  is_bot_user: boolean;
  /**
   * Well-formed interaction events about this response (click, copy_paste, accept, edit,
   * regenerate, dwell, abandon, task_complete, share), plus one when a reformulation followed
   * it. Explicit feedback and response_shown are not counted.
   */
  signals: number;
  /** `good_abandonment`: the answer was read and the user left satisfied (no other signal). */
  outcome: "good_abandonment" | null;
}

/** Kinds of delivery noise the truth reports, one record per affected line. */
export type NoiseKind = "malformed" | "duplicate" | "late" | "out_of_order";

/** One line of events.jsonl that is delivery noise. */
export interface NoiseTruth {
  kind: "noise";
  /** 1-based line number in events.jsonl. */
  line: number;
  noise: NoiseKind;
  /** The event's id (for malformed_json lines the id of the event the garbage was cut from). */
  event_id?: string;
  /** For malformed lines: the dead-letter reason the pipeline should give. */
  reason?: Extract<DlqReason, "malformed_json" | "schema_violation" | "unknown_event_type" | "bad_timestamp">;
  /** For duplicates: the line of the first copy. */
  of_line?: number;
  /** For late and out-of-order lines: how long after its event time it was delivered (ms). */
  delay_ms?: number;
}

/** Parses truth.jsonl text; blank lines are skipped, anything else that is not a truth record is an error. */
export function parseTruth(text: string): TruthRecord[] {
  const out: TruthRecord[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === "") continue;
    let rec: unknown;
    try {
      rec = JSON.parse(line);
    } catch (err) {
      throw new Error(`truth line ${i + 1}: not JSON (${(err as Error).message})`);
    }
    const kind = (rec as { kind?: unknown } | null)?.kind;
    if (kind !== "meta" && kind !== "user" && kind !== "query" && kind !== "response" && kind !== "noise") {
      throw new Error(`truth line ${i + 1}: unknown record kind ${JSON.stringify(kind)}`);
    }
    out.push(rec as TruthRecord);
  }
  return out;
}

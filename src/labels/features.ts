import { EVENT_TYPES } from "../core/event.js";
import { userKey, type StateStore } from "../core/state.js";

/*
 * Online features: Redis hashes per user, response and session, written by label-derive in the
 * same atomic commit group as the state they derive from (so a redelivered input changes
 * nothing twice), and read by `tacit features`. Every key of a user carries the user's hash tag;
 * responses and sessions are also indexed by id (a pointer to their user) so they can be found
 * without knowing the user.
 */

/** The entities features are kept for. */
export type FeatureEntity = "user" | "response" | "session";
export const FEATURE_ENTITIES: readonly FeatureEntity[] = ["user", "response", "session"];

/** The name of a user's features hash among the user's keys (what label-derive writes through `key.features`). */
export const USER_FEATURES = "features:user";

/**
 * Names built from an id, kept for up to 4,096 ids (emptied when full): label-derive names a response's
 * and a session's hash with every input, and the runtime folds its writes by that name, so the
 * same string each time is looked up at its cached hash instead of hashing a new one.
 */
class NameCache {
  private readonly names = new Map<string, string>();
  constructor(private readonly prefix: string) {}
  of(id: string): string {
    let name = this.names.get(id);
    if (name === undefined) {
      if (this.names.size >= 4096) this.names.clear();
      this.names.set(id, (name = this.prefix + id));
    }
    return name;
  }
}
const RESPONSE_NAMES = new NameCache("features:response:");
const SESSION_NAMES = new NameCache("features:session:");

/** The name of a response's features hash among its user's keys. */
export function responseFeatures(responseId: string): string {
  return RESPONSE_NAMES.of(responseId);
}

/** The name of a session's features hash among its user's keys. */
export function sessionFeatures(sessionId: string): string {
  return SESSION_NAMES.of(sessionId);
}

/** The features hash of a user: `tacit:{<prefix>:u:<user>}:features:user`. */
export function userFeaturesKey(prefix: string, user: string): string {
  return `${userKey(prefix, user)}:${USER_FEATURES}`;
}

/** The features hash of a response: `tacit:{<prefix>:u:<user>}:features:response:<response_id>`. */
export function responseFeaturesKey(prefix: string, user: string, responseId: string): string {
  return `${userKey(prefix, user)}:${responseFeatures(responseId)}`;
}

/** The features hash of a session: `tacit:{<prefix>:u:<user>}:features:session:<session_id>`. */
export function sessionFeaturesKey(prefix: string, user: string, sessionId: string): string {
  return `${userKey(prefix, user)}:${sessionFeatures(sessionId)}`;
}

/**
 * The pointer from a response or session id to its user: `tacit:{<prefix>:ix:<entity>:<id>}:user`.
 * Each pointer has its own hash tag (they spread over a Redis Cluster instead of piling on one
 * slot); it is written with an idempotent SET in a commit group of its own.
 */
export function indexKey(prefix: string, entity: "response" | "session", id: string): string {
  return `tacit:{${prefix}:ix:${entity}:${id}}:user`;
}

/** One documented feature field. `name` may end in `<event_type>`: one field per event type. */
export interface FeatureField {
  name: string;
  entity: FeatureEntity;
  meaning: string;
}

/** Every field label-derive writes, by entity: the README renders this table. */
export const FEATURE_FIELDS: readonly FeatureField[] = [
  { entity: "response", name: "pos_weight", meaning: "summed weight of the response's positive response labels (latest revisions), after position and per-user de-biasing; a label counts once it is released (label-derive's probation), so a bot's held labels never do; a bot flag takes the user's back to 0 (its labels are retracted)" },
  { entity: "response", name: "neg_weight", meaning: "summed weight of its negative response labels" },
  { entity: "response", name: "pos_weight_nobase", meaning: "pos_weight computed without the per-user baseline factors (to measure what the baselines add)" },
  { entity: "response", name: "neg_weight_nobase", meaning: "neg_weight computed without the per-user baseline factors" },
  { entity: "response", name: "signal_count", meaning: "interaction events naming the response (click, copy_paste, accept, edit, regenerate, dwell, abandon, task_complete, share) plus reformulations that followed it; a bot flag takes the user's back (its later signals are not counted)" },
  { entity: "response", name: "position", meaning: "rank in its result list (1 = top); absent for single responses" },
  { entity: "response", name: "query_id", meaning: "the query it answered" },
  { entity: "response", name: "session_id", meaning: "the (provisional) session it was shown in" },
  { entity: "response", name: "explicit_up", meaning: "explicit positive ratings (up, 4–5): held out for evaluation and calibration, never a label input" },
  { entity: "response", name: "explicit_down", meaning: "explicit negative ratings (down, 1–2)" },
  { entity: "response", name: "last_event_time", meaning: "event time (ms) of the latest event about it" },
  { entity: "user", name: "count_<event_type>", meaning: "events of the user per event type (all bands, humans and ambivalent)" },
  { entity: "user", name: "events", meaning: "events of the user" },
  { entity: "user", name: "bot_score", meaning: "the latest bot score (bot-score's attrs.bot.score); once flagged, the score of the flag" },
  { entity: "user", name: "bot_band", meaning: "human or ambivalent (ambivalent users get features but no labels); bot once bot-score flagged the user, for as long as label-derive's state of the user lives (no labels, held ones dropped, published ones retracted)" },
  { entity: "user", name: "accept_rate", meaning: "exponentially weighted accepts per response (event-time half-life baselines.half_life, smoothed towards the prior)" },
  { entity: "user", name: "edit_rate", meaning: "exponentially weighted edits per response" },
  { entity: "user", name: "regenerate_rate", meaning: "exponentially weighted regenerations per response" },
  { entity: "user", name: "copy_rate", meaning: "exponentially weighted copies per response" },
  { entity: "user", name: "dwell_ewma_ms", meaning: "exponentially weighted mean dwell (ms)" },
  { entity: "user", name: "baseline_accept", meaning: "the factor clamp(prior / accept_rate, floor, 1) applied to the user's accept-based labels" },
  { entity: "user", name: "baseline_edit", meaning: "the same for edit-based labels" },
  { entity: "user", name: "baseline_regenerate", meaning: "the same for regenerate-based labels" },
  { entity: "user", name: "baseline_copy", meaning: "the same for copy-based labels" },
  { entity: "user", name: "explicit_up", meaning: "explicit positive ratings given (held out, never a label input)" },
  { entity: "user", name: "explicit_down", meaning: "explicit negative ratings given" },
  { entity: "user", name: "last_event_time", meaning: "event time (ms) of the user's latest event" },
  { entity: "session", name: "count_<event_type>", meaning: "events of the session per event type" },
  { entity: "session", name: "events", meaning: "events in the session" },
  { entity: "session", name: "start", meaning: "event time (ms) of its first event" },
  { entity: "session", name: "end", meaning: "event time (ms) of its last event" },
  { entity: "session", name: "duration_ms", meaning: "end − start" },
  { entity: "session", name: "pos_weight", meaning: "summed weight of positive response labels decided in the session (written once they are released: for a user on probation, when the session closes; 0 after a bot flag)" },
  { entity: "session", name: "neg_weight", meaning: "summed weight of negative response labels decided in the session" },
];

const COUNT_FIELDS = new NameCache("count_");

/** The `count_<event_type>` field of an event type. */
export function countField(type: string): string {
  return COUNT_FIELDS.of(type);
}

/** Every concrete field name of an entity (patterns expanded over the v1 event types). */
export function fieldNames(entity: FeatureEntity): string[] {
  return FEATURE_FIELDS.filter((f) => f.entity === entity).flatMap((f) => (f.name.endsWith("<event_type>") ? EVENT_TYPES.map((t) => countField(t)) : [f.name]));
}

/** Features of one entity as read from Redis: numbers where the stored text is a number. */
export interface FeatureRecord {
  entity: FeatureEntity;
  id: string;
  /** The user pseudonym the entity belongs to. */
  user: string;
  fields: Record<string, number | string>;
}

function typed(raw: Record<string, string>): Record<string, number | string> {
  const out: Record<string, number | string> = {};
  for (const k of Object.keys(raw).sort()) {
    const v = raw[k]!;
    const n = Number(v);
    out[k] = v.trim() !== "" && Number.isFinite(n) ? n : v;
  }
  return out;
}

/**
 * Reads the features of a user (id = pseudonym), response or session (found through its index
 * pointer). Null when nothing is stored (unknown id, or expired).
 */
export async function readFeatures(state: StateStore, prefix: string, entity: FeatureEntity, id: string): Promise<FeatureRecord | null> {
  let user = id;
  if (entity !== "user") {
    const [u] = await state.get([indexKey(prefix, entity, id)]);
    if (u === null || u === undefined) return null;
    user = u;
  }
  const key = entity === "user" ? userFeaturesKey(prefix, user) : entity === "response" ? responseFeaturesKey(prefix, user, id) : sessionFeaturesKey(prefix, user, id);
  const raw = await state.hgetall(key);
  if (Object.keys(raw).length === 0) return null;
  return { entity, id, user, fields: typed(raw) };
}

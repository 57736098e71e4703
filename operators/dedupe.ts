import type { JSONSchemaType } from "ajv";
import { DURATION_SCHEMA, parseDuration } from "../src/core/duration.js";
import { BadInputError, TransientError, errorMessage } from "../src/core/errors.js";
import type { Envelope } from "../src/core/event.js";
import type { LintIssue, OperatorContext, OperatorSpec, Outcome, PipelineView, Processor, StageInput } from "../src/core/operator.js";
import { userKey, type ClaimItem } from "../src/core/state.js";

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/** Config of a `dedupe` stage as written in the pipeline YAML. */
export interface DedupeConfig {
  /** How long after the first copy of an event a repeat is still dropped. @default "24h" */
  window?: string;
}

/** JSON Schema of the `dedupe` config; ajv fills in the defaults. */
export const dedupeConfigSchema: JSONSchemaType<DedupeConfig> = {
  type: "object",
  additionalProperties: false,
  properties: {
    window: {
      ...DURATION_SCHEMA,
      nullable: true,
      default: "24h",
      description:
        "Repeats of an event_id (or fingerprint) within this time of the first copy's processing are dropped. " +
        "It is also the TTL of the per-event record in Redis, so memory grows with events per window.",
      examples: ["24h", "1h", "7d"],
    },
  },
};

/** The config with defaults applied, in ms. */
export interface CompiledDedupeConfig {
  windowMs: number;
}

/** Applies defaults (also when the runtime has not) and parses the window. */
export function compileDedupeConfig(c: DedupeConfig = {}): CompiledDedupeConfig {
  const windowMs = parseDuration(c.window ?? "24h", "window");
  return { windowMs };
}

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

/** The `dedupe` operator: drops repeated events, but never a redelivered or replayed copy of the same input. */
export const dedupe: OperatorSpec<DedupeConfig> = {
  name: "dedupe",
  summary: "Drops repeats of an event_id (or fingerprint) within a window; redeliveries and replays of the same input pass.",
  description: [
    "Keyed by user. For every event the stage claims `seen:<event_id>` for the user with `<seq>:<src.seq>`: the sequence of the input in dedupe's own stream " +
      "and the event's origin sequence in the pipeline's input stream; one `SET NX GET` per event, all of a batch in one round trip:",
    "",
    "- nothing there: the first copy, it passes;",
    "- the same input sequence: this very message again (a redelivery after a crash, or a replay of dedupe's durable), it passes again with the same output id; " +
      "the runtime's replay fence keeps a replayed copy from being published twice;",
    "- the same `src.seq` but another input sequence: the stage before re-published an input it had already passed on (its replay, beyond the stream's " +
      "duplicate window), it is dropped as `republished`, so the stages after dedupe never count one event twice;",
    "- another `src.seq`: a producer re-sent the event (a retry, a double tap), it is dropped as `duplicate`.",
    "",
    "Within one batch, copies are decided in order: the first passes, the rest are dropped.",
    "",
    "The window is measured from the first copy's processing, not from its event time: the record is written with TTL = `window` when the first copy is seen. " +
      "That is what de-duplication needs (producers re-send soon after the original; a repeat whose first copy was processed more than `window` ago passes again) " +
      "and it keeps state bounded without reading any clock. The choice is deterministic on replay as long as the records are there: a replay within the window finds " +
      "each event's own record (same `src.seq`, so it passes) and the duplicates' records point to the first copy. " +
      "A rebuild wipes the state and replays the input from the start, so the first copy claims again before its duplicates and the same copies pass, " +
      "with one exception: a repeat that arrived more than `window` after its first copy passed as new in the live run, but a rebuild (faster than real time) drops it. " +
      "Set `window` longer than any producer's retry horizon and such repeats do not occur.",
  ].join("\n"),
  keyed: true,
  schema: dedupeConfigSchema as unknown as Record<string, unknown>,
  state: [
    {
      key: "tacit:{<prefix>:u:<user>}:<stage>:seen:<event_id>",
      holds: "`<seq>:<src.seq>` of the first copy of the event (its sequence in dedupe's input stream and in the pipeline's input stream): a first-writer-wins record.",
      ttl: "window (default 24h), from the first copy's processing",
    },
  ],
  outputs: [],
  examples: [
    { title: "Default: one day", config: {} },
    { title: "A week, for producers that retry from offline queues", config: { window: "7d" } },
  ],
  lint: lintDedupe,
  create: createDedupe,
};

// ---------------------------------------------------------------------------------------------
// Lint
// ---------------------------------------------------------------------------------------------

const MIN_WINDOW_MS = 60_000;

function lintDedupe(config: DedupeConfig, view: PipelineView): LintIssue[] {
  const issues: LintIssue[] = [];
  let windowMs: number | undefined;
  try {
    windowMs = compileDedupeConfig(config).windowMs;
  } catch (err) {
    issues.push({ path: ["window"], message: errorMessage(err) });
  }
  if (windowMs !== undefined && windowMs < MIN_WINDOW_MS) {
    issues.push({
      path: ["window"],
      message: `window ${config.window} is shorter than a minute: producers' retries and redeliveries usually arrive later and would pass as new events`,
      hint: "use at least 1m; the default is 24h",
    });
  }
  const enrichAt = view.stages.findIndex((s) => s.operator === "enrich");
  if (enrichAt === -1 || enrichAt > view.index) {
    issues.push({
      path: [],
      message: "dedupe needs an enrich stage before it: it reads event ids and pseudonymized users from enrich's envelopes",
      hint: "put an enrich stage first",
    });
  }
  return issues;
}

// ---------------------------------------------------------------------------------------------
// Processing
// ---------------------------------------------------------------------------------------------

function createDedupe(config: DedupeConfig, ctx: OperatorContext): Processor {
  const { windowMs } = compileDedupeConfig(config);
  const seenKey = (env: Envelope): string => userKey(ctx.prefix, env.event.user, ctx.stage, "seen", env.event.event_id);

  return {
    async process(batch: StageInput[]): Promise<Outcome[]> {
      const outcomes: (Outcome | undefined)[] = new Array(batch.length);
      const claimed: { index: number; env: Envelope }[] = [];
      const items: ClaimItem[] = [];
      batch.forEach((input, i) => {
        const env = input.envelope;
        if (!env || typeof env.event?.event_id !== "string" || typeof env.event.user !== "string" || typeof env.src?.seq !== "number") {
          outcomes[i] = { emits: [], error: new BadInputError("bad_envelope", "dedupe needs an envelope with event.event_id, event.user and src.seq") };
          return;
        }
        claimed.push({ index: i, env });
        items.push({ key: seenKey(env), value: `${input.seq}:${env.src.seq}`, ttl_ms: windowMs });
      });
      if (items.length === 0) return outcomes as Outcome[];

      let previous: (string | null)[];
      try {
        // One call, in batch order: a second copy in the same batch sees the first one's claim.
        previous = await ctx.state.claim(items);
      } catch (err) {
        const retry = err instanceof TransientError ? err : new TransientError("state_unavailable", `dedupe claim: ${errorMessage(err)}`, err);
        for (const c of claimed) outcomes[c.index] = { emits: [], error: retry };
        return outcomes as Outcome[];
      }

      claimed.forEach(({ index, env }, j) => {
        const prior = previous[j];
        const seq = batch[index]!.seq;
        if (prior == null || prior === `${seq}:${env.src.seq}`) {
          outcomes[index] = { emits: [{ to: "next", id: `${ctx.stage}:${env.src.seq}`, value: env }] };
        } else if (prior.endsWith(`:${env.src.seq}`)) {
          outcomes[index] = { emits: [], dropped: "republished" };
        } else {
          outcomes[index] = { emits: [], dropped: "duplicate" };
        }
      });
      return outcomes as Outcome[];
    },
  };
}

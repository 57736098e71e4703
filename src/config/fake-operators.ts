import { DURATION_SCHEMA, parseDuration } from "../core/duration.js";
import type { OperatorSpec, Processor } from "../core/operator.js";

/**
 * Stand-in operators with real JSON Schemas, for the config tests: they let loading and lint be
 * tested on their own, whatever the registry holds. Their names match the real operators so the
 * order rules of lint apply to them. Not for production use.
 */

const noop = (): Processor => ({ process: async (batch) => batch.map(() => ({ emits: [] })) });

const base = { state: [], outputs: [], create: noop };

export const FAKE_OPERATORS: readonly OperatorSpec<any>[] = [
  {
    ...base,
    name: "enrich",
    summary: "Validates and pseudonymizes raw events (fake).",
    description: "Test stand-in for enrich.",
    keyed: false,
    schema: {
      type: "object",
      additionalProperties: false,
      properties: {
        sample: {
          description: "Sampling rate per event type.",
          type: "object",
          additionalProperties: { type: "number", minimum: 0, maximum: 1 },
          default: {},
        },
        redact_pii: { description: "Redact PII in free text.", type: "boolean", default: true },
      },
    },
    examples: [{ title: "sample clicks", config: { sample: { click: 0.5 } } }],
  },
  {
    ...base,
    name: "dedupe",
    summary: "Drops repeated events (fake).",
    description: "Test stand-in for dedupe.",
    keyed: true,
    schema: {
      type: "object",
      additionalProperties: false,
      properties: {
        window: { description: "How long an event id is remembered.", ...DURATION_SCHEMA, default: "10m" },
        key: { description: "What identifies a repeat.", enum: ["event_id", "fingerprint"], default: "event_id" },
      },
    },
    examples: [{ title: "one hour", config: { window: "1h" } }],
  },
  {
    ...base,
    name: "bot-score",
    summary: "Scores bots (fake).",
    description: "Test stand-in for bot-score.",
    keyed: true,
    schema: {
      type: "object",
      additionalProperties: false,
      properties: {
        threshold: { description: "Score above which a user is a bot.", type: "number", minimum: 0, maximum: 1, default: 0.8 },
        ambivalent: { description: "Score above which no labels are produced.", type: "number", minimum: 0, maximum: 1, default: 0.5 },
      },
    },
    examples: [{ title: "strict", config: { threshold: 0.6, ambivalent: 0.3 } }],
    lint: (c: { threshold: number; ambivalent: number }) =>
      c.ambivalent < c.threshold ? [] : [{ path: ["ambivalent"], message: "must be below threshold", hint: `lower it under ${c.threshold}` }],
  },
  {
    ...base,
    name: "sessionize",
    summary: "Session windows (fake).",
    description: "Test stand-in for sessionize.",
    keyed: true,
    schema: {
      type: "object",
      additionalProperties: false,
      properties: {
        gap: { description: "Inactivity gap closing a session.", ...DURATION_SCHEMA, default: "30m" },
        allowed_lateness: { description: "How late an event may still join its session.", ...DURATION_SCHEMA, default: "5m" },
      },
    },
    examples: [{ title: "short sessions", config: { gap: "10m", allowed_lateness: "1m" } }],
    lint: (c: { gap: string; allowed_lateness: string }) =>
      parseDuration(c.allowed_lateness) < parseDuration(c.gap)
        ? []
        : [{ path: ["allowed_lateness"], message: `${c.allowed_lateness} is not shorter than gap ${c.gap}`, hint: "allowed lateness must be less than the gap" }],
  },
  {
    ...base,
    name: "label-derive",
    summary: "Derives labels (fake).",
    description: "Test stand-in for label-derive.",
    keyed: true,
    schema: {
      type: "object",
      additionalProperties: false,
      properties: {
        rules: {
          description: "Label rules.",
          type: "array",
          default: [],
          items: {
            type: "object",
            additionalProperties: false,
            required: ["signal", "weight"],
            properties: {
              signal: { description: "Event type.", type: "string" },
              weight: { description: "Label weight.", type: "number", minimum: 0 },
            },
          },
        },
      },
    },
    examples: [{ title: "copy", config: { rules: [{ signal: "copy_paste", weight: 1 }] } }],
  },
  {
    ...base,
    name: "relay",
    summary: "Passes events on (fake).",
    description: "Test stand-in for an unkeyed stage.",
    keyed: false,
    schema: { type: "object", additionalProperties: false, properties: {} },
    examples: [],
  },
];

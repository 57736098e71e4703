import { context, trace, type Span } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";

const w3c = new W3CTraceContextPropagator();
const tracer = trace.getTracer("tacit");

/**
 * Follows one event across stages through the `traceparent` NATS header (W3C Trace Context).
 * A message that carries one gets a span for its stage group, and its outputs carry the span's
 * traceparent. Without an OpenTelemetry SDK registered, spans are non-recording and the header
 * passes through unchanged; messages without the header cost nothing.
 */
export function startStageSpan(traceparent: string | undefined, group: string): { span: Span; traceparent: string } | undefined {
  if (!traceparent) return undefined;
  const parent = w3c.extract(context.active(), { traceparent }, { get: (c, k) => (c as Record<string, string>)[k], keys: (c) => Object.keys(c as object) });
  const span = tracer.startSpan(`tacit ${group}`, {}, parent);
  const carrier: Record<string, string> = {};
  w3c.inject(trace.setSpan(parent, span), carrier, { set: (c, k, v) => ((c as Record<string, string>)[k] = v) });
  return { span, traceparent: carrier.traceparent ?? traceparent };
}


import type { Command } from "commander";
import { AckPolicy, DeliverPolicy, type ConsumerConfig } from "@nats-io/jetstream";
import { randomBytes } from "node:crypto";
import type { Pipeline } from "../config/types.js";
import { ConfigError } from "../core/errors.js";
import { connectNats } from "../runtime/nats.js";
import { streamName } from "../config/topology.js";
import { action, loadForCli, pipelineCommand, type PipelineOptions } from "./common.js";

const OUTPUTS = ["labels", "dlq", "late", "bots", "sessions", "events"] as const;
type OutputKind = (typeof OUTPUTS)[number];

/** Where to start reading: `start`, `new`, a stream sequence, or an RFC 3339 time. */
export function startPolicy(from: string | undefined, count: number | undefined): Partial<ConsumerConfig> {
  if (from === undefined) return count !== undefined ? { deliver_policy: DeliverPolicy.All } : { deliver_policy: DeliverPolicy.New };
  if (from === "start") return { deliver_policy: DeliverPolicy.All };
  if (from === "new") return { deliver_policy: DeliverPolicy.New };
  if (/^\d+$/.test(from)) return { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: Number(from) };
  const t = Date.parse(from);
  if (Number.isNaN(t)) throw new ConfigError(`--from ${from}: expected start, new, a stream sequence or an RFC 3339 time`);
  return { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(t).toISOString() };
}

function filterFor(p: Pipeline, kind: OutputKind, sub?: string): string | undefined {
  if (!sub) return undefined;
  return `${p.subject_prefix}.${kind}.${sub}`;
}

export function registerTail(program: Command): void {
  pipelineCommand(
    program
      .command("tail <pipeline> <output>")
      .description(`follow an output: ${OUTPUTS.join(" | ")} (labels: --sub response|preference|session; dlq: --sub <stage>)`)
      .option("--from <where>", "start, new, a stream sequence, or an RFC 3339 time (default: new; with --count: start)")
      .option("--count <n>", "stop after n messages", (v) => Number(v))
      .option("--sub <token>", "narrow to one subject: a label kind, or a stage for dlq")
      .option("--timeout <ms>", "with --count: give up after this long without a message", (v) => Number(v), 5000),
  ).action(
    action(async (file: string, output: string, opts: PipelineOptions & { from?: string; count?: number; sub?: string; timeout: number }) => {
      if (!(OUTPUTS as readonly string[]).includes(output)) throw new ConfigError(`unknown output "${output}": use one of ${OUTPUTS.join(", ")}`);
      const kind = output as OutputKind;
      const p = loadForCli(file, opts);
      const nats = await connectNats(p, "tacit-tail");
      const stream = streamName(p, kind);
      const name = `tail_${randomBytes(4).toString("hex")}`;
      const filter = filterFor(p, kind, opts.sub);
      await nats.jsm.consumers.add(stream, {
        name,
        ack_policy: AckPolicy.None,
        inactive_threshold: 30_000_000_000,
        ...(filter ? { filter_subject: filter } : {}),
        ...startPolicy(opts.from, opts.count),
      });
      const consumer = await nats.js.consumers.get(stream, name);
      let seen = 0;
      const stop = async () => {
        await nats.jsm.consumers.delete(stream, name).catch(() => undefined);
        await nats.nc.close();
      };
      process.once("SIGINT", () => void stop());
      try {
        for (;;) {
          const m = await consumer.next({ expires: opts.count !== undefined ? Math.max(1000, opts.timeout) : 30_000 });
          if (!m) {
            if (opts.count !== undefined) break;
            continue;
          }
          seen++;
          const text = new TextDecoder().decode(m.data);
          let value: unknown = text;
          try {
            value = JSON.parse(text);
          } catch {
            // dead letters keep the original bytes, which need not be JSON
          }
          const hdrs: Record<string, string> = {};
          if (m.headers) for (const [k, v] of m.headers) if (k.startsWith("Tacit-")) hdrs[k] = v.join(",");
          if (opts.json) {
            process.stdout.write(JSON.stringify({ subject: m.subject, seq: m.seq, time: m.time.toISOString(), ...(Object.keys(hdrs).length ? { headers: hdrs } : {}), data: value }) + "\n");
          } else {
            const head = kind === "dlq" ? `[${hdrs["Tacit-Stage"]}] ${hdrs["Tacit-Reason"]}: ${hdrs["Tacit-Message"]}\n  ` : "";
            process.stdout.write(`${m.seq} ${m.subject} ${head}${text}\n`);
          }
          if (opts.count !== undefined && seen >= opts.count) break;
        }
      } finally {
        await stop();
      }
      return 0;
    }),
  );
}

// Hostile input at scale (issue 12, item 6): a fast-check property over ≥ 100,000 generated
// messages — random bytes, invalid UTF-8, deep nesting, oversized strings, __proto__ and
// constructor keys, wrong types in every field, timestamps at the edges — published to the
// input subjects of a real `tacit run` worker (enrich) on real nats-server and redis-server.
// The property: the worker never crashes, and every input is either output once or
// dead-lettered once, with its bytes and a reason (conservation by input stream sequence).
// With the dead-letter path broken on purpose (a DLQ stream that silently keeps only 50
// letters), the same property fails.
// Runs of 10,000 inputs: 3 by default (CI), 10 (100,000 inputs) with TACIT_LONG=1, or TACIT_FUZZ_RUNS.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { startServers, type TestServers } from "./harness.js";
import { consumersDrained, eventually, readStream } from "./support/streams.js";
import { spawnTacit, type TacitProcess } from "./support/tacit-process.js";
import { findOperator } from "../operators/index.js";
import { benchEvents } from "../src/bench/bench.js";
import { projectRoot } from "../src/config/paths.js";
import { loadPipelineOrThrow } from "../src/config/load.js";
import type { Pipeline } from "../src/config/types.js";
import { inputSubject, streamName } from "../src/config/topology.js";
import { EVENT_TYPES } from "../src/core/event.js";
import { applyDeploy, planDeploy } from "../src/runtime/deploy.js";
import { connectNats, type NatsHandles } from "../src/runtime/nats.js";
import { DLQ_HEADERS } from "../src/runtime/outputs.js";
import { subjectForLine } from "../src/runtime/publisher.js";

const PIPELINE = join(projectRoot(), "test", "fixtures", "e2e", "enrich-only.yaml");
const KEY = "t1:fuzz-test-secret-0123456789abcdef";
const BATCH = 10_000;
const RUNS = Number(process.env.TACIT_FUZZ_RUNS ?? (process.env.TACIT_LONG === "1" ? 10 : 3));
const enc = new TextEncoder();

/** One generated input: its bytes, the subject it is published to, and whether it must be output. */
interface Hostile {
  kind: string;
  subject: (p: Pipeline) => string;
  bytes: () => Uint8Array;
  /** True for unchanged valid events: they must come out, not be dead-lettered. */
  valid?: boolean;
}

// Valid events to mutate: every event type, stamped a minute ago (inside enrich's time bounds).
const BASE = [...benchEvents(400, 40, Date.now() - 60_000)].map((l) => JSON.parse(l) as Record<string, unknown>);
const PAYLOAD_FIELDS = ["text", "position", "candidates", "model", "text_length", "span_start", "span_end", "span_length", "destination", "edit_distance", "original_text", "edited_text", "original_length", "dwell_ms", "scroll_depth", "outcome", "rating"];
const TOP_FIELDS = ["event_id", "session_id", "user_id", "timestamp", "query_id", "response_id", "event_type", "payload", "user_agent", "context"];
const TYPES = [...EVENT_TYPES, "_invalid", "teleport"];

const line = (o: unknown) => JSON.stringify(o);
const textInput = (kind: string, text: string, valid = false): Hostile => ({ kind, subject: (p) => subjectForLine(p, text), bytes: () => enc.encode(text), valid });
const base = fc.integer({ min: 0, max: BASE.length - 1 }).map((i) => structuredClone(BASE[i]!));

const wrongValue = fc.oneof(
  fc.constantFrom<unknown>(null, true, false, 0, -1, 1.5, 1e308, -1e308, Number.MAX_SAFE_INTEGER + 2, "", " ", "\u0000", "💥", [], {}, [null], { a: 1 }),
  fc.jsonValue({ maxDepth: 3 }),
  fc.string({ maxLength: 40, unit: "binary" }),
);

const TIMESTAMPS = [
  "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "1969-12-31T23:59:59.999Z", "1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z",
  "+275760-09-13T00:00:00.000Z", "-271821-04-20T00:00:00.000Z", "2024-02-30T00:00:00Z", "2023-02-29T12:00:00Z", "2024-13-01T00:00:00Z",
  "2024-01-01T24:00:00Z", "2024-06-30T23:59:60Z", "2024-01-01T00:00:00+24:00", "2024-01-01T00:00:00-23:59", "2024-01-01T00:00:00",
  "2024-01-01 00:00:00Z", "2024-01-01t00:00:00z", "2024-01-01T00:00:00.Z", `2024-01-01T00:00:00.${"9".repeat(400)}Z`, "", "now", "1714550400",
];
const timestamp = fc.oneof(
  fc.constantFrom(...TIMESTAMPS),
  // Around the stream-time bounds: max_future_skew 1h ahead, max_past_age 30d behind.
  fc.integer({ min: -5_000, max: 5_000 }).map((d) => new Date(Date.now() + 3_600_000 + d).toISOString()),
  fc.integer({ min: -5_000, max: 5_000 }).map((d) => new Date(Date.now() - 30 * 86_400_000 + d).toISOString()),
  fc.date({ min: new Date(-8.64e15), max: new Date(8.64e15), noInvalidDate: true }).map((d) => d.toISOString()),
  fc.oneof(fc.integer(), fc.constant(null), fc.double()),
);

const hostileRaw: fc.Arbitrary<Hostile> = fc.oneof(
  // Random bytes on any input subject.
  fc.record({ b: fc.uint8Array({ maxLength: 600 }), t: fc.constantFrom(...TYPES) }).map(({ b, t }): Hostile => ({ kind: "bytes", subject: (p) => inputSubject(p, t), bytes: () => b })),
  // A valid event with invalid UTF-8 spliced in somewhere.
  fc.record({ e: base, at: fc.nat(), bad: fc.constantFrom([0xff], [0xc3, 0x28], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xc0, 0xaf]) }).map(({ e, at, bad }): Hostile => {
    const ok = enc.encode(line(e));
    const i = at % (ok.length + 1);
    return { kind: "utf8", subject: (p) => inputSubject(p, String(e.event_type)), bytes: () => new Uint8Array([...ok.subarray(0, i), ...bad, ...ok.subarray(i)]) };
  }),
  // Deep nesting in context or payload (arrays and objects, up to 30,000 levels: some also oversized).
  fc.record({ e: base, depth: fc.integer({ min: 50, max: 30_000 }), obj: fc.boolean(), where: fc.constantFrom("context", "payload", "top") }).map(({ e, depth, obj, where }) => {
    const nest = obj ? '{"a":'.repeat(depth) + "1" + "}".repeat(depth) : "[".repeat(depth) + "]".repeat(depth);
    const text = where === "top" ? nest : line({ ...e, [where]: "@@" }).replace('"@@"', nest);
    return textInput("nesting", text);
  }),
  // Strings around and far beyond max_event_bytes (65,536), single- and multi-byte.
  fc.record({ e: base, n: fc.oneof(fc.integer({ min: 65_000, max: 66_000 }), fc.integer({ min: 100_000, max: 400_000 })), ch: fc.constantFrom("x", "é", "漢", "😀", "\\u0000") }).map(({ e, n, ch }) => {
    const field = e.event_type === "query" ? "text" : "note";
    const big = ch.repeat(Math.ceil(n / enc.encode(ch).length));
    return { kind: "oversized", subject: (p: Pipeline) => inputSubject(p, String(e.event_type)), bytes: () => enc.encode(line({ ...e, payload: { ...(e.payload as object), [field]: big } })) };
  }),
  // __proto__ / constructor / prototype keys at every level, as JSON text (JSON.parse makes them own keys).
  fc.record({ e: base, key: fc.constantFrom("__proto__", "constructor", "prototype"), where: fc.constantFrom("top", "payload", "context"), v: fc.constantFrom('{"polluted":1}', '{"prototype":{"polluted":1}}', "null", "1", '"x"', '{"toString":1,"valueOf":1,"hasOwnProperty":1}') }).map(({ e, key, where, v }) => {
    const injected = `"${key}":${v}`;
    const text = where === "top" ? line(e).replace("{", `{${injected},`) : line({ ...e, [where]: "@@" }).replace('"@@"', `{${injected}}`);
    return textInput("proto", text);
  }),
  // A wrong value in every top-level and payload field.
  fc.record({ e: base, top: fc.boolean(), ti: fc.nat(), pi: fc.nat(), v: wrongValue }).map(({ e, top, ti, pi, v }) => {
    if (top) e[TOP_FIELDS[ti % TOP_FIELDS.length]!] = v;
    else e.payload = { ...(e.payload as object), [PAYLOAD_FIELDS[pi % PAYLOAD_FIELDS.length]!]: v };
    return textInput("types", line(e));
  }),
  // A field missing or the whole message of another JSON type.
  fc.record({ e: base, ti: fc.nat() }).map(({ e, ti }) => {
    delete e[TOP_FIELDS[ti % TOP_FIELDS.length]!];
    return textInput("missing", line(e));
  }),
  fc.jsonValue({ maxDepth: 4 }).map((v) => textInput("json", line(v) ?? "null")),
  // Timestamps at the edges.
  fc.record({ e: base, ts: timestamp }).map(({ e, ts }) => textInput("timestamp", line({ ...e, timestamp: ts }))),
  // Unchanged valid events (with a fresh id): these must be output.
  fc.record({ e: base, id: fc.uuid() }).map(({ e, id }) => textInput("valid", line({ ...e, event_id: id }), true)),
);

// A failure report names each input by its kind and first bytes, not its closures.
const hostile = hostileRaw.map((h) => Object.assign(h, { [fc.toStringMethod]: () => `${h.kind}:${new TextDecoder().decode(h.bytes().subarray(0, 60))}` }));

interface Sent {
  seq: number;
  kind: string;
  valid: boolean;
  sha: string;
}

const sha = (b: Uint8Array) => createHash("sha1").update(b).digest("hex");

/** Publishes the inputs in windows of 1,000 in flight; returns each one's input stream sequence. */
async function publishAll(p: Pipeline, nats: NatsHandles, inputs: Hostile[], run: string): Promise<Sent[]> {
  const sent: Sent[] = [];
  for (let i = 0; i < inputs.length; i += 1000) {
    const window = inputs.slice(i, i + 1000).map(async (h, j) => {
      const bytes = h.bytes();
      const ack = await nats.js.publish(h.subject(p), bytes, { msgID: `${run}:${i + j}`, timeout: 30_000 });
      return { seq: ack.seq, kind: h.kind, valid: h.valid === true, sha: sha(bytes) };
    });
    sent.push(...(await Promise.all(window)));
  }
  return sent;
}

/**
 * What breaks conservation: an input neither output nor dead-lettered, one both or twice, a
 * letter without a reason or with other bytes than the input's, a valid event dead-lettered.
 */
async function conservationProblems(p: Pipeline, nats: NatsHandles, sent: Sent[]): Promise<string[]> {
  const problems: string[] = [];
  const out = new Map<number, number>();
  for (const m of await readStream(nats, streamName(p, "events"))) {
    const seq = (JSON.parse(m.data) as { src: { seq: number } }).src.seq;
    out.set(seq, (out.get(seq) ?? 0) + 1);
  }
  const dlq = new Map<number, { n: number; reason: string; sha: string }>();
  for (const m of await readStream(nats, streamName(p, "dlq"))) {
    const seq = Number(m.headers[DLQ_HEADERS.sourceSeq]);
    const prev = dlq.get(seq);
    dlq.set(seq, { n: (prev?.n ?? 0) + 1, reason: m.headers[DLQ_HEADERS.reason] ?? "", sha: sha(m.raw) });
  }
  const bySeq = new Map(sent.map((s) => [s.seq, s]));
  for (const s of sent) {
    const o = out.get(s.seq) ?? 0;
    const d = dlq.get(s.seq);
    const where = `input #${s.seq} (${s.kind})`;
    if (o + (d?.n ?? 0) !== 1) problems.push(`${where}: output ${o}×, dead-lettered ${d?.n ?? 0}×`);
    if (d && !/^[a-z_]+$/.test(d.reason)) problems.push(`${where}: dead letter without a reason`);
    if (d && d.sha !== s.sha) problems.push(`${where}: dead letter holds other bytes than the input`);
    if (s.valid && o !== 1) problems.push(`${where}: a valid event was not output (${d?.reason ?? "missing"})`);
  }
  for (const seq of [...out.keys(), ...dlq.keys()]) if (!bySeq.has(seq)) problems.push(`output or letter for unknown input #${seq}`);
  return problems;
}

async function drained(p: Pipeline, nats: NatsHandles, timeoutMs: number): Promise<void> {
  let streak = 0;
  await eventually("the input to drain", async () => {
    streak = (await consumersDrained(nats, [streamName(p, "in")])) ? streak + 1 : 0;
    return streak >= 2;
  }, timeoutMs, 200);
}

/** The property: a batch of hostile inputs through the worker conserves every input. */
function conservation(p: Pipeline, nats: NatsHandles, worker: TacitProcess, label: string, stats: { inputs: number; letters: number; kinds: Map<string, number> }) {
  let run = 0;
  return fc.asyncProperty(fc.array(hostile, { minLength: BATCH, maxLength: BATCH }), async (inputs) => {
    const sent = await publishAll(p, nats, inputs, `${label}${run++}`);
    await drained(p, nats, 120_000).catch((err: unknown) => {
      throw new Error(`${String(err)}; worker log: ${worker.stderr().slice(-1500)}`);
    });
    assert.ok(worker.running(), `the worker died: ${worker.stderr().slice(-2000)}`);
    const problems = await conservationProblems(p, nats, sent);
    stats.inputs += sent.length;
    stats.letters += (await nats.jsm.streams.info(streamName(p, "dlq"))).state.messages;
    for (const s of sent) stats.kinds.set(s.kind, (stats.kinds.get(s.kind) ?? 0) + 1);
    // The next run starts from empty streams.
    for (const s of ["in", "events", "dlq"]) await nats.jsm.streams.purge(streamName(p, s));
    assert.deepEqual(problems.slice(0, 10), [], `${problems.length} inputs not conserved`);
  });
}

test(`fuzz: ${RUNS * BATCH} hostile inputs through a real enrich worker are each output or dead-lettered with a reason; a broken DLQ path fails the property`, { timeout: 60_000 + RUNS * 90_000 }, async (t) => {
  const servers: TestServers = await startServers();
  t.after(() => servers.stop());
  const env = { NATS_URL: servers.natsUrl, REDIS_URL: servers.redisUrl, TEST_PIPELINE: "fz", TACIT_PSEUDONYM_KEY: KEY };
  const p = loadPipelineOrThrow(PIPELINE, { env, operators: findOperator });
  const nats = await connectNats(p, "fuzz-test");
  t.after(() => nats.nc.close());
  await applyDeploy(p, nats.jsm, findOperator, await planDeploy(p, nats.jsm, findOperator));
  const worker = spawnTacit(["run", PIPELINE, "--metrics-port", "0"], { ...env, TACIT_HOME: mkdtempSync(join(tmpdir(), "tacit-home-")), TACIT_LOG_LEVEL: "warn" });
  t.after(() => {
    if (worker.running()) worker.child.kill("SIGKILL");
  });

  const stats = { inputs: 0, letters: 0, kinds: new Map<string, number>() };
  const t0 = Date.now();
  // fc.check, not fc.assert: the report gives the seed and the problems, not 10,000 inputs.
  const ok = await fc.check(conservation(p, nats, worker, "ok", stats), { numRuns: RUNS, endOnFailure: true });
  assert.ok(!ok.failed, `seed ${ok.seed}: ${String(ok.errorInstance)}`);
  t.diagnostic(`${stats.inputs} inputs in ${((Date.now() - t0) / 1000).toFixed(1)} s, ${stats.letters} dead-lettered; by kind ${JSON.stringify(Object.fromEntries(stats.kinds))}`);
  assert.ok(stats.inputs >= RUNS * BATCH);
  assert.ok(stats.letters > 0 && stats.letters < stats.inputs, "both outcomes occur");

  // Broken on purpose: the DLQ stream silently keeps only its 50 newest letters. The worker
  // publishes every letter (each publish is acknowledged), yet letters are lost: the property
  // must fail.
  const dlqName = streamName(p, "dlq");
  const info = await nats.jsm.streams.info(dlqName);
  await nats.jsm.streams.update(dlqName, { ...info.config, max_msgs: 50 });
  const broken = await fc.check(conservation(p, nats, worker, "broken", { inputs: 0, letters: 0, kinds: new Map() }), { numRuns: 1, endOnFailure: true });
  assert.ok(broken.failed, "the property must fail when dead letters are lost");
  assert.match(String(broken.errorInstance), /inputs not conserved[\s\S]*output 0×, dead-lettered 0×/);

  assert.ok(worker.running(), "the worker is still alive");
  worker.child.kill("SIGTERM");
  assert.equal(await worker.exited(), 0, worker.stderr());
});

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FAKE_OPERATORS } from "./fake-operators.js";
import { formatProblem, loadPipeline, loadPipelineOrThrow, PipelineConfigError, validateStageConfig, type LoadOptions } from "./load.js";
import { pipelineSchema } from "./ajv.js";
import { parseDuration } from "../core/duration.js";

const FIXTURES = fileURLToPath(new URL("../../../test/fixtures/pipelines/", import.meta.url));
const fixture = (name: string): string => join(FIXTURES, name);

/** 1-based line and column of the `nth` occurrence of `needle` in a fixture, so tests follow the file. */
function where(name: string, needle: string, nth = 1): { line: number; col: number } {
  const lines = readFileSync(fixture(name), "utf8").split("\n");
  let seen = 0;
  for (let i = 0; i < lines.length; i++) {
    const col = lines[i]!.indexOf(needle);
    if (col >= 0 && ++seen === nth) return { line: i + 1, col: col + 1 };
  }
  throw new Error(`${needle} not in ${name}`);
}

/** Position of the value in a `key: value` line of a fixture. */
function whereValue(name: string, keyValue: string): { line: number; col: number } {
  const w = where(name, keyValue);
  return { line: w.line, col: w.col + keyValue.indexOf(":") + 2 };
}

const load = (name: string, opts: LoadOptions = {}) => loadPipeline(fixture(name), { operators: FAKE_OPERATORS, env: {}, ...opts });

test("a valid file compiles, with durations in ms and stage lines", () => {
  const r = load("valid.yaml");
  assert.deepEqual(r.problems, []);
  const p = r.pipeline!;
  assert.equal(p.name, "shop");
  assert.equal(p.partitions, 4);
  assert.equal(p.streams.max_age_ms, parseDuration("36h"));
  assert.deepEqual(p.stages.map((s) => s.name), ["enrich", "dedupe", "bot-score", "sessionize", "label-derive"]);
  assert.equal(p.stages[2]!.fuse_with_previous, true);
  assert.equal(p.stages[1]!.line, where("valid.yaml", "name: dedupe").line);
  assert.equal(p.stages[1]!.config.window, "10m");
});

test("defaults of the pipeline schema and of operator schemas are applied", () => {
  const r = load("minimal.yaml");
  assert.deepEqual(r.problems, []);
  const p = r.pipeline!;
  // Expected values come from the schema itself, so the test follows it.
  const props = pipelineSchema().properties as Record<string, { properties?: Record<string, { default?: unknown }>; default?: unknown }>;
  const d = (section: string, field: string): unknown => props[section]!.properties![field]!.default;
  assert.equal(p.partitions, props.partitions!.default);
  assert.equal(p.subject_prefix, "tiny", "subject_prefix defaults to the name");
  assert.equal(p.streams.max_age_ms, parseDuration(d("streams", "max_age") as string));
  assert.equal(p.streams.duplicate_window_ms, parseDuration(d("streams", "duplicate_window") as string));
  assert.equal(p.streams.replicas, d("streams", "replicas"));
  assert.equal(p.streams.max_bytes, d("streams", "max_bytes"));
  assert.equal(p.runtime.batch_size, d("runtime", "batch_size"));
  assert.equal(p.runtime.max_deliver, d("runtime", "max_deliver"));
  assert.equal(p.runtime.ack_wait_ms, parseDuration(d("runtime", "ack_wait") as string));
  assert.deepEqual(p.runtime.retry_backoff_ms, (d("runtime", "retry_backoff") as string[]).map((x) => parseDuration(x)));
  assert.equal(p.runtime.lease_ttl_ms, parseDuration(d("runtime", "lease_ttl") as string));
  assert.equal(p.event_time.max_out_of_orderness_ms, parseDuration(d("event_time", "max_out_of_orderness") as string));
  assert.equal(p.event_time.idle_timeout_ms, parseDuration(d("event_time", "idle_timeout") as string));
  assert.equal(p.nats.url, "nats://127.0.0.1:4222", "NATS_URL unset: the default's fallback");
  assert.equal(p.redis.url, "redis://127.0.0.1:6379");
  assert.equal(p.redis.tls, false);
  assert.deepEqual(p.stages[0]!.config, { sample: {}, redact_pii: true }, "operator defaults");
  assert.equal(p.stages[0]!.fuse_with_previous, false);
});

test("NATS_URL and REDIS_URL are honoured through the defaults", () => {
  const r = load("minimal.yaml", { env: { NATS_URL: "nats://a:1,nats://b:2", REDIS_URL: "rediss://r:6380" } });
  assert.equal(r.pipeline!.nats.url, "nats://a:1,nats://b:2");
  assert.equal(r.pipeline!.redis.url, "rediss://r:6380");
  assert.deepEqual(r.pipeline!.redis.tls, {}, "rediss:// implies TLS");
});

test("bad indentation is reported at the misindented line with a hint", () => {
  const r = load("bad-indent.yaml");
  assert.equal(r.pipeline, undefined);
  assert.equal(r.problems.length, 1);
  const p = r.problems[0]!;
  assert.deepEqual({ line: p.line, col: p.col }, where("bad-indent.yaml", "config:"));
  assert.match(p.message, /^YAML: /);
  assert.ok(p.hint, "has a hint");
});

test("tabs and duplicate keys are YAML problems at their line", () => {
  const tab = load("tab-indent.yaml");
  assert.equal(tab.problems[0]!.line, where("tab-indent.yaml", "\toperator").line);
  assert.match(tab.problems[0]!.hint!, /spaces/);
  const dup = load("duplicate-key.yaml");
  assert.equal(dup.problems.length, 1);
  assert.deepEqual({ line: dup.problems[0]!.line, col: dup.problems[0]!.col }, where("duplicate-key.yaml", "name:", 2));
  assert.match(dup.problems[0]!.message, /duplicate key "name"/);
});

test("an unknown operator is located at its operator line, with the closest name and the known ones", () => {
  const r = load("unknown-operator.yaml");
  assert.equal(r.problems.length, 1);
  const p = r.problems[0]!;
  assert.deepEqual({ line: p.line, col: p.col }, whereValue("unknown-operator.yaml", "operator: dedup"));
  assert.match(p.message, /unknown operator "dedup"/);
  assert.match(p.hint!, /did you mean "dedupe"\?/);
  for (const o of FAKE_OPERATORS) assert.ok(p.hint!.includes(o.name), `hint lists ${o.name}`);
});

test("a wrong type in an operator config points at that config key", () => {
  const r = load("bad-config-type.yaml");
  assert.equal(r.problems.length, 1);
  const p = r.problems[0]!;
  assert.deepEqual({ line: p.line, col: p.col }, where("bad-config-type.yaml", "high"));
  assert.match(p.message, /^stages\.bots\.config\.threshold: must be a number/);
});

test("an unknown top-level key is pointed at, with did-you-mean", () => {
  const r = load("unknown-field.yaml");
  const p = r.problems.find((x) => /unknown field "partiton"/.test(x.message));
  assert.ok(p, JSON.stringify(r.problems));
  assert.deepEqual({ line: p.line, col: p.col }, where("unknown-field.yaml", "partiton"));
  assert.match(p.hint!, /did you mean "partitions"\?/);
});

test("secrets in clear are refused with a hint towards *_file / *_env", () => {
  const r = load("secret-in-clear.yaml");
  const field = r.problems.find((x) => /unknown field "password"/.test(x.message));
  assert.ok(field);
  assert.equal(field.line, where("secret-in-clear.yaml", "password:").line);
  assert.match(field.hint!, /password_file or password_env/);
  const url = r.problems.find((x) => /password in clear/.test(x.message));
  assert.ok(url);
  assert.equal(url.line, where("secret-in-clear.yaml", "hunter2@").line);
});

test("${VAR:-default} takes the default when unset and the value when set; whole plain references are re-typed", () => {
  const unset = load("env.yaml", { env: { TACIT_TEST_NATS: "nats://n:4222" } });
  assert.deepEqual(unset.problems, []);
  assert.equal(unset.pipeline!.partitions, 4);
  assert.equal(unset.pipeline!.description, "owned by nobody");
  assert.equal(unset.pipeline!.redis.url, "redis://cache:6379");
  assert.equal(unset.pipeline!.nats.url, "nats://n:4222");
  assert.equal(unset.pipeline!.stages[1]!.config.window, "10m");

  const set = load("env.yaml", {
    env: { TACIT_TEST_NATS: "nats://n:4222", TACIT_TEST_PARTITIONS: "16", TACIT_TEST_TEAM: "ml", TACIT_TEST_REDIS: "redis://other:1", TACIT_TEST_WINDOW: "1h" },
  });
  assert.deepEqual(set.problems, []);
  assert.equal(set.pipeline!.partitions, 16, "a number, not the string '16'");
  assert.equal(set.pipeline!.description, "owned by ml");
  assert.equal(set.pipeline!.redis.url, "redis://other:1");
  assert.equal(set.pipeline!.stages[1]!.config.window, "1h");
});

test("an unset ${VAR} without default is a problem at that scalar", () => {
  const r = load("env.yaml", { env: {} });
  assert.equal(r.pipeline, undefined);
  assert.equal(r.problems.length, 1);
  const p = r.problems[0]!;
  assert.deepEqual({ line: p.line, col: p.col }, where("env.yaml", "${TACIT_TEST_NATS}"));
  assert.match(p.message, /TACIT_TEST_NATS is not set/);
  assert.match(p.hint!, /\$\{TACIT_TEST_NATS:-/);
});

test("an expanded value that fails the schema says what it was expanded from", () => {
  const r = load("env.yaml", { env: { TACIT_TEST_NATS: "nats://n:4222", TACIT_TEST_WINDOW: "soon" } });
  assert.equal(r.problems.length, 1);
  const p = r.problems[0]!;
  assert.equal(p.line, where("env.yaml", "TACIT_TEST_WINDOW").line);
  assert.match(p.message, /"soon" is not a duration/);
  assert.match(p.hint!, /expanded from "\$\{TACIT_TEST_WINDOW:-10m\}"/);
});

test("--set by index and by stage name; values are YAML scalars", () => {
  const r = load("valid.yaml", { set: ["partitions=16", "stages.1.config.window=1h", "stages.sessionize.config.gap=45m", "streams.replicas=3", "runtime.retry_backoff=[2s, 4s]"] });
  assert.deepEqual(r.problems, []);
  const p = r.pipeline!;
  assert.equal(p.partitions, 16);
  assert.equal(typeof p.partitions, "number");
  assert.equal(p.stages[1]!.config.window, "1h");
  assert.equal(p.stages[3]!.config.gap, "45m");
  assert.equal(p.streams.replicas, 3);
  assert.deepEqual(p.runtime.retry_backoff_ms, [2000, 4000]);
});

test("--set creates missing keys and a bad --set value is reported at the line it replaced", () => {
  const created = load("minimal.yaml", { set: ["stages.enrich.config.redact_pii=false", "event_time.idle_timeout=5m"] });
  assert.deepEqual(created.problems, []);
  assert.equal(created.pipeline!.stages[0]!.config.redact_pii, false);
  assert.equal(created.pipeline!.event_time.idle_timeout_ms, 300_000);

  const bad = load("valid.yaml", { set: ["stages.dedupe.config.window=forever"] });
  assert.equal(bad.problems.length, 1);
  assert.equal(bad.problems[0]!.line, where("valid.yaml", "window: 10m").line);
  assert.match(bad.problems[0]!.hint!, /--set stages\.dedupe\.config\.window=forever/);
});

test("--set on a missing stage or without = is a problem of the command line", () => {
  const r = load("valid.yaml", { set: ["stages.nope.config.window=1h", "partitions"] });
  assert.equal(r.problems.length, 2);
  const [a, b] = r.problems;
  assert.equal(a!.file, "--set");
  assert.match(a!.message, /no item named "nope"/);
  assert.match(a!.hint!, /dedupe/);
  assert.equal(a!.col, "stages.".length + 1);
  assert.match(b!.message, /expected dotted\.path=value/);
});

test("formatProblem is file:line:col  message  (hint)", () => {
  assert.equal(formatProblem({ file: "p.yaml", line: 3, col: 7, message: "bad", hint: "fix it" }), "p.yaml:3:7  bad  (fix it)");
  assert.equal(formatProblem({ file: "p.yaml", line: 3, col: 7, message: "bad" }), "p.yaml:3:7  bad");
});

test("loadPipelineOrThrow throws a ConfigError listing every problem", () => {
  assert.throws(
    () => loadPipelineOrThrow(fixture("secret-in-clear.yaml"), { operators: FAKE_OPERATORS, env: {} }),
    (err: unknown) => err instanceof PipelineConfigError && err.code === "config" && err.problems.length === 2 && err.message.includes("secret-in-clear.yaml:6:3"),
  );
  assert.equal(loadPipelineOrThrow(fixture("minimal.yaml"), { operators: FAKE_OPERATORS, env: {} }).name, "tiny");
});

test("secrets are read from files (relative to the pipeline) and from the environment", () => {
  const dir = mkdtempSync(join(tmpdir(), "tacit-load-"));
  writeFileSync(join(dir, "nats.pw"), "s3cret\n");
  const file = join(dir, "p.yaml");
  writeFileSync(file, "version: 1\nname: x\nnats:\n  user: me\n  password_file: nats.pw\nredis:\n  password_env: RPW\nstages:\n  - name: enrich\n    operator: enrich\n");
  const ok = loadPipeline(file, { operators: FAKE_OPERATORS, env: { RPW: "r3dis" } });
  assert.deepEqual(ok.problems, []);
  assert.equal(ok.pipeline!.nats.password, "s3cret");
  assert.equal(ok.pipeline!.redis.password, "r3dis");
  const missing = loadPipeline(file, { operators: FAKE_OPERATORS, env: {} });
  assert.equal(missing.problems.length, 1);
  assert.equal(missing.problems[0]!.line, 7);
  assert.match(missing.problems[0]!.message, /RPW is not set/);
  const skipped = loadPipeline(file, { operators: FAKE_OPERATORS, env: {}, secrets: false });
  assert.deepEqual(skipped.problems, []);
  assert.equal(skipped.pipeline!.redis.password, undefined);
});

test("redis.tls takes CA and client certificate files (relative to the pipeline); cert without key, or a missing file, is a problem at its line", () => {
  const dir = mkdtempSync(join(tmpdir(), "tacit-load-"));
  writeFileSync(join(dir, "ca.pem"), "x");
  writeFileSync(join(dir, "c.pem"), "x");
  const file = join(dir, "p.yaml");
  const yaml = (tls: string) => `version: 1\nname: x\nredis:\n  url: rediss://r:6380\n  tls:\n${tls}stages:\n  - name: enrich\n    operator: enrich\n`;
  writeFileSync(file, yaml("    ca_file: ca.pem\n"));
  assert.deepEqual(loadPipeline(file, { operators: FAKE_OPERATORS, env: {} }).pipeline!.redis.tls, { ca_file: join(dir, "ca.pem") });
  writeFileSync(file, yaml("    ca_file: ca.pem\n    cert_file: c.pem\n"));
  assert.match(loadPipeline(file, { operators: FAKE_OPERATORS, env: {} }).problems[0]!.message, /cert_file and key_file go together/);
  writeFileSync(file, yaml("    ca_file: gone.pem\n"));
  const missing = loadPipeline(file, { operators: FAKE_OPERATORS, env: {} }).problems;
  assert.equal(missing.length, 1);
  assert.equal(missing[0]!.line, 6);
  assert.match(missing[0]!.message, /redis\.tls\.ca_file: cannot read/);
});

test("a file that cannot be read or is not a mapping is one problem", () => {
  assert.match(loadPipeline(fixture("nope.yaml"), { operators: FAKE_OPERATORS }).problems[0]!.message, /cannot read/);
  const r = loadPipeline("inline.yaml", { operators: FAKE_OPERATORS, source: "- a\n- b\n" });
  assert.equal(r.problems.length, 1);
  assert.match(r.problems[0]!.message, /mapping/);
});

test("validateStageConfig fills defaults and reports paths relative to the config", () => {
  const dedupe = FAKE_OPERATORS.find((o) => o.name === "dedupe")!;
  const config: Record<string, unknown> = {};
  assert.deepEqual(validateStageConfig(dedupe, config).errors, []);
  assert.deepEqual(config, { window: "10m", key: "event_id" });
  const bad = validateStageConfig(dedupe, { key: "fingerprnt", extra: 1 });
  assert.deepEqual(bad.errors.map((e) => e.path.join(".")).sort(), ["extra", "key"]);
  assert.match(bad.errors.find((e) => e.path[0] === "key")!.hint!, /fingerprint/);
  const broken = validateStageConfig({ ...dedupe, schema: { type: "object", propertiez: {} } }, {});
  assert.ok(broken.compileError, "an invalid schema is reported, not thrown");
});

test("an unset variable in a typed field is one problem, not also a type error", () => {
  const r = load("env.yaml", { env: { TACIT_TEST_NATS: "nats://n:4222" }, set: ["partitions=${TACIT_TEST_UNSET}"] });
  assert.equal(r.problems.length, 1, JSON.stringify(r.problems));
  assert.match(r.problems[0]!.message, /TACIT_TEST_UNSET is not set/);
  assert.equal(r.problems[0]!.path, "partitions");
});

test("problems on values created by --set at the same position are all kept", () => {
  const r = load("minimal.yaml", { set: ["stages.0.config.bogus=1", "stages.0.fuse_with_previous=true"] });
  assert.deepEqual(r.problems.map((p) => p.path).sort(), ["stages.0.config.bogus", "stages.0.fuse_with_previous"]);
});

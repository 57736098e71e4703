import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { connect } from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager, type Consumer, type JsMsg } from "@nats-io/jetstream";
import { cpuMeter } from "../src/bench/bench.js";
import { PublishGroup, publisherFor } from "../src/runtime/jspub.js";
import { ensureBinaries } from "../src/services/binaries.js";
import { freePort, startNats } from "../src/services/processes.js";

/**
 * What each JetStream operation costs nats-server's CPU, on a nats-server of its own (file
 * storage, as the pipeline's streams): a stored publish without and with a `Nats-Msg-Id`, a
 * pulled message, an ack; then pulling eight partitions through eight filtered durables on one
 * stream (the pipeline's layout) against eight streams of one subject each. The server's CPU is
 * read before and after each step as the bench reads it (its threads' schedstat, ns). `--runs` rounds.
 *
 *   node dist/bench/nats-costs.js [--messages 40000] [--bytes 600] [--runs 3]
 */

const PARTITIONS = 8;

async function pullAll(consumers: Consumer[], each: number, keep?: JsMsg[]): Promise<void> {
  await Promise.all(
    consumers.map(async (c) => {
      let got = 0;
      while (got < each) {
        for await (const m of await c.fetch({ max_messages: 500, expires: 2000 })) {
          got++;
          keep?.push(m);
        }
      }
    }),
  );
}

async function main(): Promise<void> {
  const arg = (name: string, dflt: number) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const [n, bytes, runs] = [arg("messages", 40_000), arg("bytes", 600), arg("runs", 3)];
  const bins = await ensureBinaries({ install: false });
  const dir = mkdtempSync(join(tmpdir(), "tacit-bench-nats-"));
  const server = await startNats({ port: await freePort(), dataDir: dir, binary: bins.nats });
  const nc = await connect({ servers: server.url });
  try {
    const jsm = await jetstreamManager(nc);
    const js = jetstream(nc);
    const payload = new Uint8Array(bytes).fill(65);
    const per = (us: number) => (us / n).toFixed(2);
    const step = async (what: () => Promise<void>) => {
      const used = cpuMeter(server.pid);
      await what();
      return used();
    };
    // The runtime's publisher, at most 1,000 in flight.
    const pub = publisherFor(nc);
    const publishAll = async (subject: (i: number) => string, ids: string | undefined) => {
      const group = new PublishGroup();
      for (let i = 0; i < n; i++) {
        pub.send(group, subject(i), payload, ids ? { msgID: `${ids}-${i}` } : {});
        if (group.size >= 1000) await group.wait();
      }
      await group.wait();
    };
    process.stdout.write(`nats-server CPU per message (µs), ${n} messages of ${bytes} bytes, ${runs} rounds:\n`);
    for (let r = 0; r < runs; r++) {
      const names = ["one", ...Array.from({ length: PARTITIONS }, (_, p) => `p${p}`), "ids"];
      for (const name of names) await jsm.streams.delete(`R${r}${name}`).catch(() => undefined);
      await jsm.streams.add({ name: `R${r}one`, subjects: [`r${r}.one.*`], duplicate_window: 120e9 });
      await jsm.streams.add({ name: `R${r}ids`, subjects: [`r${r}.ids.*`], duplicate_window: 120e9 });
      for (let p = 0; p < PARTITIONS; p++) await jsm.streams.add({ name: `R${r}p${p}`, subjects: [`r${r}.p.${p}`] });
      const plain = await step(() => publishAll((i) => `r${r}.one.${i % PARTITIONS}`, undefined));
      const withId = await step(() => publishAll((i) => `r${r}.ids.${i % PARTITIONS}`, `m${r}`));
      await publishAll((i) => `r${r}.p.${i % PARTITIONS}`, undefined);
      // Eight filtered durables on one stream, as the pipeline's keyed partitions; acked after.
      const filtered: Consumer[] = [];
      for (let p = 0; p < PARTITIONS; p++) {
        await jsm.consumers.add(`R${r}one`, { durable_name: `f${p}`, ack_policy: AckPolicy.Explicit, filter_subject: `r${r}.one.${p}`, max_ack_pending: n });
        filtered.push(await js.consumers.get(`R${r}one`, `f${p}`));
      }
      const held: JsMsg[] = [];
      const fetchFiltered = await step(() => pullAll(filtered, n / PARTITIONS, held));
      const acks = await step(async () => {
        for (const m of held) m.ack();
        await nc.flush();
        // The server works through the acks after the flush's round trip: let it finish.
        await new Promise((res) => setTimeout(res, 300));
      });
      const own: Consumer[] = [];
      for (let p = 0; p < PARTITIONS; p++) {
        await jsm.consumers.add(`R${r}p${p}`, { durable_name: "c", ack_policy: AckPolicy.Explicit, max_ack_pending: n });
        own.push(await js.consumers.get(`R${r}p${p}`, "c"));
      }
      const fetchOwn = await step(() => pullAll(own, n / PARTITIONS));
      process.stdout.write(
        `  publish ${per(plain)}, with Nats-Msg-Id ${per(withId)}; fetch: 8 filtered durables on one stream ${per(fetchFiltered)}, 8 streams ${per(fetchOwn)}; ack ${per(acks)}\n`,
      );
      for (const name of names) await jsm.streams.delete(`R${r}${name}`).catch(() => undefined);
    }
  } finally {
    await nc.close();
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  });
}

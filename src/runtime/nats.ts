import { readFileSync } from "node:fs";

import { connect, credsAuthenticator, nkeyAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import type { Pipeline } from "../config/types.js";
import { TransientError } from "../core/errors.js";
import { pooledNatsEncoding } from "./nats-encoding.js";

/** How long the first connection (TLS handshake included) may take before the start fails. */
const CONNECT_TIMEOUT_MS = 5_000;

/**
 * The API timeout of the pull loops' JetStream context. A request lost with a NATS node (a
 * consumer's info while its leader is elected again, the check nats.js makes after a reconnect
 * before it pulls again) is never answered: with the 10 s of the other contexts a partition
 * stalled 10 s after its server or its consumer's leader died (the failover test's worker logs:
 * "heartbeats missed", then "timeout" 10.2 s later). Shorter, the pull loop asks again sooner; a
 * slow answer taken for a lost one costs a retry of the request, nothing else.
 */
const PULL_API_TIMEOUT_MS = 2_000;

export interface NatsHandles {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** For the runners' pull loops: API requests time out after PULL_API_TIMEOUT_MS. */
  pull: JetStreamClient;
}

/** Connects with the pipeline's settings (user/password, token, creds file, TLS). */
export async function connectNats(p: Pipeline, name = "tacit"): Promise<NatsHandles> {
  pooledNatsEncoding();
  const n = p.nats;
  const tls = n.tls
    ? { caFile: n.tls.ca_file, certFile: n.tls.cert_file, keyFile: n.tls.key_file }
    : undefined;
  let nc: NatsConnection;
  try {
    nc = await connect({
      servers: n.url.split(","),
      name,
      user: n.user,
      pass: n.password,
      token: n.token,
      authenticator: n.creds_file ? credsAuthenticator(readFileSync(n.creds_file)) : n.nkey_seed ? nkeyAuthenticator(new TextEncoder().encode(n.nkey_seed)) : undefined,
      tls,
      noAsyncTraces: true,
      timeout: CONNECT_TIMEOUT_MS,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
    });
  } catch (err) {
    // A server that requires a client certificate drops the handshake without a word: say so.
    const hint = n.tls && !n.tls.cert_file && /timeout/i.test(String(err)) ? " (does the server require a client certificate? set nats.tls.cert_file and key_file)" : "";
    throw new TransientError("nats_unavailable", `cannot connect to NATS at ${n.url}: ${err instanceof Error ? err.message : String(err)}${hint}`, err);
  }
  const js = jetstream(nc, { timeout: 10_000 });
  let jsm: JetStreamManager;
  try {
    // Asks the server for JetStream: a server without it (or one still electing its meta leader) fails here.
    jsm = await jetstreamManager(nc, { timeout: 10_000 });
  } catch (err) {
    // The connection reconnects forever (maxReconnectAttempts -1): closed here, or it would keep its process alive.
    await nc.close().catch(() => undefined);
    throw err;
  }
  return { nc, js, jsm, pull: jetstream(nc, { timeout: PULL_API_TIMEOUT_MS }) };
}

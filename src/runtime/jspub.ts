import { createInbox, type Msg, type MsgHdrs, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { TransientError } from "../core/errors.js";

/** What JetStream answers to a stored publish. */
export interface PubAck {
  stream: string;
  seq: number;
  duplicate: boolean;
}

/** Headers of a publish: name and value pairs, in order. */
export type HeaderPairs = (readonly [string, string])[];

export interface PublishOptions {
  /** Sent as `Nats-Msg-Id`: the stream drops a repeat within its duplicate window. */
  msgID?: string;
  /** Extra headers, after `Nats-Msg-Id`. */
  headers?: HeaderPairs;
}

/**
 * A publish's header block as nats.js's MsgHdrs encodes one (`NATS/1.0`, then a `Name: value`
 * line per header, then a blank line), built as one string: nats.js asks a publish's headers only
 * for `encode()`. A MsgHdrs per message (its Map, the key checks, then the same string) was one of
 * the largest allocations of publishing. A value's line breaks become spaces (MsgHdrs refuses
 * them); values are trimmed as MsgHdrs trims them.
 */
export function headerBlock(msgID: string | undefined, pairs: HeaderPairs | undefined): MsgHdrs | undefined {
  if (msgID === undefined && !pairs?.length) return undefined;
  let s = "NATS/1.0";
  if (msgID !== undefined) s += `\r\nNats-Msg-Id: ${headerValue(msgID)}`;
  if (pairs) for (const [k, v] of pairs) s += `\r\n${k}: ${headerValue(v)}`;
  // A slice of Node's Buffer pool: TextEncoder.encode makes an ArrayBuffer per call (see nats-encoding.ts).
  const bytes = Buffer.from(`${s}\r\n\r\n`, "utf8");
  return { encode: () => bytes } as unknown as MsgHdrs;
}

function headerValue(v: string): string {
  return (/[\r\n]/.test(v) ? v.replace(/[\r\n]+/g, " ") : v).trim();
}

/** Why a publish is sent again: unanswered for RESEND_AFTER_MS, or answered 503 (no stream listened). */
export type ResendReason = "unanswered" | "no_responders";

/** One publish waiting for its PubAck (made by `waiter` only). */
interface Waiter {
  /** What was sent, to send again after a 503 (see NO_RESPONDERS_RETRY_MS). */
  readonly subject: string;
  readonly data: Uint8Array;
  /** The group it counts in (`send`), or … */
  readonly group: PublishGroup | undefined;
  /** … a single publish's promise (`publish`). */
  readonly resolve: ((ack: PubAck) => void) | undefined;
  readonly reject: ((err: Error) => void) | undefined;
  deadline: number;
  /** When it is sent again if still unanswered (RESEND_AFTER_MS; never without a message id). */
  resendAt: number;
  hdrs: MsgHdrs | undefined;
  /** Answered 503 at least once: a timeout then says so. */
  noResponders: boolean;
}

/**
 * Every waiter from one literal, with every field: waiters that got fields added after their
 * literals (two literals, then three more fields each, as the 503 retry first had it) cost the
 * bench's pipeline about 15 µs of CPU per event (five pairs against the build before it: 81.5–96.6
 * against 66.4–81.6 µs), half of it in V8's helper threads; a class with field initializers about
 * 6 µs (69.2–80.8 against 66.5–74.3 µs); this one literal nothing measurable (70.2–82.8 against
 * 72.1–75.7 µs, median 74.2 against 74.1). `node bin/tacit.js bench --events 20000 --json
 * --no-profile`, builds alternated.
 */
function waiter(subject: string, data: Uint8Array, group: PublishGroup | undefined, resolve: Waiter["resolve"], reject: Waiter["reject"]): Waiter {
  return { subject, data, group, resolve, reject, deadline: 0, resendAt: Infinity, hdrs: undefined, noResponders: false };
}

/**
 * Publishes awaited together: one counter and one promise for all of them, where a promise per
 * publish (with its resolvers and its catch) was a batch's largest allocation after the messages.
 * `wait` resolves once every publish sent so far has its PubAck and rejects at the first failure.
 */
export class PublishGroup {
  private open = 0;
  private error: Error | undefined;
  private waiter: { resolve(): void; reject(err: Error): void } | undefined;
  /** Sends again of the group's publishes: unanswered for RESEND_AFTER_MS, or answered 503 (NO_RESPONDERS_RETRY_MS). */
  resentUnanswered = 0;
  resentNoResponders = 0;

  /** `onResent` hears each send again as it happens (a batch whose PubAcks are slow to come is counted while it waits). */
  constructor(private readonly onResent?: (why: ResendReason) => void) {}

  /** A publish of the group is sent again (the publisher calls it). */
  resent(why: ResendReason): void {
    if (why === "unanswered") this.resentUnanswered++;
    else this.resentNoResponders++;
    this.onResent?.(why);
  }

  /** Publishes of the group still waiting for their PubAck. */
  get size(): number {
    return this.open;
  }

  /** Counts a publish in (the publisher calls it). */
  add(): void {
    this.open++;
  }

  /** A publish of the group got its PubAck (or failed: `err`). */
  end(err?: Error): void {
    this.open--;
    if (err) this.error ??= err;
    const w = this.waiter;
    if (!w || (this.open > 0 && !this.error)) return;
    this.waiter = undefined;
    if (this.error) w.reject(this.error);
    else w.resolve();
  }

  wait(): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    if (this.open === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }
}

const decoder = new TextDecoder();
const DEFAULT_TIMEOUT_MS = 10_000;
/**
 * A publish answered 503 (no responders: no stream listens on the subject) is sent again after
 * this long, until its deadline. A clustered stream has no responder while it elects a leader (a
 * node lost: a few seconds); failing the publish at once failed the caller's batch, whose retries
 * back off (`runtime.retry_backoff`: 1 s, 5 s, then 30 s by default), so a short election could
 * stall a worker for half a minute. nats.go's PublishAsync retries a 503 the same way (every
 * 250 ms by default). A subject no stream will ever take fails at the deadline.
 */
const NO_RESPONDERS_RETRY_MS = 250;
/**
 * A publish with a message id still unanswered this long is sent again (the stream stores it once,
 * by the id), every RESEND_AFTER_MS until its deadline. A message sent just before the server it
 * went through died, or into a stream whose leader died before storing it, is never answered:
 * waiting out the deadline (DEFAULT_TIMEOUT_MS) failed the caller's batch, retried only after
 * that. In the failover test the killed node took 104 outputs in one run and 200 of enrich's
 * publishes in another; sent again, they landed once the stream had its new leader. Chosen far
 * above an overloaded worker's PubAck times, so that a slow answer is not taken for a lost one:
 * at most 0.42 s in a whole `tacit bench` run and 0.55 s in the load test's 4× overload (README,
 * "Fault tests and their long forms"). A publish without an id is never sent again: it could be
 * stored twice.
 */
const RESEND_AFTER_MS = 2_000;

/**
 * Asynchronous JetStream publishing in the manner of nats.go's `PublishAsync`: every publish is a
 * plain NATS publish whose reply subject is a token under one inbox subscription, and its PubAck
 * is matched back by that token. `js.publish` in nats.js makes each publish a request with its own
 * timer, mux entry and a cancellation error built (with its stack) on every success; at tens of
 * thousands of messages a second that, not the network, was the runtime's largest cost. Publishes
 * made in the same tick go out in one socket write (nats.js flushes on a microtask), so callers
 * should issue a batch's publishes without awaiting in between and then await them together.
 *
 * Timeouts are swept by one timer, which also sends again a publish with a message id that goes
 * unanswered (RESEND_AFTER_MS): one lost to a reconnect or with a stream's leader lands then. One
 * without an id times out at its deadline and the caller retries its batch. A publish answered
 * 503 is sent again until its deadline (NO_RESPONDERS_RETRY_MS).
 */
export class JetStreamPublisher {
  private readonly inbox = createInbox();
  private readonly waiting = new Map<string, Waiter>();
  private next = 0;
  private sub?: Subscription;
  private sweeper?: NodeJS.Timeout;
  /** Publishes answered 503, sent again by one timer (`again`). */
  private retrying: string[] = [];
  /** Publishes sent again because they went unanswered (`resent`). */
  private unanswered = 0;
  private retryTimer?: NodeJS.Timeout;

  constructor(
    private readonly nc: NatsConnection,
    private readonly timeoutMs = DEFAULT_TIMEOUT_MS,
    private readonly resendAfterMs = RESEND_AFTER_MS,
  ) {}

  /** Publishes without waiting; the promise settles with the PubAck (or the server's refusal). */
  publish(subject: string, data: Uint8Array, opts: PublishOptions = {}): Promise<PubAck> {
    let w!: Waiter;
    const promise = new Promise<PubAck>((resolve, reject) => {
      w = waiter(subject, data, undefined, resolve, reject);
    });
    // A caller that gave up on a batch after its first failure does not await the rest: their
    // rejections must not surface as unhandled (awaiting callers still see them).
    promise.catch(() => undefined);
    this.issue(opts, w);
    return promise;
  }

  /** Publishes without waiting, counted in `group` (await `group.wait()`): no promise per message. */
  send(group: PublishGroup, subject: string, data: Uint8Array, opts: PublishOptions = {}): void {
    group.add();
    this.issue(opts, waiter(subject, data, group, undefined, undefined));
  }

  private issue(opts: PublishOptions, waiter: Waiter): void {
    this.sub ??= this.nc.subscribe(`${this.inbox}.*`, { callback: (err, m) => (err ? this.failAll(err) : this.answer(m)) });
    this.sweeper ??= setInterval(() => this.sweep(), Math.max(50, Math.min(1_000, this.timeoutMs / 4, this.resendAfterMs / 2))).unref();
    const token = (this.next++).toString(36);
    const hdrs = headerBlock(opts.msgID, opts.headers);
    const now = Date.now();
    waiter.deadline = now + this.timeoutMs;
    if (opts.msgID !== undefined) waiter.resendAt = 0;
    waiter.hdrs = hdrs;
    this.waiting.set(token, waiter);
    this.send1(token, waiter, now);
  }

  /** Sends (again); one with a message id is sent again if this send goes unanswered (RESEND_AFTER_MS). */
  private send1(token: string, w: Waiter, now: number): void {
    if (w.resendAt !== Infinity) w.resendAt = now + this.resendAfterMs;
    try {
      this.nc.publish(w.subject, w.data, { reply: `${this.inbox}.${token}`, headers: w.hdrs });
    } catch (err) {
      this.settle(token, err instanceof Error ? err : new Error(String(err)));
    }
  }

  /** A publish answered 503: sent again shortly while its deadline allows (see NO_RESPONDERS_RETRY_MS). */
  private later(token: string, w: Waiter): void {
    w.noResponders = true;
    if (Date.now() + NO_RESPONDERS_RETRY_MS >= w.deadline) {
      this.settle(token, this.timedOut(w));
      return;
    }
    this.retrying.push(token);
    this.retryTimer ??= setTimeout(() => this.again(), NO_RESPONDERS_RETRY_MS);
  }

  private again(): void {
    this.retryTimer = undefined;
    const tokens = this.retrying;
    this.retrying = [];
    const now = Date.now();
    for (const token of tokens) {
      const w = this.waiting.get(token);
      if (!w) continue;
      w.group?.resent("no_responders");
      this.send1(token, w, now);
    }
  }

  /** Publishes sent again because they went unanswered (RESEND_AFTER_MS), since the publisher began. */
  get resent(): number {
    return this.unanswered;
  }

  /** Publishes still waiting for their PubAck. */
  get inFlight(): number {
    return this.waiting.size;
  }

  /** Fails whatever is still waiting and stops listening. */
  close(): void {
    if (this.sweeper) clearInterval(this.sweeper);
    this.sweeper = undefined;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.retrying = [];
    this.failAll(new TransientError("publish_failed", "publisher closed before the PubAck arrived"));
    this.sub?.unsubscribe();
    this.sub = undefined;
  }

  private answer(m: Msg): void {
    const token = m.subject.slice(this.inbox.length + 1);
    const w = this.waiting.get(token);
    if (!w) return; // timed out already
    if (m.headers?.hasError) {
      if (m.headers.code === 503) this.later(token, w);
      else this.settle(token, new TransientError("publish_failed", `${m.headers.code} ${m.headers.description}`));
      return;
    }
    let ack: { stream?: string; seq?: number; duplicate?: boolean; error?: { code?: number; err_code?: number; description?: string } };
    try {
      ack = JSON.parse(decoder.decode(m.data)) as typeof ack;
    } catch {
      this.settle(token, new TransientError("publish_failed", "JetStream answered a publish with something that is not JSON"));
      return;
    }
    if (ack.error) {
      const e = ack.error;
      this.settle(token, new TransientError("publish_failed", `JetStream refused the publish: ${e.description ?? "no description"} (${e.code ?? "?"}/${e.err_code ?? "?"})`));
    } else if (typeof ack.stream !== "string" || ack.stream === "" || typeof ack.seq !== "number") {
      this.settle(token, new TransientError("publish_failed", "JetStream answered a publish without a stream and sequence"));
    } else {
      this.settle(token, undefined, { stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate === true });
    }
  }

  private settle(token: string, err: Error | undefined, ack?: PubAck): void {
    const w = this.waiting.get(token);
    if (!w) return;
    this.waiting.delete(token);
    if (w.group) w.group.end(err);
    else if (err) w.reject!(err);
    else w.resolve!(ack!);
  }

  /** Times out what reached its deadline; sends again what is overdue (RESEND_AFTER_MS), in the order first sent. */
  private sweep(): void {
    const now = Date.now();
    for (const [token, w] of this.waiting) {
      if (w.deadline <= now) this.settle(token, this.timedOut(w));
      else if (w.resendAt <= now) {
        this.unanswered++;
        w.group?.resent("unanswered");
        this.send1(token, w, now);
      }
    }
  }

  private timedOut(w: Waiter): TransientError {
    return new TransientError("publish_failed", w.noResponders ? `no stream listened on the subject (503) for ${this.timeoutMs} ms` : `no PubAck within ${this.timeoutMs} ms`);
  }

  private failAll(err: Error): void {
    for (const token of [...this.waiting.keys()]) this.settle(token, err);
  }
}

const publishers = new WeakMap<NatsConnection, JetStreamPublisher>();

/** The connection's publisher (one inbox subscription per connection). */
export function publisherFor(nc: NatsConnection): JetStreamPublisher {
  let p = publishers.get(nc);
  if (!p) {
    p = new JetStreamPublisher(nc);
    publishers.set(nc, p);
    void nc.closed().then(() => p!.close());
  }
  return p;
}

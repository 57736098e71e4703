import type { Redis, Cluster } from "ioredis";
import { TacitError, errorMessage } from "../core/errors.js";
import type { Logger } from "../core/operator.js";
import { pipelineKey } from "../core/state.js";
import { within } from "../core/wait.js";

/*
 * Per-group pause through Redis, which running workers obey: the operator's side (`tacit replay`)
 * sets `paused` and bumps `epoch` in `tacit:{<prefix>}:control:<group>`; every worker polls that
 * hash, stops the group (keyed: gives up its partitions after settling in-flight work; unkeyed:
 * stops its runner) and acknowledges the epoch in `…:control:<group>:acks`. Workers announce
 * themselves per group in the sorted set `…:control:<group>:workers` (score = last heartbeat),
 * so the operator knows whose acknowledgement to wait for. The wall clock here decides only who
 * works and when, never what a result is.
 */

/** How often workers read the control hashes and heartbeat. */
export const CONTROL_POLL_MS = 500;
/** A worker whose heartbeat is older than this is taken for dead (it is not waited for). */
export const WORKER_STALE_MS = 5_000;

/** The control hash of a stage group. */
export function controlKey(prefix: string, group: string): string {
  return pipelineKey(prefix, "control", group);
}

/** Worker id → `<epoch>:<paused|running>`: the last control state each worker has applied. */
export function controlAcksKey(prefix: string, group: string): string {
  return pipelineKey(prefix, "control", group, "acks");
}

/** Sorted set of the workers running a group: member = worker id, score = last heartbeat (ms). */
export function controlWorkersKey(prefix: string, group: string): string {
  return pipelineKey(prefix, "control", group, "workers");
}

/** What the control hash of a group says. */
export interface ControlState {
  paused: boolean;
  epoch: number;
  reason?: string;
  /** Who paused it (host and pid of the replay) and since when (ISO time). */
  by?: string;
  since?: string;
}

function parseState(h: Record<string, string>): ControlState {
  return {
    paused: h.paused === "1",
    epoch: Number(h.epoch ?? 0) || 0,
    ...(h.reason ? { reason: h.reason } : {}),
    ...(h.by ? { by: h.by } : {}),
    ...(h.since ? { since: h.since } : {}),
  };
}

/** What a worker does when its group is paused or resumed. */
export interface ControlHooks {
  /** Stop consuming the group: settle in-flight work, give up partitions. Resolves when done. */
  pause(group: string): Promise<void>;
  /** Start consuming the group again. */
  resume(group: string): Promise<void>;
}

/**
 * The worker side: heartbeats per group, applies pause/resume in order, acknowledges each epoch.
 * `start` applies the current state before it returns, so a worker started during a replay
 * never touches a paused group.
 */
export class ControlLoop {
  /** Per group: the state applied locally (undefined until the first read). */
  private readonly applied = new Map<string, { paused: boolean; epoch: number }>();
  private timer: NodeJS.Timeout | undefined;
  private beat: NodeJS.Timeout | undefined;
  private running: Promise<void> = Promise.resolve();
  private stopped = false;

  constructor(
    private readonly redis: Redis | Cluster,
    private readonly prefix: string,
    private readonly workerId: string,
    private readonly groups: string[],
    private readonly hooks: ControlHooks,
    private readonly log: Logger,
    private readonly everyMs = CONTROL_POLL_MS,
  ) {}

  /** True when the group is paused here (or was never started because it was paused). */
  isPaused(group: string): boolean {
    return this.applied.get(group)?.paused ?? false;
  }

  async start(): Promise<void> {
    await this.heartbeat();
    await this.tick();
    // The heartbeat runs apart from the ticks: a pause that takes seconds to settle must not
    // make the worker look dead to the replay waiting for it.
    this.beat = setInterval(() => {
      this.heartbeat().catch((err) => this.log.warn({ err: errorMessage(err) }, "control heartbeat failed"));
    }, this.everyMs);
    const loop = () => {
      if (this.stopped) return;
      this.running = this.tick()
        .catch((err) => this.log.warn({ err: errorMessage(err) }, "control poll failed"))
        .finally(() => {
          if (!this.stopped) this.timer = setTimeout(loop, this.everyMs);
        });
    };
    this.timer = setTimeout(loop, this.everyMs);
  }

  private async heartbeat(): Promise<void> {
    const now = Date.now();
    const p = this.redis.pipeline();
    for (const g of this.groups) {
      p.zadd(controlWorkersKey(this.prefix, g), now, this.workerId);
      p.pexpire(controlWorkersKey(this.prefix, g), WORKER_STALE_MS * 20);
    }
    await p.exec();
  }

  /** Reads every group's control hash and applies what changed; groups in order. */
  async tick(): Promise<void> {
    if (this.stopped) return;
    const p = this.redis.pipeline();
    for (const g of this.groups) p.hgetall(controlKey(this.prefix, g));
    const res = (await p.exec()) ?? [];
    // Groups change state together: pausing settles every group's in-flight pulls at once.
    await Promise.all(
      this.groups.map(async (g, i) => {
        const [err, raw] = res[i] ?? [new Error("no reply"), null];
        if (err) throw err;
        const want = parseState((raw as Record<string, string> | null) ?? {});
        const have = this.applied.get(g);
        if (this.stopped) return;
        if (!have || have.paused !== want.paused) {
          if (want.paused) {
            this.log.info({ group: g, epoch: want.epoch, reason: want.reason }, "pausing group");
            // The first read of a paused group: nothing runs yet, nothing to stop.
            if (have) await this.hooks.pause(g);
          } else {
            if (have) this.log.info({ group: g, epoch: want.epoch }, "resuming group");
            await this.hooks.resume(g);
          }
        }
        if (!have || have.paused !== want.paused || have.epoch !== want.epoch) {
          this.applied.set(g, { paused: want.paused, epoch: want.epoch });
          await this.redis.hset(controlAcksKey(this.prefix, g), this.workerId, `${want.epoch}:${want.paused ? "paused" : "running"}`);
        }
      }),
    );
  }

  /**
   * Stops polling and leaves the worker sets (the worker is stopping). The Redis requests are
   * waited for WORKER_STALE_MS in all at most (with Redis down each would take the client's
   * retries to fail): a heartbeat older than that counts for nothing anyway.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.beat) clearInterval(this.beat);
    const until = Date.now() + WORKER_STALE_MS;
    await within(this.running.catch(() => undefined), WORKER_STALE_MS);
    const p = this.redis.pipeline();
    for (const g of this.groups) {
      p.zrem(controlWorkersKey(this.prefix, g), this.workerId);
      p.hdel(controlAcksKey(this.prefix, g), this.workerId);
    }
    await within(p.exec().catch(() => undefined), until - Date.now());
  }
}

// --- the operator's side -------------------------------------------------------------------------

/** The workers of a group whose heartbeat is fresh. */
export async function liveWorkers(redis: Redis | Cluster, prefix: string, group: string, now = Date.now()): Promise<string[]> {
  return redis.zrangebyscore(controlWorkersKey(prefix, group), now - WORKER_STALE_MS, "+inf");
}

/** The control state of a group. */
export async function readControl(redis: Redis | Cluster, prefix: string, group: string): Promise<ControlState> {
  return parseState(await redis.hgetall(controlKey(prefix, group)));
}

// Sets paused=1 and a new epoch unless the group is already paused (by another replay).
const PAUSE_LUA = `
if redis.call('HGET', KEYS[1], 'paused') == '1' then return -1 end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'paused', '1', 'reason', ARGV[1], 'by', ARGV[2], 'since', ARGV[3])
return e
`;

export interface PauseOptions {
  reason: string;
  /** Who pauses (shown to anyone who finds the group paused). */
  by: string;
  /** How long to wait for every live worker to acknowledge. @default 30000 */
  timeoutMs?: number;
  /** Called while waiting, with the workers not yet acknowledged per group. */
  onWait?: (waiting: Record<string, string[]>) => void;
}

/** The epoch each group was paused at, and the workers that acknowledged it. */
export interface PauseResult {
  epochs: Record<string, number>;
  workers: Record<string, string[]>;
}

/**
 * Pauses groups and waits until every live worker of each has stopped consuming it and
 * acknowledged. Refuses (exit 1) a group another replay has paused. On timeout, resumes what it
 * paused and throws an error naming the workers that did not answer.
 */
export async function pauseGroups(redis: Redis | Cluster, prefix: string, groups: string[], opts: PauseOptions): Promise<PauseResult> {
  const epochs: Record<string, number> = {};
  for (const g of groups) {
    const e = Number(await redis.eval(PAUSE_LUA, 1, controlKey(prefix, g), opts.reason, opts.by, new Date().toISOString()));
    if (e < 0) {
      await resumeGroups(redis, prefix, Object.keys(epochs));
      const st = await readControl(redis, prefix, g);
      throw new TacitError(
        "already_paused",
        `stage group ${g} is already paused (${st.reason ?? "no reason"}, by ${st.by ?? "?"} since ${st.since ?? "?"}); ` +
          `wait for that replay to finish, or if it died, clear the pause with \`tacit replay <pipeline> --resume\``,
      );
    }
    epochs[g] = e;
  }
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
  // A live worker heartbeats every poll: whoever is not in the set after two polls is not running
  // (also after Redis lost the set, e.g. restarted empty).
  const settled = Date.now() + 2 * CONTROL_POLL_MS + 200;
  const workers: Record<string, string[]> = {};
  for (;;) {
    const waiting: Record<string, string[]> = {};
    for (const g of groups) {
      const live = await liveWorkers(redis, prefix, g);
      const acks = await redis.hgetall(controlAcksKey(prefix, g));
      const missing = live.filter((w) => acks[w] !== `${epochs[g]}:paused`);
      workers[g] = live.filter((w) => !missing.includes(w));
      if (missing.length) waiting[g] = missing;
    }
    if (Object.keys(waiting).length === 0) {
      if (Date.now() >= settled) return { epochs, workers };
    } else if (Date.now() > deadline) {
      await resumeGroups(redis, prefix, groups);
      const list = Object.entries(waiting)
        .map(([g, ws]) => `${g}: ${ws.join(", ")}`)
        .join("; ");
      throw new TacitError(
        "pause_timeout",
        `these workers did not stop within ${Math.round((opts.timeoutMs ?? 30_000) / 1000)} s (${list}); nothing was changed and the groups were resumed. ` +
          `Check them (a worker stuck in a retry loop, or a host that lost Redis), stop or restart them, and run the replay again`,
      );
    }
    if (Object.keys(waiting).length) opts.onWait?.(waiting);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Resumes groups (clears the pause; workers start again within a poll interval). */
export async function resumeGroups(redis: Redis | Cluster, prefix: string, groups: string[]): Promise<void> {
  for (const g of groups) {
    const key = controlKey(prefix, g);
    const p = redis.multi();
    p.hincrby(key, "epoch", 1);
    p.hset(key, "paused", "0");
    p.hdel(key, "reason", "by", "since");
    await p.exec();
  }
}

/**
 * Time for operators. Operators never read the wall clock: the runtime injects a clock whose
 * `now()` is event time (the time of the record being processed), so replays see the same times.
 */
export interface Clock {
  /** Event time in ms since the epoch of the record being processed. */
  now(): number;
}

/** A clock the runtime (or a test) sets explicitly. */
export class ManualClock implements Clock {
  private t: number;
  constructor(start = 0) {
    this.t = start;
  }
  now(): number {
    return this.t;
  }
  set(t: number): void {
    this.t = t;
  }
  advance(ms: number): void {
    this.t += ms;
  }
}

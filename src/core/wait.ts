/**
 * Waits for `p` or `ms`, whichever comes first, without leaving a timer behind (a timer left
 * running keeps the process alive). A rejection of `p` within `ms` is passed on.
 */
export function within(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p.then(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, ms))))]).finally(() => clearTimeout(timer));
}

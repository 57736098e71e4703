import type { OperatorSpec } from "../src/core/operator.js";

/**
 * The operator registry: every operator is listed here explicitly (nothing registers itself
 * as an import side effect). Order is the order of the docs.
 */
export const OPERATORS: readonly OperatorSpec<any>[] = [];

export function findOperator(name: string): OperatorSpec<any> | undefined {
  return OPERATORS.find((o) => o.name === name);
}

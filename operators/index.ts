import type { OperatorSpec } from "../src/core/operator.js";
import { botScore } from "./bot-score.js";
import { dedupe } from "./dedupe.js";
import { enrich } from "./enrich.js";
import { labelDerive } from "./label-derive.js";
import { reformulation } from "./reformulation.js";
import { sessionize } from "./sessionize.js";

/**
 * The operator registry: every operator is listed here explicitly (nothing registers itself
 * as an import side effect). Order is the order of the docs.
 */
export const OPERATORS: readonly OperatorSpec<any>[] = [enrich, dedupe, botScore, sessionize, reformulation, labelDerive];

export function findOperator(name: string): OperatorSpec<any> | undefined {
  return OPERATORS.find((o) => o.name === name);
}

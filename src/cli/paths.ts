// Moved to src/config/paths.ts so config and operators need not import the CLI. Kept only for
// operators/label-derive.ts (being rewritten elsewhere): delete once it imports src/config/paths.js.
export { projectRoot } from "../config/paths.js";

// Import rules checked by `npm run lint` (dependency-cruiser). Each rule says why it exists.
// Layers, lowest first: src/core ← src/state, src/config, operators ← src/runtime ← src/cli.
// A lower layer never imports a higher one, so each can be tested and reused without the ones above.
// Tests (*.test.ts) are exempt from the layer rules: nothing imports a test, so a test reaching up
// (say, core's label test compiling its schema with the config layer's Ajv) adds no dependency to
// the code it tests. Cycles are checked everywhere.
const TEST = "\\.test\\.ts$";

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: "no-circular",
      severity: "error",
      comment:
        "Import cycles make module initialisation order fragile (an ES module can see another's " +
        "exports still undefined) and tie the modules so neither can change or be tested alone.",
      from: {},
      to: { circular: true },
    },
    {
      name: "core-imports-nothing",
      severity: "error",
      comment:
        "src/core holds the contracts (events, operators, state store, errors, clock) that every " +
        "other layer builds on; if it imported any of them the layering would collapse into one tangle.",
      from: { path: "^src/core/", pathNot: TEST },
      to: { path: "^(src|operators)/", pathNot: "^src/core/" },
    },
    {
      name: "operators-config-not-cli-runtime",
      severity: "error",
      comment:
        "Operators and pipeline config are pure: operators get state, clock, logger and metrics " +
        "from ctx and never open connections, and config is loaded and linted offline. Neither may " +
        "depend on the CLI or on the NATS/Redis runtime.",
      from: { path: "^(operators|src/config)/", pathNot: TEST },
      to: { path: "^src/(cli|runtime)/" },
    },
    {
      name: "runtime-not-cli",
      severity: "error",
      comment:
        "The runtime is driven by the CLI, not the other way round: it must run embedded (tests, " +
        "other front ends) without commander, argv or terminal output.",
      from: { path: "^src/runtime/", pathNot: TEST },
      to: { path: "^src/cli/" },
    },
    {
      name: "state-not-runtime-cli",
      severity: "error",
      comment:
        "State stores implement the contract in src/core/state.ts and are used by the runtime; " +
        "importing the runtime or CLI back would make a cycle of layers.",
      from: { path: "^src/state/", pathNot: TEST },
      to: { path: "^src/(runtime|cli)/" },
    },
    {
      name: "runtime-not-replay-admin",
      severity: "error",
      comment:
        "Replay is an admin operation (wipe, rebuild, catch-up) that runs beside the workers; the " +
        "per-message worker path must not depend on it, so shared pieces (fences, label hashing) " +
        "belong in a module both import (label-registry.ts).",
      from: { path: "^src/runtime/(worker|runner|chain|outputs|watermarks|keyed-state|label-registry)\\.ts$" },
      to: { path: "^src/runtime/replay\\.ts$" },
    },
  ],
  options: {
    doNotFollow: { path: "node_modules" },
    // TypeScript 7 ships no JS compiler API, so dependency-cruiser parses with swc.
    parser: "swc",
    // Type-only imports count too: a type from a higher layer is still an upward dependency.
    tsPreCompilationDeps: true,
    enhancedResolveOptions: { extensions: [".ts", ".js", ".mjs", ".cjs", ".json"] },
    reporterOptions: {
      text: { highlightFocused: true },
    },
  },
};

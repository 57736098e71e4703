// The entry of a worker's second thread (`runtime.threads`, see runtime/threads.ts): the thread
// builds its own operators and logger, which cannot be handed to it, and serves the main thread.
import { findOperator } from "../../operators/index.js";
import { serveWorkerThread } from "../runtime/threads.js";
import { cliLogger } from "./common.js";

await serveWorkerThread(({ logLevel }) => ({ operators: findOperator, log: cliLogger(logLevel) }));

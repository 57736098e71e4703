/**
 * A pipeline file as written (`PipelineFile`, durations as strings) and as compiled
 * (`Pipeline`, durations in ms, operator configs with their defaults applied).
 */

/** TLS files of a connection (PEM paths): the CA to verify the server, and a client certificate for mutual TLS. */
export interface TlsFiles {
  ca_file?: string;
  cert_file?: string;
  key_file?: string;
}

export interface StageFile {
  /** Unique within the pipeline; names the stage's consumers and DLQ subject. */
  name: string;
  /** An operator from the registry (`operators/index.ts`). */
  operator: string;
  /** Run in the same worker as the previous stage, as a plain function call (no stream between). */
  fuse_with_previous?: boolean;
  config?: Record<string, unknown>;
}

export interface PipelineFile {
  /** Schema version of this file format. */
  version: 1;
  name: string;
  subject_prefix?: string;
  description?: string;
  nats?: {
    url?: string;
    user?: string;
    password_file?: string;
    password_env?: string;
    token_file?: string;
    token_env?: string;
    nkey_seed_file?: string;
    creds_file?: string;
    tls?: TlsFiles;
  };
  redis?: { url?: string; password_env?: string; password_file?: string; tls?: boolean | TlsFiles; replica_wait?: string };
  partitions?: number;
  streams?: { max_age?: string; duplicate_window?: string; replicas?: number; max_bytes?: number };
  runtime?: {
    batch_size?: number;
    max_deliver?: number;
    ack_wait?: string;
    retry_backoff?: string[];
    lease_ttl?: string;
    max_event_bytes?: number;
    max_in_flight?: number;
    state_cache?: { max_entries?: number };
    commit_interval?: string;
    threads?: 1 | 2 | "auto";
  };
  event_time?: { max_out_of_orderness?: string; idle_timeout?: string };
  stages: StageFile[];
}

export interface Stage {
  name: string;
  operator: string;
  fuse_with_previous: boolean;
  config: Record<string, unknown>;
  /** Line of the stage in the pipeline file (1-based), for messages. */
  line?: number;
}

export interface Pipeline {
  version: 1;
  name: string;
  subject_prefix: string;
  description?: string;
  /** The file it came from, for messages. */
  file?: string;
  /** Secrets already read from their files / environment variables; file paths absolute. */
  nats: {
    url: string;
    user?: string;
    password?: string;
    token?: string;
    /** Seed of an nkey (`SU…`), from `nkey_seed_file`. */
    nkey_seed?: string;
    creds_file?: string;
    tls?: TlsFiles;
  };
  /** `tls` is false, or the TLS settings (empty: verify against the system CAs). */
  /** `replica_wait_ms`: on Redis Cluster, how long a keyed commit waits for a replica (0: not at all). */
  redis: { url: string; password?: string; tls: false | TlsFiles; replica_wait_ms: number };
  partitions: number;
  streams: { max_age_ms: number; duplicate_window_ms: number; replicas: number; max_bytes: number };
  runtime: {
    batch_size: number;
    max_deliver: number;
    ack_wait_ms: number;
    retry_backoff_ms: number[];
    lease_ttl_ms: number;
    max_event_bytes: number;
    max_in_flight: number;
    state_cache: { max_entries: number };
    commit_interval_ms: number;
    threads: 1 | 2 | "auto";
  };
  event_time: { max_out_of_orderness_ms: number; idle_timeout_ms: number };
  stages: Stage[];
}

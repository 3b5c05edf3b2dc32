-- Outbound commands: every change the product asks billsync to make at the vendor. A command is
-- stored (with the tenant change it belongs to) before the answer, and a worker sends it with an
-- Idempotency-Key derived from command_id. Times are Unix milliseconds.
CREATE TABLE commands (
    command_id      TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,            -- customer.sync | subscription.set | subscription.cancel | subscription.resume
    request         TEXT NOT NULL,            -- the command's parameters, JSON
    client_key      TEXT,                     -- the caller's Idempotency-Key header
    request_digest  TEXT NOT NULL,            -- SHA-256 of kind and request: a reused client key must match it
    base            TEXT,                     -- the subscription state the command was accepted against
    status          TEXT NOT NULL,            -- pending | succeeded | failed | conflict
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    error_code      TEXT,
    result          TEXT,                     -- JSON: the confirmed object, or the vendor's state on conflict
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    completed_at    BIGINT
);
CREATE UNIQUE INDEX commands_client_key ON commands (tenant_id, client_key);
CREATE INDEX commands_due ON commands (status, next_attempt_at);
CREATE INDEX commands_tenant ON commands (tenant_id, status, created_at);

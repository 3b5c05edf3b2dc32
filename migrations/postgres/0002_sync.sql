-- Inbound sync. Every vendor event, and every state the poller, sweep or backfill fetched,
-- lands in inbox_events first (unique on event_id); the applier brings mirror_objects to it.
-- Times are Unix milliseconds unless named otherwise.
CREATE TABLE inbox_events (
    event_id        TEXT PRIMARY KEY NOT NULL,
    event_type      TEXT NOT NULL,
    source          TEXT NOT NULL,            -- webhook | poll | sweep | backfill
    object_type     TEXT,                     -- the mirrored kind it touches; NULL: nothing to apply
    object_id       TEXT,
    customer_id     TEXT,
    tenant_id       TEXT,                     -- resolved when applied
    event_created   BIGINT NOT NULL,          -- the vendor's creation time of the event (or fetch time)
    idempotency_key TEXT,                     -- request.idempotency_key: billsync's own commands
    payload         TEXT NOT NULL,            -- the event exactly as received
    received_at     BIGINT NOT NULL,
    status          TEXT NOT NULL,            -- pending | applied | skipped | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at BIGINT NOT NULL,
    applied_at      BIGINT,
    applied_payload TEXT,                     -- the object state applied when it was refetched
    applied_version BIGINT
);
CREATE INDEX inbox_events_due ON inbox_events (status, next_attempt_at);
CREATE INDEX inbox_events_tenant ON inbox_events (tenant_id, event_created);
CREATE INDEX inbox_events_object ON inbox_events (object_type, object_id);

-- The vendor's current state, one row per object. version orders states of one object: a row
-- is only replaced by a state at least as new.
CREATE TABLE mirror_objects (
    object_type TEXT NOT NULL,
    object_id   TEXT NOT NULL,
    customer_id TEXT,
    status      TEXT,
    created     BIGINT,                       -- the vendor's created, Unix seconds
    version     BIGINT NOT NULL,
    deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    payload     TEXT NOT NULL,
    synced_at   BIGINT NOT NULL,
    PRIMARY KEY (object_type, object_id)
);
CREATE INDEX mirror_objects_customer ON mirror_objects (customer_id, object_type, created);

-- Cursors, checkpoints and last-run times of the sync workers.
CREATE TABLE sync_state (
    name       TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX inbox_events_customer ON inbox_events (customer_id, event_created);

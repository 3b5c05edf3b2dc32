-- Metering. usage_events is the usage log (unique on the client's (tenant, event id)); push_id
-- links each event to the meter event that carried it to Stripe (usage_pushes, the push ledger).
-- Quantities and values are exact decimals kept as text; times are Unix milliseconds.
CREATE TABLE usage_events (
    tenant_id    TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    meter        TEXT NOT NULL,
    quantity     TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    unique_value TEXT,                  -- unique_count meters: the counted property's value
    properties   TEXT,                  -- the event's properties as sent (JSON)
    received_at  BIGINT NOT NULL,
    push_id      TEXT,                  -- NULL: not pushed yet
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX usage_events_unpushed ON usage_events (push_id, received_at);
CREATE INDEX usage_events_received ON usage_events (received_at);
CREATE INDEX usage_events_tenant ON usage_events (tenant_id, meter, occurred_at);

-- One row per meter event sent (or to be sent) to Stripe; push_id is its Stripe identifier,
-- fixed before the first attempt so that every retry sends the same one.
CREATE TABLE usage_pushes (
    push_id         TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL,
    meter           TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    event_name      TEXT NOT NULL,
    window_start    BIGINT NOT NULL,
    value           TEXT NOT NULL,
    timestamp       BIGINT NOT NULL,    -- Unix seconds, as sent
    event_count     INTEGER NOT NULL,
    status          TEXT NOT NULL,      -- pending | sent | rejected | expired
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT
);
CREATE INDEX usage_pushes_status ON usage_pushes (status, next_attempt_at);
CREATE INDEX usage_pushes_tenant ON usage_pushes (tenant_id, meter, window_start);

-- Snapshot of the in-memory usage counters: one row per tenant, meter and hour.
CREATE TABLE usage_buckets (
    tenant_id TEXT NOT NULL,
    meter     TEXT NOT NULL,
    hour      BIGINT NOT NULL,
    state     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, meter, hour)
);

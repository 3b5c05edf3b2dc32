-- The distinct values of unique_count meters, kept by the database instead of in memory: one row
-- per tenant, meter, value and hour it occurred in, written in the transaction that stores the
-- events. The counters keep only counts derived from it (see src/metering/counters.rs), so the
-- snapshot no longer holds sets of values: those buckets are dropped and rebuilt from here.
CREATE TABLE usage_distinct (
    tenant_id TEXT NOT NULL,
    meter     TEXT NOT NULL,
    value     TEXT NOT NULL,
    hour      BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, meter, value, hour)
);
INSERT INTO usage_distinct (tenant_id, meter, value, hour)
SELECT DISTINCT tenant_id, meter, unique_value, (occurred_at / 3600000) * 3600000
FROM usage_events WHERE unique_value IS NOT NULL;
DELETE FROM usage_buckets WHERE state LIKE '{"kind":"unique"%';

-- The snapshot reads the events above its watermark a page at a time, in (txid, tenant_id,
-- event_id) order after a cursor: this index answers each page from the cursor on, where the
-- index on txid alone made PostgreSQL sort the whole rest of the window for every page.
CREATE INDEX usage_events_position ON usage_events (txid, tenant_id, event_id);
DROP INDEX usage_events_txid;

-- One row per tenant, meter and distinct value: a transaction adding a value's hours locks its
-- row (an upsert, in value order), so that two adding the same value take turns.
CREATE TABLE usage_distinct_values (
    tenant_id TEXT NOT NULL,
    meter     TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, meter, value)
);
INSERT INTO usage_distinct_values (tenant_id, meter, value)
SELECT DISTINCT tenant_id, meter, value FROM usage_distinct;

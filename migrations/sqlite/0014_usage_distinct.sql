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

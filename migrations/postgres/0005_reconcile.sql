-- Reconciliation runs and the findings they report. A run is repeatable: it reads the usage
-- log, the push ledger, the mirror (and, for drift, the vendor) and writes only here (and,
-- for drift repairs, the inbox). Times are Unix milliseconds.
CREATE TABLE reconciliation_runs (
    run_id      TEXT PRIMARY KEY NOT NULL,
    period_from BIGINT NOT NULL,
    period_to   BIGINT NOT NULL,
    tenant_id   TEXT,                     -- NULL: every tenant
    dry_run     BOOLEAN NOT NULL,
    trigger     TEXT NOT NULL,            -- api | cli | schedule
    status      TEXT NOT NULL,            -- running | done | failed
    summary     TEXT,                     -- JSON: counts and totals by finding
    error       TEXT,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX reconciliation_runs_started ON reconciliation_runs (started_at);

CREATE TABLE reconciliation_items (
    run_id    TEXT NOT NULL,
    seq       BIGINT NOT NULL,            -- the report's order
    area      TEXT NOT NULL,              -- usage | money | drift
    finding   TEXT NOT NULL,
    tenant_id TEXT,
    item      TEXT NOT NULL,              -- JSON: figures, cause and evidence
    PRIMARY KEY (run_id, seq)
);

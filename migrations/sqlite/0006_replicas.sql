-- Several replicas on one database (PostgreSQL only; SQLite serves one process).
-- A reconciliation run's heartbeat: a run whose runner stopped beating was interrupted.
ALTER TABLE reconciliation_runs ADD COLUMN beat_at BIGINT;

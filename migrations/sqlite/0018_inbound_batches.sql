-- The rows the applier claims (`Inbox::due`), found oldest first from an index that holds only
-- the rows waiting (pending or failed), instead of sorting every row waiting; the claim's
-- update of `next_attempt_at` no longer rewrites an index entry. (On PostgreSQL, 0018 also
-- replaces the row triggers; SQLite's run in process and are kept.)
DROP INDEX inbox_events_due;
CREATE INDEX inbox_events_waiting ON inbox_events (event_created, event_id)
    WHERE status IN ('pending', 'failed');

-- The applier's costs per event, cut down (see also the end: the inbox's claim index).
--
-- The notifications (0006) and the entitlement change log (0010) written once per statement and
-- once per transaction instead of once per row: the applier writes a batch of states and tenant
-- links a statement at a time, and four row triggers per event (two plpgsql calls at once, two
-- deferred to commit, each taking the advisory lock and inserting a change) cost more than the
-- statements themselves.
--
-- What does not change: each tenant a statement touches (or '*' for a product, price or plan)
-- is notified on channel billsync_entitlements, sent at commit; each change is logged in the
-- transaction that makes it, whoever makes it, with `seq` in commit order (drawn at commit under
-- the same advisory lock). What does: a tenant changed several times in one transaction is
-- logged once, not once per row (the stream reads the tenant's state after the change, once).

DROP TRIGGER tenants_notify ON tenants;
DROP TRIGGER mirror_objects_notify ON mirror_objects;
DROP TRIGGER tenants_changes ON tenants;
DROP TRIGGER mirror_objects_changes ON mirror_objects;
DROP FUNCTION billsync_notify_tenant();
DROP FUNCTION billsync_notify_mirror();
DROP FUNCTION billsync_change_tenant();
DROP FUNCTION billsync_change_mirror();
DROP FUNCTION billsync_log_change(TEXT);

-- The changes a transaction made so far, logged at its commit: a tenant (tenant_id), the tenant
-- of a customer as linked at commit (customer_id), or every tenant (both NULL). Rows live only
-- within their transaction (the commit moves them to the log), so the table is unlogged.
CREATE UNLOGGED TABLE entitlement_changes_pending (
    xact        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tenant_id   TEXT,
    customer_id TEXT
);
CREATE INDEX entitlement_changes_pending_xact ON entitlement_changes_pending (xact);

-- One row per transaction with pending changes: its deferred trigger logs them at commit.
CREATE UNLOGGED TABLE entitlement_changes_commit (xact xid8 PRIMARY KEY);

CREATE FUNCTION billsync_log_changes() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1651074163, 1);
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    SELECT changed.tenant_id, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
    FROM (
        SELECT p.tenant_id FROM entitlement_changes_pending p
        WHERE p.xact = NEW.xact AND p.customer_id IS NULL
        UNION
        SELECT t.tenant_id FROM entitlement_changes_pending p
        JOIN tenants t ON t.customer_id = p.customer_id
        WHERE p.xact = NEW.xact
    ) changed;
    DELETE FROM entitlement_changes_pending WHERE xact = NEW.xact;
    DELETE FROM entitlement_changes_commit WHERE xact = NEW.xact;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER entitlement_changes_at_commit AFTER INSERT ON entitlement_changes_commit
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION billsync_log_changes();

-- Tenants inserted, updated or deleted by one statement (transition table `changed`).
CREATE FUNCTION billsync_tenants_changed() RETURNS trigger AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM changed) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('billsync_entitlements', c.tenant_id)
        FROM (SELECT DISTINCT tenant_id FROM changed) c;
    INSERT INTO entitlement_changes_pending (tenant_id) SELECT DISTINCT tenant_id FROM changed;
    INSERT INTO entitlement_changes_commit VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER tenants_inserted AFTER INSERT ON tenants REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION billsync_tenants_changed();
CREATE TRIGGER tenants_updated AFTER UPDATE ON tenants REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION billsync_tenants_changed();
CREATE TRIGGER tenants_deleted AFTER DELETE ON tenants REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION billsync_tenants_changed();

-- Mirror rows inserted or updated by one statement (transition table `changed`): a product,
-- price or plan may change anyone's entitlements; another object its customer's tenant's (the
-- tenant linked now for the notification, the one linked at commit for the log, as before).
CREATE FUNCTION billsync_mirror_changed() RETURNS trigger AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM changed) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM changed WHERE object_type IN ('product', 'price', 'plan')) THEN
        PERFORM pg_notify('billsync_entitlements', '*');
        INSERT INTO entitlement_changes_pending (tenant_id) VALUES (NULL);
        INSERT INTO entitlement_changes_commit VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    PERFORM pg_notify('billsync_entitlements', t.tenant_id)
        FROM (SELECT DISTINCT customer_id FROM changed
              WHERE object_type NOT IN ('product', 'price', 'plan')) c
        JOIN tenants t ON t.customer_id = c.customer_id;
    INSERT INTO entitlement_changes_pending (customer_id)
        SELECT DISTINCT customer_id FROM changed
        WHERE object_type IN ('customer', 'subscription', 'active_entitlements')
          AND customer_id IS NOT NULL;
    IF FOUND THEN
        INSERT INTO entitlement_changes_commit VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER mirror_objects_inserted AFTER INSERT ON mirror_objects
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION billsync_mirror_changed();
CREATE TRIGGER mirror_objects_updated AFTER UPDATE ON mirror_objects
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION billsync_mirror_changed();

-- The applier's claim (`Inbox::due`) only moves `next_attempt_at` on; with no index on that
-- column and room left on the page, PostgreSQL rewrites the row in place (a HOT update)
-- instead of adding a new entry to each of the inbox's five indexes. The rows waiting are
-- found, oldest first, from an index of their own that holds only them, so the claim reads
-- the oldest `apply_batch` rows instead of sorting every row waiting.
DROP INDEX inbox_events_due;
CREATE INDEX inbox_events_waiting ON inbox_events (event_created, event_id)
    WHERE status IN ('pending', 'failed');
ALTER TABLE inbox_events SET (fillfactor = 70);

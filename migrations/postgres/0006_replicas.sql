-- Several replicas on one database.
-- A reconciliation run's heartbeat: a run whose runner stopped beating was interrupted.
ALTER TABLE reconciliation_runs ADD COLUMN beat_at BIGINT;

-- Every replica keeps entitlement models in memory; these triggers tell all of them (channel
-- billsync_entitlements, payload: a tenant id, or '*' for everyone) when one could be out of
-- date, from whichever replica or command made the change. Sent at commit, never before.
CREATE FUNCTION billsync_notify_tenant() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('billsync_entitlements', OLD.tenant_id);
    ELSE
        PERFORM pg_notify('billsync_entitlements', NEW.tenant_id);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION billsync_notify_tenant();

CREATE FUNCTION billsync_notify_mirror() RETURNS trigger AS $$
BEGIN
    IF NEW.object_type IN ('product', 'price', 'plan') THEN
        PERFORM pg_notify('billsync_entitlements', '*');
    ELSIF NEW.customer_id IS NOT NULL THEN
        PERFORM pg_notify('billsync_entitlements', t.tenant_id)
            FROM tenants t WHERE t.customer_id = NEW.customer_id;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER mirror_objects_notify AFTER INSERT OR UPDATE ON mirror_objects
    FOR EACH ROW EXECUTE FUNCTION billsync_notify_mirror();

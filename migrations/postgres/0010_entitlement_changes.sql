-- The entitlement change log, which `GET /v1/entitlements/stream` resumes from: one row per
-- change to what a tenant's entitlements are computed from (the tenant row, its customer, its
-- subscriptions and active entitlements; a product, price or plan changes every tenant's:
-- tenant_id NULL), written by triggers in the transaction that makes the change, whoever makes
-- it. `seq` is the stream's cursor, the same on every replica.
--
-- The triggers are deferred to commit and take a transaction-level advisory lock before they
-- draw their numbers, so that sequence numbers are in commit order: a reader that has seen
-- `seq` n never later finds a smaller one committed (the two-key lock space does not overlap
-- the one-key space of the leases and of check-and-record).
CREATE TABLE entitlement_changes (
    seq        BIGSERIAL PRIMARY KEY,
    tenant_id  TEXT,
    changed_at BIGINT NOT NULL   -- Unix ms
);
CREATE INDEX entitlement_changes_at ON entitlement_changes (changed_at);

CREATE FUNCTION billsync_log_change(tenant TEXT) RETURNS void AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1651074163, 1);
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    VALUES (tenant, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT);
END
$$ LANGUAGE plpgsql;

CREATE FUNCTION billsync_change_tenant() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM billsync_log_change(OLD.tenant_id);
    ELSE
        PERFORM billsync_log_change(NEW.tenant_id);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER tenants_changes AFTER INSERT OR UPDATE OR DELETE ON tenants
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION billsync_change_tenant();

CREATE FUNCTION billsync_change_mirror() RETURNS trigger AS $$
BEGIN
    IF NEW.object_type IN ('product', 'price', 'plan') THEN
        PERFORM billsync_log_change(NULL);
    ELSIF NEW.object_type IN ('customer', 'subscription', 'active_entitlements')
          AND NEW.customer_id IS NOT NULL THEN
        PERFORM billsync_log_change(t.tenant_id)
            FROM tenants t WHERE t.customer_id = NEW.customer_id;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER mirror_objects_changes AFTER INSERT OR UPDATE ON mirror_objects
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION billsync_change_mirror();

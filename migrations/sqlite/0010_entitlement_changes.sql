-- The entitlement change log, which `GET /v1/entitlements/stream` resumes from: one row per
-- change to what a tenant's entitlements are computed from (the tenant row, its customer, its
-- subscriptions and active entitlements; a product, price or plan changes every tenant's:
-- tenant_id NULL), written by triggers in the transaction that makes the change. `seq` is the
-- stream's cursor; SQLite's one writer draws it in commit order.
CREATE TABLE entitlement_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id  TEXT,
    changed_at BIGINT NOT NULL   -- Unix ms
);
CREATE INDEX entitlement_changes_at ON entitlement_changes (changed_at);

CREATE TRIGGER tenants_changes_insert AFTER INSERT ON tenants BEGIN
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    VALUES (NEW.tenant_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER tenants_changes_update AFTER UPDATE ON tenants BEGIN
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    VALUES (NEW.tenant_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;
CREATE TRIGGER tenants_changes_delete AFTER DELETE ON tenants BEGIN
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    VALUES (OLD.tenant_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
END;

CREATE TRIGGER mirror_objects_changes_insert AFTER INSERT ON mirror_objects BEGIN
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    SELECT NULL, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    WHERE NEW.object_type IN ('product', 'price', 'plan');
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    SELECT t.tenant_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM tenants t
    WHERE NEW.object_type IN ('customer', 'subscription', 'active_entitlements')
      AND t.customer_id = NEW.customer_id;
END;
CREATE TRIGGER mirror_objects_changes_update AFTER UPDATE ON mirror_objects BEGIN
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    SELECT NULL, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    WHERE NEW.object_type IN ('product', 'price', 'plan');
    INSERT INTO entitlement_changes (tenant_id, changed_at)
    SELECT t.tenant_id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM tenants t
    WHERE NEW.object_type IN ('customer', 'subscription', 'active_entitlements')
      AND t.customer_id = NEW.customer_id;
END;

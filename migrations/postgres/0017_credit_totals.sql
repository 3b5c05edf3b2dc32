-- Running totals of credit-priced usage (issue 20's benchmark): a credit check reads a tenant's
-- totals per meter and segment, not every usage row since its grants took effect.

-- Each customer's credit grants' version, bumped by the transaction that writes any of its
-- `credit_grant` mirror rows (whatever writes them): parsed grants kept in memory are good for
-- as long as the version they were read at is the current one.
CREATE TABLE credit_grant_versions (
    customer_id TEXT PRIMARY KEY NOT NULL,
    version     BIGINT NOT NULL
);

CREATE FUNCTION billsync_credit_grant_version() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.object_type = 'credit_grant' AND OLD.customer_id IS NOT NULL THEN
        INSERT INTO credit_grant_versions (customer_id, version) VALUES (OLD.customer_id, 1)
        ON CONFLICT (customer_id) DO UPDATE SET version = credit_grant_versions.version + 1;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.object_type = 'credit_grant' AND NEW.customer_id IS NOT NULL
       AND (TG_OP = 'INSERT' OR OLD.object_type <> 'credit_grant'
            OR OLD.customer_id IS DISTINCT FROM NEW.customer_id) THEN
        INSERT INTO credit_grant_versions (customer_id, version) VALUES (NEW.customer_id, 1)
        ON CONFLICT (customer_id) DO UPDATE SET version = credit_grant_versions.version + 1;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER mirror_objects_credit_grants_insert AFTER INSERT ON mirror_objects
    FOR EACH ROW WHEN (NEW.object_type = 'credit_grant')
    EXECUTE FUNCTION billsync_credit_grant_version();
CREATE TRIGGER mirror_objects_credit_grants_update AFTER UPDATE ON mirror_objects
    FOR EACH ROW WHEN (NEW.object_type = 'credit_grant' OR OLD.object_type = 'credit_grant')
    EXECUTE FUNCTION billsync_credit_grant_version();
CREATE TRIGGER mirror_objects_credit_grants_delete AFTER DELETE ON mirror_objects
    FOR EACH ROW WHEN (OLD.object_type = 'credit_grant')
    EXECUTE FUNCTION billsync_credit_grant_version();

-- Grants already mirrored start at version 1.
INSERT INTO credit_grant_versions (customer_id, version)
SELECT DISTINCT customer_id, 1 FROM mirror_objects
WHERE object_type = 'credit_grant' AND customer_id IS NOT NULL;

-- Where a tenant's totals are cut: the starts and ends of its grants (every unit), ascending,
-- comma-separated Unix ms; and the meters totalled (a JSON array). Rewritten, with the totals,
-- only when the grants' cuts or the catalog's credit-priced meters change.
CREATE TABLE credit_cuts (
    tenant_id  TEXT PRIMARY KEY NOT NULL,
    points     TEXT NOT NULL,
    meters     TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The summed quantity of a tenant's usage of a credit-priced meter in one segment: from the cut
-- `segment` (Unix ms) to the next. Written in the transaction of every usage row it counts;
-- usage before the first cut is in no segment.
CREATE TABLE credit_totals (
    tenant_id TEXT NOT NULL,
    meter     TEXT NOT NULL,
    segment   BIGINT NOT NULL,
    quantity  NUMERIC NOT NULL,
    PRIMARY KEY (tenant_id, meter, segment)
);

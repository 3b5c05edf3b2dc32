-- Tenants: the product's own accounts. customer_id links one to its Stripe customer.
-- Times are Unix milliseconds (UTC) on both backends.
CREATE TABLE tenants (
    tenant_id   TEXT PRIMARY KEY NOT NULL,
    name        TEXT,
    email       TEXT,
    customer_id TEXT UNIQUE,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

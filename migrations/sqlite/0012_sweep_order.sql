-- The bounded drift sweep visits known tenants (those linked to a Stripe customer) in order:
-- swept_at is when the sweep last read one's customer and subscriptions (Unix milliseconds;
-- NULL: never), kept here so that the order survives restarts and moves between replicas.
ALTER TABLE tenants ADD COLUMN swept_at BIGINT;
-- The order the sweep reads them in: never visited first, then the least recently visited.
CREATE INDEX tenants_sweep_order ON tenants (COALESCE(swept_at, 0), tenant_id)
    WHERE customer_id IS NOT NULL;

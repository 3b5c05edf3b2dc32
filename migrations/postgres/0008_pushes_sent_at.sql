-- The continuous check of open periods (reconcile/open_check.rs) asks, every pass, which
-- tenants and meters had a push sent in a time range.
CREATE INDEX usage_pushes_sent_at ON usage_pushes (sent_at);

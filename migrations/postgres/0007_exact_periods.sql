-- A push names the billing period it carries usage of. Its status gains `invoice_final` (the
-- period's invoice was already final: reported, never sent; reconciliation calls it
-- arrived_after_invoice) and `superseded` (a period's value replaced by a newer one before it
-- was sent: never sent, so that no older value reaches Stripe after a newer one).
ALTER TABLE usage_pushes ADD COLUMN period_start BIGINT;
ALTER TABLE usage_pushes ADD COLUMN period_end BIGINT;
CREATE INDEX usage_pushes_period ON usage_pushes (tenant_id, meter, period_start);

-- Billing periods as the vendor stated them, kept after they end: a subscription's periods (one
-- row per period it was seen in) and, from invoices, which period an invoice bills and whether
-- it is final. Usage is pushed into the period it happened in, never into another; usage of a
-- period whose invoice is final is reported instead. Times are Unix milliseconds.
CREATE TABLE billing_periods (
    customer_id         TEXT NOT NULL,
    subscription_id     TEXT NOT NULL,
    period_start        BIGINT NOT NULL,
    period_end          BIGINT NOT NULL,
    subscription_status TEXT,             -- the subscription's status when this period was last seen
    invoice_id          TEXT,             -- the invoice billing this period's usage, once there is one
    invoice_status      TEXT,             -- draft | open | paid | uncollectible | void | deleted
    PRIMARY KEY (customer_id, subscription_id, period_start)
);

-- The transaction that stored each usage event: the usage snapshot's watermark is a horizon of
-- transaction ids (every transaction below it has ended), so an event committed late is folded
-- by a later snapshot however old its timestamps, instead of a receipt time that a slow commit
-- falls behind. The old snapshot is dropped and the next one folds the whole log again.
ALTER TABLE usage_events ADD COLUMN txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX usage_events_txid ON usage_events (txid);
DELETE FROM usage_buckets;
DELETE FROM sync_state WHERE name = 'usage.snapshot_until';


-- A push may be a repair (kind = 'repair'): usage Stripe acknowledged and then lost, pushed
-- again by reconciliation, with the finding it repairs as its evidence (JSON). A repair carries
-- no events; its identifier is derived from the finding, so that repairing the same finding
-- twice is one meter event at Stripe. Every earlier push is kind 'usage'.
ALTER TABLE usage_pushes ADD COLUMN kind TEXT NOT NULL DEFAULT 'usage';
ALTER TABLE usage_pushes ADD COLUMN evidence TEXT;

-- The continuous check finds the draft invoices (to check and repair before Stripe finalizes
-- them) every pass.
CREATE INDEX billing_periods_drafts ON billing_periods (invoice_id) WHERE invoice_status = 'draft';

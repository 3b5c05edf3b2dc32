-- A tenant's latest notifications (the console's tenant page, `GET /v1/notifications?tenant_id=`)
-- without walking every tenant's: newest first within the tenant.
CREATE INDEX notifications_tenant ON notifications (tenant_id, created_at, event_id);

-- Tenant search (`GET /v1/tenants?q=`): a prefix of the tenant id, the customer id, or the
-- lowercased name or email, each answered from an index as a range. The ranges compare in
-- byte order (COLLATE "C"), whatever the database's collation, as SQLite does.
CREATE INDEX tenants_search_id ON tenants ((tenant_id COLLATE "C"));
CREATE INDEX tenants_search_customer ON tenants ((customer_id COLLATE "C"));
CREATE INDEX tenants_search_name ON tenants ((lower(name) COLLATE "C"));
CREATE INDEX tenants_search_email ON tenants ((lower(email) COLLATE "C"));

-- Tenant search (`GET /v1/tenants?q=`): a prefix of the tenant id, the customer id, or the
-- lowercased name or email, each answered from an index as a range, in byte order.
CREATE INDEX tenants_search_name ON tenants (lower(name));
CREATE INDEX tenants_search_email ON tenants (lower(email));

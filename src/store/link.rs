//! Tenant links of a round of applied states ([`super::apply`]): a few statements for the whole
//! round, whatever its size, instead of two or three per customer.

/// Links each customer of a round (distinct customers, each with the tenant it claims, `None`
/// when deleted or claiming none) to its tenant, only if that tenant has no customer yet, and
/// lets go of any tenant it no longer names, on any transaction. Of several customers claiming
/// one tenant, the first in the round is offered it. Evaluates to the conflicts, by customer:
/// the claims refused because the tenant belongs to another customer.
macro_rules! link_tenants {
    ($tx:expr, $customers:expr, $now_ms:expr) => {{
        let customers: &[(&str, Option<&$crate::store::TenantClaim>)] = $customers;
        for chunk in customers.chunks(500) {
            // A deleted customer, or one whose tenant id was removed or changed, lets go.
            let mut unlink =
                sqlx::QueryBuilder::new("UPDATE tenants SET customer_id = NULL, updated_at = ");
            unlink.push_bind($now_ms);
            unlink.push(" FROM (");
            unlink.push_values(chunk, |mut row, (customer, claim)| {
                row.push_bind(*customer)
                    .push_bind(claim.map(|c| c.tenant_id.as_str()));
            });
            unlink.push(
                ") AS unlinked WHERE tenants.customer_id = unlinked.column1 \
                 AND (unlinked.column2 IS NULL OR tenants.tenant_id <> unlinked.column2)",
            );
            unlink.build().execute(&mut *$tx).await?;
        }
        let claims: Vec<(&str, &$crate::store::TenantClaim)> = customers
            .iter()
            .filter_map(|(customer, claim)| claim.map(|claim| (*customer, claim)))
            .collect();
        // One statement may offer a tenant once (PostgreSQL refuses to update a row twice).
        let mut offered = std::collections::HashSet::new();
        let first_claims: Vec<_> = claims
            .iter()
            .filter(|(_, claim)| offered.insert(claim.tenant_id.as_str()))
            .collect();
        let mut linked_now = std::collections::HashSet::new();
        for chunk in first_claims.chunks(200) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO tenants (tenant_id, name, email, customer_id, created_at, updated_at) ",
            );
            insert.push_values(chunk, |mut row, (customer, claim)| {
                row.push_bind(&claim.tenant_id)
                    .push_bind(&claim.name)
                    .push_bind(&claim.email)
                    .push_bind(*customer)
                    .push_bind($now_ms)
                    .push_bind($now_ms);
            });
            insert.push(
                " ON CONFLICT (tenant_id) DO UPDATE SET customer_id = excluded.customer_id, \
                 updated_at = excluded.updated_at WHERE tenants.customer_id IS NULL \
                 RETURNING tenant_id, customer_id",
            );
            let rows: Vec<(String, Option<String>)> =
                insert.build_query_as().fetch_all(&mut *$tx).await?;
            linked_now.extend(rows);
        }
        // The claims not linked just now: the tenant's holder is read, in one statement.
        let unanswered: Vec<_> = claims
            .iter()
            .filter(|(customer, claim)| {
                !linked_now.contains(&(claim.tenant_id.clone(), Some((*customer).to_owned())))
            })
            .collect();
        let mut holders = std::collections::HashMap::new();
        for chunk in unanswered.chunks(500) {
            let mut select = sqlx::QueryBuilder::new(
                "SELECT tenant_id, customer_id FROM tenants WHERE tenant_id IN (",
            );
            let mut list = select.separated(", ");
            for (_, claim) in chunk {
                list.push_bind(&claim.tenant_id);
            }
            select.push(")");
            let rows: Vec<(String, Option<String>)> =
                select.build_query_as().fetch_all(&mut *$tx).await?;
            holders.extend(rows);
        }
        let mut conflicts = std::collections::HashMap::new();
        for (customer, claim) in unanswered {
            let holder = holders.get(&claim.tenant_id).cloned().flatten();
            if holder.as_deref() != Some(*customer) {
                let conflict = format!(
                    "customer {customer} names tenant {} which already belongs to customer {}",
                    claim.tenant_id,
                    holder.unwrap_or_default()
                );
                conflicts.insert((*customer).to_owned(), conflict);
            }
        }
        conflicts
    }};
}

/// The tenants linked to the customers named, on any transaction, a statement per 500;
/// evaluates to a map from customer to tenant.
macro_rules! tenants_of {
    ($tx:expr, $customers:expr) => {{
        let customers: &[&str] = $customers;
        let mut tenants = std::collections::HashMap::new();
        for chunk in customers.chunks(500) {
            let mut select = sqlx::QueryBuilder::new(
                "SELECT customer_id, tenant_id FROM tenants WHERE customer_id IN (",
            );
            let mut list = select.separated(", ");
            for customer in chunk {
                list.push_bind(*customer);
            }
            select.push(")");
            let rows: Vec<(String, String)> = select.build_query_as().fetch_all(&mut *$tx).await?;
            tenants.extend(rows);
        }
        tenants
    }};
}

pub(super) use {link_tenants, tenants_of};

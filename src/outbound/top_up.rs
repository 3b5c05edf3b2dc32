//! `credits.top_up`: a low balance's top-up at the vendor ([`crate::topup`]).

use super::Outbox;
use super::attempt::{Ending, Step};
use super::execute::parse;
use crate::error::WorkError;
use crate::store::{CommandRow, TenantRecord};
use crate::stripe::TopUpWrite;
use crate::topup::TopUpRequest;

impl Outbox {
    /// `credits.top_up`: invoice the amount, pay it, grant the credits (each step keyed by the
    /// command, so a retry makes only what is missing). A refused payment fails the command.
    pub(super) async fn top_up(
        &self,
        command: &CommandRow,
        tenant: &TenantRecord,
        key: &str,
    ) -> Result<Step, WorkError> {
        let request: TopUpRequest = parse(&command.request)?;
        let Some(customer) = tenant.customer_id.as_deref() else {
            return Ok(Step::Retry(
                "the tenant has no Stripe customer yet".to_owned(),
            ));
        };
        let Some(credits) = self.vendor.credits() else {
            let message = "this vendor has no billing credits";
            return Ok(Step::Done(Ending::failed("not_supported", message)));
        };
        let description = format!("Credit top-up ({} {})", request.amount, request.currency);
        let crossing = request.crossing.to_string();
        let metadata = [
            ("billsync_command", command.command_id.as_str()),
            ("tenant_id", tenant.tenant_id.as_str()),
            ("billsync_crossing", crossing.as_str()),
        ];
        let write = TopUpWrite {
            customer,
            currency: &request.currency,
            amount: request.amount,
            description: &description,
            metadata: &metadata,
        };
        let made = credits.top_up(&write, key).await?;
        Ok(Step::Done(Ending::done(made)))
    }
}

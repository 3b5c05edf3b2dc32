//! One attempt at a command, and how its end is recorded: a success or a conflict with the
//! vendor state it observed (applied to the mirror in the transaction that ends the command), a
//! failure, or a retry later.

use std::time::Duration;

use serde_json::Value;

use super::{IDLE, Outbox, fingerprint, idempotency_key};
use crate::cluster::ClaimRenewal;
use crate::error::WorkError;
use crate::store::{CommandRow, Confirmed, Queue, Settlement, Source, StoreError, now_ms};
use crate::stripe::{ObjectKind, VendorError, objects};
use crate::sync::events;

/// How an attempt ended.
#[derive(Debug)]
pub(super) enum Step {
    Done(Ending),
    /// Worth another attempt later (vendor unavailable, customer not there yet).
    Retry(String),
}

#[derive(Debug)]
pub(super) struct Ending {
    status: &'static str,
    /// The vendor object to show (the result, or the current state on conflict).
    object: Option<Observed>,
    /// A result that is no mirrored object (a top-up's invoice and grant).
    result: Option<Value>,
    error_code: Option<String>,
    message: Option<String>,
}

/// A vendor object as a request returned it, with its version: when the request was sent.
#[derive(Debug)]
struct Observed {
    kind: ObjectKind,
    object: Value,
    at: i64,
}

impl Ending {
    pub(super) fn succeeded(kind: ObjectKind, object: Value, at: i64) -> Self {
        Self {
            status: "succeeded",
            object: Some(Observed { kind, object, at }),
            result: None,
            error_code: None,
            message: None,
        }
    }

    /// Succeeded with a result kept as the command's, applied to no mirror.
    pub(super) fn done(result: Value) -> Self {
        Self {
            status: "succeeded",
            object: None,
            result: Some(result),
            error_code: None,
            message: None,
        }
    }

    pub(super) fn failed(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: "failed",
            object: None,
            result: None,
            error_code: Some(code.to_owned()),
            message: Some(message.into()),
        }
    }

    pub(super) fn conflict(current: Option<Value>, at: i64) -> Self {
        Self {
            status: "conflict",
            object: current.map(|object| Observed {
                kind: ObjectKind::Subscription,
                object,
                at,
            }),
            result: None,
            error_code: Some("conflict".to_owned()),
            message: Some(
                "the subscription changed at the vendor after this command was accepted; \
                 nothing was sent"
                    .to_owned(),
            ),
        }
    }
}

impl Outbox {
    /// One attempt at one command (as claimed by `Commands::due`), recorded whatever happens.
    /// The claim is renewed until the vendor has answered.
    pub async fn attempt(&self, command: CommandRow) {
        let started = std::time::Instant::now();
        let renewal = ClaimRenewal::start(
            self.db.clone(),
            Queue::Commands,
            vec![command.command_id.clone()],
            command.next_attempt_at,
            self.claim,
            self.metrics.clone(),
        );
        let executed = self.execute(&command).await;
        renewal.finish().await;
        let step = match executed {
            Ok(step) => step,
            Err(WorkError::Vendor(VendorError::Rejected {
                status,
                code,
                message,
            })) => Step::Done(Ending::failed(
                code.as_deref().unwrap_or(if status == 404 {
                    "not_found"
                } else {
                    "vendor_rejected"
                }),
                message,
            )),
            Err(error) => Step::Retry(error.to_string()),
        };
        let outcome = match step {
            Step::Done(ending) => self.settle(&command, ending).await,
            Step::Retry(reason) => self.retry(&command, &reason).await,
        };
        match outcome {
            Ok(status) => {
                self.metrics.inc(
                    "billsync_commands_total",
                    "Outbox command attempts, by kind and outcome (pending: to be retried).",
                    &[("kind", &command.kind), ("outcome", status)],
                );
                if status != "pending" {
                    self.metrics.observe(
                        "billsync_command_seconds",
                        "From a command's acceptance to its end.",
                        &[("kind", &command.kind)],
                        (now_ms() - command.created_at).max(0) as f64 / 1000.0,
                    );
                }
                tracing::debug!(command_id = %command.command_id, status, elapsed_ms = started.elapsed().as_millis() as u64, "outbox attempt");
            }
            Err(error) => {
                // Like a crash after the call: the command stays pending and is tried again, when
                // the vendor's state tells whether the call landed. Not at once: the database is
                // failing.
                tracing::warn!(command_id = %command.command_id, error = %error, "outbox: cannot record the outcome; the command will be retried");
                tokio::time::sleep(IDLE).await;
            }
        }
    }

    async fn retry(&self, command: &CommandRow, reason: &str) -> Result<&'static str, StoreError> {
        let age = Duration::from_millis((now_ms() - command.created_at).max(0) as u64);
        if age >= self.give_up_after {
            let message = format!(
                "the vendor did not take the command within {}s: {reason}",
                self.give_up_after.as_secs()
            );
            return self
                .settle(command, Ending::failed("vendor_unavailable", message))
                .await;
        }
        let delay = crate::retry::after_failures(command.attempts, self.max_retry_delay);
        tracing::warn!(command_id = %command.command_id, attempts = command.attempts + 1, reason, "command will be retried");
        self.db
            .commands()
            .retry_later(
                &command.command_id,
                reason,
                now_ms() + delay.as_millis() as i64,
                now_ms(),
            )
            .await?;
        Ok("pending")
    }

    /// Stores the command's end. With a vendor state (the result, or the current state on
    /// conflict), the state's inbox row, its apply to the mirror and the command's end are one
    /// transaction: a client that sees the command ended sees the mirror and the entitlements
    /// after it. A crash before it leaves the command pending; its next attempt finds the
    /// state already at the vendor.
    async fn settle(
        &self,
        command: &CommandRow,
        ending: Ending,
    ) -> Result<&'static str, StoreError> {
        let rebase = match (&command.base, &ending.object) {
            (Some(old), Some(seen))
                if ending.status == "succeeded" && seen.kind == ObjectKind::Subscription =>
            {
                let new = fingerprint(Some(&objects::subscription(&seen.object)));
                Some((old.clone(), new))
            }
            _ => None,
        };
        let settlement = Settlement {
            status: ending.status,
            result: (ending.object.as_ref().map(|seen| &seen.object))
                .or(ending.result.as_ref())
                .map(Value::to_string),
            error_code: ending.error_code.clone(),
            message: ending.message.clone(),
            rebase,
        };
        // Versioned by when the request that returned it was sent, not by now: a state someone
        // fetched in the meantime may be newer.
        let record = ending.object.as_ref().and_then(|seen| {
            let mut event =
                events::from_fetched_state(seen.kind, &seen.object, Source::Command, seen.at)?;
            event.idempotency_key = Some(idempotency_key(&command.command_id));
            Some((seen, event))
        });
        match &record {
            Some((seen, event)) => {
                let confirmed = Confirmed {
                    record: event,
                    command,
                    settlement: &settlement,
                    unless_superseded: false,
                };
                self.applier
                    .apply_confirmed(seen.kind, &seen.object, seen.at, confirmed)
                    .await?;
            }
            None => {
                self.db
                    .commands()
                    .settle(command, &settlement, now_ms())
                    .await?;
            }
        }
        match ending.status {
            "failed" => {
                tracing::warn!(command_id = %command.command_id, kind = %command.kind, code = ending.error_code.as_deref().unwrap_or("-"), reason = ending.message.as_deref().unwrap_or("-"), "command failed")
            }
            "conflict" => {
                tracing::warn!(command_id = %command.command_id, kind = %command.kind, "command not sent: the subscription changed at the vendor")
            }
            _ => {
                tracing::info!(command_id = %command.command_id, kind = %command.kind, "command confirmed by the vendor")
            }
        }
        Ok(ending.status)
    }
}

//! Claims on queued work. A replica claims due rows by moving their `next_attempt_at` to the end
//! of its claim, all rows of one claim to the same value (`Inbox::due`, `Commands::due`,
//! `Usage::due_pushes`); while the work runs it renews the claim here, and only where it still
//! holds it.

use super::{Db, StoreError, on_pool};

/// A work queue whose rows are claimed through `next_attempt_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// `inbox_events`, applied by the applier.
    Inbox,
    /// `commands`, sent by the outbox worker.
    Commands,
    /// `usage_pushes`, sent by the pusher.
    Pushes,
}

impl Queue {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbox => "inbox",
            Self::Commands => "commands",
            Self::Pushes => "pushes",
        }
    }

    /// The table, its key, and the condition under which a row may be claimed at all.
    fn parts(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Inbox => (
                "inbox_events",
                "event_id",
                "status IN ('pending', 'failed')",
            ),
            Self::Commands => ("commands", "command_id", "status = 'pending'"),
            Self::Pushes => ("usage_pushes", "push_id", "status = 'pending'"),
        }
    }
}

pub struct Claims<'a> {
    db: &'a Db,
}

impl<'a> Claims<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Moves the claim on the rows `ids` from `held_until` to `until`, only where it still is
    /// `held_until` and the row may still be claimed: a row settled or rescheduled since, or
    /// claimed by another replica after this claim ran out, is left alone. Returns the ids
    /// renewed.
    pub async fn renew(
        &self,
        queue: Queue,
        ids: &[String],
        held_until: i64,
        until: i64,
    ) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (table, key, claimable) = queue.parts();
        let renewed: Vec<(String,)> = on_pool!(self.db, |pool| {
            let mut update =
                sqlx::QueryBuilder::new(format!("UPDATE {table} SET next_attempt_at = "));
            update.push_bind(until);
            update.push(format_args!(" WHERE {claimable} AND next_attempt_at = "));
            update.push_bind(held_until);
            update.push(format_args!(" AND {key} IN ("));
            let mut list = update.separated(", ");
            for id in ids {
                list.push_bind(id.as_str());
            }
            update.push(format_args!(") RETURNING {key}"));
            update.build_query_as().fetch_all(pool).await
        })?;
        Ok(renewed.into_iter().map(|(id,)| id).collect())
    }
}

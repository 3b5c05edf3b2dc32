//! The outbox: commands for the vendor, stored before they are answered and settled once the
//! vendor has confirmed (or refused) them.

use super::{Db, StoreError, on_pool};

/// A command as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CommandRow {
    pub command_id: String,
    pub tenant_id: String,
    pub kind: String,
    pub request: String,
    pub client_key: Option<String>,
    pub request_digest: String,
    pub base: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub error_code: Option<String>,
    pub result: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
}

/// A command to store.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub command_id: String,
    pub kind: String,
    pub request: String,
    pub client_key: Option<String>,
    pub request_digest: String,
    pub base: Option<String>,
}

/// What [`Commands::enqueue`] did.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// Stored; the last row is the command asked for (earlier ones prepare it).
    New(CommandRow),
    /// The caller's idempotency key was used before: the command it named, nothing stored.
    Existing(CommandRow),
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    /// `succeeded`, `failed` or `conflict`.
    pub status: &'a str,
    pub result: Option<String>,
    pub error_code: Option<String>,
    pub message: Option<String>,
    /// After a success: later commands of the tenant accepted against `.0` now expect `.1`.
    pub rebase: Option<(String, String)>,
}

macro_rules! columns {
    () => {
        "command_id, tenant_id, kind, request, client_key, request_digest, base, status, attempts, \
         next_attempt_at, last_error, error_code, result, created_at, updated_at, completed_at"
    };
}

/// Inserts one [`NewCommand`] for a tenant; a repeated (tenant, client key) inserts nothing.
macro_rules! insert_command {
    ($conn:expr, $tenant:expr, $c:expr, $now_ms:expr) => {{
        let c: &$crate::store::NewCommand = $c;
        sqlx::query(
            "INSERT INTO commands (command_id, tenant_id, kind, request, client_key, request_digest, base, \
             status, attempts, next_attempt_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8, $8) \
             ON CONFLICT (tenant_id, client_key) DO NOTHING",
        )
        .bind(&c.command_id)
        .bind($tenant)
        .bind(&c.kind)
        .bind(&c.request)
        .bind(&c.client_key)
        .bind(&c.request_digest)
        .bind(&c.base)
        .bind($now_ms)
        .execute($conn)
    }};
}
pub(crate) use insert_command;

/// Ends a pending command (counting the attempt) and rebases the tenant's later commands, on
/// any transaction; a `credits.top_up` ending `failed` also stores its notification
/// ([`crate::topup::top_up_failed`]). Evaluates to whether the command was still pending.
macro_rules! settle_command {
    ($tx:expr, $command:expr, $settlement:expr, $now_ms:expr) => {{
        let command: &$crate::store::CommandRow = $command;
        let settlement: &$crate::store::Settlement<'_> = $settlement;
        let settled = sqlx::query(
            "UPDATE commands SET status = $2, result = $3, error_code = $4, last_error = $5, \
             attempts = attempts + 1, updated_at = $6, completed_at = $6 \
             WHERE command_id = $1 AND status = 'pending'",
        )
        .bind(&command.command_id)
        .bind(settlement.status)
        .bind(&settlement.result)
        .bind(&settlement.error_code)
        .bind(&settlement.message)
        .bind($now_ms)
        .execute($tx)
        .await?
        .rows_affected()
            > 0;
        // A top-up that failed for good tells the product, once: only the transaction that
        // ended the command gets here.
        if settled && let Some(note) = $crate::topup::top_up_failed(command, settlement, $now_ms) {
            $crate::store::insert_notification!($tx, &note, $now_ms).await?;
        }
        if settled && let Some((old, new)) = &settlement.rebase {
            sqlx::query(
                "UPDATE commands SET base = $3 WHERE tenant_id = $1 AND status = 'pending' \
                 AND base = $2",
            )
            .bind(&command.tenant_id)
            .bind(old)
            .bind(new)
            .execute($tx)
            .await?;
        }
        settled
    }};
}
pub(super) use settle_command;

pub struct Commands<'a> {
    db: &'a Db,
}

impl<'a> Commands<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Stores `commands` for the tenant in one transaction, in order. When the last one carries
    /// a client key already used for this tenant, nothing is stored and the earlier command is
    /// returned instead.
    pub async fn enqueue(
        &self,
        tenant_id: &str,
        commands: &[NewCommand],
        now_ms: i64,
    ) -> Result<Enqueued, StoreError> {
        let last = commands.last().expect("at least one command");
        let enqueued = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let mut inserted = true;
            for command in commands {
                inserted = insert_command!(&mut *tx, tenant_id, command, now_ms)
                    .await?
                    .rows_affected()
                    > 0;
            }
            let enqueued = if inserted {
                let row = sqlx::query_as::<_, CommandRow>(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM commands WHERE command_id = $1"
                ))
                .bind(&last.command_id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Enqueued::New(row)
            } else {
                tx.rollback().await?;
                let row = sqlx::query_as::<_, CommandRow>(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM commands WHERE tenant_id = $1 AND client_key = $2"
                ))
                .bind(tenant_id)
                .bind(&last.client_key)
                .fetch_one(pool)
                .await?;
                Enqueued::Existing(row)
            };
            Ok::<_, sqlx::Error>(enqueued)
        })?;
        Ok(enqueued)
    }

    pub async fn get(&self, command_id: &str) -> Result<Option<CommandRow>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CommandRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM commands WHERE command_id = $1"
            ))
            .bind(command_id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row)
    }

    /// The tenant's unfinished commands, oldest first.
    pub async fn pending_of(&self, tenant_id: &str) -> Result<Vec<CommandRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CommandRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM commands WHERE tenant_id = $1 AND status = 'pending' \
                 ORDER BY created_at, command_id"
            ))
            .bind(tenant_id)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Claims the next command of each tenant, when it is due: a tenant's commands run one at a
    /// time, in the order they were accepted. A claimed command is put off for `claim_ms`, so
    /// no other replica takes it (PostgreSQL: `FOR UPDATE SKIP LOCKED`) nor the tenant's later
    /// ones, and comes back by itself if this process dies before settling it.
    pub async fn due(
        &self,
        now_ms: i64,
        limit: u32,
        claim_ms: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let sql = format!(
            "UPDATE commands SET next_attempt_at = $3 WHERE command_id IN (SELECT command_id \
             FROM commands c WHERE status = 'pending' AND next_attempt_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM commands p WHERE p.tenant_id = c.tenant_id \
             AND p.status = 'pending' AND (p.created_at < c.created_at \
             OR (p.created_at = c.created_at AND p.command_id < c.command_id))) \
             ORDER BY created_at, command_id LIMIT $2{}) RETURNING {}",
            self.db.skip_locked(),
            columns!()
        );
        let mut rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CommandRow>(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(i64::from(limit))
                .bind(now_ms + claim_ms)
                .fetch_all(pool)
                .await
        })?;
        rows.sort_by(|a, b| (a.created_at, &a.command_id).cmp(&(b.created_at, &b.command_id)));
        Ok(rows)
    }

    /// Gives back claims this process will not work on now: the commands are due at `at`.
    pub async fn release(&self, command_ids: &[String], at: i64) -> Result<(), StoreError> {
        for command_id in command_ids {
            on_pool!(self.db, |pool| {
                sqlx::query(
                    "UPDATE commands SET next_attempt_at = $2 WHERE command_id = $1 AND status = 'pending'",
                )
                .bind(command_id)
                .bind(at)
                .execute(pool)
                .await
                .map(drop)
            })?;
        }
        Ok(())
    }

    /// The results of the tenant's commands that succeeded at or after `since_ms`, and of its
    /// latest success whenever that was.
    pub async fn results_since(
        &self,
        tenant_id: &str,
        since_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT result FROM commands WHERE tenant_id = $1 AND status = 'succeeded' \
                 AND result IS NOT NULL AND (completed_at >= $2 OR command_id = (\
                 SELECT command_id FROM commands WHERE tenant_id = $1 AND status = 'succeeded' \
                 AND result IS NOT NULL ORDER BY completed_at DESC, command_id DESC LIMIT 1))",
            )
            .bind(tenant_id)
            .bind(since_ms)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    /// The earliest retry scheduled after `now_ms`, if any.
    pub async fn next_retry(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        let (next,): (Option<i64>,) = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT MIN(next_attempt_at) FROM commands WHERE status = 'pending' \
                 AND next_attempt_at > $1",
            )
            .bind(now_ms)
            .fetch_one(pool)
            .await
        })?;
        Ok(next)
    }

    /// The attempt failed in a way worth retrying at `next_attempt_at`.
    pub async fn retry_later(
        &self,
        command_id: &str,
        error: &str,
        next_attempt_at: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE commands SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3, \
                 updated_at = $4 WHERE command_id = $1 AND status = 'pending'",
            )
            .bind(command_id)
            .bind(error)
            .bind(next_attempt_at)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// Ends a pending command with no vendor state to apply (failures), and rebases the
    /// tenant's later commands. False when it had already ended.
    pub async fn settle(
        &self,
        command: &CommandRow,
        settlement: &Settlement<'_>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let settled = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let settled = settle_command!(&mut *tx, command, settlement, now_ms);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(settled)
        })?;
        Ok(settled)
    }

    /// How many commands wait, and since when the oldest.
    pub async fn backlog(&self) -> Result<(i64, Option<i64>), StoreError> {
        let row: (i64, Option<i64>) = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT COUNT(*), MIN(created_at) FROM commands WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(row)
    }

    /// How many commands ended `failed` (the vendor refused them, or gave up), ever.
    pub async fn failed_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self.db, |pool| {
            sqlx::query_as("SELECT COUNT(*) FROM commands WHERE status = 'failed'")
                .fetch_one(pool)
                .await
        })?;
        Ok(n)
    }
}

//! SQLite's usage writer: the one connection that stores usage batches, the batches waiting
//! at a time in one transaction, and checkpoints the write-ahead log between them.
//!
//! Why a connection of its own (profiled in docs/benchmarks.md, "SQLite ingest in batches of
//! 1,000"): a batch over many tenants dirties about 1.3 pages per event in the two
//! tenant-keyed indexes. On pooled connections, whose cache is 2 MiB and dropped whenever
//! another connection has written, every batch read those pages again from the log and spilled
//! dirty pages into it before its commit. This connection's cache holds a whole batch and
//! stays valid from one batch to the next, since no other connection writes usage.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

use super::usage::{CHUNK, Inserted, Payloads, insert_usage, notify_usage, usage_columns};
use super::{Db, StoreError, UsageRow};
use crate::credits::book::CreditBook;

/// The writer's page cache, KiB: the dirty pages of the largest batch (`metering.max_batch`,
/// 10,000 events, about 13,000 pages of 4 KiB) fit, so a batch never spills before its commit.
const CACHE_KIB: u32 = 65_536;

/// The usage writer's connection, opened at its first batch. Whoever holds it is the only one
/// storing usage (it sits in the metering's writer mutex). On PostgreSQL, and on an in-memory
/// SQLite database (which another connection would not share), batches go to the pool.
#[derive(Debug, Default)]
pub struct UsageWriter {
    conn: Option<SqliteConnection>,
}

impl UsageWriter {
    /// Stores batches of events in one transaction, keeping `book`'s running credit totals:
    /// for each batch, as [`super::Usage::insert`] does, whether each event was new. An event id that two
    /// batches carry is new in the first only. One commit, one `fsync`: a batch over many
    /// tenants dirties an index page or two per tenant, whichever the number of events, so
    /// the pages a group writes are about those of one batch.
    pub async fn insert_group(
        &mut self,
        db: &Db,
        book: &CreditBook,
        batches: &[&[UsageRow]],
    ) -> Result<Vec<Inserted>, StoreError> {
        let Some(conn) = self.connection(db).await? else {
            let mut inserted = Vec::with_capacity(batches.len());
            for rows in batches {
                inserted.push(db.usage().keeping(book).insert(rows).await?);
            }
            return Ok(inserted);
        };
        let credits = db.usage().keeping(book).credit_write();
        let stored = async {
            let mut tx = conn.begin().await?;
            let mut inserted = Vec::with_capacity(batches.len());
            for rows in batches {
                let rows: &[UsageRow] = rows;
                let no_payloads = &|_: &[&UsageRow], _: &[_]| Vec::new();
                inserted.push(insert_usage!(&mut *tx, rows, no_payloads, false, credits));
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(inserted)
        }
        .await;
        if stored.is_err() {
            // A connection that failed is not trusted again: the next group opens another.
            self.conn = None;
        }
        Ok(stored?)
    }

    /// Copies the write-ahead log into the database file. Run between batches (by whoever
    /// holds the writer), it copies every frame, so the next batch writes the log from its
    /// start again: a checkpoint on another connection while batches follow each other
    /// never catches up with the last commit, and the log then grows without end.
    pub async fn checkpoint(&mut self, db: &Db) -> Result<(), StoreError> {
        match &mut self.conn {
            Some(conn) => {
                sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
            None => db.checkpoint().await,
        }
    }

    /// The writer's connection, opened with the pool's options and a larger cache; `None`
    /// where batches go to the pool.
    async fn connection(&mut self, db: &Db) -> Result<Option<&mut SqliteConnection>, StoreError> {
        let Db::Sqlite(pool) = db else {
            return Ok(None);
        };
        let options = pool.connect_options();
        if in_memory(&options) {
            return Ok(None);
        }
        if self.conn.is_none() {
            let options = (*options)
                .clone()
                .pragma("cache_size", format!("-{CACHE_KIB}"))
                // Each multi-row INSERT inside a transaction keeps a statement journal (the
                // pages it changes, as they were, to undo the statement alone): in memory, not
                // in a temporary file written page by page, as much as the log itself.
                .pragma("temp_store", "memory");
            self.conn = Some(options.connect().await?);
        }
        Ok(self.conn.as_mut())
    }
}

/// Whether the options name an in-memory database (sqlx names `sqlite::memory:` a shared
/// `file:sqlx-in-memory-N`).
fn in_memory(options: &SqliteConnectOptions) -> bool {
    let file = options.get_filename();
    file == Path::new(":memory:") || file.to_string_lossy().starts_with("file:sqlx-in-memory-")
}

//! Leases: which replica runs a singleton job (the events poller, the drift sweep, the pusher,
//! the usage snapshot, scheduled reconciliation).
//!
//! On PostgreSQL a lease is a session advisory lock held on a connection of its own: it is
//! released the moment that connection ends, so when a replica dies (even `kill -9`) the
//! database frees its leases at once and another replica takes them at its next try. On SQLite
//! there is one serving process, which always holds every lease.

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool};

use super::{Db, StoreError};

/// One replica's seat for one lease: it keeps its connection between tries.
pub struct LeaseSeat {
    key: i64,
    /// The replica's id, the lease connection's `application_name`: other replicas read who
    /// holds a lease from `pg_locks` ([`holders`]).
    holder: String,
    backend: Seat,
}

enum Seat {
    Local,
    Postgres {
        pool: PgPool,
        conn: Option<PgConnection>,
    },
}

/// The advisory-lock key of a lease: a stable 64-bit FNV-1a digest of its name.
pub fn lease_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"billsync:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

impl LeaseSeat {
    pub fn new(db: &Db, name: &str, holder: &str) -> Self {
        let backend = match db {
            Db::Sqlite(_) => Seat::Local,
            Db::Postgres(pool) => Seat::Postgres {
                pool: pool.clone(),
                conn: None,
            },
        };
        Self {
            key: lease_key(name),
            holder: holder.chars().take(63).collect(),
            backend,
        }
    }

    /// Tries to take the lease; `false` while another replica holds it.
    pub async fn try_take(&mut self) -> Result<bool, StoreError> {
        let Seat::Postgres { pool, conn } = &mut self.backend else {
            return Ok(true);
        };
        if conn.is_none() {
            let mut opened = pool.acquire().await?.detach();
            sqlx::query("SELECT set_config('application_name', $1, false)")
                .bind(&self.holder)
                .execute(&mut opened)
                .await?;
            *conn = Some(opened);
        }
        let connection = conn.as_mut().expect("connection just opened");
        let taken = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut *connection)
            .await;
        match taken {
            Ok(taken) => Ok(taken),
            Err(error) => {
                *conn = None;
                Err(error.into())
            }
        }
    }

    /// Whether the lease is still held: its connection answers. A lease whose connection
    /// failed is lost (the database released the lock with the session).
    pub async fn still_held(&mut self) -> bool {
        let Seat::Postgres { conn, .. } = &mut self.backend else {
            return true;
        };
        let Some(connection) = conn.as_mut() else {
            return false;
        };
        if connection.ping().await.is_ok() {
            return true;
        }
        *conn = None;
        false
    }

    /// Gives the lease up (at shutdown, so another replica takes over without waiting).
    pub async fn release(&mut self) {
        if let Seat::Postgres { conn, .. } = &mut self.backend
            && let Some(connection) = conn.take()
        {
            let _ = connection.close().await;
        }
    }
}

/// A transaction holding a PostgreSQL advisory lock: held until [`XactLock::release`], or until
/// the transaction ends any other way (dropped, connection lost, process killed).
pub struct XactLock(sqlx::Transaction<'static, sqlx::Postgres>);

impl Db {
    /// Takes the database-wide lock `name` (waiting for it); `None` on SQLite, where one
    /// process serves and an in-process lock suffices.
    pub async fn xact_lock(&self, name: &str) -> Result<Option<XactLock>, StoreError> {
        let Db::Postgres(pool) = self else {
            return Ok(None);
        };
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lease_key(name))
            .execute(&mut *tx)
            .await?;
        Ok(Some(XactLock(tx)))
    }
}

impl XactLock {
    pub async fn release(self) -> Result<(), StoreError> {
        self.0.commit().await?;
        Ok(())
    }
}

/// The advisory locks held in this database and the `application_name` of the session holding
/// each: `(key, holder)`. Empty on SQLite (one process holds every lease).
pub async fn holders(db: &Db) -> Result<Vec<(i64, String)>, StoreError> {
    let Db::Postgres(pool) = db else {
        return Ok(Vec::new());
    };
    // A bigint advisory key is split in two: its high half in classid, its low half in objid.
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT l.classid::bigint, l.objid::bigint, COALESCE(a.application_name, '') \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(high, low, holder)| ((((high as u64) << 32) | low as u64) as i64, holder))
        .collect())
}

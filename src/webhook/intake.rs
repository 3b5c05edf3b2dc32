//! Group commit of webhooks' inbox rows. Each request queues its row and waits for its answer;
//! whoever holds one of a few permits stores the waiting rows, oldest first, a batch per
//! transaction, and answers each request once its batch is committed. So every acknowledged
//! event is in the inbox before its 200, as with a transaction per request, but concurrent
//! deliveries share one commit (one WAL flush, one fsync on SQLite) instead of paying one each.
//! A batch runs in its own task: a request that goes away (its client hung up) cannot cancel
//! the transaction that holds the others' rows.

use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, oneshot};

use crate::store::{Backend, Db, NewEvent, StoreError, now_ms};

/// Most rows in one transaction.
const BATCH: usize = 256;

/// A queued row and where its answer goes: whether it was new.
type Queued = (NewEvent, oneshot::Sender<Result<bool, StoreError>>);

#[derive(Clone)]
pub struct Intake {
    waiting: Arc<Mutex<Vec<Queued>>>,
    /// Batch transactions at once: SQLite has one writer; PostgreSQL flushes concurrent
    /// commits together, and the applier needs connections too.
    running: Arc<Semaphore>,
}

impl Intake {
    pub fn new(backend: Backend) -> Self {
        let transactions = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => 4,
        };
        Self {
            waiting: Arc::default(),
            running: Arc::new(Semaphore::new(transactions)),
        }
    }

    /// Stores `event` unless its id is there, committed before this answers; true when it was
    /// new. Runs batches itself while its own row waits and a permit is free.
    pub async fn store(&self, db: &Db, event: NewEvent) -> Result<bool, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        self.waiting
            .lock()
            .expect("intake queue")
            .push((event, reply));
        let stopped = || StoreError::Setup("the batch holding this webhook stopped".to_owned());
        loop {
            tokio::select! {
                biased;
                answer = &mut answer => return answer.unwrap_or_else(|_| Err(stopped())),
                permit = self.running.clone().acquire_owned() => {
                    let permit = permit.expect("the intake's semaphore is never closed");
                    let (intake, db) = (self.clone(), db.clone());
                    let batch = tokio::spawn(async move {
                        let ran = intake.run_batch(&db).await;
                        drop(permit);
                        ran
                    });
                    if !batch.await.unwrap_or(false) {
                        // Nothing waited: this row is in a batch that is running.
                        return answer.await.unwrap_or_else(|_| Err(stopped()));
                    }
                }
            }
        }
    }

    /// Stores the oldest waiting rows in one transaction and answers them; false when none
    /// waited.
    async fn run_batch(&self, db: &Db) -> bool {
        let batch: Vec<Queued> = {
            let mut waiting = self.waiting.lock().expect("intake queue");
            let take = waiting.len().min(BATCH);
            waiting.drain(..take).collect()
        };
        if batch.is_empty() {
            return false;
        }
        let (events, replies): (Vec<NewEvent>, Vec<_>) = batch.into_iter().unzip();
        match db.inbox().insert_each(&events, now_ms()).await {
            Ok(inserted) => {
                for (new, reply) in inserted.into_iter().zip(replies) {
                    let _ = reply.send(Ok(new));
                }
            }
            // One row the database refuses must not fail the others: each alone.
            Err(StoreError::Query(error)) if events.len() > 1 => {
                tracing::warn!(error = %error, rows = events.len(), "webhook batch failed; storing row by row");
                for (event, reply) in events.iter().zip(replies) {
                    let one = db
                        .inbox()
                        .insert_each(std::slice::from_ref(event), now_ms())
                        .await;
                    let _ = reply.send(one.map(|new| new[0]));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.shared()));
                }
            }
        }
        true
    }
}

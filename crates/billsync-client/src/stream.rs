//! The task that keeps the replica current: `GET /v1/entitlements/stream`, read chunk by chunk,
//! resumed from the last cursor after any end, with exponential backoff between attempts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::options::backoff;
use crate::replica::Applied;
use crate::sse::Parser;
use crate::{Error, Shared};

/// How many heartbeats may go unheard before the stream is taken for dead.
const MISSED_HEARTBEATS: u32 = 3;

/// How a stream ended.
enum End {
    /// After `ready`: the next attempt starts with a short wait.
    WasLive(String),
    /// Before `ready`.
    Failed(Error),
    /// The client is stopping.
    Stopped,
}

/// Runs until the client stops. `first` hears of the first `ready`, or of an error answer that
/// trying again will not cure (a bad key, a bad URL).
pub(crate) async fn run(shared: Arc<Shared>, first: oneshot::Sender<Result<(), Error>>) {
    let mut first = Some(first);
    let mut stop = shared.stop.subscribe();
    let mut failures = 0u32;
    loop {
        let cursor = shared.lock_stats().cursor.clone();
        let span = tracing::info_span!("billsync_stream", cursor = cursor.as_deref().unwrap_or(""));
        let end = tokio::select! {
            end = session(&shared, cursor, &mut first).instrument(span) => end,
            _ = stop.wait_for(|stop| *stop) => End::Stopped,
        };
        shared.mark_down();
        match end {
            End::Stopped => return,
            End::WasLive(why) => {
                tracing::info!(reason = %why, "billsync: the entitlement stream ended; resuming");
                failures = 0;
            }
            End::Failed(error) => {
                let fatal = matches!(&error, Error::Status { status, .. } if !matches!(status, 408 | 429 | 500..=599));
                if fatal && let Some(first) = first.take() {
                    let _ = first.send(Err(error));
                    return;
                }
                tracing::warn!(%error, failures, "billsync: the entitlement stream failed; trying again");
                failures = failures.saturating_add(1);
            }
        }
        let wait = backoff(&shared.options, failures);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        shared.lock_stats().reconnects += 1;
        shared.options.metrics.reconnect();
    }
}

/// One stream, from the request to its end.
async fn session(
    shared: &Shared,
    cursor: Option<String>,
    first: &mut Option<oneshot::Sender<Result<(), Error>>>,
) -> End {
    let mut url = crate::http::url(shared, &["v1", "entitlements", "stream"]);
    if let Some(cursor) = &cursor {
        url.query_pairs_mut().append_pair("cursor", cursor);
    }
    let request = (shared.http.get(url))
        .bearer_auth(&shared.api_key)
        .header("accept", "text/event-stream");
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(error) => return End::Failed(error.into()),
    };
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.bytes().await.unwrap_or_default();
        return End::Failed(Error::from_answer(status, &body));
    }
    // Without a cursor a whole snapshot comes; with one, what was missed (a snapshot cut
    // short is abandoned: the server sends what it needs again).
    shared.replica_write().begin(cursor.is_none());
    let mut parser = Parser::default();
    let mut idle = Duration::from_secs(15) * MISSED_HEARTBEATS;
    let mut live = false;
    loop {
        let chunk = match tokio::time::timeout(idle, response.chunk()).await {
            Err(_) => return end(live, Error::Protocol("no heartbeat from the server".into())),
            Ok(Err(error)) => return end(live, error.into()),
            Ok(Ok(None)) => return end(live, Error::Protocol("the stream ended".into())),
            Ok(Ok(Some(chunk))) => chunk,
        };
        for frame in parser.feed(&chunk) {
            let applied = shared.replica_write().apply(&frame.event, &frame.data);
            if let (Ok(_), Some(id)) = (&applied, frame.id) {
                shared.lock_stats().cursor = Some(id);
            }
            match applied {
                Ok(Applied::Nothing) => {}
                Ok(Applied::Hello { heartbeat }) => {
                    idle = heartbeat * MISSED_HEARTBEATS + Duration::from_secs(1);
                }
                Ok(Applied::Ready { resumed }) => {
                    live = true;
                    shared.mark_live();
                    {
                        let mut stats = shared.lock_stats();
                        stats.readies += 1;
                        stats.resumes += u64::from(resumed);
                    }
                    shared.options.metrics.ready(resumed);
                    tracing::info!(resumed, "billsync: the entitlement replica is complete");
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                }
                Ok(Applied::Bye { reason }) => return End::WasLive(format!("bye: {reason}")),
                Err(message) => return end(live, Error::Protocol(message)),
            }
        }
    }
}

fn end(live: bool, error: Error) -> End {
    if live {
        End::WasLive(error.to_string())
    } else {
        End::Failed(error)
    }
}

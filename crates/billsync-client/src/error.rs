//! The client's one error type.

/// What went wrong in a call to the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server's URL cannot be used.
    #[error("invalid server URL `{0}`")]
    InvalidUrl(String),
    /// The request did not get an answer (connection refused, reset, timed out).
    #[error("request to billsync failed: {0}")]
    Http(#[from] reqwest::Error),
    /// billsync answered with an error status; `code` is its stable error code.
    #[error("billsync answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    /// The first `ready` did not arrive within `Options::connect_timeout`.
    #[error("no complete replica within the connect timeout")]
    Timeout,
    /// The usage buffer holds `Options::buffer_capacity` events: this one was not taken.
    #[error("the usage buffer is full ({capacity} events); the event was not recorded")]
    BufferFull { capacity: usize },
    /// The client was shut down.
    #[error("the client is shut down")]
    Closed,
    /// The server sent something this client cannot read.
    #[error("unexpected answer from billsync: {0}")]
    Protocol(String),
    /// Shutdown's wait ended with usage events still not accepted by the server.
    #[error("{0} usage events were not sent before shutdown's deadline")]
    Unflushed(usize),
}

impl Error {
    /// Whether trying again later may succeed (network errors, 408, 429, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http(_) | Self::Timeout => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }

    /// An error answer, from its status and JSON body (`{"error":{"code","message"}}`).
    pub(crate) fn from_answer(status: u16, body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            error: Inner,
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            code: String,
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(Body { error }) => Self::Status {
                status,
                code: error.code,
                message: error.message,
            },
            Err(_) => Self::Status {
                status,
                code: "unknown".to_owned(),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            },
        }
    }
}

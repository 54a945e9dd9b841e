//! The error type of the core crate. The API maps it to the error envelope in one place.

use std::collections::BTreeMap;

/// Field name -> what is wrong with it.
pub type FieldErrors = BTreeMap<String, String>;

/// Everything a core operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// No such resource (404).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for (`run 6f1c…`).
        what: String,
    },
    /// The request conflicts with the resource's state (409).
    #[error("{0}")]
    Conflict(String),
    /// Input that does not validate (422), naming each bad field.
    #[error("{message}")]
    Validation {
        /// Names the first bad field.
        message: String,
        /// Every bad field.
        fields: FieldErrors,
    },
    /// A credential that is missing or wrong (401): a host agent's secret.
    #[error("{0}")]
    Unauthorized(String),
    /// An `Idempotency-Key` sent again with a different request (422,
    /// `idempotency_key_reused`).
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// Input that cannot be read at all (400).
    #[error("{0}")]
    BadRequest(String),
    /// A dependency (Postgres, Redis) is unreachable or timed out (503).
    #[error("{0}")]
    Unavailable(String),
    /// Stored data that does not decode: an error naming what, never a default.
    #[error("stored data is unreadable: {0}")]
    Unreadable(String),
    /// Any other database error (logged, never shown).
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// A Redis error.
    #[error("redis error: {0}")]
    Redis(String),
    /// A bug or an impossible state (logged, never shown).
    #[error("{0}")]
    Internal(String),
}

/// Results of core operations.
pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    /// A 404 naming what was not found.
    pub fn not_found(what: impl Into<String>) -> Self {
        CoreError::NotFound { what: what.into() }
    }

    /// A validation error about one field.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        CoreError::invalid_fields(FieldErrors::from([(field.into(), problem.into())]))
    }

    /// Maps a unique-violation on a definition's name to a 409 that names it.
    pub fn name_taken(e: sqlx::Error, what: &str, name: &str) -> CoreError {
        match CoreError::from(e) {
            CoreError::Conflict(_) => CoreError::Conflict(format!("a {what} named {name:?} already exists")),
            other => other,
        }
    }

    /// A validation error about several fields; the message names the first.
    pub fn invalid_fields(fields: FieldErrors) -> Self {
        let message = match fields.iter().next() {
            Some((f, p)) if fields.len() == 1 => format!("{f}: {p}"),
            Some((f, p)) => format!("{f}: {p} (and {} more)", fields.len() - 1),
            None => "validation failed".to_string(),
        };
        CoreError::Validation { message, fields }
    }

    /// Whether retrying the same operation soon may succeed (a connection lost, a pool
    /// timed out), as opposed to an error the same call would meet again.
    pub fn is_transient(&self) -> bool {
        matches!(self, CoreError::Unavailable(_) | CoreError::Redis(_))
    }
}

impl From<sqlx::Error> for CoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => CoreError::not_found("row"),
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                CoreError::Unavailable(format!("postgres unavailable: {e}"))
            }
            sqlx::Error::ColumnDecode { index, source } => CoreError::Unreadable(format!("column {index}: {source}")),
            sqlx::Error::Decode(source) => CoreError::Unreadable(source.to_string()),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                // The constraint's name stays in the log: it is schema, not an answer.
                tracing::debug!(constraint = db.constraint().unwrap_or(""), "unique violation");
                CoreError::Conflict("already exists".into())
            }
            // 57014: statement timeout; 55P03: lock timeout; 40P01: deadlock; 40001:
            // serialization failure; 08xxx: connection exceptions. All worth a retry.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| {
                    matches!(c.as_ref(), "57014" | "55P03" | "40P01" | "40001") || c.starts_with("08")
                }) =>
            {
                CoreError::Unavailable(format!("postgres unavailable: {e}"))
            }
            _ => CoreError::Database(e),
        }
    }
}

impl From<redis::RedisError> for CoreError {
    fn from(e: redis::RedisError) -> Self {
        CoreError::Redis(e.to_string())
    }
}

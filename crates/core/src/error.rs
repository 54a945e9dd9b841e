//! The error type of the core crate. The API maps it to the error envelope in one place.

use std::collections::BTreeMap;

/// Field name -> what is wrong with it.
pub type FieldErrors = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Validation { message: String, fields: FieldErrors },
    #[error("{0}")]
    BadRequest(String),
    /// A dependency (Postgres, Redis) is unreachable or timed out.
    #[error("{0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("redis error: {0}")]
    Redis(String),
    #[error("{0}")]
    Internal(String),
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    pub fn not_found(what: impl Into<String>) -> Self {
        CoreError::NotFound { what: what.into() }
    }

    /// A validation error about one field.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        let field = field.into();
        let problem = problem.into();
        let mut fields = FieldErrors::new();
        fields.insert(field.clone(), problem.clone());
        CoreError::Validation { message: format!("{field}: {problem}"), fields }
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
}

impl From<sqlx::Error> for CoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => CoreError::not_found("row"),
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                CoreError::Unavailable(format!("postgres unavailable: {e}"))
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                CoreError::Conflict(format!(
                    "already exists ({})",
                    db.constraint().unwrap_or("unique constraint")
                ))
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

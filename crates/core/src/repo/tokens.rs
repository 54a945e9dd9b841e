//! The `api_tokens` table: tokens for the API, each with a role. Only a SHA-256 of each
//! secret is stored; a token is found by that hash on every request (no cache, so a
//! revocation or an expiry takes effect at the next request on every api process).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::{
    CoreError, CoreResult,
    ids::TokenId,
    model::Role,
    pagination::{Cursor, Page},
};

/// The prefix of every token secret, so secret scanners can find leaked ones.
pub const PREFIX: &str = "sb_";

/// A token as the API lists it (never the secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Token {
    /// Its id.
    pub id: TokenId,
    /// A unique name (`grafana`, `ci`).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last used (to within a few seconds: uses are recorded in batches).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token (`None` for `SWITCHBOARD_ADMIN_TOKEN`).
    pub token_id: Option<TokenId>,
    /// The token's name (`bootstrap` for `SWITCHBOARD_ADMIN_TOKEN`).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Principal {
    /// The bootstrap admin (`SWITCHBOARD_ADMIN_TOKEN`).
    pub fn bootstrap() -> Principal {
        Principal { token_id: None, name: "bootstrap".into(), role: Role::Admin }
    }

    /// What scopes this caller's idempotency keys.
    pub fn scope(&self) -> String {
        self.token_id.map_or_else(|| "bootstrap".to_string(), |id| id.to_string())
    }
}

/// Why a presented secret opens nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No token has it.
    Unknown,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
}

/// A fresh secret: `sb_` and 256 random bits from the OS, in hex.
pub fn new_secret() -> CoreResult<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| CoreError::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(format!("{PREFIX}{}", hex(&bytes)))
}

/// The stored form of a secret: SHA-256, in hex.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Compares in constant time.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates a token; its secret is returned this once (409 when the name is taken).
pub async fn create(
    pool: &PgPool,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
) -> CoreResult<(Token, String)> {
    let secret = new_secret()?;
    let token = sqlx::query_as!(
        Token,
        "INSERT INTO api_tokens (id, name, role, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, name, role, created_at, expires_at, last_used_at, revoked_at",
        TokenId::random() as TokenId,
        name,
        role as Role,
        hash(&secret),
        expires_at,
    )
    .fetch_one(pool)
    .await
    .map_err(|e| CoreError::name_taken(e, "token", name))?;
    Ok((token, secret))
}

/// Tokens newest first (revoked ones too, with `revoked_at`), one page.
pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Token>> {
    let rows = sqlx::query_as!(
        Token,
        "SELECT id, name, role, created_at, expires_at, last_used_at, revoked_at FROM api_tokens
         WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    Ok(Page::from_rows(rows, limit, |t: &Token| Cursor { created_at: t.created_at, id: t.id.0 }))
}

/// Revokes a token at once (404 if unknown or already revoked).
pub async fn revoke(pool: &PgPool, id: TokenId) -> CoreResult<()> {
    let done =
        sqlx::query!("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", id as TokenId)
            .execute(pool)
            .await?;
    if done.rows_affected() == 0 {
        return Err(CoreError::not_found(format!("token {id}")));
    }
    Ok(())
}

/// The caller a secret belongs to, or why it opens nothing. The row is found by the
/// secret's hash (an index lookup), and the stored hash is compared again in constant
/// time.
pub async fn authenticate(pool: &PgPool, secret: &str) -> CoreResult<Result<Principal, Refused>> {
    let presented = hash(secret);
    let row = sqlx::query!(
        r#"SELECT id AS "id: TokenId", name, role AS "role: Role", token_hash,
                  revoked_at IS NOT NULL AS "revoked!", COALESCE(expires_at <= now(), false) AS "expired!"
           FROM api_tokens WHERE token_hash = $1"#,
        presented,
    )
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(r) if !same(&r.token_hash, &presented) => Err(Refused::Unknown),
        Some(r) if r.revoked => Err(Refused::Revoked),
        Some(r) if r.expired => Err(Refused::Expired),
        Some(r) => Ok(Principal { token_id: Some(r.id), name: r.name, role: r.role }),
        None => Err(Refused::Unknown),
    })
}

/// Records when tokens were last used, in one statement for a batch of uses.
pub async fn record_uses(pool: &PgPool, uses: &[(TokenId, DateTime<Utc>)]) -> CoreResult<()> {
    let ids: Vec<uuid::Uuid> = uses.iter().map(|(id, _)| id.0).collect();
    let ats: Vec<DateTime<Utc>> = uses.iter().map(|(_, at)| *at).collect();
    sqlx::query!(
        "UPDATE api_tokens t SET last_used_at = GREATEST(t.last_used_at, u.at)
         FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at) WHERE t.id = u.id",
        &ids,
        &ats,
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_random_and_stored_hashed() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert!(a.starts_with("sb_") && a.len() == 3 + 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(same(&hash(&a), &hash(&a)) && !same(&hash(&a), &hash(&b)));
    }
}

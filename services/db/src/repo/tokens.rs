//! API tokens, stored as the sha256 of their secret.

use flywheel_domain::Role;
use sqlx::types::Json;

use super::{Db, execute, fetch_all, fetch_optional, from_row};
use crate::models::TokenRow;
use crate::sql::{Stamp, with_pool};
use crate::{DbError, Result};

impl Db {
    /// Stores a token's hash; returns its row.
    pub async fn create_token(
        &self,
        name: &str,
        role: flywheel_domain::Role,
        domains: &[String],
        token_hash: &str,
        created_by: &str,
    ) -> Result<TokenRow> {
        let inserted: std::result::Result<u64, sqlx::Error> = with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO api_tokens (name, role, domains, token_hash, created_at, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(Json(domains))
            .bind(token_hash)
            .bind(Stamp::now())
            .bind(created_by)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        });
        match inserted {
            // Names are unique among live tokens (a partial unique index).
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(DbError::TokenNameTaken(name.to_owned()));
            }
            other => other?,
        };
        self.token_by_hash(token_hash)
            .await?
            .ok_or_else(|| DbError::Corrupt("token vanished after insert".into()))
    }

    /// The token with this hash, revoked or not.
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        fetch_optional!(
            self,
            token_from_row,
            "SELECT * FROM api_tokens WHERE token_hash = $1",
            token_hash
        )
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        fetch_all!(self, token_from_row, "SELECT * FROM api_tokens ORDER BY id")
    }

    /// Revokes every live bootstrap token but the one hashed `keep`: setting a new
    /// `FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN` retires the one before it. Returns how many it revoked.
    pub async fn retire_bootstrap_tokens(&self, keep: &str) -> Result<u64> {
        let res = execute!(
            self,
            "UPDATE api_tokens SET revoked_at = $1
             WHERE created_by = 'bootstrap' AND token_hash <> $2 AND revoked_at IS NULL",
            Stamp::now(),
            keep
        );
        Ok(res)
    }

    /// Sets a live token's scope; `None` if there is no such live token.
    pub async fn rescope_token(&self, id: i64, domains: &[String]) -> Result<Option<TokenRow>> {
        let changed = execute!(
            self,
            "UPDATE api_tokens SET domains = $1 WHERE id = $2 AND revoked_at IS NULL",
            Json(domains),
            id
        );
        if changed == 0 {
            return Ok(None);
        }
        fetch_optional!(
            self,
            token_from_row,
            "SELECT * FROM api_tokens WHERE id = $1",
            id
        )
    }

    /// Revokes a token; `false` if there is no such live token.
    pub async fn revoke_token(&self, id: i64) -> Result<bool> {
        let res = execute!(
            self,
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            Stamp::now(),
            id
        );
        Ok(res == 1)
    }
}

from_row!(fn token_from_row -> TokenRow {
    id: int, name: text, role: parsed(Role::parse), domains: json, created_at: time,
    created_by: text, revoked_at: opt_time,
});

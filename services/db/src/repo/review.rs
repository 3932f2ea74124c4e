//! A data steward's hold on corrections: listing and searching them, relabelling one, and
//! removing one (a tombstone: the row stays, with when it went, and trains nothing more).
//! Each change writes its audit row in the same transaction.

use flywheel_domain::{Source, Split};
use sqlx::types::Json;

use super::{Db, fetch_all, fetch_optional};
use crate::models::StoredCorrection;
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

/// Which corrections a listing shows; every field narrows it.
#[derive(Debug, Clone, Default)]
pub struct CorrectionFilter {
    pub expected: Option<String>,
    pub split: Option<Split>,
    pub source: Option<Source>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Case-insensitive substring of the input.
    pub search: Option<String>,
    /// Ids above this (the previous page's last).
    pub after: i64,
    pub limit: i64,
    pub include_removed: bool,
}

/// What a relabel or removal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Done,
    /// No live correction with that id in the domain.
    NotFound,
    /// Relabelling would make it the same correction as this one (which may be removed).
    Duplicate {
        other: i64,
        removed: bool,
    },
    /// It changed (relabelled or removed) while this edit was being made.
    Changed,
}

impl Db {
    pub async fn list_corrections(
        &self,
        domain_id: i64,
        f: &CorrectionFilter,
    ) -> Result<Vec<StoredCorrection>> {
        // LIKE's wildcards in the search text are matched literally. Case folds for ASCII
        // letters only: SQLite's LOWER knows no others.
        let pattern = f.search.as_ref().map(|s| {
            let escaped = s
                .to_ascii_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        fetch_all!(
            self,
            stored_from_row,
            "SELECT id, client_id, input, model_output, expected, source, teacher, split,
                    created_at, removed_at
             FROM corrections
             WHERE domain_id = $1 AND id > $2
               AND ($3 IS NULL OR expected = $3) AND ($4 IS NULL OR split = $4)
               AND ($5 IS NULL OR source = $5)
               AND ($6 IS NULL OR created_at >= $6) AND ($7 IS NULL OR created_at < $7)
               AND ($8 IS NULL OR LOWER(input) LIKE $8 ESCAPE '\\')
               AND ($9 OR removed_at IS NULL)
             ORDER BY id LIMIT $10",
            domain_id,
            f.after,
            f.expected.clone(),
            f.split.map(Split::as_str),
            f.source.map(Source::as_str),
            f.since.map(Stamp),
            f.until.map(Stamp),
            pattern.clone(),
            f.include_removed,
            f.limit
        )
    }

    /// `(id, input, expected)` of every live correction up to `max_id`, for finding
    /// contradictions.
    pub async fn correction_labels(
        &self,
        domain_id: i64,
        max_id: i64,
    ) -> Result<Vec<(i64, String, String, Source)>> {
        fetch_all!(
            self,
            |r| Ok((
                r.int("id")?,
                r.text("input")?,
                r.text("expected")?,
                r.parsed("source", Source::parse)?
            )),
            "SELECT id, input, expected, source FROM corrections
             WHERE domain_id = $1 AND id <= $2 AND removed_at IS NULL ORDER BY id",
            domain_id,
            max_id
        )
    }

    /// Sets a live correction's `expected` (its content hash follows, so ingesting the new
    /// content again is a duplicate) and audits `correction_relabel` with before and after.
    /// The write comes first in its transaction and is conditional on the value read before
    /// it, so a concurrent relabel or removal is seen, never overwritten.
    pub async fn relabel_correction(
        &self,
        domain_id: i64,
        id: i64,
        expected: &str,
        content_hash: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Edit> {
        let before = fetch_optional!(
            self,
            |r| r.text("expected"),
            "SELECT expected FROM corrections WHERE domain_id = $1 AND id = $2 AND removed_at IS NULL",
            domain_id,
            id
        )?;
        let Some(before) = before else {
            return Ok(Edit::NotFound);
        };
        let at = Stamp::now();
        let res: std::result::Result<Edit, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let changed = sqlx::query(
                "UPDATE corrections SET expected = $1, content_hash = $2
                 WHERE domain_id = $3 AND id = $4 AND removed_at IS NULL AND expected = $5",
            )
            .bind(expected)
            .bind(content_hash)
            .bind(domain_id)
            .bind(id)
            .bind(&before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if changed == 0 {
                return Ok(Edit::Changed);
            }
            let data = serde_json::json!({"correction": id, "before": before, "after": expected});
            sqlx::query(
                "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
                 VALUES ($1, $2, $3, 'correction_relabel', NULL, $4, $5)",
            )
            .bind(domain_id)
            .bind(at)
            .bind(actor)
            .bind(reason)
            .bind(Json(&data))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Edit::Done)
        }.await);
        match res {
            Ok(edit) => Ok(edit),
            // Another row, live or removed, already holds this input with this answer.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let other = fetch_optional!(
                    self,
                    |r| Ok::<_, DbError>((r.int("id")?, r.opt_text("removed_at")?.is_some())),
                    "SELECT id, CAST(removed_at AS TEXT) AS removed_at FROM corrections
                     WHERE domain_id = $1 AND content_hash = $2",
                    domain_id,
                    content_hash
                )?;
                Ok(
                    other.map_or(Edit::Changed, |(other, removed)| Edit::Duplicate {
                        other,
                        removed,
                    }),
                )
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Tombstones a live correction: it stays stored, marked removed, and no later snapshot
    /// trains or evaluates on it; audited as `correction_remove`.
    pub async fn remove_correction(
        &self,
        domain_id: i64,
        id: i64,
        actor: &str,
        reason: &str,
    ) -> Result<Edit> {
        let at = Stamp::now();
        let res: std::result::Result<Edit, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let removed: Option<String> = sqlx::query_scalar(
                "UPDATE corrections SET removed_at = $1
                 WHERE domain_id = $2 AND id = $3 AND removed_at IS NULL RETURNING expected",
            )
            .bind(at)
            .bind(domain_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(expected) = removed else {
                return Ok(Edit::NotFound);
            };
            let data = serde_json::json!({"correction": id, "expected": expected});
            sqlx::query(
                "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
                 VALUES ($1, $2, $3, 'correction_remove', NULL, $4, $5)",
            )
            .bind(domain_id)
            .bind(at)
            .bind(actor)
            .bind(reason)
            .bind(Json(&data))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Edit::Done)
        }.await);
        res.map_err(DbError::from)
    }
}

fn stored_from_row(r: &impl Cells) -> Result<StoredCorrection> {
    let source = r.text("source")?;
    let split = r.text("split")?;
    Ok(StoredCorrection {
        id: r.int("id")?,
        client_id: r.opt_text("client_id")?,
        input: r.text("input")?,
        model_output: r.opt_text("model_output")?,
        expected: r.text("expected")?,
        source: Source::parse(&source).ok_or_else(|| DbError::Corrupt(source.clone()))?,
        teacher: r.opt_text("teacher")?,
        split: Split::parse(&split).ok_or_else(|| DbError::Corrupt(split.clone()))?,
        created_at: r.time("created_at")?,
        removed_at: r.opt_time("removed_at")?,
    })
}

//! Corrections: the batch insert (through the SQLite writer, or one transaction on PostgreSQL)
//! and the reads training, evaluation and reports make.

use flywheel_domain::{Correction, Source, Split};
use sqlx::types::Json;

use super::writer::{WriteRequest, advance_unit, insert_rows};
use super::{Db, fetch_all, from_row};
use crate::models::{CorrectionRow, InsertOutcome, UnitAdvance};
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

impl Db {
    /// Stores rows in one transaction: duplicates (the same content again) are counted, not
    /// stored; a row whose client id names other content is not stored and is listed in
    /// [`InsertOutcome::conflicts`], the rest are. Returns only after the commit is durable.
    pub async fn insert_corrections(
        &self,
        domain_id: i64,
        rows: &[Correction],
    ) -> Result<InsertOutcome> {
        self.insert(domain_id, rows, false, None).await
    }

    /// As [`Db::insert_corrections`], but a batch with any conflict stores nothing: the
    /// outcome then lists the conflicts and counts nothing else.
    pub async fn insert_corrections_all_or_nothing(
        &self,
        domain_id: i64,
        rows: &[Correction],
    ) -> Result<InsertOutcome> {
        self.insert(domain_id, rows, true, None).await
    }

    /// As [`Db::insert_corrections`], and in the same transaction moves an ingestion unit
    /// forward from where its reader started: if it has moved since (another worker read the
    /// same rows), nothing is stored and the outcome says `unit_moved`. So a file or table is
    /// stored once however many workers read it and wherever one dies.
    pub async fn insert_corrections_advancing(
        &self,
        domain_id: i64,
        rows: &[Correction],
        advance: UnitAdvance,
    ) -> Result<InsertOutcome> {
        self.insert(domain_id, rows, false, Some(advance)).await
    }

    async fn insert(
        &self,
        domain_id: i64,
        rows: &[Correction],
        all_or_nothing: bool,
        advance: Option<UnitAdvance>,
    ) -> Result<InsertOutcome> {
        if let Some((writer, _)) = &self.writer {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            let request = WriteRequest {
                domain_id,
                rows: rows.to_vec(),
                all_or_nothing,
                advance,
                reply,
            };
            let gone = || DbError::Unsupported("the database writer has stopped".into());
            writer.send(request).await.map_err(|_| gone())?;
            return outcome.await.map_err(|_| gone())?;
        }
        let created_at = Stamp::now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let outcome = insert_rows!(&mut *tx, domain_id, rows, created_at);
            if all_or_nothing && !outcome.conflicts.is_empty() {
                tx.rollback().await?;
                return Ok(outcome.nothing_stored());
            }
            if let Some(advance) = &advance
                && !advance_unit!(&mut *tx, advance, &outcome, created_at)
            {
                tx.rollback().await?;
                let mut outcome = outcome.nothing_stored();
                outcome.unit_moved = true;
                return Ok(outcome);
            }
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Personal data redacted from a domain's corrections up to `max_id`, by kind: counts for
    /// the report, never values.
    pub async fn redaction_counts(
        &self,
        domain_id: i64,
        max_id: i64,
    ) -> Result<flywheel_domain::PiiCounts> {
        let rows: Vec<Json<flywheel_domain::PiiCounts>> = with_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT pii_redacted FROM corrections
                 WHERE domain_id = $1 AND id <= $2 AND pii_redacted IS NOT NULL",
            )
            .bind(domain_id)
            .bind(max_id)
            .fetch_all(pool)
            .await?
        });
        let mut total = flywheel_domain::PiiCounts::new();
        for Json(counts) in rows {
            for (kind, n) in counts {
                *total.entry(kind).or_default() += n;
            }
        }
        Ok(total)
    }

    /// Corrections of a domain up to and including `max_id`, in id order.
    pub async fn corrections(
        &self,
        domain_id: i64,
        max_id: i64,
        split: Option<Split>,
    ) -> Result<Vec<CorrectionRow>> {
        fetch_all!(
            self,
            correction_from_row,
            "SELECT id, client_id, input, model_output, expected, source, split FROM corrections
             WHERE domain_id = $1 AND id <= $2 AND ($3 IS NULL OR split = $3) AND removed_at IS NULL
             ORDER BY id",
            domain_id,
            max_id,
            split.map(Split::as_str)
        )
    }

    pub async fn correction_counts(&self, domain_id: i64) -> Result<(i64, i64)> {
        with_pool!(self, pool => {
            let r = sqlx::query(
                "SELECT COUNT(*) FILTER (WHERE split = 'train') AS train,
                 COUNT(*) FILTER (WHERE split = 'holdout') AS holdout
                 FROM corrections WHERE domain_id = $1 AND removed_at IS NULL",
            )
            .bind(domain_id)
            .fetch_one(pool)
            .await?;
            Ok((r.int("train")?, r.int("holdout")?))
        })
    }
}

from_row!(fn correction_from_row -> CorrectionRow {
    id: int, client_id: opt_text, input: text, model_output: opt_text, expected: text,
    source: parsed(Source::parse), split: parsed(Split::parse),
});

//! The prediction log: what serving answered, by whom and how sure, kept (sampled, redacted)
//! for audit and for feedback.

use chrono::{DateTime, Utc};
use flywheel_domain::{AnsweredBy, PredictionId};

use super::{Db, execute, fetch_all, fetch_optional};
use crate::Result;
use crate::models::{NewPrediction, NewShadowScore, PredictionRow, ServingWindow, ShadowAgreement};
use crate::sql::{Cells, Stamp, with_pool};

impl Db {
    /// Stores a batch of predictions in one transaction.
    pub async fn insert_predictions(&self, rows: &[NewPrediction]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for p in rows {
                sqlx::query(
                    "INSERT INTO predictions (id, domain_id, at, alias, version, input, output,
                     model_output, confidence, escalated, answered_by, teacher_error, latency_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(p.id.as_str())
                .bind(p.domain_id)
                .bind(Stamp(p.at))
                .bind(&p.alias)
                .bind(&p.version)
                .bind(&p.input)
                .bind(&p.output)
                .bind(&p.model_output)
                .bind(p.confidence)
                .bind(p.escalated)
                .bind(p.answered_by.as_str())
                .bind(&p.teacher_error)
                .bind(p.latency_ms)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }.await)?;
        Ok(())
    }

    /// A logged prediction, with its domain's name.
    pub async fn prediction(&self, id: &PredictionId) -> Result<Option<PredictionRow>> {
        fetch_optional!(
            self,
            prediction_from_row,
            "SELECT p.*, d.name AS domain FROM predictions p JOIN domains d ON d.id = p.domain_id
             WHERE p.id = $1",
            id.as_str()
        )
    }

    /// Counts over the domain's logged predictions since `since`.
    pub async fn serving_window(
        &self,
        domain_id: i64,
        since: DateTime<Utc>,
    ) -> Result<ServingWindow> {
        // `CASE WHEN escalated` reads an integer flag on SQLite and a boolean on PostgreSQL.
        let sql = "SELECT COUNT(*) AS predictions,
                COALESCE(SUM(CASE WHEN escalated THEN 1 ELSE 0 END), 0) AS escalated,
                COALESCE(SUM(CASE WHEN answered_by = 'teacher' THEN 1 ELSE 0 END), 0) AS by_teacher,
                COALESCE(SUM(CASE WHEN teacher_error IS NOT NULL THEN 1 ELSE 0 END), 0) AS teacher_errors,
                AVG(confidence) AS mean_confidence
             FROM predictions WHERE domain_id = $1 AND at >= $2";
        with_pool!(self, pool => {
            let row = sqlx::query(sql)
                .bind(domain_id)
                .bind(Stamp(since))
                .fetch_one(pool)
                .await?;
            Ok(ServingWindow {
                since,
                predictions: row.int("predictions")?,
                escalated: row.int("escalated")?,
                answered_by_teacher: row.int("by_teacher")?,
                teacher_errors: row.int("teacher_errors")?,
                mean_confidence: row.opt_float("mean_confidence")?,
            })
        })
    }

    /// Stores a batch of shadow scores in one transaction.
    pub async fn insert_shadow_scores(&self, rows: &[NewShadowScore]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for s in rows {
                sqlx::query(
                    "INSERT INTO shadow_scores (domain_id, at, alias, version, primary_version, agrees)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(s.domain_id)
                .bind(Stamp(s.at))
                .bind(&s.alias)
                .bind(&s.version)
                .bind(&s.primary_version)
                .bind(s.agrees)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }.await)?;
        Ok(())
    }

    /// Agreement of each shadow version with the live one since `since`.
    pub async fn shadow_agreement(
        &self,
        domain_id: i64,
        since: DateTime<Utc>,
    ) -> Result<Vec<ShadowAgreement>> {
        fetch_all!(
            self,
            |r| Ok(ShadowAgreement {
                alias: r.text("alias")?,
                version: r.text("version")?,
                primary_version: r.text("primary_version")?,
                scored: r.int("scored")?,
                agreed: r.int("agreed")?,
            }),
            "SELECT alias, version, primary_version, COUNT(*) AS scored,
                    COALESCE(SUM(CASE WHEN agrees THEN 1 ELSE 0 END), 0) AS agreed
             FROM shadow_scores WHERE domain_id = $1 AND at >= $2
             GROUP BY alias, version, primary_version ORDER BY alias, version, primary_version",
            domain_id,
            Stamp(since)
        )
    }

    /// Deletes the domain's predictions logged before `before`; returns how many.
    pub async fn purge_predictions(&self, domain_id: i64, before: DateTime<Utc>) -> Result<u64> {
        let shadow = execute!(
            self,
            "DELETE FROM shadow_scores WHERE domain_id = $1 AND at < $2",
            domain_id,
            Stamp(before)
        );
        let predictions = execute!(
            self,
            "DELETE FROM predictions WHERE domain_id = $1 AND at < $2",
            domain_id,
            Stamp(before)
        );
        Ok(shadow + predictions)
    }
}

fn prediction_from_row(r: &impl Cells) -> Result<PredictionRow> {
    Ok(PredictionRow {
        domain: r.text("domain")?,
        prediction: NewPrediction {
            id: r.parsed("id", PredictionId::parse)?,
            domain_id: r.int("domain_id")?,
            at: r.time("at")?,
            alias: r.text("alias")?,
            version: r.opt_text("version")?,
            input: r.text("input")?,
            output: r.text("output")?,
            model_output: r.opt_text("model_output")?,
            confidence: r.opt_float("confidence")?,
            escalated: r.flag("escalated")?,
            answered_by: r.parsed("answered_by", AnsweredBy::parse)?,
            teacher_error: r.opt_text("teacher_error")?,
            latency_ms: r.opt_float("latency_ms")?.unwrap_or_default(),
        },
    })
}

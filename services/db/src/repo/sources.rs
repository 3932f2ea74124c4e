//! Ingestion sources: when each is polled and by whom (`ingest_sources`), and what was read
//! of each file or table (`ingest_units`). Rows themselves are stored with
//! [`Db::insert_corrections_advancing`], which moves a unit in the same transaction.

use std::time::Duration;

use super::{Db, execute, fetch_all, fetch_optional, from_row};
use crate::Result;
use crate::models::{IngestUnit, SourceState};
use crate::sql::Stamp;

fn later(by: Duration) -> Stamp {
    Stamp(chrono::Utc::now() + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX))
}

impl Db {
    /// Registers the sources a domain's spec names (due now); known ones keep their state.
    pub async fn register_sources(&self, domain_id: i64, names: &[&str]) -> Result<()> {
        let now = Stamp::now();
        for name in names {
            execute!(
                self,
                "INSERT INTO ingest_sources (domain_id, source, next_poll_at) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                domain_id,
                *name,
                now
            );
        }
        Ok(())
    }

    /// Claims a source whose poll is due and that no live worker holds, for the poll that
    /// `token` names, until `lease` from now. Whoever claims it enqueues that poll.
    pub async fn claim_source(
        &self,
        domain_id: i64,
        source: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool> {
        let now = Stamp::now();
        let claimed = execute!(
            self,
            "UPDATE ingest_sources SET claimed_until = $1, claimed_by = $5
             WHERE domain_id = $2 AND source = $3 AND next_poll_at <= $4
             AND (claimed_until IS NULL OR claimed_until < $4)",
            later(lease),
            domain_id,
            source,
            now,
            token
        );
        Ok(claimed == 1)
    }

    /// The poll `token` names is still under way: it keeps the claim `lease` longer. False
    /// if the claim is no longer its own (it lapsed and another poll took the source), and
    /// the poll should stop.
    pub async fn extend_source_claim(
        &self,
        domain_id: i64,
        source: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool> {
        let extended = execute!(
            self,
            "UPDATE ingest_sources SET claimed_until = $1
             WHERE domain_id = $2 AND source = $3 AND claimed_by = $4",
            later(lease),
            domain_id,
            source,
            token
        );
        Ok(extended == 1)
    }

    /// The poll `token` names ended: its claim is let go and the next poll is due after
    /// `interval`. A poll that read everything there was (`caught_up`) says so; `error`
    /// replaces the last one. A poll whose claim was taken over changes nothing.
    pub async fn finish_poll(
        &self,
        domain_id: i64,
        source: &str,
        token: &str,
        interval: Duration,
        caught_up: bool,
        error: Option<&str>,
    ) -> Result<()> {
        let now = Stamp::now();
        execute!(
            self,
            "UPDATE ingest_sources SET claimed_until = NULL, claimed_by = NULL, polled_at = $1,
             next_poll_at = $2, caught_up_at = CASE WHEN $3 THEN $1 ELSE caught_up_at END,
             last_error = $4
             WHERE domain_id = $5 AND source = $6 AND claimed_by = $7",
            now,
            later(interval),
            caught_up,
            error,
            domain_id,
            source,
            token
        );
        Ok(())
    }

    pub async fn source_states(&self, domain_id: i64) -> Result<Vec<SourceState>> {
        fetch_all!(
            self,
            source_state_from_row,
            "SELECT * FROM ingest_sources WHERE domain_id = $1 ORDER BY source",
            domain_id
        )
    }

    /// The unit for one file version (or, with empty `unit` and `version`, a table),
    /// created in state `reading` at position `start` if new.
    pub async fn ingest_unit(
        &self,
        domain_id: i64,
        source: &str,
        unit: &str,
        version: &str,
        size: i64,
        start: &str,
    ) -> Result<IngestUnit> {
        let now = Stamp::now();
        execute!(
            self,
            "INSERT INTO ingest_units
             (domain_id, source, unit, version, size, state, position, first_seen, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'reading', $6, $7, $7) ON CONFLICT DO NOTHING",
            domain_id,
            source,
            unit,
            version,
            size,
            start,
            now
        );
        let found: Option<IngestUnit> = fetch_optional!(
            self,
            unit_from_row,
            "SELECT * FROM ingest_units
             WHERE domain_id = $1 AND source = $2 AND unit = $3 AND version = $4",
            domain_id,
            source,
            unit,
            version
        )?;
        found
            .ok_or_else(|| crate::DbError::Corrupt(format!("ingest unit {source}/{unit} vanished")))
    }

    /// Every file version of a source seen so far: (key, version, state).
    pub async fn known_files(
        &self,
        domain_id: i64,
        source: &str,
    ) -> Result<Vec<(String, String, String)>> {
        let rows: Vec<(String, String, String)> = crate::sql::with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT unit, version, state FROM ingest_units WHERE domain_id = $1 AND source = $2",
            )
            .bind(domain_id)
            .bind(source)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// Ends a unit without rows: `quarantined` (with why) or `changed`. Only a unit still
    /// `reading` is ended.
    pub async fn end_unit(
        &self,
        unit_id: i64,
        state: &'static str,
        errors: &serde_json::Value,
    ) -> Result<()> {
        execute!(
            self,
            "UPDATE ingest_units SET state = $1, errors = $2, updated_at = $3
             WHERE id = $4 AND state = 'reading'",
            state,
            sqlx::types::Json(errors),
            Stamp::now(),
            unit_id
        );
        Ok(())
    }

    /// A file left alone as `changed` is read after all (its source now says `reread`):
    /// back to `reading` from its start, its note cleared.
    pub async fn reopen_unit(&self, unit_id: i64) -> Result<IngestUnit> {
        execute!(
            self,
            "UPDATE ingest_units SET state = 'reading', position = '0', errors = $1,
             updated_at = $2 WHERE id = $3 AND state = 'changed'",
            sqlx::types::Json(serde_json::json!([])),
            Stamp::now(),
            unit_id
        );
        let unit: Option<IngestUnit> = fetch_optional!(
            self,
            unit_from_row,
            "SELECT * FROM ingest_units WHERE id = $1",
            unit_id
        )?;
        unit.ok_or_else(|| crate::DbError::Corrupt(format!("ingest unit {unit_id} vanished")))
    }

    /// A source's units, most recently touched first; `state` narrows them.
    pub async fn ingest_units(
        &self,
        domain_id: i64,
        source: &str,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IngestUnit>> {
        fetch_all!(
            self,
            unit_from_row,
            "SELECT * FROM ingest_units WHERE domain_id = $1 AND source = $2
             AND ($3 IS NULL OR state = $3) ORDER BY updated_at DESC, id DESC LIMIT $4",
            domain_id,
            source,
            state,
            limit
        )
    }

    /// A source's totals over every unit: rows (ingested, duplicates, rejected, dropped for
    /// personal data) and units by state.
    pub async fn ingest_totals(&self, domain_id: i64, source: &str) -> Result<IngestTotals> {
        use crate::sql::Cells;
        crate::sql::with_pool!(self, pool => {
            let r = sqlx::query(
                "SELECT CAST(COALESCE(SUM(ingested), 0) AS BIGINT) AS ingested,
                 CAST(COALESCE(SUM(duplicates), 0) AS BIGINT) AS duplicates,
                 CAST(COALESCE(SUM(rejected), 0) AS BIGINT) AS rejected,
                 CAST(COALESCE(SUM(dropped_pii), 0) AS BIGINT) AS dropped_pii,
                 COUNT(*) FILTER (WHERE state = 'reading') AS reading,
                 COUNT(*) FILTER (WHERE state = 'done') AS done,
                 COUNT(*) FILTER (WHERE state = 'quarantined') AS quarantined,
                 COUNT(*) FILTER (WHERE state = 'changed') AS changed
                 FROM ingest_units WHERE domain_id = $1 AND source = $2",
            )
            .bind(domain_id)
            .bind(source)
            .fetch_one(pool)
            .await?;
            Ok(IngestTotals {
                ingested: r.int("ingested")?,
                duplicates: r.int("duplicates")?,
                rejected: r.int("rejected")?,
                dropped_pii: r.int("dropped_pii")?,
                reading: r.int("reading")?,
                done: r.int("done")?,
                quarantined: r.int("quarantined")?,
                changed: r.int("changed")?,
            })
        })
    }
}

/// A source's counts over every file (or its table).
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct IngestTotals {
    pub ingested: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub dropped_pii: i64,
    pub reading: i64,
    pub done: i64,
    pub quarantined: i64,
    pub changed: i64,
}

from_row!(fn source_state_from_row -> SourceState {
    domain_id: int, source: text, next_poll_at: time, claimed_until: opt_time, claimed_by: opt_text,
    polled_at: opt_time, caught_up_at: opt_time, last_error: opt_text,
});

from_row!(fn unit_from_row -> IngestUnit {
    id: int, source: text, unit: text, version: text, size: int, state: text, position: text,
    ingested: int, duplicates: int, rejected: int, dropped_pii: int, errors: json,
    first_seen: time, updated_at: time,
});

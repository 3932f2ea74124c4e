//! A `table` source: rows of a PostgreSQL table or view after the stored cursor value, in
//! cursor order, a batch per transaction. The cursor moves only in the transaction that stores
//! its batch. Rows that share a cursor value are never split across two batches (a timestamp
//! cursor has ties), so `>` on the stored value skips none of them.

use std::time::Duration;

use flywheel_domain::SourceSpec;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::{CHUNK_ROWS, Committed, IngestError, Poll, PollReport, UnitWriter};

/// `"schema"."table"` or `"table"`: the spec allows only letters, digits, `_` and `-` in
/// each part, so quoting is all the escaping needed.
fn quoted(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

fn connection_url(source: &SourceSpec) -> Result<String, IngestError> {
    match (&source.connection, &source.connection_env) {
        (Some(url), _) => Ok(url.clone()),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            IngestError::Table(format!(
                "the environment variable {var} (the source's connection_env) is not set on \
                 this ingest worker"
            ))
        }),
        (None, None) => Err(IngestError::Table("the source names no connection".into())),
    }
}

pub(crate) async fn poll(poll: &Poll<'_>) -> Result<PollReport, IngestError> {
    let (ingestor, domain, source) = (poll.ingestor, poll.domain, poll.source);
    let table = source.table.as_deref().unwrap_or_default();
    let cursor = source.cursor.as_deref().unwrap_or_default();
    let failed = |what: &str, e: sqlx::Error| IngestError::Table(format!("{table}: {what}: {e}"));
    let url = connection_url(source)?;
    let mut conn = tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url))
        .await
        .map_err(|_| IngestError::Table(format!("{table}: the database did not answer in 10 s")))?
        .map_err(|e| failed("connecting", e))?;
    // The cursor's own type, so a stored value compares as an id or a time, not as text.
    let cursor_type: Option<String> = sqlx::query_scalar(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
         WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
    )
    .bind(quoted(table))
    .bind(cursor)
    .fetch_optional(&mut conn)
    .await
    .map_err(|e| failed("reading its columns", e))?;
    let Some(cursor_type) = cursor_type else {
        return Err(IngestError::Table(format!(
            "{table} has no column `{cursor}`, or this connection cannot see the table"
        )));
    };
    let from = format!("FROM {} AS t", quoted(table));
    let col = format!("t.{}", quoted(cursor));
    // Each row with its cursor as text (the stored position) and whether its cursor equals
    // the batch's last as the column's own type compares (`1.0` and `1.00` are one numeric
    // value): that run may go on past the limit. A row without a cursor is never read.
    let after = format!(
        "SELECT b.r, b.c, b.v = max(b.v) OVER () FROM (
             SELECT row_to_json(t)::text AS r, ({col})::text AS c, {col} AS v {from}
             WHERE {col} IS NOT NULL AND ($1::text IS NULL OR {col} > CAST($1 AS {cursor_type}))
             ORDER BY {col} LIMIT $2) AS b
         ORDER BY b.v"
    );
    let tied = format!(
        "SELECT row_to_json(t)::text, ({col})::text, true {from}
         WHERE {col} = CAST($1 AS {cursor_type})"
    );
    // Named by what it reads: a source pointed at another table or cursor starts afresh.
    let name = format!("{table}({cursor})");
    let unit = ingestor
        .db
        .ingest_unit(domain.id, &source.name, &name, "", 0, "")
        .await?;
    let mut writer = UnitWriter::new(poll, unit);
    let preparer = writer.preparer();
    let mut report = PollReport::default();
    let batch = CHUNK_ROWS;
    while poll.may_go_on().await? {
        let position = writer.unit.position.clone();
        let start = (!position.is_empty()).then_some(position);
        let mut rows: Vec<(String, String, bool)> =
            sqlx::query_as(sqlx::AssertSqlSafe(after.clone()))
                .bind(&start)
                .bind(batch as i64)
                .fetch_all(&mut conn)
                .await
                .map_err(|e| failed("reading rows", e))?;
        let full = rows.len() == batch;
        if full {
            // The last cursor value may go on past the limit: leave its rows for the next
            // batch, or, if the whole batch shares it, take every row that has it.
            let last = rows.last().map(|r| r.1.clone());
            rows.retain(|r| !r.2);
            if rows.is_empty() {
                rows = sqlx::query_as(sqlx::AssertSqlSafe(tied.clone()))
                    .bind(&last)
                    .fetch_all(&mut conn)
                    .await
                    .map_err(|e| failed("reading rows", e))?;
            }
        }
        let Some(to) = rows.last().map(|r| r.1.clone()) else {
            report.caught_up = true;
            break;
        };
        let records = rows
            .into_iter()
            .map(|(row, at, _)| {
                let fields = serde_json::from_str::<Value>(&row)
                    .map_err(|e| crate::mapping::RowError::new("malformed_json", e.to_string()));
                (json!({ "cursor": at }), fields)
            })
            .collect();
        let prepared = preparer.prepare(records);
        if writer.commit(prepared, to, false).await? == Committed::TakenOver {
            break;
        }
        report.units += 1;
        if !full {
            report.caught_up = true;
            break;
        }
    }
    let _ = conn.close().await;
    writer.close().await;
    Ok(report)
}

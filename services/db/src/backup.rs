//! Online backups of the embedded SQLite database, and the checks a file passes before it may
//! replace one. (PostgreSQL has `pg_dump`; nothing here speaks to it.)

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::{DbError, Result};

/// What a backup holds, read from the backup itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The newest schema migration applied to it.
    pub schema_version: i64,
    pub domains: i64,
    pub corrections: i64,
    pub versions: i64,
}

/// Copies the SQLite database at `source` into a new file `to`, while other processes may be
/// writing to it: `VACUUM INTO` reads one transaction's snapshot (WAL readers do not block
/// writers), so the copy is consistent and compact, and holds what the WAL held too.
pub async fn backup_sqlite(source: &Path, to: &Path) -> Result<()> {
    if !source.exists() {
        return Err(DbError::Unsupported(format!(
            "no database at {} (is --data-dir or --database right?)",
            source.display()
        )));
    }
    if to.exists() {
        return Err(DbError::Unsupported(format!(
            "{} exists; a backup never overwrites a file",
            to.display()
        )));
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(source)
        .read_only(true)
        .busy_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let target = to
        .to_str()
        .ok_or_else(|| DbError::Unsupported(format!("{}: not UTF-8", to.display())))?;
    sqlx::query("VACUUM INTO ?")
        .bind(target)
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// Checks that `path` is a whole flywheel database this build can run on, and says what it
/// holds: SQLite's integrity check passes, flywheel's schema is there, and no migration is
/// newer than this build knows (a backup of a newer flywheel needs that flywheel).
pub async fn check_sqlite_backup(path: &Path) -> Result<BackupSummary> {
    let not_ours = DbError::Unsupported;
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .journal_mode(SqliteJournalMode::Delete)
        .connect()
        .await
        .map_err(|e| not_ours(format!("not a SQLite database ({e})")))?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| not_ours(format!("not a SQLite database ({e})")))?;
    if integrity != "ok" {
        return Err(not_ours(format!("damaged: {integrity}")));
    }
    let schema_version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _app_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .map_err(|_| not_ours("not a flywheel database (no schema migrations)".into()))?;
    let schema_version =
        schema_version.ok_or_else(|| not_ours("not a flywheel database (empty schema)".into()))?;
    let known = sqlx::migrate!("../../migrations/sqlite")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    if schema_version > known {
        return Err(not_ours(format!(
            "written by a newer flywheel (schema {schema_version}, this build knows {known}): \
             restore it with that version"
        )));
    }
    let mut counts = [0i64; 3];
    for (slot, sql) in counts.iter_mut().zip([
        "SELECT count(*) FROM domains",
        "SELECT count(*) FROM corrections",
        "SELECT count(*) FROM versions",
    ]) {
        *slot = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
    }
    conn.close().await?;
    Ok(BackupSummary {
        schema_version,
        domains: counts[0],
        corrections: counts[1],
        versions: counts[2],
    })
}

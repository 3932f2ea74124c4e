//! Every query, one file per resource, each an `impl Db` block; this file opens the
//! database and holds what the blocks share.

mod audit;
mod corrections;
mod domains;
mod events;
mod jobs;
mod predictions;
mod review;
mod sessions;
mod sources;
mod tokens;
mod versions;
mod webhooks;
mod writer;

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::sql::{Pool, with_pool};
use crate::{DbError, Result};
pub use review::{CorrectionFilter, Edit};
pub use sources::IngestTotals;
pub use webhooks::{Delivery, NewDelivery, OutboxCounts};
pub use writer::SQLITE_WRITER_CACHE_KIB;
use writer::{WAL_SIZE_LIMIT_BYTES, WriteRequest, checkpoint_in_background, group_writer};

/// Runs `$sql` with its binds on whichever pool is open (compiled once per driver, like
/// [`with_pool!`]) and returns how many rows it changed.
macro_rules! execute {
    ($db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        $crate::sql::with_pool!($db, pool => {
            sqlx::query($sql)$(.bind($bind))*.execute(pool).await?.rows_affected()
        })
    };
}
/// Runs `$sql` with its binds and reads every row it returns with `$read`.
macro_rules! fetch_all {
    ($db:expr, $read:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        $crate::sql::with_pool!($db, pool => {
            sqlx::query($sql)$(.bind($bind))*.fetch_all(pool).await?.iter().map($read).collect()
        })
    };
}
/// Runs `$sql` with its binds and reads the row it returns, if any, with `$read`.
macro_rules! fetch_optional {
    ($db:expr, $read:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        $crate::sql::with_pool!($db, pool => {
            sqlx::query($sql)$(.bind($bind))*.fetch_optional(pool).await?.as_ref().map($read).transpose()
        })
    };
}
/// Declares `fn $name(row) -> Result<$ty>`: each field read from the column of its name by the
/// [`Cells`](crate::sql::Cells) method beside it, given any further arguments in parentheses.
macro_rules! from_row {
    ($vis:vis fn $name:ident -> $ty:ident { $($field:ident: $read:ident $(($($arg:expr),*))?),* $(,)? }) => {
        $vis fn $name(r: &impl $crate::sql::Cells) -> $crate::Result<$ty> {
            Ok($ty { $($field: r.$read(stringify!($field) $($(, $arg)*)?)?),* })
        }
    };
}
use {execute, fetch_all, fetch_optional, from_row};

/// Handle on flywheel's database, SQLite or PostgreSQL. Cheap to clone.
///
/// Every query is written once, with `$N` placeholders (SQLite reads them as positions too),
/// in SQL both dialects accept; the few places where they behave differently say so.
#[derive(Clone, Debug)]
pub struct Db {
    pool: Pool,
    /// SQLite: corrections are written by one task on one connection (see `group_writer`).
    writer: Option<(tokio::sync::mpsc::Sender<WriteRequest>, sqlx::SqlitePool)>,
    /// SQLite: while any clone of this handle lives, WAL checkpoints run in the background.
    _alive: Option<std::sync::Arc<()>>,
}

/// Which database an instance uses, parsed from `--database`: a `postgres://` (or
/// `postgresql://`) URL, or a SQLite file given as a path or `sqlite://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(raw.to_owned()));
        }
        if let Some(path) = raw.strip_prefix("sqlite://") {
            return Ok(DatabaseUrl::Sqlite(path.into()));
        }
        if let Some((scheme, _)) = raw.split_once("://") {
            return Err(DbError::Unsupported(format!(
                "database `{raw}`: {scheme}:// is not supported; give a postgres:// URL, a sqlite:// URL or a file path"
            )));
        }
        Ok(DatabaseUrl::Sqlite(raw.into()))
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => path.display().to_string(),
            DatabaseUrl::Postgres(url) => match (url.split_once("://"), url.rfind('@')) {
                (Some((scheme, rest)), Some(_)) => {
                    let (auth, host) = rest.rsplit_once('@').expect("has @");
                    let user = auth.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}@{host}")
                }
                _ => url.clone(),
            },
        }
    }
}

/// How many statements of a write may wait for each other: SQLite has one writer whatever
/// the pool size, PostgreSQL serves a connection per request.
const SQLITE_CONNECTIONS: u32 = 8;
/// How long a statement waits for a lock another connection holds.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const POSTGRES_CONNECTIONS: u32 = 16;

impl Db {
    /// Opens the database `url` names, creating a SQLite file if needed, and migrates it.
    pub async fn open(url: &DatabaseUrl) -> Result<Self> {
        match url {
            DatabaseUrl::Sqlite(path) => Self::open_sqlite(path).await,
            DatabaseUrl::Postgres(url) => Self::open_postgres(url).await,
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string())
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_CONNECTIONS)
            .connect_with(options.clone())
            .await?;
        let writer_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(
                options
                    .pragma("cache_size", format!("-{SQLITE_WRITER_CACHE_KIB}"))
                    .pragma("wal_autocheckpoint", "0"),
            )
            .await?;
        let alive = std::sync::Arc::new(());
        let restart = std::sync::Arc::default();
        tokio::spawn(checkpoint_in_background(
            pool.clone(),
            std::sync::Arc::clone(&restart),
            std::sync::Arc::downgrade(&alive),
        ));
        let (send, receive) = tokio::sync::mpsc::channel(64);
        tokio::spawn(group_writer(writer_pool.clone(), restart, receive));
        let db = Self {
            pool: Pool::Sqlite(pool),
            writer: Some((send, writer_pool)),
            _alive: Some(alive),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Connects to PostgreSQL at `url` and migrates it. Commits wait for the WAL flush
    /// (`synchronous_commit` is forced on), so an acknowledged correction survives a crash
    /// whatever the server's default.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        // Custom plans: sqlx prepares every statement, and PostgreSQL switches a prepared
        // statement to its generic plan after five runs. Made while a table is nearly empty,
        // that plan looked a client id up by `domain_id` alone and filtered every row of the
        // domain: each upload then read the whole domain, and under load (the PostgreSQL soak,
        // 300 requests/s) latency went from 4 ms to seconds whenever a connection had cached
        // it early. A custom plan sees the values and today's statistics.
        let options = options.options([
            ("synchronous_commit", "on"),
            ("plan_cache_mode", "force_custom_plan"),
        ]);
        // One connection first: a server that is down or refuses us says why within
        // seconds, where the pool retries for its whole acquire timeout and then reports only
        // that it timed out.
        {
            use sqlx::Connection;
            let probe = sqlx::PgConnection::connect_with(&options);
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(DbError::Unsupported(
                        "PostgreSQL did not answer within 5 s: is the host and port right, \
                         and does a firewall let us through?"
                            .into(),
                    ));
                }
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let db = Self {
            pool: Pool::Postgres(pool),
            writer: None,
            _alive: None,
        };
        db.migrate().await?;
        Ok(db)
    }

    /// SQLite: the size of the write-ahead log, which checkpoints keep bounded; `None` on
    /// PostgreSQL (its WAL is the server's to watch).
    pub async fn wal_bytes(&self) -> Result<Option<u64>> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Ok(None);
        };
        // (seq, name, file) of each attached database; `main` is ours.
        let files: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(pool)
            .await?;
        let Some((_, _, file)) = files.into_iter().find(|(_, name, _)| name == "main") else {
            return Ok(None);
        };
        Ok(Some(
            std::fs::metadata(format!("{file}-wal")).map_or(0, |m| m.len()),
        ))
    }

    pub async fn migrate(&self) -> Result<()> {
        // apalis records its own migrations in `_sqlx_migrations`; ours must not collide.
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut migrator = sqlx::migrate!("../../migrations/sqlite");
                migrator.dangerous_set_table_name("_app_migrations");
                migrator.run(pool).await?;
            }
            Pool::Postgres(pool) => {
                let mut migrator = sqlx::migrate!("../../migrations/postgres");
                migrator.dangerous_set_table_name("_app_migrations");
                migrator.run(pool).await?;
            }
        }
        Ok(())
    }

    /// Creates an empty database called `name` on the PostgreSQL server `server_url` points
    /// at (through a database that exists there, usually `postgres`) and returns its URL.
    /// For tests and benchmarks, which each want a database of their own.
    pub async fn create_postgres_database(server_url: &str, name: &str) -> Result<String> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::Unsupported(format!("database name `{name}`")));
        }
        use sqlx::Connection;
        let options: PgConnectOptions = server_url.parse()?;
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        // The name was checked above: identifiers cannot be bound as parameters.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let base = server_url
            .rsplit_once('/')
            .map_or(server_url, |(base, _)| base);
        Ok(format!("{base}/{name}"))
    }

    /// Drops the database `name` on the PostgreSQL server at `server_url`, closing whatever
    /// connections it still has: tests clean up after themselves, so a server that outlives
    /// many runs does not spend itself vacuuming their leftovers.
    pub async fn drop_postgres_database(server_url: &str, name: &str) -> Result<()> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::Unsupported(format!("database name `{name}`")));
        }
        use sqlx::Connection;
        let options: PgConnectOptions = server_url.parse()?;
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        // The name was checked above: identifiers cannot be bound as parameters.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }

    /// `sqlite` or `postgres`: for logs, metrics and benchmarks.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<()> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
        if let Some((_, writer)) = &self.writer {
            writer.close().await;
        }
    }
}

//! What lets one set of queries run on SQLite and PostgreSQL: a pool enum, a macro that runs a
//! block against whichever pool is open, a timestamp type stored natively by each, and one way
//! to read a column from either row type.
//!
//! sqlx's `Any` driver cannot decode SQLite booleans and loses native types, so the two drivers
//! stay typed and the block is compiled once per driver instead.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::de::DeserializeOwned;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::types::Json;
use sqlx::{Decode, Encode, Postgres, Row, Sqlite, Type};

use crate::{DbError, Result};

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the open pool. The body is compiled once per driver, so
/// it may use driver-specific types through inference (rows, transactions, query builders).
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db.pool {
            $crate::sql::Pool::Sqlite($pool) => $body,
            $crate::sql::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// A point in time as each database keeps it best: RFC 3339 text with microseconds in SQLite
/// (which sorts and compares correctly as text), `timestamptz` in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(pub DateTime<Utc>);

impl Stamp {
    /// Now, to the microsecond: what both databases keep, so a value handed back before it
    /// is stored equals the one read later.
    pub fn now() -> Self {
        Stamp(Utc::now().trunc_subsecs(6))
    }

    fn text(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

impl Type<Sqlite> for Stamp {
    fn type_info() -> <Sqlite as sqlx::Database>::TypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &<Sqlite as sqlx::Database>::TypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for Stamp {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(self.text(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Stamp {
    fn decode(value: <Sqlite as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        let raw = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Stamp(
            DateTime::parse_from_rfc3339(raw)
                .map_err(|e| format!("timestamp `{raw}`: {e}"))?
                .with_timezone(&Utc),
        ))
    }
}

impl Type<Postgres> for Stamp {
    fn type_info() -> <Postgres as sqlx::Database>::TypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &<Postgres as sqlx::Database>::TypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Stamp {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Stamp {
    fn decode(value: <Postgres as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Stamp(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

/// Reading a column the same way from either driver's rows.
pub(crate) trait Cells {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn flag(&self, col: &str) -> Result<bool>;
    fn opt_float(&self, col: &str) -> Result<Option<f64>>;
    fn time(&self, col: &str) -> Result<DateTime<Utc>>;
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>>;
    fn json<T: DeserializeOwned>(&self, col: &str) -> Result<T>;
    fn opt_json<T: DeserializeOwned>(&self, col: &str) -> Result<Option<T>>;

    /// A text column parsed by `parse`; text it refuses makes the row corrupt.
    fn parsed<T>(&self, col: &str, parse: impl FnOnce(&str) -> Option<T>) -> Result<T> {
        let raw = self.text(col)?;
        parse(&raw).ok_or(DbError::Corrupt(raw))
    }
}

fn column(col: &str, e: sqlx::Error) -> DbError {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => DbError::Corrupt(format!("{col}: {source}")),
        other => other.into(),
    }
}

macro_rules! cells {
    ($row:ty) => {
        impl Cells for $row {
            fn text(&self, col: &str) -> Result<String> {
                self.try_get(col).map_err(|e| column(col, e))
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                self.try_get(col).map_err(|e| column(col, e))
            }
            fn int(&self, col: &str) -> Result<i64> {
                self.try_get(col).map_err(|e| column(col, e))
            }
            fn flag(&self, col: &str) -> Result<bool> {
                self.try_get(col).map_err(|e| column(col, e))
            }
            fn opt_float(&self, col: &str) -> Result<Option<f64>> {
                self.try_get(col).map_err(|e| column(col, e))
            }
            fn time(&self, col: &str) -> Result<DateTime<Utc>> {
                let stamp: Stamp = self.try_get(col).map_err(|e| column(col, e))?;
                Ok(stamp.0)
            }
            fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
                let stamp: Option<Stamp> = self.try_get(col).map_err(|e| column(col, e))?;
                Ok(stamp.map(|s| s.0))
            }
            fn json<T: DeserializeOwned>(&self, col: &str) -> Result<T> {
                let Json(value) = self.try_get(col).map_err(|e| column(col, e))?;
                Ok(value)
            }
            fn opt_json<T: DeserializeOwned>(&self, col: &str) -> Result<Option<T>> {
                let value: Option<Json<T>> = self.try_get(col).map_err(|e| column(col, e))?;
                Ok(value.map(|Json(v)| v))
            }
        }
    };
}
cells!(SqliteRow);
cells!(PgRow);

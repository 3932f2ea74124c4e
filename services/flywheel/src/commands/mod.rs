//! The CLI's API commands, one module per resource (`flywheel tokens …`, `domains …`, `jobs …`,
//! `versions …`, `aliases …`, `import`): each parses its flags, calls the API through
//! [`Remote`](crate::client::Remote) and prints a table, or the JSON answer with `--json`.
//!
//! Nothing here touches the database or the registry: a command does only what its token
//! may do over HTTP, so the CLI and the API cannot disagree about who may do what.

pub mod aliases;
pub mod domains;
pub mod import;
pub mod jobs;
pub mod tokens;
pub mod versions;

use std::io::Read as _;

use anyhow::Context as _;
use serde_json::Value;

use crate::client::Remote;

/// The flags of every decision a person makes (approve, reject, roll back, move, edit): why,
/// and — against a server run with `--auth off`, which knows no names — who.
#[derive(clap::Args, Debug, Clone)]
pub struct Decision {
    /// Why, for the audit log (required).
    #[arg(long)]
    pub reason: String,
    /// Who decides, for a server run with `--auth off` (default: $USER); with a token the
    /// server records the token's name.
    #[arg(long)]
    pub by: Option<String>,
}

impl Decision {
    /// The decision's fields of a request body, `by` only where the server needs it.
    fn body(&self, remote: &Remote, mut body: Value) -> Value {
        body["reason"] = Value::String(self.reason.clone());
        let by = self.by.clone().or_else(|| {
            (!remote.has_token())
                .then(|| std::env::var("USER").ok())
                .flatten()
        });
        if let Some(by) = by {
            body["by"] = Value::String(by);
        }
        body
    }
}

/// Writes a line to stdout. A closed pipe (`flywheel … | head`) ends the command quietly:
/// the error is a [`ClosedPipe`], which `main` exits 0 on.
fn emit(line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedPipe.into()),
        other => Ok(other?),
    }
}

/// Whoever read our output stopped reading; not a failure of the command.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct ClosedPipe;

/// `say!("…", args)`: [`emit`] a formatted line.
macro_rules! say {
    ($($arg:tt)*) => { $crate::commands::emit(&format!($($arg)*))? };
}
pub(crate) use say;

/// Prints `value` as indented JSON.
fn print_json(value: &Value) -> anyhow::Result<()> {
    emit(&serde_json::to_string_pretty(value)?)
}

/// Prints `rows` under `headers` in aligned columns (or `empty` when there are none).
fn print_table(headers: &[&str], rows: &[Vec<String>], empty: &str) -> anyhow::Result<()> {
    if rows.is_empty() {
        return emit(empty);
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (cell, w) in cells.zip(&widths) {
            out.push_str(cell);
            out.push_str(&" ".repeat(w - cell.chars().count() + 2));
        }
        emit(out.trim_end())
    };
    line(&mut headers.iter().copied())?;
    for row in rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// A JSON value as a table cell: strings bare, numbers as written, nothing as `-`.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// An RFC 3339 time as a table cell: to the second, in UTC as stored.
fn when(value: &Value) -> String {
    match value.as_str() {
        Some(t) if t.len() >= 19 => t[..19].replace('T', " "),
        _ => cell(value),
    }
}

/// A share in [0, 1] as a percentage cell.
fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The JSON a `--file` flag names: a path, or `-` for standard input.
fn read_json_file(path: &str) -> anyhow::Result<Value> {
    let raw = if path == "-" {
        let mut raw = String::new();
        std::io::stdin()
            .read_to_string(&mut raw)
            .context("reading standard input")?;
        raw
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    serde_json::from_str(&raw).with_context(|| format!("{path} is not JSON"))
}

/// The `data` array of a list answer.
fn data(list: &Value) -> &[Value] {
    list["data"].as_array().map_or(&[], Vec::as_slice)
}

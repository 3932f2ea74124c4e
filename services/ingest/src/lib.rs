//! The ingestion worker's reading: corrections collected from where production already writes
//! them — files under an object-store prefix (JSONL, CSV, Parquet) or a PostgreSQL table read
//! by an increasing cursor — fed through the same validation, PII redaction, dedup and split
//! as the HTTP path.
//!
//! This crate owns reading sources and the exactly-once bookkeeping: every chunk of rows is
//! committed together with its unit's new position (a compare-and-swap, through
//! `Db::insert_corrections_advancing`), so a worker killed anywhere resumes where the
//! database says, and two workers never store the same rows. It does not schedule polls (the
//! worker's scheduler and queue do) and knows nothing of HTTP.

mod files;
mod mapping;
mod read;
mod table;

pub use read::{WholeFile, read_whole};

use std::path::PathBuf;
use std::time::Duration;

use flywheel_db::{Db, DomainRow, IngestUnit, UnitAdvance};
use flywheel_domain::{PiiAction, SourceSpec};
use flywheel_telemetry::Metrics;
use serde_json::{Value, json};

/// Rows of a table committed in one transaction, as the HTTP path commits NDJSON.
pub const CHUNK_ROWS: usize = 1_000;
/// Rows of a file committed in one transaction. A file has one commit in flight at a time
/// (each moves its position on from the last), where HTTP uploads overlap theirs: bigger
/// chunks pay for fewer durable commits (SQLite 17,000 → 20,500 rows/s here). A crash
/// re-reads at most one chunk; nothing stored is lost.
pub const FILE_CHUNK_ROWS: usize = 5_000;
/// Refusals kept per file (or table) for the report; the rest are counted.
pub const MAX_UNIT_ERRORS: usize = 20;
/// A poll stops starting new work after this long and asks to be polled again at once, so
/// one source never holds a worker for hours.
const POLL_BUDGET: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Db(#[from] flywheel_db::DbError),
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Table(String),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What reading a source needs, shared by every poll of a process.
#[derive(Clone)]
pub struct Ingestor {
    pub db: Db,
    pub metrics: Metrics,
    /// Downloaded files wait here while they are read.
    pub scratch: PathBuf,
    /// The longest input, expected answer or model output accepted (the API's limit).
    pub max_text_chars: usize,
    /// How long a poll's claim on its source lasts without news; extended with every chunk.
    pub lease: Duration,
}

/// How a poll went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollReport {
    /// Files (or table batches) read to their end.
    pub units: usize,
    /// Rows stored new.
    pub ingested: u64,
    /// Everything there was has been read: the next poll waits for the interval.
    pub caught_up: bool,
}

impl Ingestor {
    /// Reads what is new in one of `domain`'s sources, as the poll that holds the source's
    /// claim `claim`, and records how the poll went (the next poll is due after the source's
    /// interval, or at once if this one ran out of time). `None` if the claim is not this
    /// poll's (it waited in the queue past its lease and another poll took the source).
    pub async fn poll(
        &self,
        domain: &DomainRow,
        source: &SourceSpec,
        claim: &str,
    ) -> Result<Option<PollReport>, IngestError> {
        if !self.still_holds(domain, source, claim).await? {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let poll = Poll {
            ingestor: self,
            domain,
            source,
            claim,
            started,
        };
        let result = match (&source.files, &source.table) {
            (Some(url), _) => files::poll(&poll, url).await,
            (None, Some(_)) => table::poll(&poll).await,
            (None, None) => Ok(PollReport::default()),
        };
        let labels = [domain.spec.name.as_str(), source.name.as_str()];
        let (caught_up, error) = match &result {
            Ok(report) => (report.caught_up, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let outcome = if error.is_some() { "failed" } else { "ok" };
        self.metrics
            .source_polls
            .with_label_values(&[labels[0], labels[1], outcome])
            .inc();
        // Behind but healthy: poll again at once. Failed: wait the interval, like a retry.
        let next = if caught_up || error.is_some() {
            Duration::from_secs(source.interval_seconds)
        } else {
            Duration::ZERO
        };
        self.db
            .finish_poll(
                domain.id,
                &source.name,
                claim,
                next,
                caught_up,
                error.as_deref(),
            )
            .await?;
        result.map(Some)
    }

    /// Extends the source's claim if `claim` still holds it.
    async fn still_holds(
        &self,
        domain: &DomainRow,
        source: &SourceSpec,
        claim: &str,
    ) -> Result<bool, IngestError> {
        Ok(self
            .db
            .extend_source_claim(domain.id, &source.name, claim, self.lease)
            .await?)
    }
}

/// One poll under way: what it reads, for whom, under which claim, since when.
pub(crate) struct Poll<'a> {
    ingestor: &'a Ingestor,
    domain: &'a DomainRow,
    source: &'a SourceSpec,
    claim: &'a str,
    started: std::time::Instant,
}

impl Poll<'_> {
    /// Whether the poll may go on: its claim is still its own (extended), and it has not run
    /// past its budget.
    async fn may_go_on(&self) -> Result<bool, IngestError> {
        Ok(self.started.elapsed() < POLL_BUDGET
            && self
                .ingestor
                .still_holds(self.domain, self.source, self.claim)
                .await?)
    }
}

/// One file (or the table) being stored: what the unit held when reading began, plus what
/// each committed chunk added.
struct UnitWriter<'a> {
    ingestor: &'a Ingestor,
    domain: &'a DomainRow,
    source: &'a SourceSpec,
    claim: &'a str,
    unit: IngestUnit,
    errors: Vec<Value>,
    /// Registered as an open upload while a multi-chunk file is stored, so no job snapshots
    /// part of it.
    upload: Option<String>,
}

/// Whether the unit is still this reader's after a commit.
#[derive(Debug, PartialEq, Eq)]
enum Committed {
    Stored,
    /// Another worker moved the unit on (this reader stored nothing of the chunk), or took
    /// the source's claim: this reader stops.
    TakenOver,
}

impl<'a> UnitWriter<'a> {
    fn new(poll: &Poll<'a>, unit: IngestUnit) -> Self {
        let errors = unit.errors.as_array().cloned().unwrap_or_default();
        Self {
            ingestor: poll.ingestor,
            domain: poll.domain,
            source: poll.source,
            claim: poll.claim,
            unit,
            errors,
            upload: None,
        }
    }

    fn refuse(&mut self, at: &Value, code: &str, message: &str) -> i64 {
        if self.errors.len() < MAX_UNIT_ERRORS {
            let mut error = at.clone();
            if let Some(fields) = error.as_object_mut() {
                fields.insert("code".into(), code.into());
                fields.insert("message".into(), message.into());
            }
            self.errors.push(error);
        }
        1
    }

    /// What preparing this unit's chunks needs, for the thread that reads them.
    fn preparer(&self) -> Preparer {
        Preparer {
            spec: self.domain.spec.clone(),
            source: self.source.name.clone(),
            mapping: self.source.mapping.clone(),
            unit: self.unit.unit.clone(),
            max_text_chars: self.ingestor.max_text_chars,
        }
    }

    /// Stores a prepared chunk and moves the unit to `to`, in one transaction. `last`
    /// finishes a file: `done`, or `quarantined` if no row of it was valid. A table is never
    /// finished.
    async fn commit(
        &mut self,
        prepared: Prepared,
        to: String,
        last: bool,
    ) -> Result<Committed, IngestError> {
        let Prepared {
            valid,
            checked: before,
            dropped,
            refusals,
        } = prepared;
        let mut rejected = 0i64;
        for (at, code, message) in &refusals {
            rejected += self.refuse(at, code, message);
        }
        let stored_before = self.unit.ingested + self.unit.duplicates + self.unit.dropped_pii;
        let state = if !last || self.source.table.is_some() {
            "reading"
        } else if stored_before == 0 && before == 0 && self.unit.rejected + rejected > 0 {
            "quarantined"
        } else {
            "done"
        };
        if !last && self.upload.is_none() && self.source.files.is_some() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            self.ingestor.db.open_upload(&id, self.domain.id).await?;
            self.upload = Some(id);
        } else if let Some(id) = &self.upload {
            self.ingestor.db.touch_upload(id).await?;
        }
        let advance = UnitAdvance {
            unit_id: self.unit.id,
            from: self.unit.position.clone(),
            to: to.clone(),
            rejected,
            dropped_pii: dropped,
            errors: Value::Array(self.errors.clone()),
            state,
        };
        let outcome = self
            .ingestor
            .db
            .insert_corrections_advancing(self.domain.id, &valid, advance)
            .await?;
        if outcome.unit_moved {
            return Ok(Committed::TakenOver);
        }
        let rejected = rejected + outcome.conflicts.len() as i64;
        self.unit.position = to;
        self.unit.ingested += outcome.accepted as i64;
        self.unit.duplicates += outcome.duplicates as i64;
        self.unit.rejected += rejected;
        self.unit.dropped_pii += dropped;
        self.unit.state = state.to_owned();
        let m = &self.ingestor.metrics;
        let name = self.domain.spec.name.as_str();
        for (outcome, n) in [
            ("ingested", outcome.accepted as u64),
            ("duplicate", outcome.duplicates as u64),
            ("rejected", rejected as u64),
            ("dropped_pii", dropped as u64),
        ] {
            m.source_rows
                .with_label_values(&[name, &self.source.name, outcome])
                .inc_by(n);
        }
        m.corrections_ingested
            .with_label_values(&[name])
            .inc_by(outcome.accepted as u64);
        for (kind, n) in &outcome.redacted {
            m.corrections_redacted
                .with_label_values(&[name, kind.as_str()])
                .inc_by(u64::from(*n));
        }
        let held = self
            .ingestor
            .db
            .extend_source_claim(
                self.domain.id,
                &self.source.name,
                self.claim,
                self.ingestor.lease,
            )
            .await?;
        Ok(if held {
            Committed::Stored
        } else {
            Committed::TakenOver
        })
    }

    /// Ends the unit without rows: `quarantined` (unreadable, the code `unreadable`) or
    /// `changed` (rewritten after it was read, the code `changed`).
    async fn end(&mut self, state: &'static str, why: String) -> Result<(), IngestError> {
        let code = if state == "changed" {
            "changed"
        } else {
            "unreadable"
        };
        self.errors.push(json!({ "code": code, "message": why }));
        self.ingestor
            .db
            .end_unit(self.unit.id, state, &Value::Array(self.errors.clone()))
            .await?;
        self.unit.state = state.to_owned();
        Ok(())
    }

    async fn close(mut self) {
        if let Some(id) = self.upload.take()
            && let Err(e) = self.ingestor.db.close_upload(&id).await
        {
            tracing::warn!(error = %e, upload = id, "could not close an ingestion upload");
        }
    }
}

/// A chunk made ready to store, off the commit path: its valid corrections (after the PII
/// policy's `drop`) and its refusals, each with where it stands.
pub(crate) struct Prepared {
    valid: Vec<flywheel_domain::Correction>,
    /// Rows valid before the `drop` policy.
    checked: usize,
    dropped: i64,
    refusals: Vec<(Value, &'static str, String)>,
}

/// What turns a chunk's records into corrections — the mapping, validation and the PII
/// policy — owned, so the reader's thread prepares the next chunk while this one commits.
#[derive(Clone)]
pub(crate) struct Preparer {
    spec: flywheel_domain::DomainSpec,
    source: String,
    mapping: flywheel_domain::Mapping,
    /// The file's key, for each row's provenance; empty for a table.
    unit: String,
    max_text_chars: usize,
}

impl Preparer {
    fn prepare(&self, records: Vec<(Value, Result<Value, mapping::RowError>)>) -> Prepared {
        let mut valid = Vec::with_capacity(records.len());
        let mut refusals = Vec::new();
        for (at, fields) in records {
            let mut provenance = json!({ "source": self.source });
            if !self.unit.is_empty() {
                provenance["file"] = self.unit.clone().into();
            }
            if let (Some(p), Some(a)) = (provenance.as_object_mut(), at.as_object()) {
                p.extend(a.clone());
            }
            let draft = fields.and_then(|f| mapping::draft(&f, &self.mapping, provenance));
            match draft {
                Ok(d) => match d.validate(&self.spec, self.max_text_chars) {
                    Ok(c) => valid.push(c),
                    Err(e) => refusals.push((at, invalid_code(&e), e.to_string())),
                },
                Err(e) => refusals.push((at, e.code, e.message)),
            }
        }
        let checked = valid.len();
        if self.spec.policy.pii.action == PiiAction::Drop {
            valid.retain(|c| c.redacted.is_empty());
        }
        Prepared {
            dropped: (checked - valid.len()) as i64,
            valid,
            checked,
            refusals,
        }
    }
}

/// The API's code for a refusal of `CorrectionDraft::validate`, so a file's report and an
/// HTTP answer name the same problem the same way.
fn invalid_code(e: &flywheel_domain::Invalid) -> &'static str {
    match e.kind {
        flywheel_domain::InvalidKind::Field => "invalid_field",
        flywheel_domain::InvalidKind::UnknownLabel => "unknown_label",
        flywheel_domain::InvalidKind::TooLong => "text_too_long",
    }
}

/// Writes `rows` of text as a Parquet file with the columns `header` (snappy-compressed, one
/// row group), as a log shipper would: for tests, demos and trying a source out.
pub fn write_parquet(
    path: &std::path::Path,
    header: &[&str],
    rows: &[Vec<String>],
) -> Result<(), parquet::errors::ParquetError> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let columns: Vec<String> = header
        .iter()
        .map(|h| format!("required binary {h} (UTF8);"))
        .collect();
    let schema = parquet::schema::parser::parse_message_type(&format!(
        "message corrections {{ {} }}",
        columns.join(" ")
    ))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path)?;
    let mut writer =
        SerializedFileWriter::new(file, std::sync::Arc::new(schema), properties.into())?;
    let mut group = writer.next_row_group()?;
    for i in 0..header.len() {
        let values: Vec<ByteArray> = rows
            .iter()
            .map(|r| ByteArray::from(r.get(i).map_or("", String::as_str)))
            .collect();
        let mut column = group.next_column()?.expect("one writer per schema column");
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)?;
        column.close()?;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}

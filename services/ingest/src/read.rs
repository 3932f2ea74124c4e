//! Reading a downloaded file (JSONL, CSV or Parquet) into chunks of records, on a blocking
//! thread, resuming after the records a crashed reader already stored. Each record is a JSON
//! object for `mapping::draft`, with where it stands in the file (`{"line": n}` or
//! `{"row": n}`) for error reports.

use std::io::BufRead;
use std::path::Path;

use flywheel_domain::{FileFormat, Mapping};
use serde_json::{Value, json};

use crate::mapping::RowError;

/// One record read: where it stands, and its fields (or why it has none).
pub(crate) struct Record {
    pub at: Value,
    pub fields: Result<Value, RowError>,
}

/// Records read together and committed together. `end` is the file position after them (records
/// and blank lines read from the start), stored with them so a resumed reader skips that many.
pub(crate) struct Chunk {
    pub records: Vec<Record>,
    pub end: u64,
    /// Nothing follows: committing this chunk finishes the file.
    pub last: bool,
}

pub(crate) enum Msg {
    Chunk(Chunk),
    /// The file cannot be read on from here (not a Parquet file, a CSV without the mapped
    /// columns, a read error); what came before was sent.
    Broken(String),
}

/// One step through a file: a record, a position with no record (a blank line), or the end
/// of what can be read.
type Step = Result<Option<Record>, String>;

/// Reads `path` from position `start` and hands `sink` its chunks of `chunk_rows` records;
/// stops early when `sink` says it takes no more. A decoder that panics (on a file crafted or
/// damaged in a way it did not foresee) breaks the file like any unreadable one, so the
/// worker quarantines it instead of failing on it at every poll. Runs on a blocking thread.
pub(crate) fn read_file(
    path: &Path,
    format: FileFormat,
    mapping: &Mapping,
    max_line_bytes: usize,
    start: u64,
    chunk_rows: usize,
    sink: &mut dyn FnMut(Msg) -> bool,
) {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_chunks(
            path,
            format,
            mapping,
            max_line_bytes,
            start,
            chunk_rows,
            sink,
        )
    }));
    if let Err(panic) = read {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        sink(Msg::Broken(format!("the file could not be decoded: {why}")));
    }
}

fn read_chunks(
    path: &Path,
    format: FileFormat,
    mapping: &Mapping,
    max_line_bytes: usize,
    start: u64,
    chunk_rows: usize,
    sink: &mut dyn FnMut(Msg) -> bool,
) {
    let steps: Box<dyn Iterator<Item = Step>> = match open(path, format, mapping, max_line_bytes) {
        Ok(steps) => steps,
        Err(why) => {
            sink(Msg::Broken(why));
            return;
        }
    };
    let mut position = 0u64;
    let mut records = Vec::new();
    // A full chunk waits until the next one starts, so the one sent last knows it is last.
    let mut held: Option<Chunk> = None;
    for step in steps {
        match step {
            Ok(record) => {
                position += 1;
                if position <= start {
                    continue;
                }
                records.extend(record);
                if records.len() >= chunk_rows {
                    let full = Chunk {
                        records: std::mem::take(&mut records),
                        end: position,
                        last: false,
                    };
                    if let Some(previous) = held.replace(full)
                        && !sink(Msg::Chunk(previous))
                    {
                        return;
                    }
                }
            }
            Err(why) => {
                let rest = Chunk {
                    records,
                    end: position.max(start),
                    last: false,
                };
                for chunk in held.into_iter().chain(Some(rest)) {
                    if !sink(Msg::Chunk(chunk)) {
                        return;
                    }
                }
                sink(Msg::Broken(why));
                return;
            }
        }
    }
    let end = position.max(start);
    match held {
        Some(mut previous) if records.is_empty() => {
            previous.last = true;
            sink(Msg::Chunk(previous));
        }
        held => {
            if let Some(previous) = held
                && !sink(Msg::Chunk(previous))
            {
                return;
            }
            sink(Msg::Chunk(Chunk {
                records,
                end,
                last: true,
            }));
        }
    }
}

/// A whole file as the worker reads it from its start: each record's place and the draft its
/// fields make under `mapping` (or why none), and why the file broke off, if it did. For the
/// fuzzer and for trying a mapping out.
pub fn read_whole(
    path: &Path,
    format: FileFormat,
    mapping: &Mapping,
    max_line_bytes: usize,
) -> WholeFile {
    let mut whole = WholeFile::default();
    read_file(
        path,
        format,
        mapping,
        max_line_bytes,
        0,
        1_000,
        &mut |msg| {
            match msg {
                Msg::Chunk(chunk) => {
                    for r in chunk.records {
                        let draft = r
                            .fields
                            .and_then(|f| crate::mapping::draft(&f, mapping, r.at.clone()))
                            .map_err(|e| format!("{}: {}", e.code, e.message));
                        whole.records.push((r.at, draft));
                    }
                }
                Msg::Broken(why) => whole.broken = Some(why),
            }
            true
        },
    );
    whole
}

/// What [`read_whole`] read.
#[derive(Debug, Default)]
pub struct WholeFile {
    pub records: Vec<(Value, Result<flywheel_domain::CorrectionDraft, String>)>,
    pub broken: Option<String>,
}

fn open(
    path: &Path,
    format: FileFormat,
    mapping: &Mapping,
    max_line_bytes: usize,
) -> Result<Box<dyn Iterator<Item = Step>>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("opening the downloaded file: {e}"))?;
    match format {
        FileFormat::Jsonl => Ok(Box::new(jsonl(file, max_line_bytes))),
        FileFormat::Csv => csv_rows(file, mapping),
        FileFormat::Parquet => parquet_rows(file, mapping),
    }
}

fn jsonl(file: std::fs::File, max_line_bytes: usize) -> impl Iterator<Item = Step> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut number = 0u64;
    std::iter::from_fn(move || {
        line.clear();
        match read_line(&mut reader, &mut line, max_line_bytes) {
            Ok(0) => None,
            Err(e) => Some(Err(format!("reading line {}: {e}", number + 1))),
            Ok(_) => {
                number += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    return Some(Ok(None));
                }
                let fields = if line.len() > max_line_bytes {
                    Err(RowError::new(
                        "payload_too_large",
                        format!("the line is longer than {max_line_bytes} bytes"),
                    ))
                } else {
                    serde_json::from_slice::<Value>(&line).map_err(|e| {
                        RowError::new("malformed_json", format!("not a JSON object: {e}"))
                    })
                };
                Some(Ok(Some(Record {
                    at: json!({ "line": number }),
                    fields,
                })))
            }
        }
    })
}

/// Reads one line into `line`, keeping at most `max + 1` bytes of it (a file with no line
/// breaks, such as a JSON array dump, must not be held whole) and skipping the rest. Returns
/// the bytes kept; 0 at the end of the file.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    use std::io::Read;
    let kept = reader
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', line)?;
    if line.len() > max && line.last() != Some(&b'\n') {
        loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    reader.consume(end + 1);
                    break;
                }
                None => {
                    let all = buf.len();
                    reader.consume(all);
                }
            }
        }
    }
    Ok(kept)
}

/// Checks that the columns `input` and `expected` are mapped from exist in the file, whose
/// columns are `have`: a file without them is refused whole, not row by row.
fn check_columns(mapping: &Mapping, have: &[String]) -> Result<(), String> {
    for wanted in [&mapping.input, &mapping.expected] {
        let top = wanted.split('.').next().unwrap_or(wanted);
        if !have.iter().any(|h| h == wanted || h == top) {
            return Err(format!(
                "the file has no column `{wanted}` (it has: {})",
                have.join(", ")
            ));
        }
    }
    Ok(())
}

fn csv_rows(
    file: std::fs::File,
    mapping: &Mapping,
) -> Result<Box<dyn Iterator<Item = Step>>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(std::io::BufReader::with_capacity(1 << 20, file));
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("reading the CSV header: {e}"))?
        .iter()
        .map(str::to_owned)
        .collect();
    check_columns(mapping, &headers)?;
    let mut records = reader.into_records();
    Ok(Box::new(std::iter::from_fn(move || {
        let record = records.next()?;
        Some(Ok(Some(match record {
            Ok(r) => Record {
                at: json!({ "line": r.position().map_or(0, csv::Position::line) }),
                fields: Ok(Value::Object(
                    headers
                        .iter()
                        .zip(r.iter())
                        .map(|(h, v)| (h.clone(), Value::String(v.to_owned())))
                        .collect(),
                )),
            },
            Err(e) => Record {
                at: json!({ "line": e.position().map_or(0, csv::Position::line) }),
                fields: Err(RowError::new(
                    "invalid_field",
                    format!("not a CSV record: {e}"),
                )),
            },
        })))
    })))
}

fn parquet_rows(
    file: std::fs::File,
    mapping: &Mapping,
) -> Result<Box<dyn Iterator<Item = Step>>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader =
        SerializedFileReader::new(file).map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    check_columns(mapping, &columns)?;
    let mut number = 0u64;
    Ok(Box::new(reader.into_iter().map(move |row| {
        number += 1;
        let row = row.map_err(|e| format!("reading row {number}: {e}"))?;
        Ok(Some(Record {
            at: json!({ "row": number }),
            fields: Ok(row.to_json_value()),
        }))
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        serde_json::from_value(json!({"input": "text", "expected": "label"})).unwrap()
    }

    /// Everything `read_file` hands its sink for `path` from `start` in chunks of
    /// `chunk_rows`, lines longer than `max_line` refused.
    fn messages(
        path: &Path,
        format: FileFormat,
        mapping: &Mapping,
        max_line: usize,
        start: u64,
        chunk_rows: usize,
    ) -> Vec<Msg> {
        let mut sent = Vec::new();
        read_file(
            path,
            format,
            mapping,
            max_line,
            start,
            chunk_rows,
            &mut |m| {
                sent.push(m);
                true
            },
        );
        sent
    }

    /// The first thing `read_file` hands its sink, which must be a chunk.
    fn first_chunk(
        path: &Path,
        format: FileFormat,
        mapping: &Mapping,
        max_line: usize,
        start: u64,
        chunk_rows: usize,
    ) -> Chunk {
        match messages(path, format, mapping, max_line, start, chunk_rows)
            .into_iter()
            .next()
        {
            Some(Msg::Chunk(chunk)) => chunk,
            _ => panic!("no chunk"),
        }
    }

    /// A chunk as the tests compare it: its records' positions, its end, whether it is last.
    type Seen = (Vec<Value>, u64, bool);

    /// Every chunk of `path` from `start` as [`Seen`], and a broken file's reason.
    fn read(
        path: &Path,
        format: FileFormat,
        start: u64,
        chunk_rows: usize,
    ) -> (Vec<Seen>, Option<String>) {
        let mut chunks = Vec::new();
        let mut broken = None;
        for msg in messages(path, format, &mapping(), 1 << 20, start, chunk_rows) {
            match msg {
                Msg::Chunk(c) => {
                    chunks.push((c.records.into_iter().map(|r| r.at).collect(), c.end, c.last))
                }
                Msg::Broken(why) => broken = Some(why),
            }
        }
        (chunks, broken)
    }

    fn lines(n: u64) -> String {
        (1..=n)
            .map(|i| format!("{{\"text\": \"row {i}\", \"label\": \"a\"}}\n"))
            .collect()
    }

    #[test]
    fn jsonl_chunks_say_where_they_end_and_which_is_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, lines(5) + "\n").unwrap();
        let (chunks, broken) = read(&path, FileFormat::Jsonl, 0, 2);
        assert!(broken.is_none());
        let ends: Vec<(usize, u64, bool)> = chunks
            .iter()
            .map(|(r, end, last)| (r.len(), *end, *last))
            .collect();
        // The blank sixth line moves the position without a record.
        assert_eq!(ends, [(2, 2, false), (2, 4, false), (1, 6, true)]);
        assert_eq!(chunks[2].0, [json!({"line": 5})]);
    }

    #[test]
    fn an_over_long_line_is_one_refused_record_and_the_next_line_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let long = format!(
            "{{\"text\": \"{}\", \"label\": \"a\"}}\n",
            "x".repeat(5_000)
        );
        std::fs::write(&path, long + &lines(1)).unwrap();
        let chunk = first_chunk(&path, FileFormat::Jsonl, &mapping(), 1_000, 0, 10);
        assert_eq!((chunk.end, chunk.last), (2, true));
        assert_eq!(
            chunk.records[0].fields.as_ref().unwrap_err().code,
            "payload_too_large"
        );
        assert_eq!(chunk.records[1].fields.as_ref().unwrap()["text"], "row 1");
    }

    #[test]
    fn a_resumed_read_skips_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, lines(5)).unwrap();
        let (chunks, _) = read(&path, FileFormat::Jsonl, 4, 2);
        assert_eq!(chunks, [(vec![json!({"line": 5})], 5, true)]);
        // Everything was stored: one empty, last chunk finishes the file.
        let (chunks, _) = read(&path, FileFormat::Jsonl, 5, 2);
        assert_eq!(chunks, [(vec![], 5, true)]);
        // A chunk that fills exactly is followed by nothing more: it is the last.
        let (chunks, _) = read(&path, FileFormat::Jsonl, 1, 2);
        let ends: Vec<(u64, bool)> = chunks.iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(ends, [(3, false), (5, true)]);
    }

    #[test]
    fn csv_and_parquet_rows_are_json_objects() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, "text,label\nrow 1,a\n\"row, 2\",b\n").unwrap();
        let chunk = first_chunk(&csv, FileFormat::Csv, &mapping(), 1 << 20, 0, 10);
        let rows: Vec<Value> = chunk
            .records
            .into_iter()
            .map(|r| r.fields.unwrap())
            .collect();
        assert_eq!(
            rows,
            [
                json!({"text": "row 1", "label": "a"}),
                json!({"text": "row, 2", "label": "b"})
            ]
        );

        let parquet = dir.path().join("a.parquet");
        let rows: Vec<Vec<String>> = (1..=5)
            .map(|i| vec![format!("row {i}"), "a".into()])
            .collect();
        crate::write_parquet(&parquet, &["text", "label"], &rows).unwrap();
        let (chunks, broken) = read(&parquet, FileFormat::Parquet, 3, 10);
        assert!(broken.is_none());
        assert_eq!(
            chunks,
            [(vec![json!({"row": 4}), json!({"row": 5})], 5, true)]
        );
    }

    /// A file as pandas writes it (pyarrow: zstd, dictionary-encoded strings with a null, an
    /// int64 column, three row groups): `tests/fixtures/gen_parquet.py` wrote it.
    #[test]
    fn a_file_pyarrow_wrote_reads_as_its_values() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pyarrow.parquet"
        ));
        let mapping: Mapping =
            serde_json::from_value(json!({"input": "question", "expected": "intent"})).unwrap();
        // From the middle of the second row group on.
        let chunk = first_chunk(path, FileFormat::Parquet, &mapping, 1 << 20, 5, 100);
        assert_eq!((chunk.end, chunk.last, chunk.records.len()), (10, true, 5));
        assert_eq!(chunk.records[0].at, json!({"row": 6}));
        assert_eq!(
            chunk.records[0].fields.as_ref().unwrap(),
            &json!({"ticket_id": 1005, "question": "can I get a physical card",
                "intent": "order_physical_card"})
        );
        let third = first_chunk(path, FileFormat::Parquet, &mapping, 1 << 20, 2, 1);
        assert_eq!(
            third.records[0].fields.as_ref().unwrap()["intent"],
            Value::Null
        );
    }

    #[test]
    fn an_unreadable_file_is_broken_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, "question,answer\nq,a\n").unwrap();
        let (chunks, broken) = read(&csv, FileFormat::Csv, 0, 10);
        assert!(chunks.is_empty());
        assert_eq!(
            broken.unwrap(),
            "the file has no column `text` (it has: question, answer)"
        );
        let parquet = dir.path().join("a.parquet");
        std::fs::write(&parquet, b"PAR1 not really").unwrap();
        let (_, broken) = read(&parquet, FileFormat::Parquet, 0, 10);
        assert!(broken.unwrap().starts_with("not a readable Parquet file"));
    }
}

//! A `files` source: list the prefix, and read each file version not read yet, in key order
//! (log shippers name files by time). A file is one unit per version (its ETag, or size and
//! modification time): read once, resumed where a dead reader's last commit left it, and
//! quarantined, never retried, if it cannot be read.

use std::collections::HashMap;
use std::sync::Arc;

use flywheel_domain::{FileFormat, OnChange, SourceSpec};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::{GetOptions, ObjectStore};
use tokio::io::AsyncWriteExt;

use crate::read::{Msg, read_file};
use crate::{Committed, FILE_CHUNK_ROWS, IngestError, Poll, PollReport, Prepared, UnitWriter};

/// What the reader's thread hands the commit loop: a prepared chunk, or why the file broke
/// off.
enum Ready {
    Chunk {
        prepared: Prepared,
        end: u64,
        last: bool,
    },
    Broken(String),
}

/// The store a source's `files` URL names, scoped to its prefix.
fn open(url: &str, source: &SourceSpec) -> Result<Arc<dyn ObjectStore>, IngestError> {
    if let Some(dir) = flywheel_registry::local_path(url) {
        if !std::path::Path::new(dir).is_dir() {
            return Err(IngestError::Store(format!(
                "{dir} is not a directory this worker can read"
            )));
        }
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| IngestError::Store(format!("{dir}: {e}")))?;
        return Ok(Arc::new(store));
    }
    let options: Vec<(String, String)> = source
        .options
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let (store, _) =
        flywheel_registry::remote(url, &options).map_err(|e| IngestError::Store(e.to_string()))?;
    Ok(store)
}

/// Files a shipper is not done with, or that are not data: hidden and `_SUCCESS`-style names.
fn is_data(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    !(name.starts_with('.') || name.starts_with('_'))
}

pub(crate) async fn poll(poll: &Poll<'_>, url: &str) -> Result<PollReport, IngestError> {
    let (ingestor, domain, source) = (poll.ingestor, poll.domain, poll.source);
    let store = open(url, source)?;
    let mut listed: Vec<object_store::ObjectMeta> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| IngestError::Store(format!("listing {url}: {e}")))?;
    listed.retain(|m| is_data(m.location.as_ref()));
    listed.sort_by(|a, b| a.location.cmp(&b.location));
    let mut known: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (key, version, state) in ingestor.db.known_files(domain.id, &source.name).await? {
        known.entry(key).or_default().push((version, state));
    }
    let prefix = source.files_prefix().unwrap_or(url);
    let mut report = PollReport {
        caught_up: true,
        ..PollReport::default()
    };
    for meta in listed {
        let Some(format) = source
            .format
            .or_else(|| FileFormat::of_name(meta.location.as_ref()))
        else {
            continue;
        };
        // The unit is named by the file's whole URL: a source pointed at another prefix
        // starts afresh instead of finding its files "changed".
        let key = format!("{prefix}/{}", meta.location);
        let version = meta
            .e_tag
            .clone()
            .unwrap_or_else(|| format!("{}-{}", meta.size, meta.last_modified.timestamp_millis()));
        let versions = known.get(&key);
        let seen = versions.and_then(|v| v.iter().find(|(v, _)| *v == version));
        let reread = source.on_change == OnChange::Reread;
        match seen.map(|(_, state)| state.as_str()) {
            None | Some("reading") => {}
            // Left alone while the source said so; read now that it says `reread`.
            Some("changed") if reread => {}
            Some(_) => continue,
        }
        if !poll.may_go_on().await? {
            report.caught_up = false;
            break;
        }
        let size = i64::try_from(meta.size).unwrap_or(i64::MAX);
        if seen.is_none() && versions.is_some() && !reread {
            let unit = ingestor
                .db
                .ingest_unit(domain.id, &source.name, &key, &version, size, "0")
                .await?;
            UnitWriter::new(poll, unit)
                .end(
                    "changed",
                    "the file changed after it was read (a new ETag or size); it was left \
                     alone: set the source's on_change to `reread` to read changed files again"
                        .into(),
                )
                .await?;
            continue;
        }
        // The version listed, or none: a file rewritten since the listing is the next poll's.
        let options = GetOptions::new().with_if_match(meta.e_tag.clone());
        let body = match store.get_opts(&meta.location, options).await {
            Ok(body) => body,
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                report.caught_up = false;
                continue;
            }
            Err(e) => {
                return Err(IngestError::Store(format!("reading {key}: {e}")));
            }
        };
        let unit = ingestor
            .db
            .ingest_unit(domain.id, &source.name, &key, &version, size, "0")
            .await?;
        let unit = if unit.state == "changed" {
            ingestor.db.reopen_unit(unit.id).await?
        } else {
            unit
        };
        let mut writer = UnitWriter::new(poll, unit);
        let read = read_one(poll, body, format, &mut writer).await;
        writer.close().await;
        match read? {
            Committed::Stored => report.units += 1,
            Committed::TakenOver => {
                report.caught_up = false;
                break;
            }
        }
    }
    Ok(report)
}

/// Downloads one file into scratch and stores its rows chunk by chunk from where its unit
/// stands.
async fn read_one(
    poll: &Poll<'_>,
    body: object_store::GetResult,
    format: FileFormat,
    writer: &mut UnitWriter<'_>,
) -> Result<Committed, IngestError> {
    let scratch = &poll.ingestor.scratch;
    let io = |error| IngestError::Io {
        path: scratch.clone(),
        error,
    };
    tokio::fs::create_dir_all(scratch).await.map_err(io)?;
    let copy = tempfile::NamedTempFile::new_in(scratch).map_err(io)?;
    {
        let mut out = tokio::fs::File::from_std(copy.reopen().map_err(io)?);
        let failed = |e: object_store::Error| {
            IngestError::Store(format!("reading {}: {e}", writer.unit.unit))
        };
        let mut body = body.into_stream();
        while let Some(bytes) = body.try_next().await.map_err(failed)? {
            out.write_all(&bytes).await.map_err(io)?;
        }
        out.flush().await.map_err(io)?;
    }
    // A download longer than the lease may have lost the claim meanwhile.
    if !poll.may_go_on().await? {
        return Ok(Committed::TakenOver);
    }
    let start: u64 = writer.unit.position.parse().unwrap_or(0);
    let (send, mut chunks) = tokio::sync::mpsc::channel(2);
    let path = copy.path().to_owned();
    let mapping = writer.source.mapping.clone();
    let preparer = writer.preparer();
    // A line holds one correction: its texts plus JSON overhead, as the HTTP path allows.
    let max_line = poll.ingestor.max_text_chars * 3 * 4 + 64 * 1024;
    // Reading, parsing, validating and redacting happen on this thread, a chunk ahead of the
    // commit: the two overlap.
    let reader = tokio::task::spawn_blocking(move || {
        read_file(
            &path,
            format,
            &mapping,
            max_line,
            start,
            FILE_CHUNK_ROWS,
            &mut |msg| {
                let ready = match msg {
                    Msg::Chunk(chunk) => Ready::Chunk {
                        prepared: preparer.prepare(
                            chunk
                                .records
                                .into_iter()
                                .map(|r| (r.at, r.fields))
                                .collect(),
                        ),
                        end: chunk.end,
                        last: chunk.last,
                    },
                    Msg::Broken(why) => Ready::Broken(why),
                };
                send.blocking_send(ready).is_ok()
            },
        );
    });
    let mut outcome = Committed::Stored;
    let mut ended = false;
    while let Some(ready) = chunks.recv().await {
        match ready {
            Ready::Chunk {
                prepared,
                end,
                last,
            } => {
                ended = last;
                outcome = writer.commit(prepared, end.to_string(), last).await?;
                if outcome == Committed::TakenOver {
                    break;
                }
            }
            Ready::Broken(why) => {
                writer.end("quarantined", why).await?;
                ended = true;
                break;
            }
        }
    }
    drop(chunks);
    // The reader turns a decoder's panic into a broken file; a reader that died anyway (out
    // of memory, say) would die the same way on every poll: the file is quarantined.
    if let Err(e) = reader.await
        && !ended
        && outcome == Committed::Stored
    {
        writer
            .end("quarantined", format!("the file could not be read: {e}"))
            .await?;
    }
    drop(copy);
    Ok(outcome)
}

//! `flywheel backup` and `flywheel restore`: the embedded database to a file or an object
//! store and back. The copy itself and the checks on a backup are `flywheel_db::backup`'s;
//! this module moves files and names them. Models need no backup here: the registry is their
//! system of record (keep its bucket versioned).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use flywheel_db::DatabaseUrl;
use futures::StreamExt as _;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt as _, WriteMultipart};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::Config;

const CHUNK: usize = 8 * 1024 * 1024;

/// Copies the instance's SQLite database, while it runs, to `to` (a new file or object);
/// returns the backup's size in bytes.
pub async fn backup(config: &Config, to: &str) -> anyhow::Result<u64> {
    let database = sqlite_path(config, "pg_dump")?;
    match flywheel_registry::local_path(to) {
        Some(file) => {
            let parent = Path::new(file)
                .parent()
                .filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent.filter(|d| !d.is_dir()) {
                bail!("{}: no such directory; create it first", dir.display());
            }
            flywheel_db::backup::backup_sqlite(&database, Path::new(file)).await?;
            Ok(std::fs::metadata(file)?.len())
        }
        None => {
            let (store, key) = object(to)?;
            if store.head(&key).await.is_ok() {
                bail!("{to} exists; a backup never overwrites an object");
            }
            let staged = scratch(&database, "backup");
            let result = async {
                flywheel_db::backup::backup_sqlite(&database, &staged).await?;
                upload(&*store, &staged, &key)
                    .await
                    .with_context(|| format!("uploading to {to}"))
            }
            .await;
            let _ = std::fs::remove_file(&staged);
            result
        }
    }
}

/// Puts the backup `from` in place of the instance's SQLite database, after checking it is a
/// whole flywheel database this build can run; an existing database is refused unless
/// `force`, and then kept beside, renamed. Returns what was restored, in words.
pub async fn restore(config: &Config, from: &str, force: bool) -> anyhow::Result<String> {
    let database = sqlite_path(config, "pg_restore")?;
    let dir = database
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // The backup is fetched beside the database (for an atomic rename) and checked before
    // anything else is decided; a bad one leaves no trace.
    let created_dir = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = scratch(&database, "restore");
    let checked = async {
        match flywheel_registry::local_path(from) {
            Some(file) => tokio::fs::copy(file, &staged)
                .await
                .map(drop)
                .with_context(|| format!("reading {file}"))?,
            None => download(from, &staged).await?,
        }
        flywheel_db::backup::check_sqlite_backup(&staged)
            .await
            .with_context(|| format!("{from} cannot be restored"))
    }
    .await;
    let summary = match checked {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            if created_dir {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    let swapped = swap_in(&database, &staged, force);
    if swapped.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    let kept = match swapped? {
        Some(aside) => format!("; the database it replaced is {}", aside.display()),
        None => String::new(),
    };
    let plural = |n: i64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    Ok(format!(
        "restored {from} into {}: schema {}, {}, {}, {}{kept}",
        database.display(),
        summary.schema_version,
        plural(summary.domains, "domain", "domains"),
        plural(summary.corrections, "correction", "corrections"),
        plural(summary.versions, "version", "versions"),
    ))
}

/// Renames `staged` into `database`'s place, moving an existing database (and its WAL)
/// aside when `force`; returns where it went. Refused while any flywheel process of the
/// instance holds it open.
fn swap_in(database: &Path, staged: &Path, force: bool) -> anyhow::Result<Option<PathBuf>> {
    let lock = std::fs::File::create(lock_path(database))
        .with_context(|| format!("creating {}", lock_path(database).display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "a flywheel process is running on {}: stop every flywheel process of this \
             instance, then restore",
            database.display()
        );
    }
    if !database.exists() {
        std::fs::rename(staged, database)
            .with_context(|| format!("moving the backup into {}", database.display()))?;
        return Ok(None);
    }
    if !force {
        bail!(
            "{} exists: pass --force to replace it (it is kept beside, renamed)",
            database.display()
        );
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let aside = PathBuf::from(format!("{}.replaced-{stamp}", database.display()));
    // The WAL and its index belong to the old file: left in place they would be replayed
    // into the restored one.
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", database.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} aside", from.display()))?;
        }
    }
    std::fs::rename(staged, database)
        .with_context(|| format!("moving the backup into {}", database.display()))?;
    Ok(Some(aside))
}

/// Takes the instance lock of the SQLite database at `database` shared, for as long as the
/// returned file lives: every running flywheel process holds it, and `restore` takes it
/// exclusively, so a database is never replaced under a running server.
pub fn hold_shared(database: &Path) -> anyhow::Result<std::fs::File> {
    let path = lock_path(database);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let lock =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    lock.try_lock_shared().map_err(|_| {
        anyhow::anyhow!(
            "{} is being restored; start flywheel when the restore has finished",
            database.display()
        )
    })?;
    Ok(lock)
}

fn lock_path(database: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", database.display()))
}

/// The instance's SQLite file, or an error naming PostgreSQL's own tool.
fn sqlite_path(config: &Config, postgres_tool: &str) -> anyhow::Result<PathBuf> {
    match config.database() {
        DatabaseUrl::Sqlite(path) => Ok(path),
        DatabaseUrl::Postgres(_) => {
            bail!("the database is PostgreSQL: use {postgres_tool} (README: Backups and upgrades)")
        }
    }
}

/// A file beside the database for a copy in transit (same filesystem, so the rename into
/// place is atomic).
fn scratch(database: &Path, what: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}.{what}-{}.tmp",
        database.display(),
        std::process::id()
    ))
}

/// The store and key an object URL names (`s3://bucket/dir/file.db`).
fn object(url: &str) -> anyhow::Result<(std::sync::Arc<dyn ObjectStore>, ObjPath)> {
    let (parent, name) = url
        .trim_end_matches('/')
        .rsplit_once('/')
        .filter(|(parent, name)| {
            !name.is_empty()
                && parent.contains("://")
                && !parent.ends_with(':')
                && !parent.ends_with("//")
        })
        .with_context(|| format!("{url}: name the object, e.g. s3://bucket/backups/flywheel.db"))?;
    let (store, _) = flywheel_registry::remote(parent, &[])?;
    Ok((store, ObjPath::from(name)))
}

async fn upload(store: &dyn ObjectStore, file: &Path, key: &ObjPath) -> anyhow::Result<u64> {
    let mut reader = tokio::fs::File::open(file).await?;
    let mut upload = WriteMultipart::new_with_chunk_size(store.put_multipart(key).await?, CHUNK);
    let mut buf = vec![0; CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        upload.wait_for_capacity(4).await?;
        upload.write(&buf[..n]);
        total += n as u64;
    }
    upload.finish().await?;
    Ok(total)
}

async fn download(url: &str, to: &Path) -> anyhow::Result<()> {
    let (store, key) = object(url)?;
    let mut stream = store
        .get(&key)
        .await
        .with_context(|| format!("reading {url}"))?
        .into_stream();
    let mut file = tokio::fs::File::create(to).await?;
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk.with_context(|| format!("reading {url}"))?)
            .await?;
    }
    file.sync_all().await?;
    Ok(())
}

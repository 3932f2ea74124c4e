//! The model registry on an object store: immutable versions and movable aliases.
//!
//! Layout under the store's root:
//! - `domains/<d>/versions/<v>/<file>`: a version's files, written create-only; `manifest.json`
//!   (sha256 of every other file, lineage) is written last, so a version without a manifest is
//!   incomplete and never served.
//! - `domains/<d>/aliases/<alias>/<generation>.json`: the alias's history, one create-only
//!   object per move. Creating generation `n+1` is the compare-and-swap: of two promoters that
//!   read generation `n`, exactly one creates `n+1`, on any store with create-only puts (local
//!   disk included, which has no conditional overwrite).
//! - `domains/<d>/aliases/<alias>.json`: a copy of the latest move, for readers that want one
//!   object; the history is the truth.
//! - `models/<sha256>/<file>`: base models, content-addressed (see [`models`]).
//! - `jobs/<id>/<file>`: a job's intermediate artifacts, so that its stages can run on
//!   different machines; deleted when the job publishes.
//!
//! Every create-only put is a conditional write (`If-None-Match: *` on S3, `O_EXCL` on local
//! disk). Where a store has no conditional writes, [`Registry::open`] with
//! `conditional_writes = false` falls back to check-then-put, which is only safe with a single
//! writer: see the README's registry section.
//!
//! This crate knows object paths and bytes. It knows nothing of HTTP, SQL or burn.

pub mod models;
mod store;

pub use models::{MODEL_REF_PREFIX, ModelManifest, parse_model_ref};
pub use store::{CONDITIONAL_WRITES, local_path, remote};

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use flywheel_domain::{DomainName, VersionId};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("version {domain}/{version} already exists")]
    VersionExists { domain: String, version: String },
    #[error("version {domain}/{version} does not exist or is incomplete")]
    NoSuchVersion { domain: String, version: String },
    #[error(
        "alias `{alias}` moved concurrently: expected {}, found {}",
        expected.as_deref().unwrap_or("it unset"),
        actual.as_deref().unwrap_or("it unset")
    )]
    AliasConflict {
        alias: String,
        expected: Option<String>,
        actual: Option<String>,
    },
    #[error("{path}: checksum mismatch (manifest says {expected}, object has {actual})")]
    Corrupt {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
    #[error("local path {0}: {1}")]
    Local(String, std::io::Error),
    #[error("registry location `{location}`: {message}")]
    Config { location: String, message: String },
    #[error("no base model {0} in the registry (import it with `flywheel models import <dir>`)")]
    NoSuchModel(String),
}

impl RegistryError {
    /// A file the manifest lists is not in the store: as corrupt as a wrong checksum.
    fn missing(path: &ObjPath, entry: &FileEntry) -> Self {
        RegistryError::Corrupt {
            path: path.to_string(),
            expected: entry.sha256.clone(),
            actual: "nothing (the object is missing)".into(),
        }
    }

    /// Whether trying again later may succeed: the store could not be reached or answered
    /// with a server-side error. A missing, corrupt or conflicting object never is.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Store(object_store::Error::Generic { .. }) | RegistryError::Local(_, _)
        )
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// One file of a version, as listed in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What a version is and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub domain: String,
    pub version: String,
    pub created_at: DateTime<Utc>,
    pub files: Vec<FileEntry>,
    /// Free-form lineage: base model and its hash, dataset snapshot hash and size,
    /// hyperparameters, gate decision, code version.
    pub lineage: serde_json::Value,
}

/// One move of an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasMove {
    pub generation: u64,
    pub alias: String,
    pub from: Option<String>,
    pub to: String,
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct Registry {
    store: Arc<dyn ObjectStore>,
    /// The URL the store's root answers to (`s3://bucket/prefix`, `file:///srv/registry`), for
    /// handing serving fleets addresses they can fetch.
    base_url: String,
    /// Where a local-filesystem registry lives, for printing paths people can open.
    local_root: Option<std::path::PathBuf>,
    /// Whether the store honours create-only puts; see the crate docs.
    conditional_writes: bool,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Registry {
    /// A registry in a local directory (created if missing).
    pub fn local(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root)
            .map_err(|e| RegistryError::Local(root.display().to_string(), e))?;
        let root = root
            .canonicalize()
            .map_err(|e| RegistryError::Local(root.display().to_string(), e))?;
        let store = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Self {
            store: Arc::new(store),
            base_url: format!("file://{}", root.display()),
            local_root: Some(root),
            conditional_writes: true,
        })
    }

    /// Opens the registry at `location`: a local path or `file://` URL, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`. Credentials and endpoints come from the
    /// store's usual environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`, `GOOGLE_…`, `AZURE_…`),
    /// then from `options` (object_store's config keys, e.g. `aws_endpoint`), which win.
    pub fn open(location: &str, options: &[(String, String)]) -> Result<Self> {
        store::open(location, options)
    }

    /// The store's URL for one of a version's files, for readers outside flywheel.
    pub fn file_url(&self, domain: &DomainName, version: &VersionId, file: &str) -> String {
        format!(
            "{}/{}/{file}",
            self.base_url,
            Self::version_dir(domain, version)
        )
    }

    /// The registry's own address.
    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// A create-only put. `Ok(false)` when the object already exists.
    async fn create(&self, path: &ObjPath, bytes: Vec<u8>) -> Result<bool> {
        if !self.conditional_writes {
            // Check-then-put: racy between writers, which is why it is opt-in.
            return match self.store.head(path).await {
                Ok(_) => Ok(false),
                Err(object_store::Error::NotFound { .. }) => {
                    self.store.put(path, PutPayload::from(bytes)).await?;
                    Ok(true)
                }
                Err(e) => Err(e.into()),
            };
        }
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), create)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e @ object_store::Error::NotImplemented { .. }) => Err(RegistryError::Config {
                location: self.base_url.clone(),
                message: format!(
                    "the store refuses conditional writes ({e}); enable them \
                     (S3: aws_conditional_put=etag) or set FLYWHEEL_REGISTRY_CONDITIONAL_WRITES=false \
                     and run a single writer"
                ),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn version_dir(domain: &DomainName, version: &VersionId) -> String {
        format!("domains/{domain}/versions/{version}")
    }

    /// Where a version's file is, as a local path when the registry is on local disk, else as
    /// its object key.
    pub fn locate(&self, domain: &DomainName, version: &VersionId, file: &str) -> String {
        let key = format!("{}/{file}", Self::version_dir(domain, version));
        match &self.local_root {
            Some(root) => root.join(key).display().to_string(),
            None => key,
        }
    }

    /// Publishes a version: every file create-only, then the manifest. Fails if the version
    /// already exists; never overwrites.
    pub async fn publish(
        &self,
        domain: &DomainName,
        version: &VersionId,
        files: Vec<(String, Vec<u8>)>,
        lineage: serde_json::Value,
    ) -> Result<Manifest> {
        let dir = Self::version_dir(domain, version);
        let exists = || RegistryError::VersionExists {
            domain: domain.to_string(),
            version: version.to_string(),
        };
        let mut entries = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            entries.push(FileEntry {
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                name: name.clone(),
            });
            let path = ObjPath::from(format!("{dir}/{name}"));
            if !self.create(&path, bytes).await? {
                return Err(exists());
            }
        }
        let manifest = Manifest {
            schema_version: 1,
            domain: domain.to_string(),
            version: version.to_string(),
            created_at: Utc::now(),
            files: entries,
            lineage,
        };
        let raw = serde_json::to_vec_pretty(&manifest).expect("json");
        let path = ObjPath::from(format!("{dir}/{MANIFEST}"));
        if !self.create(&path, raw).await? {
            return Err(exists());
        }
        Ok(manifest)
    }

    pub async fn manifest(&self, domain: &DomainName, version: &VersionId) -> Result<Manifest> {
        let path = ObjPath::from(format!("{}/{MANIFEST}", Self::version_dir(domain, version)));
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RegistryError::NoSuchVersion {
                    domain: domain.to_string(),
                    version: version.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Malformed {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads one file of a version, verified against the manifest's checksum.
    pub async fn read_file(
        &self,
        domain: &DomainName,
        version: &VersionId,
        name: &str,
    ) -> Result<Vec<u8>> {
        let manifest = self.manifest(domain, version).await?;
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| RegistryError::NoSuchVersion {
                domain: domain.to_string(),
                version: format!("{version} (no file {name})"),
            })?;
        self.read_verified(domain, version, entry).await
    }

    async fn read_verified(
        &self,
        domain: &DomainName,
        version: &VersionId,
        entry: &FileEntry,
    ) -> Result<Vec<u8>> {
        let path = ObjPath::from(format!(
            "{}/{}",
            Self::version_dir(domain, version),
            entry.name
        ));
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await?.to_vec(),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RegistryError::missing(&path, entry));
            }
            Err(e) => return Err(e.into()),
        };
        let actual = sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(RegistryError::Corrupt {
                path: path.to_string(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Copies every file of a version into `dir`, verifying each.
    pub async fn download(
        &self,
        domain: &DomainName,
        version: &VersionId,
        dir: &Path,
    ) -> Result<Manifest> {
        let manifest = self.manifest(domain, version).await?;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| RegistryError::Local(dir.display().to_string(), e))?;
        for entry in &manifest.files {
            let bytes = self.read_verified(domain, version, entry).await?;
            let target = dir.join(&entry.name);
            tokio::fs::write(&target, bytes)
                .await
                .map_err(|e| RegistryError::Local(target.display().to_string(), e))?;
        }
        Ok(manifest)
    }

    /// A local copy of a version at `dir`, downloaded (each file verified) unless a complete
    /// copy is there already. The copy is made beside `dir` and renamed into place whole, so
    /// two fetchers at once (serving and the evaluate stage, say) never read a half-written
    /// file: the first rename wins and the other copy is dropped.
    pub async fn fetch_version(
        &self,
        domain: &DomainName,
        version: &VersionId,
        dir: &Path,
    ) -> Result<()> {
        let local = |path: &Path, e| RegistryError::Local(path.display().to_string(), e);
        if tokio::fs::try_exists(dir.join(MANIFEST))
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        let name = dir
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy());
        let part = dir.with_file_name(format!(".{name}.part-{}", uuid::Uuid::new_v4().simple()));
        let manifest = self.download(domain, version, &part).await?;
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest is JSON");
        let marker = part.join(MANIFEST);
        tokio::fs::write(&marker, bytes)
            .await
            .map_err(|e| local(&marker, e))?;
        // A directory without its manifest is what a copy interrupted before copies were made
        // whole left behind.
        if !tokio::fs::try_exists(dir.join(MANIFEST))
            .await
            .unwrap_or(false)
        {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        let renamed = tokio::fs::rename(&part, dir).await;
        if renamed.is_err() {
            let _ = tokio::fs::remove_dir_all(&part).await;
            if !tokio::fs::try_exists(dir.join(MANIFEST))
                .await
                .unwrap_or(false)
            {
                return renamed.map_err(|e| local(dir, e));
            }
        }
        Ok(())
    }

    fn stage_key(job: &str, file: &str) -> ObjPath {
        ObjPath::from(format!("jobs/{job}/{file}"))
    }

    /// Uploads a job's intermediate files (everything under `dir`, by relative path) to
    /// `jobs/<job>/`, so that a later stage on another machine can pick them up. Overwrites:
    /// a retried stage replaces what its failed attempt left.
    pub async fn stage_files(&self, job: &str, dir: &Path) -> Result<()> {
        let mut pending = vec![dir.to_path_buf()];
        while let Some(current) = pending.pop() {
            let local = |e| RegistryError::Local(current.display().to_string(), e);
            for entry in std::fs::read_dir(&current).map_err(local)? {
                let path = entry.map_err(local)?.path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let relative = path.strip_prefix(dir).expect("under dir");
                    self.stage_file(job, &relative.to_string_lossy(), &path)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Uploads one intermediate file of `job` as `jobs/<job>/<relative>`.
    pub async fn stage_file(&self, job: &str, relative: &str, path: &Path) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(|e| RegistryError::Local(path.display().to_string(), e))?;
        self.store
            .put(&Self::stage_key(job, relative), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Downloads every staged file of `job` that `dir` lacks, at its relative path.
    pub async fn fetch_staged(&self, job: &str, dir: &Path) -> Result<()> {
        self.fetch_staged_under(job, "", dir).await
    }

    /// Like [`fetch_staged`](Self::fetch_staged) for the staged files under `relative` only,
    /// into `dir` (which stands for `relative`).
    pub async fn fetch_staged_under(&self, job: &str, relative: &str, dir: &Path) -> Result<()> {
        let prefix = ObjPath::from(
            format!("jobs/{job}/{relative}")
                .trim_end_matches('/')
                .to_owned(),
        );
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for meta in metas {
            let Some(relative) = meta.location.prefix_match(&prefix) else {
                continue;
            };
            let relative: Vec<_> = relative.map(|p| p.as_ref().to_owned()).collect();
            let target = relative.iter().fold(dir.to_path_buf(), |p, c| p.join(c));
            if target.exists() {
                continue;
            }
            let local = |e| RegistryError::Local(target.display().to_string(), e);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(local)?;
            }
            let bytes = self.store.get(&meta.location).await?.bytes().await?;
            std::fs::write(&target, bytes).map_err(local)?;
        }
        Ok(())
    }

    /// Deletes a job's staged files once they are published (or the job is abandoned).
    pub async fn drop_staged(&self, job: &str) -> Result<()> {
        self.drop_staged_under(job, "").await
    }

    /// Deletes the staged files of `job` under `relative` (a directory, e.g. an old checkpoint).
    pub async fn drop_staged_under(&self, job: &str, relative: &str) -> Result<()> {
        let prefix = ObjPath::from(
            format!("jobs/{job}/{relative}")
                .trim_end_matches('/')
                .to_owned(),
        );
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for meta in metas {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn alias_dir(domain: &DomainName, alias: &str) -> String {
        format!("domains/{domain}/aliases/{alias}")
    }

    /// Every move of an alias, oldest first.
    pub async fn alias_history(&self, domain: &DomainName, alias: &str) -> Result<Vec<AliasMove>> {
        let prefix = ObjPath::from(Self::alias_dir(domain, alias));
        let mut metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        metas.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        let mut moves = Vec::with_capacity(metas.len());
        for meta in metas {
            let bytes = self.store.get(&meta.location).await?.bytes().await?;
            moves.push(
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Malformed {
                    path: meta.location.to_string(),
                    message: e.to_string(),
                })?,
            );
        }
        Ok(moves)
    }

    /// The version an alias points at now, if it was ever set: the newest generation, read
    /// alone (serving asks this every second per resident model).
    pub async fn resolve(&self, domain: &DomainName, alias: &str) -> Result<Option<AliasMove>> {
        let prefix = ObjPath::from(Self::alias_dir(domain, alias));
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let Some(newest) = metas
            .into_iter()
            .max_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()))
        else {
            return Ok(None);
        };
        let bytes = self.store.get(&newest.location).await?.bytes().await?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Malformed {
                path: newest.location.to_string(),
                message: e.to_string(),
            })
    }

    /// Moves `alias` from `expected` to `to`, failing with [`RegistryError::AliasConflict`] if
    /// it no longer points at `expected`, or if another mover wins the race.
    pub async fn move_alias(
        &self,
        domain: &DomainName,
        alias: &str,
        expected: Option<&VersionId>,
        to: &VersionId,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove> {
        // The target must be a complete version.
        self.manifest(domain, to).await?;
        let current = self.resolve(domain, alias).await?;
        let actual = current.as_ref().map(|m| m.to.clone());
        let conflict = |actual: Option<String>| RegistryError::AliasConflict {
            alias: alias.to_owned(),
            expected: expected.map(|v| v.to_string()),
            actual,
        };
        if actual.as_deref() != expected.map(VersionId::as_str) {
            return Err(conflict(actual));
        }
        let generation = current.map_or(1, |m| m.generation + 1);
        let mv = AliasMove {
            generation,
            alias: alias.to_owned(),
            from: actual,
            to: to.to_string(),
            by: by.to_owned(),
            reason: reason.to_owned(),
            at: Utc::now(),
        };
        let raw = serde_json::to_vec_pretty(&mv).expect("json");
        // Zero-padded so that lexical order is generation order.
        let path = ObjPath::from(format!(
            "{}/{generation:020}.json",
            Self::alias_dir(domain, alias)
        ));
        if !self.create(&path, raw.clone()).await? {
            let now = self.resolve(domain, alias).await?.map(|m| m.to);
            return Err(conflict(now));
        }
        let pointer = ObjPath::from(format!("domains/{domain}/aliases/{alias}.json"));
        self.store.put(&pointer, PutPayload::from(raw)).await?;
        Ok(mv)
    }
}

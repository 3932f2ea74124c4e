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
//!
//! This crate knows object paths and bytes. It knows nothing of HTTP, SQL or burn.

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
    #[error("alias `{alias}` moved concurrently: expected {expected:?}, found {actual:?}")]
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
    /// Where a local-filesystem registry lives, for printing paths people can open.
    local_root: Option<std::path::PathBuf>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Registry {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            local_root: None,
        }
    }

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
            local_root: Some(root),
        })
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
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let exists = |_| RegistryError::VersionExists {
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
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes), create())
                .await
            {
                Err(object_store::Error::AlreadyExists { .. }) => return Err(exists(())),
                other => other?,
            };
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
        match self
            .store
            .put_opts(&path, PutPayload::from(raw), create())
            .await
        {
            Err(object_store::Error::AlreadyExists { .. }) => return Err(exists(())),
            other => other?,
        };
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
        let bytes = self.store.get(&path).await?.bytes().await?.to_vec();
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

    /// The version an alias points at now, if it was ever set.
    pub async fn resolve(&self, domain: &DomainName, alias: &str) -> Result<Option<AliasMove>> {
        Ok(self.alias_history(domain, alias).await?.pop())
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
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(raw.clone()), create)
            .await
        {
            Err(object_store::Error::AlreadyExists { .. }) => {
                let now = self.resolve(domain, alias).await?.map(|m| m.to);
                return Err(conflict(now));
            }
            other => other?,
        };
        let pointer = ObjPath::from(format!("domains/{domain}/aliases/{alias}.json"));
        self.store.put(&pointer, PutPayload::from(raw)).await?;
        Ok(mv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> DomainName {
        DomainName::parse("banking").unwrap()
    }

    async fn registry_with_versions(n: u64) -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::local(dir.path()).unwrap();
        for i in 1..=n {
            reg.publish(
                &d(),
                &VersionId::nth(i),
                vec![("a.bin".into(), vec![i as u8; 4])],
                serde_json::json!({}),
            )
            .await
            .unwrap();
        }
        (dir, reg)
    }

    #[tokio::test]
    async fn versions_are_immutable_and_verified() {
        let (dir, reg) = registry_with_versions(1).await;
        let again = reg
            .publish(
                &d(),
                &VersionId::nth(1),
                vec![("a.bin".into(), vec![9])],
                serde_json::json!({}),
            )
            .await;
        assert!(matches!(again, Err(RegistryError::VersionExists { .. })));
        assert_eq!(
            reg.read_file(&d(), &VersionId::nth(1), "a.bin")
                .await
                .unwrap(),
            vec![1; 4]
        );
        std::fs::write(
            dir.path().join("domains/banking/versions/v1/a.bin"),
            b"evil",
        )
        .unwrap();
        let err = reg
            .read_file(&d(), &VersionId::nth(1), "a.bin")
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn alias_moves_are_compare_and_swap() {
        let (_dir, reg) = registry_with_versions(3).await;
        let (v1, v2, v3) = (VersionId::nth(1), VersionId::nth(2), VersionId::nth(3));
        reg.move_alias(&d(), "production", None, &v1, "t", "first")
            .await
            .unwrap();
        // A mover with a stale view loses.
        let stale = reg
            .move_alias(&d(), "production", None, &v2, "t", "stale")
            .await;
        assert!(matches!(stale, Err(RegistryError::AliasConflict { .. })));
        // Two concurrent movers from v1: exactly one wins.
        let dom = d();
        let (a, b) = tokio::join!(
            reg.move_alias(&dom, "production", Some(&v1), &v2, "a", "race"),
            reg.move_alias(&dom, "production", Some(&v1), &v3, "b", "race"),
        );
        assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");
        let history = reg.alias_history(&d(), "production").await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].from.as_deref(), Some("v1"));
        // Unknown versions cannot be aliased.
        let missing = reg
            .move_alias(&d(), "production", None, &VersionId::nth(9), "t", "x")
            .await;
        assert!(matches!(missing, Err(RegistryError::NoSuchVersion { .. })));
    }
}

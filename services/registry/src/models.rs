//! Base models, content-addressed: `models/<id>/<file>` plus `models/<id>/manifest.json`.
//!
//! The id is the sha256 of the manifest's sorted `name sha256` lines, so the same files always
//! get the same id wherever they are imported, and an id names exactly one set of bytes.
//! Files stream in and out in chunks: a 26 GB checkpoint is never held in memory. Workers
//! keep a verified local copy per id ([`Registry::fetch_model`]); a copy only becomes visible
//! under its id once every file has been checked.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{FileEntry, MANIFEST, Registry, RegistryError, Result};

/// How a domain names a registry model: `sha256:<64 hex digits>`.
pub const MODEL_REF_PREFIX: &str = "sha256:";

const CHUNK: usize = 8 << 20;

/// The manifest beside a cached copy. Hidden, so the copy's content id is the original's.
const CACHED_MANIFEST: &str = ".flywheel-manifest.json";

/// A base model in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub schema_version: u32,
    /// Hex sha256 over the sorted file list; see the module docs.
    pub id: String,
    /// `model_type` from config.json, for people reading the registry.
    pub model_type: Option<String>,
    pub imported_at: DateTime<Utc>,
    pub files: Vec<FileEntry>,
}

impl ModelManifest {
    /// What a domain's `base_model` says to use this model.
    pub fn reference(&self) -> String {
        format!("{MODEL_REF_PREFIX}{}", self.id)
    }
}

/// The id in a `sha256:<hex>` reference, if `base_model` is one.
pub fn parse_model_ref(base_model: &str) -> Option<&str> {
    let id = base_model.strip_prefix(MODEL_REF_PREFIX)?;
    (id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(id)
}

fn content_id(files: &[FileEntry]) -> String {
    let mut sorted: Vec<_> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for f in sorted {
        h.update(format!("{} {}\n", f.name, f.sha256));
    }
    hex::encode(h.finalize())
}

/// The content id a model directory would get on import, and its files: what lineage
/// records for a base model given by path.
pub async fn model_content_id(dir: &Path) -> Result<(String, Vec<FileEntry>)> {
    let mut names = Vec::new();
    let mut listing = tokio::fs::read_dir(dir).await.map_err(local_err(dir))?;
    while let Some(entry) = listing.next_entry().await.map_err(local_err(dir))? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().await.map_err(local_err(dir))?.is_file();
        if is_file && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    if !names.iter().any(|n| n == "config.json") {
        return Err(RegistryError::Malformed {
            path: dir.display().to_string(),
            message: "not a Hugging Face model directory: no config.json".into(),
        });
    }
    let mut files = Vec::with_capacity(names.len());
    for name in &names {
        files.push(hash_file(&dir.join(name)).await?);
    }
    Ok((content_id(&files), files))
}

fn local_err(path: &Path) -> impl Fn(std::io::Error) -> RegistryError + '_ {
    move |e| RegistryError::Local(path.display().to_string(), e)
}

async fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut file = tokio::fs::File::open(path).await.map_err(local_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(local_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        name: path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned(),
        sha256: hex::encode(h.finalize()),
        bytes,
    })
}

impl Registry {
    fn model_key(id: &str, file: &str) -> ObjPath {
        ObjPath::from(format!("models/{id}/{file}"))
    }

    /// Imports the Hugging Face model directory `dir` (its top-level files; hidden files
    /// skipped). Importing the same files again is a no-op that returns the same id.
    pub async fn import_model(&self, dir: &Path) -> Result<ModelManifest> {
        let (id, files) = model_content_id(dir).await?;
        let model_type = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .and_then(|c| c["model_type"].as_str().map(str::to_owned));
        let manifest_key = Self::model_key(&id, MANIFEST);
        if let Ok(existing) = self.model_manifest(&id).await {
            return Ok(existing);
        }
        for file in &files {
            let key = Self::model_key(&id, &file.name);
            // Content-addressed: an object already there with the right size is these bytes
            // (a torn upload would be the wrong size, and the manifest guards reads anyway).
            if let Ok(meta) = self.store.head(&key).await
                && meta.size == file.bytes
            {
                continue;
            }
            self.upload_file(&dir.join(&file.name), &key).await?;
        }
        let manifest = ModelManifest {
            schema_version: 1,
            id: id.clone(),
            model_type,
            imported_at: Utc::now(),
            files,
        };
        let raw = serde_json::to_vec_pretty(&manifest).expect("json");
        if !self.create(&manifest_key, raw).await? {
            // A concurrent import of the same files won; its manifest is as good as ours.
            return self.model_manifest(&id).await;
        }
        Ok(manifest)
    }

    async fn upload_file(&self, path: &Path, key: &ObjPath) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await.map_err(local_err(path))?;
        let mut upload =
            WriteMultipart::new_with_chunk_size(self.store.put_multipart(key).await?, CHUNK);
        let mut buf = vec![0; CHUNK];
        loop {
            let n = file.read(&mut buf).await.map_err(local_err(path))?;
            if n == 0 {
                break;
            }
            upload.wait_for_capacity(4).await?;
            upload.write(&buf[..n]);
        }
        upload.finish().await?;
        Ok(())
    }

    pub async fn model_manifest(&self, id: &str) -> Result<ModelManifest> {
        let key = Self::model_key(id, MANIFEST);
        let bytes = match self.store.get(&key).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RegistryError::NoSuchModel(format!(
                    "{MODEL_REF_PREFIX}{id}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Malformed {
            path: key.to_string(),
            message: e.to_string(),
        })
    }

    /// The local directory of a domain's `base_model`: a path as given, or this machine's
    /// verified copy of a `sha256:` model of this registry under `cache_root`, fetched on
    /// first use (see [`Registry::fetch_model`]).
    pub async fn base_model_dir(&self, base_model: &str, cache_root: &Path) -> Result<PathBuf> {
        match parse_model_ref(base_model) {
            Some(id) => self.fetch_model(id, cache_root).await,
            None => Ok(PathBuf::from(base_model)),
        }
    }

    /// A verified local copy of model `id` under `cache_root/<id>`, downloading it first if
    /// this machine has none. Concurrent fetches on one machine each download into a private
    /// directory; the first rename wins and the rest are discarded.
    pub async fn fetch_model(&self, id: &str, cache_root: &Path) -> Result<PathBuf> {
        let target = cache_root.join(id);
        if target.join(CACHED_MANIFEST).is_file() {
            return Ok(target);
        }
        let manifest = self.model_manifest(id).await?;
        let partial = cache_root.join(format!(".{id}.{}", uuid::Uuid::new_v4()));
        tokio::fs::create_dir_all(&partial)
            .await
            .map_err(local_err(&partial))?;
        let result = self.download_model(&manifest, &partial).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(e);
        }
        let raw = serde_json::to_vec_pretty(&manifest).expect("json");
        let manifest_path = partial.join(CACHED_MANIFEST);
        tokio::fs::write(&manifest_path, raw)
            .await
            .map_err(local_err(&manifest_path))?;
        if tokio::fs::rename(&partial, &target).await.is_err() {
            // Someone else completed the same id first.
            let _ = tokio::fs::remove_dir_all(&partial).await;
        }
        Ok(target)
    }

    async fn download_model(&self, manifest: &ModelManifest, dir: &Path) -> Result<()> {
        for entry in &manifest.files {
            let key = Self::model_key(&manifest.id, &entry.name);
            let path = dir.join(&entry.name);
            let mut out = tokio::fs::File::create(&path)
                .await
                .map_err(local_err(&path))?;
            let mut stream = match self.store.get(&key).await {
                Ok(r) => r.into_stream(),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(RegistryError::missing(&key, entry));
                }
                Err(e) => return Err(e.into()),
            };
            let mut h = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                h.update(&chunk);
                out.write_all(&chunk).await.map_err(local_err(&path))?;
            }
            out.flush().await.map_err(local_err(&path))?;
            let actual = hex::encode(h.finalize());
            if actual != entry.sha256 {
                return Err(RegistryError::Corrupt {
                    path: key.to_string(),
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

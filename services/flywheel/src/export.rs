//! `flywheel models export`: a published version (its adapter folded into its base model) or
//! a local model directory as a GGUF file for llama.cpp and Ollama. The writing is the
//! trainer's (`export_gguf`); this module finds the files in the registry.

use std::path::Path;

use anyhow::{Context as _, bail};
use flywheel_domain::{DomainName, VersionId};
use flywheel_trainer::{GgufExport, GgufQuant};

use crate::Config;

/// Exports `version` of `domain` from the instance's registry to `out`.
pub async fn published_version(
    config: &Config,
    domain: &str,
    version: &str,
    out: &Path,
    quant: GgufQuant,
) -> anyhow::Result<GgufExport> {
    let registry = config.open_registry()?;
    let name = DomainName::parse(domain).map_err(|e| anyhow::anyhow!("{domain}: {e}"))?;
    let version = VersionId(version.to_owned());
    let manifest = registry.manifest(&name, &version).await.with_context(|| {
        format!(
            "{domain} {}: not in the registry {}",
            version.0,
            registry.url()
        )
    })?;
    let base_ref = manifest.lineage["base_model"]["ref"]
        .as_str()
        .with_context(|| format!("{domain} {}: its lineage names no base model", version.0))?
        .to_owned();
    // The worker's cache: a model it fetched for training is found there.
    let cache = config.data_dir.join("cache");
    let base = registry
        .base_model_dir(&base_ref, &cache.join("models"))
        .await?;
    if !base.join("config.json").exists() {
        bail!(
            "the base model {base_ref} is not on this machine: import it (`flywheel models import`) or run where the path exists"
        );
    }
    let adapter = cache
        .join("exports")
        .join(format!("{domain}-{}", version.0));
    registry.fetch_version(&name, &version, &adapter).await?;
    local(&base, Some(&adapter), out, quant).await
}

/// Exports the model in `base`, with the PEFT adapter in `adapter` folded in if given.
pub async fn local(
    base: &Path,
    adapter: Option<&Path>,
    out: &Path,
    quant: GgufQuant,
) -> anyhow::Result<GgufExport> {
    let (base, adapter, out) = (base.to_owned(), adapter.map(Path::to_owned), out.to_owned());
    tokio::task::spawn_blocking(move || {
        flywheel_trainer::export_gguf(&base, adapter.as_deref(), &out, quant)
            .with_context(|| format!("writing {}", out.display()))
    })
    .await
    .context("the export panicked")?
}

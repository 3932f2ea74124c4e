//! Resident models: one per (domain, alias), loaded from the registry, swapped when the alias
//! moves, evicted least recently used past the memory budget.
//!
//! A request takes an `Arc` of the model that is current when it starts and keeps it to the
//! end, so a swap or an eviction never fails a request: the old model is dropped when its last
//! request finishes. The alias is looked up again at most once per `refresh` interval, in the
//! background of a request that finds its model due; the new version loads beside the old one,
//! which keeps answering until the swap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flywheel_db::DomainRow;
use flywheel_domain::{DomainSpec, Task, VersionId};
use flywheel_registry::{Manifest, Registry};
use flywheel_telemetry::Metrics;
use flywheel_trainer::{ClassifierPredictor, Compute, Generator};

use crate::batch::Batcher;
use crate::error::{Result, ServingError};

/// A model ready to answer.
pub(crate) struct Loaded {
    pub version: VersionId,
    /// The alias generation it was loaded at.
    pub generation: u64,
    /// Escalate below this confidence; `None`: the holdout never reached the target, escalate
    /// everything.
    pub escalation: Option<f64>,
    /// Below this confidence, the out-of-scope label is the answer.
    pub out_of_scope: Option<(String, f64)>,
    pub bytes: u64,
    pub loaded_at: DateTime<Utc>,
    engine: Engine,
}

enum Engine {
    /// Classification: concurrent requests batched into one forward pass.
    Classify {
        batcher: Batcher,
        labels: Vec<String>,
    },
    /// Generation: one greedy decode per input, side by side on the inference threads.
    Generate(Arc<Generator>),
}

impl Loaded {
    /// Each input's answer (a label, or generated text of at most `max_tokens` tokens) and the
    /// model's confidence in it, in order.
    pub(crate) async fn answer(
        &self,
        inputs: Vec<String>,
        max_tokens: usize,
    ) -> Result<Vec<(String, f64)>> {
        match &self.engine {
            Engine::Classify { batcher, labels } => Ok(batcher
                .probabilities(inputs)
                .await?
                .iter()
                .map(|row| self.label_of(labels, row))
                .collect()),
            Engine::Generate(generator) => {
                let generator = generator.clone();
                tokio::task::spawn_blocking(move || {
                    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                    crate::batch::pool().install(|| generator.generate_all(&refs, max_tokens))
                })
                .await
                .map_err(|e| ServingError::Model(format!("generation panicked: {e}")))?
                .map(|all| {
                    all.into_iter()
                        .map(|g| (g.text, f64::from(g.confidence)))
                        .collect()
                })
                .map_err(|e| ServingError::Model(e.to_string()))
            }
        }
    }

    /// The most likely label and its probability; below the out-of-scope threshold, the
    /// out-of-scope label.
    fn label_of(&self, labels: &[String], probabilities: &[f32]) -> (String, f64) {
        let best = flywheel_trainer::Prediction::most_likely(probabilities);
        let confidence = f64::from(best.confidence);
        match &self.out_of_scope {
            Some((label, threshold)) if confidence < *threshold => (label.clone(), confidence),
            _ => (labels[best.label].clone(), confidence),
        }
    }
}

/// What a resident model is, for `GET …/serving`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resident {
    pub alias: String,
    pub version: VersionId,
    pub generation: u64,
    pub escalation_threshold: Option<f64>,
    pub bytes: u64,
    pub loaded_at: DateTime<Utc>,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Loaded>>>,
    /// One load at a time per slot: concurrent first requests wait for the same load.
    loading: tokio::sync::Mutex<()>,
    /// The domain as the latest request saw it (and its policy version), for the refresher.
    spec: Mutex<Option<(i64, DomainSpec)>>,
    /// When a request last used it (ms since the cache started), for eviction.
    used: AtomicU64,
}

impl Slot {
    fn current(&self) -> Option<Arc<Loaded>> {
        self.current.lock().expect("slot lock").clone()
    }

    fn saw(&self, domain: &DomainRow) {
        let mut spec = self.spec.lock().expect("slot lock");
        if spec
            .as_ref()
            .is_none_or(|(v, _)| *v != domain.policy_version)
        {
            *spec = Some((domain.policy_version, domain.spec.clone()));
        }
    }
}

type Key = (String, String);

pub(crate) struct Models {
    registry: Registry,
    metrics: Metrics,
    cache_dir: PathBuf,
    budget_bytes: u64,
    refresh: Duration,
    max_batch: usize,
    compute: Compute,
    started: Instant,
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    /// Aliases found unset (or whose version would not load), and when: not asked of the
    /// registry again within the refresh interval.
    unset: Mutex<HashMap<Key, Instant>>,
}

impl Models {
    /// The cache, and its refresher: every `refresh`, each resident model's alias is looked up
    /// again, so a move takes effect on a quiet domain too.
    pub(crate) fn start(
        registry: Registry,
        metrics: Metrics,
        cache_dir: PathBuf,
        budget_bytes: u64,
        refresh: Duration,
        max_batch: usize,
        compute: Compute,
    ) -> Arc<Self> {
        let models = Arc::new(Self {
            registry,
            metrics,
            cache_dir,
            budget_bytes,
            refresh,
            max_batch,
            compute,
            started: Instant::now(),
            slots: Mutex::new(HashMap::new()),
            unset: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&models);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(models) = weak.upgrade() else { break };
                models.refresh_all().await;
            }
        });
        models
    }

    /// The model behind `alias` of `domain`, loading it if none is resident; `None` when the
    /// alias was never set.
    pub(crate) async fn get(
        self: &Arc<Self>,
        domain: &DomainRow,
        alias: &str,
    ) -> Result<Option<Arc<Loaded>>> {
        let key = (domain.spec.name.to_string(), alias.to_owned());
        let slot = self.slots.lock().expect("slots lock").get(&key).cloned();
        if let Some(slot) = &slot {
            slot.used
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
            slot.saw(domain);
            if let Some(loaded) = slot.current() {
                return Ok(Some(loaded));
            }
        }
        if self
            .unset
            .lock()
            .expect("unset lock")
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.refresh)
        {
            return Ok(None);
        }
        // In a task of its own: a caller that goes away does not waste the load, and the next
        // caller finds the model resident.
        let (models, domain) = (self.clone(), domain.clone());
        tokio::spawn(async move { models.load_slot(&domain, key).await })
            .await
            .map_err(|e| ServingError::Model(format!("loading panicked: {e}")))?
    }

    async fn load_slot(&self, domain: &DomainRow, key: Key) -> Result<Option<Arc<Loaded>>> {
        let spec = &domain.spec;
        let Some(moved) = self.registry.resolve(&spec.name, &key.1).await? else {
            self.mark_unset(&key);
            return Ok(None);
        };
        let slot = self
            .slots
            .lock()
            .expect("slots lock")
            .entry(key.clone())
            .or_default()
            .clone();
        slot.saw(domain);
        slot.used
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let _one = slot.loading.lock().await;
        if let Some(loaded) = slot.current() {
            return Ok(Some(loaded));
        }
        match self.load(spec, VersionId(moved.to), moved.generation).await {
            Ok(loaded) => {
                *slot.current.lock().expect("slot lock") = Some(loaded.clone());
                self.evict(&key);
                Ok(Some(loaded))
            }
            Err(e) => {
                // Not asked again until the refresh interval has passed.
                self.slots.lock().expect("slots lock").remove(&key);
                self.mark_unset(&key);
                Err(e)
            }
        }
    }

    fn mark_unset(&self, key: &Key) {
        let mut unset = self.unset.lock().expect("unset lock");
        // Entries live one refresh interval, so the map holds at most what arrived in one.
        unset.retain(|_, at| at.elapsed() < self.refresh);
        unset.insert(key.clone(), Instant::now());
    }

    async fn refresh_all(&self) {
        let resident: Vec<(Key, Arc<Slot>)> = self
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, slot) in resident {
            let Some((_, spec)) = slot.spec.lock().expect("slot lock").clone() else {
                continue;
            };
            if let Err(e) = self.refresh(&spec, &key, &slot).await {
                tracing::warn!(domain = key.0, alias = key.1, error = %e,
                    "serving: could not check the alias; the resident model keeps answering");
            }
        }
    }

    /// Looks the alias up again and swaps in the version it now names; the old model answers
    /// until then.
    async fn refresh(&self, spec: &DomainSpec, key: &Key, slot: &Slot) -> Result<()> {
        let Some(current) = slot.current() else {
            return Ok(());
        };
        let Some(moved) = self.registry.resolve(&spec.name, &key.1).await? else {
            return Ok(());
        };
        // A move back and forth that ends where it started loads nothing.
        if current.version.as_str() == moved.to {
            return Ok(());
        }
        let version = VersionId(moved.to);
        let loaded = self.load(spec, version.clone(), moved.generation).await?;
        *slot.current.lock().expect("slot lock") = Some(loaded);
        tracing::info!(domain = key.0, alias = key.1, %version, "serving: swapped in the version the alias now names");
        self.evict(key);
        Ok(())
    }

    async fn load(
        &self,
        spec: &DomainSpec,
        version: VersionId,
        generation: u64,
    ) -> Result<Arc<Loaded>> {
        let result = self.load_inner(spec, version, generation).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .serving_model_loads
            .with_label_values(&[spec.name.as_str(), outcome])
            .inc();
        result
    }

    async fn load_inner(
        &self,
        spec: &DomainSpec,
        version: VersionId,
        generation: u64,
    ) -> Result<Arc<Loaded>> {
        // The same cache the evaluate stage keeps its champions in.
        let dir = self
            .cache_dir
            .join(spec.name.as_str())
            .join(version.as_str());
        self.registry
            .fetch_version(&spec.name, &version, &dir)
            .await?;
        let manifest: Manifest = self.registry.manifest(&spec.name, &version).await?;
        let base = self
            .registry
            .base_model_dir(&spec.base_model, &self.cache_dir.join("models"))
            .await?;
        let bytes = weights_bytes(&base) + weights_bytes(&dir);
        let compute = self.compute;
        let (labels, max_batch) = (spec.labels.clone(), self.max_batch);
        let task = spec.task;
        let engine = tokio::task::spawn_blocking({
            let (base, dir) = (base.clone(), dir.clone());
            move || -> flywheel_trainer::Result<Engine> {
                Ok(match task {
                    Task::Classification => {
                        let model = ClassifierPredictor::load(&base, Some(&dir), &labels, 0)?
                            .with_compute(compute)?;
                        Engine::Classify {
                            batcher: Batcher::start(Arc::new(model), max_batch),
                            labels,
                        }
                    }
                    Task::Generation => {
                        let model = Generator::load(&base, Some(&dir))?.with_compute(compute)?;
                        Engine::Generate(Arc::new(model))
                    }
                })
            }
        })
        .await
        .map_err(|e| ServingError::Model(format!("loading panicked: {e}")))?
        .map_err(|e| ServingError::Model(e.to_string()))?;
        let lineage = &manifest.lineage;
        let out_of_scope = lineage["out_of_scope"]["label"]
            .as_str()
            .zip(lineage["out_of_scope"]["threshold"].as_f64())
            .map(|(l, t)| (l.to_owned(), t));
        tracing::info!(domain = %spec.name, %version, bytes, "serving: model loaded");
        Ok(Arc::new(Loaded {
            version,
            generation,
            escalation: lineage["escalation"]["threshold"].as_f64(),
            out_of_scope,
            bytes,
            loaded_at: Utc::now(),
            engine,
        }))
    }

    /// Drops the least recently used models until the resident ones fit the budget; `keep`
    /// (the one just loaded) stays whatever its size.
    fn evict(&self, keep: &Key) {
        let mut slots = self.slots.lock().expect("slots lock");
        loop {
            let resident: Vec<_> = slots
                .iter()
                .filter_map(|(k, s)| {
                    s.current()
                        .map(|l| (k.clone(), l.bytes, s.used.load(Ordering::Relaxed)))
                })
                .collect();
            let total: u64 = resident.iter().map(|r| r.1).sum();
            if total <= self.budget_bytes {
                break;
            }
            let Some((victim, ..)) = resident
                .into_iter()
                .filter(|r| &r.0 != keep)
                .min_by_key(|r| r.2)
            else {
                break;
            };
            tracing::info!(
                domain = victim.0,
                alias = victim.1,
                "serving: model evicted (memory budget)"
            );
            slots.remove(&victim);
        }
        self.publish_gauge(&slots);
    }

    fn publish_gauge(&self, slots: &HashMap<Key, Arc<Slot>>) {
        self.metrics.serving_models_resident.reset();
        for ((domain, _), slot) in slots.iter() {
            if slot.current().is_some() {
                self.metrics
                    .serving_models_resident
                    .with_label_values(&[domain.as_str()])
                    .inc();
            }
        }
    }

    /// The models resident for `domain`.
    pub(crate) fn resident(&self, domain: &str) -> Vec<Resident> {
        let slots = self.slots.lock().expect("slots lock");
        let mut out: Vec<Resident> = slots
            .iter()
            .filter(|((d, _), _)| d == domain)
            .filter_map(|((_, alias), slot)| {
                slot.current().map(|l| Resident {
                    alias: alias.clone(),
                    version: l.version.clone(),
                    generation: l.generation,
                    escalation_threshold: l.escalation,
                    bytes: l.bytes,
                    loaded_at: l.loaded_at,
                })
            })
            .collect();
        out.sort_by(|a, b| a.alias.cmp(&b.alias));
        out
    }
}

/// The size of the model weights in `dir`: what the budget counts (tokenizers and configs are
/// small beside them).
fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "bin")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

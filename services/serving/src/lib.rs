//! Serving and routing: answers a domain's queries with the model its alias names, escalates
//! the uncertain ones to the domain's teacher, and turns the teacher's answers — and people's
//! feedback — into corrections, which is where the loop closes.
//!
//! This crate owns resident models (`models.rs`: loading from the registry, hot swap when an
//! alias moves, eviction under a memory budget), dynamic batching (`batch.rs`), the teacher
//! client with its breaker and budget (`teacher.rs`) and the prediction log (`log.rs`). It
//! knows nothing of HTTP wire shapes (the api crate parses requests and calls [`Serving`]),
//! never moves an alias, and trains nothing: corrections it writes reach training through the
//! database like any other.

mod batch;
mod error;
mod log;
mod models;
mod teacher;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use flywheel_db::{Db, DomainRow, NewPrediction, NewShadowScore, PredictionRow};
use flywheel_domain::{
    AnsweredBy, Correction, CorrectionDraft, Invalid, PiiAction, PiiCounts, PredictionId, Source,
    Task, VersionId,
};
use flywheel_registry::Registry;
use flywheel_telemetry::Metrics;
use tokio::sync::Notify;

pub use error::{Result, ServingError};
pub use models::Resident;
pub use teacher::TeacherError;

use crate::log::{Log, Record};
use crate::models::Models;
use crate::teacher::Teachers;

use flywheel_domain::PRODUCTION;
/// The alias a domain's `canary_share` of requests goes to.
pub const CANARY: &str = "canary";

/// How a process serves.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// Where versions and base models are cached (shared with the evaluate stage's cache).
    pub cache_dir: PathBuf,
    /// Resident models past this many bytes of weights evict the least recently used.
    pub memory_budget_bytes: u64,
    /// How often a resident model's alias is looked up again.
    pub refresh: Duration,
    /// Most texts run as one forward pass.
    pub max_batch: usize,
    /// Longest text stored, as at ingestion.
    pub max_text_chars: usize,
    /// How the models multiply (bf16 on AMX tiles, or f32).
    pub compute: flywheel_trainer::Compute,
}

/// One answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    /// Set when the prediction was logged: feedback names it.
    pub prediction_id: Option<PredictionId>,
    /// The label (classification) or text (generation) answered.
    pub output: String,
    /// The small model's confidence in its own answer (absent when no model ran).
    pub confidence: Option<f64>,
    /// The small model was unsure, or there was none: the teacher was asked.
    pub escalated: bool,
    pub answered_by: AnsweredBy,
    /// Why an escalation was answered by the small model after all (`timeout`,
    /// `circuit_open`, `over_budget`, `not_a_label`, `no_teacher`, …).
    pub teacher_error: Option<String>,
    /// The version that ran, and the alias that named it.
    pub version: Option<VersionId>,
    pub alias: String,
}

/// Serving's shared state; cheap to clone.
#[derive(Clone)]
pub struct Serving {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    metrics: Metrics,
    config: ServingConfig,
    models: Arc<Models>,
    teachers: Teachers,
    log: Log,
    /// The retention each domain's log was last told, so it is told again only on a change.
    retention: std::sync::Mutex<std::collections::HashMap<i64, u32>>,
    /// Shadow scorings under way at most; past it a request goes unscored (and counted), so a
    /// slow shadow model cannot pile work up behind the answers.
    shadow_slots: Arc<tokio::sync::Semaphore>,
}

/// Shadow scorings under way at once, at most.
const SHADOW_IN_FLIGHT: usize = 64;

/// What the small model said about one input.
struct ModelAnswer {
    label: String,
    confidence: f64,
    escalate: bool,
}

impl Serving {
    /// Starts the prediction log's writer; `nudge` wakes the scheduler when teacher answers
    /// are stored. Needs a Tokio runtime.
    pub fn start(
        db: Db,
        registry: Registry,
        metrics: Metrics,
        nudge: Arc<Notify>,
        config: ServingConfig,
    ) -> Self {
        let models = Models::start(
            registry,
            metrics.clone(),
            config.cache_dir.clone(),
            config.memory_budget_bytes,
            config.refresh,
            config.max_batch,
            config.compute,
        );
        let log = Log::start(db.clone(), metrics.clone(), nudge);
        Self {
            inner: Arc::new(Inner {
                db,
                metrics,
                config,
                models,
                teachers: Teachers::new(),
                log,
                retention: Default::default(),
                shadow_slots: Arc::new(tokio::sync::Semaphore::new(SHADOW_IN_FLIGHT)),
            }),
        }
    }

    /// Answers each of `inputs` (validated by the caller: non-empty, within limits) with the
    /// model `alias` names — without one, production, or the canary for the domain's
    /// `canary_share` of requests while it is set — escalating to the teacher where the model
    /// is unsure or absent. A shadow alias, if the domain has one, answers the same inputs
    /// afterwards, and only its agreement is kept. `max_tokens` bounds a generated answer.
    /// An input nothing could answer (no version yet, and the teacher gave no usable answer)
    /// is an error of its own; the others are answered.
    pub async fn predict(
        &self,
        domain: &DomainRow,
        alias: Option<&str>,
        inputs: &[String],
        max_tokens: usize,
    ) -> Result<Vec<Result<Answer>>> {
        let started = Instant::now();
        let inner = &self.inner;
        let spec = &domain.spec;
        let name = spec.name.as_str();
        let (alias, model) = match alias {
            Some(alias) => match inner.models.get(domain, alias).await? {
                None if alias != PRODUCTION => {
                    return Err(ServingError::AliasNotSet {
                        domain: name.to_owned(),
                        alias: alias.to_owned(),
                    });
                }
                model => (alias, model),
            },
            // Unasked, a model that will not load is no model: the teacher answers, and the
            // load is tried again after the refresh interval.
            None => {
                let canary = if rand::random::<f64>() < spec.serving.canary_share {
                    self.or_none(domain, CANARY).await
                } else {
                    None
                };
                match canary {
                    Some(model) => (CANARY, Some(model)),
                    None => (PRODUCTION, self.or_none(domain, PRODUCTION).await),
                }
            }
        };
        // The texts as they would be stored: the model (trained on redacted corrections), the
        // teacher, the log and the corrections all see them after the domain's PII policy.
        // Under `drop`, an input that had personal data is answered but kept nowhere.
        let pii = &spec.policy.pii;
        let (redacted, keep): (Vec<String>, Vec<bool>) = inputs
            .iter()
            .map(|t| {
                let mut found = PiiCounts::default();
                let text = flywheel_domain::pii::redact(t, pii, &mut found);
                (text, pii.action != PiiAction::Drop || found.is_empty())
            })
            .unzip();
        let answers: Vec<Option<ModelAnswer>> = match &model {
            Some(m) => m
                .answer(redacted.clone(), max_tokens)
                .await?
                .into_iter()
                .map(|(label, confidence)| {
                    Some(ModelAnswer {
                        label,
                        confidence,
                        escalate: m.escalation.is_none_or(|t| confidence < t),
                    })
                })
                .collect(),
            None => inputs.iter().map(|_| None).collect(),
        };
        let asks = answers
            .iter()
            .zip(&redacted)
            .map(|(answer, text)| async move {
                if answer.as_ref().is_none_or(|a| a.escalate) {
                    let asked = Instant::now();
                    let result = inner.teachers.ask(spec, text).await;
                    let outcome = match &result {
                        Ok(_) => "ok",
                        Err(e) => e.code(),
                    };
                    if !matches!(result, Err(TeacherError::Unconfigured)) {
                        inner
                            .metrics
                            .teacher_requests
                            .with_label_values(&[name, outcome])
                            .inc();
                        inner
                            .metrics
                            .teacher_request_seconds
                            .with_label_values(&[name])
                            .observe(asked.elapsed().as_secs_f64());
                    }
                    Some(result)
                } else {
                    None
                }
            });
        let taught = futures::future::join_all(asks).await;
        let version = model.as_ref().map(|m| m.version.clone());
        if let (Some(shadow), Some(primary)) = (&spec.serving.shadow, &model)
            && shadow != alias
        {
            let labels: Vec<String> = answers
                .iter()
                .map(|a| a.as_ref().map_or(String::new(), |a| a.label.clone()))
                .collect();
            self.shadow(
                domain,
                shadow,
                primary.version.clone(),
                redacted.clone(),
                labels,
                max_tokens,
            );
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let days = spec.serving.log_retention_days;
        if inner
            .retention
            .lock()
            .expect("retention lock")
            .insert(domain.id, days)
            != Some(days)
        {
            inner.log.record(Record::Retention {
                domain_id: domain.id,
                days,
            });
        }
        // A generated answer may repeat personal data it was taught or asked about; a label is
        // one of the domain's own and is logged as it is.
        let scrub = |text: &str| match spec.task {
            Task::Generation => flywheel_domain::pii::redact(text, pii, &mut PiiCounts::default()),
            Task::Classification => text.to_owned(),
        };
        let mut out = Vec::with_capacity(inputs.len());
        let rows = answers.into_iter().zip(taught).zip(redacted).zip(keep);
        for (((answer, teacher), text), keep) in rows {
            let escalated = teacher.is_some();
            let (output, answered_by, teacher_error) = match (teacher, &answer) {
                (Some(Ok(label)), _) => (label, AnsweredBy::Teacher, None),
                (Some(Err(e)), Some(a)) => (a.label.clone(), AnsweredBy::Model, Some(e)),
                (Some(Err(e)), None) => {
                    out.push(Err(ServingError::NoModel(format!(
                        "{name} has no {alias} version yet, and the teacher gave no usable \
                         answer: {e}"
                    ))));
                    continue;
                }
                (None, Some(a)) => (a.label.clone(), AnsweredBy::Model, None),
                (None, None) => unreachable!("an input without a model answer is escalated"),
            };
            let id = PredictionId::generate();
            // A teacher's answer is training data, so it is always kept; the rest as sampled.
            let logged = keep
                && (answered_by == AnsweredBy::Teacher
                    || rand::random::<f64>() < spec.serving.log_sample_rate);
            if answered_by == AnsweredBy::Teacher && keep {
                self.learn_from_teacher(domain, &id, &text, &output, answer.as_ref());
            }
            let m = &inner.metrics;
            m.predictions
                .with_label_values(&[name, answered_by.as_str()])
                .inc();
            if escalated {
                m.prediction_escalations.with_label_values(&[name]).inc();
            }
            if let Some(a) = &answer {
                m.prediction_confidence
                    .with_label_values(&[name])
                    .observe(a.confidence);
            }
            if logged {
                inner.log.record(Record::Prediction(NewPrediction {
                    id: id.clone(),
                    domain_id: domain.id,
                    at: Utc::now(),
                    alias: alias.to_owned(),
                    version: version.as_ref().map(|v| v.0.clone()),
                    input: text,
                    output: scrub(&output),
                    model_output: answer.as_ref().map(|a| scrub(&a.label)),
                    confidence: answer.as_ref().map(|a| a.confidence),
                    escalated,
                    answered_by,
                    teacher_error: teacher_error.as_ref().map(|e| e.code().to_owned()),
                    latency_ms,
                }));
            }
            out.push(Ok(Answer {
                prediction_id: logged.then_some(id),
                output,
                confidence: answer.as_ref().map(|a| a.confidence),
                escalated,
                answered_by,
                teacher_error: teacher_error.map(|e| e.code().to_owned()),
                version: version.clone(),
                alias: alias.to_owned(),
            }));
        }
        inner
            .metrics
            .prediction_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// The model `alias` names, or none when it is unset or will not load (said in the log).
    async fn or_none(&self, domain: &DomainRow, alias: &str) -> Option<Arc<models::Loaded>> {
        match self.inner.models.get(domain, alias).await {
            Ok(model) => model,
            Err(e) => {
                tracing::error!(domain = %domain.spec.name, alias, error = %e,
                    "serving: the model will not load; answering without it");
                None
            }
        }
    }

    /// Scores `inputs` with the model `alias` names, behind the answer already given, and
    /// records whether it agreed with each of `given` (the live model's answers).
    fn shadow(
        &self,
        domain: &DomainRow,
        alias: &str,
        primary_version: VersionId,
        inputs: Vec<String>,
        given: Vec<String>,
        max_tokens: usize,
    ) {
        let Ok(permit) = self.inner.shadow_slots.clone().try_acquire_owned() else {
            self.inner
                .metrics
                .serving_shed
                .with_label_values(&["shadow"])
                .inc();
            return;
        };
        let (serving, domain, alias) = (self.clone(), domain.clone(), alias.to_owned());
        tokio::spawn(async move {
            let _permit = permit;
            let inner = &serving.inner;
            let name = domain.spec.name.as_str();
            let shadow = match inner.models.get(&domain, &alias).await {
                // The shadow names the live version (or nothing): nothing to compare.
                Ok(Some(m)) if m.version != primary_version => m,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(domain = name, alias, error = %e, "serving: shadow model unavailable");
                    return;
                }
            };
            let answers = match shadow.answer(inputs, max_tokens).await {
                Ok(answers) => answers,
                Err(e) => {
                    tracing::warn!(domain = name, alias, error = %e, "serving: shadow scoring failed");
                    return;
                }
            };
            for ((answer, _), live) in answers.iter().zip(&given) {
                let agrees = answer == live;
                inner
                    .metrics
                    .shadow_scores
                    .with_label_values(&[name, if agrees { "true" } else { "false" }])
                    .inc();
                inner.log.record(Record::Shadow(NewShadowScore {
                    domain_id: domain.id,
                    at: Utc::now(),
                    alias: alias.clone(),
                    version: shadow.version.0.clone(),
                    primary_version: primary_version.0.clone(),
                    agrees,
                }));
            }
        });
    }

    /// Stores the teacher's answer as a `source: teacher` correction, checked and redacted as
    /// any correction is (its client id is the prediction's, so it is stored once).
    fn learn_from_teacher(
        &self,
        domain: &DomainRow,
        id: &PredictionId,
        input: &str,
        label: &str,
        model: Option<&ModelAnswer>,
    ) {
        let spec = &domain.spec;
        let draft = CorrectionDraft {
            client_id: Some(format!("prediction-{id}")),
            input: Some(input.to_owned()),
            model_output: model.map(|m| m.label.clone()),
            expected: Some(label.to_owned()),
            source: Some(Source::Teacher),
            teacher: spec.serving.teacher.as_ref().map(|t| t.model.clone()),
            metadata: Some(serde_json::json!({"prediction_id": id})),
        };
        match draft.validate(spec, self.inner.config.max_text_chars) {
            Ok(correction) => self.inner.log.record(Record::Correction {
                domain_id: domain.id,
                domain: spec.name.to_string(),
                correction: Box::new(correction),
            }),
            Err(e) => {
                tracing::debug!(domain = %spec.name, error = %e, "serving: teacher answer not kept")
            }
        }
    }

    /// A logged prediction (writing pending ones first, so one just answered is found).
    pub async fn prediction(&self, id: &PredictionId) -> Result<Option<PredictionRow>> {
        if let Some(row) = self.inner.db.prediction(id).await? {
            return Ok(Some(row));
        }
        self.inner.log.flush().await;
        Ok(self.inner.db.prediction(id).await?)
    }

    /// A person's verdict on a prediction, as a `source: human` correction linked to it:
    /// `expected` is what it should have said (the answer given, when they confirm it).
    pub fn feedback_correction(
        &self,
        domain: &DomainRow,
        prediction: &PredictionRow,
        expected: &str,
        by: &str,
    ) -> Result<Correction, Invalid> {
        CorrectionDraft {
            client_id: Some(format!("feedback-{}", prediction.prediction.id)),
            input: Some(prediction.prediction.input.clone()),
            model_output: Some(prediction.prediction.output.clone()),
            expected: Some(expected.to_owned()),
            source: Some(Source::Human),
            teacher: None,
            metadata: Some(
                serde_json::json!({"prediction_id": prediction.prediction.id, "by": by}),
            ),
        }
        .validate(&domain.spec, self.inner.config.max_text_chars)
    }

    /// The models resident for `domain`.
    pub fn resident(&self, domain: &str) -> Vec<Resident> {
        self.inner.models.resident(domain)
    }
}

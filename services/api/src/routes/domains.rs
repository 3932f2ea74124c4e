//! Domains: registration, the list a caller may see, one domain with its counts, and changes
//! to its policy with their history.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::{Extension, Json};
use flywheel_db::{DomainRow, PolicyVersion};
use flywheel_domain::{DomainSpec, ModelFiles, Role, Training};
use flywheel_promotion::Promotion;
use flywheel_registry::{MODEL_REF_PREFIX, parse_model_ref};
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, Domain, List, check_reason, domain_row, parse_body};
use crate::{ApiError, AppState, ErrorCode, Principal};

#[derive(Serialize)]
pub struct DomainView {
    #[serde(flatten)]
    domain: DomainRow,
    corrections: CorrectionCounts,
    production: Option<String>,
}

#[derive(Serialize)]
struct CorrectionCounts {
    train: i64,
    holdout: i64,
}

async fn view(state: &AppState, domain: DomainRow) -> ApiResult<DomainView> {
    let (train, holdout) = state.db.correction_counts(domain.id).await?;
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?
        .map(|v| v.0);
    Ok(DomainView {
        domain,
        corrections: CorrectionCounts { train, holdout },
        production,
    })
}

pub async fn create(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DomainView>)> {
    let spec: DomainSpec = parse_body(raw)?;
    spec.validate()?;
    check_base_model(&state, &spec).await?;
    let row = state.db.create_domain(&spec).await?;
    if !row.spec.sources.is_empty() {
        // The scheduler hands the new sources their first poll now, not at its next tick.
        state.nudge.notify_one();
    }
    Ok((StatusCode::CREATED, Json(view(&state, row).await?)))
}

/// Refuses a base model that could never train `task`: one that does not exist, is not a
/// supported family, lacks weights or a tokenizer, or cannot do the task. A registry model is
/// judged from its manifest; a path from the directory as this process sees it.
pub(super) async fn check_base_model(state: &AppState, spec: &DomainSpec) -> ApiResult<()> {
    check_training(state, &spec.training)?;
    let base_model = spec.base_model.as_str();
    let (model_type, files) = if base_model.starts_with(MODEL_REF_PREFIX) {
        let id = parse_model_ref(base_model).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                "base_model: `sha256:` must be followed by 64 lowercase hex digits",
            )
        })?;
        let manifest = state.registry.model_manifest(id).await?;
        let files = manifest.files.into_iter().map(|f| f.name).collect();
        (manifest.model_type, files)
    } else {
        let dir = std::path::Path::new(base_model);
        let not_found = || {
            ApiError::new(
                ErrorCode::UnknownBaseModel,
                format!(
                    "base_model: there is no model directory at `{base_model}` on the server; \
                     import one with `flywheel models import` and use its sha256: reference"
                ),
            )
        };
        let mut entries = tokio::fs::read_dir(dir).await.map_err(|_| not_found())?;
        let mut files = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            files.push(entry.file_name().to_string_lossy().into_owned());
        }
        let model_type = tokio::fs::read(dir.join("config.json"))
            .await
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .and_then(|config| config["model_type"].as_str().map(str::to_owned));
        (model_type, files)
    };
    let what = format!("`{base_model}`");
    flywheel_domain::check_base_model(
        spec.task,
        &what,
        &ModelFiles {
            model_type: model_type.as_deref(),
            files: &files,
        },
        spec.training.lora.target_modules.value().map(Vec::as_slice),
    )?;
    Ok(())
}

/// What the serving fleet can load bounds what a domain or a job may ask for.
pub(super) fn check_training(state: &AppState, training: &Training) -> ApiResult<()> {
    training.validate()?;
    if let Some(&r) = training.lora.r.value()
        && r as usize > state.limits.max_lora_rank
    {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!(
                "training.lora.r: {r} is above the serving fleet's largest rank, {} \
                 (--max-lora-rank)",
                state.limits.max_lora_rank
            ),
        ));
    }
    Ok(())
}

pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<List<DomainRow>>> {
    let mut domains = state.db.domains().await?;
    domains.retain(|d| who.sees(d.spec.name.as_str()));
    Ok(Json(domains.into()))
}

pub async fn get(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<DomainView>> {
    Ok(Json(view(&state, domain).await?))
}

/// The policy fields a steward may change: the gate's rules and approval. Everything else
/// (triggers, PII handling, the teacher's weight, the split) is an admin's.
const STEWARD_POLICY_FIELDS: &[&str] = &[
    "min_accuracy",
    "min_improvement",
    "significance_level",
    "max_label_drop",
    "min_label_support",
    "max_calibration_error",
    "target_accuracy",
    "require_approval",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPatch {
    /// A JSON merge patch (RFC 7396) of the policy: the keys given replace the current ones,
    /// `null` puts a key back to its default.
    #[serde(default)]
    policy: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    out_of_scope_label: Option<Option<String>>,
    /// A merge patch of the training block (or `"auto"`); admin only.
    #[serde(default)]
    training: Option<serde_json::Value>,
    /// The new label set: every current label, in order, then the added ones. Renaming or
    /// removing a label needs its stored corrections mapped, which is refused with the reason.
    #[serde(default)]
    labels: Option<Vec<String>>,
    /// A merge patch of the serving block (teacher, prediction log); admin only.
    #[serde(default)]
    serving: Option<serde_json::Value>,
    /// The whole list of ingestion sources, replacing the current one; admin only.
    #[serde(default)]
    sources: Option<serde_json::Value>,
    #[serde(default)]
    base_model: Option<serde_json::Value>,
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Changes a domain's policy or out-of-scope label: the next job trains and is gated under the
/// new policy version, and the change is audited with before and after.
pub async fn change(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Domain(mut domain): Domain,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DomainView>> {
    let patch: DomainPatch = parse_body(raw)?;
    let by = who.actor(patch.by.clone())?;
    check_reason(&patch.reason)?;
    // The production adapter was trained on the base model: a new one needs the champion
    // evaluated on its own terms, which jobs do not do yet.
    if patch.base_model.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "base_model: cannot be changed on a registered domain yet (the production adapter \
             is tied to it); register a new domain for a new base model",
        ));
    }
    if who.role == Role::Steward {
        let admin_only = patch
            .policy
            .iter()
            .flat_map(|p| p.keys())
            .map(|k| format!("policy.{k}"))
            .filter(|k| !STEWARD_POLICY_FIELDS.contains(&&k["policy.".len()..]))
            .chain(
                [
                    ("out_of_scope_label", patch.out_of_scope_label.is_some()),
                    ("training", patch.training.is_some()),
                    ("serving", patch.serving.is_some()),
                    ("sources", patch.sources.is_some()),
                    ("labels", patch.labels.is_some()),
                ]
                .into_iter()
                .filter(|(_, given)| *given)
                .map(|(field, _)| field.to_owned()),
            )
            .next();
        if let Some(field) = admin_only {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{field}: a steward token may change the gate and approval rules ({}); ask \
                     an admin for the rest",
                    STEWARD_POLICY_FIELDS.join(", ")
                ),
            ));
        }
    }
    // A concurrent change moves the version on: apply the patch to what is there now.
    for _ in 0..5 {
        let to = patched(&domain.spec, &patch)?;
        if to == domain.spec {
            return Ok(Json(view(&state, domain).await?));
        }
        if to.training != domain.spec.training {
            check_base_model(&state, &to).await?;
        }
        match state
            .db
            .change_domain(&domain, &to, &by, &patch.reason)
            .await?
        {
            Some(changed) => {
                if changed.spec.sources != domain.spec.sources {
                    state.nudge.notify_one();
                }
                return Ok(Json(view(&state, changed).await?));
            }
            None => domain = domain_row(&state, domain.spec.name.as_str()).await?,
        }
    }
    Err(ApiError::new(
        ErrorCode::EditConflict,
        "the domain kept changing under this request; read it again and retry",
    ))
}

/// `spec` with the patch applied, validated as a whole.
fn patched(spec: &DomainSpec, patch: &DomainPatch) -> ApiResult<DomainSpec> {
    let mut to = spec.clone();
    if let Some(changes) = &patch.policy {
        let mut policy = serde_json::to_value(&spec.policy).expect("a policy is JSON");
        merge_patch(&mut policy, &serde_json::Value::Object(changes.clone()));
        to.policy = serde_path_to_error::deserialize(policy).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidField,
                format!("policy.{}: {}", e.path(), e.inner()),
            )
        })?;
        // Where `null` is a value (never train on age alone), it is that value, not "back to
        // the default" as a merge patch's null would be.
        if changes.get("max_staleness_seconds") == Some(&serde_json::Value::Null) {
            to.policy.max_staleness_seconds = None;
        }
    }
    if let Some(changes) = &patch.training {
        let mut training = serde_json::to_value(&spec.training).expect("a training block is JSON");
        merge_patch(&mut training, changes);
        to.training = serde_path_to_error::deserialize(training).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." {
                String::new()
            } else {
                format!(".{at}")
            };
            ApiError::new(
                ErrorCode::InvalidField,
                format!("training{at}: {}", e.inner()),
            )
        })?;
    }
    if let Some(changes) = &patch.serving {
        let mut serving = serde_json::to_value(&spec.serving).expect("a serving block is JSON");
        merge_patch(&mut serving, changes);
        to.serving = serde_path_to_error::deserialize(serving).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." {
                String::new()
            } else {
                format!(".{at}")
            };
            // serde names the Rust types; the caller wrote JSON.
            let why = e
                .inner()
                .to_string()
                .replace("struct ServingSpec", "an object")
                .replace("struct TeacherEndpoint", "an object");
            ApiError::new(ErrorCode::InvalidField, format!("serving{at}: {why}"))
        })?;
    }
    if let Some(labels) = &patch.labels {
        if let Some((i, old)) = spec
            .labels
            .iter()
            .enumerate()
            .find(|(i, old)| labels.get(*i) != Some(*old))
        {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "labels[{i}]: `{old}` must stay where it is; labels can be added after the \
                     current ones, and renaming or removing one needs its corrections mapped, \
                     which is not supported yet"
                ),
            ));
        }
        to.labels = labels.clone();
    }
    if let Some(label) = &patch.out_of_scope_label {
        to.out_of_scope_label = label.clone();
    }
    if let Some(sources) = &patch.sources {
        // A list is replaced whole (a merge patch cannot address its items); `null` empties it.
        let sources = if sources.is_null() {
            serde_json::Value::Array(Vec::new())
        } else {
            sources.clone()
        };
        to.sources = serde_path_to_error::deserialize(sources).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." { String::new() } else { at };
            let why = e
                .inner()
                .to_string()
                .replace("struct SourceSpec", "an object")
                .replace("struct Mapping", "an object");
            ApiError::new(ErrorCode::InvalidField, format!("sources{at}: {why}"))
        })?;
    }
    to.validate()?;
    Ok(to)
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let fields = target.as_object_mut().expect("made an object above");
    for (key, value) in changes {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Every version of the domain's policy, oldest first.
pub async fn policy_history(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<List<PolicyVersion>>> {
    Ok(Json(state.db.policy_history(domain.id).await?.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_replaces_adds_and_resets_keys() {
        let mut policy = serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4});
        merge_patch(
            &mut policy,
            &serde_json::json!({"a": 5, "b": {"c": null, "f": 6}, "e": null, "g": [1]}),
        );
        assert_eq!(
            policy,
            serde_json::json!({"a": 5, "b": {"d": 3, "f": 6}, "g": [1]})
        );
    }
}

//! A steward's review of a domain's corrections: listing and searching them, the
//! contradictions among them (kept out of training until resolved), relabelling and removing.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use flywheel_db::{CorrectionFilter, Edit, StoredCorrection};
use flywheel_domain::{Conflict, Source, Split, content_hash, validate_expected};
use serde::{Deserialize, Serialize};

use super::shared::{
    Acting, ApiResult, Domain, List, Path, Query, check_reason, domain_row, parse_body,
};
use crate::{ApiError, AppState, ErrorCode};

/// The most corrections one page holds.
const MAX_PAGE: i64 = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    expected: Option<String>,
    split: Option<String>,
    source: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    q: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
    include_removed: Option<bool>,
}

#[derive(Serialize)]
pub struct Page {
    data: Vec<StoredCorrection>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<i64>,
}

fn invalid(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidField, message)
}

/// The domain's corrections, oldest first, `limit` (100, at most 1,000) at a time.
pub async fn list(
    State(state): State<AppState>,
    Domain(domain): Domain,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Page>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid(format!("limit: must be between 1 and {MAX_PAGE}")));
    }
    let split = q
        .split
        .as_deref()
        .map(|s| Split::parse(s).ok_or_else(|| invalid("split: use train or holdout".into())))
        .transpose()?;
    let source = q
        .source
        .as_deref()
        .map(|s| Source::parse(s).ok_or_else(|| invalid("source: use human or teacher".into())))
        .transpose()?;
    for (field, value) in [("q", &q.q), ("expected", &q.expected)] {
        if let Some(text) = value
            && (text.is_empty() || text.chars().count() > 256 || text.contains('\0'))
        {
            return Err(invalid(format!(
                "{field}: give 1 to 256 characters, without NUL"
            )));
        }
    }
    let filter = CorrectionFilter {
        expected: q.expected,
        split,
        source,
        since: q.since,
        until: q.until,
        search: q.q,
        after: q.after.unwrap_or(0),
        limit,
        include_removed: q.include_removed.unwrap_or(false),
    };
    let data = state.db.list_corrections(domain.id, &filter).await?;
    let next_after = (data.len() as i64 == limit)
        .then(|| data.last().map(|c| c.id))
        .flatten();
    Ok(Json(Page { data, next_after }))
}

/// Inputs stored with more than one `expected`: those rows train and evaluate nothing until
/// a steward relabels or removes one side. A teacher's row a person overruled is no
/// contradiction: the person's answer stands.
pub async fn conflicts(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<List<Conflict>>> {
    let rows = state.db.correction_labels(domain.id, i64::MAX).await?;
    let overruled = flywheel_domain::outranked_by_people(
        rows.iter()
            .map(|(id, input, _, source)| (*id, input.as_str(), *source)),
    );
    let found = flywheel_domain::conflicts(
        rows.iter()
            .filter(|(id, ..)| !overruled.contains(id))
            .map(|(id, input, expected, _)| (*id, input.as_str(), expected.as_str())),
    );
    Ok(Json(found.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Relabel {
    expected: String,
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Removal {
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

#[derive(Serialize)]
pub struct Edited {
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<String>,
    removed: bool,
}

fn correction_id(name: &str, raw: &str) -> ApiResult<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::new(
            ErrorCode::CorrectionNotFound,
            format!("{name} has no correction `{raw}`"),
        )
    })
}

fn not_live(name: &str, id: i64) -> ApiError {
    ApiError::new(
        ErrorCode::CorrectionNotFound,
        format!("{name} has no live correction {id} (never stored, or removed)"),
    )
}

fn outcome(name: &str, id: i64, edit: Edit, expected: &str) -> ApiResult<()> {
    match edit {
        Edit::Done => Ok(()),
        Edit::NotFound => Err(not_live(name, id)),
        Edit::Duplicate { other, removed } => Err(ApiError::new(
            ErrorCode::CorrectionExists,
            format!(
                "correction {other}{} already says `{expected}` for this input; remove {id} instead",
                if removed { " (removed)" } else { "" }
            ),
        )),
        Edit::Changed => Err(ApiError::new(
            ErrorCode::EditConflict,
            format!("correction {id} changed while this edit was made; read it again"),
        )),
    }
}

/// Sets a correction's `expected`, checked and redacted as ingestion would; it keeps its split.
pub async fn relabel(
    (State(state), Extension(who), Path((name, id)), raw): Acting<(String, String)>,
) -> ApiResult<Json<Edited>> {
    let req: Relabel = parse_body(raw)?;
    let by = who.actor(req.by)?;
    check_reason(&req.reason)?;
    let domain = domain_row(&state, &name).await?;
    let id = correction_id(&name, &id)?;
    let expected = validate_expected(&domain.spec, &req.expected, state.limits.max_text_chars)?;
    let Some(row) = state
        .db
        .list_corrections(
            domain.id,
            &CorrectionFilter {
                after: id - 1,
                limit: 1,
                ..Default::default()
            },
        )
        .await?
        .into_iter()
        .find(|c| c.id == id)
    else {
        return Err(not_live(&name, id));
    };
    let hash = content_hash(&row.input, &expected);
    let edit = state
        .db
        .relabel_correction(domain.id, id, &expected, &hash, &by, &req.reason)
        .await?;
    outcome(&name, id, edit, &expected)?;
    Ok(Json(Edited {
        id,
        expected: Some(expected),
        removed: false,
    }))
}

/// Removes a correction: tombstoned, audited, and left out of every later snapshot.
pub async fn remove(
    (State(state), Extension(who), Path((name, id)), raw): Acting<(String, String)>,
) -> ApiResult<Json<Edited>> {
    let req: Removal = parse_body(raw)?;
    let by = who.actor(req.by)?;
    check_reason(&req.reason)?;
    let domain = domain_row(&state, &name).await?;
    let id = correction_id(&name, &id)?;
    let edit = state
        .db
        .remove_correction(domain.id, id, &by, &req.reason)
        .await?;
    outcome(&name, id, edit, "")?;
    Ok(Json(Edited {
        id,
        expected: None,
        removed: true,
    }))
}

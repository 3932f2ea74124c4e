//! What every resource's handlers share: reading a JSON body, finding what a path segment
//! names (or answering the matching 404), and the list envelope.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use flywheel_db::{DomainRow, JobRow, VersionRow};
use flywheel_domain::{JobId, VersionId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ApiError, AppState, ErrorCode, Principal};

pub type ApiResult<T> = Result<T, ApiError>;

/// What a handler that acts on a resource takes: the caller, the resource's path segments and
/// the request body (parsed by the handler, so that a bad one gets our error contract).
pub type Acting<P> = (
    State<AppState>,
    Extension<Principal>,
    Path<P>,
    Result<Bytes, BytesRejection>,
);

/// A list response: `{"data": [...]}`, room left for paging beside it.
#[derive(Serialize)]
pub struct List<T> {
    pub data: Vec<T>,
}

impl<T> From<Vec<T>> for List<T> {
    fn from(data: Vec<T>) -> Self {
        Self { data }
    }
}

/// The request body as bytes; a body over the limit is `payload_too_large`.
pub fn body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body is larger than the server accepts",
            )
        } else if timed_out(&e) {
            ApiError::new(
                ErrorCode::RequestTimeout,
                "the request body paused for too long; send it again without stalling",
            )
        } else {
            ApiError::new(ErrorCode::MalformedJson, e.body_text())
        }
    })
}

/// Whether `e` is, or was caused by, the router's body deadline.
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// Parses a request body: [`body`], then [`parse_json`].
pub fn parse_body<T: DeserializeOwned>(raw: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    parse_json(&body(raw)?)
}

/// Parses a JSON body, naming the path of the offending field on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::MalformedJson,
            "request body is empty: send a JSON object (the fields are in /openapi.json)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = if inner.is_syntax() || inner.is_eof() {
            ErrorCode::MalformedJson
        } else {
            ErrorCode::InvalidField
        };
        // serde's positions ("at line 1 column 9") mean nothing to the sender of a batch; the
        // path names the field instead.
        let text = inner.to_string();
        let text = match text.rfind(" at line ") {
            Some(i) if inner.line() > 0 => text[..i].to_owned(),
            _ => text,
        };
        // `?` is serde_path_to_error's "no path known" (the JSON ended or broke first).
        let message = if path == "." || path == "?" {
            format!("request body: {text}")
        } else {
            format!("{path}: {text}")
        };
        ApiError::new(code, message)
    })
}

/// A query string parsed into `T` (declare it `#[serde(deny_unknown_fields)]`): an unknown
/// key, a repeated one or a value of the wrong type is `422 invalid_field` naming the
/// parameter, with the `{code, message}` body of every refusal (axum's own `Query` answers
/// those in plain text).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        parse_query(&parts.uri).map(Query)
    }
}

/// The query string of `uri` as a `T`, or `422 invalid_field` naming the parameter.
pub fn parse_query<T: DeserializeOwned>(uri: &axum::http::Uri) -> ApiResult<T> {
    use axum::extract::rejection::QueryRejection;
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| {
            let text = match &e {
                QueryRejection::FailedToDeserializeQueryString(inner) => {
                    std::error::Error::source(inner)
                        .map_or_else(|| e.body_text(), |s| s.to_string())
                }
                _ => e.body_text(),
            };
            ApiError::new(ErrorCode::InvalidField, format!("query string: {text}"))
        })
}

/// The longest `reason` a decision, move or change may carry: a paragraph, not a document
/// (every alias read returns the latest move's).
pub const MAX_REASON_CHARS: usize = 2_000;
/// The longest name (a token's, an actor's `by`).
pub const MAX_NAME_CHARS: usize = 128;

/// A short text a person typed: not blank, at most `max` characters, no NUL.
pub fn short_text(field: &str, v: &str, max: usize) -> ApiResult<()> {
    let refuse = |why: String| {
        Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("{field}: {why}"),
        ))
    };
    if v.trim().is_empty() {
        return refuse("must not be empty".into());
    }
    let chars = v.chars().count();
    if chars > max {
        return refuse(format!("{chars} characters; at most {max}"));
    }
    if v.contains('\0') {
        return refuse("must not contain NUL (\\u0000)".into());
    }
    Ok(())
}

/// A decision's `reason`: see [`MAX_REASON_CHARS`].
pub fn check_reason(v: &str) -> ApiResult<()> {
    short_text("reason", v, MAX_REASON_CHARS)
}

/// The path's segments as a `T`; a segment that is not UTF-8 once percent-decoded is
/// `400 malformed_request` with the `{code, message}` body (axum's own `Path` answers in plain
/// text).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| malformed_path(&e.body_text()))
    }
}

/// `400 malformed_request` for a path axum could not decode, saying why.
pub fn malformed_path(why: &str) -> ApiError {
    ApiError::new(ErrorCode::MalformedRequest, format!("path: {why}"))
}

/// The domain the `{domain}` path segment names, looked up before the handler runs:
/// `404 domain_not_found` if there is none.
pub struct Domain(pub DomainRow);

impl FromRequestParts<AppState> for Domain {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| malformed_path(&e.body_text()))?;
        let name = params
            .iter()
            .find_map(|(key, value)| (key == "domain").then_some(value))
            .unwrap_or_default();
        domain_row(state, name).await.map(Domain)
    }
}

/// The domain named by a path segment, or `404 domain_not_found`.
pub async fn domain_row(state: &AppState, name: &str) -> ApiResult<DomainRow> {
    state.db.domain(name).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::DomainNotFound,
            format!("domain `{name}` does not exist"),
        )
    })
}

/// The version of `domain` named by `raw`, or `404 version_not_found`.
pub async fn version_row(state: &AppState, domain: &DomainRow, raw: &str) -> ApiResult<VersionRow> {
    let not_found = || {
        ApiError::new(
            ErrorCode::VersionNotFound,
            format!("version {}/{raw} does not exist", domain.spec.name),
        )
    };
    let v = VersionId::parse(raw).ok_or_else(not_found)?;
    state.db.version(domain.id, &v).await?.ok_or_else(not_found)
}

/// The job named by a path segment, or `404 job_not_found`.
pub async fn job_row(state: &AppState, raw: &str) -> ApiResult<JobRow> {
    let not_found = || {
        ApiError::new(
            ErrorCode::JobNotFound,
            format!("job `{raw}` does not exist"),
        )
    };
    let id = JobId::parse(raw).ok_or_else(not_found)?;
    state.db.job(&id).await?.ok_or_else(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct JobsQuery {
        status: Option<String>,
        limit: Option<i64>,
    }

    #[test]
    fn a_bad_query_string_is_invalid_field_naming_the_parameter() {
        let parse = |q: &str| parse_query::<JobsQuery>(&q.parse().unwrap());
        let ok = parse("/v1/jobs?status=queued&limit=5").unwrap();
        assert_eq!((ok.status.as_deref(), ok.limit), (Some("queued"), Some(5)));
        assert!(parse("/v1/jobs").is_ok());
        for (query, says) in [
            ("/v1/jobs?limit=abc", "limit: invalid digit"),
            ("/v1/jobs?colour=red", "unknown field `colour`"),
            ("/v1/jobs?limit=1&limit=2", "duplicate field `limit`"),
        ] {
            let e = parse(query).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField, "{query}");
            assert!(e.message.starts_with("query string: "), "{}", e.message);
            assert!(e.message.contains(says), "{query}: {}", e.message);
        }
    }
}

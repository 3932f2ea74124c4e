//! The one HTTP error contract: `{"code": "...", "message": "..."}`, with every code and its
//! status in one table.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flywheel_domain::{Invalid, InvalidKind};
use serde::Serialize;

/// Declares [`ErrorCode`] from the table below: each code once, beside its status, so a code
/// cannot be added without one, nor left out of [`ErrorCode::ALL`].
macro_rules! error_codes {
    ($($code:ident => $status:ident,)*) => {
        /// Stable, documented error codes. Clients match on these, never on messages.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($code,)*
        }

        impl ErrorCode {
            /// Every code, for the OpenAPI document.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$code,)*];

            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$code => StatusCode::$status,)*
                }
            }
        }
    };
}

// The table.
error_codes! {
    MalformedJson => BAD_REQUEST,
    MalformedRequest => BAD_REQUEST,
    Unauthenticated => UNAUTHORIZED,
    Forbidden => FORBIDDEN,
    InvalidField => UNPROCESSABLE_ENTITY,
    UnknownLabel => UNPROCESSABLE_ENTITY,
    UnknownBaseModel => UNPROCESSABLE_ENTITY,
    TextTooLong => PAYLOAD_TOO_LARGE,
    BatchTooLarge => PAYLOAD_TOO_LARGE,
    PayloadTooLarge => PAYLOAD_TOO_LARGE,
    RequestTimeout => REQUEST_TIMEOUT,
    UnsupportedMediaType => UNSUPPORTED_MEDIA_TYPE,
    RouteNotFound => NOT_FOUND,
    MethodNotAllowed => METHOD_NOT_ALLOWED,
    DomainNotFound => NOT_FOUND,
    DomainExists => CONFLICT,
    TokenNameTaken => CONFLICT,
    JobNotFound => NOT_FOUND,
    TokenNotFound => NOT_FOUND,
    VersionNotFound => NOT_FOUND,
    CorrectionNotFound => NOT_FOUND,
    CorrectionExists => CONFLICT,
    VersionNotPending => CONFLICT,
    VersionNotHeldBack => CONFLICT,
    ChampionChanged => CONFLICT,
    AliasConflict => CONFLICT,
    JobInFlight => CONFLICT,
    JobNotCancellable => CONFLICT,
    IdempotencyConflict => CONFLICT,
    EditConflict => CONFLICT,
    PredictionNotFound => NOT_FOUND,
    NoModel => SERVICE_UNAVAILABLE,
    VersionCorrupt => INTERNAL_SERVER_ERROR,
    Internal => INTERNAL_SERVER_ERROR,
}

impl ErrorCode {
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        let code = match e.kind {
            InvalidKind::Field => ErrorCode::InvalidField,
            InvalidKind::UnknownLabel => ErrorCode::UnknownLabel,
            InvalidKind::TooLong => ErrorCode::TextTooLong,
        };
        Self::new(code, e.to_string())
    }
}

impl From<flywheel_db::DbError> for ApiError {
    fn from(e: flywheel_db::DbError) -> Self {
        match e {
            flywheel_db::DbError::DomainExists(d) => Self::new(
                ErrorCode::DomainExists,
                format!("domain `{d}` already exists"),
            ),
            flywheel_db::DbError::TokenNameTaken(name) => Self::new(
                ErrorCode::TokenNameTaken,
                format!("name: a live token is already named `{name}`; pick another or revoke it"),
            ),
            other => {
                tracing::error!(error = %other, "database error");
                Self::new(ErrorCode::Internal, "internal error; see the server log")
            }
        }
    }
}

impl From<flywheel_registry::RegistryError> for ApiError {
    fn from(e: flywheel_registry::RegistryError) -> Self {
        match e {
            flywheel_registry::RegistryError::NoSuchVersion { domain, version } => Self::new(
                ErrorCode::VersionNotFound,
                format!("version {domain}/{version} does not exist"),
            ),
            e @ flywheel_registry::RegistryError::AliasConflict { .. } => Self::new(
                ErrorCode::AliasConflict,
                format!("{e}; read it again and retry"),
            ),
            e @ flywheel_registry::RegistryError::NoSuchModel(_) => {
                Self::new(ErrorCode::UnknownBaseModel, e.to_string())
            }
            e @ flywheel_registry::RegistryError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt registry object");
                Self::new(
                    ErrorCode::VersionCorrupt,
                    format!("{e}; the version is refused until an operator restores it"),
                )
            }
            other => {
                tracing::error!(error = %other, "registry error");
                Self::new(ErrorCode::Internal, "internal error; see the server log")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self)).into_response()
    }
}

impl From<flywheel_promotion::PromotionError> for ApiError {
    fn from(e: flywheel_promotion::PromotionError) -> Self {
        use flywheel_promotion::PromotionError::*;
        match e {
            Db(e) => e.into(),
            Registry(e) => e.into(),
            NotPending { domain, version } => Self::new(
                ErrorCode::VersionNotPending,
                format!("version {domain}/{version} is not awaiting approval"),
            ),
            NotHeldBack { domain, version } => Self::new(
                ErrorCode::VersionNotHeldBack,
                format!(
                    "version {domain}/{version} is not held back; only a held-back version is judged again"
                ),
            ),
            NeverPromoted {
                domain,
                version,
                status,
            } => Self::new(
                ErrorCode::InvalidField,
                format!(
                    "to: version {domain}/{version} was never promoted ({}); only a version that was live can come back",
                    status.as_str()
                ),
            ),
            NotYetLive { domain, version } => Self::new(
                ErrorCode::InvalidField,
                format!(
                    "to: version {domain}/{version} has not reached production yet (its approval is under way); only a version that was live can come back"
                ),
            ),
            AlreadyProduction(version) => Self::new(
                ErrorCode::InvalidField,
                format!("to: {version} is already production"),
            ),
            ProductionByHand => Self::new(
                ErrorCode::InvalidField,
                "production moves through the gate, /approve and /rollback, not by hand",
            ),
        }
    }
}

/// The backstop of the contract: a refusal made outside our handlers (an extractor or layer of
/// axum's or tower-http's, in plain text or with no body) is rewritten to `{code, message}`,
/// its text kept as the message. Our own errors pass through untouched.
pub async fn contract(response: Response) -> Response {
    let status = response.status();
    // JSON is the API's own refusal, HTML the console's error page.
    let ours = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if status.as_u16() < 400 || ours {
        return response;
    }
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::InvalidField,
        s if s.is_client_error() => ErrorCode::MalformedRequest,
        _ => ErrorCode::Internal,
    };
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() || code == ErrorCode::Internal {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(code, message).into_response();
    // The status is the one the refusal chose, even where our table maps the code elsewhere.
    *out.status_mut() = status;
    out
}

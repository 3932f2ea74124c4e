//! Console sign-in: an API token pasted once becomes a server-side session behind an
//! HttpOnly, `SameSite=Strict` cookie (`Secure` behind TLS), which acts with the token's role
//! and scope for as long as both live. Every form carries the session's anti-forgery token;
//! the sign-in form, before any session, carries one it also sets as a short-lived cookie.

use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::Utc;
use cookie::{Cookie, SameSite};
use flywheel_domain::Role;
use flywheel_domain::auth::{hash_token, new_token};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{PREFIX, PageResult, page_error, render};
use crate::{ApiError, AppState, AuthMode, Principal};

const SESSION_COOKIE: &str = "flywheel_session";
const SIGN_IN_COOKIE: &str = "flywheel_sign_in";
/// How long a sign-in lasts; a steward signs in again each working day.
const SESSION_HOURS: i64 = 12;
const SIGN_IN_FORM_MINUTES: u64 = 15;

/// The signed-in session a page request came with (set by the permission check).
#[derive(Debug, Clone)]
pub struct Session {
    hash: String,
    /// The anti-forgery token the session's forms carry.
    pub csrf: String,
}

/// The caller a request's session cookie stands for, if it names a live session whose token
/// (when the server requires tokens) is still live.
pub(crate) async fn principal_of(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Principal, Session)>, ApiError> {
    let Some(secret) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let hash = hash_token(&secret);
    let Some(row) = state.db.session(&hash).await? else {
        return Ok(None);
    };
    if row.ended_at.is_some() || row.expires_at <= Utc::now() {
        return Ok(None);
    }
    let principal = match (&row.token_hash, state.auth) {
        (Some(token_hash), _) => match state.db.token_by_hash(token_hash).await? {
            Some(t) if t.revoked_at.is_none() => Principal {
                name: t.name,
                role: t.role,
                domains: t.domains,
                authenticated: true,
                token_hash: Some(token_hash.clone()),
            },
            _ => return Ok(None),
        },
        // Without tokens every caller is an admin; the session names who decides.
        (None, AuthMode::Off) => Principal {
            name: row.name,
            role: Role::Admin,
            domains: Vec::new(),
            authenticated: true,
            token_hash: None,
        },
        (None, AuthMode::Required) => return Ok(None),
    };
    Ok(Some((
        principal,
        Session {
            hash,
            csrf: row.csrf,
        },
    )))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// Whether the client reached us over TLS (through a proxy that terminates it).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn set_cookie(
    headers: &HeaderMap,
    name: &'static str,
    value: String,
    path: &'static str,
    max_age: Duration,
) -> (header::HeaderName, HeaderValue) {
    let c = Cookie::build((name, value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(over_tls(headers))
        .path(path)
        .max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64))
        .build();
    (
        header::SET_COOKIE,
        HeaderValue::from_str(&c.to_string()).expect("cookie is ASCII"),
    )
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A form that must carry its session's anti-forgery token; anything else is refused before
/// the handler runs.
pub(crate) struct CsrfForm<T>(pub T);

/// A console form: it names the anti-forgery token it carries.
pub(crate) trait Signed {
    fn csrf(&self) -> &str;
}

impl<T: DeserializeOwned + Signed> FromRequest<AppState> for CsrfForm<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let session = req.extensions().get::<Session>().cloned();
        let Form(form) = Form::<T>::from_request(req, state).await.map_err(|e| {
            let text = e.body_text();
            if text.contains("`csrf`") {
                return forged();
            }
            page_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "The form was not complete ({}). Go back, fill in every field and send it again.",
                    text.trim_start_matches("Failed to deserialize form body: ")
                ),
            )
        })?;
        match session {
            Some(s) if same_secret(&s.csrf, form.csrf()) => Ok(CsrfForm(form)),
            _ => Err(forged()),
        }
    }
}

fn forged() -> Response {
    page_error(
        StatusCode::FORBIDDEN,
        "This form did not come from your console session (its anti-forgery token is missing \
         or stale). Reload the page and try again.",
    )
}

#[derive(Deserialize)]
pub struct SignInQuery {
    #[serde(default)]
    next: Option<String>,
    /// Set when the request that sent us here carried a session that has ended.
    #[serde(default)]
    ended: Option<String>,
}

/// Where to go after signing in: a console page, never another site.
fn next_page(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with(PREFIX)
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n
        }
        _ => PREFIX,
    }
}

pub async fn sign_in_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<SignInQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // A query it cannot read only loses where to go next.
    let query = query.ok().map(|q| q.0);
    let ended = query.as_ref().is_some_and(|q| q.ended.is_some());
    let next = query.and_then(|q| q.next);
    let mut page = sign_in_form(&state, &headers, next_page(next.as_deref()), None, ended);
    if ended {
        *page.status_mut() = StatusCode::OK;
    }
    page
}

fn sign_in_form(
    state: &AppState,
    headers: &HeaderMap,
    next: &str,
    refused: Option<&str>,
    ended: bool,
) -> Response {
    let csrf = new_token();
    let mut page = render(
        "sign_in.html",
        minijinja::context! {
            title => "Sign in",
            csrf => csrf,
            next => next,
            needs_token => state.auth == AuthMode::Required,
            refused => refused,
            ended => ended,
        },
    );
    if refused.is_some() {
        *page.status_mut() = StatusCode::UNAUTHORIZED;
    }
    let (name, value) = set_cookie(
        headers,
        SIGN_IN_COOKIE,
        csrf,
        "/console/sign-in",
        Duration::from_secs(SIGN_IN_FORM_MINUTES * 60),
    );
    page.headers_mut().append(name, value);
    page
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<SignIn>, axum::extract::rejection::FormRejection>,
) -> PageResult {
    let Ok(Form(form)) = form else {
        let why = "The form was not complete.";
        return Ok(sign_in_form(&state, &headers, PREFIX, Some(why), false));
    };
    let next = next_page(form.next.as_deref()).to_owned();
    let expected = cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_secret(&expected, &form.csrf) {
        return Ok(forged());
    }
    let who: Result<(Option<String>, String), &str> = match state.auth {
        AuthMode::Required => {
            let hash = hash_token(form.token.trim());
            match state.db.token_by_hash(&hash).await? {
                Some(t) if t.revoked_at.is_none() && t.role != Role::Serving => {
                    Ok((Some(hash), t.name))
                }
                Some(t) if t.revoked_at.is_none() => Err(
                    "A serving token is for applications and cannot sign in; use a steward, \
                     department or admin token.",
                ),
                Some(_) => Err("This token was revoked."),
                None => Err(
                    "This token is not valid. Paste the whole token your platform team gave you.",
                ),
            }
        }
        AuthMode::Off => {
            let name = form.name.trim();
            if name.is_empty() || name.chars().count() > 128 || name.contains('\0') {
                Err("Give your name (at most 128 characters): decisions are signed with it.")
            } else {
                Ok((None, name.to_owned()))
            }
        }
    };
    let (token_hash, name) = match who {
        Ok(who) => who,
        Err(why) => return Ok(sign_in_form(&state, &headers, &next, Some(why), false)),
    };
    let secret = new_token();
    let csrf = new_token();
    let now = Utc::now();
    // Expired sessions are forgotten as new ones open, so the table stays small.
    state.db.purge_sessions(now).await?;
    state
        .db
        .open_session(
            &hash_token(&secret),
            token_hash.as_deref(),
            &name,
            &csrf,
            now + chrono::Duration::hours(SESSION_HOURS),
        )
        .await?;
    let (k, v) = set_cookie(
        &headers,
        SESSION_COOKIE,
        secret,
        "/",
        Duration::from_secs(SESSION_HOURS as u64 * 3600),
    );
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().append(k, v);
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignOut {
    csrf: String,
}

impl Signed for SignOut {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

pub async fn sign_out(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    headers: HeaderMap,
    CsrfForm(_): CsrfForm<SignOut>,
) -> PageResult {
    state.db.end_session(&session.hash).await?;
    let (k, v) = set_cookie(&headers, SESSION_COOKIE, String::new(), "/", Duration::ZERO);
    let mut response = Redirect::to("/console/sign-in").into_response();
    response.headers_mut().append(k, v);
    Ok(response)
}

/// Where a request without a live session goes: the sign-in page, then back here.
///
/// A page opened from a link in another site (a webhook's message in chat or mail) arrives
/// without the `SameSite=Strict` cookie even when the session is live; the browser is asked
/// to open it again from here, which sends the cookie, and only then sent to sign in. A
/// form's target is no page to come back to: after sign-in it is the inbox.
pub(crate) fn to_sign_in(method: &Method, headers: &HeaderMap, path_and_query: &str) -> Response {
    let from_elsewhere = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    if method == Method::GET && from_elsewhere {
        let here = flywheel_evaluator::escape_html(path_and_query);
        let page = format!(
            "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={here}\">\
             <title>Opening…</title><p><a href=\"{here}\">Continue to flywheel</a></p>"
        );
        return (
            [(header::CACHE_CONTROL, "no-store")],
            axum::response::Html(page),
        )
            .into_response();
    }
    let next = if method == Method::GET {
        path_and_query
    } else {
        PREFIX
    };
    let next = percent_encoding::utf8_percent_encode(next, NEXT_KEEPS);
    // A cookie that named a session which has ended: say so on the sign-in page.
    let ended = if cookie(headers, SESSION_COOKIE).is_some() {
        "&ended=1"
    } else {
        ""
    };
    Redirect::to(&format!("/console/sign-in?next={next}{ended}")).into_response()
}

/// What `next=` leaves as it is: unreserved characters and the path's slashes.
const NEXT_KEEPS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

//! OpenAI's chat completions over a domain's model, so an app that already talks to an
//! OpenAI-style endpoint points at flywheel and changes nothing else: `model` names the domain
//! (`banking`, or `banking@staging` for an alias), the last user message is the input, and the
//! answer — the small model's, or the teacher's when it is unsure — comes back in OpenAI's
//! shapes, as server-sent events when `stream` is set.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use flywheel_serving::Answer;
use serde::Deserialize;
use serde_json::json;

use super::predict::max_tokens;
use super::shared::{ApiResult, domain_row, parse_body};
use crate::{ApiError, AppState, ErrorCode, Principal};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<u32>,
    // Settings OpenAI clients send by default. Answers are greedy (the answer the gate
    // measured), so these are accepted and change nothing.
    #[serde(default, rename = "temperature")]
    _temperature: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "top_p")]
    _top_p: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "seed")]
    _seed: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "stop")]
    _stop: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "user")]
    _user: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "presence_penalty")]
    _presence_penalty: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "frequency_penalty")]
    _frequency_penalty: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "stream_options")]
    _stream_options: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Content,
    #[serde(default, rename = "name")]
    _name: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> Option<String> {
        match self {
            Content::Text(t) => Some(t.clone()),
            Content::Parts(parts) => {
                let texts: Vec<&str> = parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.as_deref())
                    .collect();
                (!texts.is_empty()).then(|| texts.join("\n"))
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidField, message)
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: ChatRequest = parse_body(raw)?;
    let (name, alias) = match req.model.split_once('@') {
        Some((name, alias)) => (name, Some(alias)),
        None => (req.model.as_str(), None),
    };
    // The route admits the role; the domain comes from the body, so its scope is checked here.
    if !who.sees(name) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("this token is not scoped to domain `{name}`"),
        ));
    }
    let domain = domain_row(&state, name).await?;
    if let Some(alias) = alias
        && !flywheel_domain::is_alias_name(alias)
    {
        return Err(invalid(
            "model: `<domain>` or `<domain>@<alias>`, the alias 1 to 64 letters, digits, - or _",
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(invalid("n: one answer per request"));
    }
    let input = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| invalid("messages: there is no user message to answer"))?
        .content
        .text()
        .ok_or_else(|| invalid("messages: the last user message has no text"))?;
    flywheel_domain::check_text(
        "messages: the user message",
        &input,
        state.limits.max_text_chars,
    )?;
    let limit = max_tokens(req.max_completion_tokens.or(req.max_tokens))?;
    let answer = state
        .serving
        .predict(&domain, alias, &[input], limit)
        .await?
        .remove(0)?;
    let id = format!(
        "chatcmpl-{}",
        answer
            .prediction_id
            .as_ref()
            .map_or_else(|| uuid::Uuid::now_v7().to_string(), |p| p.to_string())
    );
    let created = chrono::Utc::now().timestamp();
    if req.stream {
        return Ok(stream(&id, created, &req.model, &answer));
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.output},
            "finish_reason": "stop",
            "logprobs": null,
        }],
        "flywheel": answer,
    }))
    .into_response())
}

/// The answer as OpenAI's chunk events: the role, the text a word at a time, the finish with
/// flywheel's fields, then `[DONE]`. The answer is whole before the first event: whether the
/// small model's answer stands depends on its confidence over all of it.
fn stream(id: &str, created: i64, model: &str, answer: &Answer) -> Response {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    events.extend(
        answer
            .output
            .split_inclusive(' ')
            .map(|piece| chunk(json!({"content": piece}), None)),
    );
    let mut last = chunk(json!({}), Some("stop"));
    last["flywheel"] = json!(answer);
    events.push(last);
    let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from(body),
    )
        .into_response()
}

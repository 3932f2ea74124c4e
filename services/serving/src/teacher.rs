//! Asking a domain's teacher: an OpenAI-compatible chat-completions endpoint, behind a
//! deadline, one retry, an hourly budget and a circuit breaker.
//!
//! A teacher that fails five times in a row is left alone for thirty seconds (then one call
//! tries it again while the others go without), so a dead teacher costs each prediction
//! nothing but the check. The budget and the breaker are per process: N replicas may make N
//! times `max_calls_per_hour` calls.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flywheel_domain::{DomainSpec, Task, TeacherEndpoint};
use serde_json::json;

const TRIP_AFTER: u32 = 5;
const OPEN_FOR: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

/// Why the teacher gave no usable answer; `code()` is what predictions and metrics record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeacherError {
    #[error("the domain has no teacher")]
    Unconfigured,
    #[error("the teacher's API key variable `{0}` is not set on the server")]
    NoApiKey(String),
    #[error("the teacher's hourly budget ({0} calls an hour) is spent")]
    OverBudget(u32),
    #[error("the teacher failed {TRIP_AFTER} times in a row; calls resume shortly")]
    CircuitOpen,
    #[error("the teacher did not answer within {0} ms")]
    Timeout(u32),
    #[error("the teacher's endpoint answered HTTP {0}")]
    Status(u16),
    #[error("could not reach the teacher: {0}")]
    Transport(String),
    #[error("the teacher's answer is not a chat completion: {0}")]
    Malformed(String),
    #[error("the teacher answered `{0}`, which is not one of the labels")]
    NotALabel(String),
}

impl TeacherError {
    pub fn code(&self) -> &'static str {
        match self {
            TeacherError::Unconfigured => "no_teacher",
            TeacherError::NoApiKey(_) => "no_api_key",
            TeacherError::OverBudget(_) => "over_budget",
            TeacherError::CircuitOpen => "circuit_open",
            TeacherError::Timeout(_) => "timeout",
            TeacherError::Status(_) => "http_error",
            TeacherError::Transport(_) => "unreachable",
            TeacherError::Malformed(_) => "malformed",
            TeacherError::NotALabel(_) => "not_a_label",
        }
    }

    /// Whether the teacher itself failed (counts toward the breaker), rather than answered
    /// something unusable or was not asked.
    fn is_failure(&self) -> bool {
        matches!(
            self,
            TeacherError::Timeout(_)
                | TeacherError::Status(_)
                | TeacherError::Transport(_)
                | TeacherError::Malformed(_)
        )
    }
}

#[derive(Default)]
struct Gate {
    failures: u32,
    open_until: Option<Instant>,
    /// Half open: the one call trying the teacher again is under way.
    trial: bool,
    /// Calls in the last hour, kept only under a budget.
    calls: VecDeque<Instant>,
}

pub(crate) struct Teachers {
    client: reqwest::Client,
    gates: Mutex<HashMap<String, Gate>>,
}

impl Teachers {
    pub(crate) fn new() -> Self {
        Self {
            client: reqwest::Client::new(),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// The teacher's answer to `input`: for classification, one of the domain's labels.
    pub(crate) async fn ask(&self, spec: &DomainSpec, input: &str) -> Result<String, TeacherError> {
        let teacher = spec
            .serving
            .teacher
            .as_ref()
            .ok_or(TeacherError::Unconfigured)?;
        let key = match &teacher.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| TeacherError::NoApiKey(var.clone()))?),
            None => None,
        };
        self.admit(spec.name.as_str(), teacher)?;
        let result = self.call(spec, teacher, key.as_deref(), input).await;
        let mut gates = self.gates.lock().expect("gates lock");
        let gate = gates.entry(spec.name.to_string()).or_default();
        gate.trial = false;
        match &result {
            Err(e) if e.is_failure() => {
                gate.failures += 1;
                if gate.failures >= TRIP_AFTER {
                    gate.open_until = Some(Instant::now() + OPEN_FOR);
                }
            }
            // An answer, even one that is not a label: the teacher is up.
            _ => {
                gate.failures = 0;
                gate.open_until = None;
            }
        }
        result
    }

    /// Checks the breaker and the budget, and counts the call.
    fn admit(&self, domain: &str, teacher: &TeacherEndpoint) -> Result<(), TeacherError> {
        let mut gates = self.gates.lock().expect("gates lock");
        let gate = gates.entry(domain.to_owned()).or_default();
        let now = Instant::now();
        if let Some(until) = gate.open_until {
            // Half open: one call tries the teacher again, the others wait for its verdict;
            // a failure opens the breaker again at once.
            if now < until || gate.trial {
                return Err(TeacherError::CircuitOpen);
            }
            gate.trial = true;
            gate.failures = TRIP_AFTER - 1;
        }
        if let Some(max) = teacher.max_calls_per_hour {
            while gate
                .calls
                .front()
                .is_some_and(|t| now.duration_since(*t) >= HOUR)
            {
                gate.calls.pop_front();
            }
            if gate.calls.len() >= max as usize {
                gate.trial = false;
                return Err(TeacherError::OverBudget(max));
            }
            gate.calls.push_back(now);
        }
        Ok(())
    }

    async fn call(
        &self,
        spec: &DomainSpec,
        teacher: &TeacherEndpoint,
        key: Option<&str>,
        input: &str,
    ) -> Result<String, TeacherError> {
        let url = format!("{}/chat/completions", teacher.url.trim_end_matches('/'));
        let body = json!({
            "model": teacher.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": system_prompt(spec, teacher)},
                {"role": "user", "content": input},
            ],
        });
        let attempts = async {
            let mut last = TeacherError::Transport("not tried".into());
            for attempt in 0..2 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut request = self.client.post(&url).json(&body);
                if let Some(key) = key {
                    request = request.bearer_auth(key);
                }
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        let value: serde_json::Value = response
                            .json()
                            .await
                            .map_err(|e| TeacherError::Malformed(e.to_string()))?;
                        return value["choices"][0]["message"]["content"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| {
                                TeacherError::Malformed("no choices[0].message.content".into())
                            });
                    }
                    Ok(response) => {
                        let status = response.status();
                        last = TeacherError::Status(status.as_u16());
                        // A refusal of the request itself will not change on a retry.
                        if status.is_client_error() && status.as_u16() != 429 {
                            return Err(last);
                        }
                    }
                    Err(e) => last = TeacherError::Transport(e.to_string()),
                }
            }
            Err(last)
        };
        let text = tokio::time::timeout(
            Duration::from_millis(u64::from(teacher.timeout_ms)),
            attempts,
        )
        .await
        .map_err(|_| TeacherError::Timeout(teacher.timeout_ms))??;
        match spec.task {
            Task::Classification => {
                as_label(&text, &spec.labels).ok_or_else(|| TeacherError::NotALabel(clip(&text)))
            }
            Task::Generation => Ok(text),
        }
    }
}

fn system_prompt(spec: &DomainSpec, teacher: &TeacherEndpoint) -> String {
    let prompt = teacher.prompt.clone().unwrap_or_else(|| match spec.task {
        Task::Classification => {
            format!("Classify the user's message for the {} domain.", spec.name)
        }
        Task::Generation => format!("Answer the user's message for the {} domain.", spec.name),
    });
    match spec.task {
        Task::Classification => format!(
            "{prompt}\n\nAnswer with exactly one of these labels and nothing else:\n{}",
            spec.labels.join("\n")
        ),
        Task::Generation => prompt,
    }
}

/// The label a teacher's answer names: exactly, or after trimming quotes and punctuation, or
/// ignoring case and the difference between spaces and underscores.
pub(crate) fn as_label(answer: &str, labels: &[String]) -> Option<String> {
    let trimmed = answer
        .trim()
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`' | '.' | '*'))
        .trim();
    if let Some(l) = labels.iter().find(|l| l.as_str() == trimmed) {
        return Some(l.clone());
    }
    let fold = |s: &str| s.to_lowercase().replace([' ', '-'], "_");
    let want = fold(trimmed);
    labels.iter().find(|l| fold(l) == want).cloned()
}

fn clip(text: &str) -> String {
    let mut clipped: String = text.chars().take(80).collect();
    if clipped.len() < text.len() {
        clipped.push('…');
    }
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_teachers_answer_is_mapped_onto_the_labels_or_refused() {
        let labels: Vec<String> = ["card_arrival", "lost_or_stolen_card"]
            .map(String::from)
            .to_vec();
        for answer in [
            "card_arrival",
            "  \"card_arrival\".\n",
            "Card Arrival",
            "`card-arrival`",
        ] {
            assert_eq!(
                as_label(answer, &labels).as_deref(),
                Some("card_arrival"),
                "{answer:?}"
            );
        }
        for answer in ["", "card", "The label is card_arrival", "arrival_card"] {
            assert_eq!(as_label(answer, &labels), None, "{answer:?}");
        }
    }
}

//! Serving closes the loop: `/predict` escalates what the small model is unsure of to a
//! teacher (a real OpenAI-compatible HTTP server played by the test, answering from the
//! dataset's gold labels), the teacher's answers become corrections, the scheduler trains, the
//! gate promotes, and the next window of inputs escalates far less.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::TestApp;

/// An OpenAI-compatible chat endpoint that answers each user message with its gold label.
struct Teacher {
    url: String,
    calls: Arc<AtomicUsize>,
    /// While set, every call answers 503.
    failing: Arc<AtomicBool>,
    /// Every question asked, as it arrived.
    asked: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Clone)]
struct TeacherState {
    gold: Arc<HashMap<String, String>>,
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn chat(
    axum::extract::State(s): axum::extract::State<TeacherState>,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    s.calls.fetch_add(1, Ordering::SeqCst);
    // A large model takes its time.
    tokio::time::sleep(Duration::from_millis(5)).await;
    if s.failing.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
    }
    let system = body["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(
        system.contains("Answer with exactly one of these labels"),
        "{system}"
    );
    let question = body["messages"][1]["content"].as_str().unwrap_or_default();
    s.asked.lock().unwrap().push(question.to_owned());
    let answer = s
        .gold
        .get(question)
        .cloned()
        .unwrap_or_else(|| "I am not sure".into());
    axum::Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": answer}}],
    }))
    .into_response()
}

impl Teacher {
    async fn start(rows: &[Value]) -> Self {
        let gold: HashMap<String, String> = rows
            .iter()
            .map(|r| {
                (
                    r["input"].as_str().unwrap().to_owned(),
                    r["expected"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let state = TeacherState {
            gold: Arc::new(gold),
            calls: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
            asked: Default::default(),
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            calls: state.calls,
            failing: state.failing,
            asked: state.asked,
            stop: Some(stop),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sends each input alone, as an application would, and returns the answers.
async fn predict_each(app: &TestApp, inputs: &[&Value]) -> Vec<Value> {
    let mut answers = Vec::new();
    for row in inputs {
        let (status, answer) = app
            .post(
                "/v1/domains/banking/predict",
                &json!({"input": row["input"]}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        answers.push(answer);
    }
    answers
}

fn escalated_share(answers: &[Value]) -> f64 {
    answers.iter().filter(|a| a["escalated"] == true).count() as f64 / answers.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacher_answers_train_the_model_that_then_answers_alone_and_swaps_without_failing() {
    let app = TestApp::spawn().await;
    let mut teacher = Teacher::start(&app.rows).await;
    let mut spec = json!({
        "name": "banking",
        "task": "classification",
        "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 1, "holdout_fraction": 0.2, "min_accuracy": 0.4,
                   "min_improvement": 0.02, "target_accuracy": 0.75},
        "training": {"n_epochs": 16},
        "serving": {"teacher": {"url": teacher.url, "model": "gold-teacher", "timeout_ms": 5000}}
    });
    // Two windows of real inputs, every label in each: three rows in four, then the rest.
    let first: Vec<&Value> = (0..3)
        .flat_map(|k| app.rows.iter().skip(k).step_by(4))
        .collect();
    let second: Vec<&Value> = app.rows.iter().skip(3).step_by(4).collect();
    // The first run starts once every teacher answer of the first window is stored, so it
    // trains on the same rows every time.
    let distinct = first
        .iter()
        .map(|r| flywheel_domain::normalize_text(r["input"].as_str().unwrap()))
        .collect::<std::collections::HashSet<_>>()
        .len();
    spec["policy"]["min_new_corrections"] = json!(distinct);
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");

    // In a batch, an input nothing can answer (no model yet, and the teacher's answer is not
    // a label) is an error in its place; the others are answered.
    let (status, body) = app
        .post(
            "/v1/domains/banking/predict",
            &json!({"inputs": [first[0]["input"], "a question nobody labelled"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["answered_by"], "teacher", "{body}");
    assert_eq!(body["data"][1]["error"]["code"], "no_model", "{body}");
    assert!(
        body["data"][1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not one of the labels"),
        "{body}"
    );

    // Round 1: no production model yet, so everything escalates and the teacher answers.
    let mut round1 = Vec::new();
    for chunk in first.chunks(25) {
        let inputs: Vec<&Value> = chunk.iter().map(|r| &r["input"]).collect();
        let (status, body) = app
            .post("/v1/domains/banking/predict", &json!({"inputs": inputs}))
            .await;
        assert_eq!(status, 200, "{body}");
        round1.extend(body["data"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(round1.len(), first.len());
    assert_eq!(escalated_share(&round1), 1.0);
    for (answer, row) in round1.iter().zip(&first) {
        assert_eq!(answer["answered_by"], "teacher", "{answer}");
        assert_eq!(answer["output"], row["expected"], "{answer}");
        assert!(answer["version"].is_null(), "{answer}");
    }
    assert!(teacher.calls.load(Ordering::SeqCst) >= first.len());

    // The teacher's answers became corrections; enough of them start a run that promotes.
    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["decision"]["promote"], true, "{job}");
    let (_, stored) = app
        .get("/v1/domains/banking/corrections?source=teacher&limit=1000")
        .await;
    let stored = stored["data"].as_array().unwrap();
    assert_eq!(stored.len(), distinct, "teacher corrections");
    assert_eq!(stored[0]["teacher"], "gold-teacher");

    // Round 2: unseen inputs, one request each. The promoted model answers most of them.
    let round2 = predict_each(&app, &second).await;
    let share2 = escalated_share(&round2);
    let mine: Vec<&Value> = round2
        .iter()
        .filter(|a| a["answered_by"] == "model")
        .collect();
    let right = mine
        .iter()
        .zip(second.iter())
        .filter(|(a, r)| a["output"] == r["expected"])
        .count();
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    println!(
        "escalated: round 1 {:.0}%, round 2 {:.0}% ({} answered by the model); v1: {}",
        100.0 * escalated_share(&round1),
        100.0 * share2,
        mine.len(),
        versions["data"][0]["metrics"]
    );
    assert!(
        share2 <= 0.5,
        "round 2 still escalated {:.0}%",
        100.0 * share2
    );
    let _ = right;
    for answer in &mine {
        assert_eq!(answer["version"], "v1", "{answer}");
        assert!(answer["confidence"].as_f64().unwrap() > 0.0);
    }

    // The same model behind OpenAI's chat completions: the label is the message.
    let (status, completion) = app
        .post(
            "/v1/chat/completions",
            &json!({"model": "banking", "messages": [{"role": "user", "content": second[1]["input"]}]}),
        )
        .await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(
        completion["choices"][0]["message"]["content"], round2[1]["output"],
        "{completion}"
    );
    assert_eq!(completion["flywheel"]["alias"], "production");

    // Feedback: a person corrects one answer; the same feedback again stores nothing, other
    // feedback on it conflicts, and a prediction never logged is 404.
    let id = round2[0]["prediction_id"].as_str().unwrap();
    let wrong = app
        .labels
        .iter()
        .find(|l| **l != round2[0]["output"])
        .unwrap();
    let path = format!("/v1/predictions/{id}/feedback");
    let correction = json!({"expected": wrong, "by": "agent@bank.example"});
    for stored in [true, false] {
        let (status, body) = app.post(&path, &correction).await;
        assert_eq!(
            (status, body["stored"].as_bool()),
            (202, Some(stored)),
            "{body}"
        );
    }
    let (status, body) = app
        .post(&path, &json!({"correct": true, "by": "agent@bank.example"}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );
    let (_, human) = app
        .get("/v1/domains/banking/corrections?source=human")
        .await;
    assert_eq!(human["data"][0]["expected"], json!(wrong), "{human}");
    assert_eq!(
        human["data"][0]["client_id"],
        json!(format!("feedback-{id}")),
        "{human}"
    );
    let (status, body) = app
        .post(
            &format!("/v1/predictions/{}/feedback", uuid::Uuid::now_v7()),
            &json!({"correct": true}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("prediction_not_found"))
    );

    // The teacher fails, then dies: every prediction still answers, from the model.
    teacher.failing.store(true, Ordering::SeqCst);
    let failing = predict_each(&app, &second[..20]).await;
    teacher.kill();
    let dead = predict_each(&app, &second[20..40]).await;
    for answer in failing.iter().chain(&dead) {
        assert_eq!(answer["answered_by"], "model", "{answer}");
        if answer["escalated"] == true {
            let why = answer["teacher_error"].as_str().unwrap();
            assert!(
                ["http_error", "unreachable", "circuit_open", "timeout"].contains(&why),
                "{answer}"
            );
        }
    }

    // A second version, then production moved back mid-stream: no request fails, and the
    // answers switch to the version production names.
    let (status, body) = app
        .patch(
            "/v1/domains/banking",
            &json!({"policy": {"min_improvement": -1.0, "significance_level": 1.0,
                                 "max_label_drop": 1.0},
                      "reason": "any candidate as good as v1 may go live", "by": "ops"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(status, 201, "{body}");
    let job = app.wait_for_job(2).await;
    assert_eq!(job["decision"]["promote"], true, "{job}");
    let stream = {
        let (client, base) = (app.client.clone(), app.base.clone());
        let inputs: Vec<Value> = second.iter().map(|r| r["input"].clone()).collect();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(12) {
                for input in &inputs {
                    let resp = client
                        .post(format!("{base}/v1/domains/banking/predict"))
                        .json(&json!({"inputs": [input]}))
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.unwrap();
                    assert_eq!(status, 200, "a request failed during the swap: {body}");
                    seen.push((started.elapsed(), body["data"][0]["version"].clone()));
                    if started.elapsed() >= Duration::from_secs(12) {
                        break;
                    }
                }
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = app
        .post(
            "/v1/domains/banking/rollback",
            &json!({"to": "v1", "reason": "v2 answers worse in the branch", "by": "ops"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rolled_back = Instant::now();
    let seen = stream.await.unwrap();
    assert!(seen.iter().any(|(_, v)| v == "v2"), "v2 never answered");
    let (at, last) = seen.last().unwrap();
    assert_eq!(
        last, "v1",
        "production moved back, but answers still come from {last}"
    );
    let _ = (at, rolled_back);

    // A canary takes a share of the traffic; staging answers in shadow, behind the answer.
    for (alias, to) in [("canary", "v2"), ("staging", "v2")] {
        let (status, body) = app
            .put(
                &format!("/v1/domains/banking/aliases/{alias}"),
                &json!({"to": to, "reason": "try v2 on live traffic", "by": "ops"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = app
        .patch(
            "/v1/domains/banking",
            &json!({"serving": {"canary_share": 0.5, "shadow": "staging"},
                      "reason": "half the traffic to the canary, staging in shadow", "by": "ops"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let split = predict_each(&app, &second[..40]).await;
    let canary = split.iter().filter(|a| a["alias"] == "canary").count();
    assert!(
        (5..=35).contains(&canary),
        "{canary} of 40 went to the canary"
    );
    for answer in &split {
        let want = if answer["alias"] == "canary" {
            "v2"
        } else {
            "v1"
        };
        if answer["answered_by"] == "model" {
            assert_eq!(answer["version"], want, "{answer}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let shadow = loop {
        let (_, view) = app.get("/v1/domains/banking/serving").await;
        let scored = view["shadow_last_day"][0]["scored"].as_u64().unwrap_or(0);
        if scored as usize >= 40 - canary || Instant::now() > deadline {
            break view["shadow_last_day"].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(shadow[0]["alias"], "staging", "{shadow}");
    assert_eq!(shadow[0]["version"], "v2", "{shadow}");
    assert_eq!(shadow[0]["primary_version"], "v1", "{shadow}");
    assert_eq!(shadow[0]["scored"], json!(40 - canary), "{shadow}");
    assert!(shadow[0]["agreed"].as_u64().unwrap() <= 40, "{shadow}");

    // What serving looks like now, in the API and in the metrics.
    let (status, view) = app.get("/v1/domains/banking/serving").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["production"], "v1", "{view}");
    let resident: Vec<(&str, &str)> = view["resident"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["alias"].as_str().unwrap(), r["version"].as_str().unwrap()))
        .collect();
    assert_eq!(
        resident,
        [("canary", "v2"), ("production", "v1"), ("staging", "v2")],
        "{view}"
    );
    assert!(
        view["last_hour"]["predictions"].as_i64().unwrap() >= 400,
        "{view}"
    );
    assert!(
        view["last_hour"]["escalated"].as_i64().unwrap() >= first.len() as i64,
        "{view}"
    );
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    for series in [
        "flywheel_predictions_total{answered_by=\"teacher\",domain=\"banking\"}",
        "flywheel_prediction_escalations_total{domain=\"banking\"}",
        "flywheel_teacher_requests_total{domain=\"banking\",outcome=\"ok\"}",
        "flywheel_prediction_seconds_bucket{domain=\"banking\"",
        "flywheel_shadow_scores_total{agrees=",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_predict_requests_get_a_code_and_a_domain_without_model_or_teacher_is_503() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    for (body, status, code) in [
        (json!({}), 422, "invalid_field"),
        (json!({"input": "a", "inputs": ["b"]}), 422, "invalid_field"),
        (json!({"inputs": []}), 422, "invalid_field"),
        (json!({"input": "   "}), 422, "invalid_field"),
        (json!({"input": "a\u{0}b"}), 422, "invalid_field"),
        (json!({"input": "x".repeat(20_000)}), 413, "text_too_long"),
        (json!({"inputs": vec!["x"; 257]}), 413, "batch_too_large"),
        (json!({"input": 5}), 422, "invalid_field"),
        (
            json!({"input": "a", "temperature": 1}),
            422,
            "invalid_field",
        ),
        (json!({"input": "where is my card?"}), 503, "no_model"),
    ] {
        let (got, answer) = app.post("/v1/domains/banking/predict", &body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, answer) = app
        .post(
            "/v1/domains/banking/predict?alias=canary",
            &json!({"input": "hi"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("version_not_found")),
        "{answer}"
    );
    let (status, answer) = app
        .post(
            "/v1/domains/banking/predict?alias=a/b",
            &json!({"input": "hi"}),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("invalid_field")),
        "{answer}"
    );
    let (status, answer) = app
        .post("/v1/domains/nope/predict", &json!({"input": "hi"}))
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("domain_not_found")),
        "{answer}"
    );

    // Chat completions refuse what they cannot answer, in the same contract.
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, status, code) in [
        (
            json!({"model": "nope", "messages": user}),
            404,
            "domain_not_found",
        ),
        (
            json!({"model": "banking@a/b", "messages": user}),
            422,
            "invalid_field",
        ),
        (
            json!({"model": "banking", "messages": [{"role": "system", "content": "x"}]}),
            422,
            "invalid_field",
        ),
        (
            json!({"model": "banking", "messages": user, "n": 2}),
            422,
            "invalid_field",
        ),
        (
            json!({"model": "banking", "messages": user, "max_tokens": 0}),
            422,
            "invalid_field",
        ),
        (
            json!({"model": "banking", "messages": user, "tools": []}),
            422,
            "invalid_field",
        ),
        (
            json!({"model": "banking", "messages": user, "temperature": 0.2}),
            503,
            "no_model",
        ),
    ] {
        let (got, answer) = app.post("/v1/chat/completions", &body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
}

/// Personal data never reaches the teacher, and under `drop` an input that had some is answered
/// but kept nowhere: not in the prediction log, not as a correction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_reaches_no_teacher_and_drop_keeps_nothing() {
    let app = TestApp::spawn().await;
    let with_email = "my card for jane.doe@example.com never came";
    let clean = "my card never came";
    // The teacher knows both questions as the domain's policy leaves them.
    let rows = [
        json!({"input": "my card for [EMAIL] never came", "expected": "card_arrival"}),
        json!({"input": clean, "expected": "card_arrival"}),
    ];
    let teacher = Teacher::start(&rows).await;
    let spec = json!({
        "name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 100_000, "pii": {"action": "drop"}},
        "serving": {"teacher": {"url": teacher.url, "model": "gold-teacher"}}
    });
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let mut ids = Vec::new();
    for input in [with_email, clean] {
        let (status, answer) = app
            .post("/v1/domains/banking/predict", &json!({"input": input}))
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            (answer["answered_by"].as_str(), answer["output"].as_str()),
            (Some("teacher"), Some("card_arrival")),
            "{answer}"
        );
        ids.push(answer["prediction_id"].clone());
    }
    assert!(ids[0].is_null(), "an input with personal data was logged");
    let id = ids[1].as_str().unwrap();
    assert!(
        !teacher
            .asked
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.contains("example.com")),
        "the teacher saw the address"
    );
    // Feedback on the clean one flushes the log: by then every kept row is stored.
    let (status, body) = app
        .post(
            &format!("/v1/predictions/{id}/feedback"),
            &json!({"correct": true, "by": "agent"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (_, stored) = app
        .get("/v1/domains/banking/corrections?include_removed=true")
        .await;
    let inputs: Vec<&str> = stored["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["input"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, [clean], "{stored}");
}

/// A domain may ask to train as soon as too many predictions escalate, before
/// `min_new_corrections` is reached: the scheduler reads the last hour's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_escalations_start_a_run() {
    let app = TestApp::spawn().await;
    let teacher = Teacher::start(&app.rows).await;
    let spec = json!({
        "name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 100_000, "max_staleness_seconds": null,
                   "max_escalation_share": 0.5},
        "serving": {"teacher": {"url": teacher.url, "model": "gold-teacher"}}
    });
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let inputs: Vec<&Value> = app.rows.iter().take(60).map(|r| &r["input"]).collect();
    let (status, body) = app
        .post("/v1/domains/banking/predict", &json!({"inputs": inputs}))
        .await;
    assert_eq!(status, 200, "{body}");
    let job = app.wait_for_job(1).await;
    assert_eq!(job["trigger"], "drift", "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
}

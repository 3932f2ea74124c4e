//! Webhooks as a receiver sees them: a real HTTP server in the test is down, then up, then
//! the flywheel process restarts between a decision and its delivery. Every event arrives,
//! signed, with a stable id to dedupe redeliveries.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::TestApp;

const SECRET: &str = "a shared secret for the receiver";

#[derive(Clone, Default)]
struct Receiver {
    /// While set, every delivery is answered 503.
    down: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    /// (path, signature header, body) of every delivery taken.
    taken: Arc<Mutex<Vec<(String, String, Value)>>>,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    if r.down.load(Ordering::SeqCst) {
        r.refused.fetch_add(1, Ordering::SeqCst);
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let signature = headers
        .get("x-flywheel-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // The receiver checks the signature as a real one would, over the exact bytes.
    assert_eq!(
        signature,
        flywheel_notify::signature(SECRET, &body),
        "bad signature"
    );
    let event: Value = serde_json::from_slice(&body).unwrap();
    r.taken
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), signature, event));
    axum::http::StatusCode::NO_CONTENT
}

async fn start_receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (receiver, url)
}

impl Receiver {
    /// Waits for an event of `kind` at `path`.
    async fn event(&self, path: &str, kind: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .taken
                .lock()
                .unwrap()
                .iter()
                .find(|(p, _, e)| p == path && e["type"] == kind)
                .map(|(_, _, e)| e.clone());
            if let Some(e) = found {
                return e;
            }
            assert!(Instant::now() < deadline, "no {kind} event at {path}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn notify(config: &mut flywheel::Config, hook: &str) {
    config.notify.webhooks = vec![format!("{hook}/all")];
    config.notify.secret = Some(SECRET.into());
    config.notify.public_url = "https://flywheel.bank.example".into();
    config.notify.poll = Duration::from_millis(100);
    config.notify.retry_base = Duration::from_millis(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_reach_webhooks_signed_after_the_receiver_was_down_and_the_server_restarted() {
    let (receiver, hook) = start_receiver().await;
    receiver.down.store(true, Ordering::SeqCst);
    let mut app = TestApp::spawn_with(|c| notify(c, &hook)).await;
    let spec = json!({
        "name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 300, "min_improvement": -1.0, "significance_level": 1.0,
                   "max_label_drop": 1.0, "require_approval": true, "min_label_support": 1,
                   "webhooks": [format!("{hook}/banking")]}
    });
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post(
            "/v1/domains",
            &json!({"name": "bad", "task": "classification",
            "base_model": app.model_dir, "labels": app.labels,
            "policy": {"webhooks": ["ftp://example.com"]}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_field")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("policy.webhooks[0]"),
        "{body}"
    );
    let (status, _) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202);
    app.wait_for_job(1).await;

    // The receiver is down: deliveries are refused and tried again, with backoff.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.refused.load(Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "no retries while the receiver was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.down.store(false, Ordering::SeqCst);
    let waiting = receiver.event("/all", "version.awaiting_approval").await;
    assert_eq!(waiting["domain"], "banking");
    assert_eq!(waiting["version"], "v1");
    assert_eq!(waiting["actor"], "flywheel-gate");
    assert_eq!(
        waiting["url"],
        "https://flywheel.bank.example/console/domains/banking/versions/v1"
    );
    assert!(
        waiting["text"]
            .as_str()
            .unwrap()
            .contains("banking v1 awaits approval"),
        "{waiting}"
    );
    // The domain's own webhook hears it too.
    let same = receiver
        .event("/banking", "version.awaiting_approval")
        .await;
    assert_eq!(same["id"], waiting["id"]);

    // A decision, then the receiver goes down and the server stops before it is delivered;
    // after the restart, it arrives.
    receiver.down.store(true, Ordering::SeqCst);
    let refused_before = receiver.refused.load(Ordering::SeqCst);
    let (status, body) = app
        .post(
            "/v1/domains/banking/versions/v1/approve",
            &json!({"by": "dana", "reason": "flips read; ship it"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.refused.load(Ordering::SeqCst) == refused_before {
        assert!(Instant::now() < deadline, "the approval was never tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.running.take().unwrap().shutdown().await.unwrap();
    let mut config = flywheel::Config::new(app.dir.path().join("data"));
    config.database = Some(app.database.clone());
    config.auth = flywheel_api::AuthMode::Off;
    notify(&mut config, &hook);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = flywheel::start(config, listener).await.unwrap();
    app.base = format!("http://{}", running.addr);
    app.running = Some(running);
    receiver.down.store(false, Ordering::SeqCst);
    let promoted = receiver.event("/all", "version.promoted").await;
    assert_eq!(
        (&promoted["actor"], &promoted["reason"]),
        (&json!("dana"), &json!("flips read; ship it"))
    );

    // Every event taken was signed (the receiver checked) and no id names two bodies.
    let taken = receiver.taken.lock().unwrap().clone();
    let mut bodies = std::collections::HashMap::new();
    for (path, _, event) in &taken {
        let key = (path.clone(), event["id"].as_str().unwrap().to_owned());
        if let Some(earlier) = bodies.insert(key, event.clone()) {
            assert_eq!(&earlier, event, "one id, two bodies");
        }
    }
    let (status, metrics) = app.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.as_str().unwrap().contains(
            "flywheel_webhook_deliveries_total{event=\"version.promoted\",outcome=\"delivered\"}"
        ),
        "{metrics}"
    );
}

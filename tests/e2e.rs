//! The whole loop over real HTTP against a real database, a real registry and real burn
//! training: `TestApp::spawn()` gives each test a fresh instance on port 0 and a fresh
//! database: a SQLite file, or with `FLYWHEEL_TEST_DATABASE=postgres` a new database on the
//! PostgreSQL server `FLYWHEEL_TEST_POSTGRES` names (`.ci/services` starts one). The README's
//! test command runs this suite once per database.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

// Serving and routing, in a file of its own beside this one.
#[path = "e2e/serving.rs"]
mod serving;

// The steward console, in a real browser.
#[path = "e2e/console.rs"]
mod console;

// Webhooks, to a receiver the test plays.
#[path = "e2e/webhooks.rs"]
mod webhooks;

// Ingestion sources: files in a directory and S3, a PostgreSQL table.
#[path = "e2e/sources.rs"]
mod sources;

// The command line: every API action, backup and restore.
#[path = "e2e/cli.rs"]
mod cli;

struct TestApp {
    base: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
    database: flywheel_db::DatabaseUrl,
    running: Option<flywheel::Running>,
    model_dir: String,
    labels: Vec<String>,
    rows: Vec<Value>,
}

/// The bundled Banking77 slice, its labels in order of appearance, and a tiny BERT whose
/// tokenizer was trained on it, written to `<dir>/tiny-bert`.
fn banking_fixture(dir: &std::path::Path) -> (Vec<Value>, Vec<String>, std::path::PathBuf) {
    let rows = flywheel::csv_corrections(flywheel::BANKING77_MINI).unwrap();
    let texts: Vec<String> = rows
        .iter()
        .map(|r| r["input"].as_str().unwrap().to_owned())
        .collect();
    let mut labels: Vec<String> = Vec::new();
    for r in &rows {
        let l = r["expected"].as_str().unwrap().to_owned();
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let model_dir = dir.join("tiny-bert");
    flywheel::init_tiny_model(&model_dir, &texts).unwrap();
    (rows, labels, model_dir)
}

/// A fresh database for one test, of the kind `FLYWHEEL_TEST_DATABASE` asks for.
async fn test_database(dir: &std::path::Path) -> flywheel_db::DatabaseUrl {
    match std::env::var("FLYWHEEL_TEST_DATABASE").as_deref() {
        Ok("postgres") => {
            let server = std::env::var("FLYWHEEL_TEST_POSTGRES").expect(
                "FLYWHEEL_TEST_POSTGRES names the PostgreSQL server to test against: run eval \"$(.ci/services)\" first",
            );
            let name = format!("flywheel_e2e_{}", uuid::Uuid::new_v4().simple());
            let url = flywheel_db::Db::create_postgres_database(&server, &name)
                .await
                .unwrap();
            flywheel_db::DatabaseUrl::Postgres(url)
        }
        Ok("sqlite") | Err(_) => flywheel_db::DatabaseUrl::Sqlite(dir.join("flywheel.db")),
        Ok(other) => panic!("FLYWHEEL_TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

/// `--database` for a child process.
fn database_arg(url: &flywheel_db::DatabaseUrl) -> String {
    match url {
        flywheel_db::DatabaseUrl::Sqlite(path) => path.display().to_string(),
        flywheel_db::DatabaseUrl::Postgres(url) => url.clone(),
    }
}

impl TestApp {
    async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// A fresh instance whose config `adjust` may change before it starts.
    async fn spawn_with(adjust: impl FnOnce(&mut flywheel::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (rows, labels, model_dir) = banking_fixture(dir.path());
        let mut config = flywheel::Config::new(dir.path().join("data"));
        let database = test_database(dir.path()).await;
        config.database = Some(database.clone());
        // Auth has a test of its own; the rest name themselves in `by` fields.
        config.auth = flywheel_api::AuthMode::Off;
        config.worker.scheduler_interval = Duration::from_millis(200);
        config.worker.poll_interval = Duration::from_millis(100);
        config.worker.heartbeat_interval = Duration::from_millis(500);
        config.limits.max_body_bytes = 256 * 1024;
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = flywheel::start(config, listener).await.unwrap();
        Self {
            base: format!("http://{}", running.addr),
            client: reqwest::Client::new(),
            dir,
            database,
            running: Some(running),
            model_dir: model_dir.display().to_string(),
            labels,
            rows,
        }
    }

    /// Sends `body` as JSON with `method` to `path`: the status and the JSON answer.
    async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, body).await
    }

    async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::PATCH, path, body).await
    }

    async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn create_domain(&self, min_new: usize) {
        let spec = json!({
            "name": "banking",
            "task": "classification",
            "base_model": self.model_dir,
            "labels": self.labels,
            "policy": {"min_new_corrections": min_new, "holdout_fraction": 0.2, "min_accuracy": 0.4, "min_improvement": 0.02}
        });
        let (status, body) = self.post("/v1/domains", &spec).await;
        assert_eq!(status, 201, "{body}");
    }

    /// Waits for the `n`th job (1-based, oldest first) of `banking` to finish.
    async fn wait_for_job(&self, n: usize) -> Value {
        self.wait_for_job_of("banking", n).await
    }

    async fn wait_for_job_of(&self, domain: &str, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(Instant::now() < deadline, "job {n} did not finish");
            let (_, jobs) = self.get(&format!("/v1/domains/{domain}/jobs")).await;
            let jobs = jobs["data"].as_array().unwrap().clone();
            if jobs.len() >= n {
                let job = &jobs[jobs.len() - n];
                if matches!(
                    job["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                ) {
                    return job.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn registry_path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join("data/registry").join(rel)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Shut down on a runtime of its own: the test's runtime is ending. Then the test's
        // PostgreSQL database goes, so a long-lived server does not fill with them.
        let running = self.running.take();
        let database = self.database.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                if let Some(running) = running {
                    let _ = running.shutdown().await;
                }
                drop_test_database(&database).await;
            })
        })
        .join();
    }
}

/// Drops a test's PostgreSQL database (a SQLite file goes with its directory).
async fn drop_test_database(database: &flywheel_db::DatabaseUrl) {
    if let flywheel_db::DatabaseUrl::Postgres(url) = database
        && let (Ok(server), Some((_, name))) = (
            std::env::var("FLYWHEEL_TEST_POSTGRES"),
            url.rsplit_once('/'),
        )
    {
        let _ = flywheel_db::Db::drop_postgres_database(&server, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrections_train_a_promoted_adapter_and_a_bad_round_leaves_production_alone() {
    let app = TestApp::spawn().await;
    // Round 1 sends 400 rows in three requests; only all of them together reach the threshold.
    app.create_domain(300).await;

    // Round 1: the real labels, as a bare array, a wrapped batch and NDJSON.
    let (first, rest) = app.rows.split_at(100);
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(first))
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(100)),
        "{body}"
    );
    let (second, third) = rest.split_at(100);
    let (status, _) = app
        .post(
            "/v1/domains/banking/corrections",
            &json!({"corrections": second}),
        )
        .await;
    assert_eq!(status, 202);
    let ndjson: String = third.iter().map(|r| format!("{r}\n")).collect();
    let (status, body) = app
        .post_raw(
            "/v1/domains/banking/corrections",
            "application/x-ndjson",
            ndjson.into_bytes(),
        )
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(200)),
        "{body}"
    );
    // A retry of the same rows stores nothing new.
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(first))
        .await;
    assert_eq!(
        (
            status,
            body["accepted"].as_u64(),
            body["duplicates"].as_u64()
        ),
        (202, Some(0), Some(100))
    );

    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["version"], "v1");
    assert_eq!(job["decision"]["promote"], true, "{job}");

    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(versions["production"], "v1");
    let metrics = &versions["data"][0]["metrics"];
    let (before, after) = (
        metrics["champion_accuracy"].as_f64().unwrap(),
        metrics["candidate_accuracy"].as_f64().unwrap(),
    );
    assert!(after > before + 0.2, "accuracy {before} -> {after}");

    // The version is in the registry in PEFT layout, with its report and a manifest.
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
        "report.md",
        "manifest.json",
    ] {
        assert!(
            app.registry_path(&format!("domains/banking/versions/v1/{file}"))
                .exists(),
            "{file}"
        );
    }
    let alias: Value = serde_json::from_slice(
        &std::fs::read(app.registry_path("domains/banking/aliases/production.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(alias["to"], "v1");
    let (status, report) = app
        .get("/v1/domains/banking/versions/v1/report?format=md")
        .await;
    assert_eq!(status, 200);
    assert!(
        report
            .as_str()
            .unwrap()
            .contains("**Gate decision at evaluation:** promoted: accuracy"),
        "{report}"
    );

    // The job's history shows training progress.
    let (_, events) = app
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "metrics")
    );

    // Round 2: the same inputs with shuffled labels. The candidate trains on contradictions and
    // must not replace v1.
    let n = app.rows.len();
    let shuffled: Vec<Value> = app
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"input": r["input"], "expected": app.rows[(i * 7 + 13) % n]["expected"]}))
        .collect();
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(shuffled))
        .await;
    // 56 of the shuffled rows happen to keep their label: those are duplicates, not new rows.
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(344)),
        "{body}"
    );
    let job = app.wait_for_job(2).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["decision"]["promote"], false, "{job}");
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(versions["production"], "v1", "{versions}");
    assert_eq!(versions["data"].as_array().unwrap().len(), 2);

    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("flywheel_corrections_ingested_total{domain=\"banking\"} 744"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "flywheel_promotion_decisions_total{domain=\"banking\",outcome=\"promoted\"} 1"
        )
    );
    assert!(metrics.contains("flywheel_jobs{domain=\"banking\",state=\"succeeded\"} 2"));
    // Production still names v1, moved when it was promoted; HTTP latency by method, route
    // and code; the process's own numbers; the WAL where there is one.
    assert!(
        metrics.contains("flywheel_production_version{domain=\"banking\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("flywheel_production_moved_timestamp_seconds{domain=\"banking\"} 1"));
    assert!(metrics.contains(
        "http_server_request_duration_seconds_count{code=\"202\",method=\"POST\",route=\"/v1/domains/{domain}/corrections\"}"
    ));
    assert!(metrics.contains("process_resident_memory_bytes "));
    assert_eq!(
        metrics.contains("flywheel_database_wal_bytes "),
        matches!(app.database, flywheel_db::DatabaseUrl::Sqlite(_)),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "flywheel_job_duration_seconds_count{domain=\"banking\",outcome=\"succeeded\"} 2"
        ),
        "{metrics}"
    );
    for gauge in [
        "flywheel_training_loss{domain=\"banking\"}",
        "flywheel_training_tokens_per_second{domain=\"banking\"}",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_stable_code_naming_the_field_and_loses_nothing() {
    let app = TestApp::spawn().await;
    // High threshold: this test is about ingestion, not training.
    app.create_domain(100_000).await;
    let path = "/v1/domains/banking/corrections";
    let good = json!({"input": "my card has not arrived", "expected": "card_arrival"});
    assert_eq!(app.post(path, &good).await.0, 202);

    let big = "x".repeat(300 * 1024);
    let cases: Vec<(&str, u16, Value, &str)> = vec![
        (
            "/v1/domains/nope/corrections",
            404,
            good.clone(),
            "domain_not_found",
        ),
        (
            path,
            422,
            json!({"expected": "card_arrival"}),
            "invalid_field",
        ),
        (
            path,
            422,
            json!({"input": 5, "expected": "card_arrival"}),
            "invalid_field",
        ),
        (
            path,
            422,
            json!({"input": "  ", "expected": "card_arrival"}),
            "invalid_field",
        ),
        (
            path,
            422,
            json!({"input": "hi", "expected": "mortgage"}),
            "unknown_label",
        ),
        (
            path,
            422,
            json!([good, {"input": "hi", "expected": "mortgage"}]),
            "unknown_label",
        ),
        (
            path,
            422,
            json!({"input": "hi", "expected": "card_arrival", "colour": "red"}),
            "invalid_field",
        ),
        (
            path,
            413,
            json!({"input": big, "expected": "card_arrival"}),
            "payload_too_large",
        ),
    ];
    let mut seen = Vec::new();
    for (p, status, body, code) in &cases {
        let (got, err) = app.post(p, body).await;
        assert_eq!(
            (got, err["code"].as_str()),
            (*status, Some(*code)),
            "{body:.80}: {err}"
        );
        assert!(!err["message"].as_str().unwrap().is_empty());
        seen.push(err["message"].as_str().unwrap().to_owned());
    }
    insta::assert_json_snapshot!(seen[..7], @r#"
    [
      "domain `nope` does not exist",
      "input: is required",
      "input: invalid type: integer `5`, expected a string",
      "input: must not be empty",
      "expected: `mortgage` is not a label of domain `banking`",
      "corrections[1].expected: `mortgage` is not a label of domain `banking`",
      "colour: unknown field `colour`, expected one of `client_id`, `input`, `model_output`, `expected`, `source`, `teacher`, `metadata`"
    ]
    "#);
    let (status, err) = app
        .post_raw(path, "application/json", b"{\"input\": ".to_vec())
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("malformed_json")),
        "{err}"
    );
    let (status, err) = app.post_raw(path, "text/plain", b"hello".to_vec()).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (415, Some("unsupported_media_type")),
        "{err}"
    );

    // NDJSON keeps the good lines and reports the bad ones by line number.
    let ndjson = "{\"input\": \"pin locked\", \"expected\": \"pin_blocked\"}\nnot json\n{\"input\": \"x\", \"expected\": \"nope\"}\n";
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", ndjson.as_bytes().to_vec())
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let lines: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(lines, vec![(2, "malformed_json"), (3, "unknown_label")]);

    // NDJSON streams: larger than the JSON body limit, committed in chunks as it arrives.
    let mut big_upload = String::new();
    for i in 1..=3000 {
        if [5, 1500, 2999].contains(&i) {
            big_upload.push_str("{\"input\": \"broken line\"\n");
        } else {
            big_upload.push_str(&format!(
                "{{\"input\": \"streamed question number {i} about a card that never arrived\", \"expected\": \"card_arrival\"}}\n"
            ));
        }
    }
    assert!(big_upload.len() > 256 * 1024);
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", big_upload.into_bytes())
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected_total"].as_u64()),
        (Some(2997), Some(3))
    );
    let lines: Vec<u64> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [5, 1500, 2999]);

    // Domain registration errors name the field too.
    let (status, err) = app.post("/v1/domains", &json!({"name": "Bad Name", "task": "classification", "base_model": "m", "labels": ["a", "b"]})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    assert!(
        err["message"].as_str().unwrap().starts_with("name:"),
        "{err}"
    );
    let (status, err) = app
        .post("/v1/domains", &json!({"name": "other", "task": "classification", "base_model": "m", "labels": ["a", "b"], "out_of_scope_label": "c"}))
        .await;
    assert_eq!(
        (status, err["message"].as_str()),
        (
            422,
            Some("out_of_scope_label: `c` is not one of the labels")
        ),
        "{err}"
    );
    let (status, err) = app.post("/v1/domains", &json!({"name": "banking", "task": "classification", "base_model": app.model_dir, "labels": ["a", "b"]})).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("domain_exists")));
    // A domain that could never train is refused at registration, saying why.
    let empty = app.dir.path().join("empty-model");
    std::fs::create_dir_all(&empty).unwrap();
    for (task, base_model, code, says) in [
        (
            "generation",
            app.model_dir.clone(),
            "invalid_field",
            "cannot generate",
        ),
        (
            "classification",
            empty.display().to_string(),
            "invalid_field",
            "no config.json",
        ),
        (
            "classification",
            "/no/such/model".into(),
            "unknown_base_model",
            "no model directory",
        ),
    ] {
        let labels = if task == "generation" {
            json!([])
        } else {
            json!(["a", "b"])
        };
        let (status, err) = app
            .post("/v1/domains", &json!({"name": "unusable", "task": task, "base_model": base_model, "labels": labels}))
            .await;
        let message = error_of(status, &err, 422, code);
        assert!(
            message.starts_with("base_model: ") && message.contains(says),
            "{message}"
        );
    }
    // Unknown keys are refused, not dropped.
    let (status, err) = app
        .post("/v1/domains", &json!({"name": "knobs", "task": "classification", "base_model": app.model_dir, "labels": ["a", "b"], "hyperparameters": {"epochs": 3}}))
        .await;
    let message = error_of(status, &err, 422, "invalid_field");
    assert!(message.contains("hyperparameters"), "{message}");

    // Everything accepted before, between and after the errors is still there.
    let (_, domain) = app.get("/v1/domains/banking").await;
    let stored = domain["corrections"]["train"].as_i64().unwrap()
        + domain["corrections"]["holdout"].as_i64().unwrap();
    // One good row, one good NDJSON line, and the streamed upload's 2997.
    assert_eq!(stored, 2 + 2997, "{domain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_domain_learns_to_produce_the_corrected_text() {
    let app = TestApp::spawn().await;
    // The correction is the intent written out as words: a small generation task.
    let rows: Vec<Value> = app
        .rows
        .iter()
        .map(|r| json!({"input": r["input"], "expected": r["expected"].as_str().unwrap().replace('_', " "), "source": "teacher", "teacher": "big-model"}))
        .collect();
    let corpus: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            [
                r["input"].as_str().unwrap().to_owned(),
                r["expected"].as_str().unwrap().to_owned(),
            ]
        })
        .collect();
    let llama = app.dir.path().join("tiny-llama");
    flywheel::init_tiny_llama(&llama, &corpus).unwrap();
    let spec = json!({
        "name": "intents-as-text",
        "task": "generation",
        "base_model": llama.display().to_string(),
        "policy": {"min_new_corrections": 300, "min_accuracy": 0.3, "min_improvement": 0.1}
    });
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post("/v1/domains/intents-as-text/corrections", &json!(rows))
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(400)),
        "{body}"
    );

    let job = app.wait_for_job_of("intents-as-text", 1).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["decision"]["promote"], true, "{job}");
    let (_, versions) = app.get("/v1/domains/intents-as-text/versions").await;
    let m = &versions["data"][0]["metrics"];
    let (before, after) = (
        m["champion_accuracy"].as_f64().unwrap(),
        m["candidate_accuracy"].as_f64().unwrap(),
    );
    assert!(after > before + 0.3, "exact match {before} -> {after}");
    assert!(m["candidate_token_f1"].as_f64().unwrap() >= after);
    let config: Value = serde_json::from_slice(
        &std::fs::read(
            app.registry_path("domains/intents-as-text/versions/v1/adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);

    // The published version, adapter folded in, as GGUF for llama.cpp and Ollama; read back
    // by llama.cpp's reader against the merged Hugging Face export of the same version.
    let gguf = app.dir.path().join("intents-v1.gguf");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args([
            "models",
            "export",
            "intents-as-text",
            "v1",
            "--quant",
            "q8_0",
            "--data-dir",
        ])
        .arg(app.dir.path().join("data"))
        .arg("--out")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("20 tensors"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = app.dir.path().join("intents-v1-merged");
    flywheel_trainer::export_merged(
        &llama,
        &app.registry_path("domains/intents-as-text/versions/v1"),
        &merged,
    )
    .unwrap();
    let python = std::env::var("FLYWHEEL_TEST_PYTHON").expect(
        "FLYWHEEL_TEST_PYTHON is not set: `eval \"$(.ci/services)\"` installs the gguf reader",
    );
    let check = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../trainer/tests/fixtures/check_gguf.py"
        ))
        .arg(&gguf)
        .arg(&merged)
        .arg("q8_0")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The published adapter answers: through /predict, and as an OpenAI chat endpoint.
    let question = rows[0]["input"].as_str().unwrap();
    let (status, answer) = app
        .post(
            "/v1/domains/intents-as-text/predict",
            &json!({"input": question, "max_tokens": 8}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], "v1", "{answer}");
    let text = answer["output"].as_str().unwrap().to_owned();
    assert!(!text.is_empty(), "{answer}");
    let chat = json!({"model": "intents-as-text", "max_tokens": 8, "temperature": 0.7,
                      "messages": [{"role": "system", "content": "You name intents."},
                                   {"role": "user", "content": question}]});
    let (status, completion) = app.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        json!(text),
        "greedy: the same answer"
    );
    assert_eq!(completion["flywheel"]["version"], "v1");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let resp = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = resp.text().await.unwrap();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, text, "{body}");
}

/// A classification domain may sit on a causal LM: the loop trains a head over the last
/// token with LoRA on the Llama projections, evaluates it, and publishes it past the lint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classification_domain_on_a_causal_lm_is_trained_and_published() {
    let app = TestApp::spawn().await;
    let corpus: Vec<String> = app
        .rows
        .iter()
        .map(|r| r["input"].as_str().unwrap().to_owned())
        .collect();
    let llama = app.dir.path().join("tiny-llama");
    flywheel::init_tiny_llama(&llama, &corpus).unwrap();
    let spec = json!({
        "name": "banking",
        "task": "classification",
        "base_model": llama.display().to_string(),
        "labels": app.labels,
        "policy": {"min_new_corrections": 300, "early_stopping": true}
    });
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202, "{body}");

    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["decision"]["promote"], true, "{job}");
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    let m = &versions["data"][0]["metrics"];
    let (before, after) = (
        m["champion_accuracy"].as_f64().unwrap(),
        m["candidate_accuracy"].as_f64().unwrap(),
    );
    assert!(after > before + 0.2, "accuracy {before} -> {after}");
    let head: Value = serde_json::from_slice(
        &std::fs::read(app.registry_path("domains/banking/versions/v1/classifier_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(head["pooling"], "last_token");
    // The run validated every epoch on rows it held back, and kept its best weights.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(app.registry_path("domains/banking/versions/v1/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["lineage"]["policy"]["version"], 1, "{manifest}");
    let training = &manifest["lineage"]["training"];
    assert!(
        training["validation_curve"].as_array().unwrap().len() >= 2,
        "{training}"
    );
    assert!(training["best_step"].as_u64().is_some(), "{training}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_csv_and_jsonl_and_says_what_to_fix_when_it_cannot() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let csv = app.dir.path().join("corrections.csv");
    std::fs::write(
        &csv,
        "text,category\nmy card never came,card_arrival\nwhat is the exchange rate,exchange_rate\n",
    )
    .unwrap();
    let jsonl = app.dir.path().join("corrections.jsonl");
    std::fs::write(
        &jsonl,
        "{\"input\": \"pin is blocked\", \"expected\": \"pin_blocked\", \"client_id\": \"c-1\"}\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_flywheel");
    for file in [&csv, &jsonl] {
        let out = std::process::Command::new(bin)
            .args(["import", "banking"])
            .arg(file)
            .args(["--server", &app.base])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `--server host:port` means http.
    let out = std::process::Command::new(bin)
        .args(["import", "banking"])
        .arg(&csv)
        .args(["--server", app.base.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, domain) = app.get("/v1/domains/banking").await;
    let stored = domain["corrections"]["train"].as_i64().unwrap()
        + domain["corrections"]["holdout"].as_i64().unwrap();
    assert_eq!(stored, 3);

    // Base models go into the registry by content: the same files, the same reference.
    let registry = app.dir.path().join("cli-registry");
    let import = |dir: &str| {
        std::process::Command::new(bin)
            .args(["models", "import", "--registry"])
            .arg(&registry)
            .arg(dir)
            .output()
            .unwrap()
    };
    let first = import(&app.model_dir);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        stdout.starts_with("sha256:") && stdout.contains("(bert, "),
        "{stdout}"
    );
    assert_eq!(
        String::from_utf8_lossy(&import(&app.model_dir).stdout),
        stdout
    );

    // Failures exit non-zero with one line that says what went wrong.
    let empty_dir = app.dir.path().join("not-a-model");
    std::fs::create_dir_all(&empty_dir).unwrap();
    for (args, expect) in [
        (
            vec!["import".into(), "banking".into(), "/nonexistent.csv".into()],
            "opening /nonexistent.csv",
        ),
        (
            vec![
                "models".into(),
                "import".into(),
                "--registry".into(),
                registry.display().to_string(),
                empty_dir.display().to_string(),
            ],
            "not a Hugging Face model directory: no config.json",
        ),
        (
            vec![
                "models".into(),
                "import".into(),
                "--registry".into(),
                "ftp://models/x".into(),
                app.model_dir.clone(),
            ],
            "unsupported scheme `ftp`",
        ),
        (
            // Nothing listens on port 1: the cause, not a pool timing out.
            vec![
                "migrate".into(),
                "--database".into(),
                "postgres://postgres@127.0.0.1:1/flywheel".into(),
            ],
            "Connection refused",
        ),
    ] {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expect),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stewards_approve_reject_and_roll_back_and_every_decision_is_audited() {
    let app = TestApp::spawn().await;
    // A lenient gate that always asks a person: the test is about the people, not the rules.
    let spec = json!({
        "name": "banking",
        "task": "classification",
        "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 300, "min_improvement": -1.0, "significance_level": 1.0,
                   "max_label_drop": 1.0, "require_approval": true, "min_label_support": 1},
        // Banking77 has no "none of the above" intent; one label stands in for it.
        "out_of_scope_label": "age_limit"
    });
    assert_eq!(app.post("/v1/domains", &spec).await.0, 201);
    let (status, _) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202);
    let job = app.wait_for_job(1).await;
    assert_eq!(job["decision"]["rule"], "awaiting_approval", "{job}");
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(
        (
            versions["production"].clone(),
            versions["data"][0]["status"].clone()
        ),
        (Value::Null, json!("pending_approval"))
    );
    let (status, err) = app.get("/v1/domains/banking/aliases/production").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("version_not_found"))
    );

    // Operators see what waits: one version pending, nothing untrained, the build.
    let gauges = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("flywheel_versions_pending_approval{domain=\"banking\"}")
                    || l.starts_with("flywheel_corrections_untrained{domain=\"banking\"}")
                    || l.starts_with("flywheel_build_info{")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (_, metrics) = app.get("/metrics").await;
    let seen = gauges(metrics.as_str().unwrap());
    assert_eq!(
        seen,
        [
            format!(
                "flywheel_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "flywheel_corrections_untrained{domain=\"banking\"} 0".to_owned(),
            "flywheel_versions_pending_approval{domain=\"banking\"} 1".to_owned(),
        ],
        "{metrics}"
    );
    let review = json!({"by": "dana@bank.example", "reason": "read the report; flips look right"});
    let (status, body) = app
        .post("/v1/domains/banking/versions/v1/approve", &review)
        .await;
    assert_eq!(
        (status, body["production"].as_str()),
        (200, Some("v1")),
        "{body}"
    );
    let (status, err) = app
        .post("/v1/domains/banking/versions/v1/approve", &review)
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("version_not_pending"))
    );
    let (status, err) = app
        .post(
            "/v1/domains/banking/versions/v1/approve",
            &json!({"by": "", "reason": "x"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );

    // Serving fleets read the alias: version, files, and the escalation threshold.
    let (status, alias) = app.get("/v1/domains/banking/aliases/production").await;
    assert_eq!(
        (status, alias["version"].as_str()),
        (200, Some("v1")),
        "{alias}"
    );
    assert_eq!(alias["escalation"]["target_accuracy"], 0.95);
    // ...and, the domain having one, the out-of-scope threshold beside it.
    let oos = &alias["out_of_scope"];
    assert_eq!(oos["label"], "age_limit", "{alias}");
    let threshold = oos["threshold"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&threshold), "{oos}");
    let score =
        oos["in_scope_accuracy"].as_f64().unwrap() + oos["out_of_scope_recall"].as_f64().unwrap();
    assert!(score > 0.0, "{oos}");
    let (_, report) = app
        .get("/v1/domains/banking/versions/v1/report?format=md")
        .await;
    assert!(
        report.as_str().unwrap().contains("Out-of-scope threshold"),
        "{report}"
    );
    assert!(
        alias["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "adapter_model.safetensors")
    );

    // Round 2 passes the lenient gate and waits; a steward approves it, then rolls back.
    let n = app.rows.len();
    let shuffled: Vec<Value> = (0..n)
        .map(|i| json!({"input": app.rows[i]["input"], "expected": app.rows[(i * 7 + 13) % n]["expected"]}))
        .collect();
    assert_eq!(
        app.post("/v1/domains/banking/corrections", &json!(shuffled))
            .await
            .0,
        202
    );
    assert_eq!(
        app.wait_for_job(2).await["decision"]["rule"],
        "awaiting_approval"
    );
    let (status, err) = app
        .post(
            "/v1/domains/banking/rollback",
            &json!({"to": "v2", "by": "dana", "reason": "x"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    let (status, _) = app
        .post("/v1/domains/banking/versions/v2/approve", &review)
        .await;
    assert_eq!(status, 200);
    let (status, body) = app
        .post(
            "/v1/domains/banking/rollback",
            &json!({"to": "v1", "by": "sam@bank.example", "reason": "complaints about v2"}),
        )
        .await;
    assert_eq!(
        (status, body["production"].as_str(), body["from"].as_str()),
        (200, Some("v1"), Some("v2")),
        "{body}"
    );
    let (status, err) = app
        .post("/v1/domains/banking/versions/v2/reject", &review)
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("version_not_pending"))
    );

    // Other aliases move by hand, compare-and-swap, audited; production does not.
    let staging = "/v1/domains/banking/aliases/staging";
    let (status, moved) = app
        .put(
            staging,
            &json!({"to": "v2", "by": "dana", "reason": "canary"}),
        )
        .await;
    assert_eq!(
        (status, moved["generation"].as_u64()),
        (200, Some(1)),
        "{moved}"
    );
    let (status, err) = app
        .put(
            staging,
            &json!({"to": "v1", "expected": null, "by": "dana", "reason": "stale view"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("alias_conflict")),
        "{err}"
    );
    let (status, err) = app
        .put(
            "/v1/domains/banking/aliases/production",
            &json!({"to": "v2", "by": "dana", "reason": "shortcut"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    let (_, alias) = app.get(staging).await;
    assert_eq!(alias["version"], "v2");

    let (_, audit) = app.get("/v1/domains/banking/audit").await;
    let trail: Vec<(String, String, String)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
                e["version"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("gate_decision", "flywheel-gate", "v1"),
        ("approve", "dana@bank.example", "v1"),
        ("gate_decision", "flywheel-gate", "v2"),
        ("approve", "dana@bank.example", "v2"),
        ("rollback", "sam@bank.example", "v1"),
        ("alias_move", "dana", "v2"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(trail, expected);
    // The alias history in the registry agrees: v1, v2, back to v1.
    let history: Vec<String> = (1..=3)
        .map(|g| {
            let raw = std::fs::read(
                app.registry_path(&format!("domains/banking/aliases/production/{g:020}.json")),
            )
            .unwrap();
            serde_json::from_slice::<Value>(&raw).unwrap()["to"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(history, ["v1", "v2", "v1"]);
}

/// The S3 settings for the SeaweedFS that `.ci/services` starts, under a fresh prefix.
fn s3_registry() -> (String, Vec<(String, String)>) {
    let endpoint = std::env::var("FLYWHEEL_TEST_S3").expect(
        "FLYWHEEL_TEST_S3 is not set: start the test services with `eval \"$(.ci/services)\"`",
    );
    let options = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_access_key_id", "flywheel"),
        ("aws_secret_access_key", "flywheel-secret"),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec();
    (
        format!("s3://flywheel/e2e-{}", uuid::Uuid::new_v4()),
        options,
    )
}

/// Scale-out in miniature: an API + scheduler + trainer process and an evaluate + publish
/// process share one database and an S3 registry, and nothing else. The base model lives in
/// the registry too; each process fetches and verifies its own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_on_different_machines_meet_in_an_s3_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels, model_dir) = banking_fixture(dir.path());
    let (registry_url, options) = s3_registry();
    let database = test_database(dir.path()).await;
    let machine = |name: &str, roles: &[&str]| {
        let mut config = flywheel::Config::new(dir.path().join(name));
        config.auth = flywheel_api::AuthMode::Off;
        config.database = Some(database.clone());
        config.registry = Some(registry_url.clone());
        config.registry_options = options.clone();
        config.api = roles.contains(&"api");
        config.worker.scheduler = roles.contains(&"scheduler");
        config.worker.queues = roles
            .iter()
            .filter(|r| !matches!(**r, "api" | "scheduler"))
            .map(|r| format!("flywheel.{r}"))
            .collect();
        config.worker.scheduler_interval = Duration::from_millis(200);
        config.worker.poll_interval = Duration::from_millis(100);
        config.worker.heartbeat_interval = Duration::from_millis(500);
        config
    };
    let trainer_config = machine("trainer", &["api", "scheduler", "train"]);
    let registry = trainer_config.open_registry().unwrap();
    let model = registry.import_model(&model_dir).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trainer = flywheel::start(trainer_config, listener).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let publisher = flywheel::start(machine("publisher", &["evaluate", "publish"]), listener)
        .await
        .unwrap();
    let app = TestApp {
        base: format!("http://{}", trainer.addr),
        client: reqwest::Client::new(),
        dir,
        database: database.clone(),
        running: Some(trainer),
        model_dir: model.reference(),
        labels: labels.clone(),
        rows,
    };

    // A model reference must name a model the registry has.
    let spec = |base_model: &str| json!({"name": "banking", "task": "classification", "base_model": base_model, "labels": labels});
    let (status, body) = app
        .post("/v1/domains", &spec(&format!("sha256:{}", "0".repeat(64))))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("unknown_base_model")),
        "{body}"
    );
    let (status, body) = app.post("/v1/domains", &spec("sha256:abc")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_field")),
        "{body}"
    );

    app.create_domain(300).await;
    let (status, _) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202);
    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // The publisher machine did evaluate and publish, from its own verified model copy.
    let publisher_dir = app.dir.path().join("publisher");
    assert!(
        publisher_dir
            .join("cache/models")
            .join(&model.id)
            .join("model.safetensors")
            .is_file()
    );
    let (_, events) = app
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await;
    assert!(events.to_string().contains("evaluated on"), "{events}");

    // Serving fleets get store URLs, the escalation threshold, and what the adapter sits on.
    let (status, alias) = app.get("/v1/domains/banking/aliases/production").await;
    assert_eq!(status, 200, "{alias}");
    assert_eq!(alias["version"], "v1");
    assert_eq!(alias["base_model"]["ref"], model.reference());
    assert_eq!(alias["base_model"]["content_id"], model.id);
    let files = alias["files"].as_array().unwrap();
    let prefix = format!("{registry_url}/domains/banking/versions/v1/");
    assert!(
        files
            .iter()
            .any(|f| f["url"] == format!("{prefix}adapter_model.safetensors")),
        "{alias}"
    );
    assert!(alias["escalation"]["threshold"].is_number(), "{alias}");
    let (_, history) = app
        .get("/v1/domains/banking/aliases/production/history")
        .await;
    let moves = history["data"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{history}");
    assert_eq!(
        (moves[0]["by"].as_str(), moves[0]["to"].as_str()),
        (Some("flywheel-gate"), Some("v1"))
    );
    // The serving lint's findings travel with the version.
    let manifest = registry
        .manifest(
            &flywheel_domain::DomainName::parse("banking").unwrap(),
            &flywheel_domain::VersionId::nth(1),
        )
        .await
        .unwrap();
    assert_eq!(manifest.lineage["serving"]["lint"]["findings"], json!([]));
    assert!(
        manifest.lineage["serving"]["max_output_delta"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Staged intermediates are cleaned up once published.
    let leftovers = tempfile::tempdir().unwrap();
    registry
        .fetch_staged(job["id"].as_str().unwrap(), leftovers.path())
        .await
        .unwrap();
    assert_eq!(std::fs::read_dir(leftovers.path()).unwrap().count(), 0);

    // The worker-only process answers probes, not the API.
    let client = reqwest::Client::new();
    let base = format!("http://{}", publisher.addr);
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let api = client
        .get(format!("{base}/v1/domains"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
    publisher.shutdown().await.unwrap();
}

/// Personal data is redacted before anything is stored; the response and the metrics carry
/// counts, never values; a `drop` policy stores nothing of a row that had any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_redacted_before_it_is_stored() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let label = &app.labels[0];
    let rows = [
        json!({"input": "my card 4242 4242 4242 4242 was declined, mail jane@example.com", "expected": label}),
        json!({"input": "call me on +44 20 7946 0958 about my transfer", "expected": label,
               "model_output": "refund to GB82 WEST 1234 5698 7654 32"}),
        json!({"input": "what is the exchange rate for 100 EUR on 2024-01-15", "expected": label}),
    ];
    let ndjson: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let (status, body) = app
        .post_raw(
            "/v1/domains/banking/corrections",
            "application/x-ndjson",
            ndjson.into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body["redacted"],
        json!({"email": 1, "card": 1, "phone": 1, "iban": 1})
    );

    let db = flywheel_db::Db::open(&app.database).await.unwrap();
    let domain = db.domain("banking").await.unwrap().unwrap();
    let stored = db.corrections(domain.id, i64::MAX, None).await.unwrap();
    let texts: Vec<String> = stored
        .iter()
        .map(|c| {
            format!(
                "{} | {}",
                c.input,
                c.model_output.clone().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        texts,
        [
            "my card [CARD] was declined, mail [EMAIL] | ",
            "call me on [PHONE] about my transfer | refund to [IBAN]",
            "what is the exchange rate for 100 EUR on 2024-01-15 | ",
        ]
    );
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains(r#"flywheel_corrections_redacted_total{domain="banking",kind="card"} 1"#),
        "{metrics}"
    );

    // A domain that drops such rows keeps only the clean one.
    let spec = json!({
        "name": "strict", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels, "policy": {"pii": {"action": "drop"}}
    });
    assert_eq!(app.post("/v1/domains", &spec).await.0, 201);
    let (status, body) = app
        .post("/v1/domains/strict/corrections", &json!(rows))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["dropped_pii"].as_u64()),
        (Some(1), Some(2))
    );
    let bad = json!({
        "name": "lax", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels, "policy": {"pii": {"action": "shred"}}
    });
    let (status, err) = app.post("/v1/domains", &bad).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("policy.pii.action"),
        "{err}"
    );
}

/// Every role against every endpoint, on its own domain and on another: 401 without a valid
/// token, 403 for a role or domain outside the token's reach, and through to the handler
/// otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_reaches_exactly_its_endpoints_on_its_own_domains() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels, model_dir) = banking_fixture(dir.path());
    let mut config = flywheel::Config::new(dir.path().join("data"));
    config.bootstrap_admin_token = Some("fw_bootstrap_for_tests".into());
    config.worker.scheduler_interval = Duration::from_millis(200);
    config.worker.poll_interval = Duration::from_millis(100);
    config.worker.heartbeat_interval = Duration::from_millis(500);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = flywheel::start(config, listener).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let call = |method: &str, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut req = client.request(method.parse().unwrap(), format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let admin = "fw_bootstrap_for_tests";

    // The platform team sets up two domains and hands out tokens.
    for name in ["banking", "cards"] {
        let spec = json!({"name": name, "task": "classification",
            "base_model": model_dir.display().to_string(), "labels": labels,
            "policy": {"min_new_corrections": 300}});
        let (status, body) = call("POST", "/v1/domains", Some(admin), Some(spec)).await;
        assert_eq!(status, 201, "{body}");
    }
    let mut tokens = std::collections::HashMap::new();
    for (name, role, domain) in [
        ("dept-banking", "department", "banking"),
        ("dept-cards", "department", "cards"),
        ("steward-banking", "steward", "banking"),
        ("steward-cards", "steward", "cards"),
        ("serving-banking", "serving", "banking"),
        ("serving-cards", "serving", "cards"),
        ("revoked", "department", "banking"),
    ] {
        let (status, body) = call(
            "POST",
            "/v1/tokens",
            Some(admin),
            Some(json!({"name": name, "role": role, "domains": [domain]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert!(body["token"].as_str().unwrap().starts_with("fw_"));
        tokens.insert(
            name,
            (
                body["token"].as_str().unwrap().to_owned(),
                body["id"].clone(),
            ),
        );
    }
    let revoked_id = tokens["revoked"].1.as_i64().unwrap();
    let (status, _) = call(
        "DELETE",
        &format!("/v1/tokens/{revoked_id}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 204);
    // Secrets are shown once: the listing has none.
    let (_, listing) = call("GET", "/v1/tokens", Some(admin), None).await;
    assert!(!listing.to_string().contains(&tokens["dept-banking"].0));

    // A department feeds its domain; a job runs and publishes v1.
    let dept = tokens["dept-banking"].0.clone();
    let (status, body) = call(
        "POST",
        "/v1/domains/banking/corrections",
        Some(&dept),
        Some(json!(rows)),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let job_id = loop {
        assert!(Instant::now() < deadline, "no job finished");
        let (_, jobs) = call("GET", "/v1/domains/banking/jobs", Some(&dept), None).await;
        if let Some(job) = jobs["data"].as_array().and_then(|j| j.first())
            && job["status"] == "succeeded"
        {
            break job["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // An answer to give feedback on.
    let (status, answer) = call(
        "POST",
        "/v1/domains/banking/predict",
        Some(admin),
        Some(json!({"input": "my card has not arrived"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let prediction = answer["prediction_id"].as_str().unwrap().to_owned();

    #[derive(Clone, Copy, PartialEq)]
    enum Who {
        Admin,
        Dept,
        Steward,
        Serving,
    }
    use Who::*;
    let all: &[Who] = &[Admin, Dept, Steward];
    let row = json!({"input": "where is my card", "expected": labels[0]});
    let review = json!({"reason": "matrix"});
    let endpoints: Vec<(&str, String, Option<Value>, &[Who])> = vec![
        ("GET", "/v1/domains".into(), None, all),
        (
            "POST",
            "/v1/domains".into(),
            Some(json!({"name": "x"})),
            &[Admin],
        ),
        ("GET", "/v1/domains/banking".into(), None, all),
        (
            "POST",
            "/v1/domains/banking/corrections".into(),
            Some(row),
            &[Admin, Dept],
        ),
        (
            "GET",
            "/v1/domains/banking/jobs".into(),
            None,
            &[Admin, Dept],
        ),
        (
            "POST",
            "/v1/domains/banking/jobs".into(),
            None,
            &[Admin, Dept],
        ),
        ("GET", "/v1/jobs".into(), None, &[Admin, Dept]),
        (
            "POST",
            format!("/v1/jobs/{job_id}/cancel"),
            None,
            &[Admin, Dept],
        ),
        ("GET", format!("/v1/jobs/{job_id}"), None, &[Admin, Dept]),
        (
            "GET",
            format!("/v1/jobs/{job_id}/events"),
            None,
            &[Admin, Dept],
        ),
        (
            "GET",
            format!("/v1/jobs/{job_id}/checkpoints"),
            None,
            &[Admin, Dept],
        ),
        ("GET", "/v1/domains/banking/versions".into(), None, all),
        (
            "GET",
            "/v1/domains/banking/versions/v1/report".into(),
            None,
            all,
        ),
        (
            "POST",
            "/v1/domains/banking/versions/v1/approve".into(),
            Some(review.clone()),
            &[Admin, Steward],
        ),
        (
            "POST",
            "/v1/domains/banking/versions/v1/reject".into(),
            Some(review.clone()),
            &[Admin, Steward],
        ),
        (
            "POST",
            "/v1/domains/banking/rollback".into(),
            Some(json!({"to": "v1", "reason": "m"})),
            &[Admin, Steward],
        ),
        (
            "PUT",
            "/v1/domains/banking/aliases/staging".into(),
            Some(json!({"to": "v1", "reason": "m"})),
            &[Admin, Steward],
        ),
        (
            "GET",
            "/v1/domains/banking/audit".into(),
            None,
            &[Admin, Steward],
        ),
        (
            "GET",
            "/v1/domains/banking/aliases/production".into(),
            None,
            all,
        ),
        (
            "GET",
            "/v1/domains/banking/aliases/production/history".into(),
            None,
            all,
        ),
        (
            "POST",
            "/v1/tokens".into(),
            Some(json!({"name": "n", "role": "admin"})),
            &[Admin],
        ),
        ("GET", "/v1/tokens".into(), None, &[Admin]),
        ("DELETE", "/v1/tokens/999999".into(), None, &[Admin]),
        (
            "PATCH",
            "/v1/tokens/999999".into(),
            Some(json!({"domains": ["banking"]})),
            &[Admin],
        ),
        (
            "PATCH",
            "/v1/domains/banking".into(),
            Some(json!({"policy": {"min_accuracy": 0.0}, "reason": "m"})),
            &[Admin, Steward],
        ),
        (
            "GET",
            "/v1/domains/banking/policy/history".into(),
            None,
            all,
        ),
        (
            "GET",
            "/v1/domains/banking/corrections".into(),
            None,
            &[Admin, Steward],
        ),
        (
            "GET",
            "/v1/domains/banking/corrections/conflicts".into(),
            None,
            &[Admin, Steward],
        ),
        (
            "PATCH",
            "/v1/domains/banking/corrections/999999".into(),
            Some(json!({"expected": labels[0], "reason": "m"})),
            &[Admin, Steward],
        ),
        (
            "DELETE",
            "/v1/domains/banking/corrections/999999".into(),
            Some(json!({"reason": "m"})),
            &[Admin, Steward],
        ),
        (
            "POST",
            "/v1/domains/banking/versions/v1/reevaluate".into(),
            Some(review.clone()),
            &[Admin, Steward],
        ),
        (
            "GET",
            "/v1/domains/banking/versions/v1/label-issues".into(),
            None,
            &[Admin, Steward],
        ),
        (
            "POST",
            "/v1/domains/banking/versions/v1/override".into(),
            Some(review.clone()),
            &[Admin, Steward],
        ),
        ("GET", "/v1/reviews".into(), None, &[Admin, Dept, Steward]),
        (
            "POST",
            "/v1/domains/banking/predict".into(),
            Some(json!({"input": "where is my card"})),
            &[Admin, Dept, Serving],
        ),
        (
            "POST",
            format!("/v1/predictions/{prediction}/feedback"),
            Some(json!({"correct": true})),
            &[Admin, Dept, Steward, Serving],
        ),
        ("GET", "/v1/domains/banking/serving".into(), None, all),
        (
            "POST",
            "/v1/chat/completions".into(),
            Some(json!({"model": "banking", "messages": [{"role": "user", "content": "hi"}]})),
            &[Admin, Dept, Serving],
        ),
    ];
    // (caller, token, role and whether banking is in its scope; `None`: not authenticated)
    type Caller = (&'static str, Option<String>, Option<(Who, bool)>);
    let callers: Vec<Caller> = vec![
        ("no token", None, None),
        ("unknown token", Some("fw_0000".into()), None),
        ("revoked token", Some(tokens["revoked"].0.clone()), None),
        ("admin", Some(admin.into()), Some((Admin, true))),
        (
            "department, own domain",
            Some(tokens["dept-banking"].0.clone()),
            Some((Dept, true)),
        ),
        (
            "department, other domain",
            Some(tokens["dept-cards"].0.clone()),
            Some((Dept, false)),
        ),
        (
            "steward, own domain",
            Some(tokens["steward-banking"].0.clone()),
            Some((Steward, true)),
        ),
        (
            "steward, other domain",
            Some(tokens["steward-cards"].0.clone()),
            Some((Steward, false)),
        ),
        (
            "serving, own domain",
            Some(tokens["serving-banking"].0.clone()),
            Some((Serving, true)),
        ),
        (
            "serving, other domain",
            Some(tokens["serving-cards"].0.clone()),
            Some((Serving, false)),
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, body, allowed) in &endpoints {
        // The domain list is not scoped by path: every role may call it (and sees its own).
        let scoped = path.contains("/banking")
            || path.starts_with("/v1/jobs/")
            || path.starts_with("/v1/predictions/")
            || path == "/v1/chat/completions";
        for (caller, token, who) in &callers {
            let (status, resp) = call(method, path, token.as_deref(), body.clone()).await;
            let expected = match who {
                None => Some(401),
                Some((role, _)) if !allowed.contains(role) => Some(403),
                Some((_, false)) if scoped => Some(403),
                Some(_) => None,
            };
            let ok = match expected {
                Some(code) => status == code,
                None => status != 401 && status != 403,
            };
            if !ok {
                failures.push(format!("{caller}: {method} {path} -> {status} {resp}"));
            } else if let Some(code) = expected {
                let want = if code == 401 {
                    "unauthenticated"
                } else {
                    "forbidden"
                };
                assert_eq!(resp["code"], want, "{caller}: {method} {path}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Names are unique among live tokens; a revoked one's name is free again. A token's scope
    // changes without a new secret.
    let create = |name: &str| {
        call(
            "POST",
            "/v1/tokens",
            Some(admin),
            Some(json!({"name": name, "role": "department", "domains": ["cards"]})),
        )
    };
    let (status, body) = create("dept-banking").await;
    error_of(status, &body, 409, "token_name_taken");
    assert_eq!(create("revoked").await.0, 201);
    let dept_cards = &tokens["dept-cards"];
    let rescope = |domains: Value| {
        call(
            "PATCH",
            &format!("/v1/tokens/{}", dept_cards.1),
            Some(admin),
            Some(json!({"domains": domains})),
        )
    };
    let jobs_of_banking = || call("GET", "/v1/domains/banking/jobs", Some(&dept_cards.0), None);
    assert_eq!(jobs_of_banking().await.0, 403);
    let (status, body) = rescope(json!(["cards", "banking"])).await;
    assert_eq!(
        (status, &body["domains"]),
        (200, &json!(["cards", "banking"])),
        "{body}"
    );
    assert_eq!(jobs_of_banking().await.0, 200);
    let (status, body) = rescope(json!([])).await;
    error_of(status, &body, 422, "invalid_field");
    let (status, body) = rescope(json!(["nowhere"])).await;
    error_of(status, &body, 404, "domain_not_found");
    assert_eq!(rescope(json!(["cards"])).await.0, 200);
    assert_eq!(jobs_of_banking().await.0, 403);

    // The CLI sends corrections with a token, and says what is wrong without one.
    let csv = dir.path().join("more.csv");
    std::fs::write(
        &csv,
        format!("text,category\nmy card is late,{}\n", labels[0]),
    )
    .unwrap();
    let import = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"));
        cmd.args(["import", "banking"])
            .arg(&csv)
            .args(["--server", &base]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.output().unwrap()
    };
    let out = import(Some(&tokens["dept-banking"].0));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = import(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pass --token or set FLYWHEEL_TOKEN"),
        "{stderr}"
    );

    // Public: probes and scrapes.
    for path in ["/healthz", "/livez", "/metrics"] {
        assert_eq!(call("GET", path, None, None).await.0, 200);
    }
    // A department sees only its domains.
    let (_, listed) = call("GET", "/v1/domains", Some(&tokens["dept-cards"].0), None).await;
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cards"]);
    // With a token, the actor is the token's name; a `by` naming someone else is refused.
    let steward = &tokens["steward-banking"].0;
    let (status, err) = call(
        "PUT",
        "/v1/domains/banking/aliases/canary",
        Some(steward),
        Some(json!({"to": "v1", "by": "someone-else", "reason": "x"})),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    let (_, audit) = call("GET", "/v1/domains/banking/audit", Some(steward), None).await;
    let moves: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "alias_move")
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(moves, ["bootstrap-admin", "steward-banking"]);
    running.shutdown().await.unwrap();
}

/// Manual runs, one at a time; cancelling a training job stops the trainer at its next step
/// and publishes nothing; a queued job cancels before it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_run_can_be_cancelled_mid_training() {
    // Long enough that the cancel lands while the trainer is stepping.
    let app = TestApp::spawn_with(|c| c.worker.epochs = Some(40)).await;
    app.create_domain(100_000).await;
    let (status, _) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202);
    let (status, job) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(
        (status, job["trigger"].as_str()),
        (201, Some("manual")),
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, err) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("job_in_flight")),
        "{err}"
    );

    // Wait for training steps, then cancel.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "training never started");
        let (_, events) = app.get(&format!("/v1/jobs/{id}/events")).await;
        if events.to_string().contains("\"kind\":\"metrics\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, job) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(
        (status, job["status"].as_str()),
        (200, Some("cancelled")),
        "{job}"
    );
    loop {
        assert!(Instant::now() < deadline, "the trainer did not stop");
        let (_, events) = app.get(&format!("/v1/jobs/{id}/events")).await;
        if events
            .to_string()
            .contains("stopped: the job was cancelled")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(versions["data"], json!([]), "{versions}");
    let (status, err) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("job_not_cancellable"))
    );
    let (_, listed) = app.get("/v1/jobs?status=cancelled").await;
    assert_eq!(listed["data"][0]["id"], id.as_str(), "{listed}");
    let (status, err) = app.get("/v1/jobs?status=sleeping").await;
    assert_eq!((status, err["code"].as_str()), (422, Some("invalid_field")));

    // The domain is free again; a job cancelled while queued never trains.
    let (status, job) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(status, 201, "{job}");
    let second = job["id"].as_str().unwrap();
    let (status, job) = app
        .post(&format!("/v1/jobs/{second}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, job["status"].as_str()),
        (200, Some("cancelled")),
        "{job}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, events) = app.get(&format!("/v1/jobs/{second}/events")).await;
    assert!(!events.to_string().contains("training on"), "{events}");
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.as_str().unwrap().contains(
            "flywheel_job_duration_seconds_count{domain=\"banking\",outcome=\"cancelled\"} 2"
        ),
        "{metrics}"
    );
}

/// `/openapi.json` documents exactly the routes the router serves, each with its roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_router() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();

    // Every path the route table declares is documented, and nothing more.
    let source = include_str!("../services/api/src/routes/mod.rs");
    let mut routed: Vec<&str> = source
        .lines()
        .filter_map(|line| {
            let (verb, rest) = line.trim_start().split_once(' ')?;
            ["Get", "Post", "Put", "Delete"]
                .contains(&verb)
                .then_some(())?;
            rest.strip_prefix('"')?.split('"').next()
        })
        .collect();
    routed.sort();
    routed.dedup();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    assert_eq!(documented, routed);

    // Every documented operation is routed with that method.
    for (path, ops) in paths {
        let concrete = path
            .replace("{domain}", "banking")
            .replace("{version}", "v1")
            .replace("{alias}", "production")
            .replace("{id}", "1");
        for (method, op) in ops.as_object().unwrap() {
            let resp = app
                .client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", app.base),
                )
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(
                status != 405 && body["code"] != "route_not_found",
                "{method} {path}: {status} {body}"
            );
            let public =
                ["/healthz", "/livez", "/metrics", "/openapi.json"].contains(&path.as_str());
            assert_eq!(op["security"] == json!([]), public, "{method} {path}");
            if !public {
                assert!(!op["x-flywheel-roles"].as_array().unwrap().is_empty());
            }
        }
    }
    let codes = doc["components"]["schemas"]["Error"]["properties"]["code"]["oneOf"]
        .as_array()
        .unwrap();
    assert!(codes.iter().any(|c| c["const"] == "job_not_cancellable"));
}

/// A `flywheel serve` child process, killed with SIGKILL when dropped or asked.
struct Server {
    child: std::process::Child,
    base: String,
}

impl Server {
    /// The API alone.
    fn start(data_dir: &std::path::Path, database: &flywheel_db::DatabaseUrl) -> Self {
        Self::start_with(data_dir, database, "api")
    }

    /// `roles` as `--roles` takes them; a 3-second job lease, so a dead worker's job comes
    /// back quickly.
    fn start_with(
        data_dir: &std::path::Path,
        database: &flywheel_db::DatabaseUrl,
        roles: &str,
    ) -> Self {
        Self::start_env(data_dir, database, roles, &[])
    }

    /// As [`Server::start_with`], with `env` added to the process's environment.
    fn start_env(
        data_dir: &std::path::Path,
        database: &flywheel_db::DatabaseUrl,
        roles: &str,
        env: &[(&str, String)],
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--database", &database_arg(database)])
            .args(["--listen", "127.0.0.1:0", "--auth", "off", "--roles", roles])
            .env("FLYWHEEL_JOB_LEASE_SECONDS", "3")
            .env("FLYWHEEL_CHECKPOINT_EVERY_STEPS", "5")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server exited before it was up")
                .unwrap();
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGKILL: no shutdown, no flush beyond what was committed.
    fn kill(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Corrections acknowledged with 202 survive SIGKILL at any moment, and retries after a
/// crash store nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_corrections_survive_kill_9_and_none_is_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (_, labels, model_dir) = banking_fixture(dir.path());
    let data = dir.path().join("data");
    let database = test_database(dir.path()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut server = Server::start(&data, &database);
    let spec = json!({"name": "banking", "task": "classification",
        "base_model": model_dir.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 1_000_000}});
    let resp = client
        .post(format!("{}/v1/domains", server.base))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // An API-only process leaves the database's gauges to the scheduler's process, so a sum
    // across pods counts each job once.
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("flywheel_build_info{"), "{metrics}");
    assert!(!metrics.contains("flywheel_jobs{"), "{metrics}");

    let batch = |n: usize| -> Value {
        json!(
            (0..50)
                .map(|i| json!({
                    "client_id": format!("b{n}-{i}"),
                    "input": format!("batch {n} row {i}: where is my card"),
                    "expected": labels[i % labels.len()],
                }))
                .collect::<Vec<_>>()
        )
    };
    let mut acknowledged = 0usize;
    let mut next = 0usize;
    // Batches sent but not acknowledged (the server died under them): resent after restart.
    let mut pending: Vec<usize> = Vec::new();
    for round in 0..6 {
        let killer = {
            let delay = 150 + 97 * round as u64;
            tokio::time::sleep(Duration::from_millis(delay))
        };
        tokio::pin!(killer);
        loop {
            let n = pending.pop().unwrap_or_else(|| {
                next += 1;
                next
            });
            let send = client
                .post(format!("{}/v1/domains/banking/corrections", server.base))
                .json(&batch(n))
                .send();
            tokio::select! {
                resp = send => match resp {
                    Ok(r) if r.status() == 202 => acknowledged += 1,
                    _ => pending.push(n),
                },
                _ = &mut killer => {
                    pending.push(n);
                    break;
                }
            }
        }
        server.kill();
        server = Server::start(&data, &database);
    }
    // Resend whatever was in flight at a kill: retries are idempotent by client id.
    for n in pending.drain(..) {
        let resp = client
            .post(format!("{}/v1/domains/banking/corrections", server.base))
            .json(&batch(n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        acknowledged += 1;
    }
    server.kill();

    eprintln!("{acknowledged} batches of 50 acknowledged across 6 kills");
    assert!(
        acknowledged >= 6,
        "the load never got going: {acknowledged}"
    );
    let db = flywheel_db::Db::open(&database).await.unwrap();
    let domain = db.domain("banking").await.unwrap().unwrap();
    let rows = db.corrections(domain.id, i64::MAX, None).await.unwrap();
    let mut ids: Vec<String> = rows.iter().filter_map(|r| r.client_id.clone()).collect();
    let stored = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), stored, "a correction was stored twice");
    // Every batch that was ever sent ends up acknowledged, and then stored in full.
    assert_eq!(
        stored,
        acknowledged * 50,
        "acknowledged {acknowledged} batches"
    );
}

/// A domain can leave out what a teacher model answered (or weigh it): excluded rows are
/// neither trained on nor judged by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacher_rows_can_be_left_out_of_training() {
    let app = TestApp::spawn().await;
    let spec = |teacher: Value| {
        json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
            "labels": app.labels, "policy": {"min_new_corrections": 300, "teacher": teacher}})
    };
    let (status, err) = app.post("/v1/domains", &spec(json!({"weight": 0}))).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("policy.teacher.weight"),
        "{err}"
    );
    assert_eq!(
        app.post("/v1/domains", &spec(json!({"include": false})))
            .await
            .0,
        201
    );

    // Every fourth row came from an escalation to a larger model.
    let rows: Vec<Value> = app
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            if i % 4 == 0 {
                r["source"] = json!("teacher");
                r["teacher"] = json!("big-model-70b");
            }
            r
        })
        .collect();
    assert_eq!(
        app.post("/v1/domains/banking/corrections", &json!(rows))
            .await
            .0,
        202
    );
    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let db = flywheel_db::Db::open(&app.database).await.unwrap();
    let domain = db.domain("banking").await.unwrap().unwrap();
    let stored = db.corrections(domain.id, i64::MAX, None).await.unwrap();
    let human = |split| {
        stored
            .iter()
            .filter(|r| r.split == split && r.source == flywheel_domain::Source::Human)
            .count()
    };
    let (_, events) = app
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await;
    let text = events.to_string();
    let (train, holdout) = (
        human(flywheel_domain::Split::Train),
        human(flywheel_domain::Split::Holdout),
    );
    assert!(
        text.contains(&format!("training on {train} corrections")),
        "{text}"
    );
    assert!(
        text.contains(&format!("evaluated on {holdout} held-out rows")),
        "{text}"
    );
    assert!(train + holdout < stored.len());
}

/// Below the threshold, corrections that waited too long start a run of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_corrections_start_a_run_below_the_threshold() {
    let app = TestApp::spawn().await;
    let spec = json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 100_000, "max_staleness_seconds": 1}});
    assert_eq!(app.post("/v1/domains", &spec).await.0, 201);
    let bad = json!({"name": "other", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels, "policy": {"schedule": "every tuesday"}});
    let (status, err) = app.post("/v1/domains", &bad).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("invalid_field")),
        "{err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("policy.schedule"),
        "{err}"
    );

    assert_eq!(
        app.post("/v1/domains/banking/corrections", &json!(app.rows))
            .await
            .0,
        202
    );
    let job = app.wait_for_job(1).await;
    assert_eq!(
        (job["status"].as_str(), job["trigger"].as_str()),
        (Some("succeeded"), Some("staleness")),
        "{job}"
    );
}

/// A worker killed in the middle of training gives its job back: after the lease runs out the
/// job is requeued, the restarted process resumes training from the newest checkpoint (not
/// from step 1), and the job is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_dies_is_requeued_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels, model_dir) = banking_fixture(dir.path());
    let data = dir.path().join("data");
    let database = test_database(dir.path()).await;
    let all = "api,scheduler,train,evaluate,publish";
    let client = reqwest::Client::new();
    let get = |base: String, path: String| {
        let client = client.clone();
        async move {
            client
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let server = Server::start_with(&data, &database, all);
    let spec = json!({"name": "banking", "task": "classification",
        "base_model": model_dir.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 300}});
    for (path, body, want) in [
        ("/v1/domains", spec, 201),
        ("/v1/domains/banking/corrections", json!(rows), 202),
    ] {
        let resp = client
            .post(format!("{}{path}", server.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
    }

    // Kill the process once training has saved a checkpoint.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (job_id, saved) = loop {
        assert!(
            Instant::now() < deadline,
            "training never saved a checkpoint"
        );
        let jobs = get(server.base.clone(), "/v1/domains/banking/jobs".into()).await;
        if let Some(id) = jobs["data"][0]["id"].as_str() {
            let checkpoints = get(server.base.clone(), format!("/v1/jobs/{id}/checkpoints")).await;
            if let Some(step) = checkpoints["data"][0]["step"].as_u64() {
                break (id.to_owned(), step);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill();

    let server = Server::start_with(&data, &database, all);
    let job = loop {
        assert!(
            Instant::now() < deadline,
            "the job never finished after the restart"
        );
        let job = get(server.base.clone(), format!("/v1/jobs/{job_id}")).await;
        if job["status"] != "running" && job["status"] != "queued" {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = get(server.base.clone(), format!("/v1/jobs/{job_id}/events")).await;
    assert!(
        events
            .to_string()
            .contains("requeued: its worker stopped answering"),
        "{events}"
    );
    // Resumed at or after the checkpoint seen before the kill (a later one may have landed
    // between the look and the kill), never from the start.
    let resumed: u64 = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| {
            e["message"]
                .as_str()?
                .strip_prefix("resumed from the checkpoint of step ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no resume in {events}"));
    assert!(
        resumed >= saved && resumed.is_multiple_of(5),
        "saved {saved}, resumed {resumed}"
    );
    // ...with the hyperparameters the first attempt planned, not planned again.
    assert!(
        events
            .to_string()
            .contains("resumed with the hyperparameters it planned"),
        "{events}"
    );
    let versions = get(server.base.clone(), "/v1/domains/banking/versions".into()).await;
    assert_eq!(versions["data"].as_array().unwrap().len(), 1, "{versions}");
    server.kill();
}

/// Clients that open connections and never finish a request cannot starve the others: past the
/// connection cap new connections wait in the kernel's backlog, a request whose headers do not
/// arrive in time is closed, and an upload that stalls mid-body is cut with 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_cannot_starve_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = TestApp::spawn_with(|config| {
        config.limits.max_connections = 32;
        config.limits.header_read_timeout = Duration::from_secs(1);
        config.limits.body_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/domains/banking/corrections HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let started = Instant::now();
    let resp = app
        .client
        .get(format!("{}/healthz", app.base))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the server answers while 200 half-sent requests stall");
    assert_eq!(resp.status(), 200);
    eprintln!(
        "/healthz answered after {:.1} s behind 200 stalled connections",
        started.elapsed().as_secs_f64()
    );
    // The server closed the stalled ones: each reads to its end.
    for s in stalled.iter_mut().take(10) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("a stalled connection is closed by the server")
            .unwrap();
    }

    let mut upload = tokio::net::TcpStream::connect(&addr).await.unwrap();
    upload
        .write_all(
            b"POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"name\": ",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), upload.read_to_end(&mut answer))
        .await
        .expect("a stalled upload is cut")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("\"request_timeout\""),
        "{answer}"
    );
    // Nothing was lost: the server still takes work. On a new connection: the pooled one has
    // idled past the 1 s keep-alive limit, and a POST sent as the server closes it is not
    // retried by the client (the suite saw that race once under load).
    app.client = reqwest::Client::new();
    app.create_domain(50).await;
}

/// The bootstrap admin token is read without surrounding spaces, and a new one retires the
/// one before it when the server restarts with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bootstrap_token_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let start = |token: &str| {
        let mut config = flywheel::Config::new(dir.path().join("data"));
        config.bootstrap_admin_token = Some(token.into());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            flywheel::start(config, listener).await.unwrap()
        }
    };
    let status = |running: &flywheel::Running, token: &str| {
        let req = client
            .get(format!("http://{}/v1/tokens", running.addr))
            .bearer_auth(token);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let first = start("  fw_first_bootstrap_token \n").await;
    assert_eq!(status(&first, "fw_first_bootstrap_token").await, 200);
    first.shutdown().await.unwrap();
    let second = start("fw_second_bootstrap_token").await;
    assert_eq!(status(&second, "fw_second_bootstrap_token").await, 200);
    assert_eq!(status(&second, "fw_first_bootstrap_token").await, 401);
    second.shutdown().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = flywheel::Config::new(dir.path().join("data"));
    config.bootstrap_admin_token = Some("short".into());
    let refused = flywheel::start(config, listener).await.err().unwrap();
    assert!(refused.to_string().contains("at least 16"), "{refused:#}");
}

/// The corrections stored in `banking`, train and holdout together, as `GET /v1/domains/{d}`
/// counts them.
async fn stored_in(app: &TestApp, domain: &str) -> i64 {
    let (status, body) = app.get(&format!("/v1/domains/{domain}")).await;
    assert_eq!(status, 200, "{body}");
    body["corrections"]["train"].as_i64().unwrap()
        + body["corrections"]["holdout"].as_i64().unwrap()
}

/// One NDJSON line of a valid `banking` correction.
fn ndjson_row(label: &str, i: usize) -> String {
    format!(
        "{}\n",
        json!({"input": format!("question number {i} about my account"), "expected": label})
    )
}

/// Asserts an error body is `{code, message}` with `code`, and returns the message.
fn error_of(status: u16, body: &Value, want_status: u16, want_code: &str) -> String {
    assert_eq!(
        (status, body["code"].as_str()),
        (want_status, Some(want_code)),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

/// Issue #20, 4: an NDJSON line over the limit is refused with 413 after the valid lines
/// before it are committed, as the message says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_ndjson_line_is_refused_after_the_lines_before_it_are_stored() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let label = app.labels[0].clone();
    let mut upload: String = (0..7).map(|i| ndjson_row(&label, i)).collect();
    upload.push_str(&format!(
        "{{\"input\": \"{}\", \"expected\": \"{label}\"}}\n",
        "x".repeat(400 * 1024)
    ));
    upload.push_str(&ndjson_row(&label, 99));
    let (status, body) = app
        .post_raw(
            "/v1/domains/banking/corrections",
            "application/x-ndjson",
            upload.into_bytes(),
        )
        .await;
    let message = error_of(status, &body, 413, "payload_too_large");
    assert!(message.contains("line 8"), "{message}");
    assert!(message.contains("7 stored"), "{message}");
    assert_eq!(stored_in(&app, "banking").await, 7);
}

/// Issue #20, 8: a `client_id` names one correction. The same content again is a duplicate;
/// other content under it is `409 idempotency_conflict` naming the row, within one batch
/// too, and a conflicting batch stores nothing. NDJSON rejects the conflicting line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_client_id_with_other_content_is_a_conflict() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let path = "/v1/domains/banking/corrections";
    let (a, b) = (app.labels[0].clone(), app.labels[1].clone());
    let row = |id: &str, input: &str, label: &str| json!({"client_id": id, "input": input, "expected": label});

    let (status, body) = app.post(path, &row("c1", "where is my card", &a)).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    // A retry: the same content under the same id, formatted differently, is a no-op.
    let (status, body) = app.post(path, &row("c1", "Where is  my card", &a)).await;
    assert_eq!(
        (status, body["duplicates"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    // Other content under the same id: refused, naming the id.
    for other in [
        row("c1", "where is my card", &b),
        row("c1", "another question", &a),
    ] {
        let (status, body) = app.post(path, &other).await;
        let message = error_of(status, &body, 409, "idempotency_conflict");
        assert!(message.contains("`c1`"), "{message}");
    }
    // In a batch: names the row, and the batch stores nothing.
    let batch = json!([
        row("c2", "a fresh question", &a),
        row("c1", "yet another question", &a)
    ]);
    let (status, body) = app.post(path, &batch).await;
    let message = error_of(status, &body, 409, "idempotency_conflict");
    assert!(message.contains("corrections[1]"), "{message}");
    // Within one batch: two rows under one id with different content, both named.
    let batch = json!([
        row("c3", "first of a pair", &a),
        row("c4", "unrelated", &a),
        row("c3", "second of a pair", &a)
    ]);
    let (status, body) = app.post(path, &batch).await;
    let message = error_of(status, &body, 409, "idempotency_conflict");
    assert!(
        message.contains("corrections[0]") && message.contains("corrections[2]"),
        "{message}"
    );
    assert_eq!(stored_in(&app, "banking").await, 1);
    // The same row twice in a batch is one row.
    let batch = json!([
        row("c5", "twice in a batch", &a),
        row("c5", "twice in a batch", &a)
    ]);
    let (status, body) = app.post(path, &batch).await;
    assert_eq!(
        (
            status,
            body["accepted"].as_u64(),
            body["duplicates"].as_u64()
        ),
        (202, Some(1), Some(1)),
        "{body}"
    );

    // NDJSON: the conflicting lines are rejected like any bad line, the rest stored.
    let lines = [
        row("c6", "a streamed question", &a),
        row("c1", "streamed under a taken id", &a),
        row("c6", "the same id again, other content", &a),
        row("c7", "another streamed question", &a),
        row("c6", "a streamed question", &a),
    ];
    let ndjson: String = lines.iter().map(|r| format!("{r}\n")).collect();
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", ndjson.into_bytes())
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(2), Some(1)),
        "{body}"
    );
    let rejected: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        [(2, "idempotency_conflict"), (3, "idempotency_conflict")],
        "{body}"
    );
    assert!(
        body["rejected"][0]["message"]
            .as_str()
            .unwrap()
            .contains("`c1`"),
        "{body}"
    );
    assert_eq!(stored_in(&app, "banking").await, 4);

    // Concurrent uploads of different content under one new id: exactly one is stored.
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..16 {
        let request = app.client.post(format!("{}{path}", app.base)).json(&row(
            "race",
            &format!("racing question {i}"),
            &a,
        ));
        racers.spawn(async move {
            let resp = request.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        });
    }
    let answers = racers.join_all().await;
    let won = answers
        .iter()
        .filter(|(s, b)| *s == 202 && b["accepted"] == 1)
        .count();
    let lost = answers
        .iter()
        .filter(|(s, b)| *s == 409 && b["code"] == "idempotency_conflict")
        .count();
    assert_eq!((won, lost), (1, 15), "{answers:?}");
    assert_eq!(stored_in(&app, "banking").await, 5);
}

/// Sends `data` as one chunk of a chunked request body.
async fn send_chunk(stream: &mut tokio::net::TcpStream, data: &[u8]) {
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await
        .unwrap();
    stream.write_all(data).await.unwrap();
    stream.write_all(b"\r\n").await.unwrap();
    stream.flush().await.unwrap();
}

/// Issue #20, 11: a token revoked while its NDJSON upload streams stores nothing more: the
/// upload ends `401 unauthenticated`, saying what was stored before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_mid_stream_stores_nothing_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let admin = "fw_admin_for_the_stream_test";
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(admin.into());
    })
    .await;
    let call = |method: &str, path: &str, body: Option<Value>| {
        let mut req = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.base))
            .bearer_auth(admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let spec = json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels, "policy": {"min_new_corrections": 100_000}});
    assert_eq!(call("POST", "/v1/domains", Some(spec)).await.0, 201);
    let (status, token) = call(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "dept", "role": "department", "domains": ["banking"]})),
    )
    .await;
    assert_eq!(status, 201, "{token}");
    let stored = || async {
        let (_, d) = call("GET", "/v1/domains/banking", None).await;
        d["corrections"]["train"].as_i64().unwrap() + d["corrections"]["holdout"].as_i64().unwrap()
    };

    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/domains/banking/corrections HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        token["token"].as_str().unwrap()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The first 1,000 lines are a chunk, committed while the upload goes on.
    let label = app.labels[0].clone();
    for block in 0..10 {
        let lines: String = (block * 100..(block + 1) * 100)
            .map(|i| ndjson_row(&label, i))
            .collect();
        send_chunk(&mut stream, lines.as_bytes()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored().await < 1000 {
        assert!(
            Instant::now() < deadline,
            "the first chunk was not committed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = token["id"].as_i64().unwrap();
    assert_eq!(
        call("DELETE", &format!("/v1/tokens/{id}"), None).await.0,
        204
    );
    // The upload goes on after the revocation: none of it is stored.
    let lines: String = (1000..1500).map(|i| ndjson_row(&label, i)).collect();
    send_chunk(&mut stream, lines.as_bytes()).await;
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body: Value = serde_json::from_str(body).unwrap_or(Value::String(body.into()));
    let message = error_of(status, &body, 401, "unauthenticated");
    assert!(
        message.contains("revoked") && message.contains("1000"),
        "{message}"
    );
    assert_eq!(stored().await, 1000);
}

/// Issue #20, 9: every 4xx on the corrections and query side is `{code, message}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_of_an_upload_or_a_query_is_code_and_message() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let path = "/v1/domains/banking/corrections";
    let (status, body) = app.post_raw(path, "application/x-ndjson", Vec::new()).await;
    let message = error_of(status, &body, 422, "invalid_field");
    assert!(message.contains("no correction"), "{message}");
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", b"\n  \n".to_vec())
        .await;
    error_of(status, &body, 422, "invalid_field");
    // Every line invalid: the first bad lines are named in the message.
    let ndjson = "not json\n{\"input\": \"x\", \"expected\": \"nope\"}\n";
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", ndjson.as_bytes().to_vec())
        .await;
    let message = error_of(status, &body, 422, "invalid_field");
    assert!(
        message.contains("line 1") && message.contains("line 2"),
        "{message}"
    );
    let ndjson =
        "{\"input\": \"x\", \"expected\": \"nope\"}\n{\"input\": \"y\", \"expected\": \"nada\"}\n";
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", ndjson.as_bytes().to_vec())
        .await;
    error_of(status, &body, 422, "unknown_label");
    assert_eq!(stored_in(&app, "banking").await, 0);

    // Query strings: unknown keys and bad values are refused with the error contract.
    for query in ["?colour=red", "?format=pdf", "?format=md&format=html&x=1"] {
        let (status, body) = app
            .get(&format!("/v1/domains/banking/versions/v1/report{query}"))
            .await;
        error_of(status, &body, 422, "invalid_field");
    }
}

/// The domain crate refuses NUL in every text field and redacts personal data in metadata
/// and the teacher's name: over HTTP, on each database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_are_refused_and_metadata_is_redacted_before_it_is_stored() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let path = "/v1/domains/banking/corrections";
    let label = app.labels[0].clone();
    for bad in [
        json!({"input": "my card\u{0000} is lost", "expected": label}),
        json!({"input": "my card is lost", "expected": label, "metadata": {"note": "a\u{0000}b"}}),
        json!({"input": "my card is lost", "expected": label, "metadata": {"deep": {"k\u{0000}": 1}}}),
        json!([{"input": "fine", "expected": label}, {"input": "fine too", "expected": label, "model_output": "\u{0000}"}]),
    ] {
        let (status, body) = app.post(path, &bad).await;
        let message = error_of(status, &body, 422, "invalid_field");
        assert!(message.contains("NUL"), "{message}");
    }
    assert_eq!(stored_in(&app, "banking").await, 0);
    let ndjson = format!(
        "{}\n{}\n{}\n",
        json!({"input": "first streamed line", "expected": label}),
        json!({"input": "second\u{0000}", "expected": label}),
        json!({"input": "third streamed line", "expected": label, "metadata": {"x": ["\u{0000}"]}}),
    );
    let ndjson = format!(
        "{ndjson}{}\n",
        json!({"input": "fourth streamed line", "expected": label})
    );
    let (status, body) = app
        .post_raw(path, "application/x-ndjson", ndjson.into_bytes())
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(2)),
        "{body}"
    );
    let rejected: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        [(2, "invalid_field"), (3, "invalid_field")],
        "{body}"
    );
    assert_eq!(stored_in(&app, "banking").await, 2);

    // An email nested in metadata, and one in the teacher's name, are not stored as sent.
    let row = json!({
        "client_id": "with-metadata",
        "input": "please close my account",
        "expected": label,
        "source": "teacher",
        "teacher": "big-model run by ops.lead@example.com",
        "metadata": {"ticket": {"from": ["jane.doe@example.com", 7], "jane.doe@example.com": true}},
    });
    let (status, body) = app.post(path, &row).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["redacted"]["email"].as_u64(), Some(3), "{body}");
    let query =
        "SELECT CAST(metadata AS TEXT), teacher FROM corrections WHERE client_id = 'with-metadata'";
    let stored: Vec<(String, Option<String>)> = match &app.database {
        flywheel_db::DatabaseUrl::Sqlite(file) => {
            let url = format!("sqlite://{}?mode=ro", file.display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query_as(query).fetch_all(&pool).await.unwrap()
        }
        flywheel_db::DatabaseUrl::Postgres(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query_as(query).fetch_all(&pool).await.unwrap()
        }
    };
    assert_eq!(stored.len(), 1);
    let (metadata, teacher) = &stored[0];
    assert!(!metadata.contains("example.com"), "{metadata}");
    assert!(metadata.contains("[EMAIL]"), "{metadata}");
    let teacher = teacher.as_deref().unwrap();
    assert!(
        !teacher.contains("example.com") && teacher.contains("[EMAIL]"),
        "{teacher}"
    );
}

/// Issue #20, 9: the jobs endpoints' query strings answer `{code, message}` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_jobs_query_string_is_code_and_message() {
    let app = TestApp::spawn().await;
    for path in [
        "/v1/jobs?limit=abc",
        "/v1/jobs?colour=red",
        "/v1/jobs?status=queued&status=failed",
        "/v1/jobs/0/events?after=abc",
        "/v1/jobs/0/events?before=3",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("invalid_field")),
            "{path}: {body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("query string: "),
            "{path}: {body}"
        );
    }
    let (status, body) = app.get("/v1/jobs?limit=5&status=queued").await;
    assert_eq!(status, 200, "{body}");
}

/// A client of the API with a bearer token, for the tests that run with auth on.
fn authed(app: &TestApp, token: &str) -> impl Fn(&str, &str, Option<Value>) -> BoxedCall + use<> {
    let (client, base, token) = (app.client.clone(), app.base.clone(), token.to_owned());
    move |method, path, body| {
        let mut req = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        Box::pin(async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }
}

type BoxedCall = std::pin::Pin<Box<dyn std::future::Future<Output = (u16, Value)> + Send>>;

/// Issue #20, 9: `GET /v1/jobs?limit=` counts only the caller's jobs, and requests racing to
/// start a run get one 201 and `409 job_in_flight` for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lists_are_scoped_before_the_limit_and_racing_starts_get_409() {
    const ADMIN: &str = "fw_bootstrap_for_tests";
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(ADMIN.into());
        // No worker: jobs stay queued, so each domain keeps its one job in flight.
        c.worker.queues.clear();
    })
    .await;
    let admin = authed(&app, ADMIN);
    let label = app.labels[0].clone();
    for name in ["banking", "cards", "loans", "race"] {
        let spec = json!({"name": name, "task": "classification", "base_model": app.model_dir,
            "labels": app.labels, "policy": {"min_new_corrections": 100_000}});
        let (status, body) = admin("POST", "/v1/domains", Some(spec)).await;
        assert_eq!(status, 201, "{body}");
        let row = json!({"input": format!("a question for {name}"), "expected": label});
        let path = format!("/v1/domains/{name}/corrections");
        assert_eq!(admin("POST", &path, Some(row)).await.0, 202);
    }
    // banking's job is the oldest of three.
    for name in ["banking", "cards", "loans"] {
        let (status, body) = admin("POST", &format!("/v1/domains/{name}/jobs"), None).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = admin(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "dept-banking", "role": "department", "domains": ["banking"]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let department = authed(&app, body["token"].as_str().unwrap());
    let (status, body) = department("GET", "/v1/jobs?limit=1", None).await;
    assert_eq!(status, 200, "{body}");
    let domains: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["domain"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["banking"], "{body}");
    let (_, body) = admin("GET", "/v1/jobs?limit=2", None).await;
    let domains: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["domain"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["loans", "cards"], "{body}");

    // Eight requests race to start `race`'s first run: one wins, the others are told why.
    let racers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(admin("POST", "/v1/domains/race/jobs", None)))
        .collect();
    let mut statuses = Vec::new();
    for racer in racers {
        let (status, body) = racer.await.unwrap();
        if status != 201 {
            let message = error_of(status, &body, 409, "job_in_flight");
            assert!(message.contains("one run at a time"), "{message}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
}

/// Issue #20, 9: HEAD is GET without a body (under GET's permissions), a method a route does
/// not take is `405 method_not_allowed`, and a path segment that is not UTF-8 is
/// `400 malformed_request`: each with the `{code, message}` body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_wrong_methods_and_undecodable_paths_answer_the_contract() {
    const ADMIN: &str = "fw_bootstrap_for_tests";
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(ADMIN.into());
    })
    .await;
    let head = |path: &str, token: Option<&str>| {
        let mut req = app.client.head(format!("{}{path}", app.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(head("/healthz", None).await, 200);
    assert_eq!(head("/v1/domains", None).await, 401);
    assert_eq!(head("/v1/domains", Some(ADMIN)).await, 200);

    let admin = authed(&app, ADMIN);
    for (method, path) in [
        ("DELETE", "/v1/jobs"),
        ("PUT", "/healthz"),
        ("GET", "/v1/domains/banking/rollback"),
    ] {
        let (status, body) = admin(method, path, None).await;
        let message = error_of(status, &body, 405, "method_not_allowed");
        assert!(message.contains(method), "{method} {path}: {message}");
    }
    for path in [
        "/v1/domains/%ff%fe/versions",
        "/v1/jobs/%ff",
        "/v1/domains/%c3/aliases/production",
        "/v1/tokens/%80",
    ] {
        let method = if path.starts_with("/v1/tokens") {
            "DELETE"
        } else {
            "GET"
        };
        let (status, body) = admin(method, path, None).await;
        let message = error_of(status, &body, 400, "malformed_request");
        assert!(message.contains("UTF-8"), "{path}: {message}");
    }
}

/// Issue #20, 10: with a metrics token set, `/metrics` (whose labels name every domain) answers
/// only to it; `/healthz` stays open for probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_keeps_domain_names_from_anonymous_scrapers() {
    let app =
        TestApp::spawn_with(|c| c.metrics_token = Some("scrape-secret-0123456789".into())).await;
    app.create_domain(100_000).await;
    let (status, body) = app.get("/metrics").await;
    let message = error_of(status, &body, 401, "unauthenticated");
    assert!(message.contains("metrics token"), "{message}");
    let scrape = |token: &'static str| {
        let req = app
            .client
            .get(format!("{}/metrics", app.base))
            .bearer_auth(token);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(scrape("not-the-metrics-token").await.0, 401);
    let (status, text) = scrape("scrape-secret-0123456789").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("flywheel_"), "{text}");
    assert_eq!(app.get("/healthz").await.0, 200);
}

/// Issue #21, 1: a domain's policy is edited by PATCH (a merge patch, validated whole), each
/// change a numbered version kept whole and audited with before and after; stewards change the
/// gate's rules only; what cannot change yet is refused saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_policy_is_edited_versioned_and_audited() {
    const ADMIN: &str = "fw_bootstrap_for_tests";
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(ADMIN.into());
    })
    .await;
    let admin = authed(&app, ADMIN);
    let spec = json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels, "policy": {"min_new_corrections": 100_000}});
    assert_eq!(admin("POST", "/v1/domains", Some(spec)).await.0, 201);
    let mut tokens = Vec::new();
    for (name, role) in [
        ("steward-banking", "steward"),
        ("dept-banking", "department"),
    ] {
        let (status, body) = admin(
            "POST",
            "/v1/tokens",
            Some(json!({"name": name, "role": role, "domains": ["banking"]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        tokens.push(authed(&app, body["token"].as_str().unwrap()));
    }
    let (steward, department) = (&tokens[0], &tokens[1]);
    let path = "/v1/domains/banking";

    // A steward loosens the per-label rule: version 2.
    let (status, body) = steward(
        "PATCH",
        path,
        Some(json!({"policy": {"max_label_drop": 0.3, "min_label_support": 20}, "reason": "labels are sparse"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy_version"], 2, "{body}");
    assert_eq!(body["policy"]["max_label_drop"], 0.3);
    assert_eq!(body["policy"]["min_new_corrections"], 100_000);
    // ...but not when a run starts, and a department changes nothing.
    let (status, body) = steward(
        "PATCH",
        path,
        Some(json!({"policy": {"min_new_corrections": 5}, "reason": "faster"})),
    )
    .await;
    let message = error_of(status, &body, 403, "forbidden");
    assert!(
        message.starts_with("policy.min_new_corrections: "),
        "{message}"
    );
    let (status, body) = department(
        "PATCH",
        path,
        Some(json!({"policy": {"min_accuracy": 0.1}, "reason": "x"})),
    )
    .await;
    error_of(status, &body, 403, "forbidden");
    // Nor may a department override the training block for one run.
    let (status, body) = department(
        "POST",
        "/v1/domains/banking/jobs",
        Some(json!({"training": {"auto_search": {"trials": 8}}})),
    )
    .await;
    let message = error_of(status, &body, 403, "forbidden");
    assert!(message.starts_with("training: "), "{message}");

    // The admin changes a trigger, then resets the steward's rule to its default: 3 and 4.
    let (status, body) = admin(
        "PATCH",
        path,
        Some(json!({"policy": {"min_new_corrections": 500}, "reason": "weekly volume"})),
    )
    .await;
    assert_eq!(
        (status, &body["policy_version"]),
        (200, &json!(3)),
        "{body}"
    );
    let (status, body) = admin(
        "PATCH",
        path,
        Some(json!({"policy": {"max_label_drop": null}, "reason": "back to the default"})),
    )
    .await;
    assert_eq!(
        (status, &body["policy_version"]),
        (200, &json!(4)),
        "{body}"
    );
    assert_eq!(body["policy"]["max_label_drop"], 0.1);
    // The same values again change nothing.
    let (status, body) = admin(
        "PATCH",
        path,
        Some(json!({"policy": {"min_new_corrections": 500}, "reason": "again"})),
    )
    .await;
    assert_eq!(
        (status, &body["policy_version"]),
        (200, &json!(4)),
        "{body}"
    );

    // Bad patches name what to fix, and change nothing.
    for (patch, code, says) in [
        (
            json!({"policy": {"epochs": 3}, "reason": "r"}),
            "invalid_field",
            "unknown field `epochs`",
        ),
        (
            json!({"policy": {"holdout_fraction": 0.9}, "reason": "r"}),
            "invalid_field",
            "policy.holdout_fraction",
        ),
        (
            json!({"policy": {"min_accuracy": "high"}, "reason": "r"}),
            "invalid_field",
            "policy.min_accuracy",
        ),
        (
            json!({"out_of_scope_label": "not-a-label", "reason": "r"}),
            "invalid_field",
            "out_of_scope_label",
        ),
        (
            json!({"labels": ["x"], "reason": "r"}),
            "invalid_field",
            "must stay where it is",
        ),
        (
            json!({"training": {"lora": {"r": 0}}, "reason": "r"}),
            "invalid_field",
            "training.lora.r",
        ),
        (
            json!({"training": {"epochs": 1}, "reason": "r"}),
            "invalid_field",
            "unknown field `epochs`",
        ),
        (
            json!({"policy": {"min_accuracy": 0.2}}),
            "invalid_field",
            "reason",
        ),
        (
            json!({"policy": {"min_accuracy": 0.2}, "reason": "r".repeat(2001)}),
            "invalid_field",
            "at most 2000",
        ),
        (
            json!({"hyperparameters": {}, "reason": "r"}),
            "invalid_field",
            "hyperparameters",
        ),
    ] {
        let (status, body) = admin("PATCH", path, Some(patch.clone())).await;
        let message = error_of(status, &body, 422, code);
        assert!(message.contains(says), "{patch}: {message}");
    }

    let (status, body) = steward("GET", &format!("{path}/policy/history"), None).await;
    assert_eq!(status, 200, "{body}");
    let history: Vec<(i64, &str, &str)> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["actor"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            (1, "registration", "registered"),
            (2, "steward-banking", "labels are sparse"),
            (3, "bootstrap-admin", "weekly volume"),
            (4, "bootstrap-admin", "back to the default"),
        ]
    );
    assert_eq!(body["data"][1]["policy"]["min_label_support"], 20);
    let (_, log) = steward("GET", &format!("{path}/audit"), None).await;
    let changes: Vec<&Value> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "domain_change")
        .collect();
    assert_eq!(changes.len(), 3, "{log}");
    assert_eq!(
        changes[0]["data"]["before"]["policy"]["max_label_drop"],
        0.1
    );
    assert_eq!(changes[0]["data"]["after"]["policy"]["max_label_drop"], 0.3);
    assert_eq!(changes[0]["data"]["policy_version"], 2);
}

/// Issue #21, 4: an NDJSON upload is one unit for the scheduler. Its first 1,000 rows are
/// committed (and over `min_new_corrections`) long before the rest arrive, yet the run the
/// scheduler starts covers the whole upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_snapshots_part_of_an_upload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(|c| c.worker.queues.clear()).await;
    app.create_domain(1_000).await;
    let label = app.labels[0].clone();
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = "POST /v1/domains/banking/corrections HTTP/1.1\r\nhost: test\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let lines: String = (0..1_500).map(|i| ndjson_row(&label, i)).collect();
    send_chunk(&mut stream, lines.as_bytes()).await;
    // The first chunk is committed; the scheduler ticks every 200 ms meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_in(&app, "banking").await < 1_000 {
        assert!(
            Instant::now() < deadline,
            "the first chunk was never committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, jobs) = app.get("/v1/domains/banking/jobs").await;
    assert_eq!(jobs["data"], json!([]), "a job started mid-upload");
    let lines: String = (1_500..2_500).map(|i| ndjson_row(&label, i)).collect();
    send_chunk(&mut stream, lines.as_bytes()).await;
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (_, jobs) = app.get("/v1/domains/banking/jobs").await;
        if let Some(job) = jobs["data"].as_array().unwrap().first() {
            break job.clone();
        }
        assert!(Instant::now() < deadline, "no job after the upload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stored_in(&app, "banking").await, 2_500);
    assert_eq!(job["snapshot_max_id"], 2_500, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_chooses_its_training_and_a_job_overrides_it() {
    let app = TestApp::spawn().await;
    let spec = |training: Value| {
        json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
            "labels": app.labels, "policy": {"min_new_corrections": 100_000}, "training": training})
    };
    // Each refusal names the field and what to do.
    for (training, says) in [
        (json!({"epochs": 3}), "unknown field `epochs`"),
        (json!({"n_epochs": "three"}), "\"auto\""),
        (json!({"lora": {"r": 1000}}), "training.lora.r"),
        (json!({"lora": {"r": 128}}), "--max-lora-rank"),
        (
            json!({"lora": {"target_modules": ["q_proj"]}}),
            "training.lora.target_modules",
        ),
        (
            json!({"n_epochs": 1, "learning_rate_multiplier": 1, "lora": {"r": 8}, "auto_search": {"trials": 2}}),
            "training.auto_search",
        ),
        (json!("manual"), "training"),
    ] {
        let (status, body) = app.post("/v1/domains", &spec(training.clone())).await;
        let message = error_of(status, &body, 422, "invalid_field");
        assert!(message.contains(says), "{training}: {message}");
    }
    let mut unknown = spec(json!("auto"));
    unknown["hyperparameters"] = json!({"n_epochs": 3});
    let (status, body) = app.post("/v1/domains", &unknown).await;
    error_of(status, &body, 422, "invalid_field");

    let (status, body) = app
        .post(
            "/v1/domains",
            &spec(json!({"n_epochs": 2, "lora": {"r": 4}, "max_seq_len": "auto"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["training"]["lora"]["r"], 4, "{body}");
    assert_eq!(body["training"]["batch_size"], "auto", "{body}");
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202, "{body}");

    // A job's overrides are checked like the domain's.
    for bad in [
        json!({"training": {"lora": {"r": 0}}}),
        json!({"trainig": {}}),
    ] {
        let (status, body) = app.post("/v1/domains/banking/jobs", &bad).await;
        error_of(status, &body, 422, "invalid_field");
    }
    let (status, job) = app
        .post(
            "/v1/domains/banking/jobs",
            &json!({"training": {"n_epochs": 1, "auto_search": {"trials": 2}}}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["training"]["n_epochs"], 1, "{job}");
    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // The block is edited like the policy (a merge patch, a new version), and labels grow.
    let mut labels = app.labels.clone();
    labels.push("new_fees_question".into());
    let patch = json!({"training": {"batch_size": 8, "lora": {"r": null}}, "labels": labels,
        "reason": "smaller batches", "by": "ops"});
    let resp = app
        .client
        .patch(format!("{}/v1/domains/banking", app.base))
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["policy_version"], 2, "{body}");
    assert_eq!(
        (
            &body["training"]["batch_size"],
            &body["training"]["lora"]["r"],
            &body["training"]["n_epochs"]
        ),
        (&json!(8), &json!("auto"), &json!(2)),
        "{body}"
    );
    assert_eq!(
        body["labels"].as_array().unwrap().last().unwrap(),
        "new_fees_question"
    );
    let (_, history) = app.get("/v1/domains/banking/policy/history").await;
    assert_eq!(history["data"][1]["training"]["batch_size"], 8, "{history}");
    assert_eq!(history["data"][0]["training"]["lora"]["r"], 4, "{history}");

    // The run used the job's epochs, the domain's rank, and chose the rest from the data.
    let (_, events) = app
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await;
    let events = events["data"].as_array().unwrap();
    let plan = &events
        .iter()
        .find(|e| e["kind"] == "hyperparameters")
        .expect("a hyperparameters event")["data"];
    let resolved = &plan["resolved"];
    assert_eq!(
        (&resolved["n_epochs"], &resolved["lora_r"]),
        (&json!(1), &json!(4)),
        "{plan}"
    );
    let why = resolved["why"].to_string();
    for auto in ["batch_size", "max_seq_len", "auto_search"] {
        assert!(why.contains(auto), "{auto} not explained: {why}");
    }
    let trials = plan["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2, "{plan}");
    assert_eq!(
        trials.iter().filter(|t| t["chosen"] == true).count(),
        1,
        "{plan}"
    );
    assert!(
        trials
            .iter()
            .all(|t| t["lora_r"] == 4 && t["validation_loss"].as_f64().unwrap() > 0.0),
        "only the learning rate was free: {plan}"
    );
    let trial_events = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("auto_search trial")
        })
        .count();
    assert_eq!(trial_events, 2);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(app.registry_path("domains/banking/versions/v1/manifest.json")).unwrap(),
    )
    .unwrap();
    let hp = &manifest["lineage"]["hyperparameters"];
    assert_eq!(
        (&hp["epochs"], &hp["lora"]["r"]),
        (&json!(1), &json!(4)),
        "{hp}"
    );
    assert_eq!(hp["max_seq_len"], resolved["max_seq_len"]);
    assert_eq!(
        manifest["lineage"]["training_plan"]["requested"]["n_epochs"],
        1
    );
    let (_, report) = app
        .get("/v1/domains/banking/versions/v1/report?format=md")
        .await;
    let report = report.as_str().unwrap();
    assert!(
        report.contains("## Training") && report.contains("| trial |"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_version_is_judged_again_after_the_policy_changes() {
    let app = TestApp::spawn().await;
    let spec = json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
        "labels": app.labels,
        "policy": {"min_new_corrections": 100_000, "min_improvement": 0.99}});
    let (status, body) = app.post("/v1/domains", &spec).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(status, 201, "{body}");
    let job = app.wait_for_job(1).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["decision"]["rule"], "min_improvement", "{job}");
    let path = "/v1/domains/banking/versions/v1/reevaluate";
    let review = json!({"reason": "second look", "by": "steward"});

    // Under the same policy the verdict stands, and the second look is audited.
    let (status, body) = app.post(path, &review).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["status"], &body["decision"]["promote"]),
        (&json!("held_back"), &json!(false))
    );
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(versions["production"], Value::Null, "{versions}");

    // The steward's rule was too strict: loosened, the stored evidence passes, no retraining.
    let resp = app
        .client
        .patch(format!("{}/v1/domains/banking", app.base))
        .json(&json!({"policy": {"min_improvement": 0.0}, "reason": "0.99 was a typo", "by": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (status, body) = app.post(path, &review).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["status"],
            &body["production"],
            &body["policy_version"]
        ),
        (&json!("promoted"), &json!("v1"), &json!(2)),
        "{body}"
    );
    let (_, versions) = app.get("/v1/domains/banking/versions").await;
    assert_eq!(versions["production"], "v1", "{versions}");
    assert_eq!(versions["data"][0]["status"], "promoted", "{versions}");
    let (_, jobs) = app.get("/v1/domains/banking/jobs").await;
    assert_eq!(
        jobs["data"].as_array().unwrap().len(),
        1,
        "no run was started: {jobs}"
    );
    let (_, audit) = app.get("/v1/domains/banking/audit").await;
    let regated = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "gate_decision" && e["actor"] == "steward")
        .count();
    assert_eq!(regated, 2, "{audit}");

    // Once promoted it is not judged again, and a bad request names what to fix.
    let (status, body) = app.post(path, &review).await;
    error_of(status, &body, 409, "version_not_held_back");
    let (status, body) = app.post(path, &json!({"by": "steward"})).await;
    error_of(status, &body, 422, "invalid_field");
    let (status, body) = app
        .post("/v1/domains/banking/versions/v9/reevaluate", &review)
        .await;
    error_of(status, &body, 404, "version_not_found");
}

impl TestApp {
    /// `method` on `path` with a JSON body.
    async fn call(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stewards_find_contradictions_relabel_and_remove_corrections() {
    let app = TestApp::spawn().await;
    app.create_domain(100_000).await;
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(app.rows))
        .await;
    assert_eq!(status, 202, "{body}");
    // The same question again, in other case and spacing, with another answer.
    let first = &app.rows[0];
    let input = first["input"].as_str().unwrap();
    let other = app
        .labels
        .iter()
        .find(|l| **l != first["expected"])
        .unwrap();
    let (status, body) = app
        .post(
            "/v1/domains/banking/corrections",
            &json!({"input": format!("  {}", input.to_uppercase()), "expected": other}),
        )
        .await;
    assert_eq!(status, 202, "{body}");

    let (status, conflicts) = app.get("/v1/domains/banking/corrections/conflicts").await;
    assert_eq!(status, 200, "{conflicts}");
    let groups = conflicts["data"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{conflicts}");
    let labels = groups[0]["labels"].as_object().unwrap();
    assert_eq!(labels.len(), 2, "{conflicts}");
    let contradicting = labels[other.as_str()][0].as_i64().unwrap();

    // Search, filter and page.
    let word = input.split_whitespace().max_by_key(|w| w.len()).unwrap();
    let (status, found) = app
        .get(&format!(
            "/v1/domains/banking/corrections?q={}",
            word.to_uppercase()
        ))
        .await;
    assert_eq!(status, 200, "{found}");
    let ids: Vec<i64> = found["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert!(ids.contains(&contradicting) && ids.len() >= 2, "{found}");
    let label = first["expected"].as_str().unwrap();
    let (_, page) = app
        .get(&format!(
            "/v1/domains/banking/corrections?expected={label}&limit=2"
        ))
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2, "{page}");
    let after = page["next_after"].as_i64().expect("a next page");
    let (_, next) = app
        .get(&format!(
            "/v1/domains/banking/corrections?expected={label}&limit=2&after={after}"
        ))
        .await;
    assert!(
        next["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["id"].as_i64().unwrap() > after && c["expected"] == label),
        "{next}"
    );
    for bad in [
        "?split=dev",
        "?limit=0",
        "?colour=red",
        "?since=yesterday",
        "?q=",
    ] {
        let (status, body) = app
            .get(&format!("/v1/domains/banking/corrections{bad}"))
            .await;
        error_of(status, &body, 422, "invalid_field");
    }

    // A run leaves the contradiction out, and says so.
    let (status, job) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(status, 201, "{job}");
    let job = app.wait_for_job(1).await;
    let (_, events) = app
        .get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))
        .await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]
                .as_str()
                .unwrap()
                .starts_with("left out 2 corrections")),
        "{events}"
    );

    // The run's label review: rows its candidate confidently puts under another label, each
    // a stored correction, most confident first.
    let (status, issues) = app
        .get("/v1/domains/banking/versions/v1/label-issues")
        .await;
    assert_eq!(status, 200, "{issues}");
    let issues = issues["data"].as_array().unwrap();
    eprintln!("{} label issues; first: {:?}", issues.len(), issues.first());
    assert!(
        !issues.is_empty(),
        "a tiny model on the mini slice disagrees somewhere"
    );
    let margin = |i: &Value| {
        i["suggested_probability"].as_f64().unwrap() - i["given_probability"].as_f64().unwrap()
    };
    for pair in issues.windows(2) {
        assert!(margin(&pair[0]) >= margin(&pair[1]), "{pair:?}");
    }
    for i in issues.iter().take(5) {
        assert!(margin(i) > 0.0 && i["suggested"] != i["given"], "{i}");
        let id = i["id"].as_i64().unwrap();
        let (_, row) = app
            .get(&format!(
                "/v1/domains/banking/corrections?after={}&limit=1",
                id - 1
            ))
            .await;
        assert_eq!(
            (&row["data"][0]["id"], &row["data"][0]["expected"]),
            (&i["id"], &i["given"]),
            "{i}"
        );
    }
    let (_, report) = app
        .get("/v1/domains/banking/versions/v1/report?format=md")
        .await;
    assert!(report.as_str().unwrap().contains("## Labels to review"));

    // Relabelling it to what the first row says would duplicate that row; removing it
    // resolves the contradiction, and it is still there for the record.
    let path = format!("/v1/domains/banking/corrections/{contradicting}");
    let (status, body) = app
        .call(
            "PATCH",
            &path,
            &json!({"expected": label, "reason": "r", "by": "steward"}),
        )
        .await;
    error_of(status, &body, 409, "correction_exists");
    let (_, counted) = app.get("/v1/domains/banking").await;
    let (status, body) = app
        .call(
            "DELETE",
            &path,
            &json!({"reason": "contradicts row 1", "by": "steward"}),
        )
        .await;
    assert_eq!((status, &body["removed"]), (200, &json!(true)), "{body}");
    let (_, conflicts) = app.get("/v1/domains/banking/corrections/conflicts").await;
    assert_eq!(conflicts["data"], json!([]));
    let (_, after_removal) = app.get("/v1/domains/banking").await;
    let total = |d: &Value| {
        d["corrections"]["train"].as_i64().unwrap() + d["corrections"]["holdout"].as_i64().unwrap()
    };
    assert_eq!(total(&after_removal), total(&counted) - 1);
    let (_, kept) = app
        .get(&format!(
            "/v1/domains/banking/corrections?include_removed=true&after={}",
            contradicting - 1
        ))
        .await;
    assert!(kept["data"][0]["removed_at"].is_string(), "{kept}");
    let (status, body) = app
        .call(
            "DELETE",
            &path,
            &json!({"reason": "again", "by": "steward"}),
        )
        .await;
    error_of(status, &body, 404, "correction_not_found");

    // A holdout row relabelled keeps its split; bad relabels name what to fix.
    let (_, holdout) = app
        .get("/v1/domains/banking/corrections?split=holdout&limit=1")
        .await;
    let row = &holdout["data"][0];
    let id = row["id"].as_i64().unwrap();
    let new_label = app.labels.iter().find(|l| **l != row["expected"]).unwrap();
    let (status, body) = app
        .call(
            "PATCH",
            &format!("/v1/domains/banking/corrections/{id}"),
            &json!({"expected": new_label, "reason": "mislabelled", "by": "steward"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, again) = app
        .get(&format!(
            "/v1/domains/banking/corrections?after={}&limit=1",
            id - 1
        ))
        .await;
    assert_eq!(
        (&again["data"][0]["expected"], &again["data"][0]["split"]),
        (&json!(new_label), &json!("holdout"))
    );
    for (target, body, status_code, code) in [
        (
            id.to_string(),
            json!({"expected": "no_such_label", "reason": "r", "by": "s"}),
            422,
            "unknown_label",
        ),
        (
            id.to_string(),
            json!({"expected": new_label, "by": "s"}),
            422,
            "invalid_field",
        ),
        (
            "999999".to_string(),
            json!({"expected": new_label, "reason": "r", "by": "s"}),
            404,
            "correction_not_found",
        ),
        (
            "abc".to_string(),
            json!({"expected": new_label, "reason": "r", "by": "s"}),
            404,
            "correction_not_found",
        ),
    ] {
        let (status, answer) = app
            .call(
                "PATCH",
                &format!("/v1/domains/banking/corrections/{target}"),
                &body,
            )
            .await;
        error_of(status, &answer, status_code, code);
    }
    let (_, audit) = app.get("/v1/domains/banking/audit").await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            e["action"]
                .as_str()
                .filter(|a| a.starts_with("correction_"))
        })
        .collect();
    assert_eq!(actions.len(), 2, "{audit}");
    let relabel = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "correction_relabel")
        .unwrap();
    assert_eq!(
        (&relabel["data"]["before"], &relabel["data"]["after"]),
        (&row["expected"], &json!(new_label)),
        "{relabel}"
    );
}

/// An operator's log: with `--log-format json` every line is one JSON object without colour
/// codes, and each decision is one line naming the domain, version, action and actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_logged_one_json_line_each() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels, model_dir) = banking_fixture(dir.path());
    let database = test_database(dir.path()).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--database",
            &database_arg(&database),
            "--log-format",
            "json",
        ])
        .args(["--listen", "127.0.0.1:0", "--auth", "off"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || {
        let line = lines
            .recv_timeout(Duration::from_secs(300))
            .expect("the server stopped logging");
        assert!(!line.contains('\u{1b}'), "a colour code in {line}");
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr = loop {
        if let Some(addr) = next()["addr"].as_str() {
            break addr.to_owned();
        }
    };
    let client = reqwest::Client::new();
    let spec = json!({"name": "banking", "task": "classification",
        "base_model": model_dir.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 300, "min_improvement": -1.0, "significance_level": 1.0,
                   "max_label_drop": 1.0, "min_label_support": 1}});
    for (path, body) in [
        ("/v1/domains", spec),
        ("/v1/domains/banking/corrections", json!(rows)),
    ] {
        let resp = client
            .post(format!("http://{addr}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    let decision = loop {
        let line = next();
        if line["target"] == "flywheel::decision" {
            break line;
        }
    };
    assert_eq!(
        (
            &decision["domain"],
            &decision["version"],
            &decision["action"],
            &decision["actor"]
        ),
        (
            &json!("banking"),
            &json!("v1"),
            &json!("gate_decision"),
            &json!("flywheel-gate")
        ),
        "{decision}"
    );
    assert!(
        decision["reason"].as_str().unwrap().contains("accuracy"),
        "{decision}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

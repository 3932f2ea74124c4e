//! Ingestion sources as a platform team wires them: a directory of JSONL, CSV and Parquet
//! files with some bad ones, an S3 prefix (SeaweedFS) and a PostgreSQL table, each read by
//! the ingest queue's worker, with the worker killed mid-read. Every row is stored once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Server, TestApp, banking_fixture, drop_test_database, test_database};

/// `n` Banking77 rows as (text, label), each text made unique by its number.
fn rows_of(app_rows: &[Value], from: usize, n: usize) -> Vec<(String, String)> {
    (from..from + n)
        .map(|i| {
            let r = &app_rows[i % app_rows.len()];
            (
                format!("{} (#{i})", r["input"].as_str().unwrap()),
                r["expected"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn jsonl(rows: &[(String, String)]) -> String {
    rows.iter()
        .map(|(text, label)| json!({"text": text, "label": label}).to_string() + "\n")
        .collect()
}

/// The domain's one source, as `GET …/sources` shows it.
async fn source(app: &TestApp) -> Value {
    let (status, body) = app.get("/v1/domains/banking/sources?limit=50").await;
    assert_eq!(status, 200, "{body}");
    body["sources"][0].clone()
}

/// Polls the source listing until `done` says it is so, or fails after a minute.
async fn wait_for(app: &TestApp, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = source(app).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn unit<'a>(source: &'a Value, key: &str) -> &'a Value {
    source["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["unit"].as_str().unwrap().ends_with(&format!("/{key}")))
        .unwrap_or_else(|| panic!("no file {key} in {source:#}"))
}

/// A directory as a log shipper fills it: three formats, an unreadable file and a file of
/// nothing valid. The readable ones are stored, each row once, with their refusals listed by
/// line; the bad ones are quarantined and never retried; a new file is read on the next
/// poll, a rewritten one is listed as changed and re-read only when the source says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_a_directory_are_read_once_and_bad_ones_quarantined() {
    let app = TestApp::spawn().await;
    let logs = app.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let all = rows_of(&app.rows, 0, 200);
    std::fs::write(
        logs.join("2026-12-07T10.jsonl"),
        jsonl(&all[..80])
            + "this line is not JSON\n"
            + &json!({"text": "where is my card", "label": "no_such_label"}).to_string()
            + "\n",
    )
    .unwrap();
    let mut csv = String::from("text,label\n");
    for (text, label) in &all[80..130] {
        csv += &format!("\"{}\",{label}\n", text.replace('"', "\"\""));
    }
    std::fs::write(logs.join("2026-12-07T11.csv"), csv).unwrap();
    let parquet: Vec<Vec<String>> = all[130..170]
        .iter()
        .map(|(t, l)| vec![t.clone(), l.clone()])
        .collect();
    flywheel_ingest::write_parquet(
        &logs.join("2026-12-07T12.parquet"),
        &["text", "label"],
        &parquet,
    )
    .unwrap();
    std::fs::write(
        logs.join("2026-12-07T13.parquet"),
        b"PAR1 truncated by a crash",
    )
    .unwrap();
    std::fs::write(
        logs.join("2026-12-07T14.jsonl"),
        "{\"text\": \"no label\"}\n",
    )
    .unwrap();
    // Not data: a shipper's marker and a file of no known format.
    std::fs::write(logs.join("_SUCCESS"), "").unwrap();
    std::fs::write(logs.join("notes.txt"), "hello").unwrap();

    // Refused before anything is stored: a credential in the spec, a relative path.
    let spec = |sources: Value| {
        json!({"name": "banking", "task": "classification", "base_model": app.model_dir,
            "labels": app.labels, "policy": {"min_new_corrections": 1_000_000},
            "sources": sources})
    };
    let mapping = json!({"input": "text", "expected": "label"});
    let (status, body) = app
        .post(
            "/v1/domains",
            &spec(
                json!([{"name": "logs", "files": "s3://bucket/logs/", "mapping": mapping,
                "options": {"aws_secret_access_key": "hunter2"}}]),
            ),
        )
        .await;
    assert!(
        super::error_of(status, &body, 422, "invalid_field")
            .starts_with("sources[0].options.aws_secret_access_key:"),
        "{body}"
    );
    let (status, body) = app
        .post(
            "/v1/domains",
            &spec(json!([{"name": "logs", "files": "logs/", "mapping": mapping}])),
        )
        .await;
    assert!(
        super::error_of(status, &body, 422, "invalid_field").starts_with("sources[0].files:"),
        "{body}"
    );

    let source_spec = json!({"name": "logs", "files": logs.display().to_string(),
        "mapping": mapping, "interval_seconds": 5});
    let (status, body) = app
        .post("/v1/domains", &spec(json!([source_spec.clone()])))
        .await;
    assert_eq!(status, 201, "{body}");
    let s = wait_for(&app, "the first poll", |s| {
        s["totals"]["done"] == 3 && s["totals"]["quarantined"] == 2
    })
    .await;
    assert_eq!(s["totals"]["ingested"], 170, "{s:#}");
    assert_eq!(s["totals"]["rejected"], 3, "{s:#}");
    assert_eq!(super::stored_in(&app, "banking").await, 170);
    let first = unit(&s, "2026-12-07T10.jsonl");
    assert_eq!(
        (&first["state"], &first["position"], &first["ingested"]),
        (&json!("done"), &json!("82"), &json!(80))
    );
    let refusals: Vec<(i64, &str)> = first["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_i64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(refusals, [(81, "malformed_json"), (82, "unknown_label")]);
    let broken = unit(&s, "2026-12-07T13.parquet");
    assert_eq!(broken["state"], "quarantined");
    assert!(
        broken["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("not a readable Parquet file"),
        "{broken:#}"
    );
    let invalid = unit(&s, "2026-12-07T14.jsonl");
    assert_eq!(
        (&invalid["state"], &invalid["errors"][0]["code"]),
        (&json!("quarantined"), &json!("invalid_field"))
    );
    assert_eq!(s["units"].as_array().unwrap().len(), 5, "{s:#}");
    // A Parquet row is stored as its text says.
    let (_, stored) = app
        .get("/v1/domains/banking/corrections?limit=5&q=%23130%29")
        .await;
    assert_eq!(stored["data"][0]["input"], json!(all[130].0), "{stored:#}");

    // The next poll: a new file (10 new rows, 5 already stored) and a rewritten one.
    let polled = s["status"]["polled_at"].clone();
    let rewritten = jsonl(&all[..80]) + &jsonl(&all[180..181]);
    std::fs::write(logs.join("2026-12-07T10.jsonl"), &rewritten).unwrap();
    let mut next = jsonl(&all[170..180]);
    next += &jsonl(&all[..5]);
    std::fs::write(logs.join("2026-12-07T15.jsonl"), next).unwrap();
    let s = wait_for(&app, "the second poll", |s| {
        s["status"]["polled_at"] != polled && s["totals"]["done"] == 4
    })
    .await;
    assert_eq!(
        (
            &s["totals"]["ingested"],
            &s["totals"]["duplicates"],
            &s["totals"]["changed"]
        ),
        (&json!(180), &json!(5), &json!(1)),
        "{s:#}"
    );
    assert_eq!(super::stored_in(&app, "banking").await, 180);
    assert_eq!(s["status"]["last_error"], Value::Null);

    // Told to re-read changed files, the source reads the rewrite as a new file: only its
    // new row is stored.
    let mut reread = source_spec.clone();
    reread["on_change"] = json!("reread");
    let (status, body) = app
        .patch(
            "/v1/domains/banking",
            &json!({"sources": [reread], "reason": "the shipper rewrites its files", "by": "ops"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let s = wait_for(&app, "the re-read", |s| s["totals"]["done"] == 5).await;
    assert_eq!(
        (&s["totals"]["ingested"], &s["totals"]["duplicates"]),
        (&json!(181), &json!(85)),
        "{s:#}"
    );

    let metrics = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "flywheel_source_rows_total{domain=\"banking\",outcome=\"ingested\",source=\"logs\"} 181",
        "flywheel_source_rows_total{domain=\"banking\",outcome=\"rejected\",source=\"logs\"} 3",
        "flywheel_source_files{domain=\"banking\",source=\"logs\",state=\"quarantined\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("flywheel_source_lag_seconds{domain=\"banking\",source=\"logs\"}"));
}

/// A server as `Server::start_with` runs it, with `env` added.
fn server(
    data: &std::path::Path,
    database: &flywheel_db::DatabaseUrl,
    env: &[(&str, String)],
) -> Server {
    Server::start_env(data, database, "api,scheduler,ingest", env)
}

/// Polls `url`'s source listing until `done`, or fails after two minutes.
async fn wait_listing(
    client: &reqwest::Client,
    base: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Value::Null;
    loop {
        let got = client
            .get(format!("{base}/v1/domains/banking/sources"))
            .send()
            .await;
        if let Ok(resp) = got
            && let Ok(body) = resp.json::<Value>().await
        {
            if done(&body["sources"][0]) {
                return body["sources"][0].clone();
            }
            seen = body;
        }
        assert!(
            Instant::now() < deadline,
            "the source never got there: {seen:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the server once its source's unit stands between the start and the end, restarts
/// it, and returns the listing once the unit is where `finished` says.
async fn kill_mid_read_and_finish(
    data: &std::path::Path,
    database: &flywheel_db::DatabaseUrl,
    env: &[(&str, String)],
    spec: Value,
    mid: impl Fn(&Value) -> bool,
    finished: impl Fn(&Value) -> bool,
) -> Value {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let first = server(data, database, env);
    let resp = client
        .post(format!("{}/v1/domains", first.base))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let at_kill = wait_listing(&client, &first.base, |s| {
        !s["units"].as_array().unwrap().is_empty() && mid(&s["units"][0])
    })
    .await;
    first.kill();
    assert!(!finished(&at_kill["units"][0]), "{at_kill:#}");
    let second = server(data, database, env);
    wait_listing(&client, &second.base, |s| finished(&s["units"][0])).await
}

/// A 40,000-line file in an S3 prefix; the worker is killed with part of it stored and
/// restarted: the file is finished from where the last commit left it, every row stored
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_file_resumes_without_loss_or_duplicates() {
    use object_store::ObjectStoreExt;
    let dir = tempfile::tempdir().unwrap();
    let (app_rows, labels, model_dir) = banking_fixture(dir.path());
    let database = test_database(dir.path()).await;
    // The SeaweedFS the registry tests use, under a prefix of this test's own.
    let (prefix, options) = super::s3_registry();
    let endpoint = options
        .iter()
        .find(|(k, _)| k == "aws_endpoint")
        .map(|(_, v)| v.clone())
        .unwrap();
    let (store, _) = flywheel_registry::remote(&prefix, &options).unwrap();
    const ROWS: usize = 40_000;
    let rows = rows_of(&app_rows, 0, ROWS);
    store
        .put(
            &object_store::path::Path::from("2026/12/07/part-0001.jsonl"),
            jsonl(&rows).into_bytes().into(),
        )
        .await
        .unwrap();
    // Credentials reach the worker through its environment, as in production.
    let env = [
        ("AWS_ACCESS_KEY_ID", "flywheel".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "flywheel-secret".to_owned()),
    ];
    let spec = json!({"name": "banking", "task": "classification",
        "base_model": model_dir.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 1_000_000},
        "sources": [{"name": "logs", "files": format!("{prefix}/"),
            "mapping": {"input": "text", "expected": "label"}, "interval_seconds": 5,
            "options": {"aws_endpoint": endpoint, "aws_region": "us-east-1",
                "aws_allow_http": "true"}}]});
    let data = dir.path().join("data");
    let position = |u: &Value| u["position"].as_str().unwrap().parse::<usize>().unwrap();
    let s = kill_mid_read_and_finish(
        &data,
        &database,
        &env,
        spec,
        |u| u["state"] == "reading" && position(u) > 0,
        |u| u["state"] == "done",
    )
    .await;
    let u = &s["units"][0];
    assert_eq!(
        (
            position(u),
            &u["ingested"],
            &u["duplicates"],
            &u["rejected"]
        ),
        (ROWS, &json!(ROWS), &json!(0), &json!(0)),
        "{s:#}"
    );
    let db = flywheel_db::Db::open(&database).await.unwrap();
    let domain = db.domain("banking").await.unwrap().unwrap();
    let (train, holdout) = db.correction_counts(domain.id).await.unwrap();
    assert_eq!((train + holdout) as usize, ROWS);
    db.close().await;
    drop_test_database(&database).await;
}

/// A PostgreSQL table read by a timestamp cursor whose values repeat (seven rows a second),
/// so batches end inside runs of equal values, and some of whose rows have no cursor yet; the
/// worker is killed mid-table and restarted; rows added later are read by the next poll.
/// Every row with a cursor is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_is_read_by_its_cursor_exactly_once_across_kill_9() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let (app_rows, labels, model_dir) = banking_fixture(dir.path());
    let database = test_database(dir.path()).await;
    let server_url = std::env::var("FLYWHEEL_TEST_POSTGRES").expect(
        "FLYWHEEL_TEST_POSTGRES names the PostgreSQL server to test against: run eval \"$(.ci/services)\" first",
    );
    let name = format!("flywheel_source_{}", uuid::Uuid::new_v4().simple());
    let url = flywheel_db::Db::create_postgres_database(&server_url, &name)
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE SCHEMA support;
         CREATE TABLE support.tickets (id bigserial, body text NOT NULL, queue text NOT NULL,
             closed_at timestamptz);
         -- Still open: no cursor, never read (and never in the way of the rows after them).
         INSERT INTO support.tickets (body, queue)
         SELECT 'ticket ' || n || ' is still open', 'card_arrival' FROM generate_series(1, 3) n",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let insert = async |conn: &mut sqlx::PgConnection, rows: &[(String, String)], from: usize| {
        let mut q =
            sqlx::QueryBuilder::new("INSERT INTO support.tickets (body, queue, closed_at) ");
        q.push_values(rows.iter().enumerate(), |mut b, (i, (text, label))| {
            b.push_bind(text)
                .push_bind(label)
                .push("TIMESTAMPTZ '2026-12-01 00:00:00+00' + make_interval(secs => ")
                .push_bind_unseparated(((from + i) / 7) as f64)
                .push_unseparated(")");
        });
        q.build().execute(conn).await.unwrap();
    };
    const ROWS: usize = 30_000;
    let rows = rows_of(&app_rows, 0, ROWS);
    for (n, chunk) in rows.chunks(5_000).enumerate() {
        insert(&mut conn, chunk, n * 5_000).await;
    }
    let env = [("TICKETS_DATABASE_URL", url.clone())];
    let spec = json!({"name": "banking", "task": "classification",
        "base_model": model_dir.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 1_000_000},
        "sources": [{"name": "tickets", "table": "support.tickets", "cursor": "closed_at",
            "connection_env": "TICKETS_DATABASE_URL",
            "mapping": {"input": "body", "expected": "queue", "client_id": "id"},
            "interval_seconds": 5}]});
    let data = dir.path().join("data");
    let ingested = |u: &Value| u["ingested"].as_u64().unwrap() as usize;
    let s = kill_mid_read_and_finish(
        &data,
        &database,
        &env,
        spec,
        |u| ingested(u) > 0,
        |u| ingested(u) == ROWS,
    )
    .await;
    let u = &s["units"][0];
    assert_eq!(
        (&u["duplicates"], &u["rejected"]),
        (&json!(0), &json!(0)),
        "{s:#}"
    );
    let last: String = sqlx::query_scalar("SELECT max(closed_at)::text FROM support.tickets")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        u["position"],
        json!(last),
        "the cursor stands at the last row's time"
    );

    // Rows closed later are read by the next poll, from where the cursor stands. (Later:
    // a row arriving with a time at or before the cursor's is never read; the README says
    // so.)
    let more = rows_of(&app_rows, ROWS, 50);
    insert(&mut conn, &more, ROWS + 7).await;
    let second = server(&data, &database, &env);
    let client = reqwest::Client::new();
    wait_listing(&client, &second.base, |s| {
        s["units"][0]["ingested"] == json!(ROWS + 50)
    })
    .await;
    let db = flywheel_db::Db::open(&database).await.unwrap();
    let domain = db.domain("banking").await.unwrap().unwrap();
    let (train, holdout) = db.correction_counts(domain.id).await.unwrap();
    assert_eq!((train + holdout) as usize, ROWS + 50);
    db.close().await;
    drop(second);
    conn.close().await.unwrap();
    flywheel_db::Db::drop_postgres_database(&server_url, &name)
        .await
        .unwrap();
    drop_test_database(&database).await;
}

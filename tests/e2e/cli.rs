//! The command line as its users type it: every API action through `flywheel <resource> …`
//! against a server that wants tokens, and `flywheel backup`/`restore` of a running instance
//! into a fresh one.

use std::time::Duration;

use serde_json::{Value, json};

use super::{TestApp, s3_registry};

const ADMIN: &str = "fw_cli_admin_token_for_tests";

/// What one run of the binary did.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `flywheel args…` with `FLYWHEEL_SERVER` at `server` and, if given, `FLYWHEEL_TOKEN`,
/// off the runtime's threads (the server under test shares them).
async fn flywheel(server: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"));
    command
        .args(args)
        .env("FLYWHEEL_SERVER", server)
        .env_remove("FLYWHEEL_TOKEN");
    if let Some(token) = token {
        command.env("FLYWHEEL_TOKEN", token);
    }
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failed run: non-zero, and its last line of stderr is one `error: …` line containing
/// `expect`.
fn assert_refused(run: &Run, expect: &str) {
    assert!(!run.ok, "{run}");
    let last = run.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(expect),
        "wanted `{expect}`: {run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_action_has_a_cli_command_that_says_what_to_fix() {
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(ADMIN.into());
    })
    .await;
    let base = app.base.as_str();
    let admin = Some(ADMIN);
    let dir = app.dir.path();

    // Without a token, or with the server down: one line saying what to do.
    let run = flywheel(base, None, &["domains", "list"]).await;
    assert_refused(&run, "pass --token or set FLYWHEEL_TOKEN");
    let run = flywheel("127.0.0.1:1", admin, &["domains", "list"]).await;
    assert_refused(&run, "could not reach flywheel at http://127.0.0.1:1");

    // An admin registers the domain and hands out tokens.
    let spec = dir.join("spec.json");
    std::fs::write(
        &spec,
        json!({
            "name": "banking",
            "task": "classification",
            "base_model": app.model_dir,
            "labels": app.labels,
            "policy": {"min_new_corrections": 100_000, "min_improvement": 0.02},
        })
        .to_string(),
    )
    .unwrap();
    let run = flywheel(
        base,
        admin,
        &["domains", "create", "--file", spec.to_str().unwrap()],
    )
    .await;
    assert!(
        run.ok && run.stdout.contains("domain `banking` registered"),
        "{run}"
    );
    let mut secrets = Vec::new();
    for (name, role) in [("billing-app", "department"), ("risk-team", "steward")] {
        let run = flywheel(
            base,
            admin,
            &[
                "tokens", "create", name, "--role", role, "--domain", "banking",
            ],
        )
        .await;
        // The secret alone on stdout, for `export FLYWHEEL_TOKEN=$(…)`.
        let secret = run.stdout.trim().to_owned();
        assert!(
            run.ok && secret.starts_with("fw_") && !secret.contains(' '),
            "{run}"
        );
        secrets.push(secret);
    }
    let (department, steward) = (Some(secrets[0].as_str()), Some(secrets[1].as_str()));
    let run = flywheel(base, admin, &["tokens", "list"]).await;
    assert!(
        run.stdout.contains("billing-app") && run.stdout.contains("risk-team"),
        "{run}"
    );
    assert!(!run.stdout.contains(&secrets[0]), "{run}");

    // A department imports a CSV; the refused rows are named by the file's own lines (a quoted
    // field spans two of them), the rest are stored and a second import stores nothing twice.
    let mut csv = String::from("text,category\n");
    for row in &app.rows[..150] {
        csv.push_str(&format!(
            "\"{}\",{}\n",
            row["input"].as_str().unwrap().replace('"', "\"\""),
            row["expected"].as_str().unwrap()
        ));
    }
    csv.push_str("\"two\nlines\",not_a_label\n");
    csv.push_str("reach me at jo@example.com,");
    csv.push_str(app.labels[0].as_str());
    csv.push('\n');
    let file = dir.join("corrections.csv");
    std::fs::write(&file, &csv).unwrap();
    let file = file.to_str().unwrap();
    let run = flywheel(base, department, &["import", "banking", file]).await;
    assert_refused(&run, "1 line(s) refused");
    assert!(
        run.stderr.contains(&format!("{file}:152: ")) && run.stderr.contains("unknown_label"),
        "{run}"
    );
    assert!(
        run.stdout.contains("151 accepted") && run.stdout.contains("redacted: email 1"),
        "{run}"
    );
    let run = flywheel(base, admin, &["domains", "list"]).await;
    let row = run.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("banking ") && row.contains("classification"),
        "{run}"
    );
    let run = flywheel(base, admin, &["domains", "show", "banking"]).await;
    let domain: Value = serde_json::from_str(&run.stdout).unwrap();
    let stored = domain["corrections"]["train"].as_i64().unwrap()
        + domain["corrections"]["holdout"].as_i64().unwrap();
    assert_eq!(stored, 151, "{domain}");
    let run = flywheel(base, department, &["import", "banking", file]).await;
    assert!(run.stdout.contains("0 accepted, 151 duplicates"), "{run}");
    // A record with a field too few ends the upload there, named by its line; the rows
    // before it are stored.
    let short = dir.join("short.csv");
    let label = app.labels[1].as_str();
    std::fs::write(
        &short,
        format!("text,category\nfirst new row,{label}\nno label here\nnever sent,{label}\n"),
    )
    .unwrap();
    let short = short.to_str().unwrap();
    let run = flywheel(base, department, &["import", "banking", short]).await;
    assert_refused(&run, &format!("{short}:3: 1 fields where the header has 2"));
    assert!(run.stdout.contains("1 accepted"), "{run}");

    // A run, followed to its end.
    let run = flywheel(base, department, &["jobs", "start", "banking", "--watch"]).await;
    assert!(
        run.ok && run.stdout.contains("succeeded: version v1"),
        "{run}"
    );
    let run = flywheel(base, steward, &["versions", "list", "banking"]).await;
    assert!(run.ok && run.stdout.contains("v1*"), "{run}");
    let run = flywheel(base, steward, &["versions", "report", "banking", "v1"]).await;
    assert!(run.ok && run.stdout.starts_with("# banking v1"), "{run}");
    let run = flywheel(
        base,
        steward,
        &["versions", "report", "banking", "v1", "--json"],
    )
    .await;
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["version"], "v1", "{report}");

    // A steward changes the gate; a department may not.
    let edit = [
        "domains",
        "edit",
        "banking",
        "--set",
        "policy.min_accuracy=0.3",
    ];
    let run = flywheel(base, department, &[&edit[..], &["--reason", "x"]].concat()).await;
    assert_refused(&run, "it takes a token of role admin or steward");
    let run = flywheel(base, steward, &edit).await;
    assert!(!run.ok && run.stderr.contains("--reason"), "{run}");
    let run = flywheel(
        base,
        steward,
        &[&edit[..], &["--reason", "a floor for the gate"]].concat(),
    )
    .await;
    assert!(run.ok && run.stdout.contains("policy version 2"), "{run}");
    let run = flywheel(base, steward, &["domains", "history", "banking"]).await;
    assert!(run.stdout.contains("a floor for the gate"), "{run}");

    // The same data again cannot beat the champion by two points: held back; the steward
    // overrides, rolls back, and moves staging by hand.
    let run = flywheel(base, department, &["jobs", "start", "banking", "--watch"]).await;
    assert!(run.ok && run.stdout.contains("version v2"), "{run}");
    let run = flywheel(base, steward, &["versions", "list", "banking"]).await;
    let v2 = run
        .stdout
        .lines()
        .find(|l| l.starts_with("v2 "))
        .unwrap_or_default();
    assert!(v2.contains("held_back"), "{run}");
    let run = flywheel(
        base,
        steward,
        &[
            "versions",
            "approve",
            "banking",
            "v2",
            "--reason",
            "looks fine",
        ],
    )
    .await;
    assert_refused(&run, "version_not_pending");
    let run = flywheel(
        base,
        steward,
        &[
            "versions",
            "override",
            "banking",
            "v2",
            "--reason",
            "we accept it",
        ],
    )
    .await;
    assert!(run.ok, "{run}");
    let run = flywheel(base, steward, &["aliases", "show", "banking"]).await;
    assert!(run.stdout.starts_with("banking@production → v2"), "{run}");
    let run = flywheel(
        base,
        steward,
        &[
            "versions",
            "rollback",
            "banking",
            "--to",
            "v1",
            "--reason",
            "v1 was better",
        ],
    )
    .await;
    assert!(
        run.ok && run.stdout.contains("production is v1 again"),
        "{run}"
    );
    let run = flywheel(
        base,
        steward,
        &[
            "aliases",
            "move",
            "banking",
            "staging",
            "--to",
            "v2",
            "--expected",
            "none",
            "--reason",
            "soak",
        ],
    )
    .await;
    assert!(
        run.ok && run.stdout.contains("banking@staging: - → v2"),
        "{run}"
    );
    let run = flywheel(
        base,
        steward,
        &[
            "aliases",
            "move",
            "banking",
            "staging",
            "--to",
            "v1",
            "--expected",
            "v1",
            "--reason",
            "x",
        ],
    )
    .await;
    assert_refused(&run, "expected v1, found v2");
    // Production, in any case, is not moved by hand.
    let run = flywheel(
        base,
        steward,
        &[
            "aliases",
            "move",
            "banking",
            "Production",
            "--to",
            "v2",
            "--reason",
            "x",
        ],
    )
    .await;
    assert_refused(&run, "versions approve|override|rollback");
    let response = reqwest::Client::new()
        .put(format!("{base}/v1/domains/banking/aliases/Production"))
        .bearer_auth(secrets[1].as_str())
        .json(&json!({"to": "v2", "reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let run = flywheel(base, steward, &["aliases", "history", "banking"]).await;
    assert_eq!(run.stdout.lines().count(), 4, "{run}");
    let run = flywheel(base, steward, &["versions", "audit", "banking", "--json"]).await;
    let audit: Value = serde_json::from_str(&run.stdout).unwrap();
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in ["override", "rollback", "alias_move", "domain_change"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }

    // Jobs listed; a finished one cannot be cancelled.
    let run = flywheel(base, department, &["jobs", "list", "--domain", "banking"]).await;
    assert_eq!(run.stdout.lines().count(), 3, "{run}");
    let job = run
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let run = flywheel(base, department, &["jobs", "cancel", &job]).await;
    assert!(!run.ok && run.stderr.trim().lines().count() == 1, "{run}");

    // A revoked token stops working at once, and says so.
    let run = flywheel(base, admin, &["tokens", "list", "--json"]).await;
    let tokens: Value = serde_json::from_str(&run.stdout).unwrap();
    let id = tokens["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "billing-app")
        .unwrap()["id"]
        .to_string();
    let run = flywheel(base, admin, &["tokens", "revoke", &id]).await;
    assert!(run.ok, "{run}");
    let run = flywheel(base, department, &["jobs", "list"]).await;
    assert_refused(&run, "check --token / FLYWHEEL_TOKEN");
}

/// A backup taken while the server runs (to a file and to S3) restores into a fresh data
/// directory, and a server started there reads back every domain, correction, version and
/// alias, and answers with the model the backup's production alias names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_running_server_restores_into_a_fresh_one() {
    let sqlite = tempfile::tempdir().unwrap();
    let database = sqlite.path().join("flywheel.db");
    let app = TestApp::spawn_with(|c| {
        c.database = Some(flywheel_db::DatabaseUrl::Sqlite(database.clone()));
    })
    .await;
    app.create_domain(100_000).await;
    let rows: Vec<Value> = app.rows[..200].to_vec();
    let (status, body) = app
        .post("/v1/domains/banking/corrections", &json!(rows))
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, job) = app.post("/v1/domains/banking/jobs", &json!({})).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(app.wait_for_job(1).await["status"], "succeeded");
    let bin = env!("CARGO_BIN_EXE_flywheel");
    let db_arg = database.to_str().unwrap();

    let backup = app.dir.path().join("backup.db");
    let (s3_prefix, s3_options) = s3_registry();
    let s3_backup = format!("{s3_prefix}/flywheel.db");
    let aws_env: Vec<(String, String)> = s3_options
        .iter()
        .map(|(k, v)| (k.to_uppercase(), v.clone()))
        .collect();
    for to in [backup.to_str().unwrap(), s3_backup.as_str()] {
        let out = std::process::Command::new(bin)
            .args(["backup", "--database", db_arg, to])
            .envs(aws_env.clone())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Rows after the backup are not in it.
    let (status, _) = app
        .post(
            "/v1/domains/banking/corrections",
            &json!([{"input": "after the backup", "expected": app.labels[0]}]),
        )
        .await;
    assert_eq!(status, 202);
    let (_, versions_before) = app.get("/v1/domains/banking/versions").await;
    let (_, alias_before) = app.get("/v1/domains/banking/aliases/production").await;

    // Never under a running server, --force or not; never from what is not a backup.
    let out = std::process::Command::new(bin)
        .args([
            "restore",
            "--force",
            "--database",
            db_arg,
            backup.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("a flywheel process is running"),
        "{stderr}"
    );
    let not_a_backup = app.dir.path().join("notes.db");
    std::fs::write(&not_a_backup, "not a database").unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["restore", "--data-dir", fresh.path().to_str().unwrap()])
        .arg(&not_a_backup)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not a SQLite database"),
        "{stderr}"
    );
    assert!(!fresh.path().join("flywheel.db").exists());
    // PostgreSQL has its own tools.
    let out = std::process::Command::new(bin)
        .args([
            "backup",
            "--database",
            "postgres://x@127.0.0.1:1/db",
            "/tmp/never.db",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("use pg_dump"));

    let registry = app.dir.path().join("data/registry");
    for from in [backup.to_str().unwrap(), s3_backup.as_str()] {
        let fresh = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(bin)
            .args([
                "restore",
                "--data-dir",
                fresh.path().to_str().unwrap(),
                from,
            ])
            .envs(aws_env.clone())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 domain, 200 corrections, 1 version"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Again, over the restored database: only with --force, keeping it beside.
        let again = |force: bool| {
            let mut command = std::process::Command::new(bin);
            command.args([
                "restore",
                "--data-dir",
                fresh.path().to_str().unwrap(),
                from,
            ]);
            if force {
                command.arg("--force");
            }
            command.envs(aws_env.clone()).output().unwrap()
        };
        let out = again(false);
        assert!(String::from_utf8_lossy(&out.stderr).contains("pass --force"));
        let out = again(true);
        assert!(String::from_utf8_lossy(&out.stdout).contains("the database it replaced is"));
        let mut config = flywheel::Config::new(fresh.path().to_path_buf());
        config.registry = Some(registry.display().to_string());
        config.auth = flywheel_api::AuthMode::Off;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = flywheel::start(config, listener).await.unwrap();
        let client = reqwest::Client::new();
        let get = |path: &str| {
            let req = client.get(format!("http://{}{path}", running.addr));
            async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
        };
        let domain = get("/v1/domains/banking").await;
        let stored = domain["corrections"]["train"].as_i64().unwrap()
            + domain["corrections"]["holdout"].as_i64().unwrap();
        assert_eq!(stored, 200, "{domain}");
        assert_eq!(get("/v1/domains/banking/versions").await, versions_before);
        assert_eq!(
            get("/v1/domains/banking/aliases/production").await,
            alias_before
        );
        let answer = client
            .post(format!(
                "http://{}/v1/domains/banking/predict",
                running.addr
            ))
            .json(&json!({"input": "my card has not arrived yet"}))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["version"], "v1", "{answer}");
        running.shutdown().await.unwrap();
    }
}

//! The steward console as its users meet it: in real headless Chromium (Debian's `chromium`
//! and `chromium-driver`, which `.ci/run` installs), driven over WebDriver. A steward signs
//! in with a token, finds the pending version in the inbox, approves it with a reason and
//! sees the status and trail change; a department cannot open another department's pages; a
//! form without its anti-forgery token changes nothing; sign-out ends the session. Screenshots
//! of each page land in the test's output directory.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::{TestApp, authed};

const ADMIN: &str = "fw_bootstrap_for_console_tests";

/// chromedriver on a port of its own, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver: install Debian's chromium-driver (.ci/run does)");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1100"]}),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&self.url)
                .await
            {
                Ok(client) => return client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver did not start a browser: {e}"),
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: `FLYWHEEL_SCREENSHOTS`, or the test's own temporary directory.
fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("FLYWHEEL_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// Waits until the page's source contains `text`; the source on failure.
async fn page_with(browser: &Client, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let source = browser.source().await.unwrap();
        if source.contains(text) {
            return source;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {text:?}:\n{source}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sign_in(browser: &Client, base: &str, token: &str) {
    browser.goto(&format!("{base}/console")).await.unwrap();
    let field = browser
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Id("token"))
        .await
        .unwrap();
    field.send_keys(token).await.unwrap();
    browser
        .find(Locator::Css("#sign-in button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Waits for the `n`th job of `domain` to end, asking as `token`.
async fn job_ended(app: &TestApp, token: &str, domain: &str) -> Value {
    let call = authed(app, token);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "the {domain} job did not finish");
        let (_, jobs) = call("GET", &format!("/v1/domains/{domain}/jobs"), None).await;
        if let Some(job) = jobs["data"].as_array().and_then(|j| j.last())
            && matches!(job["status"].as_str(), Some("succeeded" | "failed"))
        {
            return job.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plain HTTP client that shows redirects instead of following them.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of `name="{field}" value="…"` in a page.
fn form_value(page: &str, field: &str) -> String {
    let marker = format!("name=\"{field}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {field} in {page}"))
        + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// `name=value` of the cookie a response sets.
fn set_cookie(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie set"))
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steward_reviews_and_approves_in_the_browser_and_the_console_refuses_what_it_must() {
    let app = TestApp::spawn_with(|c| {
        c.auth = flywheel_api::AuthMode::Required;
        c.bootstrap_admin_token = Some(ADMIN.into());
    })
    .await;
    let admin = authed(&app, ADMIN);
    // `banking` asks a person before anything goes live; `cards` has a gate nothing passes.
    for (name, policy) in [
        (
            "banking",
            json!({"min_new_corrections": 300, "min_improvement": -1.0,
            "significance_level": 1.0, "max_label_drop": 1.0, "require_approval": true,
            "min_label_support": 1}),
        ),
        (
            "cards",
            json!({"min_new_corrections": 300, "min_accuracy": 0.999}),
        ),
    ] {
        let spec = json!({"name": name, "task": "classification", "base_model": app.model_dir,
            "labels": app.labels, "policy": policy});
        let (status, body) = admin("POST", "/v1/domains", Some(spec)).await;
        assert_eq!(status, 201, "{body}");
    }
    let mut tokens = std::collections::HashMap::new();
    for (name, role, domain) in [
        ("steward-banking", "steward", "banking"),
        ("dept-cards", "department", "cards"),
    ] {
        let (status, body) = admin(
            "POST",
            "/v1/tokens",
            Some(json!({"name": name, "role": role, "domains": [domain]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        tokens.insert(name, body["token"].as_str().unwrap().to_owned());
    }
    for domain in ["banking", "cards"] {
        let (status, body) = admin(
            "POST",
            &format!("/v1/domains/{domain}/corrections"),
            Some(json!(app.rows)),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let job = job_ended(&app, ADMIN, domain).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }

    // The inbox as JSON: the steward sees banking's pending version only; the admin sees
    // cards' held-back one too.
    let steward = authed(&app, &tokens["steward-banking"]);
    let (status, inbox) = steward("GET", "/v1/reviews", None).await;
    assert_eq!(status, 200, "{inbox}");
    let items = inbox["data"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{inbox}");
    assert_eq!(
        (
            &items[0]["domain"],
            &items[0]["version"],
            &items[0]["status"]
        ),
        (&json!("banking"), &json!("v1"), &json!("pending_approval"))
    );
    assert_eq!(items[0]["rule"], "awaiting_approval", "{inbox}");
    assert!(items[0]["accuracy_change"].is_number(), "{inbox}");
    let (_, held) = admin("GET", "/v1/reviews?state=held_back", None).await;
    assert_eq!(held["data"][0]["domain"], "cards", "{held}");
    assert_eq!(held["data"].as_array().unwrap().len(), 1, "{held}");
    let (status, err) = steward("GET", "/v1/reviews?state=everything", None).await;
    assert_eq!((status, err["code"].as_str()), (422, Some("invalid_field")));
    let (status, _) =
        authed(&app, &tokens["dept-cards"])("GET", "/v1/reviews?state=pending", None).await;
    assert_eq!(status, 200);

    // Without a session a page sends you to sign in; a session cookie never authorizes an
    // API call; a form without its anti-forgery token is refused and changes nothing.
    let http = raw_client();
    let resp = http
        .get(format!("{}/console", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/console/sign-in?next=/console");
    let resp = http
        .get(format!("{}/console/sign-in", app.base))
        .send()
        .await
        .unwrap();
    let sign_in_cookie = set_cookie(&resp, "flywheel_sign_in");
    let csrf = form_value(&resp.text().await.unwrap(), "csrf");
    let resp = http
        .post(format!("{}/console/sign-in", app.base))
        .header("cookie", &sign_in_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "csrf={csrf}&token={}&next=/console",
            tokens["steward-banking"]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let raw_cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("flywheel_session="))
        .unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(raw_cookie.contains(attribute), "{raw_cookie}");
    }
    let session = set_cookie(&resp, "flywheel_session");
    // A sign-in form without its cookie is refused; a `next` that is not a console page, or
    // carries a control character, goes to the inbox instead.
    let resp = http
        .post(format!("{}/console/sign-in", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&token={}", tokens["steward-banking"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    for next in [
        "https://evil.example/",
        "/console%0Aset-cookie:x",
        "//evil.example",
    ] {
        let resp = http
            .post(format!("{}/console/sign-in", app.base))
            .header("cookie", &sign_in_cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={csrf}&token={}&next={next}",
                tokens["steward-banking"]
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 303, "{next}");
        assert_eq!(resp.headers()["location"], "/console", "{next}");
    }
    // A link from another site (a webhook's message) arrives without the strict cookie: the
    // page reopens itself from here, where the browser sends it; from here, it is sign-in.
    let resp = http
        .get(format!("{}/console/domains/banking", app.base))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("url=/console/domains/banking")
    );
    let resp = http
        .get(format!("{}/console/domains/banking", app.base))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    // The scheme of a bearer header is case-insensitive; a session that has ended is named.
    let resp = http
        .get(format!("{}/v1/reviews", app.base))
        .header(
            "authorization",
            format!("bearer {}", tokens["steward-banking"]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http
        .get(format!("{}/console", app.base))
        .header("cookie", "flywheel_session=fw_long_gone")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["location"],
        "/console/sign-in?next=/console&ended=1"
    );
    // Pages that do not exist are pages too.
    let resp = http
        .get(format!("{}/console/nowhere", app.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("No such page"));
    let resp = http
        .get(format!("{}/v1/reviews", app.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a cookie must not stand in for a token");
    let page = http
        .get(format!("{}/console/domains/banking/versions/v1", app.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let session_csrf = form_value(&page, "csrf");
    for body in [
        "step=approve&reason=forged".to_owned(),
        "step=approve&reason=forged&csrf=fw_not_the_one".to_owned(),
    ] {
        let resp = http
            .post(format!(
                "{}/console/domains/banking/versions/v1/decide",
                app.base
            ))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let page = resp.text().await.unwrap();
        assert!(matches!(status, 403 | 422), "{status}: {page}");
        assert!(page.contains("refusal"), "{page}");
    }
    assert!(!session_csrf.is_empty());
    let (_, versions) = steward("GET", "/v1/domains/banking/versions", None).await;
    assert_eq!(
        versions["data"][0]["status"], "pending_approval",
        "{versions}"
    );

    // The browser.
    let driver = Driver::start();
    let browser = driver.browser().await;
    sign_in(&browser, &app.base, "fw_wrong").await;
    page_with(&browser, "This token is not valid").await;
    screenshot(&browser, "0-sign-in-refused").await;
    sign_in(&browser, &app.base, &tokens["steward-banking"]).await;
    let inbox = page_with(&browser, "id=\"inbox\"").await;
    assert!(
        inbox.contains("awaiting approval") && inbox.contains(">v1<"),
        "{inbox}"
    );
    assert!(
        !inbox.contains(">cards<"),
        "a steward of banking sees cards: {inbox}"
    );
    screenshot(&browser, "1-inbox").await;

    browser
        .find(Locator::Css("#inbox a[href$='/versions/v1']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let version = page_with(&browser, "id=\"approve-form\"").await;
    assert!(
        version.contains("Decision trail") && version.contains("gate decision"),
        "{version}"
    );
    assert!(
        version.contains("held-out questions"),
        "the summary is missing: {version}"
    );
    screenshot(&browser, "2-version-pending").await;
    // The page shows 20 flipped answers of each kind and links to all of them.
    assert!(version.contains("showing 20 of"), "{version}");
    browser
        .find(Locator::Css("a[href$='/versions/v1/flips']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let all = page_with(&browser, "answers that changed").await;
    assert!(all.matches("<tr><td>").count() > 20, "{all}");
    browser.back().await.unwrap();
    page_with(&browser, "id=\"approve-form\"").await;
    browser
        .find(Locator::Id("reason"))
        .await
        .unwrap()
        .send_keys("read the flips; the regressions are label noise")
        .await
        .unwrap();
    browser
        .find(Locator::Id("approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let decided = page_with(&browser, "id=\"status\">promoted<").await;
    assert!(decided.contains("steward-banking"), "{decided}");
    assert!(
        decided.contains("read the flips; the regressions are label noise"),
        "{decided}"
    );
    assert!(!decided.contains("id=\"approve-form\""), "{decided}");
    screenshot(&browser, "3-version-approved").await;
    browser
        .find(Locator::Css("#aliases summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .find(Locator::Id("alias-reason"))
        .await
        .unwrap()
        .send_keys("score it in shadow beside production")
        .await
        .unwrap();
    browser
        .find(Locator::Id("move-alias"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page_with(&browser, "staging: none → v1").await;

    // The domain also collects from a directory whose files need a look: its page lists them.
    let logs = app.dir.path().join("console-logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("2026-12-07.parquet"), b"PAR1 cut short").unwrap();
    std::fs::write(logs.join("2026-12-08.jsonl"), "{\"text\": \"no label\"}\n").unwrap();
    let source = json!({"name": "app-logs", "files": logs.display().to_string(),
        "mapping": {"input": "text", "expected": "label"}, "interval_seconds": 60});
    let (status, body) = admin(
        "PATCH",
        "/v1/domains/banking",
        Some(json!({"reason": "collect the app's logs", "sources": [source]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, sources) = admin("GET", "/v1/domains/banking/sources", None).await;
        if sources["sources"][0]["totals"]["quarantined"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{sources}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    browser
        .goto(&format!("{}/console/domains/banking", app.base))
        .await
        .unwrap();
    let domain = page_with(&browser, "id=\"audit\"").await;
    assert!(
        domain.contains("approve") && domain.contains("id=\"production\"><a"),
        "{domain}"
    );
    for shown in [
        "Where corrections come from",
        "2 quarantined",
        "2026-12-07.parquet",
        "not a readable Parquet file",
        "line 1: ",
    ] {
        assert!(domain.contains(shown), "{shown} not in {domain}");
    }
    assert!(
        domain.contains("Holdout accuracy of each version"),
        "{domain}"
    );
    screenshot(&browser, "4-domain").await;

    // A second version goes live; the steward rolls production back to v1 from its page.
    let (status, job) = admin("POST", "/v1/domains/banking/jobs", None).await;
    assert_eq!(status, 201, "{job}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, versions) = steward("GET", "/v1/domains/banking/versions", None).await;
        if versions["data"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no v2: {versions}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = steward(
        "POST",
        "/v1/domains/banking/versions/v2/approve",
        Some(json!({"reason": "second round"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    browser
        .goto(&format!("{}/console/domains/banking/versions/v1", app.base))
        .await
        .unwrap();
    page_with(&browser, "id=\"rollback-form\"").await;
    browser
        .find(Locator::Id("rollback-reason"))
        .await
        .unwrap()
        .send_keys("v2 misroutes card questions")
        .await
        .unwrap();
    browser
        .find(Locator::Id("rollback"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rolled = page_with(&browser, "production: v2 → v1").await;
    assert!(rolled.contains(">production</span>"), "{rolled}");
    screenshot(&browser, "4b-rolled-back").await;

    // Sign-out ends the session: the next page asks to sign in again.
    browser
        .find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page_with(&browser, "id=\"sign-in\"").await;
    browser
        .goto(&format!("{}/console", app.base))
        .await
        .unwrap();
    page_with(&browser, "id=\"sign-in\"").await;
    let resp = http
        .get(format!("{}/console", app.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the HTTP session was not the browser's");

    // A department of cards reads its domain without the audit log (stewards' reading) and
    // cannot open banking's pages: a 403 page, no data.
    sign_in(&browser, &app.base, &tokens["dept-cards"]).await;
    page_with(&browser, "Your domains").await;
    browser
        .goto(&format!("{}/console/domains/cards", app.base))
        .await
        .unwrap();
    let cards = page_with(&browser, "Accuracy of every version").await;
    assert!(!cards.contains("id=\"audit\""), "{cards}");
    browser
        .goto(&format!("{}/console/domains/banking/versions/v1", app.base))
        .await
        .unwrap();
    let refused = page_with(&browser, "id=\"refusal\"").await;
    assert!(
        refused.contains("403") && refused.contains("not scoped to domain “banking”"),
        "{refused}"
    );
    assert!(
        !refused.contains("Decision trail") && !refused.contains("approve"),
        "{refused}"
    );
    screenshot(&browser, "5-forbidden").await;
    browser.close().await.unwrap();

    // What the browser did is what the API says: production moved, the approval audited
    // with the steward's name and reason, and the report served with its status now.
    let (_, versions) = steward("GET", "/v1/domains/banking/versions", None).await;
    assert_eq!(versions["production"], "v1", "{versions}");
    let (_, audit) = steward("GET", "/v1/domains/banking/audit", None).await;
    let approval = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "approve")
        .unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(approval["actor"], "steward-banking");
    assert_eq!(
        approval["reason"],
        "read the flips; the regressions are label noise"
    );
    let (_, md) = steward(
        "GET",
        "/v1/domains/banking/versions/v1/report?format=md",
        None,
    )
    .await;
    let md = md.as_str().unwrap();
    assert!(
        md.contains("**Status now:** promoted, serving as production."),
        "{md}"
    );
    assert!(
        md.contains("**Gate decision at evaluation:** awaiting approval: accuracy"),
        "{md}"
    );
    assert!(
        md.contains("| steward-banking | approve (production: none → v1) | read the flips"),
        "{md}"
    );
    let (_, json_report) = steward("GET", "/v1/domains/banking/versions/v1/report", None).await;
    assert_eq!(json_report["live"]["status"], "promoted", "{json_report}");
    let trail: Vec<&str> = json_report["live"]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        trail,
        [
            "gate_decision",
            "approve",
            "alias_move",
            "approve",
            "rollback"
        ]
    );

    // An admin overrides cards' held-back candidate: production moves, the trail says
    // `override`, and the inbox no longer lists it.
    let (status, err) = admin(
        "POST",
        "/v1/domains/cards/versions/v1/approve",
        Some(json!({"reason": "x"})),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("version_not_pending"))
    );
    let (status, body) = admin(
        "POST",
        "/v1/domains/cards/versions/v1/override",
        Some(json!({"reason": "the 99.9% floor was a typo; 0.99 was meant"})),
    )
    .await;
    assert_eq!(
        (status, body["production"].as_str()),
        (200, Some("v1")),
        "{body}"
    );
    let (status, err) = admin(
        "POST",
        "/v1/domains/cards/versions/v1/override",
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("version_not_held_back"))
    );
    let (_, html) = admin(
        "GET",
        "/v1/domains/cards/versions/v1/report?format=html",
        None,
    )
    .await;
    let html = html.as_str().unwrap();
    assert!(
        html.contains("Status now:") && html.contains(">override (production: none → v1)<"),
        "{html}"
    );
    let (_, held) = admin("GET", "/v1/reviews?state=held_back", None).await;
    assert_eq!(held["data"].as_array().unwrap().len(), 0, "{held}");
    let (status, _) = admin(
        "GET",
        "/v1/domains/cards/versions/v1/report?format=pdf",
        None,
    )
    .await;
    assert_eq!(status, 422);
}

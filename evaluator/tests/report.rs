//! The HTML report as a person sees it: rendered by headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs) into a screenshot.

use std::path::Path;
use std::process::Command;

use flywheel_evaluator::*;

fn evaluation() -> Evaluation {
    let labels = ["card_arrival", "pin_blocked", "exchange_rate"]
        .map(String::from)
        .to_vec();
    let gold = [0, 0, 1, 1, 2, 2, 2, 0, 1, 2];
    let cand = [0, 0, 1, 2, 2, 2, 2, 0, 1, 1];
    let champ = [0, 1, 1, 2, 0, 2, 1, 0, 0, 1];
    let confidence = [0.95, 0.9, 0.85, 0.4, 0.8, 0.75, 0.7, 0.92, 0.6, 0.3];
    let correct: Vec<bool> = gold.iter().zip(&cand).map(|(g, c)| g == c).collect();
    let candidate = classification_metrics(&gold, &cand, &labels);
    let champion = classification_metrics(&gold, &champ, &labels);
    let policy = flywheel_domain::Policy {
        min_accuracy: 0.5,
        ..Default::default()
    };
    let p = mcnemar_exact(0, 3);
    let cal = calibration(&confidence, &correct, 10);
    let decision = decide(
        &policy,
        &Evidence {
            champion: &champion,
            candidate: &candidate,
            p_value: p,
            ece: cal.ece,
            champion_is_adapter: true,
        },
    );
    Evaluation {
        champion_name: "v1 (production)".into(),
        holdout_size: gold.len(),
        champion,
        candidate,
        mcnemar_p: p,
        fixed_count: 3,
        broken_count: 0,
        fixed: vec![Flip {
            text: "<b>where</b> is my card?".into(),
            expected: "card_arrival".into(),
            champion: "pin_blocked".into(),
            candidate: "card_arrival".into(),
        }],
        broken: vec![],
        out_of_scope: None,
        calibration: cal,
        routing: pick_threshold(&confidence, &correct, 0.95),
        decision,
    }
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn the_html_report_is_self_contained_escapes_text_and_renders_in_chromium() {
    let eval = evaluation();
    let loss: Vec<(usize, f64)> = (1..=50).map(|i| (i, 2.0 / (i as f64).sqrt())).collect();
    let html = render_html(
        "banking",
        "v2",
        &eval,
        &loss,
        &serde_json::json!({"base_model": "tiny"}),
    );
    // The gate held it back (not significant on 3 discordant pairs) and the page says so first.
    assert!(
        html.contains("banking v2 <span class=\"badge no\">held back</span>"),
        "{}",
        &html[..600]
    );
    assert!(html.contains("not_significant"));
    for chart in [
        "Training loss",
        "Reliability",
        "Coverage vs accuracy",
        "Confusion",
    ] {
        assert!(
            html.contains(&format!("aria-label=\"{chart}")),
            "missing chart {chart}"
        );
    }
    // Example text is escaped, and nothing is fetched from elsewhere.
    assert!(html.contains("&lt;b&gt;where&lt;/b&gt;") && !html.contains("<b>where</b>"));
    assert!(
        !html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http")
    );

    let Some(chromium) = chromium() else {
        // CI installs Chromium; without it this check cannot run, and on CI that is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium (see .ci/run)"
        );
        eprintln!("chromium not installed: skipped the rendering check (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let shot = dir.path().join("report.png");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,1400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // A blank page compresses to a few kB; charts, tables and text do not.
    assert!(
        png.len() > 40_000,
        "screenshot is only {} bytes: did the page render?",
        png.len()
    );
    if let Some(keep) = std::env::var_os("FLYWHEEL_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, Path::new(&keep)).unwrap();
    }
}

#[test]
fn the_evaluator_refuses_a_holdout_that_leaks_into_training() {
    let spec = EvalSpec {
        base_model_dir: "/nonexistent".into(),
        candidate_dir: "/nonexistent".into(),
        champion_dir: None,
        champion_name: "base".into(),
        task: flywheel_domain::Task::Classification,
        labels: vec!["a".into(), "b".into()],
        out_of_scope_label: None,
        holdout: vec![
            HoldoutRow {
                text: "Where is  my CARD?".into(),
                expected: "a".into(),
            },
            HoldoutRow {
                text: "fresh".into(),
                expected: "b".into(),
            },
        ],
        training_inputs: vec![flywheel_domain::normalize_text("where is my card?")],
        policy: flywheel_domain::Policy::default(),
    };
    // Refused before any model is loaded, naming how many rows leak.
    let err = evaluate(&spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 holdout inputs also appear in the training snapshot; refusing to evaluate"
    );
}

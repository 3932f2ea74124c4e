//! The evaluator from outside: the HTML report as a person sees it, rendered by headless
//! Chromium (Debian's `chromium`, which `.ci/run` installs) into a screenshot; and the serving
//! lint against adapters shaped the ways serving stacks refuse.

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
            label_flips: &[],
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
        label_flips: Vec::new(),
        label_issues: Vec::new(),
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
    // The gate held it back (not significant on 3 discordant pairs) and the page says so first,
    // as the gate's decision at evaluation: what happened later is added where it is served.
    assert!(
        html.contains(
            "<b>Gate decision at evaluation:</b> <span class=\"badge no\">held back</span>"
        ),
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
                id: 1,
                text: "Where is  my CARD?".into(),
                expected: "a".into(),
            },
            HoldoutRow {
                id: 2,
                text: "fresh".into(),
                expected: "b".into(),
            },
        ],
        training_inputs: vec![flywheel_domain::normalize_text("where is my card?")],
        review: Vec::new(),
        policy: flywheel_domain::Policy::default(),
    };
    // Refused before any model is loaded, naming how many rows leak.
    let err = evaluate(&spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 holdout inputs also appear in the training snapshot; refusing to evaluate"
    );
}

mod serving_lint {
    use std::collections::HashMap;
    use std::path::Path;

    use flywheel_evaluator::serving::{ServingLimits, lint_adapter};
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    /// A tiny random Llama: hidden 128, 4 heads of 32, 2 KV heads, MLP 256.
    fn base() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        flywheel_trainer::tiny::init_tiny_llama(
            dir.path(),
            ["hello there", "general kenobi"].into_iter(),
            &Default::default(),
        )
        .unwrap();
        dir
    }

    /// Writes an adapter: `config` merged over PEFT defaults, and `tensors` as
    /// `(key, shape, fill)`.
    fn adapter(
        config: serde_json::Value,
        tensors: &[(&str, [usize; 2], f32)],
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut full = serde_json::json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "target_modules": ["model.layers.0.self_attn.q_proj"],
            "bias": "none", "modules_to_save": null,
        });
        for (k, v) in config.as_object().unwrap() {
            full[k] = v.clone();
        }
        std::fs::write(dir.path().join("adapter_config.json"), full.to_string()).unwrap();
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(k, shape, fill)| {
                let n = shape[0] * shape[1];
                let data = (0..n)
                    .flat_map(|i| (fill * ((i % 7) as f32 - 3.0)).to_le_bytes())
                    .collect();
                (k.to_string(), data, shape.to_vec())
            })
            .collect();
        let views: HashMap<String, TensorView> = bytes
            .iter()
            .map(|(k, d, s)| {
                (
                    k.clone(),
                    TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("adapter_model.safetensors"))
            .unwrap();
        dir
    }

    const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

    fn rules(base: &Path, adapter: &Path, limits: &ServingLimits) -> Vec<&'static str> {
        let report = lint_adapter(base, adapter, limits).unwrap();
        let mut rules: Vec<_> = report.findings.iter().map(|f| f.rule).collect();
        rules.dedup();
        rules
    }

    #[test]
    fn a_well_formed_adapter_passes_and_each_defect_is_named() {
        let base = base();
        let limits = ServingLimits::default();
        let good = adapter(
            serde_json::json!({}),
            &[(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.01)],
        );
        let report = lint_adapter(base.path(), good.path(), &limits).unwrap();
        assert!(report.passed(), "{}", report.summary());
        assert_eq!(
            (report.model_type.as_str(), report.adapted_modules),
            ("llama", 1)
        );
        assert!(report.max_update_norm > 0.0);

        type Tensors = Vec<(&'static str, [usize; 2], f32)>;
        let cases: Vec<(serde_json::Value, Tensors, Vec<&str>)> = vec![
            // PEFT initialises B to zero: an untrained adapter changes nothing.
            (
                serde_json::json!({}),
                vec![(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.0)],
                vec!["no_op"],
            ),
            (
                serde_json::json!({"r": 128, "lora_alpha": 256}),
                vec![(Q_A, [128, 128], 0.01), (Q_B, [128, 128], 0.01)],
                vec!["rank"],
            ),
            (
                serde_json::json!({"modules_to_save": ["lm_head"]}),
                vec![(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.01)],
                vec!["modules_to_save"],
            ),
            (
                serde_json::json!({"bias": "all"}),
                vec![(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.01)],
                vec!["bias"],
            ),
            (
                serde_json::json!({"target_modules": ["layers.0.self_attn.q_proj", "embed_tokens"]}),
                vec![(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.01)],
                vec!["target_modules"],
            ),
            (
                serde_json::json!({}),
                vec![
                    (Q_A, [8, 128], 0.01),
                    (Q_B, [128, 8], 0.01),
                    ("base_model.model.lm_head.weight", [10, 128], 0.1),
                ],
                vec!["full_weights"],
            ),
            (
                serde_json::json!({}),
                vec![(Q_A, [8, 128], 0.01)],
                vec!["pairs"],
            ),
            // A bare `q_proj` matches both layers' (PEFT matches by dotted suffix): the second
            // would load with missing keys.
            (
                serde_json::json!({"target_modules": ["q_proj"]}),
                vec![(Q_A, [8, 128], 0.01), (Q_B, [128, 8], 0.01)],
                vec!["missing_keys"],
            ),
            // k_proj is 64 wide (two KV heads of 32), not 128.
            (
                serde_json::json!({"target_modules": ["layers.0.self_attn.k_proj"]}),
                vec![
                    (
                        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                        [8, 128],
                        0.01,
                    ),
                    (
                        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
                        [128, 8],
                        0.01,
                    ),
                ],
                vec!["shapes"],
            ),
        ];
        for (config, tensors, expected) in cases {
            let dir = adapter(config.clone(), &tensors);
            let got = rules(base.path(), dir.path(), &limits);
            assert_eq!(got, expected, "{config}");
        }
        // The serving limit is the operator's: rank 8 fails a fleet capped at 4.
        let strict = ServingLimits { max_rank: 4 };
        assert_eq!(rules(base.path(), good.path(), &strict), vec!["rank"]);
    }

    #[test]
    fn an_adapter_that_does_not_change_outputs_is_measured_as_such() {
        let base = base();
        let texts = ["hello there", "general kenobi"];
        let live = adapter(
            serde_json::json!({}),
            &[(Q_A, [8, 128], 0.05), (Q_B, [128, 8], 0.05)],
        );
        let delta =
            flywheel_trainer::adapter_output_delta(base.path(), live.path(), &texts).unwrap();
        assert!(delta > 1e-4, "a live adapter moved logits by only {delta}");
        let inert = adapter(
            serde_json::json!({}),
            &[(Q_A, [8, 128], 0.05), (Q_B, [128, 8], 0.0)],
        );
        let delta =
            flywheel_trainer::adapter_output_delta(base.path(), inert.path(), &texts).unwrap();
        assert_eq!(delta, 0.0);
    }
}

#[test]
fn a_stored_evaluation_is_gated_again_under_another_policy() {
    let mut eval = evaluation();
    assert_eq!(eval.champion_version(), Some("v1"));
    assert_eq!(
        eval.regate(&Default::default()).promote,
        eval.decision.promote
    );
    let strict = flywheel_domain::Policy {
        min_accuracy: 0.99,
        ..Default::default()
    };
    let held = eval.regate(&strict);
    assert!(!held.promote);
    assert_eq!(held.rule, Rule::AccuracyFloor);
    eval.champion_name = format!("{BASE_CHAMPION} (no production adapter yet)");
    assert_eq!(eval.champion_version(), None);
    assert_eq!(eval.summary(&held)["decision"]["rule"], "accuracy_floor");
}

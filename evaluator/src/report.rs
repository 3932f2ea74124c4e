use crate::Evaluation;

/// The report a data steward reads: the decision and its reason first, then the evidence.
pub fn render_markdown(
    domain: &str,
    version: &str,
    eval: &Evaluation,
    lineage: &serde_json::Value,
) -> String {
    let mut s = String::new();
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    // The file is a snapshot taken at evaluation: the status it states is the gate's, and a
    // steward's later decisions are added by whoever serves it (`GET …/report`).
    s.push_str(&format!("# {domain} {version}\n\n"));
    let rule = serde_json::to_value(eval.decision.rule).expect("json");
    // The reason opens with the verdict ("held back: …").
    s.push_str(&format!(
        "**Gate decision at evaluation:** {} (rule `{}`)\n\n",
        eval.decision.reason,
        rule.as_str().unwrap_or("?")
    ));
    if let Some(remedy) = &eval.decision.remedy {
        s.push_str(&format!(
            "**What would have passed this rule:** {remedy}\n\n"
        ));
    }
    s.push_str(&format!(
        "Evaluated on {} held-out corrections against `{}`.\n\n",
        eval.holdout_size, eval.champion_name
    ));
    s.push_str("| metric | champion | candidate |\n|---|---:|---:|\n");
    s.push_str(&format!(
        "| accuracy | {} | {} |\n",
        pct(eval.champion.accuracy),
        pct(eval.candidate.accuracy)
    ));
    if let (Some(a), Some(b)) = (eval.champion.macro_f1, eval.candidate.macro_f1) {
        s.push_str(&format!("| macro-F1 | {} | {} |\n", pct(a), pct(b)));
    }
    if let (Some(a), Some(b)) = (eval.champion.token_f1, eval.candidate.token_f1) {
        s.push_str(&format!("| token-F1 | {} | {} |\n", pct(a), pct(b)));
    }
    s.push('\n');
    s.push_str(&format!(
        "Paired exact McNemar test: {} fixed, {} broken, {}.\n\n",
        eval.fixed_count,
        eval.broken_count,
        crate::format_p(eval.mcnemar_p)
    ));
    if let Some(o) = &eval.out_of_scope {
        s.push_str(&format!(
            "Out-of-scope recall (`{}`, {} held out): champion {}, candidate {}.\n\n",
            o.label,
            o.support,
            pct(o.champion_recall),
            pct(o.candidate_recall)
        ));
        if let Some(t) = &o.threshold {
            s.push_str(&format!(
                "Out-of-scope threshold: answers below {:.3} confidence are served as `{}`; on \
                 the holdout that keeps {} of in-scope answers right and catches {} of \
                 out-of-scope queries.\n\n",
                t.threshold,
                o.label,
                pct(t.in_scope_accuracy),
                pct(t.out_of_scope_recall)
            ));
        }
    }
    s.push_str("## Confidence and routing\n\n");
    s.push_str(&format!(
        "Expected calibration error of the candidate: {:.3}.\n",
        eval.calibration.ece
    ));
    let r = &eval.routing;
    match r.threshold {
        Some(t) => s.push_str(&format!(
            "Escalation threshold: answer when confidence ≥ {t:.3}, escalate below. On this holdout that \
             answers {} of queries at {} accuracy (target {}).\n\n",
            pct(r.coverage),
            pct(r.accuracy),
            pct(r.target_accuracy)
        )),
        None => s.push_str(&format!(
            "Escalation threshold: none reaches {} accuracy on this holdout; escalate every query.\n\n",
            pct(r.target_accuracy)
        )),
    }
    if !eval.candidate.per_label.is_empty() {
        s.push_str("## Per label (candidate)\n\n| label | precision | recall | F1 | support |\n|---|---:|---:|---:|---:|\n");
    }
    for m in &eval.candidate.per_label {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            m.label,
            pct(m.precision),
            pct(m.recall),
            pct(m.f1),
            m.support
        ));
    }
    if !eval.candidate.per_label.is_empty() {
        s.push('\n');
    }
    for (title, flips, count) in [
        ("Fixed (wrong → right)", &eval.fixed, eval.fixed_count),
        ("Broken (right → wrong)", &eval.broken, eval.broken_count),
    ] {
        s.push_str(&format!("## {title}\n\n"));
        if flips.is_empty() {
            s.push_str("None.\n");
        } else if count as usize > crate::FLIPS_SHOWN {
            s.push_str(&format!("Showing {} of {count}.\n\n", crate::FLIPS_SHOWN));
        }
        for f in flips.iter().take(crate::FLIPS_SHOWN) {
            s.push_str(&format!(
                "- \"{}\": expected `{}`, champion `{}`, candidate `{}`\n",
                f.text.replace('\n', " "),
                f.expected,
                f.champion,
                f.candidate
            ));
        }
        s.push('\n');
    }
    if !eval.label_issues.is_empty() {
        s.push_str(
            "## Labels to review\n\nStored rows the candidate confidently puts under another \
             label (confident learning), most confident first; holdout rows are the stronger \
             evidence. Relabel or remove them with `PATCH`/`DELETE \
             /v1/domains/{d}/corrections/{id}`.\n\n| id | split | text | stored | suggested |\n\
             |---:|---|---|---|---|\n",
        );
        for i in eval.label_issues.iter().take(20) {
            s.push_str(&format!(
                "| {} | {} | {} | `{}` ({}) | `{}` ({}) |\n",
                i.id,
                i.split,
                i.text.replace(['\n', '|'], " "),
                i.given,
                pct(i.given_probability),
                i.suggested,
                pct(i.suggested_probability)
            ));
        }
        if eval.label_issues.len() > 20 {
            s.push_str(&format!(
                "\n{} more in the API (`GET …/versions/{version}/label-issues`).\n",
                eval.label_issues.len() - 20
            ));
        }
        s.push('\n');
    }
    training_section(&mut s, lineage);
    s.push_str("## Lineage\n\n```json\n");
    s.push_str(&serde_json::to_string_pretty(lineage).expect("json"));
    s.push_str("\n```\n");
    s
}

/// How the run trained, from the lineage: each "auto" choice with its reason, truncation,
/// and the auto search's trials.
fn training_section(s: &mut String, lineage: &serde_json::Value) {
    let plan = &lineage["training_plan"];
    if plan.is_null() {
        return;
    }
    let hp = &lineage["hyperparameters"];
    s.push_str("## Training\n\n");
    s.push_str(&format!(
        "{} epochs, batch size {}, learning rate {}, LoRA r {} (alpha {}), max_seq_len {}: {} \
         training rows were longer and trained on their first tokens only.\n\n",
        hp["epochs"],
        hp["batch_size"],
        hp["learning_rate"],
        hp["lora"]["r"],
        hp["lora"]["alpha"],
        hp["max_seq_len"],
        plan["resolved"]["truncated_rows"]
    ));
    for why in plan["resolved"]["why"].as_array().into_iter().flatten() {
        if let Some(why) = why.as_str() {
            s.push_str(&format!("- {why}\n"));
        }
    }
    let trials = plan["trials"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !trials.is_empty() {
        s.push_str(
            "\n| trial | learning-rate multiplier | LoRA r | validation loss | seconds | chosen |\n\
             |---:|---:|---:|---:|---:|---|\n",
        );
        for (i, t) in trials.iter().enumerate() {
            s.push_str(&format!(
                "| {} | {} | {} | {:.4} | {:.1} | {} |\n",
                i + 1,
                t["learning_rate_multiplier"],
                t["lora_r"],
                t["validation_loss"].as_f64().unwrap_or(f64::NAN),
                t["wall_seconds"].as_f64().unwrap_or(0.0),
                if t["chosen"] == true { "yes" } else { "" }
            ));
        }
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Decision, Flip, Metrics, Rule};

    #[test]
    fn report_leads_with_the_decision_and_its_rule() {
        let m = |acc: f64| Metrics {
            accuracy: acc,
            macro_f1: Some(acc),
            token_f1: None,
            per_label: vec![],
            confusion: vec![],
        };
        let eval = Evaluation {
            champion_name: "v1 (production)".into(),
            holdout_size: 80,
            champion: m(0.5),
            candidate: m(0.6),
            mcnemar_p: 0.2,
            fixed_count: 12,
            broken_count: 4,
            fixed: vec![Flip {
                text: "card?".into(),
                expected: "card_arrival".into(),
                champion: "age_limit".into(),
                candidate: "card_arrival".into(),
            }],
            broken: vec![],
            label_flips: vec![],
            label_issues: vec![],
            out_of_scope: None,
            calibration: crate::calibration(&[0.9, 0.6], &[true, false], 10),
            routing: crate::pick_threshold(&[0.9, 0.6], &[true, false], 0.95),
            decision: Decision {
                promote: false,
                awaiting_approval: false,
                rule: Rule::NotSignificant,
                reason: "held back: +10.0 points could be chance".into(),
                remedy: Some("more held-out corrections".into()),
            },
        };
        let md = render_markdown("banking", "v2", &eval, &serde_json::json!({"seed": 1}));
        insta::assert_snapshot!(md, @r#"
        # banking v2

        **Gate decision at evaluation:** held back: +10.0 points could be chance (rule `not_significant`)

        **What would have passed this rule:** more held-out corrections

        Evaluated on 80 held-out corrections against `v1 (production)`.

        | metric | champion | candidate |
        |---|---:|---:|
        | accuracy | 50.0% | 60.0% |
        | macro-F1 | 50.0% | 60.0% |

        Paired exact McNemar test: 12 fixed, 4 broken, p = 0.2000.

        ## Confidence and routing

        Expected calibration error of the candidate: 0.350.
        Escalation threshold: answer when confidence ≥ 0.900, escalate below. On this holdout that answers 50.0% of queries at 100.0% accuracy (target 95.0%).

        ## Fixed (wrong → right)

        - "card?": expected `card_arrival`, champion `age_limit`, candidate `card_arrival`

        ## Broken (right → wrong)

        None.

        ## Lineage

        ```json
        {
          "seed": 1
        }
        ```
        "#);
    }
}

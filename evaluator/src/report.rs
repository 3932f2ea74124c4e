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
    s.push_str(&format!(
        "# {domain} {version}: {}\n\n",
        if eval.decision.promote {
            "promoted"
        } else {
            "held back"
        }
    ));
    s.push_str(&format!(
        "**Decision:** {} (rule `{:?}`)\n\n",
        eval.decision.reason, eval.decision.rule
    ));
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
        "Paired exact McNemar test: {} fixed, {} broken, p = {:.4}.\n\n",
        eval.fixed_count, eval.broken_count, eval.mcnemar_p
    ));
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
    for (title, flips) in [
        ("Fixed (wrong → right)", &eval.fixed),
        ("Broken (right → wrong)", &eval.broken),
    ] {
        s.push_str(&format!("\n## {title}\n\n"));
        if flips.is_empty() {
            s.push_str("None.\n");
        }
        for f in flips.iter() {
            s.push_str(&format!(
                "- \"{}\": expected `{}`, champion `{}`, candidate `{}`\n",
                f.text.replace('\n', " "),
                f.expected,
                f.champion,
                f.candidate
            ));
        }
    }
    s.push_str("\n## Lineage\n\n```json\n");
    s.push_str(&serde_json::to_string_pretty(lineage).expect("json"));
    s.push_str("\n```\n");
    s
}

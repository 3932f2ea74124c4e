use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Share of rows answered right: the label for classification, the normalized text for
    /// generation (exact match).
    pub accuracy: f64,
    /// Classification only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Generation only: mean token-level F1 against the corrected output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_f1: Option<f64>,
    pub per_label: Vec<LabelMetrics>,
    /// `confusion[gold][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

pub fn classification_metrics(gold: &[usize], predicted: &[usize], labels: &[String]) -> Metrics {
    assert_eq!(gold.len(), predicted.len());
    let n = labels.len();
    let mut confusion = vec![vec![0usize; n]; n];
    for (&g, &p) in gold.iter().zip(predicted) {
        confusion[g][p] += 1;
    }
    let correct: usize = (0..n).map(|i| confusion[i][i]).sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_label: Vec<LabelMetrics> = (0..n)
        .map(|i| {
            let tp = confusion[i][i];
            let support: usize = confusion[i].iter().sum();
            let predicted_i: usize = (0..n).map(|g| confusion[g][i]).sum();
            let precision = ratio(tp, predicted_i);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            LabelMetrics {
                label: labels[i].clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    // Macro-F1 over the labels that occur in the holdout, as scikit-learn does with `labels=`
    // restricted to present classes.
    let present: Vec<&LabelMetrics> = per_label.iter().filter(|m| m.support > 0).collect();
    let macro_f1 = present.iter().map(|m| m.f1).sum::<f64>() / present.len().max(1) as f64;
    Metrics {
        accuracy: ratio(correct, gold.len()),
        macro_f1: Some(macro_f1),
        token_f1: None,
        per_label,
        confusion,
    }
}

/// Exact match after normalization, and SQuAD-style token F1.
pub fn generation_metrics(expected: &[String], generated: &[String]) -> Metrics {
    use flywheel_domain::normalize_text;
    assert_eq!(expected.len(), generated.len());
    let n = expected.len().max(1) as f64;
    let exact = expected
        .iter()
        .zip(generated)
        .filter(|(e, g)| normalize_text(e) == normalize_text(g))
        .count() as f64;
    let f1: f64 = expected
        .iter()
        .zip(generated)
        .map(|(e, g)| token_f1(e, g))
        .sum();
    Metrics {
        accuracy: exact / n,
        macro_f1: None,
        token_f1: Some(f1 / n),
        per_label: vec![],
        confusion: vec![],
    }
}

fn token_f1(expected: &str, generated: &str) -> f64 {
    use std::collections::HashMap;
    let (e, g) = (
        flywheel_domain::normalize_text(expected),
        flywheel_domain::normalize_text(generated),
    );
    let (e, g): (Vec<&str>, Vec<&str>) = (
        e.split(' ').filter(|t| !t.is_empty()).collect(),
        g.split(' ').filter(|t| !t.is_empty()).collect(),
    );
    if e.is_empty() || g.is_empty() {
        return if e.is_empty() && g.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &e {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &g {
        if let Some(c) = counts.get_mut(t).filter(|c| **c > 0) {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, r) = (
        common as f64 / g.len() as f64,
        common as f64 / e.len() as f64,
    );
    2.0 * p * r / (p + r)
}

/// Two-sided exact McNemar test: `b` pairs only the champion got right, `c` only the
/// candidate. Under the null each discordant pair is a fair coin.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in log space to stay finite for large n.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_a_known_confusion() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let m = classification_metrics(&[0, 0, 1, 1], &[0, 1, 1, 1], &labels);
        assert_eq!(m.accuracy, 0.75);
        assert_eq!(m.confusion, vec![vec![1, 1], vec![0, 2]]);
        assert_eq!(m.per_label[0].recall, 0.5);
        assert!((m.per_label[1].precision - 2.0 / 3.0).abs() < 1e-12);
        let f1a = 2.0 * 1.0 * 0.5 / 1.5;
        let f1b = 2.0 * (2.0 / 3.0) / (5.0 / 3.0);
        assert!((m.macro_f1.unwrap() - (f1a + f1b) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn generation_metrics_normalize_and_credit_overlap() {
        let m = generation_metrics(
            &[
                "Card  arrival".into(),
                "lost card".into(),
                "top up failed".into(),
            ],
            &["card arrival".into(), "card lost".into(), "nothing".into()],
        );
        assert!((m.accuracy - 1.0 / 3.0).abs() < 1e-12);
        // Token F1: 1, 1 (same bag of tokens), 0.
        assert!((m.token_f1.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn mcnemar_matches_binomial_tables() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // b=1, c=9: 2 * (1 + 10) / 1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(5, 5) - 1.0).abs() < 1e-12);
        assert!(mcnemar_exact(0, 2000) < 1e-300 || mcnemar_exact(0, 2000) == 0.0);
    }
}

//! How far the model's confidence can be trusted, and where to stop trusting it: expected
//! calibration error, the reliability curve, and the escalation threshold for hybrid routing.

use serde::{Deserialize, Serialize};

/// One bin of the reliability curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean confidence of the predictions in the bin.
    pub confidence: f64,
    /// Share of them that were right.
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Expected calibration error: the count-weighted mean |accuracy - confidence| over bins.
    pub ece: f64,
    pub bins: Vec<ReliabilityBin>,
}

/// Equal-width bins over [0, 1].
pub fn calibration(confidence: &[f64], correct: &[bool], n_bins: usize) -> Calibration {
    assert_eq!(confidence.len(), correct.len());
    let mut bins: Vec<ReliabilityBin> = (0..n_bins)
        .map(|i| ReliabilityBin {
            lower: i as f64 / n_bins as f64,
            upper: (i + 1) as f64 / n_bins as f64,
            count: 0,
            confidence: 0.0,
            accuracy: 0.0,
        })
        .collect();
    for (&c, &ok) in confidence.iter().zip(correct) {
        let i = ((c * n_bins as f64) as usize).min(n_bins - 1);
        bins[i].count += 1;
        bins[i].confidence += c;
        bins[i].accuracy += if ok { 1.0 } else { 0.0 };
    }
    let total = confidence.len().max(1) as f64;
    let mut ece = 0.0;
    for b in &mut bins {
        if b.count > 0 {
            b.confidence /= b.count as f64;
            b.accuracy /= b.count as f64;
            ece += b.count as f64 / total * (b.accuracy - b.confidence).abs();
        }
    }
    Calibration { ece, bins }
}

/// A point of the coverage-vs-accuracy curve: answering only when confidence ≥ `threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingPoint {
    pub threshold: f64,
    /// Share of queries the small model answers itself.
    pub coverage: f64,
    /// Accuracy on those it answers.
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    pub target_accuracy: f64,
    /// Answer when confidence ≥ this; escalate below. `None` when no threshold reaches the
    /// target on this holdout: escalate everything.
    pub threshold: Option<f64>,
    pub coverage: f64,
    pub accuracy: f64,
    pub curve: Vec<RoutingPoint>,
}

/// Picks the lowest confidence threshold (most coverage) whose accepted answers are at least
/// `target_accuracy` accurate. Candidate thresholds are the observed confidences, so the
/// choice is exact on this holdout.
pub fn pick_threshold(confidence: &[f64], correct: &[bool], target_accuracy: f64) -> Routing {
    let mut rows: Vec<(f64, bool)> = confidence
        .iter()
        .copied()
        .zip(correct.iter().copied())
        .collect();
    // Most confident first; accepting the top k is accepting confidence ≥ the k-th value.
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = rows.len();
    let mut curve = Vec::new();
    let mut right = 0usize;
    let mut best: Option<RoutingPoint> = None;
    let mut k = 0;
    while k < n {
        // Ties accept together: a threshold cannot split equal confidences.
        let t = rows[k].0;
        while k < n && rows[k].0 == t {
            right += rows[k].1 as usize;
            k += 1;
        }
        let point = RoutingPoint {
            threshold: t,
            coverage: k as f64 / n as f64,
            accuracy: right as f64 / k as f64,
        };
        if point.accuracy >= target_accuracy {
            best = Some(point.clone());
        }
        curve.push(point);
    }
    match best {
        Some(p) => Routing {
            target_accuracy,
            threshold: Some(p.threshold),
            coverage: p.coverage,
            accuracy: p.accuracy,
            curve,
        },
        None => Routing {
            target_accuracy,
            threshold: None,
            coverage: 0.0,
            accuracy: 0.0,
            curve,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calibrated_model_has_small_ece_and_an_overconfident_one_does_not() {
        // Confidence 0.8, right 8 times in 10: perfectly calibrated.
        let conf = vec![0.8; 10];
        let ok: Vec<bool> = (0..10).map(|i| i < 8).collect();
        assert!(calibration(&conf, &ok, 10).ece < 1e-12);
        // Confidence 0.95, right half the time.
        let conf = vec![0.95; 10];
        let ok: Vec<bool> = (0..10).map(|i| i % 2 == 0).collect();
        let c = calibration(&conf, &ok, 10);
        assert!((c.ece - 0.45).abs() < 1e-12);
        assert_eq!(c.bins[9].count, 10);
    }

    #[test]
    fn the_threshold_keeps_the_target_accuracy_with_the_most_coverage() {
        // Right above 0.6, wrong below: the threshold is exactly the lowest right confidence.
        let conf = [0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3];
        let ok = [true, true, true, true, true, false, false, false];
        let r = pick_threshold(&conf, &ok, 0.95);
        assert_eq!(r.threshold, Some(0.6));
        assert_eq!(r.coverage, 5.0 / 8.0);
        assert_eq!(r.accuracy, 1.0);
        // With a lower target one wrong answer may come in: accept 0.5 too (5/6 = 83%).
        assert_eq!(pick_threshold(&conf, &ok, 0.8).threshold, Some(0.5));
        // Unreachable target: escalate everything.
        let r = pick_threshold(&[0.9, 0.8], &[false, true], 0.95);
        assert_eq!((r.threshold, r.coverage), (None, 0.0));
    }

    #[test]
    fn tied_confidences_are_accepted_together() {
        let r = pick_threshold(&[0.9, 0.7, 0.7, 0.7], &[true, true, false, true], 0.9);
        // Accepting 0.7 takes all three (3/4 right overall): only 0.9 meets 90%.
        assert_eq!(r.threshold, Some(0.9));
        assert_eq!(r.curve.len(), 2);
    }
}

/// The confidence below which an answer counts as out of scope, and what it achieves on the
/// holdout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScopeThreshold {
    /// Answers with lower confidence are treated as the out-of-scope label (0: none are).
    pub threshold: f64,
    /// In-scope rows answered with their label at or above the threshold.
    pub in_scope_accuracy: f64,
    /// Out-of-scope rows predicted as such, or answered below the threshold.
    pub out_of_scope_recall: f64,
}

/// Picks the out-of-scope threshold that maximises in-scope accuracy plus out-of-scope
/// recall on the holdout (the lowest such threshold on a tie: fewest answers overridden).
/// `predicted_oos[i]`: the model answered the out-of-scope label itself; `right[i]`: it
/// answered row `i`'s label; `is_oos[i]`: row `i`'s label is the out-of-scope one.
pub fn pick_scope_threshold(
    confidence: &[f64],
    right: &[bool],
    predicted_oos: &[bool],
    is_oos: &[bool],
) -> ScopeThreshold {
    let in_scope = is_oos.iter().filter(|o| !**o).count().max(1) as f64;
    let oos = is_oos.iter().filter(|o| **o).count().max(1) as f64;
    let at = |t: f64| {
        let (mut kept_right, mut caught) = (0usize, 0usize);
        for i in 0..confidence.len() {
            let below = confidence[i] < t;
            if is_oos[i] {
                caught += usize::from(predicted_oos[i] || below);
            } else {
                kept_right += usize::from(right[i] && !below);
            }
        }
        ScopeThreshold {
            threshold: t,
            in_scope_accuracy: kept_right as f64 / in_scope,
            out_of_scope_recall: caught as f64 / oos,
        }
    };
    // Just above each confidence seen: that answer and every less confident one are out of
    // scope. The lowest threshold reaching the best score overrides the fewest answers.
    let mut candidates: Vec<f64> = confidence.iter().map(|c| c + 1e-9).collect();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    let mut best = at(0.0);
    for t in candidates {
        let here = at(t);
        let score = |s: &ScopeThreshold| s.in_scope_accuracy + s.out_of_scope_recall;
        if score(&here) > score(&best) + 1e-12 {
            best = here;
        }
    }
    best
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn the_threshold_trades_in_scope_answers_for_caught_out_of_scope_ones() {
        // Out-of-scope rows the model answers with low confidence; in-scope rows it answers
        // right with high confidence, but one right answer sits low too.
        let confidence = [0.9, 0.95, 0.85, 0.3, 0.35, 0.4, 0.32];
        let right = [true, true, true, false, false, false, true];
        let predicted_oos = [false; 7];
        let is_oos = [false, false, false, true, true, true, false];
        let s = pick_scope_threshold(&confidence, &right, &predicted_oos, &is_oos);
        // Just above 0.4 every out-of-scope row is caught, at the cost of the in-scope 0.32.
        assert!((s.threshold - 0.4).abs() < 1e-6, "{s:?}");
        assert_eq!(s.out_of_scope_recall, 1.0);
        assert_eq!(s.in_scope_accuracy, 0.75);
        // Nothing to catch: no threshold.
        let none =
            pick_scope_threshold(&[0.5, 0.9], &[true, true], &[false, false], &[false, false]);
        assert_eq!(none.threshold, 0.0);
    }
}

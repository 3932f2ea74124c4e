//! Label-noise review: the stored rows whose label the trained model confidently disagrees
//! with, ranked for a steward (confident learning: Northcutt, Jiang and Chuang, 2021). A row is
//! flagged when the model's probability for another label reaches that label's own average
//! confidence on the rows that carry it (its per-class threshold) and beats every other label
//! that does; flags rank by how far that label's probability is above the given one's.
//! Holdout probabilities are out of sample; training ones are in sample, so a memorised wrong
//! label there can hide — the holdout's flags are the stronger evidence. Give each split its
//! own call: thresholds from in-sample probabilities would be out of the holdout's reach.

use serde::{Deserialize, Serialize};

/// One row to look at again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelIssue {
    /// The correction's id.
    pub id: i64,
    /// `train` or `holdout`.
    pub split: String,
    pub text: String,
    pub given: String,
    pub suggested: String,
    pub given_probability: f64,
    pub suggested_probability: f64,
}

/// A stored row and the model's probabilities for it.
pub struct Reviewed<'a> {
    pub id: i64,
    pub split: &'a str,
    pub text: &'a str,
    pub given: &'a str,
    /// One probability per label the model knows, in `labels` order.
    pub probabilities: &'a [f32],
}

/// The rows the model confidently relabels, most confident first, at most `max`.
pub fn label_issues(rows: &[Reviewed<'_>], labels: &[String], max: usize) -> Vec<LabelIssue> {
    let given: Vec<Option<usize>> = rows
        .iter()
        .map(|r| {
            labels
                .iter()
                .position(|l| l == r.given)
                .filter(|&g| g < r.probabilities.len())
        })
        .collect();
    // Per label, the mean probability the model gives it on the rows labelled with it.
    let mut sum = vec![0f64; labels.len()];
    let mut count = vec![0usize; labels.len()];
    for (r, g) in rows.iter().zip(&given) {
        if let Some(g) = *g {
            sum[g] += r.probabilities[g] as f64;
            count[g] += 1;
        }
    }
    let threshold: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(s, &n)| if n == 0 { f64::INFINITY } else { s / n as f64 })
        .collect();
    let mut issues: Vec<(f64, LabelIssue)> = rows
        .iter()
        .zip(&given)
        .filter_map(|(r, g)| {
            let g = (*g)?;
            let (k, p) = r
                .probabilities
                .iter()
                .enumerate()
                .filter(|(k, p)| **p as f64 >= threshold[*k])
                .max_by(|a, b| a.1.total_cmp(b.1))?;
            (k != g).then(|| {
                let margin = *p as f64 - r.probabilities[g] as f64;
                (
                    margin,
                    LabelIssue {
                        id: r.id,
                        split: r.split.to_owned(),
                        text: r.text.to_owned(),
                        given: r.given.to_owned(),
                        suggested: labels[k].clone(),
                        given_probability: r.probabilities[g] as f64,
                        suggested_probability: *p as f64,
                    },
                )
            })
        })
        .collect();
    issues.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    issues.into_iter().take(max).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_the_model_confidently_puts_elsewhere_is_flagged_first() {
        let labels: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let probs = [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.2, 0.8],
            [0.3, 0.7],
            // Labelled `a`, but the model is as sure of `b` as it is on real `b`s.
            [0.1, 0.9],
            // Labelled `b`, unsure either way: below `a`'s threshold, not flagged.
            [0.55, 0.45],
        ];
        let given = ["a", "a", "b", "b", "a", "b"];
        let rows: Vec<Reviewed> = probs
            .iter()
            .zip(given)
            .enumerate()
            .map(|(i, (p, g))| Reviewed {
                id: i as i64 + 1,
                split: "train",
                text: "t",
                given: g,
                probabilities: p,
            })
            .collect();
        let issues = label_issues(&rows, &labels, 10);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!((issues[0].id, issues[0].suggested.as_str()), (5, "b"));
    }
}

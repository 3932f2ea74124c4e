use flywheel_domain::Policy;
use serde::{Deserialize, Serialize};

use crate::Metrics;

/// What the gate looks at.
pub struct Evidence<'a> {
    pub champion: &'a Metrics,
    pub candidate: &'a Metrics,
    /// Exact McNemar p-value of the paired difference.
    pub p_value: f64,
    /// The candidate's expected calibration error.
    pub ece: f64,
    /// Per-label regressions are judged only against a trained champion: an untrained base
    /// head's lucky recall on one label is no slice to protect.
    pub champion_is_adapter: bool,
}

/// The rule that decided, so every decision can say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    AccuracyFloor,
    MinImprovement,
    NotSignificant,
    LabelRegression,
    CalibrationError,
    AwaitingApproval,
    AllRulesPassed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The candidate passed every rule and goes (or, with approval required, may go) live.
    pub promote: bool,
    /// It passed, but a steward must approve it first.
    #[serde(default)]
    pub awaiting_approval: bool,
    pub rule: Rule,
    pub reason: String,
}

/// Applies the rules in order; the first that fails decides. `p_value` is the paired test's.
pub fn decide(policy: &Policy, e: &Evidence<'_>) -> Decision {
    let (champion, candidate, p_value) = (e.champion, e.candidate, e.p_value);
    let delta = candidate.accuracy - champion.accuracy;
    let held = |rule, reason: String| Decision {
        promote: false,
        awaiting_approval: false,
        rule,
        reason,
    };
    if candidate.accuracy < policy.min_accuracy {
        return held(
            Rule::AccuracyFloor,
            format!(
                "held back: accuracy {:.1}% is under the floor of {:.1}%",
                100.0 * candidate.accuracy,
                100.0 * policy.min_accuracy
            ),
        );
    }
    // A margin of zero still asks for strictly better: a tie never replaces the champion. A
    // negative margin is an explicit allowance for regression.
    if delta < policy.min_improvement || (policy.min_improvement >= 0.0 && delta <= 0.0) {
        return held(
            Rule::MinImprovement,
            format!(
                "held back: accuracy changed by {:+.1} points, the policy asks for more than {:+.1}",
                100.0 * delta,
                100.0 * policy.min_improvement.max(0.0)
            ),
        );
    }
    if policy.significance_level < 1.0 && p_value >= policy.significance_level {
        return held(
            Rule::NotSignificant,
            format!(
                "held back: {:+.1} points could be chance (paired exact McNemar {}, the policy asks for p < {})",
                100.0 * delta,
                format_p(p_value),
                policy.significance_level
            ),
        );
    }
    if e.champion_is_adapter {
        let worst = champion
            .per_label
            .iter()
            .zip(&candidate.per_label)
            .filter(|(a, _)| a.support > 0)
            .map(|(a, b)| (a.recall - b.recall, &a.label))
            .max_by(|x, y| x.0.total_cmp(&y.0));
        if let Some((drop, label)) = worst
            && drop > policy.max_label_drop
        {
            return held(
                Rule::LabelRegression,
                format!(
                    "held back: recall on `{label}` fell by {:.1} points; the policy allows {:.1}",
                    100.0 * drop,
                    100.0 * policy.max_label_drop
                ),
            );
        }
    }
    if e.ece > policy.max_calibration_error {
        return held(
            Rule::CalibrationError,
            format!(
                "held back: expected calibration error {:.3} is over the ceiling of {:.3}",
                e.ece, policy.max_calibration_error
            ),
        );
    }
    if policy.require_approval {
        return Decision {
            promote: true,
            awaiting_approval: true,
            rule: Rule::AwaitingApproval,
            reason: format!(
                "awaiting approval: accuracy {:.1}% ({:+.1} points over the champion, {}) passed every rule",
                100.0 * candidate.accuracy,
                100.0 * delta,
                format_p(p_value)
            ),
        };
    }
    Decision {
        promote: true,
        awaiting_approval: false,
        rule: Rule::AllRulesPassed,
        reason: format!(
            "promoted: accuracy {:.1}% ({:+.1} points over the champion, {})",
            100.0 * candidate.accuracy,
            100.0 * delta,
            format_p(p_value)
        ),
    }
}

/// A p-value as a steward reads it, with its relation: `p = 0.0123` or `p < 0.0001`.
pub fn format_p(p: f64) -> String {
    if p < 1e-4 {
        "p < 0.0001".into()
    } else {
        format!("p = {p:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(acc: f64) -> Metrics {
        Metrics {
            accuracy: acc,
            macro_f1: None,
            token_f1: None,
            per_label: vec![],
            confusion: vec![],
        }
    }

    fn policy() -> Policy {
        Policy {
            min_accuracy: 0.6,
            min_improvement: 0.02,
            max_calibration_error: 0.2,
            ..Policy::default()
        }
    }

    fn decide_on(p: &Policy, champion: &Metrics, candidate: &Metrics, p_value: f64) -> Decision {
        decide(
            p,
            &Evidence {
                champion,
                candidate,
                p_value,
                ece: 0.05,
                champion_is_adapter: true,
            },
        )
    }

    fn with_recalls(acc: f64, recalls: &[f64]) -> Metrics {
        let mut metrics = m(acc);
        metrics.per_label = recalls
            .iter()
            .enumerate()
            .map(|(i, &recall)| crate::LabelMetrics {
                label: format!("l{i}"),
                precision: recall,
                recall,
                f1: recall,
                support: 10,
            })
            .collect();
        metrics
    }

    #[test]
    fn each_rule_decides_its_case() {
        let p = policy();
        assert_eq!(
            decide_on(&p, &m(0.1), &m(0.5), 0.0).rule,
            Rule::AccuracyFloor
        );
        assert_eq!(
            decide_on(&p, &m(0.70), &m(0.71), 0.0).rule,
            Rule::MinImprovement
        );
        assert_eq!(
            decide_on(&p, &m(0.70), &m(0.65), 0.0).rule,
            Rule::MinImprovement
        );
        // Better by enough, but on too few discordant pairs to rule out chance.
        assert_eq!(
            decide_on(&p, &m(0.70), &m(0.80), 0.2).rule,
            Rule::NotSignificant
        );
        let ok = decide_on(&p, &m(0.70), &m(0.80), 0.01);
        assert!(ok.promote && ok.rule == Rule::AllRulesPassed, "{ok:?}");
        // With no margin asked for, a tie is still not an improvement.
        let mut p0 = policy();
        p0.min_accuracy = 0.0;
        p0.min_improvement = 0.0;
        p0.significance_level = 1.0;
        assert!(!decide_on(&p0, &m(0.7), &m(0.7), 0.0).promote);
        // A negative margin allows a bounded regression; significance 1 switches the test off.
        p0.min_improvement = -0.05;
        assert!(decide_on(&p0, &m(0.7), &m(0.67), 1.0).promote);
        assert!(!decide_on(&p0, &m(0.7), &m(0.6), 1.0).promote);
    }

    #[test]
    fn one_collapsing_label_holds_back_an_otherwise_better_candidate() {
        let champion = with_recalls(0.70, &[0.7, 0.7, 0.7]);
        let candidate = with_recalls(0.80, &[0.95, 0.95, 0.5]);
        let d = decide_on(&policy(), &champion, &candidate, 0.001);
        assert_eq!(d.rule, Rule::LabelRegression, "{d:?}");
        assert!(d.reason.contains("`l2`"), "{}", d.reason);
        // Against the untrained base model, the slice rule does not apply.
        let d = decide(
            &policy(),
            &Evidence {
                champion: &champion,
                candidate: &candidate,
                p_value: 0.001,
                ece: 0.05,
                champion_is_adapter: false,
            },
        );
        assert!(d.promote, "{d:?}");
    }

    #[test]
    fn overconfidence_and_required_approval_are_rules_too() {
        let (champion, candidate) = (m(0.7), m(0.8));
        let e = Evidence {
            champion: &champion,
            candidate: &candidate,
            p_value: 0.001,
            ece: 0.3,
            champion_is_adapter: true,
        };
        assert_eq!(decide(&policy(), &e).rule, Rule::CalibrationError);
        let mut p = policy();
        p.require_approval = true;
        let d = decide(&p, &Evidence { ece: 0.05, ..e });
        assert!(
            d.promote && d.awaiting_approval && d.rule == Rule::AwaitingApproval,
            "{d:?}"
        );
    }
}

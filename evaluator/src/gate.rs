use flywheel_domain::Policy;
use serde::{Deserialize, Serialize};

use crate::{Metrics, mcnemar_exact};

/// One label's paired outcomes on its holdout rows: rows the champion got right and the
/// candidate wrong (`lost`), and the reverse (`gained`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelFlips {
    pub label: String,
    pub support: u64,
    pub lost: u64,
    pub gained: u64,
}

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
    /// Per label, the paired flips behind its recall change (classification).
    pub label_flips: &'a [LabelFlips],
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
    /// For a candidate held back: the smallest policy change that would have let it pass this
    /// rule (later rules may still hold it), so a steward can judge the policy, not only the
    /// model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

impl Decision {
    /// The gate's verdict in words, and the badge class a page shows it with.
    pub fn verdict(&self) -> (&'static str, &'static str) {
        match (self.promote, self.awaiting_approval) {
            (true, false) => ("promoted", "ok"),
            (true, true) => ("awaiting approval", "wait"),
            (false, _) => ("held back", "no"),
        }
    }
}

/// Applies the rules in order; the first that fails decides. `p_value` is the paired test's.
pub fn decide(policy: &Policy, e: &Evidence<'_>) -> Decision {
    let (champion, candidate, p_value) = (e.champion, e.candidate, e.p_value);
    let delta = candidate.accuracy - champion.accuracy;
    let held = |rule, reason: String, remedy: String| Decision {
        promote: false,
        awaiting_approval: false,
        rule,
        reason,
        remedy: Some(remedy),
    };
    if candidate.accuracy < policy.min_accuracy {
        return held(
            Rule::AccuracyFloor,
            format!(
                "held back: accuracy {:.1}% is under the floor of {:.1}%",
                100.0 * candidate.accuracy,
                100.0 * policy.min_accuracy
            ),
            format!("min_accuracy ≤ {:.3}", floor3(candidate.accuracy)),
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
            if delta > 0.0 {
                format!("min_improvement ≤ {:.3}", floor3(delta))
            } else {
                format!(
                    "min_improvement ≤ {:.3} (an explicit allowance for regression)",
                    floor3(delta)
                )
            },
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
            "more held-out corrections (the test needs more discordant pairs), or \
             significance_level 1 to switch the test off"
                .to_owned(),
        );
    }
    if e.champion_is_adapter
        && let Some(regression) = label_regression(policy, champion, candidate, e.label_flips)
    {
        return regression;
    }
    if e.ece > policy.max_calibration_error {
        return held(
            Rule::CalibrationError,
            format!(
                "held back: expected calibration error {:.3} is over the ceiling of {:.3}",
                e.ece, policy.max_calibration_error
            ),
            format!(
                "max_calibration_error ≥ {:.3}",
                (e.ece * 1000.0).ceil() / 1000.0
            ),
        );
    }
    if policy.require_approval {
        return Decision {
            promote: true,
            awaiting_approval: true,
            rule: Rule::AwaitingApproval,
            remedy: None,
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
        remedy: None,
        reason: format!(
            "promoted: accuracy {:.1}% ({:+.1} points over the champion, {})",
            100.0 * candidate.accuracy,
            100.0 * delta,
            format_p(p_value)
        ),
    }
}

/// The worst real per-label regression, if one breaks the policy. A label counts when it has
/// `min_label_support` holdout rows, its recall fell by more than `max_label_drop`, and the
/// paired exact test on its own rows says the fall is not chance (unless the policy switched
/// significance off): a label with five rows that lost one is noise, not a regression.
fn label_regression(
    policy: &Policy,
    champion: &Metrics,
    candidate: &Metrics,
    flips: &[LabelFlips],
) -> Option<Decision> {
    let (label, drop, support, p) = champion
        .per_label
        .iter()
        .zip(&candidate.per_label)
        .filter(|(a, _)| a.support >= policy.min_label_support as usize)
        .map(|(a, b)| {
            let p = flips
                .iter()
                .find(|f| f.label == a.label)
                .map_or(0.0, |f| mcnemar_exact(f.lost, f.gained));
            (&a.label, a.recall - b.recall, a.support, p)
        })
        .filter(|&(_, drop, _, p)| {
            drop > policy.max_label_drop
                && (policy.significance_level >= 1.0 || p < policy.significance_level)
        })
        .max_by(|x, y| x.1.total_cmp(&y.1))?;
    Some(Decision {
        promote: false,
        awaiting_approval: false,
        rule: Rule::LabelRegression,
        reason: format!(
            "held back: recall on `{label}` fell by {:.1} points on {support} held-out rows ({}); \
             the policy allows {:.1}",
            100.0 * drop,
            format_p(p),
            100.0 * policy.max_label_drop
        ),
        remedy: Some(format!(
            "max_label_drop ≥ {:.3}, or min_label_support > {support}",
            (drop * 1000.0).ceil() / 1000.0
        )),
    })
}

/// `x` rounded down to three decimals, so a policy value written from it admits `x`.
fn floor3(x: f64) -> f64 {
    (x * 1000.0).floor() / 1000.0
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
                label_flips: &[],
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
                label_flips: &[],
            },
        );
        assert!(d.promote, "{d:?}");
    }

    #[test]
    fn a_label_drop_counts_only_with_support_and_a_real_difference() {
        let policy = policy();
        let champion = with_recalls(0.70, &[0.7, 0.7, 0.7]);
        let candidate = with_recalls(0.80, &[0.95, 0.95, 0.3]);
        let decide_with = |policy: &Policy, flips: &[LabelFlips]| {
            decide(
                policy,
                &Evidence {
                    champion: &champion,
                    candidate: &candidate,
                    p_value: 0.001,
                    ece: 0.05,
                    champion_is_adapter: true,
                    label_flips: flips,
                },
            )
        };
        let flips = |lost, gained| {
            [LabelFlips {
                label: "l2".into(),
                support: 10,
                lost,
                gained,
            }]
        };
        // Four rows lost, none gained: exact p = 0.125, which could be chance.
        let d = decide_with(&policy, &flips(4, 0));
        assert!(d.promote, "{d:?}");
        // Eight lost, none gained: p < 0.01, a real regression, named with its remedy.
        let d = decide_with(&policy, &flips(8, 0));
        assert_eq!(d.rule, Rule::LabelRegression, "{d:?}");
        assert!(d.reason.contains("on 10 held-out rows"), "{}", d.reason);
        assert_eq!(
            d.remedy.as_deref(),
            Some("max_label_drop ≥ 0.400, or min_label_support > 10")
        );
        // The same drop on a label with fewer rows than min_label_support says nothing.
        let sparse = Policy {
            min_label_support: 11,
            ..policy.clone()
        };
        assert!(decide_with(&sparse, &flips(8, 0)).promote);
    }

    #[test]
    fn a_held_back_decision_names_the_policy_that_would_have_passed_it() {
        let p = policy();
        let d = decide_on(&p, &m(0.70), &m(0.715), 0.0);
        assert_eq!(d.remedy.as_deref(), Some("min_improvement ≤ 0.015"));
        let d = decide_on(&p, &m(0.1), &m(0.5), 0.0);
        assert_eq!(d.remedy.as_deref(), Some("min_accuracy ≤ 0.500"));
        // The remedy passes: applying it moves the decision past that rule.
        let relaxed = Policy {
            min_improvement: 0.015,
            ..p.clone()
        };
        assert!(decide_on(&relaxed, &m(0.70), &m(0.715), 0.0).promote);
        assert_eq!(decide_on(&p, &m(0.7), &m(0.8), 0.01).remedy, None);
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
            label_flips: &[],
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

use serde::{Deserialize, Serialize};

use crate::Metrics;

/// The promotion rules of a domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatePolicy {
    pub min_accuracy: f64,
    pub min_improvement: f64,
    /// The paired test's p-value must be below this for an improvement to count.
    pub significance_level: f64,
}

/// The rule that decided, so every decision can say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    AccuracyFloor,
    MinImprovement,
    NotSignificant,
    AllRulesPassed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub promote: bool,
    pub rule: Rule,
    pub reason: String,
}

/// Applies the rules in order; the first that fails decides. `p_value` is the paired test's.
pub fn decide(
    policy: &GatePolicy,
    champion: &Metrics,
    candidate: &Metrics,
    p_value: f64,
) -> Decision {
    let delta = candidate.accuracy - champion.accuracy;
    if candidate.accuracy < policy.min_accuracy {
        return Decision {
            promote: false,
            rule: Rule::AccuracyFloor,
            reason: format!(
                "held back: accuracy {:.1}% is under the floor of {:.1}%",
                100.0 * candidate.accuracy,
                100.0 * policy.min_accuracy
            ),
        };
    }
    // A candidate must strictly beat the champion by the margin: equal is not better.
    if delta < policy.min_improvement || delta <= 0.0 {
        return Decision {
            promote: false,
            rule: Rule::MinImprovement,
            reason: format!(
                "held back: accuracy changed by {:+.1} points, the policy asks for more than {:+.1}",
                100.0 * delta,
                100.0 * policy.min_improvement.max(0.0)
            ),
        };
    }
    if p_value >= policy.significance_level {
        return Decision {
            promote: false,
            rule: Rule::NotSignificant,
            reason: format!(
                "held back: {:+.1} points could be chance (paired exact McNemar p = {}, the policy asks for p < {})",
                100.0 * delta,
                format_p(p_value),
                policy.significance_level
            ),
        };
    }
    Decision {
        promote: true,
        rule: Rule::AllRulesPassed,
        reason: format!(
            "promoted: accuracy {:.1}% ({:+.1} points over the champion, p = {})",
            100.0 * candidate.accuracy,
            100.0 * delta,
            format_p(p_value)
        ),
    }
}

/// A p-value as a steward reads it.
pub fn format_p(p: f64) -> String {
    if p < 1e-4 {
        "< 0.0001".into()
    } else {
        format!("{p:.4}")
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

    #[test]
    fn each_rule_decides_its_case() {
        let p = GatePolicy {
            min_accuracy: 0.6,
            min_improvement: 0.02,
            significance_level: 0.05,
        };
        assert_eq!(decide(&p, &m(0.1), &m(0.5), 0.0).rule, Rule::AccuracyFloor);
        assert_eq!(
            decide(&p, &m(0.70), &m(0.71), 0.0).rule,
            Rule::MinImprovement
        );
        assert_eq!(
            decide(&p, &m(0.70), &m(0.65), 0.0).rule,
            Rule::MinImprovement
        );
        // Better by enough, but on too few discordant pairs to rule out chance.
        assert_eq!(
            decide(&p, &m(0.70), &m(0.80), 0.2).rule,
            Rule::NotSignificant
        );
        let ok = decide(&p, &m(0.70), &m(0.80), 0.01);
        assert!(ok.promote && ok.rule == Rule::AllRulesPassed, "{ok:?}");
        // With no margin asked for, a tie is still not an improvement.
        let p0 = GatePolicy {
            min_accuracy: 0.0,
            min_improvement: 0.0,
            significance_level: 1.0,
        };
        assert!(!decide(&p0, &m(0.7), &m(0.7), 0.0).promote);
    }
}

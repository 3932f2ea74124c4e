//! When a domain should train: the scheduler's decision as a pure function of the policy, what
//! the database says about the domain, and the time.

use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use croner::Cron;

use crate::{Invalid, Policy, Trigger};

/// What the scheduler knows about a domain at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerState {
    /// Corrections newer than the last job's snapshot.
    pub new_corrections: i64,
    /// When the oldest of those arrived.
    pub oldest_new_at: Option<DateTime<Utc>>,
    /// When the domain's last job was created, or the domain itself if it has none.
    pub last_started_at: DateTime<Utc>,
    /// When the domain's last job ended, if one has.
    pub last_finished_at: Option<DateTime<Utc>>,
    /// A job is queued or running.
    pub in_flight: bool,
    /// Predictions logged in the last hour and how many of them escalated, when the policy
    /// bounds the escalation share.
    pub last_hour: Option<(i64, i64)>,
}

/// Predictions an hour must hold before its escalation share can start a run.
pub const MIN_DRIFT_PREDICTIONS: i64 = 50;

/// Parses a cron expression (5 fields, or 6 with seconds), in UTC.
pub fn parse_schedule(raw: &str) -> Result<Cron, Invalid> {
    Cron::from_str(raw).map_err(|e| Invalid::field("policy.schedule", format!("`{raw}`: {e}")))
}

/// Whether a run should start now, and why. Enough new corrections wins; otherwise too many of
/// the last hour's predictions escalating, the oldest untrained correction being too old, or
/// the cron schedule having fired since the last run,
/// starts one as long as there is anything new. Nothing starts during the cooldown after a
/// run, or while one is in flight.
pub fn due(policy: &Policy, state: &TriggerState, now: DateTime<Utc>) -> Option<Trigger> {
    if state.in_flight || state.new_corrections == 0 {
        return None;
    }
    if let Some(finished) = state.last_finished_at
        && now < finished + Duration::seconds(i64::from(policy.cooldown_seconds))
    {
        return None;
    }
    if state.new_corrections >= i64::from(policy.min_new_corrections) {
        return Some(Trigger::NewCorrections);
    }
    if let (Some(bound), Some((predictions, escalated))) =
        (policy.max_escalation_share, state.last_hour)
        && predictions >= MIN_DRIFT_PREDICTIONS
        && escalated as f64 > bound * predictions as f64
    {
        return Some(Trigger::Drift);
    }
    if let (Some(limit), Some(oldest)) = (policy.max_staleness_seconds, state.oldest_new_at)
        && now >= oldest + Duration::seconds(i64::from(limit))
    {
        return Some(Trigger::Staleness);
    }
    if let Some(raw) = &policy.schedule
        && let Ok(cron) = parse_schedule(raw)
        && cron
            .find_next_occurrence(&state.last_started_at, false)
            .is_ok_and(|next| next <= now)
    {
        return Some(Trigger::Schedule);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn state(new: i64) -> TriggerState {
        TriggerState {
            new_corrections: new,
            oldest_new_at: Some(at("2026-01-01T10:00:00Z")),
            last_started_at: at("2026-01-01T09:00:00Z"),
            last_finished_at: Some(at("2026-01-01T09:30:00Z")),
            in_flight: false,
            last_hour: None,
        }
    }

    fn policy() -> Policy {
        Policy {
            min_new_corrections: 100,
            ..Default::default()
        }
    }

    #[test]
    fn enough_new_corrections_start_a_run_unless_one_is_in_flight() {
        let now = at("2026-01-01T11:00:00Z");
        assert_eq!(
            due(&policy(), &state(100), now),
            Some(Trigger::NewCorrections)
        );
        assert_eq!(due(&policy(), &state(99), now), None);
        let busy = TriggerState {
            in_flight: true,
            ..state(500)
        };
        assert_eq!(due(&policy(), &busy, now), None);
    }

    #[test]
    fn stale_corrections_start_a_run_below_the_threshold() {
        let p = Policy {
            max_staleness_seconds: Some(3600),
            ..policy()
        };
        assert_eq!(due(&p, &state(3), at("2026-01-01T10:59:59Z")), None);
        assert_eq!(
            due(&p, &state(3), at("2026-01-01T11:00:00Z")),
            Some(Trigger::Staleness)
        );
        assert_eq!(due(&p, &state(0), at("2026-01-02T00:00:00Z")), None);
    }

    #[test]
    fn the_schedule_fires_once_per_occurrence_after_the_last_run() {
        let p = Policy {
            schedule: Some("0 3 * * *".into()),
            ..policy()
        };
        // Last run at 09:00 on the 1st: the next 03:00 is on the 2nd.
        assert_eq!(due(&p, &state(1), at("2026-01-02T02:59:00Z")), None);
        assert_eq!(
            due(&p, &state(1), at("2026-01-02T03:00:00Z")),
            Some(Trigger::Schedule)
        );
        // Nothing new, nothing to do.
        assert_eq!(due(&p, &state(0), at("2026-01-02T03:00:00Z")), None);
        assert!(parse_schedule("every tuesday").is_err());
    }

    #[test]
    fn nothing_starts_during_the_cooldown() {
        let p = Policy {
            cooldown_seconds: 3600,
            ..policy()
        };
        assert_eq!(due(&p, &state(500), at("2026-01-01T10:29:59Z")), None);
        assert_eq!(
            due(&p, &state(500), at("2026-01-01T10:30:00Z")),
            Some(Trigger::NewCorrections)
        );
    }

    #[test]
    fn too_many_escalations_start_a_run_on_what_is_new() {
        let now = at("2026-01-01T11:00:00Z");
        let p = Policy {
            max_escalation_share: Some(0.3),
            max_staleness_seconds: None,
            ..policy()
        };
        let with = |predictions, escalated| TriggerState {
            last_hour: Some((predictions, escalated)),
            ..state(5)
        };
        assert_eq!(due(&p, &with(100, 31), now), Some(Trigger::Drift));
        assert_eq!(
            due(&p, &with(100, 30), now),
            None,
            "at the bound is not over it"
        );
        assert_eq!(
            due(&p, &with(40, 40), now),
            None,
            "too few predictions to judge"
        );
        let nothing_new = TriggerState {
            new_corrections: 0,
            ..with(100, 90)
        };
        assert_eq!(
            due(&p, &nothing_new, now),
            None,
            "nothing new to learn from"
        );
        assert_eq!(
            due(&policy(), &with(100, 90), now),
            None,
            "off unless asked for"
        );
    }
}

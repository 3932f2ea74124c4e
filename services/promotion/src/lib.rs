//! Promotion: every move of a domain's `production` alias and the version status that goes with
//! it — the publish stage carrying out the gate's verdict, a steward's approval, rejection or
//! override of a held-back version, a rollback — and the hand moves of every other alias, each
//! with its audit row.
//!
//! It keeps one invariant: production points only at versions whose status is `promoted`.
//! Approval claims the version (`pending_approval` → `promoted`) before the alias moves and
//! gives the claim back if the move did not land; a rollback returns only to a version that
//! production's own history shows was live, never to one whose approval is still under way.
//! The alias history, written create-only in the registry, is what both consult, so the rule
//! holds across processes without a lock.
//!
//! It must not know HTTP or the queue, parse requests, or judge candidates (the evaluator's
//! gate does): callers hand it validated values and map its [`PromotionError`]s to their own
//! contracts.

use flywheel_db::{Db, DbError, DomainRow, VersionRow};
use flywheel_domain::{DomainName, VersionId, VersionStatus};
use flywheel_registry::{AliasMove, Registry, RegistryError};
use serde::Serialize;

pub use flywheel_domain::PRODUCTION;

/// The actor the audit log and alias history name for the gate's own decisions.
pub const GATE: &str = "flywheel-gate";

#[derive(Debug, thiserror::Error)]
pub enum PromotionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("version {domain}/{version} is not awaiting approval")]
    NotPending { domain: String, version: VersionId },
    #[error("version {domain}/{version} is not held back")]
    NotHeldBack { domain: String, version: VersionId },
    /// A rollback target the gate or a steward never promoted.
    #[error("version {domain}/{version} was never promoted ({})", .status.as_str())]
    NeverPromoted {
        domain: String,
        version: VersionId,
        status: VersionStatus,
    },
    /// A rollback target whose approval has claimed it but not yet moved production.
    #[error("version {domain}/{version} has not reached production yet")]
    NotYetLive { domain: String, version: VersionId },
    #[error("{0} is already production")]
    AlreadyProduction(VersionId),
    #[error("production moves only through the gate, approval and rollback")]
    ProductionByHand,
}

impl PromotionError {
    /// Whether trying again later may succeed: the database or the store was unreachable or
    /// busy.
    pub fn is_transient(&self) -> bool {
        match self {
            PromotionError::Db(e) => e.is_transient(),
            PromotionError::Registry(e) => e.is_transient(),
            _ => false,
        }
    }
}

pub type Result<T, E = PromotionError> = std::result::Result<T, E>;

/// What the gate decided about a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Promote,
    AwaitApproval,
    HoldBack,
}

impl Verdict {
    /// From the evaluator's decision flags: a promotion that needs approval waits for it.
    pub fn of(promote: bool, awaiting_approval: bool) -> Self {
        match (promote, awaiting_approval) {
            (true, false) => Verdict::Promote,
            (true, true) => Verdict::AwaitApproval,
            (false, _) => Verdict::HoldBack,
        }
    }
}

/// What became of a verdict: the version's status, and why production did not move when the
/// gate promoted it (the version is then held back).
#[derive(Debug)]
pub struct Outcome {
    pub status: VersionStatus,
    pub refused: Option<RegistryError>,
}

/// The audit row's data for an alias move.
#[derive(Serialize)]
struct Moved<'a> {
    alias: &'a str,
    from: Option<&'a str>,
    to: &'a str,
}

/// Promotion over one database and registry. Cheap: it borrows both.
#[derive(Clone, Copy)]
pub struct Promotion<'a> {
    db: &'a Db,
    registry: &'a Registry,
}

impl<'a> Promotion<'a> {
    pub fn new(db: &'a Db, registry: &'a Registry) -> Self {
        Self { db, registry }
    }

    /// The version production points at, if it was ever set.
    pub async fn production(&self, domain: &DomainName) -> Result<Option<VersionId>> {
        Ok(self
            .registry
            .resolve(domain, PRODUCTION)
            .await?
            .map(|m| VersionId(m.to)))
    }

    /// The publish stage's half: carries out the gate's verdict on a version just published.
    /// `Promote` moves production to it; if the alias will not move, the version is held back
    /// and [`Outcome::refused`] says why. Safe to repeat: a move an earlier attempt made is not
    /// made again. Record the verdict with [`record_gate`](Self::record_gate) afterwards.
    pub async fn carry_out(
        &self,
        domain: &DomainName,
        version: &VersionId,
        verdict: Verdict,
        reason: &str,
    ) -> Result<Outcome> {
        let status = match verdict {
            Verdict::AwaitApproval => VersionStatus::PendingApproval,
            Verdict::HoldBack => VersionStatus::HeldBack,
            Verdict::Promote => match self.first_move(domain, version, GATE, reason).await {
                Ok(_) => VersionStatus::Promoted,
                Err(e) => {
                    return Ok(Outcome {
                        status: VersionStatus::HeldBack,
                        refused: Some(e),
                    });
                }
            },
        };
        Ok(Outcome {
            status,
            refused: None,
        })
    }

    /// Records a gate decision: the version's status, its metrics `summary`, and the audit row.
    pub async fn record_gate(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        status: VersionStatus,
        reason: &str,
        summary: &serde_json::Value,
    ) -> Result<()> {
        self.db
            .record_version(domain.id, version, status, summary)
            .await?;
        self.decided(
            domain,
            (GATE, "gate_decision", reason),
            version,
            Some(summary),
        )
        .await
    }

    /// A steward approves a version awaiting approval: it is claimed (of two approvals, one
    /// wins), production moves to it, and the approval is audited. If production did not
    /// move, the claim is given back so the approval can be tried again.
    pub async fn approve(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove> {
        self.claim(domain, version, VersionStatus::Promoted).await?;
        let moved = match self
            .first_move(&domain.spec.name, version, by, reason)
            .await
        {
            Ok(moved) => moved,
            Err(e) => {
                self.db
                    .transition_version(
                        domain.id,
                        version,
                        VersionStatus::Promoted,
                        VersionStatus::PendingApproval,
                    )
                    .await?;
                return Err(e.into());
            }
        };
        self.audit_move(domain, "approve", &moved, by, reason)
            .await?;
        Ok(moved)
    }

    /// The gate's verdict on a held-back version judged again from its stored evaluation (after
    /// a policy change, at a steward's request): the version is claimed from `held_back` (of
    /// two such requests, one wins), production moves if the verdict promotes, and the new
    /// decision is recorded and audited as a `gate_decision` by `by`. A verdict that still
    /// holds it back changes nothing but the audit log. `champion` is what the version was
    /// measured against: production moves only from there (compare-and-swap), so a promotion
    /// that landed meanwhile is never replaced by a version that was not compared with it.
    /// Returns the version's status.
    #[allow(clippy::too_many_arguments)]
    pub async fn regate(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        champion: Option<&VersionId>,
        verdict: Verdict,
        by: &str,
        reason: &str,
        summary: &serde_json::Value,
    ) -> Result<VersionStatus> {
        let to = match verdict {
            Verdict::Promote => VersionStatus::Promoted,
            Verdict::AwaitApproval => VersionStatus::PendingApproval,
            Verdict::HoldBack => VersionStatus::HeldBack,
        };
        let not_held_back = || PromotionError::NotHeldBack {
            domain: domain.spec.name.to_string(),
            version: version.clone(),
        };
        if to == VersionStatus::HeldBack {
            let still = self
                .db
                .version(domain.id, version)
                .await?
                .is_some_and(|v| v.status == VersionStatus::HeldBack);
            if !still {
                return Err(not_held_back());
            }
        } else if !self
            .db
            .transition_version(domain.id, version, VersionStatus::HeldBack, to)
            .await?
        {
            return Err(not_held_back());
        }
        if to == VersionStatus::Promoted
            && let Err(e) = self
                .registry
                .move_alias(&domain.spec.name, PRODUCTION, champion, version, by, reason)
                .await
        {
            // A held-back version was never live: if the history has it now, this move
            // landed although the store answered with an error.
            let landed = self
                .registry
                .alias_history(&domain.spec.name, PRODUCTION)
                .await?
                .iter()
                .any(|m| m.to == version.as_str());
            if !landed {
                self.db
                    .transition_version(domain.id, version, to, VersionStatus::HeldBack)
                    .await?;
                return Err(e.into());
            }
        }
        // Held back still: the status and metrics stay as they are, only the audit log hears
        // of the second look (a write here could undo a concurrent promotion).
        if to != VersionStatus::HeldBack {
            self.db
                .record_version(domain.id, version, to, summary)
                .await?;
        }
        self.decided(
            domain,
            (by, "gate_decision", reason),
            version,
            Some(summary),
        )
        .await?;
        Ok(to)
    }

    /// A steward rejects a version awaiting approval.
    pub async fn reject(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        by: &str,
        reason: &str,
    ) -> Result<()> {
        self.claim(domain, version, VersionStatus::Rejected).await?;
        self.decided(domain, (by, "reject", reason), version, None)
            .await
    }

    /// A steward promotes a version the gate held back, over the gate, with a reason: claimed
    /// from `held_back` (of two overrides, one wins), production moves to it from `champion`,
    /// the version it was measured against (compare-and-swap: a promotion that landed
    /// meanwhile is never replaced by a version not compared with it), and the move is
    /// audited as `override`. If production did not move, the version is held back again.
    pub async fn override_hold(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        champion: Option<&VersionId>,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove> {
        let claimed = self
            .db
            .transition_version(
                domain.id,
                version,
                VersionStatus::HeldBack,
                VersionStatus::Promoted,
            )
            .await?;
        if !claimed {
            return Err(PromotionError::NotHeldBack {
                domain: domain.spec.name.to_string(),
                version: version.clone(),
            });
        }
        let name = &domain.spec.name;
        let moved = match self
            .registry
            .move_alias(name, PRODUCTION, champion, version, by, reason)
            .await
        {
            Ok(moved) => moved,
            Err(e) => {
                // A held-back version was never live: if the history has it now, this move
                // landed although the store answered with an error.
                let landed = self
                    .registry
                    .alias_history(name, PRODUCTION)
                    .await?
                    .into_iter()
                    .find(|m| m.to == version.as_str());
                match landed {
                    Some(moved) => moved,
                    None => {
                        self.db
                            .transition_version(
                                domain.id,
                                version,
                                VersionStatus::Promoted,
                                VersionStatus::HeldBack,
                            )
                            .await?;
                        return Err(e.into());
                    }
                }
            }
        };
        self.audit_move(domain, "override", &moved, by, reason)
            .await?;
        Ok(moved)
    }

    /// Points production back at `target`, a version that was live before.
    pub async fn rollback(
        &self,
        domain: &DomainRow,
        target: &VersionRow,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove> {
        let name = &domain.spec.name;
        let version = &target.version;
        if target.status != VersionStatus::Promoted {
            return Err(PromotionError::NeverPromoted {
                domain: name.to_string(),
                version: version.clone(),
                status: target.status,
            });
        }
        let history = self.registry.alias_history(name, PRODUCTION).await?;
        let current = history.last().map(|m| VersionId(m.to.clone()));
        if current.as_ref() == Some(version) {
            return Err(PromotionError::AlreadyProduction(version.clone()));
        }
        // `promoted` but never live: an approval has claimed it and not moved production yet.
        // Moving production there now could strand it on a version whose approval then fails
        // and goes back to `pending_approval`.
        if !history.iter().any(|m| m.to == version.as_str()) {
            return Err(PromotionError::NotYetLive {
                domain: name.to_string(),
                version: version.clone(),
            });
        }
        self.move_audited(
            domain,
            PRODUCTION,
            current,
            version,
            (by, reason, "rollback"),
        )
        .await
    }

    /// Refuses `production`, which moves only through the gate, approval and rollback.
    pub fn movable_by_hand(alias: &str) -> Result<()> {
        // Alias names are case-sensitive in the registry; `Production` would read as
        // production to a person and must not become a second, hand-moved one.
        if alias.eq_ignore_ascii_case(PRODUCTION) {
            return Err(PromotionError::ProductionByHand);
        }
        Ok(())
    }

    /// Moves an alias other than production (`staging`, `canary`, a pin) to `to`: a
    /// compare-and-swap on `expected` (`None`: whatever it points at now), audited.
    pub async fn move_by_hand(
        &self,
        domain: &DomainRow,
        alias: &str,
        expected: Option<Option<VersionId>>,
        to: &VersionId,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove> {
        Self::movable_by_hand(alias)?;
        let name = &domain.spec.name;
        let expected = match expected {
            Some(expected) => expected,
            None => self
                .registry
                .resolve(name, alias)
                .await?
                .map(|m| VersionId(m.to)),
        };
        self.move_audited(domain, alias, expected, to, (by, reason, "alias_move"))
            .await
    }

    /// Moves a version out of `pending_approval`; of two concurrent claims, one wins.
    async fn claim(
        &self,
        domain: &DomainRow,
        version: &VersionId,
        to: VersionStatus,
    ) -> Result<()> {
        let claimed = self
            .db
            .transition_version(domain.id, version, VersionStatus::PendingApproval, to)
            .await?;
        if !claimed {
            return Err(PromotionError::NotPending {
                domain: domain.spec.name.to_string(),
                version: version.clone(),
            });
        }
        Ok(())
    }

    /// Moves production to `version` for the first time (the gate's promotion or an approval).
    /// A move that an earlier attempt made, or that landed although the store answered with an
    /// error, is found in the history and not made again: production reaches a version first
    /// only this way, so a move to it in the history is this promotion's own.
    async fn first_move(
        &self,
        domain: &DomainName,
        version: &VersionId,
        by: &str,
        reason: &str,
    ) -> Result<AliasMove, RegistryError> {
        let landed =
            |history: Vec<AliasMove>| history.into_iter().find(|m| m.to == version.as_str());
        let history = self.registry.alias_history(domain, PRODUCTION).await?;
        let current = history.last().map(|m| VersionId(m.to.clone()));
        if let Some(earlier) = landed(history) {
            return Ok(earlier);
        }
        match self
            .registry
            .move_alias(domain, PRODUCTION, current.as_ref(), version, by, reason)
            .await
        {
            Ok(moved) => Ok(moved),
            Err(e) => match landed(self.registry.alias_history(domain, PRODUCTION).await?) {
                Some(moved) => Ok(moved),
                None => Err(e),
            },
        }
    }

    /// Moves `alias` from `expected` to `to` (compare-and-swap) and writes the audit row; the
    /// last argument is `(actor, reason, audit action)`.
    async fn move_audited(
        &self,
        domain: &DomainRow,
        alias: &str,
        expected: Option<VersionId>,
        to: &VersionId,
        (by, reason, action): (&str, &str, &str),
    ) -> Result<AliasMove> {
        let moved = self
            .registry
            .move_alias(&domain.spec.name, alias, expected.as_ref(), to, by, reason)
            .await?;
        self.audit_move(domain, action, &moved, by, reason).await?;
        Ok(moved)
    }

    async fn audit_move(
        &self,
        domain: &DomainRow,
        action: &str,
        moved: &AliasMove,
        by: &str,
        reason: &str,
    ) -> Result<()> {
        let data = serde_json::to_value(Moved {
            alias: &moved.alias,
            from: moved.from.as_deref(),
            to: &moved.to,
        })
        .expect("json");
        let to = VersionId(moved.to.clone());
        self.decided(domain, (by, action, reason), &to, Some(&data))
            .await
    }

    /// Writes a decision's audit row, then one structured log line for it (`decision`
    /// target), so the log tells an operator what the audit log tells a steward.
    async fn decided(
        &self,
        domain: &DomainRow,
        (by, action, reason): (&str, &str, &str),
        version: &VersionId,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        self.db
            .audit(domain.id, by, action, Some(version), reason, data)
            .await?;
        tracing::info!(
            target: "flywheel::decision",
            domain = %domain.spec.name,
            version = %version,
            action,
            actor = by,
            reason,
            "{action} of {}/{version} by {by}",
            domain.spec.name
        );
        Ok(())
    }
}

//! Promotion against a real database (SQLite) and registry (local disk): the gate's moves,
//! approvals, rollbacks, and the invariant that production points only at promoted versions
//! however approvals and rollbacks race.

use flywheel_db::Db;
use flywheel_domain::{
    CorrectionDraft, DomainName, DomainSpec, Policy, Task, Trigger, VersionId, VersionStatus,
};
use flywheel_promotion::{PRODUCTION, Promotion, PromotionError, Verdict};
use flywheel_registry::Registry;

struct World {
    db: Db,
    registry: Registry,
    domain: flywheel_db::DomainRow,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("flywheel.db"))
            .await
            .unwrap();
        let registry = Registry::local(&dir.path().join("registry")).unwrap();
        let spec = DomainSpec {
            name: DomainName::parse("banking").unwrap(),
            task: Task::Classification,
            base_model: "models/minilm".into(),
            labels: vec!["refund".into()],
            policy: Policy::default(),
            training: Default::default(),
            out_of_scope_label: None,
            serving: Default::default(),
            sources: Vec::new(),
        };
        let domain = db.create_domain(&spec).await.unwrap();
        let row = CorrectionDraft {
            input: Some("refund please".into()),
            expected: Some("refund".into()),
            ..Default::default()
        }
        .validate(&spec, 1_000)
        .unwrap();
        db.insert_corrections(domain.id, &[row]).await.unwrap();
        Self {
            db,
            registry,
            domain,
            _dir: dir,
        }
    }

    fn promotion(&self) -> Promotion<'_> {
        Promotion::new(&self.db, &self.registry)
    }

    /// A version published to the registry, its status recorded as the gate left it.
    async fn publish(&self, verdict: Verdict) -> VersionId {
        let job = self
            .db
            .try_create_job(self.domain.id, Trigger::Manual, 0)
            .await
            .unwrap()
            .expect("a job");
        self.db
            .finish_job(&job, flywheel_domain::JobStatus::Succeeded, None)
            .await
            .unwrap();
        let version = self.db.reserve_version(self.domain.id, &job).await.unwrap();
        self.registry
            .publish(
                &self.domain.spec.name,
                &version,
                vec![("adapter_model.safetensors".into(), b"weights".to_vec())],
                serde_json::json!({}),
            )
            .await
            .unwrap();
        let outcome = self
            .promotion()
            .carry_out(&self.domain.spec.name, &version, verdict, "gate")
            .await
            .unwrap();
        assert!(outcome.refused.is_none(), "{outcome:?}");
        self.promotion()
            .record_gate(
                &self.domain,
                &version,
                outcome.status,
                "gate",
                &serde_json::json!({}),
            )
            .await
            .unwrap();
        version
    }

    async fn status(&self, version: &VersionId) -> VersionStatus {
        self.db
            .version(self.domain.id, version)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    async fn rollback(&self, to: &VersionId) -> Result<(), PromotionError> {
        let target = self.db.version(self.domain.id, to).await.unwrap().unwrap();
        self.promotion()
            .rollback(&self.domain, &target, "sam", "hammer")
            .await
            .map(drop)
    }

    async fn production(&self) -> Option<VersionId> {
        self.promotion()
            .production(&self.domain.spec.name)
            .await
            .unwrap()
    }

    /// Production points at a promoted version, and so did every move it ever made.
    async fn assert_production_is_promoted(&self) {
        let history = self
            .registry
            .alias_history(&self.domain.spec.name, PRODUCTION)
            .await
            .unwrap();
        for mv in history {
            let version = VersionId(mv.to);
            assert_eq!(
                self.status(&version).await,
                VersionStatus::Promoted,
                "production moved to {version} (generation {})",
                mv.generation
            );
        }
    }
}

#[tokio::test]
async fn the_gate_promotes_once_however_often_its_stage_runs() {
    let world = World::new().await;
    let v1 = world.publish(Verdict::Promote).await;
    // A retried publish stage carries the verdict out again: production does not move twice.
    let again = world
        .promotion()
        .carry_out(&world.domain.spec.name, &v1, Verdict::Promote, "gate")
        .await
        .unwrap();
    assert_eq!(again.status, VersionStatus::Promoted);
    let history = world
        .registry
        .alias_history(&world.domain.spec.name, PRODUCTION)
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    let held = world.publish(Verdict::HoldBack).await;
    let waiting = world.publish(Verdict::AwaitApproval).await;
    assert_eq!(world.production().await, Some(v1.clone()));
    assert_eq!(world.status(&held).await, VersionStatus::HeldBack);
    assert_eq!(world.status(&waiting).await, VersionStatus::PendingApproval);
    let log: Vec<String> = world
        .db
        .audit_log(world.domain.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(log, ["gate_decision"; 3]);
}

#[tokio::test]
async fn a_rollback_never_lands_on_a_version_whose_approval_is_under_way() {
    let world = World::new().await;
    let v1 = world.publish(Verdict::Promote).await;
    let v2 = world.publish(Verdict::AwaitApproval).await;
    // The window inside an approval: the claim is made, production has not moved yet.
    world
        .db
        .transition_version(
            world.domain.id,
            &v2,
            VersionStatus::PendingApproval,
            VersionStatus::Promoted,
        )
        .await
        .unwrap();
    let err = world.rollback(&v2).await.unwrap_err();
    assert!(matches!(err, PromotionError::NotYetLive { .. }), "{err:?}");
    assert_eq!(world.production().await, Some(v1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_racing_rollbacks_leave_production_on_a_promoted_version() {
    let world = &World::new().await;
    let mut live = vec![world.publish(Verdict::Promote).await];
    live.push(world.publish(Verdict::Promote).await);
    for round in 0..12 {
        let pending = world.publish(Verdict::AwaitApproval).await;
        let approve = async {
            world
                .promotion()
                .approve(&world.domain, &pending, "dana", "looks right")
                .await
        };
        // Rollbacks to the version being approved, and to older ones so that the approval's
        // compare-and-swap sometimes loses and its claim is given back.
        let rollbacks = futures::future::join_all((0..16).map(|i| {
            let to = if i % 2 == 0 {
                pending.clone()
            } else {
                live[i % live.len()].clone()
            };
            async move { world.rollback(&to).await }
        }));
        let (approved, rolled) = futures::join!(approve, rollbacks);
        for r in rolled {
            match r {
                Ok(())
                | Err(
                    PromotionError::AlreadyProduction(_)
                    | PromotionError::NotYetLive { .. }
                    | PromotionError::NeverPromoted { .. }
                    | PromotionError::Registry(flywheel_registry::RegistryError::AliasConflict {
                        ..
                    }),
                ) => {}
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
        match approved {
            Ok(_) => {
                assert_eq!(world.status(&pending).await, VersionStatus::Promoted);
                live.push(pending);
            }
            Err(PromotionError::Registry(flywheel_registry::RegistryError::AliasConflict {
                ..
            })) => {
                assert_eq!(
                    world.status(&pending).await,
                    VersionStatus::PendingApproval,
                    "round {round}: a lost approval gives its claim back"
                );
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
        world.assert_production_is_promoted().await;
    }
}

//! The repository's behaviour on both databases, and schema changes against databases that
//! already hold data.
//!
//! Every behaviour test runs on SQLite and on PostgreSQL (`FLYWHEEL_TEST_POSTGRES`, which
//! `.ci/services` starts); without that variable the PostgreSQL half fails, saying so.

use std::borrow::Cow;
use std::collections::BTreeSet;

use flywheel_db::Db;
use flywheel_domain::{
    CorrectionDraft, DomainName, DomainSpec, JobStatus, Policy, Role, Task, Trigger,
};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;

/// An instance's database as it was before migration `upto + 1`, holding one audited decision.
async fn database_at(path: &std::path::Path, upto: i64) {
    let pool = sqlx::SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    let all = sqlx::migrate!("../../migrations/sqlite");
    let mut old = Migrator {
        migrations: Cow::Owned(all.iter().filter(|m| m.version <= upto).cloned().collect()),
        ..Migrator::DEFAULT
    };
    old.dangerous_set_table_name("_app_migrations");
    old.run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO domains (id, name, task, base_model, labels, policy, created_at)
         VALUES (7, 'banking', 'classification', 'm', '[]', '{}', '2026-01-01T00:00:00Z')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO audit_log (id, domain_id, at, actor, action, version, reason, data)
         VALUES (41, 7, '2026-01-02T00:00:00Z', 'dana', 'approve', 'v1', 'looks right', '{\"k\": 1}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test]
async fn rebuilding_the_audit_log_keeps_its_rows_ids_and_append_only_triggers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flywheel.db");
    database_at(&path, 3).await;

    let db = Db::open_sqlite(&path).await.unwrap();
    let log = db.audit_log(7).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].id, log[0].actor.as_str(), log[0].reason.as_str()),
        (41, "dana", "looks right")
    );
    assert_eq!(log[0].data, Some(serde_json::json!({"k": 1})));

    db.audit(7, "dana", "alias_move", None, "canary", None)
        .await
        .unwrap();
    assert!(
        db.audit(7, "dana", "teleport", None, "x", None)
            .await
            .is_err()
    );

    let pool = sqlx::SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
        .await
        .unwrap();
    for statement in [
        "UPDATE audit_log SET reason = 'rewritten'",
        "DELETE FROM audit_log",
    ] {
        let err = sqlx::query(statement).execute(&pool).await.unwrap_err();
        assert!(
            err.to_string().contains("append-only"),
            "{statement}: {err}"
        );
    }
}

/// A fresh, migrated database of each kind.
async fn databases() -> Vec<(Db, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Db::open_sqlite(&dir.path().join("flywheel.db"))
        .await
        .unwrap();
    let server = std::env::var("FLYWHEEL_TEST_POSTGRES").expect(
        "FLYWHEEL_TEST_POSTGRES names a PostgreSQL server to test against: run eval \"$(.ci/services)\" first",
    );
    let name = format!("flywheel_db_{}", uuid::Uuid::new_v4().simple());
    let url = Db::create_postgres_database(&server, &name).await.unwrap();
    let postgres = Db::open_postgres(&url).await.unwrap();
    vec![(sqlite, dir), (postgres, tempfile::tempdir().unwrap())]
}

fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        name: DomainName::parse(name).unwrap(),
        task: Task::Classification,
        base_model: "models/minilm".into(),
        labels: vec!["card_lost".into(), "refund".into()],
        policy: Policy::default(),
        training: Default::default(),
        out_of_scope_label: None,
        serving: Default::default(),
        sources: Vec::new(),
    }
}

fn correction(
    spec: &DomainSpec,
    input: &str,
    expected: &str,
    client_id: Option<&str>,
) -> flywheel_domain::Correction {
    CorrectionDraft {
        client_id: client_id.map(str::to_owned),
        input: Some(input.into()),
        expected: Some(expected.into()),
        ..Default::default()
    }
    .validate(spec, 10_000)
    .unwrap()
}

#[tokio::test]
async fn domains_corrections_and_tokens_behave_the_same_on_both_databases() {
    for (db, _dir) in databases().await {
        let which = db.backend();
        let banking = spec("banking");
        let row = db.create_domain(&banking).await.unwrap();
        assert!(
            matches!(
                db.create_domain(&banking).await,
                Err(flywheel_db::DbError::DomainExists(_))
            ),
            "{which}"
        );
        let read = db.domain("banking").await.unwrap().unwrap();
        assert_eq!((read.id, &read.spec), (row.id, &banking), "{which}");
        // Timestamps keep microseconds on both.
        assert_eq!(read.created_at, row.created_at, "{which}");

        let batch: Vec<_> = (0..250)
            .map(|i| {
                correction(
                    &banking,
                    &format!("lost card {i}"),
                    "card_lost",
                    Some(&format!("c{i}")),
                )
            })
            .collect();
        let first = db.insert_corrections(row.id, &batch).await.unwrap();
        assert_eq!((first.accepted, first.duplicates), (250, 0), "{which}");
        // A retry of the same rows and a same-content row under a new client id: all duplicates.
        let mut again = batch[..10].to_vec();
        again.push(correction(
            &banking,
            "lost card 3",
            "card_lost",
            Some("other"),
        ));
        let second = db.insert_corrections(row.id, &again).await.unwrap();
        assert_eq!((second.accepted, second.duplicates), (0, 11), "{which}");
        let (train, holdout) = db.correction_counts(row.id).await.unwrap();
        assert_eq!(train + holdout, 250, "{which}");
        let all = db.corrections(row.id, i64::MAX, None).await.unwrap();
        let held = db
            .corrections(row.id, i64::MAX, Some(flywheel_domain::Split::Holdout))
            .await
            .unwrap();
        assert_eq!((all.len(), held.len() as i64), (250, holdout), "{which}");
        assert!(all.windows(2).all(|w| w[0].id < w[1].id), "{which}");

        let token = db
            .create_token("ops", Role::Steward, &["banking".into()], "h1", "admin")
            .await
            .unwrap();
        assert_eq!(token.domains, vec!["banking".to_string()], "{which}");
        assert!(db.revoke_token(token.id).await.unwrap(), "{which}");
        assert!(!db.revoke_token(token.id).await.unwrap(), "{which}");
        assert!(
            db.token_by_hash("h1")
                .await
                .unwrap()
                .unwrap()
                .revoked_at
                .is_some(),
            "{which}"
        );

        db.audit(
            row.id,
            "dana",
            "approve",
            None,
            "fine",
            Some(&serde_json::json!({"k": 1})),
        )
        .await
        .unwrap();
        assert!(
            db.audit(row.id, "dana", "teleport", None, "x", None)
                .await
                .is_err(),
            "{which}"
        );
        let log = db.audit_log(row.id).await.unwrap();
        assert_eq!(log.len(), 1, "{which}");
        assert_eq!(log[0].data, Some(serde_json::json!({"k": 1})), "{which}");
    }
}

#[tokio::test]
async fn racing_schedulers_workers_and_publishers_never_double_up() {
    for (db, _dir) in databases().await {
        let which = db.backend();
        let banking = spec("banking");
        let row = db.create_domain(&banking).await.unwrap();
        let batch: Vec<_> = (0..20)
            .map(|i| correction(&banking, &format!("refund please {i}"), "refund", None))
            .collect();
        db.insert_corrections(row.id, &batch).await.unwrap();

        // Sixteen schedulers at once: one job.
        let created: Vec<_> = futures::future::join_all(
            (0..16).map(|_| db.try_create_job(row.id, Trigger::NewCorrections, 1)),
        )
        .await
        .into_iter()
        .filter_map(Result::unwrap)
        .collect();
        assert_eq!(created.len(), 1, "{which}: {created:?}");
        let job = &created[0];
        let state = db.trigger_state(row.id, row.created_at).await.unwrap();
        assert!(state.in_flight, "{which}");
        assert_eq!(state.new_corrections, 0, "{which}");

        // Sixteen workers claim it: one wins.
        let claims = futures::future::join_all((0..16).map(|_| db.claim_job(job))).await;
        let won = claims.into_iter().filter(|c| *c.as_ref().unwrap()).count();
        assert_eq!(won, 1, "{which}");
        assert_eq!(
            db.job(job).await.unwrap().unwrap().status,
            JobStatus::Running,
            "{which}"
        );

        // A lease of zero: the job's worker is "gone", it goes back to the queue.
        let (requeued, failed) = db
            .reclaim_stale_jobs(std::time::Duration::ZERO, 3)
            .await
            .unwrap();
        assert_eq!((requeued.len(), failed.len()), (1, 0), "{which}");
        assert_eq!(
            db.unenqueued_jobs().await.unwrap(),
            vec![job.clone()],
            "{which}"
        );
        assert!(db.claim_job(job).await.unwrap(), "{which}");
        assert!(
            db.finish_job(job, JobStatus::Succeeded, None)
                .await
                .unwrap(),
            "{which}"
        );
        assert!(!db.cancel_job(job, "late").await.unwrap(), "{which}");

        // Publishers of different jobs racing for version numbers each get their own.
        let mut jobs = vec![job.clone()];
        for i in 0..5 {
            db.insert_corrections(
                row.id,
                &[correction(&banking, &format!("more {i}"), "refund", None)],
            )
            .await
            .unwrap();
            let next = db
                .try_create_job(row.id, Trigger::Manual, 0)
                .await
                .unwrap()
                .unwrap();
            db.finish_job(&next, JobStatus::Succeeded, None)
                .await
                .unwrap();
            jobs.push(next);
        }
        let versions =
            futures::future::join_all(jobs.iter().map(|j| db.reserve_version(row.id, j))).await;
        let names: BTreeSet<_> = versions.into_iter().map(|v| v.unwrap().0).collect();
        assert_eq!(names.len(), jobs.len(), "{which}: {names:?}");
        // Reserving again for a job is idempotent.
        let again = db.reserve_version(row.id, &jobs[0]).await.unwrap();
        assert!(names.contains(&again.0), "{which}");
        assert_eq!(
            db.versions(row.id).await.unwrap().len(),
            jobs.len(),
            "{which}"
        );

        let counts = db.job_counts().await.unwrap();
        assert_eq!(
            counts,
            vec![("banking".to_owned(), JobStatus::Succeeded, 6)],
            "{which}"
        );
    }
}

/// Uploads that arrive together (and share a commit on SQLite) each get their own counts, and
/// a row sent by two of them is stored once, counted new for exactly one.
#[tokio::test]
async fn concurrent_uploads_share_commits_but_not_counts() {
    for (db, _dir) in databases().await {
        let which = db.backend();
        let banking = spec("banking");
        let row = db.create_domain(&banking).await.unwrap();
        // Eight uploads of 500 rows; neighbours overlap by 100.
        let uploads: Vec<Vec<_>> = (0..8)
            .map(|u| {
                (u * 400..u * 400 + 500)
                    .map(|i| correction(&banking, &format!("card {i} is lost"), "card_lost", None))
                    .collect()
            })
            .collect();
        let outcomes = futures::future::join_all(
            uploads
                .iter()
                .map(|rows| db.insert_corrections(row.id, rows)),
        )
        .await;
        let mut accepted = 0;
        for (rows, outcome) in uploads.iter().zip(outcomes) {
            let outcome = outcome.unwrap();
            assert_eq!(outcome.accepted + outcome.duplicates, rows.len(), "{which}");
            accepted += outcome.accepted;
        }
        let distinct = 7 * 400 + 500;
        assert_eq!(accepted, distinct, "{which}");
        let (train, holdout) = db.correction_counts(row.id).await.unwrap();
        assert_eq!((train + holdout) as usize, distinct, "{which}");
    }
}

/// A client id names one correction: other content under it is a conflict, listed and not
/// stored (the rest of the rows are, unless the batch is all-or-nothing), on both databases,
/// under racing uploads too.
#[tokio::test]
async fn a_client_id_reused_for_other_content_is_a_conflict_never_a_duplicate() {
    for (db, _dir) in databases().await {
        let which = db.backend();
        let banking = spec("banking");
        let row = db.create_domain(&banking).await.unwrap();
        let c = |input: &str, id: &str| correction(&banking, input, "refund", Some(id));
        let first = db
            .insert_corrections(row.id, &[c("one", "a")])
            .await
            .unwrap();
        assert_eq!((first.accepted, first.conflicts.len()), (1, 0), "{which}");

        // Kept what it could: the new row, the duplicate counted, the conflicts listed.
        let rows = [
            c("two", "b"),
            c("one", "a"),
            c("other", "a"),
            c("again", "b"),
            c("two", "b"),
        ];
        let outcome = db.insert_corrections(row.id, &rows).await.unwrap();
        assert_eq!((outcome.accepted, outcome.duplicates), (1, 2), "{which}");
        let listed: Vec<(usize, &str)> = outcome
            .conflicts
            .iter()
            .map(|c| (c.index, c.client_id.as_str()))
            .collect();
        assert_eq!(listed, [(2, "a"), (3, "b")], "{which}");

        // All or nothing: a conflict anywhere stores nothing of the batch.
        let rows = [c("three", "c"), c("more", "a")];
        let outcome = db
            .insert_corrections_all_or_nothing(row.id, &rows)
            .await
            .unwrap();
        assert_eq!(
            (
                outcome.accepted,
                outcome.duplicates,
                outcome.conflicts.len()
            ),
            (0, 0, 1),
            "{which}"
        );
        let (train, holdout) = db.correction_counts(row.id).await.unwrap();
        assert_eq!(train + holdout, 2, "{which}");

        // Racing uploads of other content under one new id: one stored, the rest conflicts.
        let racers: Vec<_> = (0..12)
            .map(|i| vec![c(&format!("race {i}"), "race")])
            .collect();
        let outcomes = futures::future::join_all(
            racers
                .iter()
                .map(|rows| db.insert_corrections_all_or_nothing(row.id, rows)),
        )
        .await;
        let won = outcomes
            .iter()
            .filter(|o| o.as_ref().unwrap().accepted == 1)
            .count();
        let lost = outcomes
            .iter()
            .filter(|o| o.as_ref().unwrap().conflicts.len() == 1)
            .count();
        assert_eq!((won, lost), (1, 11), "{which}: {outcomes:?}");
        let (train, holdout) = db.correction_counts(row.id).await.unwrap();
        assert_eq!(train + holdout, 3, "{which}");
    }
}

/// Webhook announcements on both databases: each audit row is announced once, whatever order
/// its id committed in, and the floor below which the search stops never passes a row that
/// was not announced.
#[tokio::test]
async fn every_audit_row_is_announced_once_and_the_floor_never_passes_an_unannounced_one() {
    use flywheel_db::NewDelivery;
    use flywheel_domain::VersionId;
    for (db, _dir) in databases().await {
        let domain = db.create_domain(&spec("banking")).await.unwrap();
        for i in 0..4 {
            let v = VersionId(format!("v{i}"));
            db.audit(domain.id, "dana", "reject", Some(&v), "r", None)
                .await
                .unwrap();
        }
        let ids: Vec<i64> = db
            .audit_to_announce(100)
            .await
            .unwrap()
            .iter()
            .map(|(domain, e)| {
                assert_eq!(domain, "banking");
                e.id
            })
            .collect();
        assert_eq!(ids.len(), 4);
        let delivery = |id: i64| NewDelivery {
            event_id: format!("audit-{id}"),
            event_type: "version.rejected".into(),
            url: "http://receiver.example/hook".into(),
            body: "{}".into(),
        };
        // The third row is left out, as if its commit came after the fourth's.
        assert!(
            db.enqueue_deliveries(
                &[ids[0], ids[1], ids[3]],
                &[],
                &[delivery(ids[0]), delivery(ids[1]), delivery(ids[3])]
            )
            .await
            .unwrap()
        );
        // Announcing a row twice writes nothing of the batch.
        assert!(
            !db.enqueue_deliveries(&[ids[2], ids[3]], &[], &[delivery(ids[2])])
                .await
                .unwrap()
        );
        let left = |db: Db| async move {
            db.audit_to_announce(100)
                .await
                .unwrap()
                .iter()
                .map(|(_, e)| e.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(left(db.clone()).await, [ids[2]]);
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        db.advance_announced(later).await.unwrap();
        assert_eq!(
            left(db.clone()).await,
            [ids[2]],
            "the floor passed an unannounced row"
        );
        assert!(
            db.enqueue_deliveries(&[ids[2]], &[], &[delivery(ids[2])])
                .await
                .unwrap()
        );
        db.advance_announced(later).await.unwrap();
        assert!(left(db.clone()).await.is_empty());
        db.audit(
            domain.id,
            "dana",
            "reject",
            Some(&VersionId("v9".into())),
            "r",
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            left(db.clone()).await.len(),
            1,
            "a row after the floor was missed"
        );

        // The outbox: due now, then after a failure not until its retry, then delivered.
        let now = chrono::Utc::now() + chrono::Duration::seconds(1);
        let due = db.due_deliveries(now, 20, 100).await.unwrap();
        assert_eq!(due.len(), 4);
        db.delivery_failed(due[0].id, later, "503").await.unwrap();
        db.delivery_done(due[1].id).await.unwrap();
        let due_now: Vec<i64> = db
            .due_deliveries(now, 20, 100)
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(due_now, [due[2].id, due[3].id]);
        let retried = db
            .due_deliveries(later + chrono::Duration::seconds(1), 20, 100)
            .await
            .unwrap();
        assert_eq!(retried[0].attempts, 1);
        assert!(
            db.due_deliveries(later, 1, 100)
                .await
                .unwrap()
                .iter()
                .all(|d| d.id != due[0].id)
        );
        let counts = db.outbox_counts().await.unwrap();
        assert_eq!((counts.pending, counts.delivered), (3, 1));
    }
}

/// An ingestion unit moves only with the rows read up to its new position, in one
/// transaction: of two readers racing from the same position exactly one stores its rows;
/// a finished unit takes nothing more. A source is claimed by one poll at a time.
#[tokio::test]
async fn an_ingestion_unit_moves_with_its_rows_or_not_at_all() {
    for (db, _dir) in databases().await {
        let which = db.backend();
        let banking = spec("banking");
        let row = db.create_domain(&banking).await.unwrap();
        let unit = db
            .ingest_unit(row.id, "logs", "a.jsonl", "etag-1", 10, "0")
            .await
            .unwrap();
        let again = db
            .ingest_unit(row.id, "logs", "a.jsonl", "etag-1", 10, "0")
            .await
            .unwrap();
        assert_eq!(unit.id, again.id, "{which}");
        let advance = |from: &str, to: &str, state: &'static str| flywheel_db::UnitAdvance {
            unit_id: unit.id,
            from: from.into(),
            to: to.into(),
            rejected: 1,
            dropped_pii: 0,
            errors: serde_json::json!([{"line": 2, "code": "invalid_field", "message": "x"}]),
            state,
        };
        let rows: Vec<_> = (0..2)
            .map(|i| correction(&banking, &format!("card {i} is lost"), "card_lost", None))
            .collect();
        let other: Vec<_> = (5..7)
            .map(|i| correction(&banking, &format!("card {i} is lost"), "card_lost", None))
            .collect();
        let (a, b) = tokio::join!(
            db.insert_corrections_advancing(row.id, &rows, advance("0", "3", "reading")),
            db.insert_corrections_advancing(row.id, &other, advance("0", "3", "reading")),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.unit_moved != b.unit_moved, "{which}: {a:?} {b:?}");
        let winner = if a.unit_moved { &b } else { &a };
        let loser = if a.unit_moved { &a } else { &b };
        assert_eq!((winner.accepted, loser.accepted), (2, 0), "{which}");
        let (train, holdout) = db.correction_counts(row.id).await.unwrap();
        assert_eq!(train + holdout, 2, "{which}");

        let done = db
            .insert_corrections_advancing(row.id, &[], advance("3", "4", "done"))
            .await
            .unwrap();
        assert!(!done.unit_moved, "{which}");
        let late = db
            .insert_corrections_advancing(row.id, &other, advance("4", "5", "done"))
            .await
            .unwrap();
        assert!(late.unit_moved, "{which}: a finished unit took more rows");
        let units = db.ingest_units(row.id, "logs", None, 10).await.unwrap();
        let u = &units[0];
        assert_eq!(
            (
                u.state.as_str(),
                u.position.as_str(),
                u.ingested,
                u.rejected
            ),
            ("done", "4", 2, 2),
            "{which}"
        );
        assert_eq!(u.errors[0]["line"], 2, "{which}");
        let totals = db.ingest_totals(row.id, "logs").await.unwrap();
        assert_eq!((totals.done, totals.ingested), (1, 2), "{which}");

        db.register_sources(row.id, &["logs"]).await.unwrap();
        let lease = std::time::Duration::from_secs(60);
        assert!(
            db.claim_source(row.id, "logs", "a", lease).await.unwrap(),
            "{which}"
        );
        assert!(
            !db.claim_source(row.id, "logs", "b", lease).await.unwrap(),
            "{which}"
        );
        // Only the claim's own poll extends it or lets it go.
        assert!(
            db.extend_source_claim(row.id, "logs", "a", lease)
                .await
                .unwrap()
        );
        assert!(
            !db.extend_source_claim(row.id, "logs", "b", lease)
                .await
                .unwrap()
        );
        db.finish_poll(row.id, "logs", "b", std::time::Duration::ZERO, true, None)
            .await
            .unwrap();
        assert!(
            db.source_states(row.id).await.unwrap()[0]
                .claimed_until
                .is_some()
        );
        db.finish_poll(row.id, "logs", "a", std::time::Duration::ZERO, true, None)
            .await
            .unwrap();
        let states = db.source_states(row.id).await.unwrap();
        assert!(states[0].caught_up_at.is_some() && states[0].claimed_until.is_none());
        assert!(
            db.claim_source(row.id, "logs", "c", lease).await.unwrap(),
            "{which}"
        );
    }
}

//! Schema changes against databases that already hold data.

use std::borrow::Cow;

use flywheel_db::Db;
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

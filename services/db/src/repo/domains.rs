//! Registered domains: name, task, base model, labels and policy.

use flywheel_domain::{DomainName, DomainSpec, Task};
use sqlx::types::Json;

use super::{Db, fetch_all, fetch_optional};
use crate::models::{DomainRow, PolicyVersion};
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

impl Db {
    pub async fn create_domain(&self, spec: &DomainSpec) -> Result<DomainRow> {
        let created_at = Stamp::now();
        // The domain and its policy's first version land together.
        let res: std::result::Result<i64, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO domains (name, task, base_model, labels, policy, out_of_scope_label, created_at, training, serving, sources)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
            )
            .bind(spec.name.as_str())
            .bind(spec.task.as_str())
            .bind(&spec.base_model)
            .bind(Json(&spec.labels))
            .bind(Json(&spec.policy))
            .bind(&spec.out_of_scope_label)
            .bind(created_at)
            .bind(Json(&spec.training))
            .bind(Json(&spec.serving))
            .bind(Json(&spec.sources))
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO domain_policies (domain_id, version, policy, actor, reason, at, training, labels, serving, sources)
                 VALUES ($1, 1, $2, 'registration', 'registered', $3, $4, $5, $6, $7)",
            )
            .bind(id)
            .bind(Json(&spec.policy))
            .bind(created_at)
            .bind(Json(&spec.training))
            .bind(Json(&spec.labels))
            .bind(Json(&spec.serving))
            .bind(Json(&spec.sources))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        }.await);
        match res {
            Ok(id) => Ok(DomainRow {
                id,
                spec: spec.clone(),
                created_at: created_at.0,
                policy_version: 1,
            }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::DomainExists(spec.name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn domain(&self, name: &str) -> Result<Option<DomainRow>> {
        fetch_optional!(
            self,
            domain_from_row,
            "SELECT * FROM domains WHERE name = $1",
            name
        )
    }

    pub async fn domains(&self) -> Result<Vec<DomainRow>> {
        fetch_all!(self, domain_from_row, "SELECT * FROM domains ORDER BY name")
    }

    /// Replaces the policy, training block, labels, serving block and out-of-scope label of the domain `from`
    /// was read as, as one
    /// change: the policy's version moves on by one, the new version is kept whole, and the
    /// audit log gets `domain_change` with before and after. `None` when the domain changed
    /// since `from` was read (the caller reads it again and retries).
    pub async fn change_domain(
        &self,
        from: &DomainRow,
        to: &DomainSpec,
        actor: &str,
        reason: &str,
    ) -> Result<Option<DomainRow>> {
        let at = Stamp::now();
        let version = from.policy_version + 1;
        let audit = serde_json::json!({
            "policy_version": version,
            "before": {"policy": from.spec.policy, "training": from.spec.training,
                "labels": from.spec.labels, "out_of_scope_label": from.spec.out_of_scope_label,
                "serving": from.spec.serving, "sources": from.spec.sources},
            "after": {"policy": to.policy, "training": to.training, "labels": to.labels,
                "out_of_scope_label": to.out_of_scope_label, "serving": to.serving,
                "sources": to.sources},
        });
        let changed: std::result::Result<bool, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE domains SET policy = $1, out_of_scope_label = $2, policy_version = $3,
                 training = $6, labels = $7, serving = $8, sources = $9
                 WHERE id = $4 AND policy_version = $5",
            )
            .bind(Json(&to.policy))
            .bind(&to.out_of_scope_label)
            .bind(version)
            .bind(from.id)
            .bind(from.policy_version)
            .bind(Json(&to.training))
            .bind(Json(&to.labels))
            .bind(Json(&to.serving))
            .bind(Json(&to.sources))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO domain_policies (domain_id, version, policy, actor, reason, at, training, labels, serving, sources)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(from.id)
            .bind(version)
            .bind(Json(&to.policy))
            .bind(actor)
            .bind(reason)
            .bind(at)
            .bind(Json(&to.training))
            .bind(Json(&to.labels))
            .bind(Json(&to.serving))
            .bind(Json(&to.sources))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
                 VALUES ($1, $2, $3, 'domain_change', NULL, $4, $5)",
            )
            .bind(from.id)
            .bind(at)
            .bind(actor)
            .bind(reason)
            .bind(Json(&audit))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        }.await);
        if !changed? {
            return Ok(None);
        }
        self.domain(from.spec.name.as_str()).await
    }

    /// Every version of the domain's policy, oldest first.
    pub async fn policy_history(&self, domain_id: i64) -> Result<Vec<PolicyVersion>> {
        fetch_all!(
            self,
            policy_from_row,
            "SELECT * FROM domain_policies WHERE domain_id = $1 ORDER BY version",
            domain_id
        )
    }
}

fn domain_from_row(r: &impl Cells) -> Result<DomainRow> {
    let name = r.text("name")?;
    let task = r.text("task")?;
    let spec = DomainSpec {
        name: DomainName::parse(&name).map_err(|e| DbError::Corrupt(e.to_string()))?,
        task: Task::parse(&task).ok_or_else(|| DbError::Corrupt(task.clone()))?,
        base_model: r.text("base_model")?,
        labels: r.json("labels")?,
        policy: r.json("policy")?,
        training: r.json("training")?,
        out_of_scope_label: r.opt_text("out_of_scope_label")?,
        serving: r.json("serving")?,
        sources: r.json("sources")?,
    };
    Ok(DomainRow {
        id: r.int("id")?,
        spec,
        created_at: r.time("created_at")?,
        policy_version: r.int("policy_version")?,
    })
}

fn policy_from_row(r: &impl Cells) -> Result<PolicyVersion> {
    Ok(PolicyVersion {
        version: r.int("version")?,
        policy: r.json("policy")?,
        training: r.json("training")?,
        labels: r.opt_json("labels")?,
        serving: r.json("serving")?,
        sources: r.json("sources")?,
        actor: r.text("actor")?,
        reason: r.text("reason")?,
        at: r.time("at")?,
    })
}

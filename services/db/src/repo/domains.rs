//! Registered domains: name, task, base model, labels and policy.

use flywheel_domain::{DomainName, DomainSpec, Task};
use sqlx::types::Json;

use super::{Db, fetch_all, fetch_optional};
use crate::models::DomainRow;
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

impl Db {
    pub async fn create_domain(&self, spec: &DomainSpec) -> Result<DomainRow> {
        let created_at = Stamp::now();
        let res: std::result::Result<i64, sqlx::Error> = with_pool!(self, pool => {
            sqlx::query_scalar(
                "INSERT INTO domains (name, task, base_model, labels, policy, out_of_scope_label, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(spec.name.as_str())
            .bind(spec.task.as_str())
            .bind(&spec.base_model)
            .bind(Json(&spec.labels))
            .bind(Json(&spec.policy))
            .bind(&spec.out_of_scope_label)
            .bind(created_at)
            .fetch_one(pool)
            .await
        });
        match res {
            Ok(id) => Ok(DomainRow {
                id,
                spec: spec.clone(),
                created_at: created_at.0,
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
        out_of_scope_label: r.opt_text("out_of_scope_label")?,
    };
    Ok(DomainRow {
        id: r.int("id")?,
        spec,
        created_at: r.time("created_at")?,
    })
}

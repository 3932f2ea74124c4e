//! `flywheel domains`: register, list, show and change domains.

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::{Decision, cell, data, print_json, print_table, read_json_file, say, when};
use crate::client::{Remote, segment};

#[derive(Subcommand, Debug)]
pub enum DomainsCommand {
    /// Register a domain from its JSON spec (admin): name, task, base_model, labels, policy, …
    /// (see `GET /openapi.json`).
    Create {
        /// The spec's file, or `-` for standard input.
        #[arg(long, short)]
        file: String,
    },
    /// The domains this token may see, with their corrections and production version.
    List,
    /// One domain: its whole spec and status, as JSON.
    Show {
        /// The domain.
        domain: String,
    },
    /// Change a domain: a JSON merge patch of its policy, training, labels, serving or
    /// sources (admin; a steward changes the gate and approval rules only). A new policy
    /// version, audited.
    Edit {
        /// The domain.
        domain: String,
        /// A field to set, as a dotted path and a JSON value (a bare word is a string):
        /// `policy.min_accuracy=0.8`, `training.n_epochs=4`, `policy.require_approval=true`.
        /// Repeat it.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// A JSON merge patch from a file (`-`: standard input); `--set` applies on top.
        #[arg(long, short)]
        file: Option<String>,
        #[command(flatten)]
        decision: Decision,
    },
    /// Every version of a domain's policy: who set it, when and why.
    History {
        /// The domain.
        domain: String,
    },
}

pub async fn run(remote: &Remote, command: DomainsCommand) -> anyhow::Result<()> {
    match command {
        DomainsCommand::Create { file } => {
            let spec = read_json_file(&file)?;
            let created = remote.post("/v1/domains", spec).await?;
            if remote.json {
                return print_json(&created);
            }
            say!(
                "domain `{}` registered ({}, {} labels)",
                cell(&created["name"]),
                cell(&created["task"]),
                created["labels"].as_array().map_or(0, Vec::len)
            );
            Ok(())
        }
        DomainsCommand::List => {
            let list = remote.get("/v1/domains").await?;
            // The list holds specs; each domain's own view adds its counts and production.
            let views = futures::future::try_join_all(data(&list).iter().map(|d| async move {
                let name = segment("domain", d["name"].as_str().unwrap_or_default())?;
                remote.get(&format!("/v1/domains/{name}")).await
            }))
            .await?;
            if remote.json {
                return print_json(&json!({"data": views}));
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|d| {
                    let stored = |split: &str| d["corrections"][split].as_i64().unwrap_or(0);
                    vec![
                        cell(&d["name"]),
                        cell(&d["task"]),
                        d["labels"].as_array().map_or(0, Vec::len).to_string(),
                        cell(&d["base_model"]),
                        format!("{}/{}", stored("train"), stored("holdout")),
                        cell(&d["production"]),
                        when(&d["created_at"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "TASK",
                    "LABELS",
                    "BASE MODEL",
                    "TRAIN/HOLDOUT",
                    "PRODUCTION",
                    "CREATED",
                ],
                &rows,
                "no domains (an admin registers one with `flywheel domains create --file spec.json`)",
            )?;
            Ok(())
        }
        DomainsCommand::Show { domain } => {
            let path = format!("/v1/domains/{}", segment("domain", &domain)?);
            print_json(&remote.get(&path).await?)
        }
        DomainsCommand::Edit {
            domain,
            set,
            file,
            decision,
        } => {
            let mut patch = match file {
                Some(file) => read_json_file(&file)?,
                None => json!({}),
            };
            if !patch.is_object() {
                bail!("the patch must be a JSON object such as {{\"policy\": {{…}}}}");
            }
            for assignment in &set {
                apply_set(&mut patch, assignment)?;
            }
            if patch.as_object().is_some_and(Map::is_empty) {
                bail!("nothing to change: give --set PATH=VALUE or --file PATCH.json");
            }
            for key in ["reason", "by"] {
                if patch.get(key).is_some() {
                    bail!("`{key}` is not a field of the domain: use --{key}");
                }
            }
            let path = format!("/v1/domains/{}", segment("domain", &domain)?);
            let before = remote.get(&path).await?["policy_version"].clone();
            let changed = remote.patch(&path, decision.body(remote, patch)).await?;
            if remote.json {
                return print_json(&changed);
            }
            if changed["policy_version"] == before {
                say!("domain `{domain}` unchanged: it already says that");
            } else {
                say!(
                    "domain `{domain}` changed: policy version {}",
                    cell(&changed["policy_version"])
                );
            }
            Ok(())
        }
        DomainsCommand::History { domain } => {
            let path = format!("/v1/domains/{}/policy/history", segment("domain", &domain)?);
            let list = remote.get(&path).await?;
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|v| {
                    vec![
                        cell(&v["version"]),
                        when(&v["at"]),
                        cell(&v["actor"]),
                        cell(&v["reason"]),
                    ]
                })
                .collect();
            print_table(&["VERSION", "AT", "BY", "REASON"], &rows, "no history")?;
            Ok(())
        }
    }
}

/// Applies `path.to.field=value` to a merge patch: the value as JSON where it parses, else
/// as a string (`--set policy.pii.action=drop`).
fn apply_set(patch: &mut Value, assignment: &str) -> anyhow::Result<()> {
    let (path, raw) = assignment.split_once('=').with_context(|| {
        format!("--set {assignment}: write PATH=VALUE, e.g. training.n_epochs=4")
    })?;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.trim().is_empty()) {
        bail!("--set {assignment}: the path needs names between its dots");
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    let mut at = patch;
    for key in &keys[..keys.len() - 1] {
        let object = at.as_object_mut().with_context(|| {
            format!("--set {assignment}: `{key}` is inside a value, not an object")
        })?;
        at = object
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    at.as_object_mut()
        .with_context(|| format!("--set {assignment}: its parent is a value, not an object"))?
        .insert(keys[keys.len() - 1].to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_builds_a_merge_patch() {
        let mut patch = json!({"policy": {"min_accuracy": 0.5}});
        apply_set(&mut patch, "policy.require_approval=true").unwrap();
        apply_set(&mut patch, "training.lora.r=16").unwrap();
        apply_set(&mut patch, "policy.pii.action=drop").unwrap();
        assert_eq!(
            patch,
            json!({
                "policy": {"min_accuracy": 0.5, "require_approval": true, "pii": {"action": "drop"}},
                "training": {"lora": {"r": 16}},
            })
        );
        assert!(apply_set(&mut patch, "policy").is_err());
        assert!(apply_set(&mut patch, "policy..x=1").is_err());
        assert!(apply_set(&mut patch, "policy.min_accuracy.x=1").is_err());
    }
}

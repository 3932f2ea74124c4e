//! `flywheel versions`: a domain's evaluated versions, their reports, and a steward's
//! decisions on them.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Decision, cell, data, percent, print_json, print_table, say, when};
use crate::client::{Remote, segment};

#[derive(Subcommand, Debug)]
pub enum VersionsCommand {
    /// Every evaluated version of a domain with its accuracy and status (`*`: production).
    List {
        /// The domain.
        domain: String,
    },
    /// A version's evaluation report, as published, with its decision trail.
    Report {
        /// The domain.
        domain: String,
        /// The version (`v3`; `flywheel versions list DOMAIN`).
        version: String,
        /// `md` (for reading), `html` (to sign and file) or `json` (also `--json`).
        #[arg(long, default_value = "md", value_parser = ["md", "html", "json"])]
        format: String,
    },
    /// Approve a version awaiting approval: production moves to it.
    Approve {
        /// The domain.
        domain: String,
        /// The version (`v3`; `flywheel versions list DOMAIN`).
        version: String,
        #[command(flatten)]
        decision: Decision,
    },
    /// Reject a version awaiting approval.
    Reject {
        /// The domain.
        domain: String,
        /// The version (`v3`; `flywheel versions list DOMAIN`).
        version: String,
        #[command(flatten)]
        decision: Decision,
    },
    /// Promote a held-back version over the gate's decision (audited as an override).
    Override {
        /// The domain.
        domain: String,
        /// The version (`v3`; `flywheel versions list DOMAIN`).
        version: String,
        #[command(flatten)]
        decision: Decision,
    },
    /// Apply the gate again to a held-back version under the domain's current policy.
    Reevaluate {
        /// The domain.
        domain: String,
        /// The version (`v3`; `flywheel versions list DOMAIN`).
        version: String,
        #[command(flatten)]
        decision: Decision,
    },
    /// Point production back at a version that was live.
    Rollback {
        /// The domain.
        domain: String,
        /// The version production goes back to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        decision: Decision,
    },
    /// Every gate decision, approval, rejection, rollback and alias move of a domain.
    Audit {
        /// The domain.
        domain: String,
    },
}

pub async fn run(remote: &Remote, command: VersionsCommand) -> anyhow::Result<()> {
    match command {
        VersionsCommand::List { domain } => {
            let path = format!("/v1/domains/{}/versions", segment("domain", &domain)?);
            let list = remote.get(&path).await?;
            if remote.json {
                return print_json(&list);
            }
            let production = list["production"].as_str().unwrap_or("");
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|v| {
                    let version = cell(&v["version"]);
                    let mark = if version == production { "*" } else { "" };
                    vec![
                        format!("{version}{mark}"),
                        cell(&v["status"]),
                        percent(&v["metrics"]["candidate_accuracy"]),
                        percent(&v["metrics"]["champion_accuracy"]),
                        cell(&v["job_id"]),
                        when(&v["created_at"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "VERSION", "STATUS", "ACCURACY", "CHAMPION", "JOB", "CREATED",
                ],
                &rows,
                "no versions yet: a job trains and evaluates one",
            )?;
            Ok(())
        }
        VersionsCommand::Report {
            domain,
            version,
            format,
        } => {
            let format = if remote.json { "json" } else { format.as_str() };
            let path = format!(
                "/v1/domains/{}/versions/{}/report?format={format}",
                segment("domain", &domain)?,
                segment("version", &version)?
            );
            let response = remote.send(remote.request(Method::GET, &path)).await?;
            let text = response.text().await?;
            super::emit(text.trim_end_matches('\n'))
        }
        VersionsCommand::Approve {
            domain,
            version,
            decision,
        } => decide(remote, &domain, &version, "approve", &decision).await,
        VersionsCommand::Reject {
            domain,
            version,
            decision,
        } => decide(remote, &domain, &version, "reject", &decision).await,
        VersionsCommand::Override {
            domain,
            version,
            decision,
        } => decide(remote, &domain, &version, "override", &decision).await,
        VersionsCommand::Reevaluate {
            domain,
            version,
            decision,
        } => decide(remote, &domain, &version, "reevaluate", &decision).await,
        VersionsCommand::Rollback {
            domain,
            to,
            decision,
        } => {
            let path = format!("/v1/domains/{}/rollback", segment("domain", &domain)?);
            let answer = remote
                .post(&path, decision.body(remote, json!({"to": to})))
                .await?;
            if remote.json {
                return print_json(&answer);
            }
            say!("`{domain}` production is {to} again");
            Ok(())
        }
        VersionsCommand::Audit { domain } => {
            let path = format!("/v1/domains/{}/audit", segment("domain", &domain)?);
            let list = remote.get(&path).await?;
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|a| {
                    vec![
                        when(&a["at"]),
                        cell(&a["action"]),
                        cell(&a["version"]),
                        cell(&a["actor"]),
                        cell(&a["reason"]),
                    ]
                })
                .collect();
            print_table(
                &["AT", "ACTION", "VERSION", "BY", "REASON"],
                &rows,
                "nothing yet",
            )?;
            Ok(())
        }
    }
}

/// A steward's decision on one version; prints the version's status after it.
async fn decide(
    remote: &Remote,
    domain: &str,
    version: &str,
    action: &str,
    decision: &Decision,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/domains/{}/versions/{}/{action}",
        segment("domain", domain)?,
        segment("version", version)?
    );
    let answer = remote.post(&path, decision.body(remote, json!({}))).await?;
    if remote.json {
        return print_json(&answer);
    }
    say!("{domain} {version}: {}", outcome(&answer));
    Ok(())
}

/// What a decision's answer says happened, in words.
fn outcome(answer: &Value) -> String {
    match (answer["status"].as_str(), answer["production"].as_str()) {
        (Some(status), Some(production)) => format!("{status}; production is {production}"),
        (Some(status), None) => status.to_owned(),
        _ => "done".to_owned(),
    }
}

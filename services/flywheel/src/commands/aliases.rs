//! `flywheel aliases`: where a domain's aliases point, moving the hand-moved ones, and
//! their history.

use clap::Subcommand;
use serde_json::{Value, json};

use super::{Decision, cell, data, print_json, print_table, say, when};
use crate::client::{Remote, segment};

#[derive(Subcommand, Debug)]
pub enum AliasesCommand {
    /// Where an alias points: version, files with sha256, base model, escalation threshold.
    Show {
        /// The domain.
        domain: String,
        /// `production`, `staging`, `canary` or a pin.
        #[arg(default_value = "production")]
        alias: String,
    },
    /// Move an alias other than production (staging, canary, a pin) to a published version.
    Move {
        /// The domain.
        domain: String,
        /// Any alias but production (`staging`, `canary`, a customer's pin).
        alias: String,
        /// The version it moves to.
        #[arg(long)]
        to: String,
        /// Move only if the alias points here now (`none`: only if it is unset).
        #[arg(long)]
        expected: Option<String>,
        #[command(flatten)]
        decision: Decision,
    },
    /// Every move of an alias: when, by whom, from, to, why.
    History {
        /// The domain.
        domain: String,
        /// `production`, `staging`, `canary` or a pin.
        #[arg(default_value = "production")]
        alias: String,
    },
}

pub async fn run(remote: &Remote, command: AliasesCommand) -> anyhow::Result<()> {
    match command {
        AliasesCommand::Show { domain, alias } => {
            let view = remote.get(&alias_path(&domain, &alias)?).await?;
            if remote.json {
                return print_json(&view);
            }
            say!(
                "{domain}@{alias} → {} (moved {} by {})",
                cell(&view["version"]),
                when(&view["moved_at"]),
                cell(&view["moved_by"])
            );
            say!("base model  {}", base_model(&view["base_model"]));
            if let Some(threshold) = view["escalation"]["threshold"].as_f64() {
                say!("escalate    below confidence {threshold:.3}");
            }
            let rows: Vec<Vec<String>> = view["files"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|f| vec![cell(&f["name"]), cell(&f["bytes"]), cell(&f["sha256"])])
                .collect();
            print_table(&["FILE", "BYTES", "SHA256"], &rows, "no files")?;
            Ok(())
        }
        AliasesCommand::Move {
            domain,
            alias,
            to,
            expected,
            decision,
        } => {
            if alias.eq_ignore_ascii_case("production") {
                anyhow::bail!(
                    "production moves through the gate or a steward: `flywheel versions \
                     approve|override|rollback`, not by hand"
                );
            }
            let mut body = json!({"to": to});
            if let Some(expected) = expected {
                body["expected"] = match expected.as_str() {
                    "none" => Value::Null,
                    v => Value::String(v.to_owned()),
                };
            }
            let moved = remote
                .put(&alias_path(&domain, &alias)?, decision.body(remote, body))
                .await?;
            if remote.json {
                return print_json(&moved);
            }
            say!(
                "{domain}@{alias}: {} → {}",
                cell(&moved["from"]),
                cell(&moved["to"])
            );
            Ok(())
        }
        AliasesCommand::History { domain, alias } => {
            let list = remote
                .get(&format!("{}/history", alias_path(&domain, &alias)?))
                .await?;
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|m| {
                    vec![
                        when(&m["at"]),
                        cell(&m["from"]),
                        cell(&m["to"]),
                        cell(&m["by"]),
                        cell(&m["reason"]),
                    ]
                })
                .collect();
            print_table(&["AT", "FROM", "TO", "BY", "REASON"], &rows, "never moved")?;
            Ok(())
        }
    }
}

fn alias_path(domain: &str, alias: &str) -> anyhow::Result<String> {
    Ok(format!(
        "/v1/domains/{}/aliases/{}",
        segment("domain", domain)?,
        segment("alias", alias)?
    ))
}

/// The base model of a manifest's lineage: its reference, or the whole value.
fn base_model(value: &Value) -> String {
    match (value["ref"].as_str(), value["content_id"].as_str()) {
        (Some(reference), Some(id)) if !reference.contains(id) => {
            format!("{reference} (content {})", &id[..id.len().min(12)])
        }
        (Some(reference), _) => reference.to_owned(),
        _ => cell(value),
    }
}

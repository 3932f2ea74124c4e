//! `flywheel tokens`: API tokens (admin only).

use clap::Subcommand;
use serde_json::json;

use super::{cell, data, print_json, print_table, say, when};
use crate::client::Remote;

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token and print its secret (shown this once; only its hash is stored).
    Create {
        /// A name unique among live tokens: who or what holds it.
        name: String,
        /// `admin`, `department` (sends corrections, runs jobs), `steward` (reviews and
        /// decides), or `serving` (predicts and sends feedback).
        #[arg(long, value_parser = ["admin", "department", "steward", "serving"])]
        role: String,
        /// A domain the token may act on (repeat it); every role but admin needs one.
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
    },
    /// List the tokens, without secrets.
    List,
    /// Change the domains a token may act on.
    Scope {
        /// The token's id (`flywheel tokens list`).
        id: i64,
        /// A domain the token may act on (repeat it).
        #[arg(long = "domain", value_name = "DOMAIN", required = true)]
        domains: Vec<String>,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id (`flywheel tokens list`).
        id: i64,
    },
}

pub async fn run(remote: &Remote, command: TokensCommand) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create {
            name,
            role,
            domains,
        } => {
            if role != "admin" && domains.is_empty() {
                anyhow::bail!(
                    "a {role} token acts on named domains: add --domain NAME (repeat it for more)"
                );
            }
            let created = remote
                .post(
                    "/v1/tokens",
                    json!({"name": name, "role": role, "domains": domains}),
                )
                .await?;
            if remote.json {
                return print_json(&created);
            }
            // The secret alone on stdout, so `export FLYWHEEL_TOKEN=$(flywheel tokens create …)`
            // works; what it is goes to stderr.
            eprintln!(
                "token {} `{}` ({}{}): keep the secret below, it is shown this once",
                created["id"],
                cell(&created["name"]),
                cell(&created["role"]),
                match cell(&created["domains"]).as_str() {
                    "-" => String::new(),
                    d => format!(" of {d}"),
                }
            );
            say!("{}", cell(&created["token"]));
            Ok(())
        }
        TokensCommand::List => {
            let list = remote.get("/v1/tokens").await?;
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|t| {
                    vec![
                        cell(&t["id"]),
                        cell(&t["name"]),
                        cell(&t["role"]),
                        cell(&t["domains"]),
                        when(&t["created_at"]),
                        cell(&t["created_by"]),
                    ]
                })
                .collect();
            print_table(
                &["ID", "NAME", "ROLE", "DOMAINS", "CREATED", "BY"],
                &rows,
                "no tokens",
            )?;
            Ok(())
        }
        TokensCommand::Scope { id, domains } => {
            let row = remote
                .patch(&format!("/v1/tokens/{id}"), json!({"domains": domains}))
                .await?;
            if remote.json {
                return print_json(&row);
            }
            say!(
                "token {id} `{}` now acts on {}",
                cell(&row["name"]),
                cell(&row["domains"])
            );
            Ok(())
        }
        TokensCommand::Revoke { id } => {
            remote.delete(&format!("/v1/tokens/{id}")).await?;
            say!("token {id} revoked");
            Ok(())
        }
    }
}

//! `flywheel jobs`: list, start, watch and cancel fine-tune jobs.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::{cell, data, print_json, print_table, read_json_file, say, when};
use crate::client::{Remote, segment};

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Jobs across the domains this token may see, newest first.
    List {
        /// Only this domain's jobs.
        #[arg(long)]
        domain: Option<String>,
        /// Only jobs in this state.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled"])]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Start a run of a domain now, on every correction so far.
    Start {
        /// The domain to train.
        domain: String,
        /// Overrides of the domain's training block, as JSON from a file (`-`: stdin):
        /// `{"n_epochs": 4, "lora": {"r": 16}}`.
        #[arg(long)]
        training: Option<String>,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job until it ends: stage, step, loss and time to go.
    Watch {
        /// The job's id (`flywheel jobs list`).
        id: String,
    },
    /// Cancel a queued or training job.
    Cancel {
        /// The job's id (`flywheel jobs list`).
        id: String,
    },
}

pub async fn run(remote: &Remote, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List {
            domain,
            status,
            limit,
        } => {
            let list = match &domain {
                // A domain's list is short (one row per run); its filters apply here.
                Some(d) => {
                    let mut list = remote
                        .get(&format!("/v1/domains/{}/jobs", segment("domain", d)?))
                        .await?;
                    if let Some(jobs) = list["data"].as_array_mut() {
                        jobs.retain(|j| status.as_ref().is_none_or(|s| j["status"] == **s));
                        jobs.truncate(limit);
                    }
                    list
                }
                None => {
                    let mut path = format!("/v1/jobs?limit={limit}");
                    if let Some(status) = &status {
                        path.push_str(&format!("&status={status}"));
                    }
                    remote.get(&path).await?
                }
            };
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = data(&list)
                .iter()
                .map(|j| {
                    vec![
                        cell(&j["id"]),
                        cell(&j["domain"]),
                        cell(&j["status"]),
                        cell(&j["stage"]),
                        cell(&j["trigger"]),
                        cell(&j["version"]),
                        when(&j["created_at"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "DOMAIN", "STATUS", "STAGE", "TRIGGER", "VERSION", "CREATED",
                ],
                &rows,
                "no jobs",
            )?;
            Ok(())
        }
        JobsCommand::Start {
            domain,
            training,
            watch,
        } => {
            let body = match training {
                Some(file) => json!({"training": read_json_file(&file)?}),
                None => json!({}),
            };
            let path = format!("/v1/domains/{}/jobs", segment("domain", &domain)?);
            let job = remote.post(&path, body).await?;
            if remote.json && !watch {
                return print_json(&job);
            }
            let id = cell(&job["id"]);
            eprintln!("job {id} queued for `{domain}`");
            if watch {
                follow(remote, &id).await
            } else {
                Ok(())
            }
        }
        JobsCommand::Watch { id } => follow(remote, &id).await,
        JobsCommand::Cancel { id } => {
            let path = format!("/v1/jobs/{}/cancel", segment("job id", &id)?);
            let job = remote.post(&path, json!({})).await?;
            if remote.json {
                return print_json(&job);
            }
            say!("job {id}: {}", cell(&job["status"]));
            Ok(())
        }
    }
}

/// Follows job `id` until it ends, printing its progress; an error unless it succeeded.
async fn follow(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let id = segment("job id", id)?;
    let mut progress = Progress::new();
    let mut after = 0;
    loop {
        let events = remote
            .get(&format!("/v1/jobs/{id}/events?after={after}"))
            .await?;
        for event in data(&events) {
            after = event["id"].as_i64().unwrap_or(after);
            progress.show(event);
        }
        let job = remote.get(&format!("/v1/jobs/{id}")).await?;
        progress.stage(&job);
        if matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            progress.finish();
            if remote.json {
                print_json(&job)?;
            } else {
                say!("{}", summary(&job));
            }
            return match job["status"].as_str() {
                Some("succeeded") => Ok(()),
                Some("failed") => bail!("job {id} failed: {}", cell(&job["error"])),
                _ => bail!("job {id} was cancelled"),
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A finished job in one line: what became of it.
fn summary(job: &Value) -> String {
    let decision = &job["decision"];
    let mut line = format!(
        "job {} {}: version {}",
        cell(&job["id"]),
        cell(&job["status"]),
        cell(&job["version"])
    );
    match decision["reason"].as_str() {
        Some(reason) => line.push_str(&format!(" — {reason}")),
        None if decision["awaiting_approval"] == true => {
            line.push_str(" — awaiting a steward's approval")
        }
        None => {}
    }
    line
}

/// A job's progress on stderr: on a terminal a bar (step, loss, tokens/s, time to go),
/// otherwise one line per event.
pub(crate) struct Progress {
    bar: ProgressBar,
    stage: String,
}

impl Progress {
    pub(crate) fn new() -> Self {
        let bar = ProgressBar::new(1).with_style(
            ProgressStyle::with_template("{prefix:>10} {bar:30} step {pos}/{len} {msg}")
                .expect("a valid template"),
        );
        Self {
            bar,
            stage: String::new(),
        }
    }

    /// Shows one job event: a training step moves the bar, anything else is a line.
    pub(crate) fn show(&mut self, event: &Value) {
        let message = event["message"].as_str().unwrap_or("");
        match event.get("data").filter(|_| event["kind"] == "metrics") {
            Some(d) if !self.bar.is_hidden() => {
                self.bar.set_length(d["total_steps"].as_u64().unwrap_or(1));
                self.bar.set_position(d["step"].as_u64().unwrap_or(0));
                self.bar.set_message(format!(
                    "loss {:.3}, {:.0} tokens/s, {:.0}s to go",
                    d["loss"].as_f64().unwrap_or(0.0),
                    d["tokens_per_second"].as_f64().unwrap_or(0.0),
                    d["eta_seconds"].as_f64().unwrap_or(0.0)
                ));
            }
            // Progress goes to stderr, like the bar: stdout holds the outcome (or its JSON).
            _ => self.bar.suspend(|| eprintln!("     · {message}")),
        }
    }

    /// Shows the job's stage beside the bar when it changes.
    pub(crate) fn stage(&mut self, job: &Value) {
        let stage = cell(&job["stage"]);
        if stage != self.stage {
            self.bar.set_prefix(stage.clone());
            self.stage = stage;
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

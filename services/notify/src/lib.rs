//! Webhooks: tells people's other tools what flywheel decided — a version awaiting approval,
//! promoted, held back or rejected, a rollback, a failed job — as signed JSON POSTs.
//!
//! Delivery is at least once through a durable outbox. Events come from the audit log (each
//! decision commits with its audit row) and from failed jobs, each not yet announced; the
//! outbox rows and the record of their announcement commit together, so a crash anywhere
//! loses no event, and a receiver dedupes by the event `id`. Deliveries are retried with
//! exponential backoff, across restarts.
//!
//! This crate owns the events' shape, their signature and the delivery loop. It must not
//! decide anything: it only reads what the database already says happened.

pub mod events;

use std::time::Duration;

use chrono::Utc;
use flywheel_db::{Db, DbError, Delivery, NewDelivery};
use flywheel_telemetry::Metrics;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;

pub use events::Event;

/// The header carrying `sha256=<hex HMAC-SHA256 of the body under the shared secret>`.
pub const SIGNATURE_HEADER: &str = "X-Flywheel-Signature";

#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Receivers of every domain's events (`--webhook`).
    pub webhooks: Vec<String>,
    /// Signs every body; receivers check it. Without one, bodies go unsigned.
    pub secret: Option<String>,
    /// Where people reach the console; the events' links start with it.
    pub public_url: String,
    /// How often the outbox is filled and tried.
    pub poll: Duration,
    /// The first retry's pause; each further one doubles, up to an hour.
    pub retry_base: Duration,
    /// Attempts before a delivery is given up (it stays in the table, with its last error).
    pub max_attempts: i64,
    /// Each attempt's deadline.
    pub timeout: Duration,
}

impl NotifyConfig {
    pub fn new(public_url: String) -> Self {
        Self {
            webhooks: Vec::new(),
            secret: None,
            public_url,
            poll: Duration::from_secs(2),
            retry_base: Duration::from_secs(5),
            max_attempts: 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The pause before attempt `attempts + 1`.
fn backoff(base: Duration, attempts: i64) -> Duration {
    let factor = 1u32 << attempts.clamp(0, 16) as u32;
    (base * factor).min(Duration::from_secs(3600))
}

pub struct Notifier {
    db: Db,
    metrics: Metrics,
    config: NotifyConfig,
    http: reqwest::Client,
    /// When the floor of the audit search last moved: it needs to only now and then, not on
    /// every round.
    floor_moved: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Notifier {
    pub fn new(db: Db, metrics: Metrics, config: NotifyConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with a timeout");
        Self {
            db,
            metrics,
            config,
            http,
            floor_moved: std::sync::Mutex::new(None),
        }
    }

    /// Fills and tries the outbox every `poll` until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "webhooks: will try again");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One round: new events into the outbox, then every due delivery tried once.
    pub async fn tick(&self) -> Result<(), DbError> {
        while self.collect().await? {}
        if self.floor_due() {
            // An audit row is settled once no transaction that wrote it can still be open.
            self.db
                .advance_announced(Utc::now() - chrono::Duration::minutes(10))
                .await?;
        }
        let due = self
            .db
            .due_deliveries(Utc::now(), self.config.max_attempts, 50)
            .await?;
        // Several at a time, so one receiver that times out does not hold up the others.
        let tried: Vec<_> = futures::stream::iter(due)
            .map(|d| async move {
                let outcome = self.post(&d).await;
                (d, outcome)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (d, outcome) in tried {
            let label = match outcome {
                Ok(()) => {
                    self.db.delivery_done(d.id).await?;
                    "delivered"
                }
                Err(why) => {
                    let retry = backoff(self.config.retry_base, d.attempts);
                    let at = Utc::now() + chrono::Duration::from_std(retry).unwrap_or_default();
                    tracing::info!(event = %d.event_id, url = %d.url, attempt = d.attempts + 1, %why, "webhook delivery failed; retrying later");
                    self.db.delivery_failed(d.id, at, &why).await?;
                    "failed"
                }
            };
            self.metrics
                .webhook_deliveries
                .with_label_values(&[d.event_type.as_str(), label])
                .inc();
        }
        Ok(())
    }

    /// Whether the floor should move this round: once a minute is plenty for a search that
    /// stays correct (only slower) however far behind the floor is.
    fn floor_due(&self) -> bool {
        let mut last = self.floor_moved.lock().expect("not poisoned");
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// One attempt at a delivery: `Err` says why it did not land.
    async fn post(&self, d: &Delivery) -> Result<(), String> {
        let mut request = self
            .http
            .post(&d.url)
            .header("content-type", "application/json")
            .header("x-flywheel-event", &d.event_type)
            .header("x-flywheel-delivery", &d.event_id)
            .body(d.body.clone());
        if let Some(secret) = &self.config.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, d.body.as_bytes()));
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the receiver answered {}", r.status())),
            Err(e) => Err(format!("could not reach the receiver: {e}")),
        }
    }

    /// Writes the next batch of events to the outbox with the record of their announcement;
    /// whether there may be more.
    async fn collect(&self) -> Result<bool, DbError> {
        const BATCH: i64 = 100;
        let entries = self.db.audit_to_announce(BATCH).await?;
        let failures = self.db.failures_to_announce(BATCH).await?;
        if entries.is_empty() && failures.is_empty() {
            return Ok(false);
        }
        let console = self.config.public_url.trim_end_matches('/');
        let mut events = Vec::new();
        for (domain, entry) in &entries {
            events.extend(events::from_audit(domain, entry, console));
        }
        events.extend(failures.iter().map(|j| events::from_failure(j, console)));
        let mut deliveries = Vec::new();
        let mut domain_hooks = std::collections::HashMap::new();
        for event in events {
            if !domain_hooks.contains_key(&event.domain) {
                let hooks = self
                    .db
                    .domain(&event.domain)
                    .await?
                    .map(|d| d.spec.policy.webhooks)
                    .unwrap_or_default();
                domain_hooks.insert(event.domain.clone(), hooks);
            }
            let body = serde_json::to_string(&event).expect("events are JSON");
            let mut urls: Vec<&String> = self.config.webhooks.iter().collect();
            urls.extend(&domain_hooks[&event.domain]);
            urls.sort();
            urls.dedup();
            for url in urls {
                deliveries.push(NewDelivery {
                    event_id: event.id.clone(),
                    event_type: event.kind.to_owned(),
                    url: url.clone(),
                    body: body.clone(),
                });
            }
        }
        let audit: Vec<i64> = entries.iter().map(|(_, e)| e.id).collect();
        let jobs: Vec<_> = failures.iter().map(|j| j.id.clone()).collect();
        // Another process may have announced some of these first; then the next round reads
        // what is left.
        self.db
            .enqueue_deliveries(&audit, &jobs, &deliveries)
            .await?;
        Ok(entries.len() as i64 == BATCH || failures.len() as i64 == BATCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_to_an_hour() {
        let base = Duration::from_secs(5);
        assert_eq!(backoff(base, 0), Duration::from_secs(5));
        assert_eq!(backoff(base, 3), Duration::from_secs(40));
        assert_eq!(backoff(base, 40), Duration::from_secs(3600));
    }
}

//! What a receiver is told: a decision from the audit log or a failed job as one JSON event,
//! with a link to its console page and a Slack-compatible `text`.

use flywheel_db::{AuditEntry, JobRow};
use serde::Serialize;

/// The event types a receiver may see.
pub const AWAITING_APPROVAL: &str = "version.awaiting_approval";
pub const PROMOTED: &str = "version.promoted";
pub const HELD_BACK: &str = "version.held_back";
pub const REJECTED: &str = "version.rejected";
pub const ROLLED_BACK: &str = "production.rolled_back";
pub const JOB_FAILED: &str = "job.failed";

/// One event, as sent.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Stable across redeliveries: a receiver drops an id it has seen.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub at: String,
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Who decided: the gate, a steward's token name, or the worker for a failed job.
    pub actor: String,
    pub reason: String,
    /// A steward overrode the gate.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub r#override: bool,
    /// The console page to open.
    pub url: String,
    /// One line for chat: an incoming-webhook URL of Slack (or anything that reads `text`)
    /// shows it as is.
    pub text: String,
}

/// The event an audit row announces, if any: decisions about versions do; policy changes,
/// relabels and hand moves of other aliases do not.
pub fn from_audit(domain: &str, e: &AuditEntry, console: &str) -> Option<Event> {
    let version = e.version.clone()?;
    let kind = match e.action.as_str() {
        "gate_decision" => {
            let d = &e.data.as_ref()?["decision"];
            match (
                d["promote"].as_bool()?,
                d["awaiting_approval"].as_bool().unwrap_or(false),
            ) {
                (true, true) => AWAITING_APPROVAL,
                (true, false) => PROMOTED,
                (false, _) => HELD_BACK,
            }
        }
        "approve" | "override" => PROMOTED,
        "reject" => REJECTED,
        "rollback" => ROLLED_BACK,
        _ => return None,
    };
    let url = format!("{console}/console/domains/{domain}/versions/{version}");
    let who = if e.action == "override" {
        format!("{} (over the gate)", e.actor)
    } else {
        e.actor.clone()
    };
    let headline = match kind {
        AWAITING_APPROVAL => format!("{domain} {version} awaits approval"),
        PROMOTED => format!("{domain} {version} is production, by {who}"),
        HELD_BACK => format!("{domain} {version} was held back"),
        REJECTED => format!("{domain} {version} was rejected by {who}"),
        _ => format!("{domain} production rolled back to {version} by {who}"),
    };
    let (headline, reason) = (slack_escape(&headline), slack_escape(&e.reason));
    Some(Event {
        id: format!("audit-{}", e.id),
        kind,
        at: e.at.to_rfc3339(),
        domain: domain.to_owned(),
        version: Some(version),
        job: None,
        actor: e.actor.clone(),
        reason: e.reason.clone(),
        r#override: e.action == "override",
        text: format!("{headline}: {reason} <{url}>"),
        url,
    })
}

/// Text as Slack reads it: `&`, `<` and `>` escaped, so a reason cannot mention `<!channel>`
/// or forge a link.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The event a failed job announces.
pub fn from_failure(job: &JobRow, console: &str) -> Event {
    let url = format!("{console}/console/domains/{}", job.domain);
    let error = job
        .error
        .clone()
        .unwrap_or_else(|| "no error recorded".into());
    Event {
        id: format!("job-{}-failed", job.id),
        kind: JOB_FAILED,
        at: job.finished_at.unwrap_or(job.created_at).to_rfc3339(),
        domain: job.domain.clone(),
        version: None,
        job: Some(job.id.to_string()),
        actor: "flywheel-worker".into(),
        text: format!(
            "{} job {} failed: {} <{url}>",
            job.domain,
            job.id,
            slack_escape(&error)
        ),
        reason: error,
        r#override: false,
        url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str, data: Option<serde_json::Value>) -> AuditEntry {
        AuditEntry {
            id: 7,
            at: chrono::Utc::now(),
            actor: "dana".into(),
            action: action.into(),
            version: Some("v3".into()),
            reason: "checked the flips".into(),
            data,
        }
    }

    #[test]
    fn decisions_become_events_and_other_audit_rows_do_not() {
        let gate = |promote: bool, wait: bool| {
            entry(
                "gate_decision",
                Some(
                    serde_json::json!({"decision": {"promote": promote, "awaiting_approval": wait}}),
                ),
            )
        };
        let kind = |e: &AuditEntry| from_audit("banking", e, "https://fw").map(|e| e.kind);
        assert_eq!(kind(&gate(true, true)), Some(AWAITING_APPROVAL));
        assert_eq!(kind(&gate(true, false)), Some(PROMOTED));
        assert_eq!(kind(&gate(false, false)), Some(HELD_BACK));
        assert_eq!(kind(&entry("reject", None)), Some(REJECTED));
        assert_eq!(kind(&entry("rollback", None)), Some(ROLLED_BACK));
        assert_eq!(kind(&entry("alias_move", None)), None);
        assert_eq!(kind(&entry("domain_change", None)), None);
        let over = from_audit("banking", &entry("override", None), "https://fw").unwrap();
        assert_eq!(over.kind, PROMOTED);
        assert!(over.r#override);
        assert_eq!(over.url, "https://fw/console/domains/banking/versions/v3");
        assert!(
            over.text.contains("over the gate") && over.text.contains(&over.url),
            "{}",
            over.text
        );
        assert_eq!(over.id, "audit-7");
        let mut loud = entry("reject", None);
        loud.reason = "<!channel> see <http://evil|here> & more".into();
        let text = from_audit("banking", &loud, "https://fw").unwrap().text;
        assert!(
            text.contains("&lt;!channel&gt; see &lt;http://evil|here&gt; &amp; more"),
            "{text}"
        );
        assert!(
            text.ends_with("<https://fw/console/domains/banking/versions/v3>"),
            "{text}"
        );
    }
}

//! Finding and redacting personal data in correction text, before anything is stored.
//!
//! Detection is deliberately conservative where a false positive costs training signal
//! (phone numbers need 9+ digits, so dates and amounts survive) and validated where a checksum
//! exists (card numbers by Luhn, IBANs by ISO 7064 mod 97). Counts are kept per kind; the
//! values never leave this module.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// A kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Iban,
    Card,
    NationalId,
    Phone,
}

impl PiiKind {
    pub const ALL: [PiiKind; 5] = [
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::Card,
        PiiKind::NationalId,
        PiiKind::Phone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Iban => "iban",
            PiiKind::Card => "card",
            PiiKind::NationalId => "national_id",
            PiiKind::Phone => "phone",
        }
    }

    fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::Card => "[CARD]",
            PiiKind::NationalId => "[NATIONAL_ID]",
            PiiKind::Phone => "[PHONE]",
        }
    }
}

/// What to do with personal data found in a correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    /// Store text as sent.
    Off,
    /// Replace each finding with its kind: `[EMAIL]`, `[CARD]`, …
    #[default]
    Replace,
    /// Keep the last four characters, star the rest: `************4242`.
    Mask,
    /// Store nothing of a correction that contains personal data; count it.
    Drop,
}

/// A domain's redaction policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiPolicy {
    #[serde(default)]
    pub action: PiiAction,
    /// The kinds to look for; all of them unless narrowed.
    #[serde(default = "all_kinds")]
    pub kinds: Vec<PiiKind>,
}

fn all_kinds() -> Vec<PiiKind> {
    PiiKind::ALL.to_vec()
}

impl Default for PiiPolicy {
    fn default() -> Self {
        Self {
            action: PiiAction::default(),
            kinds: all_kinds(),
        }
    }
}

/// How many findings of each kind; never the values.
pub type PiiCounts = BTreeMap<PiiKind, u32>;

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b").unwrap()
});
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b").unwrap());
static CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").unwrap());
/// US social security numbers and UK national insurance numbers.
static NATIONAL_ID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:\d{3}-\d{2}-\d{4}|[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D])\b").unwrap()
});
static UUID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b").unwrap()
});

static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\b)\d{2,4}(?:[ .-]?\d{2,4}){1,5}\b")
        .unwrap()
});

fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                (d * 2) % 9 + u32::from(d == 9) * 9
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban_valid(raw: &str) -> bool {
    // By character, not byte: the pattern's `\d` also matches non-ASCII digits (`０`), so a
    // byte offset could fall inside one.
    let compact: Vec<char> = raw.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rotated = compact[4..].iter().chain(&compact[..4]);
    let mut rem = 0u32;
    for c in rotated {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn is_finding(kind: PiiKind, m: &str) -> bool {
    match kind {
        PiiKind::Email | PiiKind::NationalId => true,
        PiiKind::Iban => iban_valid(m),
        PiiKind::Card => (13..=19).contains(&digits(m).len()) && luhn(&digits(m)),
        PiiKind::Phone => {
            let n = digits(m).len();
            (9..=15).contains(&n) || (m.starts_with('+') && n >= 7)
        }
    }
}

fn mask(m: &str) -> String {
    let n = m.chars().count();
    m.chars()
        .enumerate()
        .map(|(i, c)| {
            if i + 4 < n && c.is_alphanumeric() {
                '*'
            } else {
                c
            }
        })
        .collect()
}

/// Redacts `text` under `policy`, adding what it found to `counts`. With `Off`, returns the
/// text unchanged and counts nothing. With `Drop`, redacts as `Replace` would (so the text is
/// safe whatever the caller does next); the caller drops rows whose counts are non-zero.
pub fn redact(text: &str, policy: &PiiPolicy, counts: &mut PiiCounts) -> String {
    if policy.action == PiiAction::Off {
        return text.to_owned();
    }
    let mut out = text.to_owned();
    // Most specific first: an IBAN or card number would otherwise read as a phone number.
    for kind in PiiKind::ALL {
        if !policy.kinds.contains(&kind) {
            continue;
        }
        let re = match kind {
            PiiKind::Email => &EMAIL,
            PiiKind::Iban => &IBAN,
            PiiKind::Card => &CARD,
            PiiKind::NationalId => &NATIONAL_ID,
            PiiKind::Phone => &PHONE,
        };
        let mut found = 0;
        let mut replace = |text: &str| {
            re.replace_all(text, |caps: &regex::Captures<'_>| {
                let m = &caps[0];
                if !is_finding(kind, m) {
                    return m.to_owned();
                }
                found += 1;
                match policy.action {
                    PiiAction::Mask => mask(m),
                    _ => kind.placeholder().to_owned(),
                }
            })
            .into_owned()
        };
        out = if matches!(kind, PiiKind::Phone | PiiKind::Card) {
            // A UUID is an opaque id whose digit groups read as a phone or card number: the
            // numbers are looked for between UUIDs, never across or inside one.
            let mut rest = out.as_str();
            let mut kept = String::with_capacity(out.len());
            while let Some(u) = UUID.find(rest) {
                kept.push_str(&replace(&rest[..u.start()]));
                kept.push_str(u.as_str());
                rest = &rest[u.end()..];
            }
            kept.push_str(&replace(rest));
            kept
        } else {
            replace(&out)
        };
        if found > 0 {
            *counts.entry(kind).or_default() += found;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, action: PiiAction) -> (String, PiiCounts) {
        let mut counts = PiiCounts::new();
        let policy = PiiPolicy {
            action,
            ..Default::default()
        };
        (redact(text, &policy, &mut counts), counts)
    }

    #[test]
    fn each_kind_is_found_and_replaced() {
        let cases = [
            (
                "mail me at jane.doe+bank@example.co.uk please",
                "mail me at [EMAIL] please",
                PiiKind::Email,
            ),
            (
                "my card 4242 4242 4242 4242 was declined",
                "my card [CARD] was declined",
                PiiKind::Card,
            ),
            ("card 4111-1111-1111-1111", "card [CARD]", PiiKind::Card),
            (
                "send it to GB82 WEST 1234 5698 7654 32 today",
                "send it to [IBAN] today",
                PiiKind::Iban,
            ),
            ("iban DE89370400440532013000", "iban [IBAN]", PiiKind::Iban),
            (
                "ssn 078-05-1120 on file",
                "ssn [NATIONAL_ID] on file",
                PiiKind::NationalId,
            ),
            (
                "NI number QQ 12 34 56 C",
                "NI number [NATIONAL_ID]",
                PiiKind::NationalId,
            ),
            (
                "call +44 20 7946 0958 now",
                "call [PHONE] now",
                PiiKind::Phone,
            ),
            ("call (555) 123-4567 x", "call [PHONE] x", PiiKind::Phone),
        ];
        for (text, want, kind) in cases {
            let (got, counts) = run(text, PiiAction::Replace);
            assert_eq!(got, want, "{text}");
            assert_eq!(counts, PiiCounts::from([(kind, 1)]), "{text}");
        }
    }

    #[test]
    fn look_alikes_survive() {
        for text in [
            "I was charged 1200 dollars on 2024-01-15",
            "card 4242 4242 4242 4241 fails Luhn",
            "order 12345678",
            "GB00WEST12345698765432 fails mod 97",
            "what is the exchange rate for 100 EUR",
        ] {
            let (got, counts) = run(text, PiiAction::Replace);
            assert_eq!((got.as_str(), counts.len()), (text, 0), "{text}");
        }
    }

    /// Found by `flywheel-fuzz` (correction_ndjson): an IBAN-shaped run with a fullwidth
    /// digit, which the pattern's Unicode `\d` matches, panicked slicing it by bytes.
    #[test]
    fn non_ascii_digits_in_an_iban_shape_are_no_iban() {
        for text in [
            "GB\u{ff10}82WEST12345698765432",
            "GB8\u{0663}WEST12345698765432 x",
        ] {
            let (got, counts) = run(text, PiiAction::Replace);
            assert_eq!(counts.get(&PiiKind::Iban), None, "{text}");
            assert!(got.contains("WEST"), "{text}");
        }
    }

    #[test]
    fn mask_keeps_the_last_four_and_off_keeps_everything() {
        let (got, _) = run("card 4242 4242 4242 4242", PiiAction::Mask);
        assert_eq!(got, "card **** **** **** 4242");
        let text = "jane@example.com 4242 4242 4242 4242";
        let (got, counts) = run(text, PiiAction::Off);
        assert_eq!((got.as_str(), counts.len()), (text, 0));
    }

    #[test]
    fn narrowed_kinds_leave_the_others() {
        let mut counts = PiiCounts::new();
        let policy = PiiPolicy {
            action: PiiAction::Replace,
            kinds: vec![PiiKind::Email],
        };
        let got = redact("jane@example.com 4242 4242 4242 4242", &policy, &mut counts);
        assert_eq!(got, "[EMAIL] 4242 4242 4242 4242");
    }

    #[test]
    fn uuids_are_ids_not_phone_numbers() {
        for id in [
            "01932456-7890-7123-8456-123456789012",
            "prediction-20261207-1234-7567-8901-234567890123",
        ] {
            let (out, counts) = run(id, PiiAction::Replace);
            assert_eq!((out.as_str(), counts.len()), (id, 0), "{id}");
        }
        // A phone number beside a UUID is still found.
        let (out, _) = run(
            "call +44 20 7946 0958 about 01932456-7890-7123-8456-123456789012",
            PiiAction::Replace,
        );
        assert_eq!(
            out,
            "call [PHONE] about 01932456-7890-7123-8456-123456789012"
        );
    }

    #[test]
    fn personal_data_touching_a_uuid_is_still_found() {
        let uuid = "01932456-7890-7123-8456-123456789012";
        let (out, counts) = run(&format!("ticket {uuid} 555 010 4567"), PiiAction::Replace);
        assert!(!out.contains("555 010 4567"), "{out}");
        assert_eq!(counts.get(&PiiKind::Phone), Some(&1), "{out}");
        let (out, _) = run(&format!("{uuid}@relay.example.com"), PiiAction::Replace);
        assert_eq!(out, "[EMAIL]");
    }
}

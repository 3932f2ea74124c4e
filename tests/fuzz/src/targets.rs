//! The targets: each feeds its input to the real parsing code path, as the service reads it
//! (through a file where the service reads a file), and says whether the input was accepted.

use chrono::{DateTime, Duration, Utc};
use flywheel_domain::pii::{PiiAction, PiiCounts, PiiKind, PiiPolicy};
use flywheel_domain::schedule::{TriggerState, due, parse_schedule};
use flywheel_domain::{
    CorrectionDraft, DomainName, DomainSpec, Policy, Split, Task, content_hash, normalize_text,
};

use crate::engine::{Ctx, Input, Part, Target, Verdict};
use crate::fixtures::Fixtures;

/// Every target, in the order a full run takes them.
pub const TARGETS: &[Target] = &[
    CORRECTION_JSON,
    CORRECTION_NDJSON,
    IMPORT_CSV,
    SOURCE_JSONL,
    SOURCE_CSV,
    SOURCE_PARQUET,
    DOMAIN_SPEC,
    POLICY,
    CRON,
    PII,
    MODEL_CONFIG,
    BASE_MODEL,
    TOKENIZER,
    CHAT_TEMPLATE,
    SAFETENSORS,
    ADAPTER_LINT,
    ADAPTER_MERGE,
    ADAPTER_LOAD,
];

pub fn by_name(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

fn one(s: &str) -> Input {
    vec![s.as_bytes().to_vec()]
}

// ---------------------------------------------------------------------------------------------
// Corrections.

const LABELS: [&str; 8] = [
    "age_limit",
    "card_arrival",
    "cash_withdrawal_charge",
    "exchange_rate",
    "lost_or_stolen_card",
    "pin_blocked",
    "request_refund",
    "top_up_failed",
];

/// The domains a correction is validated against: each task, each PII action.
fn specs() -> Vec<DomainSpec> {
    let spec = |task: Task, action: PiiAction, kinds: Vec<PiiKind>| DomainSpec {
        name: DomainName::parse("banking").expect("valid"),
        task,
        base_model: "sha256:0".into(),
        labels: match task {
            Task::Classification => LABELS.map(String::from).to_vec(),
            Task::Generation => Vec::new(),
        },
        policy: Policy {
            pii: PiiPolicy { action, kinds },
            ..Policy::default()
        },
        training: Default::default(),
        out_of_scope_label: None,
        serving: Default::default(),
        sources: Vec::new(),
    };
    vec![
        spec(
            Task::Classification,
            PiiAction::Replace,
            PiiKind::ALL.to_vec(),
        ),
        spec(Task::Generation, PiiAction::Mask, PiiKind::ALL.to_vec()),
        spec(
            Task::Classification,
            PiiAction::Drop,
            vec![PiiKind::Phone, PiiKind::Email],
        ),
        spec(Task::Generation, PiiAction::Off, Vec::new()),
    ]
}

thread_local! {
    static SPECS: Vec<DomainSpec> = specs();
}

/// Validates a draft against every spec; accepted if any domain takes it.
fn validate_everywhere(draft: CorrectionDraft) -> Verdict {
    SPECS.with(|specs| {
        let mut verdict = Verdict::Refused;
        for spec in specs {
            if let Ok(c) = draft.clone().validate(spec, 2_000) {
                // What storage and the split see next.
                assert_eq!(
                    c.split,
                    Split::assign(&c.input, spec.policy.holdout_fraction)
                );
                verdict = Verdict::Accepted;
            }
        }
        verdict
    })
}

const CORRECTIONS: &[&str] = &[
    r#"{"input": "I am still waiting on my card?", "expected": "card_arrival"}"#,
    r#"{"client_id": "ticket-4711", "input": "My card 4242 4242 4242 4242 was swallowed, call me on +44 20 7946 0958", "model_output": "card_arrival", "expected": "lost_or_stolen_card", "metadata": {"channel": "chat", "agent": 17, "tags": ["pii", "urgent"]}}"#,
    r#"{"input": "Refund to GB82 WEST 1234 5698 7654 32 please, I'm jane.doe+bank@example.co.uk", "expected": "request_refund", "source": "teacher", "teacher": "gpt-4o-2024-08-06"}"#,
    r#"{"input":"What is the rate for EUR?","model_output":"exchange_rate","expected":"exchange_rate","source":"human","metadata":null}"#,
    "{\n  \"input\": \"Pin blocked after 3 tries \u{1F600}, ssn 078-05-1120\",\n  \"expected\": \"pin_blocked\",\n  \"client_id\": \"\u{00e9}t\u{00e9}-1\"\n}",
    r#"{"input": "Summarise: the customer (NI QQ 12 34 56 C) asks about top-ups.", "model_output": "top_up_failed", "expected": "top_up_failed", "metadata": {}}"#,
];

const CORRECTION_DICT: &[&str] = &[
    "\"input\"",
    "\"expected\"",
    "\"model_output\"",
    "\"client_id\"",
    "\"source\"",
    "\"teacher\"",
    "\"metadata\"",
    "\"human\"",
    "\"card_arrival\"",
    "\"exchange_rate\"",
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\\n",
    ":",
    ",",
    "4242 4242 4242 4242",
    "jane@example.com",
    "GB82 WEST 1234 5698 7654 32",
    "078-05-1120",
    "+44 20 7946 0958",
];

pub const CORRECTION_JSON: Target = Target {
    name: "correction_json",
    about: "one correction as the API receives it: serde_json into CorrectionDraft, then \
            CorrectionDraft::validate (PII redaction, label check, split, content hash) against \
            classification and generation domains under each PII action",
    parts: &[("correction.json", Part::Json)],
    dict: CORRECTION_DICT,
    max_len: 16 << 10,
    seeds: |_| CORRECTIONS.iter().map(|s| one(s)).collect(),
    run: |_, input| match serde_json::from_slice::<CorrectionDraft>(&input[0]) {
        Ok(draft) => validate_everywhere(draft),
        Err(_) => Verdict::Refused,
    },
};

/// Rows the CLI read, as the server will see them.
fn validate_rows(rows: Vec<serde_json::Value>) -> Verdict {
    let mut verdict = Verdict::Refused;
    for row in rows {
        if let Ok(draft) = serde_json::from_value::<CorrectionDraft>(row)
            && validate_everywhere(draft) == Verdict::Accepted
        {
            verdict = Verdict::Accepted;
        }
    }
    verdict
}

pub const CORRECTION_NDJSON: Target = Target {
    name: "correction_ndjson",
    about: "a .jsonl corrections file as `flywheel models init-tiny --corpus` reads it \
            (flywheel::read_corrections, through a file), then each row into CorrectionDraft \
            and validated as the API would (`flywheel import` streams the file to the API \
            instead)",
    parts: &[("corrections.jsonl", Part::Text)],
    dict: CORRECTION_DICT,
    max_len: 32 << 10,
    seeds: |_| {
        vec![
            one(&CORRECTIONS[..4].join("\n")),
            one(&format!(
                "{}\r\n\r\n{}\n",
                CORRECTIONS[4].replace('\n', " "),
                CORRECTIONS[5]
            )),
            one(CORRECTIONS[1]),
        ]
    },
    run: |ctx, input| {
        let path = ctx.write("corrections.jsonl", &input[0]);
        match flywheel::read_corrections(&path) {
            Ok(rows) => validate_rows(rows),
            Err(_) => Verdict::Refused,
        }
    },
};

pub const IMPORT_CSV: Target = Target {
    name: "import_csv",
    about: "a .csv corrections file as the demo and `models init-tiny --corpus` read it \
            (flywheel::read_corrections → csv_corrections, through a file: the header lookup of \
            input/text and expected/label/category `flywheel import` shares), then each row \
            validated as the API would",
    parts: &[("corrections.csv", Part::Text)],
    dict: &[
        ",", "\"", "\"\"", "\n", "\r\n", "input", "text", "expected", "label", "category", "id",
        "\u{FEFF}",
    ],
    max_len: 32 << 10,
    seeds: |_| {
        let head: Vec<&str> = flywheel::BANKING77_MINI.lines().take(12).collect();
        vec![
            one(&head.join("\n")),
            one(
                "id,input,expected,notes\n1,\"Card 4242 4242 4242 4242, lost\",lost_or_stolen_card,\"multi\nline\"\n2,rate?,exchange_rate,\n",
            ),
            one("label,text\r\npin_blocked,\"My PIN is \"\"blocked\"\"\"\r\n"),
        ]
    },
    run: |ctx, input| {
        let path = ctx.write("corrections.csv", &input[0]);
        match flywheel::read_corrections(&path) {
            Ok(rows) => validate_rows(rows),
            Err(_) => Verdict::Refused,
        }
    },
};

// ---------------------------------------------------------------------------------------------
// Files an ingestion source reads (a log shipper's or a data team's, not ours).

/// The mapping every source target reads with: nested paths, a client id, a source column and
/// metadata, so each of the mapping's branches sees mutants.
fn source_mapping() -> flywheel_domain::Mapping {
    serde_json::from_value(serde_json::json!({
        "input": "request.text", "expected": "label", "client_id": "id",
        "model_output": "prediction", "source": "who", "metadata": ["region", "ticket.priority"]
    }))
    .expect("a valid mapping")
}

/// `path` read whole by the ingest worker's reader, each draft validated as the worker does.
fn read_source(
    path: &std::path::Path,
    format: flywheel_domain::FileFormat,
    mapping: &flywheel_domain::Mapping,
) -> Verdict {
    let whole = flywheel_ingest::read_whole(path, format, mapping, 64 << 10);
    let mut verdict = Verdict::Refused;
    for (_, draft) in whole.records {
        if let Ok(draft) = draft
            && validate_everywhere(draft) == Verdict::Accepted
        {
            verdict = Verdict::Accepted;
        }
    }
    verdict
}

/// Source rows as JSON objects, the seeds of the three source targets.
fn source_rows() -> Vec<serde_json::Value> {
    let (labels, who) = (LABELS, ["human", "teacher"]);
    flywheel::BANKING77_MINI
        .lines()
        .skip(1)
        .take(6)
        .enumerate()
        .map(|(i, line)| {
            let text = line.rsplit_once(',').map_or(line, |(t, _)| t);
            serde_json::json!({"request": {"text": format!("{text} call 4242 4242 4242 4242")},
                "label": labels[i % labels.len()], "id": i, "who": who[i % 2],
                "prediction": labels[(i + 1) % labels.len()], "region": "eu",
                "ticket": {"priority": i}})
        })
        .collect()
}

pub const SOURCE_JSONL: Target = Target {
    name: "source_jsonl",
    about: "a JSONL file an ingestion source lists (through a file): the worker's bounded line \
            reader, serde_json, the mapping's dotted paths into a CorrectionDraft, then \
            validated as the worker does",
    parts: &[("logs.jsonl", Part::Text)],
    dict: CORRECTION_DICT,
    max_len: 32 << 10,
    seeds: |_| {
        let rows: Vec<String> = source_rows().iter().map(|r| r.to_string()).collect();
        vec![
            one(&rows.join("\n")),
            one(&format!("{}\n\n{{}}\n[1]\n", rows[0])),
        ]
    },
    run: |ctx, input| {
        let path = ctx.write("logs.jsonl", &input[0]);
        read_source(&path, flywheel_domain::FileFormat::Jsonl, &source_mapping())
    },
};

pub const SOURCE_CSV: Target = Target {
    name: "source_csv",
    about: "a CSV file an ingestion source lists (through a file): the header checked for the \
            mapped columns, each record into a JSON object, the mapping, then validated",
    parts: &[("export.csv", Part::Text)],
    dict: &[
        ",",
        "\"",
        "\"\"",
        "\n",
        "\r\n",
        "request.text",
        "label",
        "id",
        "who",
        "human",
        "teacher",
    ],
    max_len: 32 << 10,
    seeds: |_| {
        let mut csv = String::from("request.text,label,id,who,region\n");
        for r in source_rows() {
            csv += &format!(
                "\"{}\",{},{},{},eu\n",
                r["request"]["text"].as_str().expect("text"),
                r["label"].as_str().expect("label"),
                r["id"],
                r["who"].as_str().expect("who")
            );
        }
        vec![
            one(&csv),
            one("label,request.text\r\nexchange_rate,\"rate, \"\"today\"\"\"\r\n"),
        ]
    },
    run: |ctx, input| {
        let path = ctx.write("export.csv", &input[0]);
        read_source(&path, flywheel_domain::FileFormat::Csv, &source_mapping())
    },
};

pub const SOURCE_PARQUET: Target = Target {
    name: "source_parquet",
    about: "a Parquet file an ingestion source lists (through a file): the parquet crate's \
            footer, page and dictionary decoding (snappy, zstd, lz4, gzip) behind the reader's \
            panic guard, each row into a JSON object, the mapping, then validated",
    parts: &[("export.parquet", Part::Text)],
    dict: &["PAR1", "\u{0}\u{0}\u{0}\u{0}", "\u{15}", "\u{19}", "\u{1c}"],
    max_len: 64 << 10,
    seeds: |f| {
        let path = f.scratch("seed.parquet");
        let rows: Vec<Vec<String>> = source_rows()
            .iter()
            .map(|r| {
                vec![
                    r["request"]["text"].as_str().expect("text").to_owned(),
                    r["label"].as_str().expect("label").to_owned(),
                ]
            })
            .collect();
        flywheel_ingest::write_parquet(&path, &["question", "intent"], &rows)
            .expect("writing a Parquet seed");
        vec![
            vec![f.read(&path)],
            // pyarrow's: zstd, a dictionary column with a null, row groups of four.
            vec![f.read(f.ingest_fixtures.join("pyarrow.parquet"))],
        ]
    },
    run: |ctx, input| {
        let path = ctx.write("export.parquet", &input[0]);
        // Columns as a data team's export names them (pyarrow's seed has these).
        let mapping = serde_json::from_value(serde_json::json!({
            "input": "question", "expected": "intent", "client_id": "ticket_id"
        }))
        .expect("a valid mapping");
        read_source(&path, flywheel_domain::FileFormat::Parquet, &mapping)
    },
};

// ---------------------------------------------------------------------------------------------
// Domains, policies and schedules.

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a valid time")
        .with_timezone(&Utc)
}

/// Asks the scheduler about the policy at a few moments a database could report.
fn exercise_due(policy: &Policy) {
    for (started, new, last_hour) in [
        ("1970-01-01T00:00:00Z", 1, None),
        ("2026-01-01T09:00:00Z", 5, Some((100, 60))),
        ("2024-02-29T23:59:59Z", 1_000_000, Some((0, 0))),
        ("2199-12-31T23:59:59Z", 1, Some((i64::MAX, i64::MAX))),
    ] {
        let started = at(started);
        let state = TriggerState {
            new_corrections: new,
            oldest_new_at: Some(started + Duration::seconds(30)),
            last_started_at: started,
            last_finished_at: Some(started + Duration::seconds(60)),
            in_flight: false,
            last_hour,
        };
        for later in [1, 3_600, 86_400 * 400] {
            let _ = due(policy, &state, started + Duration::seconds(later));
        }
    }
}

const POLICY_DICT: &[&str] = &[
    "\"min_new_corrections\"",
    "\"max_escalation_share\"",
    "\"holdout_fraction\"",
    "\"min_accuracy\"",
    "\"min_improvement\"",
    "\"significance_level\"",
    "\"max_label_drop\"",
    "\"max_calibration_error\"",
    "\"target_accuracy\"",
    "\"require_approval\"",
    "\"pii\"",
    "\"action\"",
    "\"kinds\"",
    "\"replace\"",
    "\"mask\"",
    "\"drop\"",
    "\"off\"",
    "\"email\"",
    "\"iban\"",
    "\"card\"",
    "\"national_id\"",
    "\"phone\"",
    "\"teacher\"",
    "\"include\"",
    "\"weight\"",
    "\"max_staleness_seconds\"",
    "\"schedule\"",
    "\"cooldown_seconds\"",
    "\"early_stopping\"",
    "\"0 3 * * *\"",
    "\"*/5 * * * * *\"",
    "\"name\"",
    "\"task\"",
    "\"classification\"",
    "\"generation\"",
    "\"base_model\"",
    "\"labels\"",
    "\"policy\"",
    "\"out_of_scope_label\"",
    "null",
    "true",
    "false",
    "[]",
    "{}",
];

const POLICIES: &[&str] = &[
    "{}",
    r#"{"min_new_corrections": 300, "holdout_fraction": 0.2, "min_accuracy": 0.4, "min_improvement": 0.02}"#,
    r#"{"min_new_corrections": 100, "max_staleness_seconds": 3600, "schedule": "0 3 * * *", "cooldown_seconds": 600, "early_stopping": true, "require_approval": true}"#,
    r#"{"significance_level": 1.0, "min_improvement": -1.0, "max_label_drop": 0.05, "max_calibration_error": 0.1, "target_accuracy": 0.9, "pii": {"action": "mask", "kinds": ["email", "card", "iban"]}, "teacher": {"include": true, "weight": 0.5}}"#,
    r#"{"pii": {"action": "drop"}, "teacher": {"include": false}, "schedule": "30 */6 * * 1-5"}"#,
    r#"{"pii": {"action": "off", "kinds": []}, "schedule": "0 0 12 * * SUN", "holdout_fraction": 0.5}"#,
];

pub const POLICY: Target = Target {
    name: "policy",
    about: "a domain policy: serde_json into Policy (PII policy, teacher policy, cron \
            schedule), Policy::validate, then schedule::due at several moments",
    parts: &[("policy.json", Part::Json)],
    dict: POLICY_DICT,
    max_len: 8 << 10,
    seeds: |_| POLICIES.iter().map(|s| one(s)).collect(),
    run: |_, input| {
        let Ok(policy) = serde_json::from_slice::<Policy>(&input[0]) else {
            return Verdict::Refused;
        };
        let verdict = Verdict::of(&policy.validate());
        exercise_due(&policy);
        verdict
    },
};

pub const DOMAIN_SPEC: Target = Target {
    name: "domain_spec",
    about: "a domain registration: serde_json into DomainSpec (DomainName::parse, task, \
            labels, policy), DomainSpec::validate, then schedule::due on its policy",
    parts: &[("domain.json", Part::Json)],
    dict: POLICY_DICT,
    max_len: 8 << 10,
    seeds: |_| {
        let mut seeds: Vec<Input> = POLICIES
            .iter()
            .map(|p| {
                one(&format!(
                    r#"{{"name": "banking", "task": "classification", "base_model": "sha256:9f2c", "labels": {}, "out_of_scope_label": "age_limit", "policy": {p}}}"#,
                    serde_json::to_string(&LABELS).expect("json")
                ))
            })
            .collect();
        seeds.push(one(
            r#"{"name": "support-replies-2", "task": "generation", "base_model": "/models/smollm2-135m-instruct", "policy": {"min_new_corrections": 300, "min_accuracy": 0.3, "min_improvement": 0.1}}"#,
        ));
        seeds.push(one(
            r#"{"name":"hr","task":"classification","base_model":"m","labels":["a","b"]}"#,
        ));
        seeds.push(one(
            r#"{"name":"hr","task":"classification","base_model":"m","labels":["a","b"],"sources":[{"name":"logs","files":"s3://bucket/hr/","format":"jsonl","mapping":{"input":"request.text","expected":"label","metadata":["region"]},"interval_seconds":60,"on_change":"reread","options":{"aws_region":"eu-west-1"}},{"name":"tickets","table":"support.tickets","cursor":"closed_at","connection_env":"TICKETS_URL","mapping":{"input":"body","expected":"queue","client_id":"id"}}]}"#,
        ));
        seeds
    },
    run: |_, input| {
        let Ok(spec) = serde_json::from_slice::<DomainSpec>(&input[0]) else {
            return Verdict::Refused;
        };
        let verdict = Verdict::of(&spec.validate());
        exercise_due(&spec.policy);
        verdict
    },
};

pub const CRON: Target = Target {
    name: "cron",
    about: "a policy's cron expression: schedule::parse_schedule (croner, 5 or 6 fields), \
            then schedule::due firing it after last runs from 1970 to 2199",
    parts: &[("schedule", Part::Text)],
    dict: &[
        "*",
        "/",
        ",",
        "-",
        "?",
        "L",
        "W",
        "#",
        " ",
        "0",
        "59",
        "60",
        "23",
        "24",
        "31",
        "32",
        "12",
        "13",
        "7",
        "8",
        "MON",
        "FRI",
        "SUN",
        "JAN",
        "DEC",
        "@daily",
        "@hourly",
        "@weekly",
        "@monthly",
        "@yearly",
        "@annually",
        "@midnight",
        "@reboot",
        "*/0",
        "4294967296",
        "1-0",
        "L-3",
        "LW",
        "5L",
        "5#3",
        "0#5",
    ],
    max_len: 256,
    seeds: |_| {
        [
            "0 3 * * *",
            "*/5 * * * *",
            "30 */6 * * 1-5",
            "0 0 12 * * SUN",
            "15,45 9-17 * * MON-FRI",
            "0 0 1 JAN,JUL *",
            "59 23 31 12 *",
            "0 0 29 2 *",
            "0 0 L * *",
            "0 0 * * 5#3",
            "0 0 * * 5L",
            "0 0 15W * *",
            "*/7 1-59/3 * * * *",
            "@daily",
            "@hourly",
            "@weekly",
        ]
        .iter()
        .map(|s| one(s))
        .collect()
    },
    run: |_, input| {
        let raw = String::from_utf8_lossy(&input[0]);
        let verdict = Verdict::of(&parse_schedule(&raw));
        exercise_due(&Policy {
            min_new_corrections: u32::MAX,
            schedule: Some(raw.into_owned()),
            ..Policy::default()
        });
        verdict
    },
};

const PII_TEXTS: &[&str] = &[
    "mail me at jane.doe+bank@example.co.uk please",
    "my card 4242 4242 4242 4242 was declined, the other is 4111-1111-1111-1111",
    "send it to GB82 WEST 1234 5698 7654 32 today, or DE89370400440532013000",
    "ssn 078-05-1120 on file; NI number QQ 12 34 56 C",
    "call +44 20 7946 0958 now or (555) 123-4567 x",
    "I was charged 1200 dollars on 2024-01-15 (order 12345678), call 0044 20 7946 0958",
    "İstanbul office: ayşe@örnek.com.tr, +90 212 555 01 23, TR33 0006 1005 1978 6457 8413 26",
];

pub const PII: Target = Target {
    name: "pii",
    about: "the PII detectors: pii::redact under replace, mask and drop, with all kinds and \
            narrowed kinds (emails, IBAN mod-97, Luhn card numbers, SSN/NI numbers, phones), \
            then normalize_text, content_hash and Split::assign on the result",
    parts: &[("text", Part::Text)],
    dict: &[
        "@",
        ".",
        "+",
        "-",
        " ",
        "(",
        ")",
        "4242",
        "4111",
        "0",
        "9",
        "GB82",
        "WEST",
        "DE89",
        "QQ",
        "078-05-1120",
        "+44",
        "example.com",
        "jane.doe",
        ".co.uk",
        "IBAN",
        "\u{0130}",
    ],
    max_len: 4 << 10,
    seeds: |_| PII_TEXTS.iter().map(|s| one(s)).collect(),
    run: |_, input| {
        let text = String::from_utf8_lossy(&input[0]);
        // Narrowed kinds, chosen by the input's length so every subset comes up.
        let subset: Vec<PiiKind> = PiiKind::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| text.len() >> i & 1 == 1)
            .map(|(_, k)| *k)
            .collect();
        let mut found = false;
        for action in [PiiAction::Replace, PiiAction::Mask, PiiAction::Drop] {
            for kinds in [PiiKind::ALL.to_vec(), subset.clone()] {
                let mut counts = PiiCounts::new();
                let out =
                    flywheel_domain::pii::redact(&text, &PiiPolicy { action, kinds }, &mut counts);
                found |= !counts.is_empty();
                let _ = (normalize_text(&out), content_hash(&out, "x"));
                let _ = Split::assign(&out, 0.2);
            }
        }
        if found {
            Verdict::Accepted
        } else {
            Verdict::Refused
        }
    },
};

// ---------------------------------------------------------------------------------------------
// Model files.

const MODEL_CONFIG_DICT: &[&str] = &[
    "\"model_type\"",
    "\"llama\"",
    "\"mistral\"",
    "\"qwen2\"",
    "\"bert\"",
    "\"vocab_size\"",
    "\"hidden_size\"",
    "\"intermediate_size\"",
    "\"num_hidden_layers\"",
    "\"num_attention_heads\"",
    "\"num_key_value_heads\"",
    "\"max_position_embeddings\"",
    "\"rms_norm_eps\"",
    "\"rope_theta\"",
    "\"rope_parameters\"",
    "\"rope_type\"",
    "\"rope_scaling\"",
    "\"tie_word_embeddings\"",
    "\"attention_bias\"",
    "\"type_vocab_size\"",
    "\"layer_norm_eps\"",
    "\"hidden_act\"",
    "\"gelu\"",
    "\"pad_token_id\"",
    "null",
    "true",
    "{}",
];

pub const MODEL_CONFIG: Target = Target {
    name: "model_config",
    about: "a base model's config.json (through a file): read_config, then BertConfig or \
            LlamaConfig::from_json as model_type says, and classifier_target_modules",
    parts: &[("config.json", Part::Json)],
    dict: MODEL_CONFIG_DICT,
    max_len: 16 << 10,
    seeds: |f| {
        let hf = ["tiny-llama", "tiny-qwen2", "tiny-bert"]
            .iter()
            .map(|d| vec![f.read(f.trainer_fixtures.join(d).join("config.json"))]);
        let ours = [&f.llama, &f.bert]
            .into_iter()
            .map(|d| vec![f.read(d.join("config.json"))]);
        hf.chain(ours).collect()
    },
    run: |ctx, input| {
        ctx.write("config.json", &input[0]);
        let parsed = flywheel_trainer::fuzzing::model_config(ctx.scratch);
        let _ = flywheel_trainer::classifier_target_modules(ctx.scratch);
        Verdict::of(&parsed)
    },
};

/// Copies the tiny Llama into `scratch/model` once; targets then replace one file of it.
fn model_copy(ctx: &Ctx<'_>) -> std::path::PathBuf {
    let dir = ctx.scratch.join("model");
    if !dir.join("model.safetensors").exists() {
        std::fs::create_dir_all(&dir).expect("scratch");
        for entry in std::fs::read_dir(&ctx.fixtures.llama).expect("fixture") {
            let path = entry.expect("fixture").path();
            std::fs::copy(&path, dir.join(path.file_name().expect("a file"))).expect("copy");
        }
    }
    dir
}

pub const BASE_MODEL: Target = Target {
    name: "base_model",
    about: "a causal LM directory whose config.json is the input: Generator::load (config, \
            safetensors checkpoint, tokenizer.json, chat template) and generate() a few tokens",
    parts: &[("config.json", Part::Json)],
    dict: MODEL_CONFIG_DICT,
    max_len: 16 << 10,
    seeds: |f| {
        let ours = f.read(f.llama.join("config.json"));
        let mut v: serde_json::Value = serde_json::from_slice(&ours).expect("json");
        // transformers 5 nests the rotary settings; an explicit Qwen2-style bias switch.
        v["rope_parameters"] = serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"});
        v["attention_bias"] = false.into();
        vec![
            vec![ours],
            vec![serde_json::to_vec_pretty(&v).expect("json")],
        ]
    },
    run: |ctx, input| {
        let dir = model_copy(ctx);
        std::fs::write(dir.join("config.json"), &input[0]).expect("scratch");
        let generated = flywheel_trainer::Generator::load(&dir, None)
            .and_then(|g| g.generate("where is my card?", 3));
        Verdict::of(&generated)
    },
};

pub const TOKENIZER: Target = Target {
    name: "tokenizer",
    about: "a base model's tokenizer.json (through a file): TextEncoder::load as classifiers \
            load it (truncation set), then a padded batch of texts encoded",
    parts: &[("tokenizer.json", Part::Json)],
    dict: &[
        "\"model\"",
        "\"vocab\"",
        "\"merges\"",
        "\"type\"",
        "\"BPE\"",
        "\"WordPiece\"",
        "\"Unigram\"",
        "\"WordLevel\"",
        "\"added_tokens\"",
        "\"normalizer\"",
        "\"pre_tokenizer\"",
        "\"post_processor\"",
        "\"decoder\"",
        "\"truncation\"",
        "\"padding\"",
        "\"ByteLevel\"",
        "\"TemplateProcessing\"",
        "\"Sequence\"",
        "\"Split\"",
        "\"pattern\"",
        "\"Regex\"",
        "\"unk_token\"",
        "\"[UNK]\"",
        "\"<|endoftext|>\"",
        "\"continuing_subword_prefix\"",
        "\"max_input_chars_per_word\"",
        "\"id\"",
        "\"special\"",
        "null",
        "(?:",
        "\\\\p{L}+",
    ],
    max_len: 256 << 10,
    seeds: |f| {
        [&f.llama, &f.bert]
            .iter()
            .map(|d| vec![f.read(d.join("tokenizer.json"))])
            .collect()
    },
    run: |ctx, input| {
        ctx.write("tokenizer.json", &input[0]);
        let encoded = flywheel_trainer::fuzzing::tokenizer(
            ctx.scratch,
            32,
            &[
                "where is my card?",
                "",
                "İstanbul 4242 \u{1F600} [SEP] <|endoftext|>",
            ],
        );
        Verdict::of(&encoded)
    },
};

pub const CHAT_TEMPLATE: Target = Target {
    name: "chat_template",
    about: "a checkpoint's chat template (chat_template.jinja, or chat_template in \
            tokenizer_config.json, with bos/eos tokens): ChatTemplate::load, then the prompt and \
            the prompt/completion split SFT renders, with the prompt and completion fuzzed too",
    parts: &[
        ("chat_template.jinja", Part::Text),
        ("tokenizer_config.json", Part::Json),
        ("prompt", Part::Text),
        ("completion", Part::Text),
    ],
    dict: &[
        "{{",
        "}}",
        "{%",
        "%}",
        "{#",
        "#}",
        "{%-",
        "-%}",
        "messages",
        "message",
        "loop.first",
        "loop.last",
        "loop.index0",
        "['role']",
        "['content']",
        ".strip()",
        ".split('x')",
        "|tojson",
        "|trim",
        "|length",
        "raise_exception('no')",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "for m in messages",
        "endfor",
        "if",
        "elif",
        "else",
        "endif",
        "set x = ",
        "namespace(a=1)",
        "range(",
        "[::-1]",
        "~",
        " * 100",
        "\"chat_template\"",
        "\"bos_token\"",
        "\"eos_token\"",
        "\"content\"",
        "\"name\"",
        "\"default\"",
        "\"template\"",
        "<|im_start|>",
        "<|im_end|>",
        "<|eot_id|>",
        "[INST]",
    ],
    max_len: 16 << 10,
    seeds: |f| {
        let mut seeds = Vec::new();
        for case in &f.chat {
            let config = serde_json::json!({
                "bos_token": case.bos_token,
                "eos_token": {"content": case.eos_token, "special": true},
            });
            seeds.push(vec![
                case.template.clone().into_bytes(),
                serde_json::to_vec(&config).expect("json"),
                case.prompt.clone().into_bytes(),
                case.completion.clone().into_bytes(),
            ]);
            // The template inside tokenizer_config.json, plain and as named templates.
            let mut inline = config.clone();
            inline["chat_template"] = case.template.clone().into();
            let mut named = config.clone();
            named["chat_template"] =
                serde_json::json!([{"name": "default", "template": case.template}]);
            for c in [inline, named] {
                seeds.push(vec![
                    Vec::new(),
                    serde_json::to_vec_pretty(&c).expect("json"),
                    case.prompt.clone().into_bytes(),
                    case.completion.clone().into_bytes(),
                ]);
            }
        }
        seeds
    },
    run: |ctx, input| {
        let dir = ctx.dir_of(
            "model",
            &["chat_template.jinja", "tokenizer_config.json"],
            input,
        );
        let prompt = String::from_utf8_lossy(&input[2]);
        let completion = String::from_utf8_lossy(&input[3]);
        match flywheel_trainer::fuzzing::chat_template(&dir, &prompt, &completion) {
            Ok(Some(_)) => Verdict::Accepted,
            _ => Verdict::Refused,
        }
    },
};

const SAFETENSORS_DICT: &[&str] = &[
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "\"F32\"",
    "\"F16\"",
    "\"BF16\"",
    "\"I64\"",
    "\"F64\"",
    "\"BOOL\"",
    "base_model.model.",
    ".lora_A.weight",
    ".lora_B.weight",
    "model.layers.0.self_attn.q_proj",
    "model.embed_tokens",
    "lm_head",
    "[]",
    "[0]",
    "[0,0]",
];

pub const SAFETENSORS: Target = Target {
    name: "safetensors",
    about: "a safetensors file (through a file) read as adapters and heads are: \
            Checkpoint::open_file (header, offsets, f32/f16/bf16 conversion)",
    parts: &[("model.safetensors", Part::Safetensors)],
    dict: SAFETENSORS_DICT,
    max_len: 1 << 20,
    seeds: |f| {
        let mut seeds: Vec<Input> = f
            .adapters
            .iter()
            .map(|d| vec![f.read(d.join("adapter_model.safetensors"))])
            .collect();
        seeds.push(vec![f.read(f.llama.join("model.safetensors"))]);
        seeds.push(vec![
            f.read(f.trainer_fixtures.join("tiny-bert/model.safetensors")),
        ]);
        seeds.push(vec![
            f.read(f.trainer_fixtures.join("tiny-llama/golden.safetensors")),
        ]);
        seeds
    },
    run: |ctx, input| {
        let path = ctx.write("model.safetensors", &input[0]);
        Verdict::of(&flywheel_trainer::fuzzing::safetensors_file(&path))
    },
};

const ADAPTER_PARTS: &[(&str, Part)] = &[
    ("adapter_config.json", Part::Json),
    ("adapter_model.safetensors", Part::Safetensors),
];

const ADAPTER_DICT: &[&str] = &[
    "\"peft_type\"",
    "\"LORA\"",
    "\"r\"",
    "\"lora_alpha\"",
    "\"use_rslora\"",
    "\"target_modules\"",
    "\"modules_to_save\"",
    "\"bias\"",
    "\"none\"",
    "\"all\"",
    "\"q_proj\"",
    "\"lm_head\"",
    "\"embed_tokens\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"F16\"",
    "\"BF16\"",
    "\"I64\"",
    "base_model.model.",
    ".lora_A.weight",
    ".lora_B.weight",
    "model.layers.1.mlp.down_proj",
    "model.embed_tokens",
    "null",
    "true",
    "0",
];

fn adapter_seeds(f: &Fixtures) -> Vec<Input> {
    f.adapters
        .iter()
        .map(|d| {
            vec![
                f.read(d.join("adapter_config.json")),
                f.read(d.join("adapter_model.safetensors")),
            ]
        })
        .collect()
}

fn adapter_dir(ctx: &Ctx<'_>, input: &Input) -> std::path::PathBuf {
    ctx.dir_of(
        "adapter",
        &["adapter_config.json", "adapter_model.safetensors"],
        input,
    )
}

pub const ADAPTER_LINT: Target = Target {
    name: "adapter_lint",
    about: "a PEFT adapter (adapter_config.json + adapter_model.safetensors) through the \
            serving lint that gates publishing: evaluator::lint_adapter against the tiny Llama",
    parts: ADAPTER_PARTS,
    dict: ADAPTER_DICT,
    max_len: 1 << 20,
    seeds: adapter_seeds,
    run: |ctx, input| {
        let dir = adapter_dir(ctx, input);
        let report = flywheel_evaluator::lint_adapter(
            &ctx.fixtures.llama,
            &dir,
            &flywheel_evaluator::ServingLimits::default(),
        );
        Verdict::of(&report)
    },
};

pub const ADAPTER_MERGE: Target = Target {
    name: "adapter_merge",
    about: "a PEFT adapter folded into the tiny Llama by `flywheel models merge` \
            (flywheel_trainer::export_merged: adapter config, A/B pairing, shapes, W + s·B·A)",
    parts: ADAPTER_PARTS,
    dict: ADAPTER_DICT,
    max_len: 1 << 20,
    seeds: adapter_seeds,
    run: |ctx, input| {
        let dir = adapter_dir(ctx, input);
        let out = ctx.scratch.join("merged");
        Verdict::of(&flywheel_trainer::export_merged(
            &ctx.fixtures.llama,
            &dir,
            &out,
        ))
    },
};

pub const ADAPTER_LOAD: Target = Target {
    name: "adapter_load",
    about: "a PEFT adapter loaded onto the tiny Llama and run, as publishing's no-op check \
            does: flywheel_trainer::adapter_output_delta (Generator::load with the adapter, \
            load_peft_adapter, a forward pass)",
    parts: ADAPTER_PARTS,
    dict: ADAPTER_DICT,
    max_len: 1 << 20,
    seeds: adapter_seeds,
    run: |ctx, input| {
        let dir = adapter_dir(ctx, input);
        let delta = flywheel_trainer::adapter_output_delta(
            &ctx.fixtures.llama,
            &dir,
            &["where is my card?"],
        );
        Verdict::of(&delta)
    },
};

//! How a domain trains: the `training` block (OpenAI's fine-tuning hyperparameters, each a
//! value or `"auto"`), a job's overrides of it, and [`Training::resolve`], which turns the
//! autos into numbers from facts about the run's data. Pure: the worker measures the data.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Invalid, Task};

/// A value the domain fixes, or `"auto"`: chosen from the data at each run.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Auto<T> {
    #[default]
    Auto,
    Value(T),
}

impl<T> Auto<T> {
    pub fn value(&self) -> Option<&T> {
        match self {
            Auto::Auto => None,
            Auto::Value(v) => Some(v),
        }
    }

    fn is_auto(&self) -> bool {
        matches!(self, Auto::Auto)
    }
}

impl<T: Serialize> Serialize for Auto<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => s.serialize_str("auto"),
            Auto::Value(v) => v.serialize(s),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Auto<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_json::Value::deserialize(d)?;
        if raw == "auto" {
            return Ok(Auto::Auto);
        }
        T::deserialize(raw)
            .map(Auto::Value)
            .map_err(|e| D::Error::custom(format!("{e}, or \"auto\"")))
    }
}

/// A domain's training block. Every field left out is `"auto"`, and `"training": "auto"`
/// is the block with nothing set.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Training {
    pub n_epochs: Auto<u32>,
    pub batch_size: Auto<u32>,
    /// Multiplies the task's base learning rate (3e-3 for LoRA).
    pub learning_rate_multiplier: Auto<f64>,
    pub lora: Lora,
    /// Longest input (tokens) trained on; longer ones are truncated, and counted.
    pub max_seq_len: Auto<u32>,
    pub early_stopping: Auto<bool>,
    /// Train a few configurations of the auto fields, choose on a validation share, retrain
    /// the winner on every training row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_search: Option<AutoSearch>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    #[serde(default)]
    pub r: Auto<u32>,
    #[serde(default)]
    pub alpha: Auto<f64>,
    #[serde(default)]
    pub dropout: Auto<f64>,
    /// Module names as PEFT matches them (`query`, `output.dense`, `q_proj`, …).
    #[serde(default)]
    pub target_modules: Auto<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSearch {
    pub trials: u32,
}

/// The block's wire form; `Training` also accepts the word `"auto"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    #[serde(default)]
    n_epochs: Auto<u32>,
    #[serde(default)]
    batch_size: Auto<u32>,
    #[serde(default)]
    learning_rate_multiplier: Auto<f64>,
    #[serde(default)]
    lora: Lora,
    #[serde(default)]
    max_seq_len: Auto<u32>,
    #[serde(default)]
    early_stopping: Auto<bool>,
    #[serde(default)]
    auto_search: Option<AutoSearch>,
}

impl<'de> Deserialize<'de> for Training {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_json::Value::deserialize(d)?;
        if raw == "auto" {
            return Ok(Training::default());
        }
        let f = Fields::deserialize(raw)
            .map_err(|e| D::Error::custom(format!("{e} (or the word \"auto\")")))?;
        Ok(Training {
            n_epochs: f.n_epochs,
            batch_size: f.batch_size,
            learning_rate_multiplier: f.learning_rate_multiplier,
            lora: f.lora,
            max_seq_len: f.max_seq_len,
            early_stopping: f.early_stopping,
            auto_search: f.auto_search,
        })
    }
}

/// The largest rank the domain crate accepts anywhere; the serving fleet's own
/// `--max-lora-rank` is checked by the API on top.
pub const MAX_LORA_RANK: u32 = 256;
/// The most trials an `auto_search` may run: each is a full training run.
pub const MAX_TRIALS: u32 = 8;

impl Training {
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad =
            |field: &str, message: &str| Err(Invalid::field(format!("training.{field}"), message));
        if let Some(&n) = self.n_epochs.value()
            && !(1..=100).contains(&n)
        {
            return bad("n_epochs", "must be between 1 and 100, or \"auto\"");
        }
        if let Some(&n) = self.batch_size.value()
            && !(1..=512).contains(&n)
        {
            return bad("batch_size", "must be between 1 and 512, or \"auto\"");
        }
        if let Some(&m) = self.learning_rate_multiplier.value()
            && !(m > 0.0 && m <= 100.0)
        {
            return bad(
                "learning_rate_multiplier",
                "must be in (0, 100], or \"auto\"",
            );
        }
        if let Some(&r) = self.lora.r.value()
            && !(1..=MAX_LORA_RANK).contains(&r)
        {
            return bad("lora.r", "must be between 1 and 256, or \"auto\"");
        }
        if let Some(&a) = self.lora.alpha.value()
            && !(a > 0.0 && a <= 4096.0)
        {
            return bad("lora.alpha", "must be in (0, 4096], or \"auto\"");
        }
        if let Some(&p) = self.lora.dropout.value()
            && !(0.0..0.9).contains(&p)
        {
            return bad("lora.dropout", "must be in [0, 0.9), or \"auto\"");
        }
        if let Some(t) = self.lora.target_modules.value() {
            if t.is_empty() || t.len() > 32 {
                return bad("lora.target_modules", "name 1 to 32 modules, or \"auto\"");
            }
            if let Some(m) = t.iter().find(|m| {
                m.is_empty()
                    || m.len() > 128
                    || !m
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            }) {
                return Err(Invalid::field(
                    "training.lora.target_modules",
                    format!("`{m}` is not a module name (letters, digits, `.`, `_`, `-`)"),
                ));
            }
        }
        if let Some(&n) = self.max_seq_len.value()
            && !(8..=32_768).contains(&n)
        {
            return bad("max_seq_len", "must be between 8 and 32768, or \"auto\"");
        }
        if let Some(s) = self.auto_search {
            if !(2..=MAX_TRIALS).contains(&s.trials) {
                return bad("auto_search.trials", "must be between 2 and 8");
            }
            if !self.learning_rate_multiplier.is_auto() && !self.lora.r.is_auto() {
                return bad(
                    "auto_search",
                    "searches learning_rate_multiplier and lora.r; leave at least one \"auto\"",
                );
            }
        }
        Ok(())
    }

    /// This block with `over`'s set fields in place of its own: a job's overrides.
    pub fn overridden_by(&self, over: &Training) -> Training {
        fn pick<T: Clone>(base: &Auto<T>, over: &Auto<T>) -> Auto<T> {
            if over.is_auto() {
                base.clone()
            } else {
                over.clone()
            }
        }
        Training {
            n_epochs: pick(&self.n_epochs, &over.n_epochs),
            batch_size: pick(&self.batch_size, &over.batch_size),
            learning_rate_multiplier: pick(
                &self.learning_rate_multiplier,
                &over.learning_rate_multiplier,
            ),
            lora: Lora {
                r: pick(&self.lora.r, &over.lora.r),
                alpha: pick(&self.lora.alpha, &over.lora.alpha),
                dropout: pick(&self.lora.dropout, &over.lora.dropout),
                target_modules: pick(&self.lora.target_modules, &over.lora.target_modules),
            },
            max_seq_len: pick(&self.max_seq_len, &over.max_seq_len),
            early_stopping: pick(&self.early_stopping, &over.early_stopping),
            auto_search: over.auto_search.or(self.auto_search),
        }
    }

    /// Numbers for every field: set ones as given, autos from `facts`. Each auto choice says
    /// why, for the job's events and the version's lineage.
    pub fn resolve(&self, task: Task, facts: &DataFacts) -> Resolved {
        let mut why = Vec::new();
        let rows = facts.train_rows.max(1);
        let batch_size = match self.batch_size.value() {
            Some(&b) => b,
            None => {
                // Larger batches keep a CPU's cores busier per step; small data needs the
                // steps more.
                let b = if rows >= 2_000 { 32 } else { 16 };
                why.push(format!("batch_size {b}: {rows} training rows"));
                b
            }
        };
        let n_epochs = match self.n_epochs.value() {
            Some(&n) => n,
            None => {
                // Enough passes that a small domain sees each row several times, few enough
                // that a large one is not overfit: about 40k examples seen for classification
                // and 20k for generation (OpenAI's rule of thumb has the same shape), within
                // the task's bounds.
                let (lo, hi, budget) = match task {
                    Task::Classification => (3, 8, 40_000),
                    Task::Generation => (3, 20, 20_000),
                };
                let n = (budget as f64 / rows as f64)
                    .round()
                    .clamp(lo as f64, hi as f64) as u32;
                why.push(format!(
                    "n_epochs {n}: {rows} rows, about {budget} examples seen, between {lo} and {hi}"
                ));
                n
            }
        };
        let learning_rate_multiplier = *self.learning_rate_multiplier.value().unwrap_or(&1.0);
        let r = *self.lora.r.value().unwrap_or(&8.min(facts.max_rank.max(1)));
        let alpha = match self.lora.alpha.value() {
            Some(&a) => a,
            // PEFT's customary alpha = 2r keeps the update's scale as r changes.
            None => 2.0 * r as f64,
        };
        let dropout = *self.lora.dropout.value().unwrap_or(&0.0);
        let target_modules = self.lora.target_modules.value().cloned();
        let (max_seq_len, truncated) = match self.max_seq_len.value() {
            Some(&n) => {
                let n = (n as usize).min(facts.max_positions);
                (n, facts.longer_than(n))
            }
            None => {
                let n = facts.covering(0.99);
                why.push(format!(
                    "max_seq_len {n}: covers {} of {} rows ({} truncated)",
                    facts.token_lengths.len() - facts.longer_than(n),
                    facts.token_lengths.len(),
                    facts.longer_than(n)
                ));
                (n, facts.longer_than(n))
            }
        };
        let early_stopping = match self.early_stopping.value() {
            Some(&e) => e,
            None => facts.policy_early_stopping,
        };
        Resolved {
            n_epochs,
            batch_size,
            learning_rate_multiplier,
            lora_r: r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules,
            max_seq_len,
            truncated_rows: truncated,
            early_stopping,
            why,
        }
    }

    /// The configurations an `auto_search` tries, best guess first: learning rate and rank
    /// moved off the auto choice, only along the fields left auto.
    pub fn search_grid(&self, base: &Resolved, max_rank: u32) -> Vec<(f64, u32)> {
        let Some(search) = self.auto_search else {
            return Vec::new();
        };
        let lr_free = self.learning_rate_multiplier.is_auto();
        let r_free = self.lora.r.is_auto();
        let lr = base.learning_rate_multiplier;
        let r = base.lora_r;
        let candidates = [
            (lr, r),
            (lr * 0.3, r),
            (lr * 3.0, r),
            (lr, r * 2),
            (lr * 0.1, r),
            (lr, (r / 2).max(1)),
            (lr * 0.3, r * 2),
            (lr * 3.0, r * 2),
        ];
        let mut grid: Vec<(f64, u32)> = Vec::new();
        for (l, k) in candidates {
            let c = (if lr_free { l } else { lr }, if r_free { k } else { r });
            if c.1 <= max_rank.max(1) && !grid.contains(&c) {
                grid.push(c);
            }
        }
        grid.truncate(search.trials as usize);
        grid
    }
}

/// What the worker measured about a run's data before training.
#[derive(Debug, Clone)]
pub struct DataFacts {
    pub train_rows: usize,
    /// Tokens of each training row as the model would see it untruncated.
    pub token_lengths: Vec<usize>,
    /// The base model's `max_position_embeddings`.
    pub max_positions: usize,
    /// The policy's older `early_stopping` switch, which an auto `early_stopping` follows.
    pub policy_early_stopping: bool,
    /// The serving fleet's largest LoRA rank: an auto rank stays at or below it.
    pub max_rank: u32,
}

impl DataFacts {
    fn longer_than(&self, n: usize) -> usize {
        self.token_lengths.iter().filter(|&&l| l > n).count()
    }

    /// The shortest length, in multiples of 8 and at least 16, that covers `share` of rows.
    fn covering(&self, share: f64) -> usize {
        let mut sorted = self.token_lengths.clone();
        sorted.sort_unstable();
        let at = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len().max(1));
        let need = sorted.get(at - 1).copied().unwrap_or(16);
        need.max(16)
            .div_ceil(8)
            .saturating_mul(8)
            .min(self.max_positions)
    }
}

/// Every hyperparameter of one run, as numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    pub lora_r: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// `None`: the architecture's defaults.
    pub target_modules: Option<Vec<String>>,
    pub max_seq_len: usize,
    /// Training rows longer than `max_seq_len`, which train on their first tokens only.
    pub truncated_rows: usize,
    pub early_stopping: bool,
    /// Why each auto field came out as it did.
    pub why: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(rows: usize, lens: &[usize]) -> DataFacts {
        DataFacts {
            train_rows: rows,
            token_lengths: lens.to_vec(),
            max_positions: 512,
            policy_early_stopping: false,
            max_rank: 64,
        }
    }

    #[test]
    fn auto_is_a_word_a_block_or_a_field() {
        let t: Training = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(t, Training::default());
        let t: Training =
            serde_json::from_str(r#"{"n_epochs": 3, "lora": {"r": 16, "alpha": "auto"}}"#).unwrap();
        assert_eq!(t.n_epochs, Auto::Value(3));
        assert_eq!(t.lora.r, Auto::Value(16));
        assert_eq!(t.lora.alpha, Auto::Auto);
        assert_eq!(
            serde_json::to_value(&t).unwrap()["lora"]["alpha"],
            serde_json::json!("auto")
        );
        for bad in [
            r#"{"epochs": 3}"#,
            r#"{"n_epochs": "three"}"#,
            r#"{"lora": {"rank": 8}}"#,
            r#""manual""#,
        ] {
            assert!(
                serde_json::from_str::<Training>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn values_are_bounded() {
        let mut t = Training::default();
        assert!(t.validate().is_ok());
        t.lora.r = Auto::Value(0);
        assert_eq!(t.validate().unwrap_err().field, "training.lora.r");
        t.lora.r = Auto::Auto;
        t.auto_search = Some(AutoSearch { trials: 3 });
        t.learning_rate_multiplier = Auto::Value(1.0);
        assert!(t.validate().is_ok(), "rank is still searchable");
        t.lora.r = Auto::Value(8);
        assert_eq!(t.validate().unwrap_err().field, "training.auto_search");
    }

    #[test]
    fn autos_follow_the_data_and_truncation_is_counted() {
        let lens: Vec<usize> = (0..1000).map(|i| if i < 995 { 20 } else { 300 }).collect();
        let r = Training::default().resolve(Task::Classification, &facts(10_000, &lens));
        assert_eq!((r.n_epochs, r.batch_size), (4, 32));
        assert_eq!(r.max_seq_len, 24, "the 99th percentile, rounded up to 8");
        assert_eq!(r.truncated_rows, 5);
        assert_eq!(r.lora_alpha, 16.0);
        let small = Training::default().resolve(Task::Classification, &facts(200, &lens));
        assert_eq!((small.n_epochs, small.batch_size), (8, 16));
        let fixed = Training {
            max_seq_len: Auto::Value(1000),
            ..Default::default()
        }
        .resolve(Task::Classification, &facts(200, &lens));
        assert_eq!((fixed.max_seq_len, fixed.truncated_rows), (512, 0));
    }

    #[test]
    fn a_job_overrides_only_what_it_sets_and_the_grid_moves_only_autos() {
        let domain = Training {
            n_epochs: Auto::Value(5),
            batch_size: Auto::Value(8),
            ..Default::default()
        };
        let job = Training {
            n_epochs: Auto::Value(2),
            auto_search: Some(AutoSearch { trials: 3 }),
            ..Default::default()
        };
        let t = domain.overridden_by(&job);
        assert_eq!(
            (t.n_epochs.clone(), t.batch_size.clone()),
            (Auto::Value(2), Auto::Value(8))
        );
        let base = t.resolve(Task::Classification, &facts(100, &[10; 100]));
        assert_eq!(t.search_grid(&base, 64), vec![(1.0, 8), (0.3, 8), (3.0, 8)]);
        let only_rank = Training {
            learning_rate_multiplier: Auto::Value(1.0),
            auto_search: Some(AutoSearch { trials: 3 }),
            ..Default::default()
        };
        let base = only_rank.resolve(Task::Classification, &facts(100, &[10; 100]));
        assert_eq!(
            only_rank.search_grid(&base, 64),
            vec![(1.0, 8), (1.0, 16), (1.0, 4)]
        );
        // Never past what the serving fleet loads.
        assert_eq!(only_rank.search_grid(&base, 8), vec![(1.0, 8), (1.0, 4)]);
    }
}

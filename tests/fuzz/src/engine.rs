//! The mutational engine: a seeded generator, byte and structure-aware mutators, and the loop
//! that runs a target under `catch_unwind`, counting executions and findings.
//!
//! There is no coverage feedback on stable Rust, so the corpus grows by the one signal every
//! target gives: a mutant the parser *accepted* joins the corpus (bounded), so later mutants
//! start from valid-but-unusual inputs and reach past the first check.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::fixtures::Fixtures;

/// splitmix64: small, fast and the same on every machine, so a seed replays a run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A test case: one byte string per file (or argument) the target reads.
pub type Input = Vec<Vec<u8>>;

/// What a part holds, which decides the structure-aware mutators it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Text,
    Json,
    Safetensors,
}

/// Whether the code under test took the input or refused it with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused,
}

impl Verdict {
    pub fn of<T, E>(r: &Result<T, E>) -> Self {
        if r.is_ok() {
            Verdict::Accepted
        } else {
            Verdict::Refused
        }
    }
}

/// What a target's run sees besides its input.
pub struct Ctx<'a> {
    pub fixtures: &'a Fixtures,
    /// A directory of this target's own, kept across executions.
    pub scratch: &'a Path,
}

impl Ctx<'_> {
    /// Writes `bytes` to `scratch/name` and returns the path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.scratch.join(name);
        std::fs::write(&path, bytes).expect("writing to the scratch directory");
        path
    }

    /// Writes each part under its name in `scratch/dir`; an empty part removes the file, so
    /// "the file is absent" is an input too.
    pub fn dir_of(&self, dir: &str, names: &[&str], input: &Input) -> PathBuf {
        let dir = self.scratch.join(dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        for (name, bytes) in names.iter().zip(input) {
            let path = dir.join(name);
            if bytes.is_empty() {
                let _ = std::fs::remove_file(&path);
            } else {
                std::fs::write(&path, bytes).expect("writing to the scratch directory");
            }
        }
        dir
    }
}

/// One fuzz target: real parsing code fed mutated inputs.
pub struct Target {
    pub name: &'static str,
    /// What it exercises, for `--list` and the README.
    pub about: &'static str,
    /// The parts of an input: a name (a file name where the target writes a file) and kind.
    pub parts: &'static [(&'static str, Part)],
    /// Tokens the mutators insert (field names, keywords, syntax).
    pub dict: &'static [&'static str],
    /// Mutants of a part are cut to this many bytes.
    pub max_len: usize,
    /// Valid inputs built from the project's own fixtures; each must be accepted.
    pub seeds: fn(&Fixtures) -> Vec<Input>,
    pub run: fn(&Ctx<'_>, &Input) -> Verdict,
}

impl Target {
    pub fn part_names(&self) -> Vec<&'static str> {
        self.parts.iter().map(|(n, _)| *n).collect()
    }
}

/// When a run stops: at a deadline, after a number of executions, or both (whichever first).
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    pub time: Option<Duration>,
    pub execs: Option<u64>,
}

/// A panic caught while running a target.
#[derive(Debug, Clone)]
pub struct Finding {
    pub target: String,
    /// `file:line:col` of the panic: findings are told apart by it.
    pub location: String,
    pub message: String,
    /// The input, framed as [`frame`] writes it.
    pub input: Vec<u8>,
    /// Where it was saved, if it was.
    pub saved: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub target: String,
    pub seed: u64,
    pub execs: u64,
    pub accepted: u64,
    /// Executions that panicked.
    pub findings: u64,
    /// One per distinct panic location.
    pub distinct: Vec<Finding>,
    pub elapsed: Duration,
    pub corpus: usize,
}

impl Stats {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How a run reports and records.
#[derive(Default)]
pub struct Options<'a> {
    pub seed: u64,
    pub budget: Budget,
    /// Save each distinct finding under `crash_dir/<target>/<sha256 prefix>`.
    pub crash_dir: Option<PathBuf>,
    /// Written with the input before each execution, so a supervisor can name the input that
    /// killed the process (an abort, a stack overflow, a hang).
    pub journal: Option<File>,
    /// Called about once a second.
    pub progress: Option<&'a mut dyn FnMut(&Stats)>,
}

const FRAME_MAGIC: &[u8] = b"FLYWHEEL-FUZZ-PARTS\n";

/// An input as one byte string: a single part as it is (a crasher is then the very file),
/// several as `FLYWHEEL-FUZZ-PARTS\n` and, per part, its length in decimal, `\n`, its bytes.
pub fn frame(input: &Input) -> Vec<u8> {
    if input.len() == 1 {
        return input[0].clone();
    }
    let mut out = FRAME_MAGIC.to_vec();
    for part in input {
        out.extend_from_slice(format!("{}\n", part.len()).as_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The inverse of [`frame`], for an input of `parts` parts.
pub fn unframe(raw: &[u8], parts: usize) -> Result<Input, String> {
    if parts == 1 {
        return Ok(vec![raw.to_vec()]);
    }
    let mut rest = raw
        .strip_prefix(FRAME_MAGIC)
        .ok_or("a multi-part input starts with FLYWHEEL-FUZZ-PARTS")?;
    let mut out = Vec::new();
    for i in 0..parts {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(format!("part {i}: no length"))?;
        let len: usize = std::str::from_utf8(&rest[..nl])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(format!("part {i}: bad length"))?;
        rest = &rest[nl + 1..];
        if rest.len() < len {
            return Err(format!("part {i}: truncated"));
        }
        out.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    Ok(out)
}

/// The last panic's location and message, set by the hook [`quiet_panics`] installs.
static LAST_PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

/// Replaces the panic hook with one that records the panic instead of printing it: a fuzz run
/// panics by design and reports each finding once.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown".into());
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let mut last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        // The first panic is the cause; a pool re-raising it elsewhere is not news.
        if last.is_none() {
            *last = Some((location, message));
        }
    }));
}

/// Runs `input` through `target` once: `Ok(verdict)`, or `Err((location, message))` if it
/// panicked.
pub fn execute(target: &Target, ctx: &Ctx<'_>, input: &Input) -> Result<Verdict, (String, String)> {
    LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    match catch_unwind(AssertUnwindSafe(|| (target.run)(ctx, input))) {
        Ok(v) => Ok(v),
        Err(_) => Err(LAST_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| ("unknown".into(), "panic without a hook record".into()))),
    }
}

/// The file name a finding is saved under: the first 16 hex digits of its input's sha256.
pub fn crasher_name(framed: &[u8]) -> String {
    hex::encode(Sha256::digest(framed))[..16].to_owned()
}

/// Saves a finding's input as `dir/<target>/<sha256 prefix>`, with what it did beside it in
/// `<prefix>.txt`.
pub fn save_crasher(
    dir: &Path,
    target: &str,
    framed: &[u8],
    what: &str,
) -> std::io::Result<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(crasher_name(framed));
    std::fs::write(&path, framed)?;
    std::fs::write(path.with_extension("txt"), format!("{what}\n"))?;
    Ok(path)
}

/// Most entries the corpus grows to (seeds included).
const MAX_CORPUS: usize = 512;

/// Fuzzes `target` until the budget is spent. `Err` if the target cannot be fuzzed honestly:
/// a seed it refuses (it would pass by refusing everything) or no seeds at all.
pub fn fuzz(target: &Target, fixtures: &Fixtures, mut opts: Options<'_>) -> Result<Stats, String> {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("flywheel-fuzz-{}-", target.name))
        .tempdir()
        .map_err(|e| format!("scratch directory: {e}"))?;
    let ctx = Ctx {
        fixtures,
        scratch: scratch.path(),
    };
    let mut stats = Stats {
        target: target.name.into(),
        seed: opts.seed,
        ..Default::default()
    };
    let start = Instant::now();
    let seeds = (target.seeds)(fixtures);
    if seeds.is_empty() {
        return Err(format!("{}: no seeds", target.name));
    }
    let record = |stats: &mut Stats, input: &Input, (location, message): (String, String)| {
        stats.findings += 1;
        if stats.distinct.iter().any(|f| f.location == location) {
            return;
        }
        let framed = frame(input);
        let saved = opts.crash_dir.as_ref().and_then(|dir| {
            save_crasher(
                dir,
                target.name,
                &framed,
                &format!("panicked at {location}: {message}"),
            )
            .ok()
        });
        stats.distinct.push(Finding {
            target: target.name.into(),
            location,
            message,
            input: framed,
            saved,
        });
    };
    let journal = |input: &Input| {
        if let Some(file) = &opts.journal {
            let framed = frame(input);
            let mut buf = (framed.len() as u64).to_le_bytes().to_vec();
            buf.extend_from_slice(&framed);
            let _ = file.write_all_at(&buf, 0);
        }
    };
    for (i, seed) in seeds.iter().enumerate() {
        if seed.len() != target.parts.len() {
            return Err(format!(
                "{}: seed {i} has {} parts, not {}",
                target.name,
                seed.len(),
                target.parts.len()
            ));
        }
        journal(seed);
        stats.execs += 1;
        match execute(target, &ctx, seed) {
            Ok(Verdict::Accepted) => stats.accepted += 1,
            Ok(Verdict::Refused) => {
                return Err(format!(
                    "{}: seed {i} is refused; a target must accept its seeds, or it could pass \
                     by refusing everything",
                    target.name
                ));
            }
            Err(panic) => record(&mut stats, seed, panic),
        }
    }
    let mut rng = Rng::new(opts.seed);
    let mut corpus = seeds.clone();
    let mut next_report = start + Duration::from_secs(1);
    let deadline = opts.budget.time.map(|t| start + t);
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d)
            || opts.budget.execs.is_some_and(|n| stats.execs >= n)
            || (deadline.is_none() && opts.budget.execs.is_none())
        {
            break;
        }
        if now >= next_report {
            next_report = now + Duration::from_secs(1);
            stats.elapsed = now - start;
            stats.corpus = corpus.len();
            if let Some(progress) = opts.progress.as_mut() {
                progress(&stats);
            }
        }
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, target, &mut input, &corpus);
        journal(&input);
        stats.execs += 1;
        match execute(target, &ctx, &input) {
            Ok(Verdict::Accepted) => {
                stats.accepted += 1;
                if rng.one_in(4) {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        // Seeds stay; a grown entry makes room.
                        let i = seeds.len() + rng.below(corpus.len() - seeds.len());
                        corpus[i] = input;
                    }
                }
            }
            Ok(Verdict::Refused) => {}
            Err(panic) => record(&mut stats, &input, panic),
        }
    }
    stats.elapsed = start.elapsed();
    stats.corpus = corpus.len();
    if let Some(progress) = opts.progress.as_mut() {
        progress(&stats);
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Mutators.

/// Numbers at the edges of the types parsers convert them to.
pub const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "7",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1e308",
    "1e309",
    "-1e308",
    "5e-324",
    "1e-400",
    "0.0",
    "-0.0",
    "0.5",
    "0.05",
    "1.0000000000000002",
    "99999999999999999999999999999",
    "NaN",
    "Infinity",
];

/// Characters that change length or meaning under Unicode operations.
const UNICODE: &[&str] = &[
    "\u{0130}", // İ: lowercases to two chars
    "\u{1E9E}", // ẞ
    "ß",
    "\u{200B}",   // zero-width space
    "\u{00A0}",   // no-break space (whitespace to split_whitespace)
    "\u{2028}",   // line separator
    "\u{202E}",   // right-to-left override
    "\u{FEFF}",   // byte-order mark
    "\u{0301}",   // combining acute
    "\u{10FFFF}", // the last code point
    "\u{1F600}",  // outside the BMP
    "٣",          // an Arabic-Indic digit: a digit to char::is_numeric, not to is_ascii_digit
    "０",         // a fullwidth digit
    "\r\n",
    "\t",
    "\0",
];

/// Mutates `input` in place: usually one part, a stack of 1 to 8 mutations.
pub fn mutate(rng: &mut Rng, target: &Target, input: &mut Input, corpus: &[Input]) {
    let p = rng.below(input.len());
    let kind = target.parts[p].1;
    // Structure-aware mutations keep the outer format valid so the parser gets past it.
    let structured = match kind {
        Part::Json if rng.one_in(3) => json_mutation(rng, target, &mut input[p]),
        Part::Safetensors if rng.one_in(2) => safetensors_mutation(rng, target, &mut input[p]),
        _ => false,
    };
    if !structured || rng.one_in(4) {
        let stack = 1 << rng.below(4);
        for _ in 0..stack {
            byte_mutation(rng, target, p, input, corpus);
        }
    }
    for part in input.iter_mut() {
        part.truncate(target.max_len);
    }
}

fn byte_mutation(rng: &mut Rng, target: &Target, p: usize, input: &mut Input, corpus: &[Input]) {
    let data = &mut input[p];
    let len = data.len();
    match rng.below(15) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Set a byte, usually to an interesting one.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(&[
                0u8, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'\n',
                b' ', b'*', b'/', b'-', b'0', b'9', b'%', b'@', b'.',
            ]);
            if rng.one_in(3) {
                data[i] = rng.next_u64() as u8;
            }
        }
        // Insert random bytes.
        2 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        // Delete a range.
        3 if len > 0 => {
            let i = rng.below(len);
            let cap = if rng.one_in(4) { len } else { 16 };
            let n = 1 + rng.below((len - i).min(cap));
            data.drain(i..i + n);
        }
        // Duplicate a range in place.
        4 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        // Splice with the same part of another corpus entry.
        5 => {
            let other = &rng.pick(corpus)[p];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let to = from + rng.below(other.len() - from + 1);
                let at = rng.below(len + 1);
                if rng.one_in(2) {
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                } else {
                    data.splice(at..at, other[from..to].iter().copied());
                }
            }
        }
        // Insert a dictionary token.
        6 | 7 if !target.dict.is_empty() => {
            let token = rng.pick(target.dict).as_bytes();
            let at = rng.below(len + 1);
            if rng.one_in(3) && len > 0 {
                let end = (at + token.len()).min(len);
                data.splice(at..end, token.iter().copied());
            } else {
                data.splice(at..at, token.iter().copied());
            }
        }
        // Truncate.
        8 if len > 0 => data.truncate(rng.below(len)),
        // Replace a run of digits with a boundary number.
        9 => {
            let starts: Vec<usize> = (0..len)
                .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
                .collect();
            if !starts.is_empty() {
                let i = *rng.pick(&starts);
                let mut j = i;
                while j < len && (data[j].is_ascii_digit() || data[j] == b'.') {
                    j += 1;
                }
                let n = rng.pick(INTERESTING_NUMBERS).as_bytes();
                data.splice(i..j, n.iter().copied());
            }
        }
        // Overwrite 1, 2, 4 or 8 bytes with a boundary integer, little-endian.
        10 if len > 0 => {
            let width = 1 << rng.below(4);
            let v: u64 = *rng.pick(&[
                0,
                1,
                u64::MAX,
                0x7f,
                0x80,
                0xff,
                0x7fff,
                0x8000,
                0xffff,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_ffff,
                i64::MAX as u64,
                i64::MIN as u64,
            ]);
            let at = rng.below(len);
            for (k, b) in v.to_le_bytes().iter().take(width).enumerate() {
                if at + k < len {
                    data[at + k] = *b;
                }
            }
        }
        // A character Unicode treats specially.
        11 => {
            let at = rng.below(len + 1);
            data.splice(at..at, rng.pick(UNICODE).bytes());
        }
        // Repeat a chunk many times: long inputs, deep nesting.
        12 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(8));
            let chunk = data[i..i + n].to_vec();
            let cap = if rng.one_in(8) { 4096 } else { 64 };
            let times = 1 + rng.below(cap);
            let at = rng.below(len + 1);
            let repeated: Vec<u8> = chunk.iter().copied().cycle().take(n * times).collect();
            data.splice(at..at, repeated);
        }
        // Swap two bytes.
        13 if len > 1 => {
            let (i, j) = (rng.below(len), rng.below(len));
            data.swap(i, j);
        }
        // Replace the whole part with another entry's (cross-over of parts).
        14 if input.len() > 1 => {
            input[p] = rng.pick(corpus)[p].clone();
        }
        _ => {}
    }
}

/// A JSON value at the edges of what a field expects.
fn interesting_json(rng: &mut Rng, target: &Target) -> serde_json::Value {
    use serde_json::{Value, json};
    match rng.below(12) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => json!(*rng.pick(&[0u64, 1, 2, 255, 256, 65536, u32::MAX as u64, u64::MAX])),
        3 => json!(*rng.pick(&[-1i64, i64::MIN, i64::MAX, -65536])),
        4 => json!(*rng.pick(&[
            0.0f64,
            -0.0,
            0.5,
            1e-300,
            1e300,
            f64::MAX,
            f64::MIN_POSITIVE,
            0.049999,
            0.5000001,
            10.000001
        ])),
        5 => json!([]),
        6 => json!({}),
        7 => json!(""),
        8 => Value::String(rng.pick(UNICODE).repeat(1 + rng.below(4))),
        9 if !target.dict.is_empty() => {
            let t = rng.pick(target.dict);
            Value::String(t.trim_matches('"').to_owned())
        }
        10 => Value::String("x".repeat(1 << rng.below(14))),
        _ => json!([null, 1, "a", {"k": []}]),
    }
}

/// Parses the part as JSON and changes one node: replaces, deletes, duplicates, renames or
/// adds. `false` if the part is not JSON.
fn json_mutation(rng: &mut Rng, target: &Target, data: &mut Vec<u8>) -> bool {
    use serde_json::Value;
    let Ok(mut root) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    // Walk to a random node, choosing a child at each level with some chance to stop.
    fn walk<'a>(rng: &mut Rng, v: &'a mut Value, depth: usize) -> &'a mut Value {
        let n = match v {
            Value::Object(m) => m.len(),
            Value::Array(a) => a.len(),
            _ => 0,
        };
        if n == 0 || (depth > 0 && rng.one_in(3)) {
            return v;
        }
        let i = rng.below(n);
        match v {
            Value::Object(m) => {
                let v = m.values_mut().nth(i).expect("in range");
                walk(rng, v, depth + 1)
            }
            Value::Array(a) => walk(rng, &mut a[i], depth + 1),
            _ => unreachable!(),
        }
    }
    let node = walk(rng, &mut root, 0);
    match node {
        Value::Object(m) if !m.is_empty() && rng.one_in(2) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.below(4) {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    let v = interesting_json(rng, target);
                    m.insert(key, v);
                }
                2 => {
                    // Rename a key.
                    let v = m.remove(&key).expect("present");
                    let new = if target.dict.is_empty() {
                        format!("{key}_")
                    } else {
                        rng.pick(target.dict).trim_matches('"').to_owned()
                    };
                    m.insert(new, v);
                }
                _ => {
                    let new = if target.dict.is_empty() {
                        "extra".to_owned()
                    } else {
                        rng.pick(target.dict).trim_matches('"').to_owned()
                    };
                    let v = interesting_json(rng, target);
                    m.insert(new, v);
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.one_in(2) => {
            let i = rng.below(a.len());
            match rng.below(3) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let v = a[i].clone();
                    a.insert(i, v);
                }
                _ => a[i] = interesting_json(rng, target),
            }
        }
        Value::Number(n) if rng.one_in(2) => {
            // Near the number: off by one, doubled, negated, as a float or a string.
            let f = n.as_f64().unwrap_or(0.0);
            *node = match rng.below(6) {
                0 => serde_json::json!(n.as_i64().unwrap_or(0).wrapping_add(1)),
                1 => serde_json::json!(n.as_i64().unwrap_or(0).wrapping_sub(1)),
                2 => serde_json::json!(f * 2.0),
                3 => serde_json::json!(-f),
                4 => serde_json::json!(f + 0.5),
                _ => Value::String(n.to_string()),
            };
        }
        Value::String(s) if rng.one_in(2) => {
            let mut bytes = std::mem::take(s).into_bytes();
            let at = rng.below(bytes.len() + 1);
            let token = if rng.one_in(2) && !target.dict.is_empty() {
                rng.pick(target.dict).to_string()
            } else {
                rng.pick(UNICODE).to_string()
            };
            bytes.splice(at..at, token.bytes());
            *s = String::from_utf8_lossy(&bytes).into_owned();
        }
        other => *other = interesting_json(rng, target),
    }
    *data = if rng.one_in(2) {
        serde_json::to_vec(&root)
    } else {
        serde_json::to_vec_pretty(&root)
    }
    .expect("a Value serializes");
    true
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Rewrites a safetensors file's header: a tensor's shape, dtype, name or offsets changes,
/// and usually the data is laid out again to match, so the file stays loadable and the
/// shapes reach the code that uses them. `false` if the part is not safetensors.
fn safetensors_mutation(rng: &mut Rng, target: &Target, data: &mut Vec<u8>) -> bool {
    use serde_json::{Map, Value, json};
    if data.len() < 8 {
        return false;
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    if n > data.len() - 8 {
        return false;
    }
    let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(&data[8..8 + n]) else {
        return false;
    };
    let body = data[8 + n..].to_vec();
    let metadata = header.remove("__metadata__");
    // name -> (dtype, shape, bytes)
    let mut tensors: Vec<(String, Value)> = header.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    if tensors.is_empty() {
        return false;
    }
    let i = rng.below(tensors.len());
    match rng.below(7) {
        0 | 1 => {
            let entry = &mut tensors[i].1;
            // Reshape: drop a dimension, add one, or set one to an edge value.
            if let Some(Value::Array(shape)) = entry.get_mut("shape") {
                match rng.below(4) {
                    0 if !shape.is_empty() => {
                        shape.remove(rng.below(shape.len()));
                    }
                    1 => {
                        let at = rng.below(shape.len() + 1);
                        shape.insert(at, json!(*rng.pick(&[0u64, 1, 2, 4])));
                    }
                    2 if !shape.is_empty() => {
                        let at = rng.below(shape.len());
                        shape[at] = json!(*rng.pick(&[0u64, 1, 2, 3, 4, 8, 16, 32, 64, 65]));
                    }
                    _ => shape.clear(),
                }
            }
        }
        2 => {
            tensors[i].1["dtype"] = json!(*rng.pick(&[
                "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "I8", "F8_E4M3", "U64",
                "Q4"
            ]));
        }
        3 => {
            // Rename: to a dictionary token, or swap A and B.
            let name = &tensors[i].0;
            let new = if rng.one_in(2) && name.contains("lora_A") {
                name.replace("lora_A", "lora_B")
            } else if rng.one_in(2) && name.contains("lora_B") {
                name.replace("lora_B", "lora_A")
            } else if !target.dict.is_empty() {
                let t = rng.pick(target.dict).trim_matches('"');
                if rng.one_in(2) {
                    format!("{name}{t}")
                } else {
                    t.to_owned()
                }
            } else {
                format!("{name}.x")
            };
            tensors[i].0 = new;
        }
        4 if tensors.len() > 1 => {
            tensors.remove(i);
        }
        5 => {
            let copy = tensors[i].clone();
            tensors.push((format!("{}.copy", copy.0), copy.1));
        }
        _ => {
            // Offsets as they are, pointing anywhere.
            if let Some(Value::Array(off)) = tensors[i].1.get_mut("data_offsets")
                && !off.is_empty()
            {
                let at = rng.below(off.len());
                off[at] = json!(*rng.pick(&[0u64, 1, 3, 4, 1 << 20, u64::MAX]));
            }
        }
    }
    // Lay the data out again to match the header, unless left broken on purpose.
    let mut new_body = Vec::new();
    let relayout = !rng.one_in(4);
    if relayout {
        for (_, entry) in &mut tensors {
            let dtype = entry["dtype"].as_str().unwrap_or("F32").to_owned();
            let count: Option<usize> = entry["shape"].as_array().and_then(|s| {
                s.iter()
                    .try_fold(1usize, |acc, d| acc.checked_mul(d.as_u64()? as usize))
            });
            let bytes = match (count, dtype_size(&dtype)) {
                (Some(c), Some(w)) => c.checked_mul(w),
                _ => None,
            };
            let Some(bytes) = bytes.filter(|&b| b <= 1 << 22) else {
                continue;
            };
            let start = new_body.len();
            // Old bytes where there are any, so values stay plausible.
            let old: Vec<u8> = body.iter().copied().skip(start).take(bytes).collect();
            new_body.extend_from_slice(&old);
            new_body.resize(start + bytes, 0);
            entry["data_offsets"] = json!([start, start + bytes]);
        }
    } else {
        new_body = body;
    }
    let mut map = Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m);
    }
    for (name, entry) in tensors {
        map.insert(name, entry);
    }
    let mut head = serde_json::to_vec(&Value::Object(map)).expect("a Value serializes");
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&new_body);
    *data = out;
    true
}

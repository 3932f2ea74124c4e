//! `fuzz`: runs each target for a bounded time and prints a table of executions and findings.
//!
//! ```text
//! cargo run -p flywheel-fuzz -- --seconds N [--target NAME]... [--seed S]
//! cargo run -p flywheel-fuzz -- --list
//! cargo run -p flywheel-fuzz -- --replay FILE --target NAME
//! ```
//!
//! Each target runs in a child process (this binary with `--child`), under a 6 GiB
//! address-space limit, that writes every input to a journal before running it: a panic is
//! caught in the child and saved there; an abort (an allocation that fails, a stack overflow)
//! or a hang (no progress for 60 s) kills the child, and this process saves the journal's
//! input as the crasher and restarts the target for the rest of its time. Exits 1 on any
//! finding, 2 on a usage or set-up error.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flywheel_fuzz::engine::{self, Budget, Finding, Options, Stats};
use flywheel_fuzz::targets::{self, TARGETS};
use flywheel_fuzz::{Fixtures, Target};

struct Args {
    seconds: Option<u64>,
    execs: Option<u64>,
    targets: Vec<&'static Target>,
    seed: u64,
    crash_dir: PathBuf,
    child: bool,
    journal: Option<PathBuf>,
    replay: Option<PathBuf>,
    in_process: bool,
    list: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "error: {msg}\nusage: fuzz [--seconds N] [--execs N] [--target NAME]... [--seed S] \
         [--crash-dir DIR] [--in-process] | --list | --replay FILE --target NAME"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: None,
        execs: None,
        targets: Vec::new(),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        crash_dir: flywheel_fuzz::crash_dir(),
        child: false,
        journal: None,
        replay: None,
        in_process: false,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let number = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: `{v}` is not a number")))
        };
        match flag.as_str() {
            "--seconds" => args.seconds = Some(number(value())),
            "--execs" => args.execs = Some(number(value())),
            "--seed" => args.seed = number(value()),
            "--target" => {
                for name in value().split(',') {
                    args.targets.push(
                        targets::by_name(name)
                            .unwrap_or_else(|| usage(&format!("no target `{name}` (see --list)"))),
                    );
                }
            }
            "--crash-dir" => args.crash_dir = value().into(),
            "--journal" => args.journal = Some(value().into()),
            "--replay" => args.replay = Some(value().into()),
            "--child" => args.child = true,
            "--in-process" => args.in_process = true,
            "--list" => args.list = true,
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    if args.targets.is_empty() {
        args.targets = TARGETS.iter().collect();
    }
    args
}

/// Each target's own seed, derived from the run's, so `--target X --seed S` replays the
/// same sequence as X's part of a full run with seed S.
fn target_seed(seed: u64, target: &Target) -> u64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(target.name.as_bytes());
    seed ^ u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

fn main() {
    let args = parse_args();
    if args.list {
        for t in TARGETS {
            println!("{:<18} {}", t.name, t.about);
        }
        return;
    }
    if let Some(file) = &args.replay {
        std::process::exit(replay(&args, file));
    }
    if args.seconds.is_none() && args.execs.is_none() {
        usage("give --seconds or --execs");
    }
    let budget = Budget {
        time: args.seconds.map(Duration::from_secs),
        execs: args.execs,
    };
    if args.child {
        std::process::exit(child(&args, budget));
    }
    println!(
        "fuzz: seed {} · {} target(s) · {} each · findings to {}",
        args.seed,
        args.targets.len(),
        match (args.seconds, args.execs) {
            (Some(s), Some(n)) => format!("{s} s or {n} executions"),
            (Some(s), None) => format!("{s} s"),
            (None, Some(n)) => format!("{n} executions"),
            (None, None) => unreachable!(),
        },
        args.crash_dir.display()
    );
    let mut all = Vec::new();
    let fixtures = if args.in_process {
        engine::quiet_panics();
        Some(Fixtures::build().unwrap_or_else(|e| {
            eprintln!("error: building fixtures: {e}");
            std::process::exit(2)
        }))
    } else {
        None
    };
    for target in &args.targets {
        let seed = target_seed(args.seed, target);
        let stats = match &fixtures {
            Some(f) => engine::fuzz(
                target,
                f,
                Options {
                    seed,
                    budget,
                    crash_dir: Some(args.crash_dir.clone()),
                    ..Default::default()
                },
            ),
            None => supervise(&args, target, seed, budget),
        };
        let stats = stats.unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        });
        eprintln!(
            "  {:<18} {:>12} execs {:>10.0}/s {:>4} finding(s)",
            stats.target,
            stats.execs,
            stats.execs_per_sec(),
            stats.findings
        );
        for f in &stats.distinct {
            eprintln!(
                "    finding: {} at {}: {}{}",
                f.target,
                f.location,
                f.message,
                f.saved
                    .as_ref()
                    .map(|p| format!(" (saved to {})", p.display()))
                    .unwrap_or_default()
            );
        }
        all.push(stats);
    }
    print_table(&all);
    if all.iter().any(|s| s.findings > 0) {
        std::process::exit(1);
    }
}

fn print_table(all: &[Stats]) {
    println!();
    println!("| target | executions | execs/s | accepted | findings |");
    println!("|---|---:|---:|---:|---:|");
    for s in all {
        println!(
            "| {} | {} | {:.0} | {:.1}% | {} |",
            s.target,
            s.execs,
            s.execs_per_sec(),
            100.0 * s.accepted as f64 / s.execs.max(1) as f64,
            s.findings
        );
    }
    let execs: u64 = all.iter().map(|s| s.execs).sum();
    let secs: f64 = all.iter().map(|s| s.elapsed.as_secs_f64()).sum();
    let accepted: u64 = all.iter().map(|s| s.accepted).sum();
    let findings: u64 = all.iter().map(|s| s.findings).sum();
    println!(
        "| **total** | **{execs}** | {:.0} | {:.1}% | **{findings}** |",
        execs as f64 / secs.max(1e-9),
        100.0 * accepted as f64 / execs.max(1) as f64
    );
}

fn replay(args: &Args, file: &PathBuf) -> i32 {
    let [target] = args.targets.as_slice() else {
        usage("--replay needs exactly one --target");
    };
    let raw = std::fs::read(file).unwrap_or_else(|e| usage(&format!("{}: {e}", file.display())));
    // With RUST_BACKTRACE set, the default hook prints where it panicked from.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        engine::quiet_panics();
    }
    let fixtures = Fixtures::build().unwrap_or_else(|e| usage(&format!("fixtures: {e}")));
    match flywheel_fuzz::replay(target, &fixtures, &raw) {
        Err(e) => usage(&e),
        Ok(Ok(verdict)) => {
            println!("{}: no panic ({verdict:?})", target.name);
            0
        }
        Ok(Err((location, message))) => {
            println!("{}: panicked at {location}: {message}", target.name);
            1
        }
    }
}

/// The child: fuzzes one target in this process, printing `progress` lines and, at the end,
/// `done` with the stats as JSON.
fn child(args: &Args, budget: Budget) -> i32 {
    let [target] = args.targets.as_slice() else {
        usage("--child needs exactly one --target");
    };
    engine::quiet_panics();
    let fixtures = match Fixtures::build() {
        Ok(f) => f,
        Err(e) => {
            println!("error fixtures: {e}");
            return 2;
        }
    };
    let journal = args.journal.as_ref().map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(p)
            .unwrap_or_else(|e| usage(&format!("journal {}: {e}", p.display())))
    });
    let mut progress = |s: &Stats| {
        println!("progress {} {} {}", s.execs, s.accepted, s.findings);
    };
    let result = engine::fuzz(
        target,
        &fixtures,
        Options {
            seed: args.seed,
            budget,
            crash_dir: Some(args.crash_dir.clone()),
            journal,
            progress: Some(&mut progress),
        },
    );
    match result {
        Ok(s) => {
            let distinct: Vec<serde_json::Value> = s
                .distinct
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "location": f.location,
                        "message": f.message,
                        "saved": f.saved,
                    })
                })
                .collect();
            println!(
                "done {}",
                serde_json::json!({
                    "execs": s.execs,
                    "accepted": s.accepted,
                    "findings": s.findings,
                    "elapsed": s.elapsed.as_secs_f64(),
                    "corpus": s.corpus,
                    "distinct": distinct,
                })
            );
            0
        }
        Err(e) => {
            println!("error {e}");
            2
        }
    }
}

/// Limit on a child's address space: an input that makes the code allocate without bound
/// fails there (and is saved) instead of starving the machine.
const CHILD_ADDRESS_SPACE: u64 = 6 << 30;
/// A child silent this long is hung on its current input.
const HANG: Duration = Duration::from_secs(60);

/// Runs `target` in child processes until its budget is spent; an abort or a hang is a
/// finding, its input taken from the child's journal.
fn supervise(args: &Args, target: &Target, seed: u64, budget: Budget) -> Result<Stats, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let journal = work.path().join("journal");
    let start = Instant::now();
    let mut total = Stats {
        target: target.name.into(),
        seed,
        ..Default::default()
    };
    for restart in 0u64.. {
        let left_time = budget.time.map(|t| t.saturating_sub(start.elapsed()));
        let left_execs = budget.execs.map(|n| n.saturating_sub(total.execs));
        if restart > 0
            && (left_time.is_some_and(|t| t < Duration::from_secs(2))
                || left_execs == Some(0)
                || restart > 3)
        {
            break;
        }
        let stderr_path = work.path().join("stderr");
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--as={CHILD_ADDRESS_SPACE}"))
            .arg("--")
            .arg(&exe);
        if std::process::Command::new("prlimit")
            .arg("--version")
            .output()
            .is_err()
        {
            cmd = Command::new(&exe);
        }
        cmd.arg("--child")
            .arg("--target")
            .arg(target.name)
            .arg("--seed")
            .arg(seed.wrapping_add(restart).to_string())
            .arg("--crash-dir")
            .arg(&args.crash_dir)
            .arg("--journal")
            .arg(&journal)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?);
        if let Some(t) = left_time {
            cmd.arg("--seconds").arg(t.as_secs().max(1).to_string());
        }
        if let Some(n) = left_execs {
            cmd.arg("--execs").arg(n.to_string());
        }
        let mut proc = cmd
            .spawn()
            .map_err(|e| format!("starting the child: {e}"))?;
        let stdout = proc.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut last = (0u64, 0u64, 0u64);
        let mut done: Option<serde_json::Value> = None;
        let mut error = None;
        let mut heard = Instant::now();
        let mut hung = false;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    heard = Instant::now();
                    if let Some(rest) = line.strip_prefix("progress ") {
                        let n: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                        if let [e, a, f] = n[..] {
                            last = (e, a, f);
                        }
                    } else if let Some(rest) = line.strip_prefix("done ") {
                        done = serde_json::from_str(rest).ok();
                    } else if let Some(rest) = line.strip_prefix("error ") {
                        error = Some(rest.to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Fixtures take a few seconds before the first line.
                    if heard.elapsed() > HANG {
                        hung = true;
                        let _ = proc.kill();
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = proc.wait().map_err(|e| e.to_string())?;
        if let Some(e) = error {
            return Err(e);
        }
        if let Some(d) = done {
            total.execs += d["execs"].as_u64().unwrap_or(0);
            total.accepted += d["accepted"].as_u64().unwrap_or(0);
            total.findings += d["findings"].as_u64().unwrap_or(0);
            total.corpus = d["corpus"].as_u64().unwrap_or(0) as usize;
            for f in d["distinct"].as_array().into_iter().flatten() {
                total.distinct.push(Finding {
                    target: target.name.into(),
                    location: f["location"].as_str().unwrap_or_default().into(),
                    message: f["message"].as_str().unwrap_or_default().into(),
                    input: Vec::new(),
                    saved: f["saved"].as_str().map(PathBuf::from),
                });
            }
            if status.success() {
                break;
            }
            continue;
        }
        // The child died (or hung) on the input in its journal.
        total.execs += last.0;
        total.accepted += last.1;
        total.findings += last.2 + 1;
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
        let what = if hung {
            format!("hang: no progress for {} s", HANG.as_secs())
        } else {
            format!("the process died ({status}): {tail}")
        };
        let raw = std::fs::read(&journal).unwrap_or_default();
        let framed = raw
            .get(..8)
            .map(|n| u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize)
            .and_then(|n| raw.get(8..8 + n))
            .unwrap_or_default()
            .to_vec();
        let saved = engine::save_crasher(&args.crash_dir, target.name, &framed, &what).ok();
        total.distinct.push(Finding {
            target: target.name.into(),
            location: if hung { "hang" } else { "abort" }.into(),
            message: what,
            input: framed,
            saved,
        });
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

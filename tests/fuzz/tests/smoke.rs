//! The short fuzz run CI does inside `cargo test`: every target for a bounded number of
//! executions with a fixed seed, each seed accepted, no panic; and every saved crasher
//! replayed as a regression test.

use std::sync::OnceLock;
use std::time::Duration;

use flywheel_fuzz::engine::{self, Budget, Options};
use flywheel_fuzz::targets::{self, TARGETS};
use flywheel_fuzz::{Fixtures, Verdict};

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::build().expect("fixtures"))
}

/// Each target runs this long (or until its execution cap), one after another: about 20 s
/// for the lot on 2 cores.
const PER_TARGET: Duration = Duration::from_millis(1200);

#[test]
fn every_target_runs_clean_for_a_moment() {
    engine::quiet_panics();
    let fixtures = fixtures();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for target in TARGETS {
        let stats = engine::fuzz(
            target,
            fixtures,
            Options {
                seed: 20,
                budget: Budget {
                    time: Some(PER_TARGET),
                    execs: Some(200_000),
                },
                // A finding here is reported by the assertion below, not saved.
                crash_dir: None,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        report.push(format!(
            "{}: {} executions, {} accepted, {} findings",
            stats.target, stats.execs, stats.accepted, stats.findings
        ));
        for f in &stats.distinct {
            failures.push(format!(
                "{} panicked at {}: {} (input: {:?})",
                f.target,
                f.location,
                f.message,
                String::from_utf8_lossy(&f.input[..f.input.len().min(2000)])
            ));
        }
        assert!(
            stats.execs > 10,
            "{} ran only {} times",
            stats.target,
            stats.execs
        );
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every file under `crashers/<target>/` (but the `.txt` notes) is an input that once made
/// its target panic: it must not any more.
#[test]
fn saved_crashers_no_longer_panic() {
    engine::quiet_panics();
    let dir = flywheel_fuzz::crash_dir();
    let mut replayed = 0;
    let mut failures = Vec::new();
    for target in TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(target.name)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("crashers").path();
            if path.extension().is_some() {
                continue;
            }
            let raw = std::fs::read(&path).expect("crasher");
            match flywheel_fuzz::replay(target, fixtures(), &raw).expect("a valid crasher") {
                Ok(_) => replayed += 1,
                Err((location, message)) => failures.push(format!(
                    "{}: still panics at {location}: {message}",
                    path.display()
                )),
            }
        }
    }
    println!("{replayed} crashers replayed");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mutators are deterministic given a seed: a run can be replayed from its printed seed.
#[test]
fn a_seed_replays_the_same_mutants() {
    let target = targets::by_name("correction_json").expect("target");
    let seeds = (target.seeds)(fixtures());
    let run = |seed| {
        let mut rng = engine::Rng::new(seed);
        (0..200)
            .map(|i| {
                let mut input = seeds[i % seeds.len()].clone();
                engine::mutate(&mut rng, target, &mut input, &seeds);
                input
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

/// A multi-part input survives framing, so a saved adapter crasher replays as it was.
#[test]
fn framing_round_trips() {
    let input = vec![b"{}".to_vec(), vec![0, 1, 2, b'\n'], Vec::new()];
    let framed = engine::frame(&input);
    assert_eq!(engine::unframe(&framed, 3).unwrap(), input);
    assert_eq!(engine::unframe(b"abc", 1).unwrap(), vec![b"abc".to_vec()]);
    assert!(engine::unframe(b"abc", 2).is_err());
    // Verdicts are what targets return; a refused seed is caught before fuzzing starts.
    assert_eq!(Verdict::of(&Ok::<_, ()>(())), Verdict::Accepted);
}

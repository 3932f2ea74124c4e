//! `flywheel-fuzz`: fuzzing of every parser of outside input, on stable Rust.
//!
//! It owns a small mutational engine ([`engine`]: seeded, byte and structure-aware mutators,
//! `catch_unwind` around each execution), the seed material built from the project's own
//! fixtures ([`fixtures`]), the targets ([`targets`]), the `fuzz` binary that runs each target
//! for a bounded time in a supervised child process, and the saved crashers that
//! `tests/smoke.rs` replays as regression tests.
//!
//! It must not re-implement what it tests: every target calls the real parsing code path
//! (through a file where the service reads a file). Where a parser is private, its crate
//! exposes a `#[doc(hidden)]` parse-only entry point (`flywheel_trainer::fuzzing`); this crate
//! never copies parsing code, never weakens a check to make a run pass, and is never a
//! dependency of the service (`publish = false`, no other crate depends on it).

pub mod engine;
pub mod fixtures;
pub mod targets;

use std::path::{Path, PathBuf};

pub use engine::{Budget, Finding, Options, Stats, Target, Verdict};
pub use fixtures::Fixtures;

/// Where findings are saved: `tests/fuzz/crashers/<target>/<sha256 prefix>`.
pub fn crash_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crashers")
}

/// Runs one saved input through `target`: `Ok(verdict)`, or the panic's location and message.
pub fn replay(
    target: &Target,
    fixtures: &Fixtures,
    raw: &[u8],
) -> Result<Result<Verdict, (String, String)>, String> {
    let input = engine::unframe(raw, target.parts.len())?;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ctx = engine::Ctx {
        fixtures,
        scratch: scratch.path(),
    };
    Ok(engine::execute(target, &ctx, &input))
}

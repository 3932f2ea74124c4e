//! Running the Python peer of a benchmark: shared by the bench binaries beside this folder.

use std::process::Command;

/// The last JSON line `python args…` prints, or `None` (saying why on stderr) if it failed.
pub fn python_json(python: &str, args: &[String], what: &str) -> Option<serde_json::Value> {
    let out = Command::new(python).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

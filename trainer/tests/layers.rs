//! The trainer's modules read one way: each uses only modules before it in [`ORDER`], so no
//! import cycle can come back unnoticed. Test code is exempt (a test may build a whole model).

use std::path::Path;

/// Leaves first (the vocabulary), then files and text, the burn side of the fused ops,
/// adapters, architectures, the training loop, the objectives, and what builds on them.
const ORDER: &[&str] = &[
    "error",
    "device",
    "spec",
    "dropout",
    "chat",
    "checkpoint",
    "tokenize",
    "fused",
    "attention",
    "bf16",
    "head",
    "low_rank",
    "lora",
    "bert",
    "llama",
    "decode",
    "fit",
    "causal",
    "classifier",
    "merge",
    "gguf",
    "tiny",
];

/// The modules `source` names as `crate::<module>`, outside its tests.
fn uses(source: &str) -> Vec<String> {
    let code = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut found: Vec<String> = code
        .match_indices("crate::")
        .map(|(at, _)| {
            code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|name: &String| name.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .collect();
    found.sort();
    found.dedup();
    found
}

#[test]
fn modules_use_only_those_before_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut listed = 0;
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(module.as_str(), "lib" | "parity" | "fuzzing") {
            // The crate root re-exports everything; `parity` is a test module and `fuzzing`
            // the fuzzer's way in, above everything like the root.
            continue;
        }
        let rank = ORDER
            .iter()
            .position(|m| *m == module)
            .unwrap_or_else(|| panic!("{module}.rs is not in ORDER: place it in the layers"));
        listed += 1;
        let source = std::fs::read_to_string(&path).unwrap();
        for used in uses(&source) {
            let used_rank = ORDER.iter().position(|m| *m == used);
            if used != module && used_rank.is_none_or(|r| r >= rank) {
                wrong.push(format!("{module} uses {used}"));
            }
        }
    }
    assert_eq!(listed, ORDER.len(), "a module in ORDER has no file");
    assert!(wrong.is_empty(), "imports against the layering: {wrong:?}");
}

#[test]
fn the_check_sees_an_upward_import() {
    let source = "use crate::fit::Progress;\nfn f() { crate::classifier::x(); }\n\
                  #[cfg(test)]\nmod tests { use crate::causal::Y; }";
    assert_eq!(uses(source), ["classifier", "fit"]);
}

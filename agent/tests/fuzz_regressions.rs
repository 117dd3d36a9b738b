//! Every input kept under `fuzz/regressions/<target>/` (crashes the fuzzers found,
//! fixed since) and every seed under `fuzz/corpus/<target>/`, run through the fuzz
//! targets' own bodies (`fuzz/harness/`, included here), so a fixed crash stays
//! fixed under a plain `cargo test`. See the README's "Fuzzing" section.

#[path = "../../fuzz/harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// The files of `fuzz/<kind>/<target>/`, sorted (none when it does not exist).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    files
}

/// Runs every input of `kind` through its target, naming the one that fails.
fn replay(kind: &str) -> usize {
    let mut count = 0;
    for (target, body) in harness::TARGETS {
        for file in inputs(kind, target) {
            let data = std::fs::read(&file).expect("a readable input");
            if let Err(panic) = std::panic::catch_unwind(|| body(&data)) {
                eprintln!("{target}: {} fails", file.display());
                std::panic::resume_unwind(panic);
            }
            count += 1;
        }
    }
    count
}

#[test]
fn kept_crashes_stay_fixed() {
    replay("regressions");
}

#[test]
fn seed_corpus_passes() {
    assert!(replay("corpus") > 0, "the seed corpus is missing");
}

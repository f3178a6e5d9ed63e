//! The rule "one way to open a file, one way to write one", kept by reading the sources: outside
//! `src/fsutil/` no code opens, reads or replaces a file by itself, except the few places listed
//! here with the reason. A new direct read of a user's path fails this test and names the line.

use std::path::{Path, PathBuf};

/// Calls that open or read a file by path, or write one in place.
const DIRECT: &[&str] = &[
    "File::open(",
    "fs::read(",
    "read_to_string(",
    "OpenOptions::new(",
    "hdf5::File::open(",
    "File::create(",
    "fs::write(",
    "fs::rename(",
    "Mmap::map(",
];

/// (file, call): the exceptions, each for a reason.
const ALLOWED: &[(&str, &str, &str)] = &[
    ("src/memory.rs", "read_to_string(", "/proc/meminfo and the cgroup's files: the kernel's, not a user's"),
    ("src/data/h5.rs", "File::open(", "the HDF5 library opens by path: fsutil::check_regular comes first"),
    ("src/data/h5.rs", "hdf5::File::open(", "the HDF5 library opens by path: fsutil::check_regular comes first"),
    (
        "src/checkpoint/folder.rs",
        "OpenOptions::new(",
        "the run's own lock file and a write probe in the checkpoint folder",
    ),
    ("src/checkpoint/folder.rs", "read_to_string(", "the lock file's holder pid"),
    ("src/data/nifti/mod.rs", "Mmap::map(", "maps a file fsutil::open_regular opened"),
    ("src/data/nifti/gz_cache.rs", "File::create(", "the temporary file of fsutil::replace_atomic"),
    ("src/data/import.rs", "fs::rename(", "the staging folder into place, checked by fsutil::marker"),
    ("actors/src/cmd/export.rs", "File::create(", "the temporary file of fsutil::replace_atomic"),
    ("actors/src/cmd/train.rs", "fs::write(", "the daemon's --addr-file, renamed into place"),
    ("actors/src/cmd/train.rs", "fs::rename(", "the daemon's --addr-file, renamed into place"),
    ("src/data/h5.rs", "File::create(", "write_h5_case: fixtures for tests and benchmarks"),
    (
        "src/checkpoint/folder.rs",
        "fs::rename(",
        "set_aside: a rejected checkpoint of the run's own folder kept for inspection",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn files_are_opened_and_written_only_through_fsutil() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("actors/src"), &mut files);
    let mut found = Vec::new();
    let mut used = std::collections::HashSet::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        if rel.starts_with("src/fsutil/") || rel == "src/build.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests at the end of a file write their own scratch files.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for &call in DIRECT {
                if !line.contains(call) {
                    continue;
                }
                match ALLOWED.iter().position(|(file, c, _)| *file == rel && *c == call) {
                    Some(i) => {
                        used.insert(i);
                    }
                    None => found.push(format!("{rel}:{}: {}", n + 1, line.trim())),
                }
            }
        }
    }
    let stale: Vec<_> = (0..ALLOWED.len()).filter(|i| !used.contains(i)).map(|i| ALLOWED[i]).collect();
    assert!(stale.is_empty(), "exceptions that no longer apply (remove them): {stale:?}");
    assert!(
        found.is_empty(),
        "files opened or written outside src/fsutil/ (use its open_regular / read_text / \
         write_atomic, or add the line's file and reason to ALLOWED):\n{}",
        found.join("\n")
    );
}

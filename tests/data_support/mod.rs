//! Helpers shared by the data tests: temporary folders, the Python oracle, the real LA data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real LA data (UA-MT's HDF5 files and split).
pub fn la_dir() -> PathBuf {
    repo().join("../shared/data/la2018")
}

/// A folder under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "uamt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The oracle's interpreter: `$UAMT_PYTHON`, else `<repo>/.venv/bin/python3`. Missing = failure.
pub fn python() -> PathBuf {
    let p = std::env::var_os("UAMT_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python3"));
    assert!(p.exists(), "the Python oracle needs {} (set UAMT_PYTHON or run ops/setup)", p.display());
    p
}

/// Runs `tests/oracle/<script>` with `args`; panics with its output if it fails.
pub fn oracle(script: &str, args: &[&Path]) {
    let out = Command::new(python())
        .arg(repo().join("tests/oracle").join(script))
        .args(args)
        .output()
        .expect("run the Python oracle");
    assert!(
        out.status.success(),
        "oracle {script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a little-endian float32 dump.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("json")
}

/// `[[f64; 4]; 4]` from a JSON 4x4 array.
pub fn affine(v: &serde_json::Value) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            a[i][j] = v[i][j].as_f64().expect("affine entry");
        }
    }
    a
}

/// Asserts two affines agree to `tol`.
pub fn assert_affine_close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4], tol: f64, what: &str) {
    for i in 0..4 {
        for j in 0..4 {
            assert!((a[i][j] - b[i][j]).abs() <= tol, "{what}: affine differs at [{i}][{j}]: {a:?} vs {b:?}");
        }
    }
}

/// Whether any file or folder in `dir` has a name starting with `prefix`.
pub fn has_entry_starting(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with(prefix)))
        .unwrap_or(false)
}

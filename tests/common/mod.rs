//! Shared helpers of the integration tests: the Python oracle and tensor comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Kind, Tensor};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python that runs the oracles: `$UAMT_PYTHON`, else the project's `.venv`. Panics (the
/// test fails) when it is missing: the golden tests never skip.
pub fn python() -> PathBuf {
    let p = std::env::var_os("UAMT_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python3"));
    assert!(p.exists(), "python oracle interpreter {} not found; run ops/setup", p.display());
    p
}

/// Runs `script` (relative to the repo) with `args` once per content of the script, caching its
/// output folder under the target directory, and returns that folder.
pub fn oracle_output(script: &str) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = dirs.iter().find(|(s, _)| s == script) {
        return d.clone();
    }
    let src = std::fs::read(repo().join(script)).expect("oracle script");
    let digest = src.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
    let stem = Path::new(script).file_stem().unwrap().to_string_lossy().to_string();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{stem}-{digest:016x}"));
    let done = out.join(".done");
    if !done.exists() {
        let status = Command::new(python()).arg(repo().join(script)).arg(&out).status().expect("run python oracle");
        assert!(status.success(), "oracle {script} failed: {status}");
        std::fs::write(&done, b"").unwrap();
    }
    dirs.push((script.to_string(), out.clone()));
    out
}

/// Named tensors of one fixture file.
pub struct Fixture {
    pub path: PathBuf,
    pub named: Vec<(String, Tensor)>,
}

impl Fixture {
    pub fn load(path: PathBuf) -> Self {
        let named = Tensor::read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { path, named }
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.named
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("{}: no `{key}`", self.path.display()))
    }

    pub fn has(&self, key: &str) -> bool {
        self.named.iter().any(|(n, _)| n == key)
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.get(key).to_kind(Kind::Double).reshape([-1]).double_value(&[0])
    }

    /// Entries under `prefix.` with the prefix removed, in file order.
    pub fn prefixed(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let p = format!("{prefix}.");
        self.named.iter().filter_map(|(n, t)| n.strip_prefix(&p).map(|k| (k.to_string(), t.shallow_clone()))).collect()
    }
}

/// max |got - want| / max(max |want|, 1e-12).
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let want = want.to_kind(Kind::Double);
    assert_eq!(got.size(), want.size(), "shapes differ");
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

/// Asserts `rel_err(got, want) <= tol`, naming `what`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// Asserts two scalars agree to relative `tol` (absolute below 1e-12).
pub fn assert_scalar(what: &str, got: f64, want: f64, tol: f64) {
    if want.is_infinite() || got.is_infinite() {
        assert_eq!(got, want, "{what}");
        return;
    }
    let e = (got - want).abs() / want.abs().max(1e-12);
    assert!(e <= tol, "{what}: got {got}, want {want} (relative error {e:.3e})");
}

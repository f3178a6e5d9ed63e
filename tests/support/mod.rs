//! Shared helpers of the integration tests of both crates: the repository root, the Python
//! oracle (run once per script content and cached), temporary folders that remove themselves, a
//! guard that stops a spawned daemon, and tensor comparisons. `actors/tests/*.rs` include it with
//! `#[path = "../../tests/support/mod.rs"] mod support;`.
#![allow(dead_code)]

pub mod augment_ref;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use tch::{Kind, Tensor};

/// The repository (workspace) root: the nearest folder above this crate holding `Cargo.lock`.
pub fn repo() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().find(|p| p.join("Cargo.lock").is_file()).unwrap_or(manifest).to_path_buf()
}

/// The real LA data (UA-MT's HDF5 files and split), next to the repository in `../shared`.
pub fn la_dir() -> PathBuf {
    repo().join("../shared/data/la2018")
}

/// The Python that runs the oracles: `$UAMT_PYTHON`, else the project's `.venv`. Panics (the
/// test fails) when it is missing: the oracle tests never skip.
pub fn python() -> PathBuf {
    let p = std::env::var_os("UAMT_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python3"));
    assert!(p.exists(), "the Python oracle needs {} (set UAMT_PYTHON or run ops/setup)", p.display());
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh folder under the system's temporary directory, removed with its content on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `uamt-<tag>-<pid>-<n>` (emptied first if a crashed run left it).
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "uamt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `path` inside the folder.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A spawned process that is killed and reaped when the guard is dropped (a failing test never
/// leaves a daemon running).
#[derive(Debug)]
pub struct Daemon(Child);

impl Daemon {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Daemon(child)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The guarded process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Sends the signal `sig` to the process.
    pub fn signal(&self, sig: i32) {
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: plain libc call on our own child.
        assert_eq!(unsafe { kill(self.0.id() as i32, sig) }, 0);
    }
}

/// Starts `<bin> train --config <config>` in `dir` with `env`, stderr to `dir/log`, guarded.
pub fn start_train(bin: &str, config: &Path, dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.args(["train", "--config"]).arg(config).current_dir(dir).stdout(std::process::Stdio::null());
    cmd.stderr(std::fs::File::create(dir.join("log")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Daemon::new(cmd.spawn().unwrap())
}

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Both fail harmlessly when the process already exited and was reaped.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// Runs `script` (relative to the repo) with its output folder as the only argument, once per
/// content of the script: the folder is cached under the target directory and reused while the
/// script is unchanged. Returns that folder.
pub fn oracle_output(script: &str) -> PathBuf {
    static DIRS: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = dirs.iter().find(|(s, _)| s == script) {
        return d.clone();
    }
    let src = std::fs::read(repo().join(script)).unwrap_or_else(|e| panic!("oracle script {script}: {e}"));
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
    /// The `.npz` file, for messages.
    pub path: PathBuf,
    /// Its tensors in file order.
    pub named: Vec<(String, Tensor)>,
}

impl Fixture {
    /// Reads `path` (`.npz`).
    pub fn load(path: PathBuf) -> Self {
        let named = Tensor::read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { path, named }
    }

    /// The tensor named `key`.
    pub fn get(&self, key: &str) -> Tensor {
        self.named
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("{}: no `{key}`", self.path.display()))
    }

    /// Whether the file holds `key`.
    pub fn has(&self, key: &str) -> bool {
        self.named.iter().any(|(n, _)| n == key)
    }

    /// The first element of `key` as f64.
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

/// Reads a little-endian float32 dump.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// `[[f64; 4]; 4]` from a JSON 4x4 array.
pub fn affine(v: &serde_json::Value) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            *x = v[i][j].as_f64().expect("affine entry");
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

/// Compares every tensor of `store` with `prefix.<name>` in the fixture, to `tol` (1e-5 in the golden tests) of the larger
/// of the tensor's own scale and 1e-2 (the smallest weight scale in the net: 1/sqrt(fan_in)).
/// The floor matters only for BatchNorm biases after training steps: they start at 0 and then
/// hold a few learning-rate-sized gradient sums (~1e-5) with heavy cancellation, where the
/// summation order alone moves them by ~1e-10.
pub fn assert_store(what: &str, store: &uamt::model::ParamStore, fx: &Fixture, prefix: &str, tol: f64) {
    for p in store.iter() {
        let want = fx.get(&format!("{prefix}.{}", p.name));
        if p.tensor.kind() == Kind::Int64 {
            assert_eq!(p.tensor.int64_value(&[]), want.reshape([-1]).int64_value(&[0]), "{what}: {}", p.name);
        } else {
            let scale = want.abs().max().double_value(&[]).max(1e-2);
            let err = (&p.tensor.detach() - &want).abs().max().double_value(&[]) / scale;
            assert!(err <= tol, "{what}: {}: error {err:.3e} of scale {scale:.3e}", p.name);
        }
    }
}

/// The randomness of one pass stored under `key` (`.noise` if any, `.x5`, `.x9`).
pub fn pass(fx: &Fixture, key: &str) -> uamt::train::PassRandom {
    let noise = fx.has(&format!("{key}.noise")).then(|| fx.get(&format!("{key}.noise")));
    uamt::train::PassRandom {
        noise,
        dropout: uamt::model::DropoutMasks { x5: fx.get(&format!("{key}.x5")), x9: fx.get(&format!("{key}.x9")) },
    }
}

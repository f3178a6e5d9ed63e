//! Checkpoints: one `.safetensors` file per checkpoint holding the student and teacher (weights
//! and BatchNorm buffers, named like the reference PyTorch `state_dict`), the momentum buffers,
//! the iteration, the seed, the run id and the config. Written to a temporary name, synced and
//! renamed into place ([`crate::fsutil`]), so a reader never sees a partial file and a failed
//! write leaves the older ones intact; a state with a non-finite value is never written.
//!
//! Runs: every run has an id ([`new_run_id`]), stored in its checkpoints (`meta.run_id`) and in
//! their names (`ckpt-<iteration>-<run id>.safetensors`). Retention prunes only the run's own
//! files, and resuming ([`resume_newest`]) takes only a checkpoint that fits the config (same
//! architecture, method and seed), falling back past unreadable ones, which are renamed to
//! `<name>.rejected`. Files of version 1 (before run ids) read as run id `""`, and a run with
//! that id keeps their old names (`ckpt-<iteration>.safetensors`).
//!
//! Reading is for untrusted files: [`crate::model::tensorfile`] checks the file and every tensor
//! before libtorch sees it, and the metadata are read from the checked bytes.
//!
//! Randomness needs no saved generator state: every draw (sampling, augmentation, noise,
//! dropout) is a function of (seed, iteration), so (seed, iteration) is the RNG state.

use crate::config::Config;
use crate::model::params::check_fits;
use crate::model::tensorfile::{self, RawTensor};
use crate::train::Trainer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// File-name prefix and suffix of checkpoints: `ckpt-00001200-<run id>.safetensors`.
const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";
/// Appended to the name of a checkpoint that resuming found unusable.
pub const REJECTED_SUFFIX: &str = ".rejected";
/// Bumped when the layout of the file changes. 2: `meta.run_id`.
pub const FORMAT_VERSION: i64 = 2;
/// Length of a run id (hex digits).
pub const RUN_ID_LEN: usize = 16;

/// A fresh run id: 16 hex digits from the seed, the time and the process id.
pub fn new_run_id(seed: u64) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let k = crate::rng::key(seed, &[nanos as u64, (nanos >> 64) as u64, std::process::id() as u64]);
    format!("{k:016x}")
}

/// Whether `id` is a run id: 16 lowercase hex digits, or `""` (a version-1 run).
pub fn is_run_id(id: &str) -> bool {
    id.is_empty() || (id.len() == RUN_ID_LEN && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Everything a checkpoint holds, in host memory.
#[derive(Debug)]
pub struct Snapshot {
    /// Steps completed; a resumed run continues with this iteration.
    pub iteration: i64,
    /// The run's seed.
    pub seed: u64,
    /// The run's id (`""` for files written before run ids).
    pub run_id: String,
    /// The config the run was started with, as TOML.
    pub config: String,
    /// Student parameters and buffers.
    pub student: Vec<(String, Tensor)>,
    /// Teacher parameters and buffers (absent for supervised runs).
    pub teacher: Option<Vec<(String, Tensor)>>,
    /// SGD momentum buffers, named after their parameters.
    pub momentum: Vec<(String, Tensor)>,
}

/// A detached copy on the CPU that later in-place updates of `t` do not touch.
pub fn host_copy(t: &Tensor) -> Tensor {
    let t = t.detach();
    // A new tensor in the default strides whatever `t`'s (channels-last weights): what the
    // checkpoint writer needs.
    let out = Tensor::empty(t.size(), (t.kind(), Device::Cpu));
    tch::no_grad(|| out.shallow_clone().copy_(&t));
    out
}

/// Host copies of named tensors.
pub fn host_copies(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named.iter().map(|(n, t)| (n.clone(), host_copy(t))).collect()
}

/// The first of `named` (reported under `prefix`) holding a NaN or an infinity.
fn first_non_finite(prefix: &str, named: &[(String, Tensor)]) -> Option<String> {
    named.iter().find_map(|(n, t)| {
        let finite = t.f_isfinite().and_then(|f| f.f_all()).and_then(|a| a.f_int64_value(&[]));
        (finite.ok() != Some(1)).then(|| format!("{prefix}.{n}"))
    })
}

impl Snapshot {
    /// A copy of a sequential trainer's whole state (run id `""`; see [`Snapshot::with_run_id`]).
    pub fn of_trainer(tr: &Trainer, seed: u64, config: &str) -> Self {
        Snapshot {
            iteration: tr.iter,
            seed,
            run_id: String::new(),
            config: config.to_string(),
            student: host_copies(&tr.student.store().named_tensors()),
            teacher: tr.teacher.as_ref().map(|t| host_copies(&t.store().named_tensors())),
            momentum: host_copies(tr.opt.buffers()),
        }
    }

    /// The same state under run id `run_id`.
    pub fn with_run_id(mut self, run_id: &str) -> Self {
        self.run_id = run_id.to_string();
        self
    }

    /// The name of the first tensor holding a NaN or an infinity, if any.
    pub fn non_finite(&self) -> Option<String> {
        first_non_finite("student", &self.student)
            .or_else(|| self.teacher.as_ref().and_then(|t| first_non_finite("teacher", t)))
            .or_else(|| first_non_finite("optimizer.momentum", &self.momentum))
    }

    /// Checks that this state fits `tr` (names, shapes and kinds of student, teacher and
    /// momentum) without changing anything.
    pub fn check_fits(&self, tr: &Trainer, origin: &Path) -> Result<()> {
        let err = |why: String| Error::File { path: origin.to_path_buf(), why };
        tr.student.store().check_named(&self.student, origin, false)?;
        match (&tr.teacher, &self.teacher) {
            (Some(t), Some(named)) => t.store().check_named(named, origin, false)?,
            (Some(_), None) => return Err(err("checkpoint has no teacher, the method needs one".into())),
            (None, Some(_)) => return Err(err("checkpoint has a teacher, the method has none".into())),
            (None, None) => {}
        }
        for (name, buf) in tr.opt.buffers() {
            let src = self
                .momentum
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| err(format!("missing momentum buffer `{name}`")))?;
            check_fits(&format!("optimizer.momentum.{name}"), src, buf).map_err(err)?;
        }
        Ok(())
    }

    /// Puts this state into `tr` (same architecture and method): everything is checked first,
    /// so a checkpoint that does not fit leaves `tr` as it was.
    pub fn restore_into(&self, tr: &mut Trainer, origin: &Path) -> Result<()> {
        self.check_fits(tr, origin)?;
        tr.student.store().load_named(&self.student, origin, false)?;
        if let (Some(t), Some(named)) = (&tr.teacher, &self.teacher) {
            t.store().load_named(named, origin, false)?;
        }
        tr.opt.load_named(&self.momentum, origin)?;
        tr.iter = self.iteration;
        Ok(())
    }

    /// Why this checkpoint cannot continue a run of `cfg` (another architecture, method or seed).
    pub fn compatible_with(&self, cfg: &Config, origin: &Path) -> std::result::Result<(), String> {
        let stored = Config::from_toml(&self.config, origin).map_err(|e| format!("its stored config: {e}"))?;
        if stored.model != cfg.model {
            return Err(format!("another architecture ({:?}, the config's {:?})", stored.model, cfg.model));
        }
        if stored.method.kind != cfg.method.kind {
            return Err(format!("another method ({:?}, the config's {:?})", stored.method.kind, cfg.method.kind));
        }
        if self.seed != cfg.optim.seed {
            return Err(format!("another seed ({}, the config's {})", self.seed, cfg.optim.seed));
        }
        // A data-parallel run stores its world size: the batches depend on it.
        let (was, now) = (stored.distributed.world_size.unwrap_or(1), cfg.distributed.world_size.unwrap_or(1));
        if was != now {
            return Err(format!(
                "it was written by a run of {was} process(es) and this run has {now}; resume with the same world size"
            ));
        }
        Ok(())
    }

    /// The file name of run `run_id`'s checkpoint after `iteration` steps
    /// (`ckpt-<iteration>-<run id>.safetensors`; `ckpt-<iteration>.safetensors` for run id `""`).
    pub fn file_name(iteration: i64, run_id: &str) -> String {
        if run_id.is_empty() {
            format!("{PREFIX}{iteration:08}{SUFFIX}")
        } else {
            format!("{PREFIX}{iteration:08}-{run_id}{SUFFIX}")
        }
    }

    /// Writes `dir/<file name>` atomically and returns its path. A state holding a NaN or an
    /// infinity is refused (an error naming the tensor), so the older checkpoints stay the newest.
    pub fn write_atomic(&self, dir: &Path) -> Result<PathBuf> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let path = dir.join(Self::file_name(self.iteration, &self.run_id));
        if !is_run_id(&self.run_id) {
            return Err(Error::File { path, why: format!("`{}` is not a run id", self.run_id) });
        }
        if let Some(name) = self.non_finite() {
            return Err(Error::File {
                path,
                why: format!("not written: `{name}` holds a NaN or an infinity (iteration {})", self.iteration),
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        let scalar = |v: i64| Tensor::from_slice(&[v]);
        named.push(("meta.format_version".into(), scalar(FORMAT_VERSION)));
        named.push(("meta.iteration".into(), scalar(self.iteration)));
        named.push(("meta.seed".into(), scalar(self.seed as i64)));
        named.push(("meta.run_id".into(), Tensor::from_slice(self.run_id.as_bytes())));
        named.push(("meta.config".into(), Tensor::from_slice(self.config.as_bytes())));
        let prefixed = |p: &str, v: &[(String, Tensor)]| {
            v.iter().map(|(n, t)| (format!("{p}.{n}"), t.shallow_clone())).collect::<Vec<_>>()
        };
        named.extend(prefixed("student", &self.student));
        if let Some(t) = &self.teacher {
            named.extend(prefixed("teacher", t));
        }
        named.extend(prefixed("optimizer.momentum", &self.momentum));
        crate::fsutil::replace_atomic(&path, |tmp| {
            Tensor::write_safetensors(&named, tmp)
                .map_err(|e| Error::File { path: tmp.to_path_buf(), why: e.to_string() })
        })?;
        Ok(path)
    }

    /// Reads a checkpoint from a file that may come from anywhere: see
    /// [`tensorfile`](crate::model::tensorfile) for what is refused. Any structural problem is an
    /// error naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_raw(tensorfile::read_raw(path)?, path)
    }

    /// Whether raw tensors look like a checkpoint (they hold `meta.format_version`).
    pub fn is_checkpoint(raw: &[(String, RawTensor)]) -> bool {
        raw.iter().any(|(n, _)| n == "meta.format_version")
    }

    /// A checkpoint from a file's raw tensors; `origin` names it in errors.
    pub fn from_raw(raw: Vec<(String, RawTensor)>, origin: &Path) -> Result<Self> {
        let err = |why: String| Error::File { path: origin.to_path_buf(), why };
        let get = |k: &str| {
            raw.iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t)
                .ok_or_else(|| err(format!("not a checkpoint: missing `{k}`")))
        };
        let int = |k: &str| get(k)?.as_i64().map_err(|why| err(format!("`{k}` {why}")));
        let text = |k: &str| get(k)?.as_text().map_err(|why| err(format!("`{k}` {why}")));
        let version = int("meta.format_version")?;
        let run_id = match version {
            1 => String::new(),
            FORMAT_VERSION => text("meta.run_id")?,
            v => return Err(err(format!("format version {v}, this build reads 1 and {FORMAT_VERSION}"))),
        };
        if !is_run_id(&run_id) {
            return Err(err(format!("`meta.run_id` is not a run id: {run_id:?}")));
        }
        let iteration = int("meta.iteration")?;
        if iteration < 0 {
            return Err(err(format!("`meta.iteration` is negative: {iteration}")));
        }
        let seed = int("meta.seed")? as u64;
        let config = text("meta.config")?;
        let section = |p: &str| -> Result<Vec<(String, Tensor)>> {
            let p = format!("{p}.");
            let part: Vec<(String, RawTensor)> =
                raw.iter().filter_map(|(n, t)| n.strip_prefix(&p).map(|k| (k.to_string(), t.clone()))).collect();
            tensorfile::to_tensors(part, origin)
        };
        let student = section("student")?;
        if student.is_empty() {
            return Err(err("no student weights".into()));
        }
        let teacher = Some(section("teacher")?).filter(|t| !t.is_empty());
        let momentum = section("optimizer.momentum")?;
        Ok(Snapshot { iteration, seed, run_id, config, student, teacher, momentum })
    }
}

/// The student weights in a checkpoint, or all tensors of a plain state dict (`.safetensors`,
/// `.npz`): what the evaluator takes from a watched folder. The file is read once.
pub fn read_student_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let raw = tensorfile::read_raw(path)?;
    if Snapshot::is_checkpoint(&raw) {
        Ok(Snapshot::from_raw(raw, path)?.student)
    } else {
        tensorfile::to_tensors(raw, path)
    }
}

/// One checkpoint file found in a folder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Steps it holds (from its name).
    pub iteration: i64,
    /// Its run's id (from its name; `""` for the names of version 1).
    pub run_id: String,
    /// The file.
    pub path: PathBuf,
}

/// The (iteration, run id) a checkpoint file name stands for: `ckpt-<iteration>.safetensors`
/// or `ckpt-<iteration>-<run id>.safetensors`.
pub fn parse_name(name: &str) -> Option<(i64, String)> {
    let stem = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (it, id) = match stem.split_once('-') {
        Some((it, id)) if !id.is_empty() => (it, id),
        Some(_) => return None,
        None => (stem, ""),
    };
    if it.is_empty() || !it.bytes().all(|b| b.is_ascii_digit()) || !is_run_id(id) {
        return None;
    }
    Some((it.parse().ok()?, id.to_string()))
}

/// The checkpoints in `dir` of every run, oldest first (by iteration, then run id). Temporary
/// files, set-aside files and other names are ignored.
pub fn entries(dir: &Path) -> Vec<Entry> {
    let mut out: Vec<Entry> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let (iteration, run_id) = parse_name(&e.file_name().to_string_lossy())?;
            Some(Entry { iteration, run_id, path: e.path() })
        })
        .collect();
    out.sort();
    out
}

/// The checkpoints in `dir` (every run), oldest first, as (iteration, path).
pub fn list(dir: &Path) -> Vec<(i64, PathBuf)> {
    entries(dir).into_iter().map(|e| (e.iteration, e.path)).collect()
}

/// The newest checkpoint in `dir` (any run).
pub fn latest(dir: &Path) -> Option<(i64, PathBuf)> {
    list(dir).pop()
}

/// The newest checkpoint of run `run_id` in `dir`.
pub fn latest_of(dir: &Path, run_id: &str) -> Option<Entry> {
    entries(dir).into_iter().rfind(|e| e.run_id == run_id)
}

/// Checks that checkpoints can be written into `dir` (creating it): a probe file is created and
/// removed. The error names the folder.
pub fn check_writable(dir: &Path) -> Result<()> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = crate::fsutil::temp_name(&dir.join("write-probe"));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)
}

/// The exclusive right to write run `run_id`'s checkpoints in a folder, held while it lives (an
/// advisory `flock` on `<dir>/.run-<run id>.lock`, released by the kernel when the process ends,
/// however it ends).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    /// The lock file.
    pub path: PathBuf,
}

/// Takes [`RunLock`] for `run_id` in `dir`, or says which process holds it: two processes training
/// (resuming) the same run would interleave and prune each other's checkpoints.
pub fn lock_run(dir: &Path, run_id: &str) -> Result<RunLock> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let path = dir.join(format!(".run-{run_id}.lock"));
    let io = |source| Error::Io { path: path.clone(), source };
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared with the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
        return Err(Error::File {
            path,
            why: format!(
                "run {run_id} is being trained by another process{who}; stop it first or use another checkpoint.dir"
            ),
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(RunLock { _file: file, path })
}

/// Renames a checkpoint that cannot be used to `<name>.rejected` (kept for inspection, ignored
/// by [`entries`]); returns the new path.
pub fn set_aside(path: &Path) -> Result<PathBuf> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(REJECTED_SUFFIX);
    let to = path.with_file_name(name);
    std::fs::rename(path, &to).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    Ok(to)
}

/// A checkpoint a run was resumed from.
#[derive(Debug)]
pub struct Resumed {
    /// The file.
    pub path: PathBuf,
    /// Steps it holds.
    pub iteration: i64,
    /// The run it belongs to (the resumed run keeps it).
    pub run_id: String,
    /// Newer checkpoints of the same run that could not be used, renamed to `*.rejected`, with why.
    pub set_aside: Vec<(PathBuf, String)>,
}

/// Reads `path`, checks that it can continue a run of `cfg` and restores it into `tr`.
pub fn resume_from(path: &Path, cfg: &Config, tr: &mut Trainer) -> Result<Resumed> {
    let err = |why: String| Error::File { path: path.to_path_buf(), why };
    let snap = Snapshot::read(path)?;
    snap.compatible_with(cfg, path).map_err(|why| err(format!("cannot continue this run: {why}")))?;
    if let Some(name) = snap.non_finite() {
        return Err(err(format!("`{name}` holds a NaN or an infinity")));
    }
    snap.restore_into(tr, path)?;
    Ok(Resumed { path: path.to_path_buf(), iteration: snap.iteration, run_id: snap.run_id, set_aside: Vec::new() })
}

/// Why a checkpoint was passed over when resuming.
enum Passed {
    /// Unreadable, damaged, or does not fit the model: renamed aside if it is the resumed run's.
    Unusable(String),
    /// Readable but of another architecture, method or seed: another run's, left alone.
    Incompatible(String),
}

/// Resumes from the newest checkpoint in `dir` that can continue a run of `cfg` (same
/// architecture, method and seed), restoring it into `tr`. Newer files of the same run that are
/// unreadable or do not fit are renamed to `<name>.rejected` (logged, listed in the result) and
/// the previous good one is used; other runs' files are left alone. `Ok(None)`: no checkpoint
/// in `dir` at all. An error lists every checkpoint and why it could not be used.
pub fn resume_newest(dir: &Path, cfg: &Config, tr: &mut Trainer) -> Result<Option<Resumed>> {
    let all = entries(dir);
    if all.is_empty() {
        return Ok(None);
    }
    let mut passed: Vec<(Entry, Passed)> = Vec::new();
    for e in all.into_iter().rev() {
        let attempt = (|| -> std::result::Result<Resumed, Passed> {
            let snap = Snapshot::read(&e.path).map_err(|err| Passed::Unusable(err.to_string()))?;
            if snap.run_id != e.run_id {
                return Err(Passed::Unusable(format!("holds run {:?}, its name says {:?}", snap.run_id, e.run_id)));
            }
            snap.compatible_with(cfg, &e.path).map_err(Passed::Incompatible)?;
            if snap.iteration != e.iteration {
                return Err(Passed::Unusable(format!(
                    "holds iteration {}, its name says {}",
                    snap.iteration, e.iteration
                )));
            }
            if let Some(name) = snap.non_finite() {
                return Err(Passed::Unusable(format!("`{name}` holds a NaN or an infinity")));
            }
            snap.restore_into(tr, &e.path).map_err(|err| Passed::Unusable(err.to_string()))?;
            Ok(Resumed { path: e.path.clone(), iteration: snap.iteration, run_id: snap.run_id, set_aside: Vec::new() })
        })();
        match attempt {
            Ok(mut resumed) => {
                for (older, why) in passed {
                    match why {
                        Passed::Unusable(why) if older.run_id == resumed.run_id => {
                            let to = set_aside(&older.path)?;
                            tracing::warn!(path = %older.path.display(), moved_to = %to.display(), why, "checkpoint unusable; set aside, resuming from an older one");
                            resumed.set_aside.push((to, why));
                        }
                        Passed::Unusable(why) => {
                            tracing::warn!(path = %older.path.display(), why, "another run's checkpoint is unusable; left alone")
                        }
                        Passed::Incompatible(why) => {
                            tracing::info!(path = %older.path.display(), why, "another run's checkpoint; passed over")
                        }
                    }
                }
                return Ok(Some(resumed));
            }
            Err(why) => passed.push((e, why)),
        }
    }
    let reasons: Vec<String> = passed
        .iter()
        .map(|(e, p)| {
            let name = e.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            match p {
                Passed::Unusable(w) | Passed::Incompatible(w) => format!("{name}: {w}"),
            }
        })
        .collect();
    Err(Error::File {
        path: dir.to_path_buf(),
        why: format!("no checkpoint here can continue this config's run: {}", reasons.join("; ")),
    })
}

/// Retention policy: which of `existing` (iterations, any order) to delete to keep the newest `keep`.
pub fn to_delete(existing: &[i64], keep: usize) -> Vec<i64> {
    let mut v = existing.to_vec();
    v.sort_unstable();
    let n = v.len().saturating_sub(keep.max(1));
    v.truncate(n);
    v
}

/// Deletes all but the newest `keep` checkpoints of run `run_id` in `dir` (other runs' files
/// are never touched); returns what it removed.
pub fn prune(dir: &Path, keep: usize, run_id: &str) -> Vec<PathBuf> {
    let mine: Vec<Entry> = entries(dir).into_iter().filter(|e| e.run_id == run_id).collect();
    let its: Vec<i64> = mine.iter().map(|e| e.iteration).collect();
    let del = to_delete(&its, keep);
    mine.into_iter()
        .filter(|e| del.contains(&e.iteration))
        .filter_map(|e| std::fs::remove_file(&e.path).ok().map(|_| e.path))
        .collect()
}

/// Checkpoint policy: write one after the step that brings the run to `done` steps?
/// At the end of the run, every `every` steps (0: never periodically), and when asked.
pub fn should_write(done: i64, end: i64, every: i64, requested: bool) -> bool {
    requested || done == end || (every > 0 && done % every == 0)
}

/// Checkpoint policy when a run stops: a final checkpoint is due when it made steps since it
/// started at `start` and the last one written (if any) is older than `done`.
pub fn needs_final(done: i64, start: i64, last_written: Option<i64>) -> bool {
    done > start && last_written != Some(done)
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn writes_periodically_at_the_end_and_on_request() {
        let written: Vec<i64> = (1..=10).filter(|&d| should_write(d, 10, 4, false)).collect();
        assert_eq!(written, vec![4, 8, 10]);
        assert!(!should_write(3, 10, 0, false));
        assert!(should_write(3, 10, 0, true));
        assert!(should_write(10, 10, 0, false));
    }

    #[test]
    fn a_stop_gets_a_final_checkpoint_unless_nothing_changed() {
        assert!(needs_final(7, 0, Some(4)));
        assert!(needs_final(7, 0, None));
        assert!(!needs_final(8, 0, Some(8)));
        assert!(!needs_final(5, 5, None), "no step since the start: nothing new to keep");
    }

    #[test]
    fn retention_deletes_the_oldest() {
        assert_eq!(to_delete(&[30, 10, 20, 40], 2), vec![10, 20]);
        assert_eq!(to_delete(&[10], 3), Vec::<i64>::new());
        assert_eq!(to_delete(&[10, 20], 0), vec![10], "keep is at least 1");
    }

    #[test]
    fn names_carry_the_run_and_old_names_still_parse() {
        let id = new_run_id(7);
        assert!(is_run_id(&id) && id.len() == RUN_ID_LEN, "{id}");
        assert_eq!(parse_name(&Snapshot::file_name(1200, &id)), Some((1200, id.clone())));
        assert_eq!(parse_name("ckpt-00001200.safetensors"), Some((1200, String::new())));
        assert_eq!(Snapshot::file_name(5, ""), "ckpt-00000005.safetensors");
        for bad in [
            "ckpt-.safetensors",
            "ckpt-12-.safetensors",
            "ckpt-12-XYZ.safetensors",
            "ckpt-12-0123456789abcdef.safetensors.rejected",
            ".ckpt-00000010.safetensors.tmp-1-2",
            "ckpt--1.safetensors",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}

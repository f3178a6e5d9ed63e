//! Checkpoints: one `.safetensors` file per checkpoint holding the student and teacher (weights
//! and BatchNorm buffers, named like the reference PyTorch `state_dict`), the momentum buffers,
//! the iteration, the seed and the config. Written to a temporary name, synced and renamed into
//! place ([`crate::fsutil`]), so a reader never sees a partial file and a failed write leaves the
//! older ones intact.
//!
//! Randomness needs no saved generator state: every draw (sampling, augmentation, noise,
//! dropout) is a function of (seed, iteration), so (seed, iteration) is the RNG state.

use crate::train::Trainer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// File-name prefix and suffix of checkpoints: `ckpt-00001200.safetensors`.
const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";
/// Bumped when the layout of the file changes.
const FORMAT_VERSION: i64 = 1;

/// Everything a checkpoint holds, in host memory.
#[derive(Debug)]
pub struct Snapshot {
    /// Steps completed; a resumed run continues with this iteration.
    pub iteration: i64,
    /// The run's seed.
    pub seed: u64,
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
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

/// Host copies of named tensors.
pub fn host_copies(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named.iter().map(|(n, t)| (n.clone(), host_copy(t))).collect()
}

impl Snapshot {
    /// A copy of a sequential trainer's whole state.
    pub fn of_trainer(tr: &Trainer, seed: u64, config: &str) -> Self {
        Snapshot {
            iteration: tr.iter,
            seed,
            config: config.to_string(),
            student: host_copies(&tr.student.store().named_tensors()),
            teacher: tr.teacher.as_ref().map(|t| host_copies(&t.store().named_tensors())),
            momentum: host_copies(tr.opt.buffers()),
        }
    }

    /// Puts this state into `tr` (same architecture and method).
    pub fn restore_into(&self, tr: &mut Trainer, origin: &Path) -> Result<()> {
        tr.student.store().load_named(&self.student, origin, false)?;
        match (&tr.teacher, &self.teacher) {
            (Some(t), Some(named)) => t.store().load_named(named, origin, false)?,
            (Some(_), None) => {
                return Err(Error::File {
                    path: origin.to_path_buf(),
                    why: "checkpoint has no teacher, the method needs one".into(),
                })
            }
            _ => {}
        }
        tr.opt.load_named(&self.momentum, origin)?;
        tr.iter = self.iteration;
        Ok(())
    }

    /// The file name of the checkpoint after `iteration` steps.
    pub fn file_name(iteration: i64) -> String {
        format!("{PREFIX}{iteration:08}{SUFFIX}")
    }

    /// Writes `dir/ckpt-<iteration>.safetensors` atomically and returns its path.
    pub fn write_atomic(&self, dir: &Path) -> Result<PathBuf> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(Self::file_name(self.iteration));
        let mut named: Vec<(String, Tensor)> = Vec::new();
        let scalar = |v: i64| Tensor::from_slice(&[v]);
        named.push(("meta.format_version".into(), scalar(FORMAT_VERSION)));
        named.push(("meta.iteration".into(), scalar(self.iteration)));
        named.push(("meta.seed".into(), scalar(self.seed as i64)));
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

    /// Reads a checkpoint; any structural problem is an error naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        let err = |why: String| Error::File { path: path.to_path_buf(), why };
        let named = Tensor::read_safetensors(path).map_err(|e| err(format!("not a readable checkpoint: {e}")))?;
        let get = |k: &str| {
            named
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| err(format!("missing `{k}`")))
        };
        let int = |k: &str| -> Result<i64> {
            let t = get(k)?;
            if t.kind() != Kind::Int64 || t.numel() != 1 {
                return Err(err(format!("`{k}` is not one int64")));
            }
            Ok(t.int64_value(&[0]))
        };
        let version = int("meta.format_version")?;
        if version != FORMAT_VERSION {
            return Err(err(format!("format version {version}, this build reads {FORMAT_VERSION}")));
        }
        let iteration = int("meta.iteration")?;
        let seed = int("meta.seed")? as u64;
        let config_bytes = Vec::<u8>::try_from(get("meta.config")?).map_err(|e| err(format!("`meta.config`: {e}")))?;
        let config = String::from_utf8(config_bytes).map_err(|_| err("`meta.config` is not UTF-8".into()))?;
        let section = |p: &str| {
            let p = format!("{p}.");
            named
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(&p).map(|k| (k.to_string(), t.shallow_clone())))
                .collect::<Vec<_>>()
        };
        let student = section("student");
        if student.is_empty() {
            return Err(err("no student weights".into()));
        }
        let teacher = Some(section("teacher")).filter(|t| !t.is_empty());
        Ok(Snapshot { iteration, seed, config, student, teacher, momentum: section("optimizer.momentum") })
    }
}

/// The checkpoints in `dir`, oldest first, as (iteration, path). Temporary files are ignored.
pub fn list(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let it = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.parse().ok()?;
            Some((it, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint in `dir`.
pub fn latest(dir: &Path) -> Option<(i64, PathBuf)> {
    list(dir).pop()
}

/// Retention policy: which of `existing` (iterations, any order) to delete to keep the newest `keep`.
pub fn to_delete(existing: &[i64], keep: usize) -> Vec<i64> {
    let mut v = existing.to_vec();
    v.sort_unstable();
    let n = v.len().saturating_sub(keep.max(1));
    v.truncate(n);
    v
}

/// Deletes all but the newest `keep` checkpoints of `dir`; returns what it removed.
pub fn prune(dir: &Path, keep: usize) -> Vec<PathBuf> {
    let all = list(dir);
    let its: Vec<i64> = all.iter().map(|(i, _)| *i).collect();
    let del = to_delete(&its, keep);
    all.into_iter()
        .filter(|(i, _)| del.contains(i))
        .filter_map(|(_, p)| std::fs::remove_file(&p).ok().map(|_| p))
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
}

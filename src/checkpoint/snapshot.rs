//! One checkpoint file: what it holds ([`Snapshot`]), written atomically and read as untrusted.

use super::folder::is_run_id;
use crate::config::Config;
use crate::model::params::check_fits;
use crate::model::tensorfile::{self, RawTensor};
use crate::train::Trainer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Bumped when the layout of the file changes. 2: `meta.run_id`.
pub const FORMAT_VERSION: i64 = 2;

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
        super::folder::file_name(iteration, run_id)
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

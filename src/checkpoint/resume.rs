//! Which checkpoint a run continues from: the newest of its folder that fits the config (same
//! architecture, method and seed), past unreadable ones, which are set aside.

use super::folder::{entries, set_aside, Entry};
use super::snapshot::Snapshot;
use crate::config::Config;
use crate::train::Trainer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

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

//! A checkpoint folder: run ids and file names, listing, the lock that keeps a run to one process,
//! retention (only the run's own files) and the policy of when to write.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// File-name prefix and suffix of checkpoints: `ckpt-00001200-<run id>.safetensors`.
const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";
/// Appended to the name of a checkpoint that resuming found unusable.
pub const REJECTED_SUFFIX: &str = ".rejected";
/// Length of a run id (hex digits).
pub const RUN_ID_LEN: usize = 16;

/// The file name of run `run_id`'s checkpoint after `iteration` steps
/// (`ckpt-<iteration>-<run id>.safetensors`; `ckpt-<iteration>.safetensors` for run id `""`).
pub fn file_name(iteration: i64, run_id: &str) -> String {
    if run_id.is_empty() {
        format!("{PREFIX}{iteration:08}{SUFFIX}")
    } else {
        format!("{PREFIX}{iteration:08}-{run_id}{SUFFIX}")
    }
}

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
        assert_eq!(parse_name(&file_name(1200, &id)), Some((1200, id.clone())));
        assert_eq!(parse_name("ckpt-00001200.safetensors"), Some((1200, String::new())));
        assert_eq!(file_name(5, ""), "ckpt-00000005.safetensors");
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

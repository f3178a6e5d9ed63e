//! What is being written and must not outlive a failure or an interrupt: temporary files of
//! [`super::replace_atomic`] and the staging folders of imports. Each is registered while it
//! exists ([`stage`]); the guard unregisters it once it is renamed into place or removed.
//!
//! A one-shot command (`import`, `predict`, `export`, `eval`, `synth`, `info`) calls
//! [`remove_staged_on_signals`] first: SIGINT, SIGTERM and SIGHUP are then taken by one thread
//! that removes everything registered and ends the process with `128 + signal` (130 for
//! Ctrl-C), so an interrupted command leaves no hidden staging behind. The daemon (`train`) has
//! its own handlers (finish the step, checkpoint) and does not call it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Paths being written, by registration number.
static STAGED: Mutex<BTreeMap<u64, PathBuf>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A registered path; unregistered (not removed) when dropped.
#[derive(Debug)]
pub struct Staged(u64);

impl Drop for Staged {
    fn drop(&mut self) {
        STAGED.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}

/// Registers `path` (a file or a folder being written) for removal on an interrupt.
pub fn stage(path: &Path) -> Staged {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    STAGED.lock().unwrap_or_else(|e| e.into_inner()).insert(n, path.to_path_buf());
    Staged(n)
}

/// The paths registered now.
pub fn staged() -> Vec<PathBuf> {
    STAGED.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
}

/// Removes every registered path (files and whole folders); returns how many were removed. The
/// registry stays locked while it runs, so nothing is registered half-way.
pub fn remove_staged() -> usize {
    let staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
    remove_paths(staged.values())
}

/// Removes each of `paths` (a folder with all it holds); returns how many were removed.
fn remove_paths<'a>(paths: impl Iterator<Item = &'a PathBuf>) -> usize {
    let mut removed = 0;
    for path in paths {
        let gone = match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => remove_folder(path),
            Ok(_) => std::fs::remove_file(path).is_ok(),
            Err(_) => false,
        };
        removed += usize::from(gone);
    }
    removed
}

/// Removes the folder `path` and all it holds while another thread may still be writing into it:
/// first renamed aside (atomic: from then on nothing can be created under `path`, so the writer's
/// next file fails), then removed, trying again for about a second if an entry appears in
/// between. Whether it is gone.
fn remove_folder(path: &Path) -> bool {
    let aside = super::io::temp_name(&path.with_file_name(format!(
        "{}.removing",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    )));
    let target = if std::fs::rename(path, &aside).is_ok() { aside } else { path.to_path_buf() };
    for _ in 0..200 {
        match std::fs::remove_dir_all(&target) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
    false
}

/// The signals a one-shot command cleans up after.
const SIGNALS: [(libc::c_int, &str); 3] =
    [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")];

/// Takes SIGINT, SIGTERM and SIGHUP away from every thread of the process and hands them to one
/// thread that removes what is staged and exits with `128 + signal`. Call it first, before any
/// other thread is started (threads inherit the blocked set). Idempotent.
pub fn remove_staged_on_signals() -> std::io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| result = install());
    result
}

fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use; the set is only read
    // by pthread_sigmask and sigwait.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        for (s, _) in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    let set = SigSet(set);
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let set = set;
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set; `sig` receives the signal number.
            if unsafe { libc::sigwait(&set.0, &mut sig) } != 0 {
                continue;
            }
            let name = SIGNALS.iter().find(|(s, _)| *s == sig).map_or("a signal", |(_, n)| n);
            let removed = remove_staged();
            eprintln!("uamt: interrupted by {name}; removed {removed} unfinished output(s)");
            // SAFETY: ends the process at once, as the default action of the signal would
            // (without running destructors that other threads may be using).
            unsafe { libc::_exit(128 + sig) };
        }
    })?;
    Ok(())
}

/// A signal set that may move to the signal thread.
struct SigSet(libc::sigset_t);
// SAFETY: a sigset_t is plain data.
unsafe impl Send for SigSet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_removed_while_another_thread_still_writes_into_it() {
        let dir = std::env::temp_dir().join(format!("uamt-cleanup-busy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("imagesTr")).unwrap();
        let writer = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Writes until the folder is gone (as an import does until its next write fails).
                for i in 0.. {
                    if std::fs::write(dir.join(format!("imagesTr/{i}.nii")), [0u8; 4096]).is_err() {
                        return i;
                    }
                }
                unreachable!()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(remove_folder(&dir));
        assert!(!dir.exists());
        assert!(writer.join().unwrap() > 0);
    }

    #[test]
    fn staged_paths_are_removed_until_their_guard_is_dropped() {
        let dir = std::env::temp_dir().join(format!("uamt-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), "x").unwrap();
        let file = std::env::temp_dir().join(format!("uamt-cleanup-f-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let kept = std::env::temp_dir().join(format!("uamt-cleanup-k-{}", std::process::id()));
        std::fs::write(&kept, "x").unwrap();
        let done = stage(&kept);
        drop(done); // renamed into place: no longer the cleanup's business
        let (a, b) = (stage(&dir), stage(&file));
        assert!(staged().contains(&dir) && staged().contains(&file) && !staged().contains(&kept));
        // (Not remove_staged(): other tests' temporary files are registered at the same time.)
        assert_eq!(remove_paths([dir.clone(), file.clone()].iter()), 2);
        assert!(!dir.exists() && !file.exists());
        assert!(kept.exists());
        drop((a, b));
        assert!(!staged().contains(&dir));
        std::fs::remove_file(&kept).unwrap();
    }
}

//! Atomic file writing shared by every writer: a temporary name in the target's own folder, the
//! content written and synced, a rename over the target, then the folder synced, so a reader sees
//! either the old file or the whole new one and a crash leaves no half-written file behind. The
//! target must be a regular file or absent (never a device, FIFO, socket, folder or link, which a
//! rename would replace), and the temporary file is registered with [`super::cleanup`], so an
//! interrupt removes it too.

use super::io::{at, parent_dir, temp_name, IoError};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Flushes the folder `dir`'s entries (a rename into it) to disk. File systems that cannot sync
/// a folder are not an error.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    #[cfg(unix)]
    {
        use std::io::ErrorKind;
        let synced = File::open(dir).and_then(|d| d.sync_all());
        match synced {
            Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) => Ok(()),
            r => at(r, dir),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Refuses a target that exists and is not a regular file: a rename would put a regular file in
/// place of a device node, FIFO, socket, folder or symbolic link.
pub fn check_target(path: &Path) -> Result<(), IoError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(IoError::refused(
            path,
            format!("exists and is {}, not a regular file: refusing to replace it", super::io::kind_of(&m.file_type())),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError { path: path.to_path_buf(), source: e }),
    }
}

/// Replaces `path` atomically with a file that `fill` writes at the temporary path it is given:
/// then the temporary file is synced, renamed over `path` and the folder synced. A `path` that
/// exists and is not a regular file is refused before anything is written ([`check_target`]).
/// On any error, and on SIGINT/SIGTERM/SIGHUP in a one-shot command, the temporary file is
/// removed and `path` is left as it was.
pub fn replace_atomic<E: From<IoError>>(path: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    check_target(path)?;
    let tmp = temp_name(path);
    let staged = super::cleanup::stage(&tmp);
    let result = fill(&tmp)
        .and_then(|()| Ok(at(File::open(&tmp).and_then(|f| f.sync_all()), &tmp)?))
        .and_then(|()| Ok(check_target(path)?))
        .and_then(|()| Ok(at(std::fs::rename(&tmp, path), path)?));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drop(staged);
    result?;
    Ok(sync_dir(parent_dir(path))?)
}

/// Replaces `path` atomically with what `write` writes (buffered), as [`replace_atomic`] does.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), IoError> {
    replace_atomic(path, |tmp| {
        let written = File::create(tmp).and_then(|f| {
            let mut w = BufWriter::with_capacity(1 << 20, f);
            write(&mut w)?;
            w.flush()
        });
        at(written, path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uamt-fsutil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn should_replace_the_file_and_leave_no_temporary_behind() {
        let dir = scratch("replace");
        let path = dir.join("a.txt");
        write_atomic(&path, |w| w.write_all(b"old")).unwrap();
        write_atomic(&path, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_keep_the_old_file_when_writing_fails() {
        let dir = scratch("fail");
        let path = dir.join("a.txt");
        write_atomic(&path, |w| w.write_all(b"old")).unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, path);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_refuse_to_replace_what_is_not_a_regular_file() {
        let dir = scratch("special");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("elsewhere"), &link).unwrap();
        for target in [&fifo, &link, &dir] {
            let err = write_atomic(target, |w| w.write_all(b"x")).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        // Nothing staged is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_name_temporaries_uniquely_in_the_same_folder() {
        let p = Path::new("some/dir/file.nii.gz");
        let (a, b) = (temp_name(p), temp_name(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("some/dir")));
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".file.nii.gz.tmp-"));
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
    }
}

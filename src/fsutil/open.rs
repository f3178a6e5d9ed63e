//! Reading a path someone named: regular files only (a symbolic link to one is fine). A FIFO would
//! block the command forever, a device could be endless or have side effects on open, a socket
//! cannot be read: each is refused with the path and its kind, before it is opened for reading,
//! and checked again on the open handle (opened non-blocking), so a file swapped in between is
//! refused as well.

use super::io::{at, kind_of, IoError};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Checks, without opening it, that `path` is (or links to) a regular file; returns its size.
/// For readers that open by path themselves (the HDF5 library, libtorch's TorchScript loader).
pub fn check_regular(path: &Path) -> Result<u64, IoError> {
    let meta = at(std::fs::metadata(path), path)?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok(meta.len())
}

fn not_regular(path: &Path, t: &std::fs::FileType) -> IoError {
    IoError::refused(path, format!("{}, not a regular file: refused", kind_of(t)))
}

/// Opens `path` for reading if it is a regular file ([`check_regular`], then again on the handle,
/// which is opened with `O_NONBLOCK` and set back to blocking once known to be regular).
pub fn open_regular(path: &Path) -> Result<File, IoError> {
    check_regular(path)?;
    let file = at(std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path), path)?;
    let meta = at(file.metadata(), path)?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns, with flags read from it.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(IoError { path: path.to_path_buf(), source: std::io::Error::last_os_error() });
    }
    Ok(file)
}

/// The whole content of the regular file `path`, refused (naming the limit) above `max_bytes`.
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>, IoError> {
    let file = open_regular(path)?;
    let len = at(file.metadata(), path)?.len();
    if len > max_bytes {
        return Err(IoError::refused(path, format!("{len} bytes, more than the {max_bytes} bytes taken: refused")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    at(file.take(max_bytes + 1).read_to_end(&mut bytes), path)?;
    if bytes.len() as u64 > max_bytes {
        return Err(IoError::refused(path, format!("grew past {max_bytes} bytes while read: refused")));
    }
    Ok(bytes)
}

/// The largest text file (a config, a manifest, a case list, a JSON record) taken.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// A text file (UTF-8, at most [`MAX_TEXT_BYTES`]) that passes [`open_regular`].
pub fn read_text(path: &Path) -> Result<String, IoError> {
    let bytes = read_regular(path, MAX_TEXT_BYTES)?;
    String::from_utf8(bytes).map_err(|e| IoError::refused(path, format!("not UTF-8 text: {e}")))
}

/// The largest secret file (a token) taken.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// The content of a file holding a secret (a token): a regular file ([`open_regular`]) of at most
/// [`MAX_SECRET_BYTES`] that neither its group nor others may read, write or run, checked on the
/// open handle (as ssh checks its keys: mode 600 or 400). The error names the file and its mode,
/// never the content.
pub fn read_private(path: &Path) -> Result<Vec<u8>, IoError> {
    use std::os::unix::fs::PermissionsExt;
    let file = open_regular(path)?;
    let meta = at(file.metadata(), path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IoError::refused(
            path,
            format!(
                "mode {mode:03o} lets its group or others access it: refused for a secret (chmod 600 {}, as ssh asks \
                 of its keys)",
                path.display()
            ),
        ));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(IoError::refused(
            path,
            format!("{} bytes, more than the {MAX_SECRET_BYTES} bytes a secret may have: refused", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    at(file.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes), path)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(IoError::refused(path, format!("grew past {MAX_SECRET_BYTES} bytes while read: refused")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("uamt-open-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn should_refuse_fifos_folders_and_devices_without_blocking() {
        let dir = scratch("special");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("link-to-fifo");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let cases = [(&fifo, "a FIFO"), (&link, "a FIFO"), (&dir, "a folder")];
        for (path, kind) in cases {
            for err in [open_regular(path).unwrap_err(), read_text(path).unwrap_err(), check_regular(path).unwrap_err()]
            {
                let msg = err.to_string();
                assert!(msg.contains(kind) && msg.contains("not a regular file"), "{msg}");
                assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            }
        }
        let msg = read_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(msg.contains("a character device"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_read_regular_files_and_links_to_them_within_the_limit() {
        let dir = scratch("regular");
        let f = dir.join("a.txt");
        std::fs::write(&f, "hello").unwrap();
        let link = dir.join("b.txt");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(read_text(&link).unwrap(), "hello");
        assert_eq!(check_regular(&f).unwrap(), 5);
        let err = read_regular(&f, 4).unwrap_err().to_string();
        assert!(err.contains("more than the 4 bytes"), "{err}");
        // The handle is blocking again: a read to the end works as usual.
        let mut s = String::new();
        open_regular(&f).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(read_text(&f).unwrap_err().to_string().contains("not UTF-8"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_read_a_secret_only_when_group_and_others_have_no_access() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("secret");
        let f = dir.join("token");
        std::fs::write(&f, "0123456789abcdef\n").unwrap();
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_private(&f).unwrap(), b"0123456789abcdef\n");
        }
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let msg = read_private(&f).unwrap_err().to_string();
            assert!(msg.starts_with(&f.display().to_string()) && msg.contains(&format!("mode {mode:03o}")), "{msg}");
            assert!(!msg.contains("0123456789abcdef"), "the secret leaked into the error: {msg}");
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, vec![b'x'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert!(read_private(&f).unwrap_err().to_string().contains("more than the 4096 bytes"));
        assert!(read_private(&dir).unwrap_err().to_string().contains("a folder"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Outputs never overlap inputs: before a command writes anything, each output it will write is
//! resolved (symbolic links followed, `..` taken out, the part that does not exist yet appended to
//! its deepest existing folder) and compared with each input it reads. An output that equals an
//! input (the same path, or the same file through a hard link), contains one (a folder above it)
//! or lies inside one is refused, naming both.

use super::io::{at, IoError};
use std::path::{Component, Path, PathBuf};

/// `path` made absolute and canonical as far as it exists: symbolic links in the existing part
/// resolved, the rest appended with `.` and `..` taken out.
pub fn resolve(path: &Path) -> Result<PathBuf, IoError> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { at(std::env::current_dir(), path)?.join(path) };
    let parts: Vec<Component> = abs.components().collect();
    for k in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..k].iter().collect();
        if let Ok(mut base) = std::fs::canonicalize(&head) {
            for c in &parts[k..] {
                match c {
                    Component::ParentDir => {
                        base.pop();
                    }
                    Component::Normal(n) => base.push(n),
                    _ => {}
                }
            }
            return Ok(base);
        }
    }
    Err(IoError::refused(path, "cannot be resolved"))
}

/// Whether `a` and `b` are one file (a hard link, a bind mount): same device and inode.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Refuses (naming both, by their flags) an output that equals, contains or lies inside an input.
/// `outputs` and `inputs` are `(flag, path)` pairs, e.g. `("--out", out)`, `("--src", src)`.
pub fn check_apart(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<(), IoError> {
    for &(oflag, out) in outputs {
        let ro = resolve(out)?;
        for &(iflag, input) in inputs {
            let ri = resolve(input)?;
            let how = if ro == ri || same_file(out, input) {
                "is the same file or folder as"
            } else if ro.starts_with(&ri) {
                "lies inside"
            } else if ri.starts_with(&ro) {
                "contains"
            } else {
                continue;
            };
            return Err(IoError::refused(
                out,
                format!(
                    "{oflag} {how} {iflag} {} ({} and {} resolved): uamt never writes where it reads; choose \
                     another {oflag}",
                    input.display(),
                    ro.display(),
                    ri.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uamt-paths-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    fn refused(out: &Path, input: &Path) -> String {
        check_apart(&[("--out", out)], &[("--src", input)]).unwrap_err().to_string()
    }

    #[test]
    fn should_resolve_links_and_the_part_that_does_not_exist() {
        let dir = scratch("resolve");
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        assert_eq!(resolve(&dir.join("link/new/../x")).unwrap(), dir.join("real/x"));
        assert_eq!(resolve(&dir.join("gone/a/./b")).unwrap(), dir.join("gone/a/b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_refuse_equal_containing_and_inner_outputs() {
        let dir = scratch("overlap");
        let src = dir.join("raw");
        std::fs::create_dir_all(src.join("imagesTr")).unwrap();
        std::fs::write(src.join("dataset.json"), "{}").unwrap();
        std::os::unix::fs::symlink(&src, dir.join("alias")).unwrap();
        std::fs::hard_link(src.join("dataset.json"), dir.join("hard.json")).unwrap();
        let same = refused(&src, &src);
        assert!(same.contains("--out is the same file or folder as --src"), "{same}");
        assert!(refused(&dir.join("alias"), &src).contains("the same"));
        assert!(refused(&dir.join("raw/../raw/"), &src).contains("the same"));
        assert!(refused(&dir.join("hard.json"), &src.join("dataset.json")).contains("the same"));
        assert!(refused(&dir, &src).contains("--out contains --src"));
        assert!(refused(&src.join("imagesTr/new"), &src).contains("--out lies inside --src"));
        assert!(refused(&dir.join("alias/new"), &src).contains("lies inside"));
        // Siblings, even with a common prefix, are apart.
        check_apart(&[("--out", &dir.join("raw2")), ("--out", &dir.join("out"))], &[("--src", &src)]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! A raw Medical Segmentation Decathlon or nnU-Net folder read as untrusted input: `dataset.json`
//! (its shape, `labels`, `training` and `test` lists), the files of `imagesTr/`, `labelsTr/`,
//! `imagesTs/` and `labelsTs/`, every path kept inside the folder after resolving links, and every
//! file found there but not imported reported with the reason.

use super::error::{DataError, IoAt, Result};
use super::nifti::stem;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One case found in the raw folder.
#[derive(Debug, Clone)]
pub(crate) struct RawCase {
    /// The case ID.
    pub(crate) id: String,
    /// The image.
    pub(crate) image: PathBuf,
    /// The label, if any.
    pub(crate) label: Option<PathBuf>,
}

/// Case ID of an image file: MSD names it `<id>.nii.gz`; nnU-Net v2 `<id>_0000.nii.gz`. The ID
/// must be a plain name (outputs are written as `<id>.<kind>`).
fn case_id(path: &Path, nnunet: bool) -> Result<String> {
    let s = stem(path);
    let id = if !nnunet {
        s
    } else {
        match s.rsplit_once('_') {
            Some((id, "0000")) if !id.is_empty() => id.to_string(),
            Some((_, ch)) if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(DataError::bad(
                    path,
                    format!("channel `_{ch}`: only single-channel images (`_0000`) are supported"),
                ))
            }
            _ => {
                return Err(DataError::bad(
                    path,
                    "unknown channel suffix: nnU-Net images are named `<case>_0000.nii[.gz]` (a folder without \
                     dataset.json's `training` list is read as nnU-Net v2's layout)",
                ))
            }
        }
    };
    crate::data::dataset::check_case_id(&id).map_err(|why| DataError::bad(path, why))?;
    Ok(id)
}

/// Whether `path`'s name is a NIfTI file name (`.nii`, `.nii.gz`, any case) and not hidden.
fn is_nifti_name(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".nii") || name.ends_with(".nii.gz"))
}

/// Every entry of the folder `dir` (none when it does not exist), sorted.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in fs::read_dir(dir).at(dir)? {
        v.push(e.at(dir)?.path());
    }
    v.sort();
    Ok(v)
}

/// The NIfTI files of `dir`, sorted; what else it holds goes to `ignored` with the reason.
fn nifti_files(dir: &Path, ignored: &mut Vec<(PathBuf, String)>) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for p in entries(dir)? {
        if is_nifti_name(&p) {
            v.push(p);
        } else {
            let why = match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => "a folder (sub-folders are not read)",
                _ if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) => "a hidden file",
                _ => "not a NIfTI file (.nii, .nii.gz)",
            };
            ignored.push((p, why.into()));
        }
    }
    Ok(v)
}

/// The label file of case `id` in `dir` (`.nii.gz` or `.nii`), if either name exists.
fn label_for(dir: &Path, id: &str) -> Option<PathBuf> {
    [".nii.gz", ".nii"].iter().map(|e| dir.join(format!("{id}{e}"))).find(|p| std::fs::symlink_metadata(p).is_ok())
}

/// The source's `dataset.json` fields the importer uses.
pub(crate) struct Source {
    /// Training and test cases.
    pub(crate) training: Vec<RawCase>,
    /// Unlabelled test images (and labelled ones when `labelsTs/` has them).
    pub(crate) test: Vec<RawCase>,
    /// Class names by value.
    pub(crate) labels: Vec<String>,
    /// The modality of channel 0.
    pub(crate) modality: String,
    /// The dataset's name.
    pub(crate) name: String,
    /// Files found in the source's folders that are not imported, with the reason.
    pub(crate) ignored: Vec<(PathBuf, String)>,
}

/// The largest class value a label may hold (labels are written as 8-bit integers).
const MAX_CLASS: u64 = 255;

/// The classes `dataset.json`'s `labels` names, by value: MSD's `{"0": "background"}` or nnU-Net
/// v2's `{"background": 0}`; every value a distinct integer in 0..=255. Absent: background and
/// foreground.
fn read_label_names(j: &serde_json::Value, mpath: &Path) -> Result<Vec<String>> {
    use serde_json::Value;
    let bad = |why: String| DataError::bad(mpath, format!("`labels`: {why}"));
    let Some(v) = j.get("labels") else { return Ok(vec!["background".into(), "foreground".into()]) };
    let m = v.as_object().ok_or_else(|| {
        bad(format!(
            "{v} is not an object such as {{\"0\": \"background\", \"1\": \"atrium\"}} (MSD) or {{\"background\": 0, \
             \"atrium\": 1}} (nnU-Net)"
        ))
    })?;
    let mut labels: BTreeMap<u64, String> = BTreeMap::new();
    for (k, v) in m {
        let (value, name) = match v {
            Value::String(s) => {
                let n = k.trim().parse::<u64>().ok().filter(|&n| n <= MAX_CLASS);
                (n.ok_or_else(|| bad(format!("key `{k}` is not a class value in 0..={MAX_CLASS}")))?, s.clone())
            }
            Value::Number(n) => {
                let value = n.as_u64().filter(|&n| n <= MAX_CLASS);
                (value.ok_or_else(|| bad(format!("`{k}`: {n} is not a class value in 0..={MAX_CLASS}")))?, k.clone())
            }
            other => {
                return Err(bad(format!(
                    "`{k}`: {other} is neither a class name nor a class value (region-based labels are not supported)"
                )))
            }
        };
        if let Some(prev) = labels.insert(value, name.clone()) {
            return Err(bad(format!("class value {value} is given twice (`{prev}` and `{name}`)")));
        }
    }
    let Some(&max) = labels.keys().max() else { return Err(bad("names no class".into())) };
    Ok((0..=max).map(|v| labels.get(&v).cloned().unwrap_or_else(|| format!("class {v}"))).collect())
}

/// A path `dataset.json` gives (`rel`, relative to `src`), refused when absolute or leading
/// outside `src`; `what` says which entry, for the error.
fn listed_path(src: &Path, mpath: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    if rel.contains('\0') || Path::new(rel).is_absolute() {
        return Err(DataError::bad(
            mpath,
            format!("{what}: `{}` is not a path inside the source folder", rel.escape_debug()),
        ));
    }
    let path = src.join(rel);
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(DataError::bad(&path, format!("listed in {} ({what}) but missing", mpath.display())));
    }
    inside_src(src, &path)
}

/// `path` (a file found under the source folder `src`) if it stays inside `src` after resolving
/// symbolic links; else an error naming it: a source folder is untrusted input, like a dataset.
fn inside_src(src: &Path, path: &Path) -> Result<PathBuf> {
    let base = fs::canonicalize(src).at(src)?;
    let real = fs::canonicalize(path).at(path)?;
    if !real.starts_with(&base) {
        return Err(DataError::bad(
            path,
            format!("leads outside the source folder {} (to {}): refused", src.display(), real.display()),
        ));
    }
    Ok(path.to_path_buf())
}

/// The string field `key` of a `dataset.json` entry, if present; an error when not a string.
fn field<'a>(e: &'a serde_json::Value, key: &str, mpath: &Path, what: &str) -> Result<Option<&'a str>> {
    match e.get(key) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DataError::bad(mpath, format!("{what}: \"{key}\" is {other}, not a path"))),
    }
}

/// Reads the raw folder's layout; every training case must have its label. A source folder is
/// untrusted input: every path stays inside `src` after resolving links, `dataset.json`'s shape
/// and `labels` are checked, and every file of `imagesTr/`, `labelsTr/`, `imagesTs/` and
/// `labelsTs/` that is not imported is listed in `ignored` with the reason.
pub(crate) fn read_source(src: &Path) -> Result<Source> {
    let mpath = src.join("dataset.json");
    let text = crate::fsutil::read_text(&mpath)?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::bad(&mpath, format!("invalid JSON: {e}")))?;
    if !j.is_object() {
        return Err(DataError::bad(&mpath, "must hold a JSON object (MSD's or nnU-Net's dataset.json)"));
    }
    let name = j.get("name").and_then(|v| v.as_str()).unwrap_or("imported").to_string();
    let modality = ["modality", "channel_names"]
        .iter()
        .find_map(|k| j.get(*k).and_then(|m| m.get("0")).and_then(|v| v.as_str()))
        .unwrap_or("image")
        .to_string();
    let labels = read_label_names(&j, &mpath)?;
    let list = match j.get("training") {
        None => None,
        Some(serde_json::Value::Array(list)) => Some(list),
        Some(other) => {
            return Err(DataError::bad(
                &mpath,
                format!(
                    "`training` is {other}, not a list of {{\"image\": \"./imagesTr/<case>.nii.gz\", \"label\": \
                     \"./labelsTr/<case>.nii.gz\"}} entries (leave it out for nnU-Net v2's layout)"
                ),
            ))
        }
    };
    let nnunet = list.is_none();
    let (images_tr, labels_tr) = (src.join("imagesTr"), src.join("labelsTr"));
    let (images_ts, labels_ts) = (src.join("imagesTs"), src.join("labelsTs"));
    let mut ignored = Vec::new();
    let found_tr = nifti_files(&images_tr, &mut ignored)?;
    let mut training = Vec::new();
    if let Some(list) = list {
        for (i, e) in list.iter().enumerate() {
            let what = format!("`training` entry {i}");
            if !e.is_object() {
                return Err(DataError::bad(
                    &mpath,
                    format!("{what} is {e}, not an object with \"image\" and \"label\""),
                ));
            }
            let img = field(e, "image", &mpath, &what)?
                .ok_or_else(|| DataError::bad(&mpath, format!("{what} has no \"image\"")))?;
            let image = listed_path(src, &mpath, img, &what)?;
            let id = case_id(&image, false)?;
            let label = match field(e, "label", &mpath, &what)? {
                Some(l) => listed_path(src, &mpath, l, &what)?,
                None => {
                    let l = labels_tr.join(format!("{id}.nii.gz"));
                    if std::fs::symlink_metadata(&l).is_err() {
                        return Err(DataError::bad(&l, format!("missing: the label of training case `{id}`")));
                    }
                    inside_src(src, &l)?
                }
            };
            training.push(RawCase { id, image, label: Some(label) });
        }
    } else {
        for image in &found_tr {
            let image = inside_src(src, image)?;
            let id = case_id(&image, true)?;
            let label = label_for(&labels_tr, &id).ok_or_else(|| {
                DataError::bad(&image, format!("no label for training case `{id}` in {}", labels_tr.display()))
            })?;
            training.push(RawCase { id, label: Some(inside_src(src, &label)?), image });
        }
    }
    let mut test = Vec::new();
    for image in nifti_files(&images_ts, &mut ignored)? {
        let image = inside_src(src, &image)?;
        let id = case_id(&image, nnunet)?;
        let label = label_for(&labels_ts, &id).map(|l| inside_src(src, &l)).transpose()?;
        test.push(RawCase { label, id, image });
    }
    // dataset.json's `test` list (MSD): each image must exist; those outside imagesTs/ are
    // imported too.
    match j.get("test") {
        None => {}
        Some(serde_json::Value::Array(list)) => {
            for (i, e) in list.iter().enumerate() {
                let what = format!("`test` entry {i}");
                let rel = match e {
                    serde_json::Value::String(s) => s.as_str(),
                    _ => field(e, "image", &mpath, &what)?
                        .ok_or_else(|| DataError::bad(&mpath, format!("{what} is {e}, not a path")))?,
                };
                let image = listed_path(src, &mpath, rel, &what)?;
                let same = |c: &RawCase| fs::canonicalize(&c.image).ok() == fs::canonicalize(&image).ok();
                if !test.iter().any(same) {
                    let id = case_id(&image, false)?;
                    test.push(RawCase { id, image, label: None });
                }
            }
        }
        Some(other) => {
            return Err(DataError::bad(&mpath, format!("`test` is {other}, not a list of image paths")));
        }
    }
    let mut seen = HashSet::new();
    if let Some(c) = training.iter().chain(&test).find(|c| !seen.insert(c.id.clone())) {
        return Err(DataError::bad(&c.image, format!("case `{}` appears twice", c.id)));
    }
    if training.is_empty() {
        return Err(DataError::bad(src, "no training cases (imagesTr/ is empty and dataset.json lists none)"));
    }
    // What the folders hold that is not imported.
    let used: HashSet<PathBuf> = training
        .iter()
        .chain(&test)
        .flat_map(|c| std::iter::once(&c.image).chain(c.label.as_ref()))
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    for p in &found_tr {
        if !fs::canonicalize(p).is_ok_and(|c| used.contains(&c)) {
            ignored.push((p.clone(), "not listed in dataset.json's `training`".into()));
        }
    }
    for dir in [&labels_tr, &labels_ts] {
        for p in nifti_files(dir, &mut ignored)? {
            if !fs::canonicalize(&p).is_ok_and(|c| used.contains(&c)) {
                ignored.push((p, "a label without an image of the same case".into()));
            }
        }
    }
    ignored.sort();
    Ok(Source { training, test, labels, modality, name, ignored })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_suffixes() {
        assert_eq!(case_id(Path::new("a/la_003_0000.nii.gz"), true).unwrap(), "la_003");
        assert!(case_id(Path::new("a/la_003_0001.nii.gz"), true).is_err());
        assert!(case_id(Path::new("a/la_003.nii.gz"), true).is_err());
        assert_eq!(case_id(Path::new("a/la_003.nii.gz"), false).unwrap(), "la_003");
    }

    #[test]
    fn labels_of_dataset_json_are_bounded_unique_non_negative_integers() {
        let read = |labels: &str| {
            let j: serde_json::Value = serde_json::from_str(&format!(r#"{{"labels": {labels}}}"#)).unwrap();
            read_label_names(&j, Path::new("d/dataset.json")).map_err(|e| e.to_string())
        };
        assert_eq!(read(r#"{"0": "bg", "2": "b"}"#).unwrap(), vec!["bg", "class 1", "b"]);
        assert_eq!(read(r#"{"bg": 0, "a": 1}"#).unwrap(), vec!["bg", "a"]);
        assert_eq!(read(r#"{"0": "bg", "255": "x"}"#).unwrap().len(), 256);
        for bad in [
            r#"{"0": "bg", "4294967296": "x"}"#,
            r#"{"0": "bg", "256": "x"}"#,
            r#"{"bg": 0, "a": -1}"#,
            r#"{"bg": 0, "a": 1e12}"#,
            r#"{"bg": 0, "a": 1.5}"#,
            r#"{"bg": 0, "a": 0}"#,
            r#"{"0": "bg", "00": "a"}"#,
            r#"{"bg": 0, "a": [1, 2]}"#,
            r#"{}"#,
            r#"[1]"#,
        ] {
            let e = read(bad).unwrap_err();
            assert!(e.starts_with("d/dataset.json: `labels`"), "{bad}: {e}");
        }
        // Absent: background and foreground.
        let j = serde_json::json!({});
        assert_eq!(read_label_names(&j, Path::new("x")).unwrap(), vec!["background", "foreground"]);
    }

    #[test]
    fn listed_paths_stay_inside_the_source() {
        let dir = std::env::temp_dir().join(format!("uamt-listed-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("imagesTr")).unwrap();
        std::fs::write(src.join("imagesTr/a.nii"), "x").unwrap();
        std::fs::write(dir.join("outside.nii"), "x").unwrap();
        std::os::unix::fs::symlink(dir.join("outside.nii"), src.join("imagesTr/b.nii")).unwrap();
        let m = src.join("dataset.json");
        assert!(listed_path(&src, &m, "./imagesTr/a.nii", "entry 0").is_ok());
        for bad in ["../outside.nii", "./imagesTr/b.nii", dir.join("outside.nii").to_str().unwrap(), "./gone.nii"] {
            assert!(listed_path(&src, &m, bad, "entry 0").is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Hostile data files: headers claiming more than the file holds, gzip bombs, paths leading out
//! of their folder, bad case ids, labels outside the classes, NaN voxels, mismatched geometry,
//! files truncated in place under a mapping (the size check and the SIGBUS handler). Every input
//! is made here; nothing binary is committed.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use support::*;
use uamt::data::dataset::{check_case_id, training_entry, CaseEntry};
use uamt::data::nifti::{write_nifti, GzCache, NiftiVolume};
use uamt::data::sampler::{LoaderConfig, SamplerConfig};
use uamt::data::{h5, nrrd, Dataset, DatasetOptions, Geometry, Manifest, PatchLoader, Volume};

/// The error text of `r`, which must be an error.
fn err<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `msg` names `path` (its folder and file name: manifests spell paths `./dir/x`)
/// and says `what`.
fn assert_names(msg: &str, path: &Path, what: &str) {
    let parent = path.parent().and_then(|p| p.file_name()).unwrap_or_default();
    let tail = Path::new(parent).join(path.file_name().unwrap()).display().to_string();
    assert!(msg.contains(&tail), "`{msg}` does not name {}", path.display());
    assert!(msg.contains(what), "`{msg}` does not say `{what}`");
}

/// A small valid `.nii` of uint8 zeros, 4 x 4 x 4.
fn small_nii(path: &Path) {
    write_nifti(path, &Volume::<u8>::zeros([4, 4, 4]), &Geometry::from_spacing([1.0; 3])).unwrap();
}

/// Sets `dim[1..=3]` of the little-endian NIfTI header in `bytes`.
fn set_dims(bytes: &mut [u8], dims: [i16; 3]) {
    for (i, d) in dims.iter().enumerate() {
        bytes[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

// ---- 1. readers: allocations bounded by the file or a cap --------------------------------------

#[test]
fn a_sparse_nifti_claiming_gigavoxels_is_refused_before_any_allocation() {
    let dir = TempDir::new("fault-sparse");
    let path = dir.join("huge.nii");
    small_nii(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    set_dims(&mut bytes, [4096, 4096, 128]); // 2^31 voxels of uint8: over the cap
    std::fs::write(&path, &bytes[..352]).unwrap();
    // Sparse: the file really is 2 GiB long, so only the cap can refuse it.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(352 + (1u64 << 31)).unwrap();
    let msg = err(NiftiVolume::open(&path, &GzCache::Memory));
    assert_names(&msg, &path, "exceeds the limit");
}

#[test]
fn a_nifti_gzip_bomb_is_refused_once_past_the_declared_size() {
    let dir = TempDir::new("fault-gzbomb");
    let plain = dir.join("small.nii");
    small_nii(&plain);
    let mut bytes = std::fs::read(&plain).unwrap();
    bytes.resize(bytes.len() + (64 << 20), 0); // 64 MiB past what the header declares
    let gz = dir.join("bomb.nii.gz");
    std::fs::write(&gz, gzip(&bytes)).unwrap();
    for cache in [GzCache::Memory, GzCache::Dir(dir.join("cache"))] {
        let msg = err(NiftiVolume::open(&gz, &cache));
        assert_names(&msg, &gz, "more than the 416 bytes its header declares");
    }
    // No partial copy is left in the cache.
    let left: Vec<_> = std::fs::read_dir(dir.join("cache")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // A header declaring too many voxels is refused before the voxels are inflated at all.
    let mut head = std::fs::read(&plain).unwrap();
    set_dims(&mut head, [4096, 4096, 128]);
    let gz2 = dir.join("claims.nii.gz");
    std::fs::write(&gz2, gzip(&head)).unwrap();
    assert_names(&err(NiftiVolume::open(&gz2, &GzCache::Memory)), &gz2, "exceeds the limit");
    // The exact stream still opens.
    let ok = dir.join("ok.nii.gz");
    std::fs::write(&ok, gzip(&std::fs::read(&plain).unwrap())).unwrap();
    assert_eq!(NiftiVolume::open(&ok, &GzCache::Memory).unwrap().dims(), [4, 4, 4]);
}

fn nrrd_header(sizes: &str, encoding: &str, extra: &str) -> String {
    format!("NRRD0004\ntype: uchar\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n{extra}\n")
}

#[test]
fn nrrd_sizes_gzip_bombs_and_data_files_outside_the_folder_are_refused() {
    let dir = TempDir::new("fault-nrrd");
    let huge = dir.join("huge.nrrd");
    std::fs::write(&huge, nrrd_header("100000 100000 100000", "raw", "")).unwrap();
    assert_names(&err(nrrd::read_nrrd(&huge)), &huge, "exceeds the limit");

    let bomb = dir.join("bomb.nrrd");
    let mut b = nrrd_header("2 2 2", "gzip", "").into_bytes();
    b.extend(gzip(&vec![0u8; 32 << 20]));
    std::fs::write(&bomb, b).unwrap();
    assert_names(&err(nrrd::read_nrrd(&bomb)), &bomb, "more than the 8 bytes");

    let inner = dir.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(dir.join("secret.raw"), [1u8; 8]).unwrap();
    std::os::unix::fs::symlink(dir.join("secret.raw"), inner.join("link.raw")).unwrap();
    let abs = dir.join("secret.raw").display().to_string();
    for name in ["../secret.raw", abs.as_str(), "link.raw"] {
        let p = inner.join("detached.nrrd");
        std::fs::write(&p, nrrd_header("2 2 2", "raw", &format!("data file: {name}"))).unwrap();
        assert_names(&err(nrrd::read_nrrd(&p)), &p, "points outside the folder");
    }
    // Inside the folder it reads.
    std::fs::write(inner.join("data.raw"), [3u8; 8]).unwrap();
    let p = inner.join("ok.nrrd");
    std::fs::write(&p, nrrd_header("2 2 2", "raw", "data file: data.raw")).unwrap();
    assert_eq!(nrrd::read_nrrd(&p).unwrap().volume.data, vec![3.0; 8]);
}

#[test]
fn an_hdf5_dataspace_over_the_cap_is_refused_before_reading() {
    let dir = TempDir::new("fault-h5");
    let path = dir.join("huge.h5");
    {
        let f = hdf5::File::create(&path).unwrap();
        // Chunked and never written: a few KiB on disk declaring 2^31 voxels.
        f.new_dataset::<f32>().shape([2048, 2048, 512]).chunk([32, 32, 32]).deflate(4).create("image").unwrap();
        f.new_dataset::<u8>().shape([2, 2, 2]).create("label").unwrap();
    }
    assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
    assert_names(&err(h5::read_h5_case(&path, 1)), &path, "exceeds");
}

// ---- 2 and 3. dataset folders: ids, paths, values, geometry ------------------------------------

/// A dataset of `n` labelled-or-not 8 x 8 x 4 training cases (`case_0` labelled) and one test case,
/// two classes, written with the standard layout.
fn dataset(dir: &Path, n: usize) -> PathBuf {
    let root = dir.join("ds");
    let g = Geometry::from_spacing([1.0; 3]);
    for sub in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let mut training = Vec::new();
    for i in 0..n {
        let id = format!("case_{i}");
        write_nifti(root.join(format!("imagesTr/{id}.nii")), &Volume::new([8, 8, 4], vec![0.5f32; 256]).unwrap(), &g)
            .unwrap();
        let mut label = Volume::<u8>::zeros([8, 8, 4]);
        label.data[100] = 1;
        write_nifti(root.join(format!("labelsTr/{id}.nii")), &label, &g).unwrap();
        training.push(training_entry(&id, ".nii", i < 2));
    }
    write_nifti(root.join("imagesTs/t.nii"), &Volume::new([8, 8, 4], vec![0.5f32; 256]).unwrap(), &g).unwrap();
    write_nifti(root.join("labelsTs/t.nii"), &Volume::<u8>::zeros([8, 8, 4]), &g).unwrap();
    let test = vec![uamt::data::dataset::test_entry("t", ".nii")];
    Manifest::new("fault", "", "MRI", &["background", "atrium"], training, test).write(&root).unwrap();
    root
}

fn edit_manifest(root: &Path, f: impl FnOnce(&mut Manifest)) {
    let mut m = Manifest::read(root).unwrap();
    f(&mut m);
    m.write(root).unwrap();
}

fn open(root: &Path) -> Result<Dataset, uamt::data::DataError> {
    Dataset::open(root, &DatasetOptions::default())
}

#[test]
fn case_ids_must_be_plain_names() {
    for bad in ["", ".", "..", "a/b", "../x", "/etc/x", "a\\b", "a\0b", "a\nb"] {
        assert!(check_case_id(bad).is_err(), "{bad:?} accepted");
    }
    assert!(check_case_id("la_001.v2").is_ok());
    let dir = TempDir::new("fault-ids");
    let root = dataset(&dir, 3);
    for bad in ["../../evil", "/tmp/evil", "a/b"] {
        edit_manifest(&root, |m| m.training[2].id = bad.into());
        assert_names(&err(open(&root)), &root.join("dataset.json"), "plain name");
        // Skipping mode leaves the case out and says why.
        let (ds, skipped) = Dataset::open_skipping_bad(&root, &DatasetOptions::default()).unwrap();
        assert_eq!((ds.training.len(), skipped.len()), (2, 1));
    }
}

#[test]
fn volume_paths_must_stay_inside_the_dataset_folder() {
    let dir = TempDir::new("fault-paths");
    let root = dataset(&dir, 3);
    small_nii(&dir.join("outside.nii"));
    std::os::unix::fs::symlink(dir.join("outside.nii"), root.join("imagesTr/link.nii")).unwrap();
    let abs = dir.join("outside.nii").display().to_string();
    for bad in ["../outside.nii", abs.as_str(), "./imagesTr/link.nii", "./imagesTr/../../outside.nii"] {
        edit_manifest(&root, |m| {
            m.training[2] = CaseEntry { id: "x".into(), image: bad.into(), label: None, labelled: Some(false) }
        });
        assert_names(&err(open(&root)), &root.join("dataset.json"), "outside the dataset folder");
        edit_manifest(&root, |m| m.training[2] = training_entry("case_2", ".nii", false));
        edit_manifest(&root, |m| m.training[1].label = Some(bad.into()));
        assert_names(&err(open(&root)), &root.join("dataset.json"), "outside the dataset folder");
        edit_manifest(&root, |m| m.training[1] = training_entry("case_1", ".nii", true));
    }
    assert!(open(&root).is_ok());
}

#[test]
fn labels_outside_the_classes_and_nan_voxels_skip_the_training_case() {
    let dir = TempDir::new("fault-values");
    let root = dataset(&dir, 4);
    let g = Geometry::from_spacing([1.0; 3]);
    // Case 1: label value 2 in a two-class dataset (libtorch's cross entropy would abort on it).
    let mut label = Volume::<u8>::zeros([8, 8, 4]);
    label.data[8 * 8 * 3 + 8 * 2 + 5] = 2;
    let l1 = root.join("labelsTr/case_1.nii");
    write_nifti(&l1, &label, &g).unwrap();
    // Case 3: one NaN voxel in the image (it would train to NaN weights).
    let mut image = Volume::new([8, 8, 4], vec![0.5f32; 256]).unwrap();
    image.data[8 * 3 + 1] = f32::NAN;
    let i3 = root.join("imagesTr/case_3.nii");
    write_nifti(&i3, &image, &g).unwrap();
    assert_names(&err(open(&root)), &l1, "label value 2 at voxel (5, 2, 3) is not a class (0..2)");
    let (ds, skipped) = Dataset::open_skipping_bad(&root, &DatasetOptions::default()).unwrap();
    let ids: Vec<_> = ds.training.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["case_0", "case_2"]);
    let msgs: Vec<String> = skipped.iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_names(&msgs[0], &l1, "label value 2");
    assert_names(&msgs[1], &i3, "voxel (1, 3, 0) is NaN");
    // With three classes named, value 2 is a class.
    edit_manifest(&root, |m| {
        m.labels.insert("2".into(), "scar".into());
    });
    let (ds, skipped) = Dataset::open_skipping_bad(&root, &DatasetOptions::default()).unwrap();
    assert_eq!((ds.training.len(), skipped.len()), (3, 1));
    // ... but not for a two-class model: the manifest is refused, naming the model's key.
    let two = DatasetOptions { model_classes: Some(2), ..DatasetOptions::default() };
    assert_names(&err(Dataset::open_skipping_bad(&root, &two)), &root.join("dataset.json"), "model.n_classes");
    // A manifest that names no classes allows any value, except beyond the model's classes.
    edit_manifest(&root, |m| m.labels.clear());
    let (ds, _) = Dataset::open_skipping_bad(&root, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.training.len(), 3, "values 0..=255 when nothing says otherwise");
    let (ds, skipped) = Dataset::open_skipping_bad(&root, &two).unwrap();
    assert_eq!((ds.training.len(), skipped.len()), (2, 2));
    assert_names(&skipped[0].to_string(), &l1, "label value 2");
}

#[test]
fn mismatched_geometry_is_refused_and_bad_test_cases_or_no_labelled_case_fail_the_dataset() {
    let dir = TempDir::new("fault-geometry");
    let root = dataset(&dir, 3);
    let l2 = root.join("labelsTr/case_2.nii");
    write_nifti(&l2, &Volume::<u8>::zeros([8, 8, 4]), &Geometry::from_spacing([1.0, 1.0, 2.5])).unwrap();
    assert_names(&err(open(&root)), &l2, "label affine");
    let (ds, skipped) = Dataset::open_skipping_bad(&root, &DatasetOptions::default()).unwrap();
    assert_eq!((ds.training.len(), skipped.len()), (2, 1));
    // A bad test case is refused even when skipping.
    let lt = root.join("labelsTs/t.nii");
    let mut bad = Volume::<u8>::zeros([8, 8, 4]);
    bad.data[0] = 7;
    write_nifti(&lt, &bad, &Geometry::from_spacing([1.0; 3])).unwrap();
    assert_names(&err(Dataset::open_skipping_bad(&root, &DatasetOptions::default())), &lt, "label value 7");
    write_nifti(&lt, &Volume::<u8>::zeros([8, 8, 4]), &Geometry::from_spacing([1.0; 3])).unwrap();
    // No labelled training case left: refused.
    for id in ["case_0", "case_1"] {
        std::fs::write(root.join(format!("imagesTr/{id}.nii")), b"junk").unwrap();
    }
    let msg = err(Dataset::open_skipping_bad(&root, &DatasetOptions::default()));
    assert_names(&msg, &root.join("dataset.json"), "no labelled training case is left");
}

// ---- 4. files changed in place under the mapping -----------------------------------------------

#[test]
fn a_file_truncated_in_place_after_open_is_reported_before_it_is_read() {
    let dir = TempDir::new("fault-truncate");
    let root = dataset(&dir, 3);
    let ds = open(&root).unwrap();
    let victim = root.join("imagesTr/case_2.nii");
    assert!(ds.training[2].image.check_unchanged().is_ok());
    // Truncate the same inode (what an in-place edit does).
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().set_len(400).unwrap();
    assert_names(&err(ds.training[2].image.check_unchanged()), &victim, "changed in place while mapped");
    // The loader refuses every batch that would read the case, naming it, instead of faulting.
    let sampler = SamplerConfig { labelled_bs: 1, unlabelled_bs: 1, ..SamplerConfig::default() };
    let loader = PatchLoader::new(ds.into(), LoaderConfig { patch: [8, 8, 4], rot_flip: false, sampler }).unwrap();
    let mut failed = 0;
    for it in 0..8 {
        if let Err(e) = loader.batch(it) {
            assert_names(&e.to_string(), &victim, "changed in place");
            failed += 1;
        }
    }
    assert!(failed > 0, "no batch read the truncated case");
}

/// Run in a child process by the test below: maps a volume, truncates it, reads it.
#[test]
fn sigbus_child() {
    let Ok(path) = std::env::var("UAMT_SIGBUS_CHILD") else { return };
    let path = PathBuf::from(path);
    uamt::data::sigbus::install_handler();
    let vol = NiftiVolume::open(&path, &GzCache::Memory).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    let _ = vol.read_f32(); // faults: the handler ends the process
    println!("no fault");
}

#[test]
fn a_truncation_racing_a_read_ends_the_process_with_a_clear_message_and_code_135() {
    let dir = TempDir::new("fault-sigbus");
    let path = dir.join("big.nii");
    // Large enough that the voxels span pages beyond the header's.
    write_nifti(&path, &Volume::new([64, 64, 16], vec![1.0f32; 65536]).unwrap(), &Geometry::from_spacing([1.0; 3]))
        .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigbus_child", "--nocapture", "--test-threads=1"])
        .env("UAMT_SIGBUS_CHILD", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(uamt::data::sigbus::EXIT_CODE), "{stderr}");
    assert!(stderr.contains("SIGBUS while reading a memory-mapped dataset volume"), "{stderr}");
    assert!(stderr.contains("never edit them in place"), "{stderr}");
}

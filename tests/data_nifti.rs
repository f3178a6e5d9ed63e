//! NIfTI interop against nibabel (the Python oracle), the gzip cache, atomic writes and the
//! errors for corrupt files.

mod support;

use support::*;
use uamt::data::nifti::{write_nifti, GzCache, NiftiVolume};
use uamt::data::{DataError, Geometry, Volume};

fn rotated_geometry(zooms: [f64; 3], angle: f64, origin: [f64; 3]) -> Geometry {
    let (c, s) = (angle.cos(), angle.sin());
    let r = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let mut g = Geometry::from_spacing([1.0; 3]);
    for i in 0..3 {
        for j in 0..3 {
            g.affine[i][j] = r[i][j] * zooms[j];
        }
        g.affine[i][3] = origin[i];
    }
    g
}

fn expect_bad(r: Result<NiftiVolume, DataError>, path: &std::path::Path, words: &str) {
    let e = r.expect_err("a corrupt file must not open");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "error does not name {}: {msg}", path.display());
    assert!(msg.contains(words), "error should say `{words}`: {msg}");
}

#[test]
fn should_read_nibabel_files_equal_to_what_nibabel_reads() {
    let dir = TempDir::new("nib-make");
    oracle("nifti_make.py", &[dir.path()]);
    let manifest = read_json(&dir.join("manifest.json"));
    let cases = manifest.as_array().expect("list");
    assert!(cases.len() >= 8);
    let cache = GzCache::Dir(dir.join(".cache"));
    for c in cases {
        let name = c["file"].as_str().unwrap();
        let path = dir.join(name);
        let v = NiftiVolume::open(&path, &cache).unwrap_or_else(|e| panic!("{name}: {e}"));
        let h = v.header();
        let shape: Vec<usize> = c["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(h.dims.to_vec(), shape, "{name}");
        assert_eq!(h.dtype.name(), c["dtype"].as_str().unwrap(), "{name}");
        assert_eq!(h.big_endian, c["big_endian"].as_bool().unwrap(), "{name}");
        for (s, z) in h.spacing.iter().zip(c["zooms"].as_array().unwrap()) {
            assert!((s - z.as_f64().unwrap()).abs() < 1e-6, "{name}: spacing {:?}", h.spacing);
        }
        assert_affine_close(&h.geometry.affine, &affine(&c["affine"]), 1e-5, name);
        let (slope, inter) = (c["slope"].as_f64().unwrap(), c["inter"].as_f64().unwrap());
        assert!(
            (h.scale.slope - slope).abs() < 1e-12 && (h.scale.inter - inter).abs() < 1e-9,
            "{name}: scale {:?}",
            h.scale
        );
        let ours = v.read_f32().unwrap();
        let theirs = read_f32(&dir.join(format!("{name}.f32")));
        assert_eq!(ours.data.len(), theirs.len(), "{name}");
        let diff = ours.data.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(diff, 0, "{name}: {diff} voxels differ from nibabel");
    }
    // Both gzip files were decompressed once into the cache, and reopening reuses the copies.
    let cached: Vec<_> = std::fs::read_dir(dir.join(".cache")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    let stamps: Vec<_> = cached.iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    NiftiVolume::open(dir.join("f64.nii.gz"), &cache).unwrap();
    NiftiVolume::open(dir.join("i16_scaled.nii.gz"), &cache).unwrap();
    let again: Vec<_> = cached.iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    assert_eq!(stamps, again);
    assert_eq!(std::fs::read_dir(dir.join(".cache")).unwrap().count(), 2);
}

#[test]
fn should_write_files_that_nibabel_reads_equal_to_ours() {
    let dir = TempDir::new("nib-dump");
    let dims = [6, 5, 3];
    let n = 90;
    let image = Volume::new(dims, (0..n).map(|i| (i as f32 * 0.37).sin() * 100.0 + 0.125).collect()).unwrap();
    let labels = Volume::new(dims, (0..n).map(|i| (i % 3) as u8).collect()).unwrap();
    let i16s = Volume::new(dims, (0..n).map(|i| (i as i16 - 45) * 700).collect()).unwrap();
    let g = rotated_geometry([0.625, 0.7, 1.25], 0.4, [-12.0, 30.5, 7.0]);
    let mut shear = Geometry::from_spacing([1.0, 1.0, 2.0]);
    shear.affine[0][1] = 0.3;
    let files = [dir.join("img.nii"), dir.join("lab.nii"), dir.join("i16.nii.gz"), dir.join("shear.nii")];
    write_nifti(&files[0], &image, &g).unwrap();
    write_nifti(&files[1], &labels, &g).unwrap();
    write_nifti(&files[2], &i16s, &g).unwrap();
    write_nifti(&files[3], &image, &shear).unwrap();
    let out = TempDir::new("nib-dump-out");
    let args: Vec<&std::path::Path> = std::iter::once(out.path()).chain(files.iter().map(|p| p.as_path())).collect();
    oracle("nifti_dump.py", &args);
    let expected: [(Vec<f32>, &str, &Geometry); 4] = [
        (image.data.clone(), "float32", &g),
        (labels.data.iter().map(|&v| v as f32).collect(), "uint8", &g),
        (i16s.data.iter().map(|&v| v as f32).collect(), "int16", &g),
        (image.data.clone(), "float32", &shear),
    ];
    for (i, (want, dtype, geom)) in expected.iter().enumerate() {
        let meta = read_json(&out.join(format!("{i}.json")));
        assert_eq!(meta["shape"], serde_json::json!([6, 5, 3]), "file {i}");
        assert_eq!(meta["dtype"], *dtype, "file {i}");
        assert_eq!(&read_f32(&out.join(format!("{i}.f32"))), want, "file {i}: nibabel reads other values");
        assert_affine_close(&affine(&meta["affine"]), &geom.affine, 1e-5, &format!("file {i}"));
        assert_eq!(meta["sform_code"], 1);
        let spacing = geom.spacing();
        for (z, s) in meta["zooms"].as_array().unwrap().iter().zip(spacing) {
            assert!((z.as_f64().unwrap() - s).abs() < 1e-6, "file {i}: zooms {:?} vs {spacing:?}", meta["zooms"]);
        }
    }
    // A rotation times a scaling also gets a qform; a shear cannot.
    assert_eq!(read_json(&out.join("0.json"))["qform_code"], 1);
    assert_eq!(read_json(&out.join("3.json"))["qform_code"], 0);
    // And our reader agrees with our writer.
    let back = NiftiVolume::open(&files[2], &GzCache::Memory).unwrap();
    assert_eq!(back.read::<f64>().unwrap().data, i16s.data.iter().map(|&v| v as f64).collect::<Vec<_>>());
    assert_eq!(NiftiVolume::open(&files[1], &GzCache::Memory).unwrap().read_labels().unwrap(), labels);
}

#[test]
fn should_read_strided_lines_in_place() {
    let dir = TempDir::new("nii-lines");
    let dims = [4, 3, 5];
    let v = Volume::new(dims, (0..60).map(|i| i as f32).collect()).unwrap();
    let p = dir.join("v.nii");
    write_nifti(&p, &v, &Geometry::from_spacing([1.0; 3])).unwrap();
    let m = NiftiVolume::open(&p, &GzCache::Memory).unwrap();
    let mut line = [0f32; 5];
    m.read_line(v.index(2, 1, 0), 12, &mut line).unwrap(); // along z
    assert_eq!(line, [6.0, 18.0, 30.0, 42.0, 54.0]);
    let mut back = [0f32; 3];
    m.read_line(v.index(3, 2, 4), -4, &mut back).unwrap(); // along -y
    assert_eq!(back, [59.0, 55.0, 51.0]);
    assert!(m.read_line(v.index(3, 2, 4), 12, &mut back).is_err(), "a read past the end must fail, not panic");
}

#[test]
fn should_keep_old_mappings_valid_when_a_file_is_rewritten() {
    let dir = TempDir::new("nii-atomic");
    let p = dir.join("v.nii");
    let g = Geometry::from_spacing([1.0; 3]);
    let a = Volume::new([2, 2, 2], vec![1.0f32; 8]).unwrap();
    let b = Volume::new([2, 2, 2], vec![2.0f32; 8]).unwrap();
    write_nifti(&p, &a, &g).unwrap();
    let old = NiftiVolume::open(&p, &GzCache::Memory).unwrap();
    write_nifti(&p, &b, &g).unwrap();
    assert_eq!(old.read_f32().unwrap(), a);
    assert_eq!(NiftiVolume::open(&p, &GzCache::Memory).unwrap().read_f32().unwrap(), b);
    assert!(!has_entry_starting(dir.path(), ".v.nii"), "temporary files left behind");
}

#[test]
fn should_name_the_file_when_a_nifti_is_corrupt() {
    let dir = TempDir::new("nii-bad");
    let g = Geometry::from_spacing([1.0; 3]);
    let v = Volume::new([8, 8, 8], (0..512).map(|i| i as f32).collect()).unwrap();
    let good = dir.join("good.nii");
    write_nifti(&good, &v, &g).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let mem = GzCache::Memory;

    let truncated = dir.join("truncated.nii");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect_bad(NiftiVolume::open(&truncated, &mem), &truncated, "truncated");

    let short = dir.join("short.nii");
    std::fs::write(&short, &bytes[..100]).unwrap();
    expect_bad(NiftiVolume::open(&short, &mem), &short, "truncated");

    let garbage = dir.join("garbage.nii");
    std::fs::write(&garbage, vec![0x5a; 2000]).unwrap();
    expect_bad(NiftiVolume::open(&garbage, &mem), &garbage, "not a NIfTI-1 file");

    let mut rgb = bytes.clone();
    rgb[70..72].copy_from_slice(&128i16.to_le_bytes());
    let rgb_path = dir.join("rgb.nii");
    std::fs::write(&rgb_path, &rgb).unwrap();
    expect_bad(NiftiVolume::open(&rgb_path, &mem), &rgb_path, "unsupported data type");

    let mut four = bytes.clone();
    four[40..42].copy_from_slice(&4i16.to_le_bytes());
    four[48..50].copy_from_slice(&2i16.to_le_bytes());
    let four_path = dir.join("four.nii");
    std::fs::write(&four_path, &four).unwrap();
    expect_bad(NiftiVolume::open(&four_path, &mem), &four_path, "only 3-D");

    let empty = dir.join("empty.nii");
    std::fs::write(&empty, b"").unwrap();
    expect_bad(NiftiVolume::open(&empty, &mem), &empty, "empty");

    let gz = dir.join("v.nii.gz");
    write_nifti(&gz, &v, &g).unwrap();
    let gz_bytes = std::fs::read(&gz).unwrap();
    let cut = dir.join("cut.nii.gz");
    std::fs::write(&cut, &gz_bytes[..gz_bytes.len() / 2]).unwrap();
    let cache_dir = dir.join("cache");
    expect_bad(NiftiVolume::open(&cut, &GzCache::Dir(cache_dir.clone())), &cut, "gzip");
    let left = std::fs::read_dir(&cache_dir).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "a failed decompression must leave nothing in the cache");
    expect_bad(NiftiVolume::open(&cut, &mem), &cut, "gzip");

    let missing = dir.join("missing.nii");
    expect_bad(NiftiVolume::open(&missing, &mem), &missing, "No such file");
}

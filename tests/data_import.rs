//! Importers: real LA cases against h5py, the challenge's NRRD layout with the reference
//! preprocessing, and bad input (truncated, corrupt, mismatched, NaN, missing cases) that must
//! fail with the file named and leave no output behind.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use support::*;
use uamt::data::h5::{read_h5_case, write_h5_case, H5Case};
use uamt::data::import_h5::{import_h5, H5Import};
use uamt::data::import_nrrd::{import_nrrd, Margin, NrrdImport};
use uamt::data::nrrd::read_nrrd;
use uamt::data::{Dataset, DatasetOptions, GzCache, NiftiVolume, Volume};

fn write_list(path: &Path, ids: &[&str]) {
    std::fs::write(path, ids.iter().map(|i| format!("{i}\n")).collect::<String>()).unwrap();
}

/// Asserts `r` failed naming `file` and saying `words`, and that `out` was not created.
fn assert_failed_cleanly<T: std::fmt::Debug>(
    r: Result<T, uamt::data::DataError>,
    file: &Path,
    words: &str,
    out: &Path,
) {
    let msg = r.expect_err("the import must fail").to_string();
    assert!(msg.contains(&file.display().to_string()), "error does not name {}: {msg}", file.display());
    assert!(msg.contains(words), "error should say `{words}`: {msg}");
    assert!(!out.exists(), "a failed import left {}", out.display());
    let name = out.file_name().unwrap().to_string_lossy();
    assert!(
        !has_entry_starting(out.parent().unwrap(), &format!(".{name}.")),
        "a failed import left its temporary folder"
    );
}

#[test]
fn should_import_real_la_cases_equal_to_what_h5py_reads() {
    let la = la_dir();
    let train: Vec<String> = std::fs::read_to_string(la.join("train.list"))
        .expect("the LA data in ../shared/data/la2018")
        .lines()
        .map(String::from)
        .collect();
    let test: Vec<String> = std::fs::read_to_string(la.join("test.list")).unwrap().lines().map(String::from).collect();
    let (tr, ts) = ([train[0].as_str(), train[1].as_str()], [test[0].as_str()]);
    let tmp = TempDir::new("la-import");
    write_list(&tmp.join("train.list"), &tr);
    write_list(&tmp.join("test.list"), &ts);
    let out = tmp.join("la");
    let mut opts = H5Import::new(&la, &out);
    opts.common.labelled = 1;
    opts.common.train_list = Some(tmp.join("train.list"));
    opts.common.test_list = Some(tmp.join("test.list"));
    let report = import_h5(&opts).unwrap();
    assert_eq!((report.training, report.labelled, report.test), (2, 1, 1));

    let ds = Dataset::open(&out, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.labelled(), vec![0]);
    assert_eq!(ds.unlabelled(), vec![1]);
    let cases: Vec<_> = ds.training.iter().chain(&ds.test).collect();
    assert_eq!(cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [tr[0], tr[1], ts[0]]);

    // h5py's arrays, and nibabel's reading of the files we wrote, dumped x fastest.
    let mut sources = Vec::new();
    for c in &cases {
        let h5 = la.join("h5").join(format!("{}.h5", c.id));
        sources.push(PathBuf::from(format!("{}:image", h5.display())));
        sources.push(PathBuf::from(format!("{}:label", h5.display())));
        sources.push(c.image.path().to_path_buf());
        sources.push(c.label.as_ref().unwrap().path().to_path_buf());
    }
    let dump = TempDir::new("la-dump");
    let args: Vec<&Path> = std::iter::once(dump.path()).chain(sources.iter().map(|p| p.as_path())).collect();
    oracle("nifti_dump.py", &args);
    for (k, c) in cases.iter().enumerate() {
        let meta = read_json(&dump.join(format!("{}.json", 4 * k)));
        let shape: Vec<usize> =
            meta["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(c.image.dims().to_vec(), shape, "{}: shape (W, H, D) as h5py reads it", c.id);
        let h5_image = read_f32(&dump.join(format!("{}.f32", 4 * k)));
        let h5_label = read_f32(&dump.join(format!("{}.f32", 4 * k + 1)));
        let image = c.image.read_f32().unwrap();
        let label = c.label.as_ref().unwrap().read_labels().unwrap();
        assert_eq!(image.data, h5_image, "{}: image differs from h5py", c.id);
        assert_eq!(
            label.data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            h5_label,
            "{}: label differs from h5py",
            c.id
        );
        assert!(label.data.contains(&1));
        // Spot-check the axis convention: h5py's image[x][y][z] is our get(x, y, z).
        let [w, h, d] = image.dims;
        let (x, y, z) = (w / 3, h / 2, d - 1);
        assert_eq!(image.get(x, y, z), Some(h5_image[x + w * (y + h * z)]));
        assert_eq!(
            read_f32(&dump.join(format!("{}.f32", 4 * k + 2))),
            h5_image,
            "{}: nibabel reads our image differently",
            c.id
        );
        assert_eq!(
            read_f32(&dump.join(format!("{}.f32", 4 * k + 3))),
            h5_label,
            "{}: nibabel reads our label differently",
            c.id
        );
        let nib = read_json(&dump.join(format!("{}.json", 4 * k + 2)));
        assert_eq!(nib["zooms"], serde_json::json!([0.625, 0.625, 0.625]));
        assert_eq!(c.image.header().spacing, [0.625; 3]);
    }
}

#[test]
fn should_leave_no_output_when_an_h5_case_is_truncated() {
    let la = la_dir();
    let ids: Vec<String> =
        std::fs::read_to_string(la.join("train.list")).unwrap().lines().take(2).map(String::from).collect();
    let src = TempDir::new("h5-trunc-src");
    std::os::unix::fs::symlink(la.join("h5").join(format!("{}.h5", ids[0])), src.join(format!("{}.h5", ids[0])))
        .unwrap();
    let real = std::fs::read(la.join("h5").join(format!("{}.h5", ids[1]))).unwrap();
    let bad = src.join(format!("{}.h5", ids[1]));
    std::fs::write(&bad, &real[..real.len() / 3]).unwrap();
    write_list(&src.join("train.list"), &[&ids[0], &ids[1]]);
    write_list(&src.join("test.list"), &[]);
    let out_dir = TempDir::new("h5-trunc-out");
    let out = out_dir.join("ds");
    let mut opts = H5Import::new(src.path(), &out);
    opts.common.labelled = 1;
    assert_failed_cleanly(import_h5(&opts), &bad, "truncated", &out);
}

fn tiny_case(dims: [usize; 3]) -> H5Case {
    let n = dims.iter().product::<usize>();
    H5Case {
        image: Volume::new(dims, (0..n).map(|i| (i as f32 * 0.1).cos()).collect()).unwrap(),
        label: Volume::new(dims, (0..n).map(|i| (i % 5 == 0) as u8).collect()).unwrap(),
    }
}

#[test]
fn should_round_trip_our_h5_writer_and_name_bad_h5_files() {
    let dir = TempDir::new("h5-bad");
    let good = tiny_case([5, 4, 3]);
    let p = dir.join("good.h5");
    write_h5_case(&p, &good).unwrap();
    assert_eq!(read_h5_case(&p, 1).unwrap(), good);

    let mismatched = H5Case { image: good.image.clone(), label: tiny_case([5, 4, 2]).label };
    let p = dir.join("mismatched.h5");
    write_h5_case(&p, &mismatched).unwrap();
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("differs"), "{msg}");

    let mut nan = good.clone();
    nan.image.data[7] = f32::NAN;
    let p = dir.join("nan.h5");
    write_h5_case(&p, &nan).unwrap();
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("NaN"), "{msg}");

    let mut big = good.clone();
    big.label.data[3] = 7;
    let p = dir.join("label7.h5");
    write_h5_case(&p, &big).unwrap();
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("label value 7"), "{msg}");

    let p = dir.join("float_label.h5");
    {
        let f = hdf5::File::create(&p).unwrap();
        f.new_dataset::<f32>().shape([5, 4, 3]).create("image").unwrap().write_raw(&good.image.to_c_order()).unwrap();
        f.new_dataset::<f32>().shape([5, 4, 3]).create("label").unwrap().write_raw(&vec![0f32; 60]).unwrap();
    }
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("unsupported data type"), "{msg}");

    let p = dir.join("no_label.h5");
    {
        let f = hdf5::File::create(&p).unwrap();
        f.new_dataset::<f32>().shape([5, 4, 3]).create("image").unwrap().write_raw(&good.image.to_c_order()).unwrap();
    }
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("no dataset `label`"), "{msg}");

    let p = dir.join("flat.h5");
    {
        let f = hdf5::File::create(&p).unwrap();
        f.new_dataset::<f32>().shape([60]).create("image").unwrap().write_raw(&good.image.data).unwrap();
    }
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("expected 3-D"), "{msg}");

    let p = dir.join("garbage.h5");
    std::fs::write(&p, vec![7u8; 5000]).unwrap();
    let msg = read_h5_case(&p, 1).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("HDF5"), "{msg}");
}

#[test]
fn should_refuse_lists_naming_missing_cases_and_too_many_labelled() {
    let src = TempDir::new("h5-lists");
    write_h5_case(&src.join("a.h5"), &tiny_case([5, 4, 3])).unwrap();
    write_h5_case(&src.join("b.h5"), &tiny_case([6, 4, 3])).unwrap();
    write_list(&src.join("train.list"), &["a", "ghost"]);
    write_list(&src.join("test.list"), &["b"]);
    // Outputs never lie inside the source folder: a folder of its own.
    let out_dir = TempDir::new("h5-lists-out");
    let out = out_dir.join("out");
    let mut opts = H5Import::new(src.path(), &out);
    opts.common.labelled = 1;
    let r = import_h5(&opts);
    assert_failed_cleanly(r, &src.join("train.list"), "`ghost`", &out);

    write_list(&src.join("train.list"), &["a"]);
    opts.common.labelled = 2;
    let msg = import_h5(&opts).unwrap_err().to_string();
    assert!(msg.contains("labelled"), "{msg}");
    assert!(!out.exists());

    // A good import of the same folder, then `--force` semantics.
    opts.common.labelled = 1;
    import_h5(&opts).unwrap();
    let msg = import_h5(&opts).unwrap_err().to_string();
    assert!(msg.contains("already exists"), "{msg}");
    opts.common.force = true;
    import_h5(&opts).unwrap();
    let ds = Dataset::open(&out, &DatasetOptions::default()).unwrap();
    assert_eq!((ds.training.len(), ds.test.len()), (1, 1));
    assert_eq!(ds.test[0].image.dims(), [6, 4, 3]);
}

/// Writes an attached-data NRRD file.
fn write_nrrd(path: &Path, dims: [usize; 3], type_name: &str, big_endian: bool, gzip: bool, data: &[u8], extra: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let endian = if big_endian { "big" } else { "little" };
    let encoding = if gzip { "gzip" } else { "raw" };
    write!(
        f,
        "NRRD0004\n# Complete NRRD file format specification at:\ntype: {type_name}\ndimension: 3\nspace: left-posterior-superior\nsizes: {} {} {}\n{extra}kinds: domain domain domain\nendian: {endian}\nencoding: {encoding}\n\n",
        dims[0], dims[1], dims[2]
    )
    .unwrap();
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap();
    } else {
        f.write_all(data).unwrap();
    }
}

const DIRS: &str = "space directions: (0.625,0,0) (0,0.625,0) (0,0,1.25)\nspace origin: (-100,50,-20)\n";

/// A challenge-like case: a u8 image and a 0/255 label box at x 20..=29, y 10..=13.
fn challenge_case(dims: [usize; 3], seed: u32) -> (Vec<f64>, Vec<u8>) {
    let [w, h, d] = dims;
    let mut image = Vec::with_capacity(w * h * d);
    let mut label = Vec::with_capacity(w * h * d);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                image.push(((x * 7 + y * 13 + z * 3 + seed as usize) % 200) as f64);
                label.push(if (20..=29).contains(&x) && (10..=13).contains(&y) && z > 0 { 255 } else { 0 });
            }
        }
    }
    (image, label)
}

/// The reference preprocessing written out independently: z-score over the whole volume, crop
/// x/y to `[lo - m - p, hi + m + p)` clipped, with `p = max(patch - (hi - lo), 0) // 2`.
fn expected_crop(
    image: &[f64],
    dims: [usize; 3],
    margin: usize,
    patch: [usize; 2],
) -> (Vec<f32>, [usize; 3], [usize; 2]) {
    let n = image.len() as f64;
    let mean = image.iter().sum::<f64>() / n;
    let std = (image.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let (lo, hi) = ([20usize, 10usize], [29usize, 13usize]);
    let start = [0, 1].map(|a| lo[a].saturating_sub(margin + patch[a].saturating_sub(hi[a] - lo[a]) / 2));
    let end = [0, 1].map(|a| (hi[a] + margin + patch[a].saturating_sub(hi[a] - lo[a]) / 2).min(dims[a]));
    let cdims = [end[0] - start[0], end[1] - start[1], dims[2]];
    let mut out = Vec::new();
    for z in 0..dims[2] {
        for y in start[1]..end[1] {
            for x in start[0]..end[0] {
                out.push(((image[x + dims[0] * (y + dims[1] * z)] - mean) / std) as f32);
            }
        }
    }
    (out, cdims, start)
}

#[test]
fn should_import_challenge_nrrd_with_the_reference_preprocessing() {
    let src = TempDir::new("nrrd-src");
    let dims = [48, 30, 6];
    let ids = ["CASEA", "CASEB", "CASEC"];
    let mut images = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        std::fs::create_dir(src.join(id)).unwrap();
        let (image, label) = challenge_case(dims, k as u32);
        // Case A raw uint8, case B gzip uint8, case C gzip big-endian int16.
        match k {
            0 => write_nrrd(
                &src.join(id).join("lgemri.nrrd"),
                dims,
                "unsigned char",
                false,
                false,
                &image.iter().map(|&v| v as u8).collect::<Vec<_>>(),
                DIRS,
            ),
            1 => write_nrrd(
                &src.join(id).join("lgemri.nrrd"),
                dims,
                "uchar",
                false,
                true,
                &image.iter().map(|&v| v as u8).collect::<Vec<_>>(),
                DIRS,
            ),
            _ => write_nrrd(
                &src.join(id).join("lgemri.nrrd"),
                dims,
                "short",
                true,
                true,
                &image.iter().flat_map(|&v| (v as i16).to_be_bytes()).collect::<Vec<_>>(),
                DIRS,
            ),
        }
        write_nrrd(&src.join(id).join("laendo.nrrd"), dims, "unsigned char", false, k == 2, &label, DIRS);
        images.push(image);
    }
    write_list(&src.join("train.list"), &ids[..2]);
    write_list(&src.join("test.list"), &ids[2..]);
    let out_dir = TempDir::new("nrrd-out");
    let out = out_dir.join("out");
    let mut opts = NrrdImport::new(src.path(), &out);
    opts.common.labelled = 1;
    opts.patch = [16, 16, 8];
    opts.margin = Margin::Fixed(3);
    let report = import_nrrd(&opts).unwrap();
    assert_eq!((report.training, report.labelled, report.test), (2, 1, 1));
    let ds = Dataset::open(&out, &DatasetOptions::default()).unwrap();
    for (k, case) in ds.training.iter().chain(&ds.test).enumerate() {
        // x: box 20..=29 (width 9 < 16: p = 3), margin 3 -> [14, 36); y: box 10..=13 (p = 6) -> [1, 22).
        let (want, cdims, start) = expected_crop(&images[k], dims, 3, [16, 16]);
        assert_eq!(start, [14, 1]);
        assert_eq!(case.image.dims(), cdims, "{}", case.id);
        let got = case.image.read_f32().unwrap();
        let worst = got.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{}: z-scored crop differs by {worst}", case.id);
        let label = case.label.as_ref().unwrap().read_labels().unwrap();
        assert_eq!(label.data.iter().map(|&v| v as usize).sum::<usize>(), 10 * 4 * 5, "{}: label voxels", case.id);
        assert_eq!(label.get(20 - 14, 10 - 1, 1), Some(1));
        assert_eq!(label.get(20 - 14, 10 - 1, 0), Some(0));
        // LPS directions and origin become RAS, shifted to the crop's first voxel.
        let a = case.image.header().geometry.affine;
        assert_eq!([a[0][0], a[1][1], a[2][2]], [-0.625, -0.625, 1.25]);
        assert!(
            (a[0][3] - (100.0 - 14.0 * 0.625)).abs() < 1e-4
                && (a[1][3] - (-50.0 - 0.625)).abs() < 1e-4
                && (a[2][3] + 20.0).abs() < 1e-4,
            "{a:?}"
        );
        assert_eq!(case.image.header().geometry.orientation(), "LPS");
    }

    // The reference's random margins: 10..=19 per side, reproducible by seed.
    let mut random = NrrdImport::new(src.path(), out_dir.join("r1"));
    random.common.labelled = 1;
    random.patch = [4, 4, 4];
    let a =
        import_nrrd(&random).map(|_| Dataset::open(out_dir.join("r1"), &DatasetOptions::default()).unwrap()).unwrap();
    random.common.out = out_dir.join("r2");
    let b =
        import_nrrd(&random).map(|_| Dataset::open(out_dir.join("r2"), &DatasetOptions::default()).unwrap()).unwrap();
    for (ca, cb) in a.training.iter().zip(&b.training) {
        assert_eq!(ca.image.read_f32().unwrap(), cb.image.read_f32().unwrap());
        let [w, h, _] = ca.image.dims();
        // x: box 20..=29, crop [20 - m, min(29 + m', 48)) with m, m' in 10..=19: width 29..=47.
        // y: box 10..=13, crop [0, min(13 + m', 30)): height 23..=30.
        assert!((29..=47).contains(&w), "width {w}");
        assert!((23..=30).contains(&h), "height {h}");
    }
}

#[test]
fn should_name_the_file_when_nrrd_input_is_bad() {
    let src = TempDir::new("nrrd-bad");
    let dims = [40, 20, 3];
    let (image, label) = challenge_case(dims, 0);
    let img8: Vec<u8> = image.iter().map(|&v| v as u8).collect();

    let p = src.join("truncated.nrrd");
    write_nrrd(&p, dims, "uchar", false, false, &img8[..img8.len() - 10], "");
    let msg = read_nrrd(&p).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("truncated"), "{msg}");

    let p = src.join("corrupt.nrrd");
    write_nrrd(&p, dims, "uchar", false, true, &img8, "");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 40..n - 20] {
        *b ^= 0x55;
    }
    std::fs::write(&p, &bytes).unwrap();
    let msg = read_nrrd(&p).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("gzip"), "{msg}");

    let p = src.join("int64.nrrd");
    write_nrrd(&p, dims, "int64", false, false, &vec![0u8; 40 * 20 * 3 * 8], "");
    let msg = read_nrrd(&p).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("unsupported data type"), "{msg}");

    let p = src.join("notnrrd.nrrd");
    std::fs::write(&p, b"hello\n\n").unwrap();
    let msg = read_nrrd(&p).unwrap_err().to_string();
    assert!(msg.contains(&p.display().to_string()) && msg.contains("not a NRRD"), "{msg}");

    // Whole imports: a NaN image, a label of another shape, a label without 255, a case
    // missing its label; each fails naming the file and leaves no output folder.
    let nan: Vec<u8> = image
        .iter()
        .enumerate()
        .flat_map(|(i, &v)| (if i == 77 { f32::NAN } else { v as f32 }).to_le_bytes())
        .collect();
    type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, Spoil, &str, &str); 4] = [
        (
            "nan",
            Box::new(|d: &Path| write_nrrd(&d.join("lgemri.nrrd"), dims, "float", false, false, &nan, "")),
            "lgemri.nrrd",
            "NaN",
        ),
        (
            "shape",
            Box::new(|d: &Path| {
                write_nrrd(&d.join("laendo.nrrd"), [40, 20, 2], "uchar", false, false, &label[..1600], "")
            }),
            "laendo.nrrd",
            "differs",
        ),
        (
            "empty",
            Box::new(|d: &Path| write_nrrd(&d.join("laendo.nrrd"), dims, "uchar", false, false, &vec![0u8; 2400], "")),
            "laendo.nrrd",
            "no foreground",
        ),
        (
            "nolabel",
            Box::new(|d: &Path| std::fs::remove_file(d.join("laendo.nrrd")).unwrap()),
            "train.list",
            "no laendo.nrrd",
        ),
    ];
    for (name, spoil, file, words) in cases {
        let root = src.join(name);
        for id in ["good", "bad"] {
            std::fs::create_dir_all(root.join(id)).unwrap();
            write_nrrd(&root.join(id).join("lgemri.nrrd"), dims, "uchar", false, true, &img8, "");
            write_nrrd(&root.join(id).join("laendo.nrrd"), dims, "uchar", false, false, &label, "");
        }
        spoil(&root.join("bad"));
        write_list(&root.join("train.list"), &["good", "bad"]);
        let out = src.join(format!("{name}-out"));
        let mut opts = NrrdImport::new(&root, &out);
        opts.common.labelled = 1;
        let bad_file = if file == "train.list" { root.join(file) } else { root.join("bad").join(file) };
        assert_failed_cleanly(import_nrrd(&opts), &bad_file, words, &out);
    }
}

#[test]
fn should_open_msd_style_manifests_and_check_label_shapes() {
    let dir = TempDir::new("msd");
    let g = uamt::data::Geometry::from_spacing([1.0; 3]);
    for sub in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let v = Volume::new([4, 4, 2], vec![1.5f32; 32]).unwrap();
    let l = Volume::new([4, 4, 2], vec![1u8; 32]).unwrap();
    uamt::data::write_nifti(dir.join("imagesTr/la_003.nii.gz"), &v, &g).unwrap();
    uamt::data::write_nifti(dir.join("labelsTr/la_003.nii.gz"), &l, &g).unwrap();
    uamt::data::write_nifti(dir.join("imagesTs/la_001.nii.gz"), &v, &g).unwrap();
    std::fs::write(
        dir.join("dataset.json"),
        r#"{"name": "Task02_Heart", "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
            "numTraining": 1, "numTest": 1,
            "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}],
            "test": ["./imagesTs/la_001.nii.gz"]}"#,
    )
    .unwrap();
    let ds = Dataset::open(dir.path(), &DatasetOptions::default()).unwrap();
    assert_eq!(ds.training[0].id, "la_003");
    assert!(ds.training[0].labelled);
    assert_eq!(ds.test[0].id, "la_001");
    assert!(ds.test[0].label.is_none());
    assert!(dir.join(".cache").is_dir(), "gzip volumes are decompressed into <dataset>/.cache");
    assert_eq!(ds.training[0].image.read_f32().unwrap(), v);

    // A label whose shape differs from its image is refused, naming the label file.
    let other = Volume::new([4, 4, 3], vec![0u8; 48]).unwrap();
    uamt::data::write_nifti(dir.join("labelsTr/la_003.nii.gz"), &other, &g).unwrap();
    let msg = Dataset::open(dir.path(), &DatasetOptions { cache_dir: Some(dir.join("c2")), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(msg.contains("labelsTr/la_003.nii.gz") && msg.contains("differs"), "{msg}");
    let _ = NiftiVolume::open(dir.join("imagesTs/la_001.nii.gz"), &GzCache::Memory).unwrap();
}

#[test]
fn should_import_h5_at_half_resolution_with_block_means_nearest_labels_and_the_field_of_view_kept() {
    let dir = TempDir::new("h5-down");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let dims = [8, 6, 4];
    let case = tiny_case(dims);
    write_h5_case(&src.join("a.h5"), &case).unwrap();
    write_h5_case(&src.join("b.h5"), &case).unwrap();
    write_list(&src.join("train.list"), &["a"]);
    write_list(&src.join("test.list"), &["b"]);
    let out = dir.join("out");
    let mut opts = H5Import::new(&src, &out);
    opts.common.labelled = 1;
    opts.resample_to = Some([1.25; 3]);
    import_h5(&opts).unwrap();
    let ds = Dataset::open(&out, &DatasetOptions::default()).unwrap();
    let c = &ds.training[0];
    let v = c.image.read_f32().unwrap();
    assert_eq!(v.dims, [4, 3, 2]);
    // Each output voxel is the mean of its 2 x 2 x 2 block.
    let at = |x: usize, y: usize, z: usize| case.image.get(x, y, z).unwrap() as f64;
    let block: f64 = (0..8).map(|k| at(2 + (k & 1), 2 + ((k >> 1) & 1), (k >> 2) & 1)).sum::<f64>() / 8.0;
    assert!((v.get(1, 1, 0).unwrap() as f64 - block).abs() < 1e-5);
    // 1.25 mm voxels whose field of view starts where the 0.625 mm one did (half a new voxel
    // minus half an old one after the old origin).
    let g = c.image.header().geometry;
    assert!(g.spacing().iter().all(|s| (s - 1.25).abs() < 1e-9), "{:?}", g.spacing());
    assert!((g.affine[0][3] - 0.3125).abs() < 1e-9, "{:?}", g.affine);
    // Labels keep their values (nearest neighbour, no blending).
    let l = c.label.as_ref().unwrap().read_labels().unwrap();
    assert_eq!(l.dims, [4, 3, 2]);
    assert!(l.data.iter().all(|&x| x <= 1));
}

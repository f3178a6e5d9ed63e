//! Patch sampling throughput: augmented 112x112x80 patches (image and label) cut from the
//! memory-mapped dataset, against reading the case's HDF5 file per sample as the reference
//! loader does (decompress, rot90/flip copy of the whole volume, crop). Same cases, same
//! augmentation, one thread each, measured in the same run.
//!
//! Run: `cargo bench --bench data_sampling` (uses ../shared/data/la2018 when present, else
//! synthetic cases of LA size written as UA-MT HDF5 files).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uamt::data::augment::{extract, Augment};
use uamt::data::h5::{write_h5_case, H5Case};
use uamt::data::import_h5::{find_h5, import_h5, H5Import};
use uamt::data::{synth_case, Dataset, DatasetOptions, Volume};
use uamt::rng::Rng;

const PATCH: [usize; 3] = [112, 112, 80];
const CASES: usize = 4;

/// The source folder with `CASES` training IDs in `train.list` (and an empty `test.list`).
fn source(tmp: &Path) -> anyhow::Result<(PathBuf, &'static str)> {
    let la = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/la2018");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src)?;
    let (ids, origin): (Vec<String>, &str) = if la.join("train.list").is_file() {
        let ids: Vec<String> =
            std::fs::read_to_string(la.join("train.list"))?.lines().take(CASES).map(String::from).collect();
        for id in &ids {
            let real = find_h5(&la, id).ok_or_else(|| anyhow::anyhow!("no HDF5 file for {id}"))?;
            std::os::unix::fs::symlink(real, src.join(format!("{id}.h5")))?;
        }
        (ids, "LA 2018 (UA-MT HDF5)")
    } else {
        let ids: Vec<String> = (0..CASES).map(|i| format!("synth_{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let (image, label) = synth_case([200, 150, 88], [0.625; 3], 1, i as u64);
            write_h5_case(&src.join(format!("{id}.h5")), &H5Case { image, label })?;
        }
        (ids, "synthetic, LA-sized, written as UA-MT HDF5")
    };
    std::fs::write(src.join("train.list"), ids.join("\n"))?;
    std::fs::write(src.join("test.list"), "")?;
    Ok((src, origin))
}

/// Draws `n` (case, augmentation) pairs, the same for both loaders.
fn plans(dims: &[[usize; 3]], n: usize) -> Vec<(usize, Augment)> {
    let mut rng = Rng::new(1337);
    (0..n)
        .map(|_| {
            let c = rng.below(dims.len() as u64) as usize;
            (c, Augment::draw(&mut rng, dims[c], PATCH, true))
        })
        .collect()
}

fn rate(n: usize, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let tmp = std::env::temp_dir().join(format!("uamt-bench-sampling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let (src, origin) = source(&tmp)?;
    let out = tmp.join("ds");
    let mut opts = H5Import::new(&src, &out);
    opts.common.labelled = CASES;
    import_h5(&opts)?;
    let ds = Dataset::open(&out, &DatasetOptions::default())?;
    let dims: Vec<[usize; 3]> = ds.training.iter().map(|c| c.image.dims()).collect();
    let h5_paths: Vec<PathBuf> = ds.training.iter().map(|c| find_h5(&src, &c.id).expect("listed")).collect();
    let n_patch: usize = PATCH.iter().product();
    let (mut image, mut label) = (vec![0f32; n_patch], vec![0u8; n_patch]);

    // Warm-up: both sources in the page cache.
    for (c, a) in plans(&dims, CASES) {
        let case = &ds.training[c];
        extract(&case.image, &a, PATCH, &mut image)?;
        let _ = std::fs::read(&h5_paths[c])?;
    }

    let mapped_plans = plans(&dims, 200);
    let t0 = Instant::now();
    let mut checksum = 0f64;
    for (c, a) in &mapped_plans {
        let case = &ds.training[*c];
        extract(&case.image, a, PATCH, &mut image)?;
        extract(case.label.as_ref().expect("labelled"), a, PATCH, &mut label)?;
        checksum += image[n_patch / 2] as f64 + label[n_patch / 3] as f64;
    }
    let mapped = t0.elapsed();

    let h5_plans = plans(&dims, 24);
    let t0 = Instant::now();
    for (c, a) in &h5_plans {
        let file = hdf5::File::open(&h5_paths[*c])?;
        let (img, lab) = (file.dataset("image")?, file.dataset("label")?);
        let img_c: Vec<f32> = img.read_raw()?;
        let lab_c: Vec<u8> = lab.read_raw()?;
        // The reference's np.flip(np.rot90(...)).copy(): one full copy of each volume.
        let full_img = Volume::from_c_order(dims[*c], &img_c)?;
        let full_lab = Volume::from_c_order(dims[*c], &lab_c)?;
        extract(&full_img, a, PATCH, &mut image)?;
        extract(&full_lab, a, PATCH, &mut label)?;
        checksum += image[n_patch / 2] as f64 + label[n_patch / 3] as f64;
    }
    let h5 = t0.elapsed();

    let (rm, rh) = (rate(mapped_plans.len(), mapped), rate(h5_plans.len(), h5));
    println!("data_sampling: {origin}, {CASES} cases {:?}, patch {PATCH:?}, image + label per patch, one thread", dims);
    println!(
        "  mapped NIfTI (rot/flip + crop read from the map): {:>4} patches in {:>6.2} s = {rm:>8.1} patches/s",
        mapped_plans.len(),
        mapped.as_secs_f64()
    );
    println!(
        "  HDF5 per sample (decompress + full copy + crop):  {:>4} patches in {:>6.2} s = {rh:>8.1} patches/s",
        h5_plans.len(),
        h5.as_secs_f64()
    );
    println!("  ratio: {:.1}x (checksum {checksum:.3})", rm / rh);
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

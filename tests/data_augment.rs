//! Augmentation: the fused patch cutter against numpy's rot90/flip/pad/crop (the Python oracle)
//! and against the step-by-step reference, the padding rule, value preservation and seeding.

mod support;

use std::path::{Path, PathBuf};
use support::augment_ref::{augment_reference, flip, rot90};
use support::*;
use uamt::data::augment::{crop_padding, extract, rotated_dims, Augment};
use uamt::data::{write_nifti, Geometry, GzCache, NiftiVolume, Volume};
use uamt::rng::Rng;

fn distinct_volume(dims: [usize; 3]) -> Volume<f32> {
    let n = dims.iter().product::<usize>();
    Volume::new(dims, (0..n).map(|i| i as f32 + 1.0).collect()).unwrap()
}

#[test]
fn should_cut_the_patches_numpy_cuts() {
    let dir = TempDir::new("aug-numpy");
    let dims = [9, 7, 5];
    let patch = [6, 8, 4];
    let v = distinct_volume(dims);
    let path = dir.join("v.nii");
    write_nifti(&path, &v, &Geometry::from_spacing([1.0; 3])).unwrap();
    let mapped = NiftiVolume::open(&path, &GzCache::Memory).unwrap();
    // Every rotation and flip, each with a drawn crop and with the extreme crops.
    let mut augs = Vec::new();
    let mut rng = Rng::new(5);
    for k in 0..4u8 {
        for axis in 0..2u8 {
            let r = rotated_dims(dims, k);
            let pad = crop_padding(r, patch);
            let hi = [0, 1, 2].map(|i| r[i] + 2 * pad[i] - patch[i] - 1);
            let drawn = [0, 1, 2].map(|i| rng.below(hi[i] as u64 + 1) as usize);
            for offset in [[0; 3], hi, drawn] {
                augs.push(Augment { k, flip: Some(axis), pad, offset });
            }
        }
    }
    let specs: Vec<String> = augs
        .iter()
        .map(|a| format!("{},{},{},{},{}", a.k, a.flip.unwrap(), a.offset[0], a.offset[1], a.offset[2]))
        .collect();
    let out = TempDir::new("aug-numpy-out");
    let mut args: Vec<PathBuf> = vec![path.clone(), out.path().to_path_buf(), PathBuf::from("6,8,4")];
    args.extend(specs.iter().map(PathBuf::from));
    oracle("nifti_augment.py", &args.iter().map(|p| p.as_path()).collect::<Vec<&Path>>());
    for (i, a) in augs.iter().enumerate() {
        let meta = read_json(&out.join(format!("{i}.json")));
        let pad: Vec<usize> = meta["pad"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(pad, a.pad.to_vec(), "padding rule for k={} (numpy pads {pad:?})", a.k);
        let bounds: Vec<usize> =
            meta["bounds"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert!(
            (0..3).all(|j| a.offset[j] < bounds[j]),
            "offset {:?} outside numpy's randint range {bounds:?}",
            a.offset
        );
        let want = read_f32(&out.join(format!("{i}.f32")));
        let mut got = vec![0f32; 6 * 8 * 4];
        extract(&mapped, a, patch, &mut got).unwrap();
        assert_eq!(got, want, "mapped patch for {:?} differs from numpy", specs[i]);
        extract(&v, a, patch, &mut got).unwrap();
        assert_eq!(got, want, "in-memory patch for {:?} differs from numpy", specs[i]);
    }
}

#[test]
fn should_equal_the_step_by_step_reference_for_drawn_augments() {
    let mut rng = Rng::new(11);
    for (dims, patch) in
        [([20, 17, 12], [8, 8, 4]), ([10, 13, 6], [16, 8, 8]), ([3, 3, 3], [8, 8, 8]), ([17, 9, 11], [16, 8, 10])]
    {
        let v = distinct_volume(dims);
        let labels = v.map(|x| (x as u32 % 3) as u8);
        for _ in 0..24 {
            let a = Augment::draw(&mut rng, dims, patch, true);
            let want = augment_reference(&v, &a, patch).unwrap().to_c_order();
            let mut got = vec![0f32; patch.iter().product()];
            extract(&v, &a, patch, &mut got).unwrap();
            assert_eq!(got, want, "{dims:?} {patch:?} {a:?}");
            let want_l = augment_reference(&labels, &a, patch).unwrap().to_c_order();
            let mut got_l = vec![0u8; patch.iter().product()];
            extract(&labels, &a, patch, &mut got_l).unwrap();
            assert_eq!(got_l, want_l, "labels {dims:?} {a:?}");
        }
    }
}

#[test]
fn should_only_permute_voxels_when_rotating_and_flipping() {
    let v = distinct_volume([5, 4, 3]);
    let mut sorted = v.data.clone();
    sorted.sort_by(f32::total_cmp);
    for k in 0..4u8 {
        for axis in 0..2 {
            let r = flip(&rot90(&v, k), axis);
            assert_eq!(r.dims, rotated_dims(v.dims, k));
            let mut s = r.data.clone();
            s.sort_by(f32::total_cmp);
            assert_eq!(s, sorted, "k={k} axis={axis} is not a permutation");
        }
    }
    assert_eq!(rot90(&rot90(&v, 1), 3), v);
    assert_eq!(rot90(&rot90(&rot90(&rot90(&v, 1), 1), 1), 1), v);
    assert_eq!(flip(&flip(&v, 1), 1), v);
    // np.rot90 turns from x towards y: out[i][j] = v[j][H - 1 - i].
    let r = rot90(&v, 1);
    assert_eq!(r.get(0, 0, 2), v.get(0, 3, 2));
    assert_eq!(r.get(3, 4, 1), v.get(4, 0, 1));
}

#[test]
fn should_pad_small_volumes_and_keep_every_voxel_in_the_patch() {
    let v = distinct_volume([3, 3, 3]);
    let patch = [8, 8, 8];
    assert_eq!(crop_padding(v.dims, patch), [5, 5, 5]); // (8 - 3) // 2 + 3
    let mut rng = Rng::new(3);
    for _ in 0..20 {
        let a = Augment::draw(&mut rng, v.dims, patch, true);
        assert!(a.offset.iter().all(|&o| o < 5), "crop start {:?} beyond the padded range", a.offset);
        let mut out = vec![0f32; 512];
        extract(&v, &a, patch, &mut out).unwrap();
        let mut kept: Vec<f32> = out.iter().copied().filter(|&x| x != 0.0).collect();
        kept.sort_by(f32::total_cmp);
        assert_eq!(kept, v.data, "a 3^3 volume padded to 13^3 fits any 8^3 crop: {a:?}");
    }
    // No padding when every axis exceeds the patch; the crop start stays below size - patch.
    assert_eq!(crop_padding([200, 150, 88], [112, 112, 80]), [0, 0, 0]);
    let a = Augment::draw(&mut rng, [200, 150, 88], [112, 112, 80], false);
    assert_eq!((a.k, a.flip, a.pad), (0, None, [0, 0, 0]));
    assert!(a.offset[0] < 88 && a.offset[1] < 38 && a.offset[2] < 8);
    // A buffer of the wrong size is an error, not a panic.
    assert!(extract(&v, &a, patch, &mut [0f32; 10]).is_err());
}

#[test]
fn should_draw_the_same_augments_for_the_same_seed() {
    let draw = |seed| {
        let mut rng = Rng::keyed(seed, &[3, 0]);
        (0..50).map(|_| Augment::draw(&mut rng, [30, 20, 10], [16, 16, 8], true)).collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
    let all = draw(9);
    let combos: std::collections::HashSet<_> = all.iter().map(|a| (a.k, a.flip)).collect();
    assert_eq!(combos.len(), 8, "every rotation and flip should occur in 50 draws");
}

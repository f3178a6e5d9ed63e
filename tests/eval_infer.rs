//! Sliding-window inference against the reference procedure run in PyTorch
//! (tests/oracle/eval_sliding.py), window placement, a one-patch volume against a direct forward,
//! determinism, and the largest-connected-component step.

mod support;

use support::{assert_close, oracle_output, Fixture};
use tch::{Device, Kind, Tensor};
use uamt::data::Volume;
use uamt::eval::infer::{padding, window_starts};
use uamt::eval::{
    largest_component, mc_uncertainty, model_from_named, sliding_window, Blend, Connectivity, InferOptions, McOptions,
    WindowPlan,
};
use uamt::model::{Dropout, VNet, VNetConfig};

fn tiny() -> VNetConfig {
    VNetConfig { n_filters: 4, ..VNetConfig::default() }
}

fn usizes(t: &Tensor) -> Vec<usize> {
    Vec::<i64>::try_from(&t.reshape([-1])).unwrap().into_iter().map(|v| v as usize).collect()
}

/// A tiny V-Net initialised from `seed` and a random image of `dims`.
fn model_and_image(seed: i64, dims: [i64; 3]) -> (VNet, Tensor) {
    tch::manual_seed(seed);
    let model = VNet::new(&tiny(), Device::Cpu).unwrap();
    (model, Tensor::randn(dims, (Kind::Float, Device::Cpu)))
}

fn opts(stride: [usize; 3], batch_size: usize) -> InferOptions {
    InferOptions { patch: [32, 32, 16], stride, batch_size, largest_component: None, blend: Blend::Constant }
}

#[test]
fn should_match_the_reference_sliding_window() {
    let fx = Fixture::load(oracle_output("tests/oracle/eval_sliding.py").join("sliding.npz"));
    let model = model_from_named(&tiny(), Device::Cpu, &fx.prefixed("w"), &fx.path).unwrap();
    for name in ["large", "small"] {
        let image = fx.get(&format!("{name}.image"));
        let s = usizes(&fx.get(&format!("{name}.stride")));
        let o = opts([s[0], s[1], s[2]], 3);
        let dims = image.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
        let plan = WindowPlan::new([dims[0], dims[1], dims[2]], &o);
        for (a, axis) in ["x", "y", "z"].iter().enumerate() {
            assert_eq!(
                plan.starts[a],
                usizes(&fx.get(&format!("{name}.starts_{axis}"))),
                "{name}: window starts along {axis}"
            );
        }
        assert_eq!(plan.pad_before.to_vec(), usizes(&fx.get(&format!("{name}.before"))), "{name}: padding");

        let pred = sliding_window(&model, &image, &o).unwrap();
        let want = fx.get(&format!("{name}.score"));
        assert_close(&format!("{name}: probability map"), &pred.probabilities, &want, 1e-5);
        // Labels agree wherever the classes are not tied to within float noise.
        let want_labels = fx.get(&format!("{name}.label"));
        let decided = (want.get(1) - want.get(0)).abs().gt(1e-5);
        let differ = pred.labels.ne_tensor(&want_labels).logical_and(&decided).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differ, 0, "{name}: labels differ from the reference's argmax");
        assert!(decided.sum(Kind::Int64).int64_value(&[]) as f64 > 0.99 * want_labels.numel() as f64);
    }
}

/// `--blend gaussian` against nnU-Net's formula computed by numpy / scipy (the importance map
/// from `scipy.ndimage.gaussian_filter`, each window's softmax weighted by it, divided by the
/// summed weights): the same map, the same probabilities; every weight above 0, the classes
/// still summing to 1, and the result unlike the plain average.
#[test]
fn should_match_nnunet_s_gaussian_blending() {
    let fx = Fixture::load(oracle_output("tests/oracle/eval_sliding.py").join("sliding.npz"));
    let map = uamt::eval::blend::importance_map([32, 32, 16]);
    assert!(map.iter().all(|&w| w > 0.0), "a voxel of the window weighs nothing");
    let ours = Tensor::from_slice(&map).view([32, 32, 16]);
    assert_close("importance map", &ours, &fx.get("importance"), 1e-6);
    let model = model_from_named(&tiny(), Device::Cpu, &fx.prefixed("w"), &fx.path).unwrap();
    for name in ["large", "small"] {
        let image = fx.get(&format!("{name}.image"));
        let s = usizes(&fx.get(&format!("{name}.stride")));
        let o = InferOptions { blend: Blend::Gaussian, ..opts([s[0], s[1], s[2]], 3) };
        let pred = sliding_window(&model, &image, &o).unwrap();
        let want = fx.get(&format!("{name}.score_gaussian"));
        assert_close(&format!("{name}: gaussian probability map"), &pred.probabilities, &want, 1e-5);
        let want_labels = fx.get(&format!("{name}.label_gaussian"));
        let decided = (want.get(1) - want.get(0)).abs().gt(1e-5);
        let differ = pred.labels.ne_tensor(&want_labels).logical_and(&decided).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differ, 0, "{name}: labels differ from the oracle's argmax");
        let sum = pred.probabilities.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        let off = (sum - 1.0).abs().max().double_value(&[]);
        assert!(off <= 1e-6, "{name}: class probabilities sum to 1 +- {off}");
        let plain = fx.get(&format!("{name}.score"));
        let moved = (&pred.probabilities - &plain).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "{name}: the gaussian blend equals the plain average ({moved})");
    }
}

#[test]
fn should_place_windows_by_the_reference_formula() {
    // ceil((W - p) / s) + 1 windows at min(s * i, W - p), for many sizes and strides.
    for (w, p, s) in [
        (112, 112, 18),
        (113, 112, 18),
        (130, 112, 18),
        (131, 112, 18),
        (256, 112, 18),
        (88, 80, 4),
        (95, 80, 4),
        (7, 7, 1),
    ] {
        let n = ((w - p) as f64 / s as f64).ceil() as usize + 1;
        let want: Vec<usize> = (0..n).map(|i| (s * i).min(w - p)).collect();
        assert_eq!(window_starts(w, p, s), want, "W {w}, patch {p}, stride {s}");
        assert_eq!(*want.last().unwrap() + p, w, "the last window ends at the border");
    }
    // A volume smaller than the patch is padded to exactly the patch: one window.
    let o = InferOptions::default();
    let plan = WindowPlan::new([100, 130, 60], &o);
    assert_eq!(plan.padded, [112, 130, 80]);
    assert_eq!(plan.pad_before, [6, 0, 10]);
    assert_eq!(padding(60, 80), (10, 10));
    assert_eq!(plan.starts, [vec![0], vec![0, 18], vec![0]]);
    assert_eq!(plan.windows(), vec![[0, 0, 0], [0, 18, 0]]);
}

#[test]
fn should_equal_a_direct_forward_when_the_volume_is_one_patch() {
    let (model, image) = model_and_image(3, [32, 32, 16]);
    let pred = sliding_window(&model, &image, &opts([8, 8, 4], 2)).unwrap();
    let direct = tch::no_grad(|| {
        model
            .forward_with(&image.view([1, 1, 32, 32, 16]), false, Dropout::Random)
            .unwrap()
            .softmax(1, Kind::Float)
            .get(0)
    });
    assert_close("one-patch probability map", &pred.probabilities, &direct, 1e-6);
    assert!(pred.labels.equal(&direct.argmax(0, false)));
    assert_eq!(pred.foreground().size(), vec![32, 32, 16]);
    // Probabilities sum to one; the entropy lies in [0, ln 2].
    assert_close(
        "class sum",
        &pred.probabilities.sum_dim_intlist([0i64].as_slice(), false, Kind::Float),
        &Tensor::ones([32, 32, 16], (Kind::Float, Device::Cpu)),
        1e-6,
    );
    let h = pred.entropy();
    assert!(h.min().double_value(&[]) >= -1e-6 && h.max().double_value(&[]) <= std::f64::consts::LN_2 + 1e-6);
}

#[test]
fn should_be_deterministic_in_eval_mode_whatever_the_batch() {
    let (model, image) = model_and_image(4, [40, 35, 20]);
    let a = sliding_window(&model, &image, &opts([8, 6, 4], 1)).unwrap();
    let b = sliding_window(&model, &image, &opts([8, 6, 4], 1)).unwrap();
    assert!(a.probabilities.equal(&b.probabilities), "two eval-mode runs differ");
    let c = sliding_window(&model, &image, &opts([8, 6, 4], 5)).unwrap();
    assert_close("batch 5 against batch 1", &c.probabilities, &a.probabilities, 1e-5);
    // Eval mode leaves the BatchNorm statistics alone.
    let before: Vec<Tensor> = model.store().buffers().map(|p| p.tensor.copy()).collect();
    sliding_window(&model, &image, &opts([16, 16, 8], 2)).unwrap();
    for (p, b) in model.store().buffers().zip(&before) {
        assert!(p.tensor.equal(b), "{} changed during inference", p.name);
    }
}

#[test]
fn should_refuse_bad_window_settings() {
    let (model, image) = model_and_image(5, [32, 32, 16]);
    let bad = [
        (InferOptions { patch: [30, 32, 16], ..opts([4, 4, 4], 1) }, "patch"),
        (opts([4, 0, 4], 1), "stride"),
        (opts([4, 4, 4], 0), "batch_size"),
    ];
    for (o, key) in bad {
        let e = sliding_window(&model, &image, &o).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let e = sliding_window(&model, &Tensor::zeros([32, 32], (Kind::Float, Device::Cpu)), &opts([4, 4, 4], 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image"), "{e}");
}

/// A label volume with the given foreground voxels.
fn labels(dims: [usize; 3], voxels: &[[usize; 3]]) -> Volume<u8> {
    let mut v = Volume::zeros(dims);
    for p in voxels {
        let i = v.index(p[0], p[1], p[2]);
        v.data[i] = 1;
    }
    v
}

fn cube(lo: [usize; 3], side: usize) -> Vec<[usize; 3]> {
    let mut v = Vec::new();
    for z in lo[2]..lo[2] + side {
        for y in lo[1]..lo[1] + side {
            for x in lo[0]..lo[0] + side {
                v.push([x, y, z]);
            }
        }
    }
    v
}

#[test]
fn should_keep_the_largest_connected_component() {
    // A 3-cube and a 2-cube touching only at a corner: one component under 26-connectivity,
    // two under 6-connectivity (the 3-cube is kept).
    let mut vox = cube([0, 0, 0], 3);
    vox.extend(cube([3, 3, 3], 2));
    let v = labels([6, 6, 6], &vox);
    let all = largest_component(&v, Connectivity::TwentySix);
    assert_eq!(all, v);
    let big = largest_component(&v, Connectivity::Six);
    assert_eq!(big, labels([6, 6, 6], &cube([0, 0, 0], 3)));
    // Edge contact (shared edge, no face): 26 joins, 6 separates.
    let mut vox = cube([0, 0, 0], 2);
    vox.extend(cube([2, 2, 0], 2));
    vox.push([5, 5, 5]);
    let v = labels([6, 6, 6], &vox);
    assert_eq!(largest_component(&v, Connectivity::TwentySix).data.iter().filter(|&&l| l != 0).count(), 16);
    // A tie under 6-connectivity goes to the component met first in scan order.
    assert_eq!(largest_component(&v, Connectivity::Six), labels([6, 6, 6], &cube([0, 0, 0], 2)));
    // Labels are kept, not binarised; an empty volume stays empty.
    let mut m = labels([4, 4, 4], &cube([0, 0, 0], 2));
    m.data[0] = 2;
    assert_eq!(largest_component(&m, Connectivity::Six), m);
    let empty = Volume::<u8>::zeros([3, 3, 3]);
    assert_eq!(largest_component(&empty, Connectivity::Six), empty);
}

#[test]
fn should_apply_the_largest_component_step_to_the_labels() {
    let (model, image) = model_and_image(6, [32, 32, 16]);
    let plain = sliding_window(&model, &image, &opts([8, 8, 4], 2)).unwrap();
    let o = InferOptions { largest_component: Some(Connectivity::Six), ..opts([8, 8, 4], 2) };
    let post = sliding_window(&model, &image, &o).unwrap();
    let want = largest_component(&plain.label_volume().unwrap(), Connectivity::Six);
    assert_eq!(post.label_volume().unwrap(), want);
    assert!(post.probabilities.equal(&plain.probabilities), "post-processing changes labels only");
}

#[test]
fn mc_uncertainty_without_noise_or_dropout_is_the_prediction_entropy() {
    tch::manual_seed(7);
    let model = VNet::new(&VNetConfig { dropout_p: 0.0, ..tiny() }, Device::Cpu).unwrap();
    let image = Tensor::randn([40, 35, 20], (Kind::Float, Device::Cpu));
    let o = opts([8, 8, 4], 3);
    let want = sliding_window(&model, &image, &o).unwrap().entropy();
    let got =
        mc_uncertainty(&model, &image, &o, &McOptions { passes: 3, noise_std: 0.0, ..McOptions::default() }).unwrap();
    assert!(got.allclose(&want, 1e-5, 1e-6, false), "max diff {}", (&got - &want).abs().max().double_value(&[]));
}

#[test]
fn mc_uncertainty_depends_on_seed_and_passes_not_on_batching() {
    let (model, image) = model_and_image(8, [40, 35, 20]);
    let mc = McOptions { passes: 4, seed: 3, ..McOptions::default() };
    let a = mc_uncertainty(&model, &image, &opts([8, 8, 4], 1), &mc).unwrap();
    let b = mc_uncertainty(&model, &image, &opts([8, 8, 4], 5), &mc).unwrap();
    assert_eq!(a.size(), vec![40, 35, 20]);
    assert!(
        a.allclose(&b, 1e-5, 1e-6, false),
        "batching changed the map by {}",
        (&a - &b).abs().max().double_value(&[])
    );
    let (lo, hi) = (a.min().double_value(&[]), a.max().double_value(&[]));
    assert!(lo >= -1e-6 && hi <= 2f64.ln() + 1e-6, "entropy of 2 classes out of [0, ln 2]: {lo}..{hi}");
    let other = mc_uncertainty(&model, &image, &opts([8, 8, 4], 5), &McOptions { seed: 4, ..mc.clone() }).unwrap();
    assert!(!a.allclose(&other, 1e-4, 1e-5, false), "another seed, other noise and dropout");
    // Dropout and noise move the map away from the deterministic prediction's entropy.
    let det = sliding_window(&model, &image, &opts([8, 8, 4], 5)).unwrap().entropy();
    assert!((&a - &det).abs().mean(Kind::Float).double_value(&[]) > 1e-4);
    assert!(mc_uncertainty(&model, &image, &opts([8, 8, 4], 5), &McOptions { passes: 0, ..mc.clone() }).is_err());
}

/// Every way to get an inference model from the same weights gives the same network: the same
/// layout (channels-last on a CPU from 8 filters) and the same logits, bit for bit. The sources:
/// a checkpoint with the default `[device]` section; what `uamt export` writes (`.safetensors`,
/// `.pt`); `.npz`; tch's `.ot`; and the reference PyTorch V-Net loaded with the exported `.pt`
/// and saved by real PyTorch (tests/oracle/torch_formats.py) as a `state_dict` (pickle protocols
/// 2 and 4), as named parameters and buffers, and as TorchScript (scripted, traced, and under a
/// name that does not say so: the format is read from the content). A pickled module, a pickle
/// whose `__reduce__` calls `os.system` and PyTorch's pre-1.6 format are refused, naming the file.
#[test]
fn every_weights_source_gives_the_checkpoint_path_s_model() {
    let dir = support::TempDir::new("weights-sources");
    let config = VNetConfig { n_filters: 8, ..VNetConfig::default() };
    let mut cfg = uamt::config::Config::demo();
    cfg.model = config.clone();
    let tr = uamt::train::Trainer::seeded(&cfg.model, cfg.step_config(), Device::Cpu, 3).unwrap();
    // BatchNorm statistics away from their defaults, so that eval mode uses them.
    tch::no_grad(|| {
        for (name, t) in tr.student.store().named_tensors() {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                t.shallow_clone().copy_(&(Tensor::rand_like(&t) + 0.5));
            }
        }
    });
    let ck = uamt::checkpoint::Snapshot::of_trainer(&tr, 3, &cfg.to_toml()).write_atomic(dir.path()).unwrap();
    let snap = uamt::checkpoint::Snapshot::read(&ck).unwrap();
    let from_ck = uamt::eval::inference_model(&config, Device::Cpu, &snap.student, &ck, &cfg.device).unwrap();
    assert!(from_ck.channels_last(), "8 filters on a CPU run channels-last");
    let st = dir.join("w.safetensors");
    Tensor::write_safetensors(&snap.student, &st).unwrap();
    let npz = dir.join("w.npz");
    Tensor::write_npz(&snap.student, &npz).unwrap();
    let ot = dir.join("w.ot");
    Tensor::save_multi(&snap.student, &ot).unwrap();
    // What `uamt export --out w.pt` writes.
    let pt = dir.join("w.pt");
    let file = std::fs::File::create(&pt).unwrap();
    uamt::model::torchsave::write_state_dict(&snap.student, std::io::BufWriter::new(file), &pt).unwrap();
    let torch_dir = dir.join("torch");
    let o = std::process::Command::new(support::python())
        .arg(support::repo().join("tests/oracle/torch_formats.py"))
        .args([pt.as_os_str(), "8".as_ref(), torch_dir.as_os_str()])
        .output()
        .unwrap();
    assert!(o.status.success(), "torch_formats.py: {}", String::from_utf8_lossy(&o.stderr));
    let image = Tensor::randn([1, 1, 32, 32, 16], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| from_ck.forward_with(&image, false, Dropout::Random)).unwrap();
    let mut sources = vec![st, npz, ot, pt];
    for name in ["state_dict.pt", "state_dict_p4.pt", "parameters.pth", "script.pt", "trace.pth", "script.weights"] {
        sources.push(torch_dir.join(name));
    }
    for path in &sources {
        let m =
            uamt::eval::load_weights(path, &config, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(m.channels_last(), from_ck.channels_last(), "{}", path.display());
        let got = tch::no_grad(|| m.forward_with(&image, false, Dropout::Random)).unwrap();
        assert_eq!(f64::try_from((&got - &want).abs().max()).unwrap(), 0.0, "{}", path.display());
    }
    for (name, words) in [
        ("whole_module.pt", ["ScriptableVNet", "state_dict"]),
        ("legacy.pt", ["1.6", "save it again"]),
        ("evil.pt", ["system`", "refused"]),
    ] {
        let path = torch_dir.join(name);
        let e = uamt::eval::load_weights(&path, &config, Device::Cpu).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{name}: the error does not name the file: {e}");
        for w in words {
            assert!(e.contains(w), "{name}: `{w}` missing from: {e}");
        }
    }
    assert!(!torch_dir.join("pwned").exists(), "the pickle's command ran");
}

//! The mechanics that let unlabelled data help, at tiny scale: the consistency term is non-zero
//! once ramped up, the mask fraction moves with the threshold, and the teacher tracks the student.

use tch::{Device, Kind, Tensor};
use uamt::model::{ParamStore, VNetConfig};
use uamt::train::{self, Method, StepConfig, StepRandom, Trainer};

fn net() -> VNetConfig {
    VNetConfig { n_filters: 4, ..Default::default() }
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(21);
    let opts = (Kind::Float, Device::Cpu);
    let g = |n: i64, shape: [i64; 3]| (Tensor::arange(n, opts) - (n as f64 - 1.0) / 2.0).reshape(shape) / (n as f64 / 4.0);
    let (x, y, z) = (g(32, [32, 1, 1]), g(32, [1, 32, 1]), g(16, [1, 1, 16]));
    let lab = (&x * &x + &y * &y + &z * &z).lt(1.2).to_kind(Kind::Int64);
    let img = |s: f64| (lab.to_kind(Kind::Float) * 2.0 - 1.0 + Tensor::randn([32, 32, 16], opts) * s).unsqueeze(0);
    (Tensor::stack(&[img(0.5), img(0.6), img(0.5), img(0.7)], 0), Tensor::stack(&[lab.shallow_clone(), lab.shallow_clone()], 0))
}

/// max |a - b| over every trainable parameter.
fn distance(a: &ParamStore, b: &ParamStore) -> f64 {
    a.trainable().zip(b.trainable()).map(|(p, q)| (&p.tensor - &q.tensor).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn consistency_counts_once_ramped_and_the_teacher_tracks_the_student() {
    let (images, labels) = batch();
    tch::manual_seed(3);
    let cfg = StepConfig { max_iter: 20, consistency_interval: 1, consistency_rampup: 5.0, ema_decay: 0.9, ..Default::default() };
    let mut tr = Trainer::new(&net(), cfg, Device::Cpu).unwrap();
    let initial_gap = distance(tr.teacher.as_ref().unwrap().store(), tr.student.store());
    let mut reports = Vec::new();
    for _ in 0..20 {
        let rnd = tr.draw_random(5, &images.size());
        reports.push(tr.step(&images, &labels, &rnd).unwrap().report());
    }
    // The weight ramps from ~exp(-5) * 0.1 to 0.1 and stays there.
    assert!(reports[0].weight < 0.001 && reports[5].weight == 0.1 && reports[19].weight == 0.1);
    // Once ramped, the weighted consistency really enters the loss.
    for r in &reports[5..] {
        assert!(r.consistency > 0.0, "iteration {}: consistency 0", r.iter);
        assert!((r.loss - (r.supervised + r.weight * r.consistency)).abs() < 1e-5 * r.loss.abs().max(1.0));
    }
    // The teacher follows the student: far apart at the start (separate initialisations), close
    // after the EMA has averaged 20 student versions.
    let gap = distance(tr.teacher.as_ref().unwrap().store(), tr.student.store());
    assert!(gap < 0.2 * initial_gap, "teacher-student gap {gap} vs initially {initial_gap}");
}

#[test]
fn the_mask_fraction_grows_with_the_threshold() {
    let (images, _) = batch();
    tch::manual_seed(4);
    let cfg = StepConfig { max_iter: 1000, ..Default::default() };
    let tr = Trainer::new(&net(), cfg.clone(), Device::Cpu).unwrap();
    let teacher = tr.teacher.as_ref().unwrap();
    let unl = tr.unlabelled(&images);
    let fraction = |iter: i64| {
        let (t, mc) = StepRandom::draw_teacher(teacher.config(), Device::Cpu, &cfg, 1, 0, &unl.size());
        let out = train::teacher_passes(teacher, &cfg, iter, &unl, &t.unwrap(), &mc).unwrap();
        let g = train::guidance(out, &cfg, 2);
        (g.threshold, g.mask.mean(Kind::Float).double_value(&[]))
    };
    // Same teacher passes (same randomness), thresholds from the start and the end of the ramp.
    let (t0, f0) = fraction(0);
    let (t1, f1) = fraction(1000);
    assert!(t0 < t1 && (t1 - 2f64.ln()).abs() < 1e-12, "threshold ramps up to ln 2: {t0} -> {t1}");
    assert!(f1 > f0, "a higher threshold must let more voxels through: {f0} -> {f1}");
    // Mean Teacher keeps every voxel.
    let mt = StepConfig { method: Method::MeanTeacher, ..cfg.clone() };
    let (t, _) = StepRandom::draw_teacher(teacher.config(), Device::Cpu, &mt, 1, 0, &unl.size());
    let g = train::guidance(train::teacher_passes(teacher, &mt, 0, &unl, &t.unwrap(), &[]).unwrap(), &mt, 2);
    assert_eq!(g.mask.mean(Kind::Float).double_value(&[]), 1.0);
}

//! The mechanics that let unlabelled data help, at tiny scale: the consistency term is non-zero
//! once ramped up, the mask fraction moves with the threshold, and the teacher tracks the student.

use tch::{Device, Kind, Tensor};
use uamt::model::{ParamStore, VNetConfig};
use uamt::rng;
use uamt::train::{self, Method, StepConfig, StepRandom, Trainer};

fn net() -> VNetConfig {
    VNetConfig { n_filters: 4, ..Default::default() }
}

/// Deterministic whatever the other tests in this binary do with libtorch's global generator:
/// the noise and the weights come from the counter-based generator.
fn batch() -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let g =
        |n: i64, shape: [i64; 3]| (Tensor::arange(n, opts) - (n as f64 - 1.0) / 2.0).reshape(shape) / (n as f64 / 4.0);
    let (x, y, z) = (g(32, [32, 1, 1]), g(32, [1, 32, 1]), g(16, [1, 1, 16]));
    let lab = (&x * &x + &y * &y + &z * &z).lt(1.2).to_kind(Kind::Int64);
    let img = |k: u64, s: f64| {
        (lab.to_kind(Kind::Float) * 2.0 - 1.0 + rng::normal(rng::key(21, &[k]), &[32, 32, 16], Device::Cpu) * s)
            .unsqueeze(0)
    };
    (
        Tensor::stack(&[img(0, 0.5), img(1, 0.6), img(2, 0.5), img(3, 0.7)], 0),
        Tensor::stack(&[lab.shallow_clone(), lab.shallow_clone()], 0),
    )
}

/// Euclidean distance between the trainable parameters of `a` and the tensors `b`.
fn distance(a: &ParamStore, b: &[Tensor]) -> f64 {
    a.trainable().zip(b).map(|(p, q)| (&p.tensor - q).square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt()
}

fn copy(a: &ParamStore) -> Vec<Tensor> {
    a.trainable().map(|p| p.tensor.detach().copy()).collect()
}

#[test]
fn consistency_counts_once_ramped_and_the_teacher_tracks_the_student() {
    let (images, labels) = batch();
    let mut cfg = StepConfig::default();
    cfg.optim.iterations = 20;
    cfg.method.consistency_interval = 1;
    cfg.method.consistency_rampup = 5.0;
    cfg.method.ema_decay = 0.9;
    let mut tr = Trainer::seeded(&net(), cfg, Device::Cpu, 3).unwrap();
    let initial_teacher = copy(tr.teacher.as_ref().unwrap().store());
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
    // The teacher follows the student: it starts elsewhere (a separate initialisation; the first
    // EMA update, alpha = min(1 - 1/(t+1), decay) = 0, replaces it) and ends far nearer the
    // student than a teacher that had stayed put; what remains is the EMA's lag (measured 0.017).
    let student = copy(tr.student.store());
    let gap = distance(tr.teacher.as_ref().unwrap().store(), &student);
    let unmoved = distance(tr.student.store(), &initial_teacher);
    assert!(gap < 0.2 * unmoved, "teacher-student gap {gap} vs {unmoved} for a teacher that stayed put");
}

#[test]
fn the_mask_fraction_grows_with_the_threshold() {
    let (images, _) = batch();
    let mut cfg = StepConfig::default();
    cfg.optim.iterations = 1000;
    let tr = Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 4).unwrap();
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
    let mut mt = cfg.clone();
    mt.method.kind = Method::MeanTeacher;
    let (t, _) = StepRandom::draw_teacher(teacher.config(), Device::Cpu, &mt, 1, 0, &unl.size());
    let g = train::guidance(train::teacher_passes(teacher, &mt, 0, &unl, &t.unwrap(), &[]).unwrap(), &mt, 2);
    assert_eq!(g.mask.mean(Kind::Float).double_value(&[]), 1.0);
}

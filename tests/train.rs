//! Sequential training behaviour: the step learns, its randomness is reproducible by
//! construction, and bad batches are refused with a clear error.

mod support;

use tch::{Device, Kind, Tensor};
use uamt::model::VNetConfig;
use uamt::rng;
use uamt::train::{Method, StepConfig, StepRandom, Trainer};

fn net() -> VNetConfig {
    VNetConfig { n_filters: 4, ..Default::default() }
}

/// Four `[1, 32, 32, 16]` volumes with a bright ellipsoid in noise; labels of the first two.
/// The noise comes from the counter-based generator: other tests in this binary cannot disturb it.
fn batch(seed: u64) -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let g =
        |n: i64, shape: [i64; 3]| (Tensor::arange(n, opts) - (n as f64 - 1.0) / 2.0).reshape(shape) / (n as f64 / 4.0);
    let (x, y, z) = (g(32, [32, 1, 1]), g(32, [1, 32, 1]), g(16, [1, 1, 16]));
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for i in 0..4u64 {
        let s = 0.8 + 0.1 * i as f64;
        let lab = ((&x * &x) * s + &y * &y / s + &z * &z).lt(1.0).to_kind(Kind::Int64);
        images.push(
            (lab.to_kind(Kind::Float) * 2.0 - 1.0
                + rng::normal(rng::key(seed, &[i]), &[32, 32, 16], Device::Cpu) * 0.6)
                .unsqueeze(0),
        );
        labels.push(lab);
    }
    (Tensor::stack(&images, 0), Tensor::stack(&labels[..2], 0))
}

#[test]
fn thirty_sequential_steps_lower_the_supervised_loss() {
    let (images, labels) = batch(7);
    let mut cfg = StepConfig::default();
    (cfg.optim.iterations, cfg.method.consistency_interval, cfg.method.consistency_rampup) = (30, 1, 15.0);
    let mut tr = Trainer::seeded(&net(), cfg, Device::Cpu, 1337).unwrap();
    let mut sup = Vec::new();
    for _ in 0..30 {
        let rnd = tr.draw_random(1337, &images.size());
        let r = tr.step(&images, &labels, &rnd).unwrap().report();
        assert!(r.loss.is_finite(), "loss diverged at {}", r.iter);
        sup.push(r.supervised);
    }
    let first: f64 = sup[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = sup[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "supervised loss did not fall: first five {first:.4}, last five {last:.4} ({sup:?})");
    assert_eq!(tr.iter, 30);
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_a_different_one() {
    let (images, labels) = batch(3);
    let run = |seed: u64| {
        let mut tr = Trainer::seeded(&net(), StepConfig::default(), Device::Cpu, 5).unwrap();
        (0..3)
            .map(|_| {
                let rnd = tr.draw_random(seed, &images.size());
                tr.step(&images, &labels, &rnd).unwrap().report().loss
            })
            .collect::<Vec<_>>()
    };
    let a = run(11);
    assert_eq!(a, run(11));
    assert_ne!(a, run(12));
}

#[test]
fn step_randomness_depends_only_on_seed_and_iteration_not_on_the_drawing_thread() {
    tch::manual_seed(0);
    let (net, cfg, cpu) = (net(), StepConfig::default(), Device::Cpu);
    let here = StepRandom::draw(&net, cpu, &cfg, 9, 41, &[4, 1, 32, 32, 16]);
    // Another thread draws the teacher's part while this one disturbs libtorch's global generator.
    let (t, mc) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (t, mc) = StepRandom::draw_teacher(&net, cpu, &cfg, 9, 41, &[2, 1, 32, 32, 16]);
            (t.unwrap(), mc)
        });
        let _ = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        h.join().unwrap()
    });
    let ht = here.teacher.as_ref().unwrap();
    assert!(t.noise.as_ref().unwrap().equal(ht.noise.as_ref().unwrap()));
    assert!(t.dropout.x5.equal(&ht.dropout.x5));
    assert_eq!(mc.len(), 4);
    for (a, b) in mc.iter().zip(&here.mc) {
        assert!(a.noise.as_ref().unwrap().equal(b.noise.as_ref().unwrap()));
        assert!(a.dropout.x9.equal(&b.dropout.x9));
    }
    // Different iterations and different passes draw different numbers.
    let next = StepRandom::draw(&net, cpu, &cfg, 9, 42, &[4, 1, 32, 32, 16]);
    assert!(!next.mc[0].noise.as_ref().unwrap().equal(here.mc[0].noise.as_ref().unwrap()));
    assert!(!here.mc[0].noise.as_ref().unwrap().equal(here.mc[1].noise.as_ref().unwrap()));
    // The noise is the recipe's: clamp(N(0, 0.1^2), -0.2, 0.2).
    let n = ht.noise.as_ref().unwrap();
    assert!(n.abs().max().double_value(&[]) <= 0.2 + 1e-7);
}

#[test]
fn counter_random_numbers_have_the_right_distribution() {
    let u = rng::uniform(rng::key(1, &[2]), &[200_000], Device::Cpu);
    let (lo, hi) = (u.min().double_value(&[]), u.max().double_value(&[]));
    assert!(lo >= 0.0 && hi < 1.0, "uniform out of [0, 1): {lo} {hi}");
    let mean = u.mean(Kind::Float).double_value(&[]);
    assert!((mean - 0.5).abs() < 0.005, "uniform mean {mean}");
    // Ten equal bins each hold about a tenth.
    let hist = (u * 10.0).floor().to_kind(Kind::Int64).bincount::<Tensor>(None, 10);
    for c in Vec::<i64>::try_from(hist).unwrap() {
        assert!((c - 20_000).abs() < 800, "bin count {c}");
    }
    let z = rng::normal(rng::key(1, &[3]), &[200_000], Device::Cpu);
    let (m, s) = (z.mean(Kind::Float).double_value(&[]), z.std(true).double_value(&[]));
    assert!(m.abs() < 0.01 && (s - 1.0).abs() < 0.01, "normal mean {m} std {s}");
    // Neighbouring elements are uncorrelated.
    let c = (z.narrow(0, 0, 199_999) * z.narrow(0, 1, 199_999)).mean(Kind::Float).double_value(&[]);
    assert!(c.abs() < 0.01, "lag-1 correlation {c}");
}

#[test]
fn bad_batches_are_refused_with_the_shape_named() {
    tch::manual_seed(0);
    let mut tr = Trainer::new(&net(), StepConfig::default(), Device::Cpu).unwrap();
    let (images, labels) = batch(1);
    let rnd = tr.draw_random(0, &images.size());
    let err = tr.step(&images, &labels.narrow(0, 0, 1), &rnd).unwrap_err();
    assert!(err.to_string().contains("batch labels"), "{err}");
    let err = tr.step(&images, &labels.to_kind(Kind::Float), &rnd).unwrap_err();
    assert!(err.to_string().contains("int64"), "{err}");
    assert_eq!(tr.iter, 0, "a refused batch must not count as a step");
}

#[test]
fn invalid_hyper_parameters_are_refused_by_name() {
    let mut cfg = StepConfig::default();
    cfg.method.mc_passes = 7;
    let err = Trainer::new(&net(), cfg, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("mc_passes"), "{err}");
    let mut cfg = StepConfig::default();
    cfg.method.ema_decay = 1.5;
    assert!(Trainer::new(&net(), cfg, Device::Cpu).unwrap_err().to_string().contains("ema_decay"));
    let sup = StepConfig::of(Method::Supervised);
    assert!(Trainer::new(&net(), sup, Device::Cpu).unwrap().teacher.is_none());
}

#[test]
fn seeded_initialisation_ignores_libtorch_s_global_generator() {
    let a = Trainer::seeded(&net(), StepConfig::default(), Device::Cpu, 9).unwrap();
    let _ = Tensor::randn([100], (Kind::Float, Device::Cpu)); // disturb the global generator
    tch::manual_seed(12345);
    let b = Trainer::seeded(&net(), StepConfig::default(), Device::Cpu, 9).unwrap();
    for (p, q) in a.student.store().iter().zip(b.student.store().iter()) {
        assert!(p.tensor.equal(&q.tensor), "{}", p.name);
    }
    // Student and teacher start apart, as the reference's two separately built models do.
    let (s, t) = (
        a.student.store().get("block_one.conv.0.weight").unwrap(),
        a.teacher.as_ref().unwrap().store().get("block_one.conv.0.weight").unwrap(),
    );
    assert!(!s.equal(t));
    // PyTorch's default range: +-1/sqrt(fan_in), fan_in = 1 * 27 for the first conv.
    let bound = 1.0 / 27f64.sqrt();
    assert!(s.abs().max().double_value(&[]) <= bound && s.abs().max().double_value(&[]) > 0.8 * bound);
}

#[test]
fn batched_monte_carlo_passes_equal_the_separate_ones_batchnorm_statistics_included() {
    let (images, _) = batch(5);
    let cfg = StepConfig::default(); // T = 8 as 4 forwards of 2 copies of the 2 unlabelled patches
    let (a, b) = (
        Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 6).unwrap(),
        Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 6).unwrap(),
    );
    let (ta, tb) = (a.teacher.as_ref().unwrap(), b.teacher.as_ref().unwrap());
    let unl = a.unlabelled(&images);
    let (t, mc) = StepRandom::draw_teacher(ta.config(), Device::Cpu, &cfg, 3, 7, &unl.size());
    let t = t.unwrap();
    let separate = uamt::train::teacher_passes(ta, &cfg, 7, &unl, &t, &mc).unwrap();
    let mut batched_cfg = cfg.clone();
    batched_cfg.method.mc_batched = true;
    let batched = uamt::train::teacher_passes(tb, &batched_cfg, 7, &unl, &t, &mc).unwrap();
    let (ms, mb) = (separate.mc.unwrap(), batched.mc.unwrap());
    assert_eq!(ms.size(), vec![16, 2, 32, 32, 16]);
    assert!(ms.allclose(&mb, 1e-5, 1e-5, false), "logits differ by {}", (&ms - &mb).abs().max().double_value(&[]));
    assert!(separate.target.equal(&batched.target));
    // Running statistics as after the 1 + 4 separate forwards (and they did move).
    for (p, q) in ta.store().buffers().zip(tb.store().buffers()) {
        assert!(p.tensor.allclose(&q.tensor, 1e-5, 1e-6, false), "{}: {} vs {}", p.name, p.tensor, q.tensor);
    }
    let nbt = ta.store().get("block_one.conv.1.num_batches_tracked").unwrap();
    assert_eq!(nbt.int64_value(&[]), 5);
    let fresh = Trainer::seeded(&net(), cfg, Device::Cpu, 6).unwrap();
    let rm = |t: &Trainer| t.teacher.as_ref().unwrap().store().get("block_one.conv.1.running_mean").unwrap().copy();
    assert!(!rm(&fresh).allclose(&rm(&b), 1e-4, 1e-6, false));
}

#[test]
fn passes_run_side_by_side_equal_those_run_in_turn_batchnorm_statistics_included() {
    let (images, _) = batch(5);
    let mut cfg = StepConfig::default(); // 1 target pass + 4 Monte-Carlo forwards
    let (a, b) = (
        Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 6).unwrap(),
        Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 6).unwrap(),
    );
    let (ta, tb) = (a.teacher.as_ref().unwrap(), b.teacher.as_ref().unwrap());
    let unl = a.unlabelled(&images);
    let (t, mc) = StepRandom::draw_teacher(ta.config(), Device::Cpu, &cfg, 3, 7, &unl.size());
    let t = t.unwrap();
    // The same intra-op threads on both sides: one.
    let before = tch::get_num_threads();
    tch::set_num_threads(1);
    let in_turn = uamt::train::teacher_passes(ta, &cfg, 7, &unl, &t, &mc).unwrap();
    let workers = uamt::train::PassWorkers { workers: 3, threads: 1 };
    let at_once = uamt::train::teacher_passes_on(tb, &cfg, 7, &unl, &t, &mc, workers).unwrap();
    assert_eq!(tch::get_num_threads(), 1, "the calling thread's threads are restored");
    tch::set_num_threads(before);
    assert!(in_turn.target.equal(&at_once.target));
    let (mi, ma) = (in_turn.mc.unwrap(), at_once.mc.unwrap());
    assert_eq!(ma.size(), vec![16, 2, 32, 32, 16]);
    assert!(mi.equal(&ma), "Monte-Carlo logits differ by {}", (&mi - &ma).abs().max().double_value(&[]));
    // Running statistics folded in the passes' order, as the in-kernel updates left them.
    for (p, q) in ta.store().buffers().zip(tb.store().buffers()) {
        assert!(p.tensor.allclose(&q.tensor, 1e-6, 1e-7, false), "{}: {} vs {}", p.name, p.tensor, q.tensor);
    }
    assert_eq!(tb.store().get("block_one.conv.1.num_batches_tracked").unwrap().int64_value(&[]), 5);
    // Mean Teacher: the target pass alone.
    cfg.method.kind = Method::MeanTeacher;
    let c = Trainer::seeded(&net(), cfg.clone(), Device::Cpu, 6).unwrap();
    let out = uamt::train::teacher_passes_on(c.teacher.as_ref().unwrap(), &cfg, 7, &unl, &t, &[], workers).unwrap();
    assert!(out.mc.is_none() && out.target.size() == in_turn.target.size());
}

#[test]
fn channels_last_steps_equal_the_default_layout_s_to_rounding() {
    let (images, labels) = batch(11);
    let wide = VNetConfig { n_filters: 8, ..Default::default() };
    for kind in [Method::Supervised, Method::Uamt] {
        let cfg = StepConfig::of(kind);
        let (mut a, mut b) = (
            Trainer::seeded(&wide, cfg.clone(), Device::Cpu, 4).unwrap(),
            Trainer::seeded(&wide, cfg.clone(), Device::Cpu, 4).unwrap(),
        );
        b.set_channels_last(true);
        assert!(b.student.channels_last() && b.teacher.as_ref().is_none_or(|t| t.channels_last()));
        let rnd = StepRandom::draw(&wide, Device::Cpu, &cfg, 2, 0, &images.size());
        let (ya, yb) =
            (a.student_forward(&images, &rnd.student).unwrap(), b.student_forward(&images, &rnd.student).unwrap());
        assert!(yb.is_contiguous(), "the logits come back in the default layout for the losses");
        let scale = ya.abs().max().double_value(&[]);
        let lerr = (&ya - &yb).abs().max().double_value(&[]);
        assert!(lerr <= 1e-4 * scale, "{kind:?}: logits {lerr:.3e} of {scale:.3e}");
        let (sa, sb) = (a.step(&images, &labels, &rnd).unwrap(), b.step(&images, &labels, &rnd).unwrap());
        let (la, lb) = (sa.loss.double_value(&[]), sb.loss.double_value(&[]));
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "{kind:?}: loss {la} vs {lb}");
        // The gradients (the momentum buffers after one step) to the bound the golden tests hold
        // this net's gradients to against PyTorch: other kernels sum in another order, and
        // BatchNorm's gradients cancel heavily.
        let gmax = a.opt.buffers().iter().map(|(_, g)| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        for ((name, ga), (_, gb)) in a.opt.buffers().iter().zip(b.opt.buffers()) {
            let err = (ga - gb).abs().max().double_value(&[]) / gmax;
            assert!(err <= 5e-3, "{kind:?}: gradient of {name}: {err:.2e} of the largest");
        }
        // The convolution weights and their momentum buffers are stored channels-last (no copy
        // of them per pass); a checkpoint's copies of everything are in the default layout.
        let cl = |t: &Tensor| t.dim() < 5 || t.permute([0, 2, 3, 4, 1]).is_contiguous();
        assert!(b.student.store().trainable().all(|p| cl(&p.tensor)));
        assert!(b.student.store().trainable().any(|p| !p.tensor.is_contiguous()));
        assert!(b.opt.buffers().iter().all(|(_, t)| cl(t)));
        let snap = uamt::checkpoint::Snapshot::of_trainer(&b, 4, "");
        let copies = snap.student.iter().chain(snap.teacher.iter().flatten()).chain(&snap.momentum);
        assert!(copies.map(|(_, t)| t).all(Tensor::is_contiguous));
        let dir = support::TempDir::new("cl-checkpoint");
        let path = snap.write_atomic(dir.path()).unwrap();
        let back = uamt::checkpoint::Snapshot::read(&path).unwrap();
        for (n, x) in &snap.student {
            let y = back.student.iter().find(|(m, _)| m == n).map(|(_, y)| y).unwrap();
            assert!(x.equal(y), "{n} read back differs");
        }
    }
}

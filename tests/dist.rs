//! Data-parallel training on c10d (Gloo on loopback): the collectives, the launch variables, and
//! whole steps of 2 ranks against PyTorch's DistributedDataParallel run with 2 Gloo processes
//! (tests/oracle/ddp_oracle.py).

mod support;

use std::sync::Arc;
use support::free_port;
use tch::{Kind, Tensor};
use uamt::dist::{agree, DistConfig, Launch, Reduce, World};

/// Runs `f(world)` on `n` ranks, each on a thread of its own, connected on loopback.
fn on_ranks<T: Send + 'static>(n: usize, cfg: DistConfig, f: impl Fn(World) -> T + Send + Sync + 'static) -> Vec<T> {
    let port = free_port();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (f, cfg) = (f.clone(), cfg.clone());
            std::thread::spawn(move || {
                let launch = Launch::new(rank, n, "127.0.0.1", port);
                f(World::connect(launch, &cfg).expect("connect"))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn quick() -> DistConfig {
    DistConfig { timeout_s: 20.0, ..DistConfig::default() }
}

#[test]
fn collectives_reduce_and_broadcast_across_two_ranks() {
    let out = on_ranks(2, quick(), |w| {
        let r = w.launch.rank as f32;
        let t = Tensor::from_slice(&[1.0f32 + r, 10.0 * r, -r]);
        w.step.all_reduce(&t, Reduce::Sum).unwrap();
        let mx = Tensor::from_slice(&[r, -r]);
        w.step.all_reduce(&mx, Reduce::Max).unwrap();
        let b = Tensor::from_slice(&[5.0f32 + r; 4]);
        w.checks.broadcast(&b, 0).unwrap();
        w.step.barrier().unwrap();
        (Vec::<f32>::try_from(&t).unwrap(), Vec::<f32>::try_from(&mx).unwrap(), Vec::<f32>::try_from(&b).unwrap())
    });
    for (sum, max, b) in out {
        assert_eq!(sum, vec![3.0, 10.0, -1.0]);
        assert_eq!(max, vec![1.0, 0.0]);
        assert_eq!(b, vec![5.0; 4]);
    }
}

#[test]
fn agree_passes_equal_tensors_and_names_the_first_that_differs() {
    let out = on_ranks(2, quick(), |w| {
        let same = vec![("a".to_string(), Tensor::arange(6, (Kind::Float, tch::Device::Cpu)))];
        let ok = agree(&w.checks, "teacher weights", 3, &same).map_err(|e| e.to_string());
        let r = w.launch.rank as f64;
        let differ = vec![
            ("a".to_string(), Tensor::ones([2], (Kind::Float, tch::Device::Cpu))),
            ("b.weight".to_string(), Tensor::from_slice(&[1.0 + r * 1e-7])),
        ];
        let bad = agree(&w.checks, "teacher weights", 7, &differ).map_err(|e| e.to_string());
        (ok, bad)
    });
    for (ok, bad) in out {
        assert!(ok.is_ok(), "{ok:?}");
        let e = bad.expect_err("a difference of 1e-7 passed");
        assert!(e.contains("`b.weight`") && e.contains("step 7"), "{e}");
    }
}

/// 3 steps of `method` on 2 ranks, each with its own batch and randomness, against the same steps
/// under PyTorch's DistributedDataParallel with 2 Gloo processes (tests/oracle/ddp_oracle.py):
/// every rank's losses, the first step's averaged gradients (its momentum buffers) and the final
/// student and teacher, BatchNorm statistics included. The first step to 1e-6, later ones to
/// `later`.
fn check_against_ddp(file: &'static str, method: uamt::train::Method, later: f64) {
    use support::{assert_scalar, oracle_output, pass, Fixture};
    use uamt::dist::GradSync;
    use uamt::model::VNetConfig;
    use uamt::train::{Method, StepConfig, StepRandom, Trainer};
    let path = oracle_output("tests/oracle/ddp_oracle.py").join(file);
    let out = on_ranks(2, quick(), move |w| {
        // One thread per rank, as each oracle process runs (the summation order of the kernels
        // then matches).
        tch::set_num_threads(1);
        let fx = Fixture::load(path.clone());
        let rank = w.launch.rank;
        let mut cfg = StepConfig::of(method);
        cfg.optim.iterations = fx.scalar("cfg.max_iter") as i64;
        cfg.optim.lr_step = fx.scalar("cfg.lr_step") as i64;
        cfg.method.consistency_interval = fx.scalar("cfg.consistency_interval") as i64;
        cfg.method.consistency_rampup = fx.scalar("cfg.consistency_rampup");
        let net = VNetConfig { n_filters: 4, ..Default::default() };
        let mut tr = Trainer::new(&net, cfg, tch::Device::Cpu).unwrap();
        tr.student.store().load_named(&fx.prefixed("student.init"), &fx.path, false).unwrap();
        tr.teacher.as_ref().unwrap().store().load_named(&fx.prefixed("teacher.init"), &fx.path, false).unwrap();
        tr.sync = Some(Box::new(GradSync::on(w.step.clone(), 0.01, true)));
        let p = format!("r{rank}");
        let (images, labels) = (fx.get(&format!("{p}.images")), fx.get(&format!("{p}.labels")));
        for it in 0..3 {
            let r = format!("{p}.rnd.{it}");
            let passes = if method == Method::Uamt { 4 } else { 0 };
            let mc = (0..passes).map(|k| pass(&fx, &format!("{r}.mc.{k}"))).collect();
            let rnd = StepRandom {
                student: pass(&fx, &format!("{r}.student")),
                teacher: Some(pass(&fx, &format!("{r}.teacher"))),
                mc,
            };
            let rep = tr.step(&images, &labels, &rnd).unwrap().report();
            if it == 0 {
                // The averaged gradients of the first step (+ weight decay), against the largest.
                let scale =
                    tr.opt.buffers().iter().fold(0f64, |m, (n, _)| {
                        m.max(fx.get(&format!("{p}.momentum0.{n}")).abs().max().double_value(&[]))
                    });
                for (n, buf) in tr.opt.buffers() {
                    let want = fx.get(&format!("{p}.momentum0.{n}"));
                    let err = (buf - &want).abs().max().double_value(&[]) / scale;
                    assert!(err <= 1e-6, "{file} rank {rank} first step's averaged gradient `{n}`: error {err:.2e}");
                }
            }
            let o = format!("{p}.out.{it}");
            for (k, got) in [
                ("loss", rep.loss),
                ("supervised", rep.supervised),
                ("consistency", rep.consistency),
                ("mask_fraction", rep.mask_fraction),
                ("lr", rep.lr),
            ] {
                let tol = if it == 0 { 1e-6 } else { later };
                assert_scalar(&format!("{file} rank {rank} step {it} {k}"), got, fx.scalar(&format!("{o}.{k}")), tol);
            }
        }
        // BatchNorm running statistics (means of activations): at least 2e-5.
        let stats = later.max(2e-5);
        for (what, store) in [("student", tr.student.store()), ("teacher", tr.teacher.as_ref().unwrap().store())] {
            let fin = format!("{p}.{what}.final");
            assert_store_split(&format!("{file} rank {rank} {what}"), store, &fx, &fin, later, stats);
        }
        // The ranks' students are the same model (bit for bit: the averaged gradients are).
        let named: Vec<_> =
            tr.student.store().trainable().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        agree(&w.checks, "student weights", 3, &named).unwrap();
        rank
    });
    assert_eq!(out, vec![0, 1]);
}

/// Like `support::assert_store`, with `buffers` the tolerance of the buffers and `weights` that
/// of the trainable tensors.
fn assert_store_split(
    what: &str,
    store: &uamt::model::ParamStore,
    fx: &support::Fixture,
    prefix: &str,
    weights: f64,
    buffers: f64,
) {
    for p in store.iter() {
        let want = fx.get(&format!("{prefix}.{}", p.name));
        if p.tensor.kind() == Kind::Int64 {
            assert_eq!(p.tensor.int64_value(&[]), want.reshape([-1]).int64_value(&[0]), "{what}: {}", p.name);
            continue;
        }
        let tol = if p.trainable { weights } else { buffers };
        let scale = want.abs().max().double_value(&[]).max(1e-2);
        let err = (&p.tensor.detach() - &want).abs().max().double_value(&[]) / scale;
        assert!(err <= tol, "{what}: {}: error {err:.3e} of scale {scale:.3e}", p.name);
    }
}

/// Mean Teacher (the EMA teacher, its noisy target pass, the consistency over every voxel):
/// every loss of every step and every weight to 1e-5, as the single-process golden tests; the
/// BatchNorm running statistics to 2e-5 (measured worst: 1.05e-5, rank 1's `block_five`
/// running mean, whose own scale is 0.045).
#[test]
fn two_ranks_train_mean_teacher_as_pytorch_distributed_data_parallel_does() {
    check_against_ddp("ddp_mean_teacher.npz", uamt::train::Method::MeanTeacher, 1e-5);
}

/// UA-MT: the first step to 1e-6 (measured: losses and averaged gradients bit for bit), later
/// ones to 1e-4. Measured 2026-12-02: the third step's consistency loss differs by 1.6e-5
/// relative and a BatchNorm bias by 3.9e-5 of the 1e-2 floor (the same with `broadcast_buffers`
/// off on both sides). UA-MT's early mask is what makes the difference: at the second step it
/// keeps 0.06 % of rank 1's voxels (40), over which the consistency averages squared
/// differences of two nearly equal softmaxes (the teacher is the student of one step before);
/// one process on rank 1's batch against PyTorch already differs there by 1.5e-6, and the
/// gradients of that term go into both ranks' next weights. Mean Teacher, the same machinery
/// without the mask, meets 1e-5 (above).
#[test]
fn two_ranks_train_uamt_as_pytorch_distributed_data_parallel_does() {
    check_against_ddp("ddp_uamt.npz", uamt::train::Method::Uamt, 1e-4);
}

/// Patches of 32x32x16 made without a generator (the ranks' threads must not share one).
fn patches(k: f64) -> (Tensor, Tensor) {
    let n = 4 * 32 * 32 * 16;
    let i = Tensor::arange(n, (Kind::Float, tch::Device::Cpu));
    let x = ((&i * k).sin() + (&i * (0.37 * k)).cos() * 0.5).reshape([4, 1, 32, 32, 16]);
    let y = x.gt(0.3).to_kind(Kind::Int64).squeeze_dim(1);
    (x, y)
}

/// Two SGD steps (on different data, so the second starts from moved weights and momentum) with
/// eval-mode BatchNorm and a cross-entropy loss, on the patches `part` (start, count) of each
/// batch; gradients averaged by `sync` when given. Returns the weights.
fn eval_mode_steps(
    vnet: &uamt::model::VNet,
    opt: &mut uamt::method::Sgd,
    mut sync: Option<&mut uamt::dist::GradSync>,
    part: Option<(i64, i64)>,
) -> Vec<(String, Tensor)> {
    for k in [0.013, 0.029] {
        let (x, y) = patches(k);
        let (x, y) = match part {
            Some((at, n)) => (x.narrow(0, at, n), y.narrow(0, at, n)),
            None => (x, y),
        };
        let logits = vnet.forward_with(&x, false, uamt::model::Dropout::Random).unwrap();
        let loss = logits.cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0);
        uamt::method::Sgd::zero_grad(vnet.store());
        if let Some(s) = sync.as_deref_mut() {
            s.before_backward().unwrap();
        }
        loss.backward();
        if let Some(s) = sync.as_deref_mut() {
            s.after_backward(vnet.store()).unwrap();
        }
        opt.step(vnet.store(), 0.1).unwrap();
    }
    vnet.store().named_tensors()
}

/// Where BatchNorm cannot differ (eval mode: no batch statistics) and the loss is a mean over
/// patches (cross-entropy), 2 ranks with 2 patches each take the same SGD steps as 1 process
/// with those 4 patches: the averaged gradient is the doubled batch's gradient.
#[test]
fn two_ranks_equal_one_process_with_the_doubled_batch_in_eval_mode() {
    for overlap in [false, true] {
        doubled_batch(overlap);
    }
}

/// [`two_ranks_equal_one_process_with_the_doubled_batch_in_eval_mode`], the all-reduce after
/// backward or started during it (small buckets, so several run while backward goes on).
fn doubled_batch(overlap: bool) {
    use uamt::dist::GradSync;
    use uamt::method::Sgd;
    use uamt::model::{Init, VNet, VNetConfig};
    let net = VNetConfig { n_filters: 4, ..Default::default() };
    let one = {
        let vnet = VNet::with_init(&net, tch::Device::Cpu, Init::Seeded(5)).unwrap();
        let mut opt = Sgd::new(vnet.store(), 0.9, 1e-4);
        eval_mode_steps(&vnet, &mut opt, None, None)
    };
    let net2 = net.clone();
    let ranks = on_ranks(2, quick(), move |w| {
        tch::set_num_threads(1);
        let vnet = VNet::with_init(&net2, tch::Device::Cpu, Init::Seeded(5)).unwrap();
        let mut opt = Sgd::new(vnet.store(), 0.9, 1e-4);
        let mut sync = GradSync::on(w.step.clone(), 0.05, false);
        if overlap {
            sync = sync.overlapping(vnet.store()).unwrap();
        }
        let rank = w.launch.rank as i64;
        let got = eval_mode_steps(&vnet, &mut opt, Some(&mut sync), Some((2 * rank, 2)));
        got.into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1])).unwrap()))
            .collect::<Vec<_>>()
    });
    for (rank, got) in ranks.iter().enumerate() {
        for ((name, want), (gname, g)) in one.iter().zip(got) {
            assert_eq!(name, gname);
            let want = Vec::<f32>::try_from(&want.to_kind(Kind::Float).reshape([-1])).unwrap();
            let scale = want.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
            let err = want.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err <= 1e-5, "overlap {overlap}: rank {rank} `{name}`: error {err:.2e} of scale {scale:.2e}");
        }
    }
    // And the weights moved: the comparison is not between two untouched copies.
    let fresh = VNet::with_init(&net, tch::Device::Cpu, Init::Seeded(5)).unwrap();
    let w0 = fresh.store().named_tensors().into_iter().find(|(n, _)| n.ends_with("weight")).unwrap().1;
    let w1 = one.iter().find(|(n, _)| n.ends_with("weight")).unwrap().1.shallow_clone();
    assert!((w0 - w1).abs().max().double_value(&[]) > 1e-4);
}

/// torchrun's variables, the config's fallbacks, and what is refused, naming the variable.
#[test]
fn launch_reads_torchrun_variables_and_refuses_impossible_ones() {
    use std::collections::HashMap;
    let resolve = |vars: &[(&str, &str)], cfg: &DistConfig| {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::resolve(cfg, |k| m.get(k).cloned()).map_err(|e| e.to_string())
    };
    let d = DistConfig::default();
    assert_eq!(resolve(&[], &d), Ok(None), "no world size: one process");
    assert_eq!(resolve(&[("WORLD_SIZE", "1"), ("RANK", "0")], &d), Ok(None));
    let full =
        [("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")];
    assert_eq!(resolve(&full, &d), Ok(Some(Launch { local_rank: 1, ..Launch::new(3, 4, "node7", 29500) })));
    let cfg = DistConfig {
        world_size: Some(2),
        rank: Some(1),
        master_addr: Some("10.0.0.1".into()),
        master_port: Some(1234),
        ..DistConfig::default()
    };
    assert_eq!(resolve(&[], &cfg), Ok(Some(Launch::new(1, 2, "10.0.0.1", 1234))));
    assert_eq!(resolve(&[("RANK", "0")], &cfg).unwrap().unwrap().rank, 0, "the variable wins over the key");
    // Under torchrun the agent serves the store; each restart's keys are apart.
    let agent = [("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "2")];
    let l = resolve(&agent, &cfg).unwrap().unwrap();
    assert!(l.agent_store && l.attempt == 2, "{l:?}");
    assert_eq!(resolve(&[("LOCAL_WORLD_SIZE", "2")], &cfg).unwrap().unwrap().local_world, Some(2));
    for (vars, names) in [
        (vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK"),
        (vec![("WORLD_SIZE", "two")], "WORLD_SIZE"),
        (vec![("WORLD_SIZE", "0")], "WORLD_SIZE"),
        (vec![("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK"),
        (vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")], "MASTER_ADDR"),
        (vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h")], "MASTER_PORT"),
        (vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")], "MASTER_PORT"),
        (vec![("WORLD_SIZE", "2"), ("RANK", "-1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK"),
        (
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
                ("LOCAL_WORLD_SIZE", "x"),
            ],
            "LOCAL_WORLD_SIZE",
        ),
    ] {
        let e = resolve(&vars, &d).expect_err(&format!("{vars:?} accepted"));
        assert!(e.contains(names), "{vars:?}: {e}");
    }
}

/// A rank whose peer never comes fails the rendezvous within the timeout, naming the address.
#[test]
fn a_lonely_rank_gives_up_within_the_timeout() {
    let port = free_port();
    let t = std::time::Instant::now();
    let cfg = DistConfig { timeout_s: 2.0, ..DistConfig::default() };
    let e = World::connect(Launch::new(0, 2, "127.0.0.1", port), &cfg).expect_err("connected alone");
    let waited = t.elapsed().as_secs_f64();
    assert!(waited < 30.0, "gave up after {waited:.1} s");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

/// The all-reduce started during backward gives the same weights, bit for bit, as the one after
/// it (the same division and sums, bucketed differently), and the stop vote still travels.
#[test]
fn the_all_reduce_during_backward_equals_the_one_after_it() {
    use uamt::dist::GradSync;
    use uamt::method::Sgd;
    use uamt::model::{Init, VNet, VNetConfig};
    let out = on_ranks(2, quick(), |w| {
        tch::set_num_threads(1);
        let net = VNetConfig { n_filters: 4, ..Default::default() };
        let rank = w.launch.rank as i64;
        let mut weights = Vec::new();
        for overlap in [false, true] {
            let vnet = VNet::with_init(&net, tch::Device::Cpu, Init::Seeded(9)).unwrap();
            let mut opt = Sgd::new(vnet.store(), 0.9, 1e-4);
            let mut sync = GradSync::on(w.step.clone(), 0.05, false);
            if overlap {
                sync = sync.overlapping(vnet.store()).unwrap();
            }
            let got = eval_mode_steps(&vnet, &mut opt, Some(&mut sync), Some((2 * rank, 2)));
            weights.push(
                got.into_iter().map(|(n, t)| (n, Vec::<f32>::try_from(&t.reshape([-1])).unwrap())).collect::<Vec<_>>(),
            );
            assert!(!sync.agreed_stop());
        }
        weights
    });
    for (rank, w) in out.iter().enumerate() {
        for ((n, a), (_, b)) in w[0].iter().zip(&w[1]) {
            assert!(a == b, "rank {rank} `{n}` differs between the two ways");
        }
    }
    assert!(out[0][1] == out[1][1], "the ranks disagree");
}

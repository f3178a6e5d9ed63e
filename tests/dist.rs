//! Data-parallel training on c10d (Gloo on loopback): the collectives, the launch variables, and
//! whole steps of 2 ranks against PyTorch's DistributedDataParallel run with 2 Gloo processes
//! (tests/oracle/ddp_oracle.py).

mod support;

use std::sync::Arc;
use tch::{Kind, Tensor};
use uamt::dist::{agree, DistConfig, Launch, Reduce, World};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `f(world)` on `n` ranks, each on a thread of its own, connected on loopback.
fn on_ranks<T: Send + 'static>(n: usize, cfg: DistConfig, f: impl Fn(World) -> T + Send + Sync + 'static) -> Vec<T> {
    let port = free_port();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (f, cfg) = (f.clone(), cfg.clone());
            std::thread::spawn(move || {
                let launch = Launch { rank, world: n, local_rank: rank, addr: "127.0.0.1".into(), port };
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
        let ok = agree(&w.checks, "teacher", 3, &same).map_err(|e| e.to_string());
        let r = w.launch.rank as f64;
        let differ = vec![
            ("a".to_string(), Tensor::ones([2], (Kind::Float, tch::Device::Cpu))),
            ("b.weight".to_string(), Tensor::from_slice(&[1.0 + r * 1e-7])),
        ];
        let bad = agree(&w.checks, "teacher", 7, &differ).map_err(|e| e.to_string());
        (ok, bad)
    });
    for (ok, bad) in out {
        assert!(ok.is_ok(), "{ok:?}");
        let e = bad.expect_err("a difference of 1e-7 passed");
        assert!(e.contains("`b.weight`") && e.contains("step 7"), "{e}");
    }
}

/// UA-MT, 3 steps on 2 ranks, each with its own batch and randomness, against the same steps
/// under PyTorch's DistributedDataParallel with 2 Gloo processes: every rank's losses and its
/// final student and teacher (BatchNorm statistics included).
///
/// The first step agrees to 1e-6 (measured: bit for bit), which pins down DDP's semantics
/// (gradients averaged, buffers from rank 0). Later steps are held to 1e-4: measured 2026-12-02,
/// the third step's consistency loss differs by 1.6e-5 relative and a BatchNorm bias by 3.9e-5
/// of the 1e-2 floor, while PyTorch against itself (1 thread against 2 per process) moves them
/// by 1e-6; the single-process golden tests meet 1e-5. Where the rest comes from is not found.
#[test]
fn two_ranks_train_as_pytorch_distributed_data_parallel_does() {
    use support::{assert_scalar, assert_store, oracle_output, pass, Fixture};
    use uamt::dist::GradSync;
    use uamt::model::VNetConfig;
    use uamt::train::{Method, StepConfig, StepRandom, Trainer};
    let path = oracle_output("tests/oracle/ddp_oracle.py").join("ddp_uamt.npz");
    let out = on_ranks(2, quick(), move |w| {
        // One thread per rank, as each oracle process runs (the summation order of the kernels
        // then matches; two threads against one moves the 3rd step's numbers by ~1e-5).
        tch::set_num_threads(1);
        let fx = Fixture::load(path.clone());
        let rank = w.launch.rank;
        let mut cfg = StepConfig::of(Method::Uamt);
        cfg.optim.iterations = fx.scalar("cfg.max_iter") as i64;
        cfg.optim.lr_step = fx.scalar("cfg.lr_step") as i64;
        cfg.method.consistency_interval = fx.scalar("cfg.consistency_interval") as i64;
        cfg.method.consistency_rampup = fx.scalar("cfg.consistency_rampup");
        let net = VNetConfig { n_filters: 4, ..Default::default() };
        let mut tr = Trainer::new(&net, cfg, tch::Device::Cpu).unwrap();
        tr.student.store().load_named(&fx.prefixed("student.init"), &fx.path, false).unwrap();
        tr.teacher.as_ref().unwrap().store().load_named(&fx.prefixed("teacher.init"), &fx.path, false).unwrap();
        tr.sync = Some(GradSync::on(w.step.clone(), 0.01, true));
        let p = format!("r{rank}");
        let (images, labels) = (fx.get(&format!("{p}.images")), fx.get(&format!("{p}.labels")));
        for it in 0..3 {
            let r = format!("{p}.rnd.{it}");
            let mc = (0..4).map(|k| pass(&fx, &format!("{r}.mc.{k}"))).collect();
            let rnd = StepRandom {
                student: pass(&fx, &format!("{r}.student")),
                teacher: Some(pass(&fx, &format!("{r}.teacher"))),
                mc,
            };
            let rep = tr.step(&images, &labels, &rnd).unwrap().report();
            let o = format!("{p}.out.{it}");
            for (k, got) in [
                ("loss", rep.loss),
                ("supervised", rep.supervised),
                ("consistency", rep.consistency),
                ("mask_fraction", rep.mask_fraction),
                ("lr", rep.lr),
            ] {
                let tol = if it == 0 { 1e-6 } else { 1e-4 };
                assert_scalar(&format!("rank {rank} step {it} {k}"), got, fx.scalar(&format!("{o}.{k}")), tol);
            }
        }
        assert_store(&format!("rank {rank} student"), tr.student.store(), &fx, &format!("{p}.student.final"), 1e-4);
        let teacher = tr.teacher.as_ref().unwrap();
        assert_store(&format!("rank {rank} teacher"), teacher.store(), &fx, &format!("{p}.teacher.final"), 1e-4);
        // The ranks' students are the same model (bit for bit: the averaged gradients are).
        let named: Vec<_> =
            tr.student.store().trainable().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        agree(&w.checks, "student", 3, &named).unwrap();
        rank
    });
    assert_eq!(out, vec![0, 1]);
}

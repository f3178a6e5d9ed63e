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

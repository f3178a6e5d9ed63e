//! The gradient all-reduce of a data-parallel step, against PyTorch's: the full V-Net's
//! (16 filters, 9,448,866 parameters, 37.8 MB of fp32 gradients) gradients averaged over 2 ranks
//! with Gloo on loopback, in 25 MB buckets. Ours: `GradSync::after_backward` (pack, divide,
//! all-reduce, unpack, plus the stop vote), 2 ranks as 2 processes (this program started again
//! with `UAMT_BENCH_RANK`); the peer:
//! torch.distributed with the same buckets, 2 processes (benches/reference/allreduce_peer.py).
//! One intra-op thread per rank on both sides; medians over the same number of rounds, measured
//! in the same run, reported as a ratio.
//!
//! Run: `cargo bench --bench dist_allreduce` (needs the project's .venv for the peer).

use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use uamt::dist::{DistConfig, GradSync, Launch, World};
use uamt::model::{VNet, VNetConfig};

const ROUNDS: usize = 20;
const WARMUP: usize = 3;
const BUCKET_MB: f64 = 25.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds per round (median) of `after_backward` on `rank` of 2.
fn ours_rank(rank: usize, port: u16) -> f64 {
    tch::set_num_threads(1);
    let cfg = DistConfig { timeout_s: 120.0, bucket_mb: BUCKET_MB, ..DistConfig::default() };
    let world = World::connect(Launch::new(rank, 2, "127.0.0.1", port), &cfg).expect("rendezvous");
    let vnet = VNet::new(&VNetConfig::default(), Device::Cpu).expect("v-net");
    // Gradients of the right shapes without a forward pass: d/dp sum(p * r) = r.
    let loss = vnet
        .store()
        .trainable()
        .map(|p| (&p.tensor * Tensor::randn(p.tensor.size(), (Kind::Float, Device::Cpu))).sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
    let mut sync = GradSync::on(world.step.clone(), BUCKET_MB, false);
    let mut times = Vec::new();
    for r in 0..ROUNDS + WARMUP {
        world.step.barrier().expect("barrier");
        let t = Instant::now();
        sync.after_backward(vnet.store()).expect("all-reduce");
        if r >= WARMUP {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    median(times)
}

fn main() {
    // A rank of ours: measure, print the median, done.
    if let (Ok(rank), Ok(port)) = (std::env::var("UAMT_BENCH_RANK"), std::env::var("UAMT_BENCH_PORT")) {
        let s = ours_rank(rank.parse().expect("rank"), port.parse().expect("port"));
        println!("{s}");
        return;
    }
    let net = VNet::new(&VNetConfig::default(), Device::Cpu).expect("v-net");
    let shapes: Vec<Vec<i64>> = net.store().trainable().map(|p| p.tensor.size()).collect();
    let params: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let me = std::env::current_exe().expect("this program");
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&me)
                .env("UAMT_BENCH_RANK", r.to_string())
                .env("UAMT_BENCH_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start a rank")
        })
        .collect();
    let ours = ranks
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("rank");
            assert!(out.status.success(), "a rank failed");
            String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().expect("rank's median")
        })
        .fold(0.0, f64::max);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("UAMT_PYTHON").unwrap_or_else(|_| root.join(".venv/bin/python3").display().to_string());
    let out = Command::new(&python)
        .arg(root.join("benches/reference/allreduce_peer.py"))
        .args([ROUNDS.to_string(), WARMUP.to_string(), BUCKET_MB.to_string()])
        .arg(serde_json::to_string(&shapes).expect("json"))
        .output()
        .expect("run the peer");
    assert!(out.status.success(), "peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peer json");
    let peer = v["median_s"].as_f64().expect("median_s");
    let mb = params as f64 * 4.0 / 1e6;
    println!(
        "gradient all-reduce, 2 ranks, Gloo on loopback, {params} parameters ({mb:.1} MB fp32), {BUCKET_MB} MB buckets"
    );
    println!("{:<28} {:>10} {:>14}", "", "ms/round", "GB/s (algbw)");
    for (name, s) in [("uamt (GradSync)", ours), ("torch.distributed (peer)", peer)] {
        println!("{name:<28} {:>10.1} {:>14.2}", s * 1e3, mb / 1e3 / s);
    }
    println!("peer / uamt = {:.2}x (above 1: uamt faster)", peer / ours);
}

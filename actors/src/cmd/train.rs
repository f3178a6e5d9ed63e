//! `uamt train`: for now the built-in demo: a few sequential UA-MT steps on a tiny synthetic
//! batch on CPU, printing the losses.

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use uamt::model::VNetConfig;
use uamt::train::{StepConfig, Trainer};

/// Arguments of `uamt train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of iterations of the demo.
    #[arg(long, default_value_t = 20)]
    pub iterations: i64,
    /// Seed of initialisation and of every random draw.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
}

/// A batch of `b` volumes `[b, 1, 32, 32, 16]`, each an ellipsoid brighter than a noisy background,
/// and the labels of the first `labelled`.
fn demo_batch(b: i64, labelled: i64) -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let axis = |n: i64, shape: [i64; 3]| (Tensor::arange(n, opts) - (n as f64 - 1.0) / 2.0).reshape(shape) / (n as f64 / 4.0);
    let (x, y, z) = (axis(32, [32, 1, 1]), axis(32, [1, 32, 1]), axis(16, [1, 1, 16]));
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for i in 0..b {
        let s = 1.0 + 0.15 * i as f64;
        let r2 = (&x * &x) / s + (&y * &y) * s + &z * &z;
        let label = r2.lt(1.0).to_kind(Kind::Int64);
        let image = label.to_kind(Kind::Float) * 2.0 - 1.0 + Tensor::randn([32, 32, 16], opts) * 0.5;
        images.push(image.unsqueeze(0));
        labels.push(label);
    }
    (Tensor::stack(&images, 0), Tensor::stack(&labels[..labelled as usize], 0))
}

pub fn run(args: Args) -> Result<()> {
    tch::manual_seed(args.seed as i64);
    let net = VNetConfig { n_filters: 4, ..Default::default() };
    let cfg = StepConfig { max_iter: args.iterations, consistency_interval: 1, consistency_rampup: args.iterations as f64 / 2.0, ..Default::default() };
    let mut trainer = Trainer::new(&net, cfg, Device::Cpu)?;
    let (images, labels) = demo_batch(4, 2);
    tracing::info!(n_filters = 4, patch = "32x32x16", batch = 4, labelled = 2, iterations = args.iterations, "demo: UA-MT on a tiny synthetic batch");
    println!("{:>5} {:>9} {:>9} {:>9} {:>9} {:>11} {:>7} {:>9}", "iter", "loss", "ce", "dice", "consist", "weight", "mask", "thresh");
    for _ in 0..args.iterations {
        let rnd = trainer.draw_random(args.seed, &images.size());
        let r = trainer.step(&images, &labels, &rnd)?.report();
        println!(
            "{:>5} {:>9.5} {:>9.5} {:>9.5} {:>9.6} {:>11.6} {:>7.3} {:>9.5}",
            r.iter, r.loss, r.ce, r.dice, r.consistency, r.weight, r.mask_fraction, r.threshold
        );
    }
    Ok(())
}

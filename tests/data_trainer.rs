//! The loader's batches go straight into one UA-MT step of the trainer.

mod support;

use std::sync::Arc;
use support::*;
use tch::Device;
use uamt::data::sampler::{LoaderConfig, PatchLoader};
use uamt::data::{write_synth, Dataset, DatasetOptions, SynthConfig};
use uamt::model::VNetConfig;
use uamt::train::{StepConfig, Trainer};

#[test]
fn should_feed_a_uamt_step_with_loader_batches() {
    let tmp = TempDir::new("data-trainer");
    let out = tmp.join("ds");
    write_synth(
        &out,
        &SynthConfig { cases: 4, labelled: 2, test: 0, size: [24, 20, 18], seed: 3, ..SynthConfig::default() },
        false,
    )
    .unwrap();
    let ds = Arc::new(Dataset::open(&out, &DatasetOptions::default()).unwrap());
    let loader = PatchLoader::new(ds, LoaderConfig { patch: [16, 16, 16], ..LoaderConfig::default() }).unwrap();
    let net = VNetConfig { n_filters: 4, ..VNetConfig::default() };
    let mut trainer = Trainer::new(&net, StepConfig::default(), Device::Cpu).unwrap();
    for it in 0..2 {
        let (images, labels) = loader.batch(it).unwrap();
        let rnd = trainer.draw_random(1337, &images.size());
        let stats = trainer.step(&images, &labels, &rnd).unwrap();
        let loss = stats.loss.double_value(&[]);
        assert!(loss.is_finite() && loss > 0.0, "iteration {it}: loss {loss}");
    }
}

//! Batch sampling: labelled cases permuted per epoch, unlabelled ones from endless reshuffles,
//! seeded per iteration; batches cut from a mapped dataset as the trainer's tensors.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use support::augment_ref::augment_reference;
use support::*;
use tch::Kind;
use uamt::data::sampler::{BatchSampler, HostBatch, LoaderConfig, PatchLoader, SamplerConfig};
use uamt::data::{write_synth, Dataset, DatasetOptions, SynthConfig};

fn sampler(lbs: usize, ubs: usize, nl: usize, nu: usize, restart: bool, seed: u64) -> BatchSampler {
    BatchSampler::new(
        SamplerConfig {
            labelled_bs: lbs,
            unlabelled_bs: ubs,
            seed,
            unlabelled_restart_each_epoch: restart,
            ..SamplerConfig::default()
        },
        nl,
        nu,
    )
    .unwrap()
}

/// Data-parallel sharding: the ranks' batches of an iteration are the slices of the batch one
/// process draws with `world` times the batch sizes, in rank order; together the ranks still
/// visit each labelled case once per (shorter) epoch; a world too large for the labelled cases
/// is refused.
#[test]
fn ranks_take_their_slices_of_one_global_batch() {
    for restart in [true, false] {
        let one = sampler(4, 6, 16, 40, restart, 7);
        let ranks: Vec<BatchSampler> = (0..2)
            .map(|rank| {
                let cfg = SamplerConfig {
                    labelled_bs: 2,
                    unlabelled_bs: 3,
                    seed: 7,
                    unlabelled_restart_each_epoch: restart,
                    rank,
                    world: 2,
                };
                BatchSampler::new(cfg, 16, 40).unwrap()
            })
            .collect();
        assert_eq!(ranks[0].batches_per_epoch(), 4);
        for it in 0..13u64 {
            let g = one.batch(it);
            let (a, b) = (ranks[0].batch(it), ranks[1].batch(it));
            assert_eq!([a.labelled.clone(), b.labelled.clone()].concat(), g.labelled, "iteration {it}");
            assert_eq!([a.unlabelled.clone(), b.unlabelled.clone()].concat(), g.unlabelled, "iteration {it}");
            assert_eq!((a.epoch, b.epoch), (g.epoch, g.epoch));
        }
        let epoch: Vec<usize> = (0..4).flat_map(|i| ranks.iter().flat_map(move |r| r.batch(i).labelled)).collect();
        let mut sorted = epoch.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    }
    let too_many = SamplerConfig { labelled_bs: 2, rank: 3, world: 9, ..SamplerConfig::default() };
    let e = BatchSampler::new(too_many, 16, 40).unwrap_err().to_string();
    assert!(e.contains("labelled_bs") && e.contains("9 processes"), "{e}");
}

#[test]
fn should_permute_the_labelled_cases_once_per_epoch() {
    let s = sampler(2, 2, 16, 64, true, 1337);
    assert_eq!(s.batches_per_epoch(), 8);
    let mut orders = Vec::new();
    for epoch in 0..5u64 {
        let seen: Vec<usize> = (0..8).flat_map(|b| s.batch(epoch * 8 + b).labelled).collect();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "epoch {epoch} must visit each labelled case once");
        assert!((0..8).all(|b| s.batch(epoch * 8 + b).epoch == epoch));
        orders.push(seen);
    }
    let distinct: HashSet<_> = orders.iter().collect();
    assert_eq!(distinct.len(), 5, "each epoch draws a new permutation");
}

#[test]
fn should_drop_the_remainder_of_an_epoch() {
    let s = sampler(2, 0, 5, 0, true, 1);
    assert_eq!(s.batches_per_epoch(), 2);
    for epoch in 0..4u64 {
        let seen: Vec<usize> = (0..2).flat_map(|b| s.batch(epoch * 2 + b).labelled).collect();
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 4, "epoch {epoch}: {seen:?}");
        assert!(s.batch(epoch * 2).unlabelled.is_empty());
    }
}

#[test]
fn should_draw_unlabelled_cases_from_endless_reshuffles() {
    // 3 unlabelled cases, 2 per batch, 4 batches per epoch: 8 draws per epoch.
    let restart = sampler(2, 2, 8, 3, true, 7);
    for epoch in 0..3u64 {
        let draws: Vec<usize> = (0..4).flat_map(|b| restart.batch(epoch * 4 + b).unlabelled).collect();
        for pass in draws.chunks(3) {
            assert_eq!(
                pass.iter().collect::<HashSet<_>>().len(),
                pass.len(),
                "epoch {epoch}: a reshuffle repeats a case: {draws:?}"
            );
        }
    }
    // One stream across epochs: passes of 3 line up with the global draw count.
    let endless = sampler(2, 2, 8, 3, false, 7);
    let draws: Vec<usize> = (0..12).flat_map(|i| endless.batch(i).unlabelled).collect();
    for pass in draws.chunks(3) {
        let mut p = pass.to_vec();
        p.sort_unstable();
        assert_eq!(p, vec![0, 1, 2], "{draws:?}");
    }
    let passes: HashSet<&[usize]> = draws.chunks(3).collect();
    assert!(passes.len() > 1, "the stream must reshuffle, not repeat one order: {draws:?}");
}

#[test]
fn should_reproduce_batches_by_seed_in_any_order() {
    let a = sampler(2, 2, 16, 64, true, 1337);
    let b = sampler(2, 2, 16, 64, true, 1337);
    let c = sampler(2, 2, 16, 64, true, 1338);
    let forward: Vec<_> = (0..40).map(|i| a.batch(i)).collect();
    let backward: Vec<_> = (0..40).rev().map(|i| b.batch(i)).collect::<Vec<_>>().into_iter().rev().collect();
    assert_eq!(forward, backward);
    assert_eq!(a.iter_from(10).take(3).collect::<Vec<_>>(), forward[10..13].to_vec());
    let other: Vec<_> = (0..40).map(|i| c.batch(i)).collect();
    assert_ne!(forward, other);
}

#[test]
fn should_refuse_batches_the_cases_cannot_fill() {
    let cfg = |l, u| SamplerConfig { labelled_bs: l, unlabelled_bs: u, ..SamplerConfig::default() };
    assert!(BatchSampler::new(cfg(0, 2), 16, 64).is_err());
    assert!(BatchSampler::new(cfg(2, 2), 1, 64).is_err());
    let msg = BatchSampler::new(cfg(2, 2), 16, 0).unwrap_err().to_string();
    assert!(msg.contains("unlabelled"), "{msg}");
    assert!(BatchSampler::new(cfg(4, 0), 80, 0).is_ok(), "supervised batches need no unlabelled cases");
}

#[test]
fn should_cut_batches_the_trainer_takes_from_a_mapped_dataset() {
    let tmp = TempDir::new("sampler-ds");
    let out = tmp.join("ds");
    let cfg = SynthConfig { cases: 5, labelled: 3, test: 1, size: [20, 18, 6], seed: 4, ..SynthConfig::default() };
    write_synth(&out, &cfg, false).unwrap();
    let ds = Arc::new(Dataset::open(&out, &DatasetOptions::default()).unwrap());
    let lc = LoaderConfig { patch: [16, 16, 8], ..LoaderConfig::default() };
    let loader = PatchLoader::new(ds.clone(), lc.clone()).unwrap();
    let (images, labels) = loader.batch(0).unwrap();
    assert_eq!(images.size(), vec![4, 1, 16, 16, 8]);
    assert_eq!(images.kind(), Kind::Float);
    assert_eq!(labels.size(), vec![2, 16, 16, 8]);
    assert_eq!(labels.kind(), Kind::Int64);
    let values: Vec<i64> = Vec::try_from(&labels.flatten(0, -1)).unwrap();
    assert!(values.iter().all(|&v| v == 0 || v == 1));

    // Each patch is the reference augmentation of its case; labelled patches come first and
    // from labelled cases.
    let mut host = HostBatch::default();
    for it in [0u64, 1, 7] {
        loader.fill(it, &mut host).unwrap();
        assert_eq!(host.plans.len(), 4);
        assert_eq!(host.labelled, 2);
        let n = 16 * 16 * 8;
        for (slot, p) in host.plans.iter().enumerate() {
            let case = &ds.training[p.case];
            assert_eq!(case.labelled, slot < 2, "slot {slot} holds case {}", case.id);
            let want = augment_reference(&case.image.read_f32().unwrap(), &p.augment, lc.patch).unwrap().to_c_order();
            assert_eq!(&host.images[slot * n..(slot + 1) * n], want.as_slice(), "iteration {it} slot {slot}");
            if slot < 2 {
                let want =
                    augment_reference(&case.label.as_ref().unwrap().read_labels().unwrap(), &p.augment, lc.patch)
                        .unwrap()
                        .to_c_order();
                assert_eq!(
                    &host.labels[slot * n..(slot + 1) * n],
                    want.as_slice(),
                    "labels, iteration {it} slot {slot}"
                );
            }
        }
        // The padding (z: 6 <= 8) shows as zeros around the volume.
        assert!(host.plans.iter().all(|p| p.augment.pad[2] == 4));
    }
    // A second loader over the same files gives the same batches; the tensors hold the host data.
    let again = PatchLoader::new(Arc::new(Dataset::open(&out, &DatasetOptions::default()).unwrap()), lc).unwrap();
    let mut other = HostBatch::default();
    again.fill(7, &mut other).unwrap();
    assert_eq!(
        (other.images.clone(), other.labels.clone(), other.plans.clone()),
        (host.images.clone(), host.labels.clone(), host.plans.clone())
    );
    let (ti, tl) = other.to_tensors().unwrap();
    let flat: Vec<f32> = Vec::try_from(&ti.flatten(0, -1)).unwrap();
    assert_eq!(flat, other.images);
    let fl: Vec<i64> = Vec::try_from(&tl.flatten(0, -1)).unwrap();
    assert_eq!(fl, other.labels.iter().map(|&v| v as i64).collect::<Vec<_>>());
}

//! Batches as the recipe samples them: labelled patches first, then unlabelled ones. Each epoch
//! permutes the labelled cases once (an epoch is `labelled / labelled_bs` batches, a remainder
//! is dropped as the reference's `grouper` drops it); unlabelled cases come from an endlessly
//! reshuffled stream. Every draw is a pure function of (seed, iteration), so any loader thread
//! can build batch `i` and get the same patches.

use super::augment::{extract, Augment};
use super::dataset::Dataset;
use super::error::{DataError, Result};
use super::volume::LABEL_KIND;
use crate::check::{self, limits};
use crate::recipe;
use crate::rng::{stream, Rng};
use std::sync::Arc;
use tch::Tensor;

/// How batches are drawn: the batch keys of the config file's `[data]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Labelled patches at the head of each batch (the recipe: 2).
    pub labelled_bs: usize,
    /// Unlabelled patches after them (the recipe: 2; 0 for supervised training).
    pub unlabelled_bs: usize,
    /// Seed of every draw. Not a key of its own in the config file: the daemon sets it from
    /// `optim.seed`.
    #[serde(skip)]
    pub seed: u64,
    /// This process's rank in a data-parallel run (0 alone). Set by the daemon, not a key.
    #[serde(skip)]
    pub rank: usize,
    /// The number of data-parallel processes (1 alone). Each iteration draws one global batch
    /// of `world` times the batch sizes, as one process would, and rank r takes the r-th slice
    /// of its labelled and of its unlabelled part (as PyTorch's DistributedSampler shards one
    /// shuffled order); an epoch is `labelled / (labelled_bs * world)` iterations.
    #[serde(skip)]
    pub world: usize,
    /// The reference restarts the unlabelled stream (a fresh reshuffle) at each epoch, because
    /// its batch sampler is re-created per epoch; `false` keeps one stream across epochs.
    pub unlabelled_restart_each_epoch: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            labelled_bs: recipe::LABELLED_BS,
            unlabelled_bs: recipe::UNLABELLED_BS,
            seed: recipe::SEED,
            rank: 0,
            world: 1,
            unlabelled_restart_each_epoch: true,
        }
    }
}

impl SamplerConfig {
    /// Checks the batch sizes; errors name the key under `prefix` (`data.labelled_bs`).
    pub fn validate(&self, prefix: &str) -> crate::Result<()> {
        check::range(&check::key(prefix, "labelled_bs"), self.labelled_bs, 1, limits::BATCH)?;
        check::range(&check::key(prefix, "unlabelled_bs"), self.unlabelled_bs, 0, limits::BATCH)
    }
}

/// Which cases batch `iteration` holds, as positions in the labelled and unlabelled lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchIndices {
    /// The iteration (0-based) this batch is for.
    pub iteration: u64,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Positions in the labelled list.
    pub labelled: Vec<usize>,
    /// Positions in the unlabelled list.
    pub unlabelled: Vec<usize>,
}

/// Draws [`BatchIndices`] for any iteration.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    /// The settings.
    cfg: SamplerConfig,
    /// Size of the labelled list.
    n_labelled: usize,
    /// Size of the unlabelled list.
    n_unlabelled: usize,
}

impl BatchSampler {
    /// A sampler over `n_labelled` labelled and `n_unlabelled` unlabelled cases.
    pub fn new(cfg: SamplerConfig, n_labelled: usize, n_unlabelled: usize) -> Result<Self> {
        if cfg.labelled_bs == 0 {
            return Err(DataError::invalid("labelled_bs", "must be at least 1"));
        }
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(DataError::invalid("rank", format!("rank {} of a world of {}", cfg.rank, cfg.world)));
        }
        if n_labelled < cfg.labelled_bs * cfg.world {
            let per = if cfg.world > 1 { format!(" on each of {} processes", cfg.world) } else { String::new() };
            return Err(DataError::invalid(
                "labelled_bs",
                format!("{} labelled patches per batch{per} but only {n_labelled} labelled cases", cfg.labelled_bs),
            ));
        }
        if cfg.unlabelled_bs > 0 && n_unlabelled == 0 {
            return Err(DataError::invalid(
                "unlabelled_bs",
                format!("{} unlabelled patches per batch but no unlabelled cases", cfg.unlabelled_bs),
            ));
        }
        Ok(BatchSampler { cfg, n_labelled, n_unlabelled })
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Batches per epoch: `labelled / (labelled_bs * world)`, rounded down.
    pub fn batches_per_epoch(&self) -> u64 {
        (self.n_labelled / (self.cfg.labelled_bs * self.cfg.world.max(1))) as u64
    }

    /// The labelled permutation of `epoch`.
    pub fn labelled_order(&self, epoch: u64) -> Vec<usize> {
        Rng::keyed(self.cfg.seed, &[stream::LABELLED, epoch]).permutation(self.n_labelled)
    }

    /// The `p`-th draw of the unlabelled stream named by `key` (one reshuffle per pass).
    fn unlabelled_at(&self, key: &[u64], p: u64) -> usize {
        let n = self.n_unlabelled as u64;
        let round = p / n;
        let mut path = key.to_vec();
        path.push(round);
        let perm = Rng::keyed(self.cfg.seed, &path).permutation(self.n_unlabelled);
        perm[(p % n) as usize]
    }

    /// The cases of batch `iteration`.
    pub fn batch(&self, iteration: u64) -> BatchIndices {
        let per_epoch = self.batches_per_epoch().max(1);
        let (epoch, pos) = (iteration / per_epoch, iteration % per_epoch);
        let (world, rank) = (self.cfg.world.max(1) as u64, self.cfg.rank as u64);
        let lbs = self.cfg.labelled_bs;
        let order = self.labelled_order(epoch);
        // This rank's slice of the global batch (all of it for one process).
        let slice = (pos * world + rank) as usize;
        let labelled = order[slice * lbs..(slice + 1) * lbs].to_vec();
        let ubs = self.cfg.unlabelled_bs as u64;
        let unlabelled = if self.n_unlabelled == 0 {
            Vec::new()
        } else if self.cfg.unlabelled_restart_each_epoch {
            let first = (pos * world + rank) * ubs;
            (0..ubs).map(|t| self.unlabelled_at(&[stream::UNLABELLED, epoch], first + t)).collect()
        } else {
            let first = (iteration * world + rank) * ubs;
            (0..ubs).map(|t| self.unlabelled_at(&[stream::UNLABELLED], first + t)).collect()
        };
        BatchIndices { iteration, epoch, labelled, unlabelled }
    }

    /// Batches `start, start + 1, ...` without end.
    pub fn iter_from(&self, start: u64) -> impl Iterator<Item = BatchIndices> + '_ {
        (start..).map(move |i| self.batch(i))
    }
}

/// How patches are cut and batched: the patch keys of the config file's `[data]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Patch size `[X, Y, Z]` (the recipe: 112 x 112 x 80); each side divisible by 16.
    pub patch: [usize; 3],
    /// Random rot90 + flip before the crop (the recipe: on).
    pub rot_flip: bool,
    /// The batch composition and seed. Not part of the serialised form: the config file's
    /// `[data]` holds the [`SamplerConfig`] beside this one (see `uamt::config::Config::loader`).
    #[serde(skip)]
    pub sampler: SamplerConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig { patch: recipe::PATCH, rot_flip: true, sampler: SamplerConfig::default() }
    }
}

impl LoaderConfig {
    /// Checks the patch (a V-Net input: sides divisible by 16); errors name the key under
    /// `prefix` (`data.patch`). The sampler validates itself.
    pub fn validate(&self, prefix: &str) -> crate::Result<()> {
        check::patch(&check::key(prefix, "patch"), self.patch, limits::PATCH_SIDE)
    }
}

/// What one patch of a batch is: its case and augmentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchPlan {
    /// Index into the dataset's training cases.
    pub case: usize,
    /// How the patch is cut.
    pub augment: Augment,
}

/// A batch in host memory, C order, ready to become tensors; reusable across iterations.
#[derive(Debug, Clone, Default)]
pub struct HostBatch {
    /// The iteration it holds.
    pub iteration: u64,
    /// Its epoch.
    pub epoch: u64,
    /// `[X, Y, Z]` of each patch.
    pub patch: [usize; 3],
    /// The patches: labelled ones first.
    pub plans: Vec<PatchPlan>,
    /// How many of them are labelled.
    pub labelled: usize,
    /// `[b, 1, X, Y, Z]` intensities, C order.
    pub images: Vec<f32>,
    /// `[labelled, X, Y, Z]` classes, C order.
    pub labels: Vec<u8>,
}

impl HostBatch {
    /// `images` `[b, 1, X, Y, Z]` float32 and `labels` `[labelled, X, Y, Z]` int64, on the CPU,
    /// in the form the training step takes them.
    pub fn to_tensors(&self) -> Result<(Tensor, Tensor)> {
        let [x, y, z] = self.patch.map(|d| d as i64);
        let b = self.plans.len() as i64;
        let images = Tensor::f_from_slice(&self.images)?.f_view([b, 1, x, y, z])?;
        let labels =
            Tensor::f_from_slice(&self.labels)?.f_view([self.labelled as i64, x, y, z])?.f_to_kind(LABEL_KIND)?;
        Ok((images, labels))
    }
}

/// Cuts batches of augmented patches out of an opened (mapped) dataset.
#[derive(Debug, Clone)]
pub struct PatchLoader {
    /// The dataset, shared with other loaders.
    dataset: Arc<Dataset>,
    /// The settings.
    cfg: LoaderConfig,
    /// Which batch holds which cases.
    sampler: BatchSampler,
    /// Training-case indices of the labelled cases.
    labelled: Vec<usize>,
    /// Training-case indices of the unlabelled cases.
    unlabelled: Vec<usize>,
}

impl PatchLoader {
    /// A loader over `dataset`'s training cases.
    pub fn new(dataset: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.patch.contains(&0) {
            return Err(DataError::invalid("patch", format!("{:?} has an empty axis", cfg.patch)));
        }
        let (labelled, unlabelled) = (dataset.labelled(), dataset.unlabelled());
        let sampler = BatchSampler::new(cfg.sampler.clone(), labelled.len(), unlabelled.len())?;
        Ok(PatchLoader { dataset, cfg, sampler, labelled, unlabelled })
    }

    /// The batch sampler.
    pub fn sampler(&self) -> &BatchSampler {
        &self.sampler
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The cases and augmentations of batch `iteration` (labelled first).
    pub fn plan(&self, iteration: u64) -> (BatchIndices, Vec<PatchPlan>) {
        let idx = self.sampler.batch(iteration);
        let plans_len = idx.labelled.len() + idx.unlabelled.len();
        let cases =
            idx.labelled.iter().map(|&i| self.labelled[i]).chain(idx.unlabelled.iter().map(|&i| self.unlabelled[i]));
        let plans = cases
            .enumerate()
            .map(|(slot, case)| {
                // Slots numbered across the global batch: each rank's patches augment differently.
                let global = self.cfg.sampler.rank * plans_len + slot;
                let mut rng = Rng::keyed(self.cfg.sampler.seed, &[stream::AUGMENT, iteration, global as u64]);
                let dims = self.dataset.training[case].image.dims();
                PatchPlan { case, augment: Augment::draw(&mut rng, dims, self.cfg.patch, self.cfg.rot_flip) }
            })
            .collect();
        (idx, plans)
    }

    /// Fills `host` with batch `iteration`, reusing its buffers. A case whose mapped file changed
    /// length since the dataset was opened is an error naming it (see
    /// [`crate::data::NiftiVolume::check_unchanged`]).
    pub fn fill(&self, iteration: u64, host: &mut HostBatch) -> Result<()> {
        let (idx, plans) = self.plan(iteration);
        let n = self.cfg.patch.iter().product::<usize>();
        let l = idx.labelled.len();
        host.images.resize(plans.len() * n, 0.0);
        host.labels.resize(l * n, 0);
        for (slot, p) in plans.iter().enumerate() {
            let case = &self.dataset.training[p.case];
            // A file truncated in place would raise SIGBUS on the read: report it instead (the
            // trainer skips the batch and counts it).
            case.image.check_unchanged()?;
            if let Some(label) = case.label.as_ref().filter(|_| slot < l) {
                label.check_unchanged()?;
            }
            extract(&case.image, &p.augment, self.cfg.patch, &mut host.images[slot * n..(slot + 1) * n])?;
            if slot < l {
                let label = case.label.as_ref().ok_or_else(|| {
                    DataError::invalid("dataset", format!("labelled case `{}` has no label", case.id))
                })?;
                extract(label, &p.augment, self.cfg.patch, &mut host.labels[slot * n..(slot + 1) * n])?;
            }
        }
        host.iteration = iteration;
        host.epoch = idx.epoch;
        host.patch = self.cfg.patch;
        host.plans = plans;
        host.labelled = l;
        Ok(())
    }

    /// Batch `iteration` as tensors: images `[b, 1, X, Y, Z]` float32, labels
    /// `[labelled, X, Y, Z]` int64.
    pub fn batch(&self, iteration: u64) -> Result<(Tensor, Tensor)> {
        let mut host = HostBatch::default();
        self.fill(iteration, &mut host)?;
        host.to_tensors()
    }
}

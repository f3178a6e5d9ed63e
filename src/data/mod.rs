//! Data: NIfTI volumes read in place through memory maps, dataset folders, importers,
//! synthetic data, augmentation and batch sampling.
//!
//! # Axis order
//! A whole volume ([`Volume`]) has shape `[X, Y, Z]` and is stored x fastest, as NIfTI and NRRD
//! store it on disk, so voxel `(x, y, z)` is at `x + X * (y + Y * z)`. UA-MT's HDF5 arrays
//! (`image[x][y][z]`, numpy C order) are transposed on import. Patches and batches are C order
//! (z fastest), the layout of tch tensors `[b, 1, X, Y, Z]`; [`Volume::to_tensor`] permutes.
//!
//! # Layout
//! - [`nifti`]: NIfTI-1 reading (memory-mapped; `.nii.gz` through a cache) and atomic writing, one
//!   file per concern (header, decoding, the `.gz` cache, writing).
//! - [`volume`]: [`Volume`] and its [`Geometry`] (affines, qform quaternions, orientation codes).
//! - [`nrrd`], [`h5`]: the readers the importers need.
//! - [`dataset`]: the dataset folder (`dataset.json`, `imagesTr/`, `labelsTr/`, ...).
//! - [`import`]: UA-MT HDF5 and 2018 challenge NRRD importers; [`synth`]: synthetic cases.
//! - [`import_raw`]: raw MSD / nnU-Net folders (normalisation from [`normalize`], resampling,
//!   crop, the labelled split), recorded in `preprocessing.json` for `uamt predict`.
//! - [`resample`]: trilinear / nearest resampling; [`parallel`]: per-voxel work (resampling,
//!   normalisation) split over every core with the same bits for any thread count.
//! - [`augment`]: rot90 + flip + padded random crop, cut straight from the mapped file.
//! - [`sampler`]: labelled-first batches, seeded per iteration, as tensors for the trainer.
//! - [`sigbus`]: the handler that ends the process with a clear message when a mapped file is
//!   truncated under it.
//! - [`fingerprint`]: what `uamt plan` decides from (shapes, voxel sizes, foreground, classes),
//!   cached in the dataset folder.
//! - [`stats`]: what `uamt info` prints. [`error`]: [`DataError`].

pub mod augment;
pub mod dataset;
pub mod error;
pub mod fingerprint;
pub mod h5;
pub mod import;
pub mod import_h5;
pub mod import_nrrd;
pub mod import_raw;
pub mod nifti;
pub mod normalize;
pub mod nrrd;
pub mod parallel;
pub mod preprocessing;
pub mod raw_source;
pub mod resample;
pub mod sampler;
pub mod sigbus;
pub mod stats;
pub mod synth;
pub mod volume;

pub use augment::{extract, Augment, VoxelSource};
pub use dataset::{Case, Dataset, DatasetOptions, Manifest};
pub use error::DataError;
pub use import::{ImportReport, Progress};
pub use import_h5::{import_h5, import_h5_with, H5Import};
pub use import_nrrd::{import_nrrd, import_nrrd_with, Margin, NrrdImport};
pub use nifti::{write_nifti, DType, GzCache, NiftiVolume};
pub use sampler::{BatchIndices, BatchSampler, HostBatch, LoaderConfig, PatchLoader, SamplerConfig};
pub use synth::{synth_case, write_synth, write_synth_with, SynthConfig};
pub use volume::{Geometry, Volume};

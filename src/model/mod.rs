//! The segmentation network and the named tensors it is made of.

mod layers;
pub mod params;
pub mod pickle;
pub mod tensorfile;
pub mod torchfile;
pub mod torchsave;
pub mod vnet;
pub mod weights;

pub use params::{Param, ParamStore};
pub use vnet::{Dropout, DropoutMasks, Init, Normalization, PassStatistics, VNet, VNetConfig};

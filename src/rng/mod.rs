//! Seeded random numbers shared by every layer: one SplitMix64 mixer, stream keys derived from a
//! seed and a path of integers, a counter-based generator made of tensor ops ([`tensor`]) and a
//! small stateful generator on the host ([`host`]). Nothing here depends on the model, the data or
//! the method, so all of them can draw from it.

pub mod host;
mod mix;
pub mod tensor;

pub use host::{stream, Rng};
pub use mix::{key, splitmix64, splitmix64_nth};
pub use tensor::{normal, uniform};

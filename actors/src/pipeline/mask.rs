//! Uncertainty/mask computer: the entropy of the mean Monte-Carlo softmax, the threshold for this
//! iteration, and the mask of voxels where the consistency counts (all ones for Mean Teacher).

use super::messages::TeacherPasses;
use uamt::train::{self, Guidance, StepConfig};

/// The mask computer's settings.
pub struct MaskComputer {
    /// Method, passes and schedule.
    cfg: StepConfig,
    /// Output classes (the threshold's scale is ln(classes)).
    n_classes: i64,
}

impl MaskComputer {
    /// A mask computer for `cfg` and a network with `n_classes` outputs.
    pub fn new(cfg: StepConfig, n_classes: i64) -> Self {
        MaskComputer { cfg, n_classes }
    }

    /// The guidance from one iteration's teacher passes.
    pub fn process(&self, passes: TeacherPasses) -> Guidance {
        train::guidance(passes.out, &self.cfg, self.n_classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};
    use uamt::gpu::Ready;
    use uamt::train::{Method, TeacherOutput};

    #[test]
    fn certain_voxels_count_and_uncertain_ones_do_not() {
        let mut cfg = StepConfig::of(Method::Uamt);
        cfg.method.mc_passes = 2;
        cfg.method.mc_repeats = 2;
        let m = MaskComputer::new(cfg, 2);
        // One unlabelled patch of two voxels; both passes agree confidently on voxel 0 and
        // disagree on voxel 1.
        let pass = |a: f32, b: f32| Tensor::from_slice(&[a, b, -a, -b]).view([1, 2, 2, 1, 1]);
        let mc = Tensor::cat(&[pass(8.0, 4.0), pass(8.0, -4.0)], 0);
        let out = TeacherOutput { iter: 0, target: pass(1.0, 1.0), mc: Some(mc) };
        let g = m.process(TeacherPasses { out, ready: Ready::now(Device::Cpu).unwrap() });
        let mask = Vec::<f32>::try_from(g.mask.to_kind(Kind::Float).reshape([-1])).unwrap();
        assert_eq!(mask, vec![1.0, 0.0]);
        assert!(g.uncertainty.is_some() && g.threshold.is_finite());
    }
}

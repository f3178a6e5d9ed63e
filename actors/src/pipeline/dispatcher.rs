//! Dispatcher: takes the loader workers' batches in iteration order, makes device tensors of them
//! and fans them out: the whole batch to the student, its unlabelled part to the teacher. An
//! unreadable batch is counted and replaced by the previous good one (the first one must be good).

use super::messages::{Batch, Unlabelled};
use crate::emit;
use anyhow::{anyhow, Result};
use tch::{Device, Tensor};
use uamt::data::HostBatch;
use uamt::gpu::Ready;

/// The dispatcher's state.
pub struct Dispatcher {
    /// Where the tensors go.
    device: Device,
    /// Labelled patches at the head of each batch.
    labelled_bs: i64,
    /// Whether a teacher wants the unlabelled part.
    with_teacher: bool,
    /// The last batch that could be read, reused for an unreadable one.
    last_good: Option<(Tensor, Tensor)>,
}

impl Dispatcher {
    /// A dispatcher for batches with `labelled_bs` labelled patches first.
    pub fn new(device: Device, labelled_bs: i64, with_teacher: bool) -> Self {
        Dispatcher { device, labelled_bs, with_teacher, last_good: None }
    }

    /// Iteration `iter`'s batch on the device, and its unlabelled part for the teacher.
    pub fn process(&mut self, iter: i64, item: Result<&HostBatch, &str>) -> Result<(Batch, Option<Unlabelled>)> {
        let (images, labels) = match item {
            Ok(host) => {
                let (im, lb) = host.to_tensors()?;
                let t = (im.to_device(self.device), lb.to_device(self.device));
                self.last_good = Some((t.0.shallow_clone(), t.1.shallow_clone()));
                t
            }
            Err(why) => {
                emit::skipped_case();
                tracing::warn!(iteration = iter, error = %why, "batch unreadable; reusing the previous batch");
                let (a, b) = self.last_good.as_ref().ok_or_else(|| anyhow!("the first batch is unreadable: {why}"))?;
                (a.shallow_clone(), b.shallow_clone())
            }
        };
        let unlabelled = if self.with_teacher {
            let u = images.narrow(0, self.labelled_bs, images.size()[0] - self.labelled_bs);
            Some(Unlabelled { iter, images: u, ready: Ready::now(self.device)? })
        } else {
            None
        };
        Ok((Batch { iter, images, labels, ready: Ready::now(self.device)? }, unlabelled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> uamt::data::sampler::PatchPlan {
        let augment = uamt::data::Augment { k: 0, flip: None, pad: [0; 3], offset: [0; 3] };
        uamt::data::sampler::PatchPlan { case: 0, augment }
    }

    fn host(v: f32) -> HostBatch {
        HostBatch {
            patch: [2, 2, 1],
            plans: vec![plan(); 3],
            labelled: 1,
            images: vec![v; 12],
            labels: vec![1; 4],
            ..HostBatch::default()
        }
    }

    #[test]
    fn splits_the_unlabelled_part_off_for_the_teacher() {
        let mut d = Dispatcher::new(Device::Cpu, 1, true);
        let (b, u) = d.process(7, Ok(&host(0.5))).unwrap();
        assert_eq!((b.iter, b.images.size(), b.labels.size()), (7, vec![3, 1, 2, 2, 1], vec![1, 2, 2, 1]));
        let u = u.unwrap();
        assert_eq!((u.iter, u.images.size()), (7, vec![2, 1, 2, 2, 1]));
        let (_, none) = Dispatcher::new(Device::Cpu, 1, false).process(0, Ok(&host(0.5))).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn an_unreadable_batch_reuses_the_last_good_one_but_not_the_first() {
        let mut d = Dispatcher::new(Device::Cpu, 1, true);
        assert!(d.process(0, Err("truncated")).is_err());
        d.process(1, Ok(&host(0.25))).unwrap();
        let (b, _) = d.process(2, Err("truncated")).unwrap();
        assert_eq!(b.iter, 2);
        assert_eq!(b.images.double_value(&[0, 0, 0, 0, 0]), 0.25);
    }
}

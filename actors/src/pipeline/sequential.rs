//! The sequential mode: the pipeline's stage types called one after the other on one thread, no
//! queues. It is the ground truth the pipeline is tested against (equal bit for bit at any
//! `teacher_lag`), and the faster choice where overlap does not pay (a CPU whose cores one
//! stage's kernels already fill).

use super::dispatcher::Dispatcher;
use super::loader::LoaderWorker;
use super::mask::MaskComputer;
use super::messages::{Batch, Named, TeacherPasses, Unlabelled};
use super::student::Upstream;
use super::teacher::{TeacherSampler, TeacherState};
use anyhow::{anyhow, Result};
use tch::{Device, Tensor};
use uamt::data::HostBatch;
use uamt::gpu::Ready;
use uamt::train::Guidance;

/// The teacher's stages, in line.
pub struct TeacherSide {
    /// Weights, buffers, queued EMA inputs.
    pub state: TeacherState,
    /// The passes.
    pub sampler: TeacherSampler,
    /// Uncertainty and mask.
    pub mask: MaskComputer,
}

/// Every stage but the student's, called in line.
pub struct InLine {
    /// Cuts the batches (one worker takes every iteration).
    pub loader: LoaderWorker,
    /// The reused host buffer.
    pub host: Option<HostBatch>,
    /// Makes the device tensors.
    pub dispatcher: Dispatcher,
    /// Absent for supervised training.
    pub teacher: Option<TeacherSide>,
    /// The current batch's unlabelled part, until the teacher has used it.
    pub unlabelled: Option<Unlabelled>,
    /// Where the tensors live.
    pub device: Device,
    /// A stage to fail on purpose (lifecycle tests).
    pub fault: Option<super::fault::Fault>,
}

impl Upstream for InLine {
    fn batch(&mut self, iter: i64) -> Result<Batch> {
        super::fault::check(&self.fault, "dispatcher", iter);
        let host = self.host.take().unwrap_or_default();
        let (got, item) = self.loader.process(iter, host);
        debug_assert_eq!(got, iter);
        let (batch, unl) = match item {
            Ok(host) => {
                let r = self.dispatcher.process(iter, Ok(&host));
                self.host = Some(host);
                r?
            }
            Err(why) => self.dispatcher.process(iter, Err(&why))?,
        };
        self.unlabelled = unl;
        Ok(batch)
    }

    fn guidance(&mut self, iter: i64) -> Result<Option<Guidance>> {
        let Some(t) = &mut self.teacher else { return Ok(None) };
        let u = self.unlabelled.take().ok_or_else(|| anyhow!("no unlabelled patches for iteration {iter}"))?;
        if !t.state.catch_up(t.sampler.needs(iter))? {
            return Err(anyhow!("the teacher for iteration {iter} needs a student step that has not run"));
        }
        super::fault::check(&self.fault, "teacher", iter);
        let out = t.sampler.process(&t.state, iter, &u.images)?;
        t.state.record_buffers(iter);
        Ok(Some(t.mask.process(TeacherPasses { out, ready: Ready::now(self.device)? })))
    }

    fn publish(&mut self, step: i64, params: Vec<Tensor>) -> Result<()> {
        match &mut self.teacher {
            Some(t) => t.state.offer(step, params),
            None => Ok(()),
        }
    }

    fn snapshot(&mut self, last_step: i64) -> Result<Option<Named>> {
        self.teacher.as_ref().map(|t| t.state.snapshot(last_step)).transpose()
    }
}

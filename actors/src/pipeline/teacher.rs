//! The teacher's side: [`TeacherState`] is the one owner of the teacher network (EMA weights and
//! BatchNorm buffers); [`TeacherSampler`] runs the 1 + T noisy passes for an iteration on it; the
//! stage loop [`run`] interleaves the EMA inputs, the unlabelled batches and snapshot requests.
//!
//! Determinism: the student's parameters are queued as they arrive and folded in (by the
//! [`EmaUpdater`]) only when an iteration needs that version (EMA after step i - 1 - lag), so
//! the order in which the two queues deliver never changes a number.

use super::ema::EmaUpdater;
use super::messages::{Named, TeacherPasses, ToTeacher, Unlabelled};
use super::spawn::StageCtx;
use crate::queue::{recv_either, Closed, Either, Rx, Tx};
use anyhow::{anyhow, Result};
use std::collections::VecDeque;
use tch::{Device, Tensor};
use uamt::checkpoint::host_copy;
use uamt::gpu::Ready;
use uamt::model::{VNet, VNetConfig};
use uamt::train::{self, PassWorkers, StepConfig, StepRandom, TeacherOutput};

/// The teacher network and which EMA version it holds, plus the EMA inputs not folded in yet.
pub struct TeacherState {
    /// The network: trainable weights (the EMA) and BatchNorm buffers (from its own passes).
    net: VNet,
    /// Shallow handles of `net`'s trainable weights, in store order.
    weights: Vec<Tensor>,
    /// The student step whose EMA the weights hold (start - 1 for the weights a run begins with).
    version: i64,
    /// Student parameters received but not folded in yet, oldest first.
    pending: VecDeque<(i64, Vec<Tensor>)>,
    /// Copies of the BatchNorm buffers after each recent iteration's passes (a few KB each):
    /// a checkpoint after student step i holds the buffers after the passes of iteration i,
    /// although the teacher may already have sampled later iterations.
    buffers_after: VecDeque<(i64, Vec<Tensor>)>,
    /// The update rule.
    ema: EmaUpdater,
    /// Data-parallel runs: the group and interval of the cross-rank check of the weights.
    pub check: Option<(std::sync::Arc<uamt::dist::Group>, i64)>,
}

impl TeacherState {
    /// Owns `net`, which holds the EMA after student step `version`.
    pub fn new(net: VNet, version: i64, ema: EmaUpdater) -> Self {
        let weights = net.store().trainable().map(|p| p.tensor.shallow_clone()).collect();
        TeacherState {
            net,
            weights,
            version,
            pending: VecDeque::new(),
            buffers_after: VecDeque::new(),
            ema,
            check: None,
        }
    }

    /// The network (for the sampler's passes).
    pub fn net(&self) -> &VNet {
        &self.net
    }

    /// The student step whose EMA the weights hold.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Queues the student's parameters after step `step` (folded in when needed).
    pub fn offer(&mut self, step: i64, params: Vec<Tensor>) -> Result<()> {
        if self.pending.back().map_or(self.version, |(s, _)| *s) >= step {
            return Err(anyhow!("student step {step} arrived out of order (have {})", self.version));
        }
        self.pending.push_back((step, params));
        // No snapshot will ask for the buffers of an iteration before this step any more.
        while self.buffers_after.front().is_some_and(|(i, _)| *i < step) {
            self.buffers_after.pop_front();
        }
        Ok(())
    }

    /// Keeps a copy of the BatchNorm buffers as they are after iteration `iter`'s passes.
    pub fn record_buffers(&mut self, iter: i64) {
        let copies = tch::no_grad(|| self.net.store().buffers().map(|p| p.tensor.detach().copy()).collect());
        self.buffers_after.push_back((iter, copies));
    }

    /// Folds queued steps in until the weights are the EMA after step `need` (or later); false
    /// when that step has not arrived yet.
    pub fn catch_up(&mut self, need: i64) -> Result<bool> {
        while self.version < need {
            let Some((step, params)) = self.pending.pop_front() else { return Ok(false) };
            self.ema.process(&self.weights, &params, step)?;
            self.version = step;
            if let Some((group, every)) = &self.check {
                if *every > 0 && (step + 1) % every == 0 {
                    // Every rank folds the same steps in the same order: the checks line up.
                    let named: Vec<(String, Tensor)> = self
                        .net
                        .store()
                        .trainable()
                        .zip(&self.weights)
                        .map(|(p, w)| (p.name.clone(), w.shallow_clone()))
                        .collect();
                    uamt::dist::agree(group, "teacher (EMA) weights", step, &named)?;
                }
            }
        }
        Ok(true)
    }

    /// Folds in everything queued.
    pub fn finish(&mut self) -> Result<()> {
        self.catch_up(i64::MAX).map(|_| ())
    }

    /// Host copies of the whole teacher as a checkpoint after student step `last_step` holds
    /// it: the EMA after every queued step (applied to copies, so the live weights, which a lag
    /// may still need, are untouched) and the BatchNorm buffers after iteration `last_step`'s
    /// passes (the live ones when that iteration was not recorded).
    pub fn snapshot(&self, last_step: i64) -> Result<Named> {
        let weights: Vec<Tensor> = tch::no_grad(|| self.weights.iter().map(|t| t.detach().copy()).collect());
        for (step, params) in &self.pending {
            self.ema.process(&weights, params, *step)?;
        }
        let recorded = self.buffers_after.iter().find(|(i, _)| *i == last_step).map(|(_, b)| b);
        let (mut w, mut b) = (weights.iter(), recorded.map(|b| b.iter()));
        self.net
            .store()
            .iter()
            .map(|p| {
                let t = if p.trainable {
                    w.next().ok_or_else(|| anyhow!("teacher weights do not match"))?
                } else {
                    match &mut b {
                        Some(b) => b.next().ok_or_else(|| anyhow!("teacher buffers do not match"))?,
                        None => &p.tensor,
                    }
                };
                Ok((p.name.clone(), host_copy(t)))
            })
            .collect()
    }

    /// Gives the network back (after [`TeacherState::finish`], the EMA after the last step).
    pub fn into_net(self) -> VNet {
        self.net
    }
}

/// The teacher's passes for one iteration.
pub struct TeacherSampler {
    /// Method, passes, noise.
    cfg: StepConfig,
    /// The network's shape (for the dropout masks).
    net: VNetConfig,
    /// The run's seed: the noise and masks of iteration i come from (seed, i).
    seed: u64,
    /// Iteration i uses the EMA after step i - 1 - lag.
    lag: i64,
    /// Where the randomness is drawn.
    device: Device,
    /// How many passes run at once.
    workers: PassWorkers,
}

impl TeacherSampler {
    /// A sampler for `cfg` on a network shaped `net`, its passes run as `workers` says.
    pub fn new(cfg: StepConfig, net: VNetConfig, seed: u64, lag: i64, device: Device, workers: PassWorkers) -> Self {
        TeacherSampler { cfg, net, seed, lag, device, workers }
    }

    /// The student step whose EMA iteration `iter`'s passes use.
    pub fn needs(&self, iter: i64) -> i64 {
        iter - 1 - self.lag
    }

    /// The noisy target pass and the Monte-Carlo passes of iteration `iter` on `unlabelled`.
    pub fn process(&self, state: &TeacherState, iter: i64, unlabelled: &Tensor) -> Result<TeacherOutput> {
        if state.version() < self.needs(iter) {
            return Err(anyhow!("iteration {iter} sampled before the teacher it needs"));
        }
        let (t, mc) = StepRandom::draw_teacher(&self.net, self.device, &self.cfg, self.seed, iter, &unlabelled.size());
        let t = t.ok_or_else(|| anyhow!("teacher randomness missing (supervised method?)"))?;
        Ok(train::teacher_passes_on(state.net(), &self.cfg, iter, unlabelled, &t, &mc, self.workers)?)
    }
}

/// Handles one message from the student: queues its parameters or answers a snapshot request.
fn handle(state: &mut TeacherState, msg: ToTeacher, device: Device) -> Result<()> {
    match msg {
        ToTeacher::Params { step, params, ready } => {
            ready.wait(device, &params)?;
            state.offer(step, params)
        }
        ToTeacher::Snapshot { last_step, reply } => {
            let _ = reply.send(state.snapshot(last_step).map_err(|e| format!("{e:#}")));
            Ok(())
        }
    }
}

/// The teacher stage: owns `state`, samples every unlabelled batch with the version it needs,
/// answers snapshot requests at any time; gives the network back (EMA after the last step) when
/// both of its input queues have closed.
pub fn run(
    ctx: &StageCtx,
    mut state: TeacherState,
    sampler: TeacherSampler,
    unlabelled: Rx<Unlabelled>,
    from_student: Rx<ToTeacher>,
    out: Tx<TeacherPasses>,
    fault: &Option<super::fault::Fault>,
) -> Result<VNet> {
    let (stage, device) = (&ctx.stage, ctx.device);
    let mut out = Some(out);
    loop {
        let (item, blocked) = match recv_either(&unlabelled, &from_student) {
            Ok(x) => x,
            Err(Closed) => break,
        };
        stage.idle(blocked);
        match item {
            Either::Right(msg) => handle(&mut state, msg, device)?,
            Either::Left(u) => {
                if out.is_none() {
                    continue; // the mask computer is gone: the run is ending, only answer the student
                }
                u.ready.wait(device, [&u.images])?;
                let need = sampler.needs(u.iter);
                while !state.catch_up(need)? {
                    match from_student.recv() {
                        Ok((msg, b)) => {
                            stage.idle(b);
                            handle(&mut state, msg, device)?;
                        }
                        // The student stopped before the step this iteration needs: the run is
                        // ending; nothing to sample any more.
                        Err(Closed) => {
                            state.finish()?;
                            return Ok(state.into_net());
                        }
                    }
                }
                super::fault::check(fault, "teacher", u.iter);
                let passes = stage.busy(|| -> Result<TeacherPasses> {
                    let out = sampler.process(&state, u.iter, &u.images)?;
                    state.record_buffers(u.iter);
                    Ok(TeacherPasses { out, ready: Ready::now(device)? })
                })?;
                let Some(tx) = &out else { continue };
                match tx.send(passes) {
                    Ok(b) => stage.idle(b),
                    Err(Closed) => out = None,
                }
                stage.done();
            }
        }
    }
    state.finish()?;
    Ok(state.into_net())
}

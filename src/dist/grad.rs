//! What DistributedDataParallel does around a step ([`GradSync`]), and the checks that keep the
//! ranks' teachers equal.

use super::world::{
    uamt_dist_reducer_arm, uamt_dist_reducer_finish, uamt_dist_reducer_free, uamt_dist_reducer_new, Group, Reduce,
    World,
};
use crate::model::ParamStore;
use crate::{Error, Result};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Packs `tensors` (each flattened, in order) into one new fp32 buffer on the host with `extra`
/// more elements at the end. One copy per tensor, whatever its device or kind: Gloo reduces host
/// memory (CUDA tensors are staged through it).
fn pack(tensors: &[Tensor], extra: i64) -> Result<Tensor> {
    let total: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    let flat = Tensor::f_empty([total + extra], (Kind::Float, tch::Device::Cpu))?;
    tch::no_grad(|| -> Result<()> {
        let mut at = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            flat.narrow(0, at, n).f_copy_(&t.detach().reshape([-1]))?;
            at += n;
        }
        Ok(())
    })?;
    Ok(flat)
}

/// Copies a packed buffer back into `tensors` (each keeps its shape, kind and device).
fn unpack(flat: &Tensor, tensors: &[Tensor]) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let mut at = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            t.shallow_clone().f_copy_(&flat.narrow(0, at, n).view(t.size().as_slice()))?;
            at += n;
        }
        Ok(())
    })
}

/// Broadcasts `tensors` from rank 0 in buckets of about `bucket_bytes`.
pub fn broadcast_all(group: &Group, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
    for bucket in buckets(tensors, bucket_bytes) {
        let part: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].shallow_clone()).collect();
        let flat = pack(&part, 0)?;
        group.broadcast(&flat, 0)?;
        unpack(&flat, &part)?;
    }
    Ok(())
}

/// Splits tensor indices into consecutive runs of at most about `bucket_bytes` (fp32) each;
/// a tensor larger than a bucket is a bucket of its own.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut size = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.numel() * 4;
        if out.is_empty() || (size + bytes > bucket_bytes && !out.last().is_some_and(|b| b.is_empty())) {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("pushed").push(i);
        size += bytes;
    }
    out
}

/// The student's side of a data-parallel step (see the module docs).
pub struct GradSync {
    group: Arc<Group>,
    bucket_bytes: usize,
    broadcast_buffers: bool,
    /// This rank's stop request (the daemon's stop switch).
    stop: Arc<AtomicBool>,
    /// Whether any rank asked to stop, as of the last step's vote.
    agreed_stop: bool,
    /// The all-reduce started during backward (see [`GradSync::overlapping`]).
    overlap: Option<Overlap>,
}

/// The shim's reducer: hooks on the parameters that launch each bucket's all-reduce as soon as
/// backward has produced its gradients.
struct Overlap {
    ptr: *mut c_void,
    /// Keeps the parameter handles (and their hooks' owner) alive.
    _params: Vec<Tensor>,
}

// SAFETY: the reducer is used by the thread that runs the step (and by libtorch's autograd on
// that thread's behalf); it guards its own state with a mutex.
unsafe impl Send for Overlap {}

impl Drop for Overlap {
    fn drop(&mut self) {
        // SAFETY: made by uamt_dist_reducer_new and freed once (its hooks removed).
        unsafe { uamt_dist_reducer_free(self.ptr) }
    }
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("rank", &self.group.rank)
            .field("world", &self.group.world)
            .field("bucket_bytes", &self.bucket_bytes)
            .field("agreed_stop", &self.agreed_stop)
            .finish()
    }
}

impl GradSync {
    /// The step's collectives on `world.step`; `stop` is this rank's stop switch, voted on with
    /// every step's last gradient bucket.
    pub fn new(world: &World, stop: Arc<AtomicBool>) -> Self {
        GradSync { stop, ..Self::on(world.step.clone(), world.cfg.bucket_mb, world.cfg.broadcast_buffers) }
    }

    /// Without a stop switch of its own (tests, library use).
    pub fn on(group: Arc<Group>, bucket_mb: f64, broadcast_buffers: bool) -> Self {
        GradSync {
            group,
            bucket_bytes: (bucket_mb * 1024.0 * 1024.0) as usize,
            broadcast_buffers,
            stop: Arc::new(AtomicBool::new(false)),
            agreed_stop: false,
            overlap: None,
        }
    }

    /// Starts each gradient bucket's all-reduce during the backward pass, as soon as its
    /// gradients are computed (hooks on `store`'s trainable tensors), instead of after it. The
    /// buckets then run in reverse parameter order; the means are the same.
    pub fn overlapping(mut self, store: &ParamStore) -> Result<Self> {
        let params: Vec<Tensor> = store.trainable().map(|p| p.tensor.shallow_clone()).collect();
        let mut ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut ptr = std::ptr::null_mut();
        let bytes = self.bucket_bytes.min(i64::MAX as usize) as i64;
        // SAFETY: live tensor handles and group; valid out-pointer.
        let rc = unsafe {
            uamt_dist_reducer_new(
                self.group.ptr,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                bytes,
                self.group.timeout_ms,
                &mut ptr,
            )
        };
        self.group.check("setting up the gradient reducer", rc)?;
        self.overlap = Some(Overlap { ptr, _params: params });
        Ok(self)
    }

    /// Before the backward pass: arms the overlapping reducer with this rank's stop vote (a
    /// no-op without one).
    pub fn before_backward(&mut self) -> Result<()> {
        if let Some(o) = &self.overlap {
            let vote = if self.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 };
            // SAFETY: a live reducer.
            let rc = unsafe { uamt_dist_reducer_arm(o.ptr, vote) };
            self.group.check("arming the gradient reducer", rc)?;
        }
        Ok(())
    }

    /// Before the forward pass: rank 0's floating-point buffers (BatchNorm running statistics)
    /// on every rank, when `broadcast_buffers`.
    pub fn before_forward(&self, store: &ParamStore) -> Result<()> {
        if !self.broadcast_buffers {
            return Ok(());
        }
        let bufs: Vec<Tensor> =
            store.buffers().filter(|p| p.tensor.kind() != Kind::Int64).map(|p| p.tensor.shallow_clone()).collect();
        if bufs.is_empty() {
            return Ok(());
        }
        broadcast_all(&self.group, &bufs, usize::MAX)
    }

    /// After the backward pass: every trainable parameter's gradient replaced by the mean over
    /// the ranks (divided by the world size, then summed, as DistributedDataParallel does), and
    /// the stop vote taken.
    pub fn after_backward(&mut self, store: &ParamStore) -> Result<()> {
        if let Some(o) = &self.overlap {
            let mut vote = 0f32;
            // SAFETY: a live reducer, armed by before_backward.
            let rc = unsafe { uamt_dist_reducer_finish(o.ptr, &mut vote) };
            self.group.check("all-reduce of the gradients (started during backward)", rc)?;
            self.agreed_stop = vote > 0.0;
            return Ok(());
        }
        let world = self.group.world as f64;
        let grads: Vec<Tensor> = store
            .trainable()
            .map(|p| {
                let g = p.tensor.grad();
                // Every parameter of the V-Net gets a gradient; one without would contribute
                // zeros here (keeping the buckets alike on every rank) and keep no mean.
                if g.defined() {
                    g
                } else {
                    p.tensor.zeros_like()
                }
            })
            .collect();
        let plan = buckets(&grads, self.bucket_bytes);
        let last = plan.len().saturating_sub(1);
        let mut any_stop = false;
        for (b, bucket) in plan.iter().enumerate() {
            let part: Vec<Tensor> = bucket.iter().map(|&i| grads[i].shallow_clone()).collect();
            // The last bucket carries the stop vote in one more element.
            let vote = usize::from(b == last) as i64;
            let mut flat = pack(&part, vote)?;
            if b == last {
                let n = flat.size()[0];
                let _ = flat.get(n - 1).f_fill_(if self.stop.load(Ordering::SeqCst) { world } else { 0.0 })?;
            }
            let _ = flat.f_div_scalar_(world)?;
            self.group.all_reduce(&flat, Reduce::Sum)?;
            if b == last {
                any_stop = flat.double_value(&[flat.size()[0] - 1]) > 0.5;
            }
            unpack(&flat, &part)?;
        }
        self.agreed_stop = any_stop;
        Ok(())
    }

    /// Whether some rank asked to stop, as of the last step: every rank reads the same answer
    /// after the same step.
    pub fn agreed_stop(&self) -> bool {
        self.agreed_stop
    }

    /// The group.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }
}

/// The step calls the collectives through its hook ([`crate::train::GradientHook`]).
impl crate::train::GradientHook for GradSync {
    fn before_forward(&self, store: &ParamStore) -> Result<()> {
        GradSync::before_forward(self, store)
    }

    fn before_backward(&mut self) -> Result<()> {
        GradSync::before_backward(self)
    }

    fn after_backward(&mut self, store: &ParamStore) -> Result<()> {
        GradSync::after_backward(self, store)
    }

    fn agreed_stop(&self) -> bool {
        GradSync::agreed_stop(self)
    }
}

/// Compares `tensors` across the ranks: per tensor a float64 sum and sum of squares, reduced
/// by minimum and maximum; any difference is an error naming `what`, the step and the first
/// tensor that differs.
pub fn agree(group: &Group, what: &str, step: i64, named: &[(String, Tensor)]) -> Result<()> {
    // Per tensor its sum and sum of squares in float64, stacked on its device: one copy to
    // the host for all of them.
    let sums: Vec<f64> = tch::no_grad(|| -> Result<Vec<f64>> {
        let parts: Vec<Tensor> = named
            .iter()
            .flat_map(|(_, t)| {
                let d = t.detach().to_kind(Kind::Double);
                [d.sum(Kind::Double), (&d * &d).sum(Kind::Double)]
            })
            .map(|t| t.to_device(tch::Device::Cpu))
            .collect();
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(Vec::<f64>::try_from(&Tensor::f_stack(&parts, 0)?)?)
    })?;
    let lo = Tensor::from_slice(&sums);
    let hi = lo.copy();
    group.all_reduce(&lo, Reduce::Min)?;
    group.all_reduce(&hi, Reduce::Max)?;
    let (lo, hi): (Vec<f64>, Vec<f64>) = (Vec::try_from(&lo)?, Vec::try_from(&hi)?);
    for (k, (a, b)) in lo.iter().zip(&hi).enumerate() {
        // NaN never equals itself: a NaN anywhere is a disagreement too.
        if !(a == b) {
            let name = &named[k / 2].0;
            return Err(Error::Distributed(format!(
                "after step {step} the {what} differ between ranks at `{name}` (checksums from {a:e} to {b:e}); \
                 the ranks no longer train the same model"
            )));
        }
    }
    Ok(())
}

/// Makes every rank start from rank 0's state: the iteration, the student's and the teacher's
/// tensors (BatchNorm statistics included) and the momentum buffers. Rank 0 may have resumed
/// from a checkpoint the others never read (it need only be on rank 0's disk).
pub fn share_start(group: &Group, tr: &mut crate::train::Trainer) -> Result<()> {
    let it = Tensor::from_slice(&[tr.iter]);
    group.broadcast(&it, 0)?;
    tr.iter = it.int64_value(&[0]);
    let mut all: Vec<Tensor> = tr.student.store().iter().map(|p| p.tensor.shallow_clone()).collect();
    if let Some(t) = &tr.teacher {
        all.extend(t.store().iter().map(|p| p.tensor.shallow_clone()));
    }
    all.extend(tr.opt.buffers().iter().map(|(_, t)| t.shallow_clone()));
    // Integer buffers (BatchNorm's batch counters) travel as float32: exact below 2^24.
    broadcast_all(group, &all, 25 << 20)
}

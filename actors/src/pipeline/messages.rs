//! What travels between the pipeline's stages. Every message that carries device tensors also
//! carries a [`Ready`] event: the receiving stage's stream waits on it before touching them.

use tch::Tensor;
use uamt::gpu::Ready;
use uamt::train::{Guidance, TeacherOutput};

/// A batch cut by a loader worker for iteration `iter`, or why it could not be cut.
pub type Loaded = (i64, std::result::Result<uamt::data::HostBatch, String>);

/// A training batch on the device: `labelled_bs` labelled patches first, then the unlabelled.
pub struct Batch {
    /// The iteration it is for.
    pub iter: i64,
    /// `[b, 1, X, Y, Z]` intensities.
    pub images: Tensor,
    /// `[labelled_bs, X, Y, Z]` classes.
    pub labels: Tensor,
    /// When the tensors above are complete on the dispatcher's stream.
    pub ready: Ready,
}

/// The unlabelled part of a batch, for the teacher.
pub struct Unlabelled {
    /// The iteration it is for.
    pub iter: i64,
    /// `[u, 1, X, Y, Z]` intensities.
    pub images: Tensor,
    /// When `images` is complete on the dispatcher's stream.
    pub ready: Ready,
}

/// The teacher's raw passes for one iteration, for the uncertainty/mask computer.
pub struct TeacherPasses {
    /// Target logits and Monte-Carlo logits.
    pub out: TeacherOutput,
    /// When they are complete on the teacher's stream.
    pub ready: Ready,
}

/// What the student waits for before its loss: the consistency target and where it counts.
pub struct GuidanceMsg {
    /// The iteration it is for.
    pub iter: i64,
    /// Target, mask, uncertainty and threshold.
    pub guidance: Guidance,
    /// When the tensors are complete on the mask computer's stream.
    pub ready: Ready,
}

/// Host copies of a network's named tensors (parameters and buffers, store order).
pub type Named = Vec<(String, Tensor)>;

/// What the student sends to the teacher's owner.
pub enum ToTeacher {
    /// The student's trainable parameters after step `step`: input of the EMA for that step.
    Params {
        /// The student step these parameters come from.
        step: i64,
        /// In store order; copies, or (with `teacher_lag = 0`, where the student cannot change
        /// them before the teacher has used them) the live tensors.
        params: Vec<Tensor>,
        /// When they are complete on the student's stream.
        ready: Ready,
    },
    /// A copy of the teacher's whole state (EMA after every step sent so far, BatchNorm buffers)
    /// for a checkpoint.
    Snapshot {
        /// The student's last completed step (whose passes' BatchNorm buffers the copy holds).
        last_step: i64,
        /// Where the answer goes.
        reply: crossbeam_channel::Sender<std::result::Result<Named, String>>,
    },
}

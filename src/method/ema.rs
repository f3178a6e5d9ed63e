//! The mean teacher: an exponential moving average of the student's parameters (not its
//! BatchNorm buffers, which the teacher keeps from its own forward passes).

use crate::model::ParamStore;
use crate::{Error, Result};
use tch::Tensor;

/// `min(1 - 1/(step + 1), decay)`: 0 at step 0, so the first update copies the student.
pub fn ema_alpha(step: i64, decay: f64) -> f64 {
    (1.0 - 1.0 / (step as f64 + 1.0)).min(decay)
}

/// `teacher = alpha * teacher + (1 - alpha) * student` over trainable parameters, in place.
pub fn ema_update(teacher: &ParamStore, student: &ParamStore, step: i64, decay: f64) -> Result<()> {
    if let Some((t, s)) = teacher.trainable().zip(student.trainable()).find(|(t, s)| t.name != s.name) {
        return Err(Error::invalid("ema", format!("parameter order differs: {} vs {}", t.name, s.name)));
    }
    let t: Vec<Tensor> = teacher.trainable().map(|p| p.tensor.shallow_clone()).collect();
    let s: Vec<Tensor> = student.trainable().map(|p| p.tensor.shallow_clone()).collect();
    ema_update_tensors(&t, &s, step, decay)
}

/// The same update on parallel lists of tensors (the pipeline's EMA updater keeps its own).
pub fn ema_update_tensors(teacher: &[Tensor], student: &[Tensor], step: i64, decay: f64) -> Result<()> {
    if teacher.len() != student.len() {
        return Err(Error::invalid(
            "ema",
            format!("{} teacher tensors, {} student tensors", teacher.len(), student.len()),
        ));
    }
    let alpha = ema_alpha(step, decay);
    tch::no_grad(|| -> Result<()> {
        for (t, s) in teacher.iter().zip(student) {
            let mut tt = t.shallow_clone();
            let _ = tt.f_mul_scalar_(alpha)?;
            let _ = tt.f_add_(&(s * (1.0 - alpha)))?;
        }
        Ok(())
    })
}

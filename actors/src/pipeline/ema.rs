//! EMA updater: teacher = alpha * teacher + (1 - alpha) * student over the trainable parameters,
//! in place on the weights [`super::teacher::TeacherState`] owns. It runs on the teacher's
//! thread, exactly when the teacher needs the version: the teacher of iteration i is the EMA after
//! student step i - 1 - teacher_lag, whatever order the messages arrive in.

use anyhow::Result;
use tch::Tensor;

/// The EMA's setting.
#[derive(Debug, Clone, Copy)]
pub struct EmaUpdater {
    /// Ceiling of the EMA decay (the recipe's 0.99).
    pub decay: f64,
}

impl EmaUpdater {
    /// Folds the student's parameters after step `step` into `teacher` (same order, same shapes).
    pub fn process(&self, teacher: &[Tensor], student: &[Tensor], step: i64) -> Result<()> {
        Ok(uamt::method::ema_update_tensors(teacher, student, step, self.decay)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_update_copies_the_student_and_later_ones_average() {
        let t = [Tensor::from_slice(&[0.0f32, 0.0])];
        let s = [Tensor::from_slice(&[1.0f32, 2.0])];
        let ema = EmaUpdater { decay: 0.99 };
        ema.process(&t, &s, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t[0]).unwrap(), vec![1.0, 2.0]);
        let s2 = [Tensor::from_slice(&[3.0f32, 2.0])];
        ema.process(&t, &s2, 1).unwrap(); // alpha = min(1 - 1/2, 0.99) = 0.5
        assert_eq!(Vec::<f32>::try_from(&t[0]).unwrap(), vec![2.0, 2.0]);
    }
}

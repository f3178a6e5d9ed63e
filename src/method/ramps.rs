//! Ramps and schedules: the sigmoid ramp-up, the consistency weight, the uncertainty threshold
//! and the step learning rate. All pure functions of the iteration counter.

/// `exp(-5 (1 - clip(t, 0, L) / L)^2)`, and 1 when `L == 0` (Laine and Aila's ramp-up).
pub fn sigmoid_rampup(current: f64, length: f64) -> f64 {
    if length == 0.0 {
        return 1.0;
    }
    let phase = 1.0 - current.clamp(0.0, length) / length;
    (-5.0 * phase * phase).exp()
}

/// Consistency weight at iteration `iter`: `scale * sigmoid_rampup(iter // interval, rampup)`
/// (the recipe: scale 0.1, interval 150, ramp-up 40, i.e. 6000 iterations).
pub fn consistency_weight(iter: i64, scale: f64, interval: i64, rampup: f64) -> f64 {
    scale * sigmoid_rampup((iter / interval.max(1)) as f64, rampup)
}

/// Uncertainty threshold at iteration `iter`: `(0.75 + 0.25 * sigmoid_rampup(iter, max_iter)) * ln C`.
pub fn threshold(iter: i64, max_iter: i64, n_classes: i64) -> f64 {
    (0.75 + 0.25 * sigmoid_rampup(iter as f64, max_iter as f64)) * (n_classes as f64).ln()
}

/// Learning rate used by the step at (0-based) iteration `iter`: `base * gamma^(iter // step)`.
/// The reference multiplies by 0.1 whenever the counter, incremented after a step, is a multiple
/// of 2500, so steps 0..=2499 use `base` and step 2500 is the first with `base * 0.1`.
pub fn learning_rate(iter: i64, base: f64, step: i64, gamma: f64) -> f64 {
    if step <= 0 {
        return base;
    }
    base * gamma.powi((iter / step) as i32)
}

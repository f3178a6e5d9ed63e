//! Loss terms (the uncertainty they mask by is [`crate::uncertainty`]'s). Shapes: logits `[b, C, X, Y, Z]`, labels
//! `[b, X, Y, Z]` (int64 class indices).

use tch::{Kind, Reduction, Tensor};

/// Mean voxel-wise cross-entropy of `logits` against integer `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, 0.0)
}

/// Soft Dice loss with squared denominators:
/// `1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5)`, `p` a probability map, `g` binary.
pub fn dice_loss(prob: &Tensor, target: &Tensor) -> Tensor {
    let smooth = 1e-5;
    let g = target.to_kind(Kind::Float);
    let intersect = (prob * &g).sum(Kind::Float);
    let y_sum = (&g * &g).sum(Kind::Float);
    let z_sum = (prob * prob).sum(Kind::Float);
    1.0 - (intersect * 2.0 + smooth) / (z_sum + y_sum + smooth)
}

/// The supervised terms of a labelled batch, kept apart for reporting.
#[derive(Debug)]
pub struct Supervised {
    /// Mean cross-entropy.
    pub ce: Tensor,
    /// Dice loss; for more than two classes the mean over the foreground classes.
    pub dice: Tensor,
    /// `0.5 * (ce + dice)`.
    pub loss: Tensor,
}

/// `0.5 * (CE + Dice)` on labelled logits; Dice on the foreground softmax (class 1 when C = 2).
pub fn supervised_loss(logits: &Tensor, labels: &Tensor) -> Supervised {
    let ce = cross_entropy(logits, labels);
    let soft = logits.softmax(1, Kind::Float);
    let n_classes = logits.size()[1];
    // Foreground classes summed left to right, out of place (autograd keeps every term).
    let dice = (2..n_classes)
        .fold(dice_loss(&soft.select(1, 1), &labels.eq(1)), |d, c| d + dice_loss(&soft.select(1, c), &labels.eq(c)));
    let dice = if n_classes > 2 { dice / (n_classes - 1) as f64 } else { dice };
    let loss = (&ce + &dice) * 0.5;
    Supervised { ce, dice, loss }
}

/// Squared difference of the two softmaxes, per voxel and class: `[b, C, X, Y, Z]`.
pub fn softmax_mse(student_logits: &Tensor, teacher_logits: &Tensor) -> Tensor {
    let d = student_logits.softmax(1, Kind::Float) - teacher_logits.softmax(1, Kind::Float);
    &d * &d
}

/// `sum(mask * dist) / (C * sum(mask) + 1e-16)`; `mask` is `[b, 1, X, Y, Z]`, broadcast over classes.
pub fn masked_consistency(dist: &Tensor, mask: &Tensor) -> Tensor {
    let n_classes = dist.size()[1] as f64;
    (mask * dist).sum(Kind::Float) / (mask.sum(Kind::Float) * n_classes + 1e-16)
}

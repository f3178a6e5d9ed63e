//! Uncertainty of a segmentation, from class probabilities: what the method masks its consistency
//! term by (`crate::method`) and what evaluation and prediction map (`crate::eval`). Both
//! depend on this module; it depends on neither.

use tch::{Kind, Tensor};

/// Entropy of class probabilities `p` along the class axis `dim`: `-sum_c p_c ln(p_c + 1e-6)`
/// (the recipe's formula; the 1e-6 keeps `ln` finite at `p = 0`).
pub fn entropy(p: &Tensor, dim: i64, keepdim: bool) -> Tensor {
    -(p * (p + 1e-6).log()).sum_dim_intlist(dim, keepdim, Kind::Float)
}

/// Predictive entropy of the mean softmax over Monte-Carlo passes.
/// `logits` is `[T * b, C, X, Y, Z]`, ordered pass-major (pass t holds samples t*b .. t*b+b);
/// returns `[b, 1, X, Y, Z]` with `-sum_c mu_c ln(mu_c + 1e-6)`.
pub fn uncertainty(logits: &Tensor, passes: i64) -> Tensor {
    let size = logits.size();
    let b = size[0] / passes;
    let mut shape = vec![passes, b];
    shape.extend_from_slice(&size[1..]);
    let mu = logits.softmax(1, Kind::Float).reshape(&shape).mean_dim(0, false, Kind::Float);
    entropy(&mu, 1, true)
}

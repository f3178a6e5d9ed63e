//! The randomness of one step (input noise, dropout masks), drawn from the seed and the
//! iteration, so that any thread can draw any part of it and get the same numbers.

use super::config::StepConfig;
use crate::method::Method;
use crate::model::{DropoutMasks, VNetConfig};
use crate::rng;
use tch::{Device, Tensor};

/// Randomness of one network pass: additive input noise and dropout masks.
#[derive(Debug)]
pub struct PassRandom {
    /// Added to the input (already scaled and clamped); `None` for the student.
    pub noise: Option<Tensor>,
    /// Dropout3d masks for x5 and x9.
    pub dropout: DropoutMasks,
}

/// All randomness of one iteration.
#[derive(Debug)]
pub struct StepRandom {
    /// The student's dropout.
    pub student: PassRandom,
    /// The teacher's single noisy pass that gives the consistency target.
    pub teacher: Option<PassRandom>,
    /// The Monte-Carlo passes, `mc_passes / mc_repeats` of them, each on `mc_repeats` copies.
    pub mc: Vec<PassRandom>,
}

/// Stream identifiers under a (seed, iteration) key.
const STREAM_STUDENT: u64 = 0;
const STREAM_TEACHER: u64 = 1;
const STREAM_MC: u64 = 2;

impl StepRandom {
    /// The student's part for iteration `iter`: depends only on (seed, iter, batch size).
    pub fn draw_student(net: &VNetConfig, device: Device, seed: u64, iter: i64, batch: i64) -> PassRandom {
        draw_pass(net, device, rng::key(seed, &[iter as u64, STREAM_STUDENT]), batch, None)
    }

    /// The teacher's parts (target pass and Monte-Carlo passes) for iteration `iter`, for
    /// unlabelled patches of `unl_shape` `[u, C, X, Y, Z]`.
    pub fn draw_teacher(
        net: &VNetConfig,
        device: Device,
        cfg: &StepConfig,
        seed: u64,
        iter: i64,
        unl_shape: &[i64],
    ) -> (Option<PassRandom>, Vec<PassRandom>) {
        if cfg.method.kind == Method::Supervised {
            return (None, Vec::new());
        }
        let noise = |k: u64, n: i64| {
            let mut shape = unl_shape.to_vec();
            shape[0] = n;
            let z = rng::normal(rng::key(k, &[0]), &shape, device) * cfg.method.noise_std;
            (z.clamp(-cfg.method.noise_clip, cfg.method.noise_clip), n)
        };
        let u = unl_shape[0];
        let teacher = draw_pass(net, device, rng::key(seed, &[iter as u64, STREAM_TEACHER]), u, Some(&noise));
        let mc = if cfg.method.kind == Method::Uamt {
            (0..cfg.method.mc_passes / cfg.method.mc_repeats)
                .map(|k| {
                    draw_pass(
                        net,
                        device,
                        rng::key(seed, &[iter as u64, STREAM_MC, k as u64]),
                        u * cfg.method.mc_repeats,
                        Some(&noise),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        (Some(teacher), mc)
    }

    /// Everything for iteration `iter` on a batch of `images_shape` `[b, C, X, Y, Z]`.
    pub fn draw(
        net: &VNetConfig,
        device: Device,
        cfg: &StepConfig,
        seed: u64,
        iter: i64,
        images_shape: &[i64],
    ) -> StepRandom {
        let student_batch = if cfg.method.kind == Method::Supervised { cfg.labelled_bs } else { images_shape[0] };
        let student = Self::draw_student(net, device, seed, iter, student_batch);
        let mut unl = images_shape.to_vec();
        unl[0] -= cfg.labelled_bs;
        let (teacher, mc) = Self::draw_teacher(net, device, cfg, seed, iter, &unl);
        StepRandom { student, teacher, mc }
    }
}

type NoiseFn<'a> = dyn Fn(u64, i64) -> (Tensor, i64) + 'a;

fn draw_pass(net: &VNetConfig, device: Device, key: u64, batch: i64, noise: Option<&NoiseFn<'_>>) -> PassRandom {
    let mut sub = 1u64;
    let dropout = DropoutMasks::draw(net, batch, |shape| {
        sub += 1;
        rng::uniform(rng::key(key, &[sub]), shape, device)
    });
    PassRandom { noise: noise.map(|f| f(rng::key(key, &[0]), batch).0), dropout }
}

//! The next-token log-probability, `log softmax(logits)[target]` of each row, and its gradient:
//! one call of `exp` per logit each way, keeping only each row's log-sum-exp between them.

use rayon::prelude::*;

use crate::dispatch::{Isa, Kernel, MulAdd};
use crate::vector::{exp, log_sum_exp};

/// `(log p of each row's target, log-sum-exp of each row)` for row-major `[rows, vocab]`
/// logits.
pub fn target_log_probs(
    isa: Isa,
    logits: &[f32],
    targets: &[usize],
    vocab: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(logits.len(), targets.len() * vocab, "one target per row");
    let lse: Vec<f32> = logits
        .par_chunks(vocab)
        .map(|row| isa.run(LogSumExp(row)))
        .collect();
    let out = targets
        .iter()
        .enumerate()
        .map(|(i, &t)| logits[i * vocab + t] - lse[i])
        .collect();
    (out, lse)
}

/// `∂logits[i, j] = g[i] · ([j = target i] − softmax[i, j])`, from the forward's `lse`.
pub fn target_log_probs_grad(
    isa: Isa,
    grad: &[f32],
    logits: &[f32],
    lse: &[f32],
    targets: &[usize],
    vocab: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(i, (out, x))| {
            isa.run(SoftmaxRow {
                x,
                lse: lse[i],
                scale: -grad[i],
                out,
            });
            out[targets[i]] += grad[i];
        });
    out
}

/// `log Σⱼ exp(x[j])` of one row, on the vector unit.
struct LogSumExp<'a>(&'a [f32]);

impl Kernel for LogSumExp<'_> {
    type Out = f32;

    #[inline(always)]
    fn run<M: MulAdd>(self) -> f32 {
        log_sum_exp(self.0)
    }
}

/// `out[j] = scale · exp(x[j] − lse)`.
struct SoftmaxRow<'a> {
    x: &'a [f32],
    lse: f32,
    scale: f32,
    out: &'a mut [f32],
}

impl Kernel for SoftmaxRow<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let Self { x, lse, scale, out } = self;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = scale * exp(v - lse);
        }
    }
}

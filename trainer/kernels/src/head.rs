//! The output head and the next-token loss as one op, for bf16 compute: `log softmax(h · W)`
//! at each row's target, without the `[rows, vocab]` logits ever existing whole.
//!
//! Rows go through in chunks that reuse one buffer, and each row's gradient is taken in the
//! forward pass, while its logits are still at hand: `log p[t]` depends on its own row of `h`
//! alone, so `∂ log p[t] / ∂h = (onehot(t) − softmax) · Wᵀ` is one `[hidden]` vector per row,
//! and the backward only scales it by the upstream gradient.

use rayon::prelude::*;

use crate::amx::{self, Packed, Rounded};
use crate::dispatch::{Isa, Kernel, MulAdd};
use crate::vector::{exp, log_sum_exp};

/// The buffers a call reuses: a vocabulary-wide buffer, fresh each time, spends longer
/// faulting its pages in than the products spend filling it.
#[derive(Debug, Default)]
pub struct Scratch {
    logits: Vec<f32>,
    grad: Option<Rounded>,
}

/// The log-probabilities of the targets, `[rows]`, and with `grad` their gradients in
/// `hidden`, `[rows, hidden]` (else empty), a `chunk` of rows at a time. `forward` is the
/// head `W` packed, `[hidden, vocab]`, and `backward` its transpose.
#[allow(clippy::too_many_arguments)]
pub fn target_log_probs(
    isa: Isa,
    hidden: &[f32],
    [forward, backward]: [&Packed; 2],
    targets: &[usize],
    grad: bool,
    chunk: usize,
    scratch: &mut Scratch,
) -> (Vec<f32>, Vec<f32>) {
    let (rows, width, vocab) = (targets.len(), forward.k(), forward.n());
    assert_eq!(
        hidden.len(),
        rows * width,
        "hidden is not [{rows}, {width}]"
    );
    let mut log_probs = vec![0f32; rows];
    let mut per_row = vec![0f32; if grad { rows * width } else { 0 }];
    if scratch.logits.len() < chunk.min(rows) * vocab {
        scratch.logits.resize(chunk.min(rows) * vocab, 0.0);
    }
    for first in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - first);
        let logits = &mut scratch.logits[..n * vocab];
        let rounded = Rounded::new(isa, &hidden[first * width..(first + n) * width], n, width);
        amx::product_into(&[(&rounded, forward)], logits);
        logits
            .par_chunks_mut(vocab)
            .zip(&mut log_probs[first..first + n])
            .zip(&targets[first..first + n])
            .for_each(|((logits, out), &target)| {
                *out = isa.run(Row {
                    logits,
                    target,
                    grad,
                })
            });
        if grad {
            // `∂ log p / ∂logits` of the chunk, now in `logits`, times `Wᵀ`.
            let rounded = Rounded::reusing(isa, scratch.grad.take(), logits, n, vocab);
            let out = &mut per_row[first * width..(first + n) * width];
            amx::product_into(&[(&rounded, backward)], out);
            scratch.grad = Some(rounded);
        }
    }
    (log_probs, per_row)
}

/// One row of logits: returns `log p[target]` and, with `grad`, leaves
/// `∂ log p[target] / ∂logits = onehot(target) − softmax` in their place.
struct Row<'a> {
    logits: &'a mut [f32],
    target: usize,
    grad: bool,
}

impl Kernel for Row<'_> {
    type Out = f32;

    #[inline(always)]
    fn run<M: MulAdd>(self) -> f32 {
        let Self {
            logits,
            target,
            grad,
        } = self;
        let lse = log_sum_exp(logits);
        let log_p = logits[target] - lse;
        if grad {
            for v in logits.iter_mut() {
                *v = -exp(*v - lse);
            }
            logits[target] += 1.0;
        }
        log_p
    }
}

//! The output head and the next-token loss as one op, for bf16 compute: `log softmax(h · W)`
//! at each row's target, without the `[rows, vocab]` logits ever existing whole.
//!
//! At SmolLM2's size the logits of a shard are 50 MB, and so is their gradient: a quarter of a
//! bf16 step went to writing them into freshly faulted pages, reading them back for the
//! log-sum-exp, again for the softmax, and once more to round `∂logits` for the product with
//! `Wᵀ`. Here the rows go through in chunks that reuse one buffer, and each row's gradient is
//! taken in the forward pass, while its logits are still at hand: `log p[t]` depends on its own
//! row of `h` alone, so `∂ log p[t] / ∂h = (onehot(t) − softmax) · Wᵀ` is one `[hidden]`
//! vector per row, and the backward only scales it by the upstream gradient.

use crate::bf16::FrozenWeight;
use crate::fused::{contiguous, f32s};
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Tensor, TensorData};
use flywheel_kernels::Isa;
use flywheel_kernels::head::{self, Scratch};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Rows of logits per chunk: four row blocks of the tile kernel, so each column panel of the
/// head is read once per chunk and used four times (the head is 56 MB at SmolLM2's size and
/// does not stay in cache), against a buffer of 128 × vocab floats.
const CHUNK: usize = 128;

/// A causal LM's output head, packed for bf16 products, with the chunk buffers its calls reuse.
#[derive(Debug)]
pub(crate) struct Head {
    weight: Arc<FrozenWeight>,
    /// One per shard that has run the head at once: a shard takes one and puts it back.
    scratch: Mutex<Vec<Scratch>>,
}

impl Head {
    /// `weight`: `[hidden, vocab]`.
    pub(crate) fn new(weight: Tensor<2>) -> Self {
        Self {
            weight: Arc::new(FrozenWeight::new(weight)),
            scratch: Mutex::default(),
        }
    }

    /// `hidden · W`, the logits.
    ///
    /// # Shapes
    /// - hidden: `[rows, hidden]`
    /// - output: `[rows, vocab]`
    pub(crate) fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        crate::bf16::frozen_matmul(hidden, &self.weight)
    }
}

/// `log softmax(hidden · W)[i, targets[i]]` for each row `i`, `W` the packed head.
///
/// # Shapes
/// - hidden: `[rows, hidden]`
/// - output: `[rows]`
pub(crate) fn target_log_probs(hidden: Tensor<2>, head: &Head, targets: Vec<i64>) -> Tensor<1> {
    let [rows, _] = hidden.dims();
    let vocab = head.weight.forward.n();
    assert_eq!(targets.len(), rows, "one target per row");
    assert!(
        targets.iter().all(|&t| (0..vocab as i64).contains(&t)),
        "targets within the vocabulary"
    );
    let targets: Vec<usize> = targets.into_iter().map(|t| t as usize).collect();
    if let Ok(tracked) = hidden.clone().try_into_primitive::<Autodiff<Flex>>() {
        return Tensor::from_primitive::<Autodiff<Flex>>(autodiff(tracked, head, &targets));
    }
    let plain = hidden
        .try_into_primitive::<Flex>()
        .expect("bf16 compute runs on the CPU (flex) only");
    let (out, _) = compute(&contiguous(plain), head, &targets, false, CHUNK);
    Tensor::from_primitive::<Flex>(out)
}

type AutodiffTensor = <Autodiff<Flex> as burn::backend::BackendTypes>::FloatTensorPrimitive;

fn autodiff(hidden: AutodiffTensor, head: &Head, targets: &[usize]) -> AutodiffTensor {
    let (hidden, node) = hidden.into_parts();
    let hidden = contiguous(hidden);
    match HeadLoss
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, grad) = compute(&hidden, head, targets, true, CHUNK);
            prep.finish(grad.expect("asked for"), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(compute(&hidden, head, targets, false, CHUNK).0),
    }
}

#[derive(Debug)]
struct HeadLoss;

impl Backward<Flex, 1> for HeadLoss {
    /// `∂ log p[tᵢ] / ∂hᵢ` for each row: `[rows, hidden]`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let per_row = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous(grad);
            let g = f32s(&grad);
            let mut out = f32s(&per_row).to_vec();
            let hidden = out.len() / g.len().max(1);
            out.par_chunks_mut(hidden)
                .zip(g)
                .for_each(|(row, &g)| row.iter_mut().for_each(|v| *v *= g));
            FlexTensor::from_data(TensorData::new(out, [g.len(), hidden]))
        });
    }
}

/// The log-probabilities of the targets, `[rows]`, and with `grad` their gradients in
/// `hidden`, `[rows, hidden]`, a `chunk` of rows at a time.
fn compute(
    hidden: &FlexTensor,
    head: &Head,
    targets: &[usize],
    grad: bool,
    chunk: usize,
) -> (FlexTensor, Option<FlexTensor>) {
    let weight = &head.weight;
    let (rows, width) = (targets.len(), weight.forward.k());
    let mut scratch = head.scratch.lock().expect("scratch pool").pop();
    let (log_probs, per_row) = head::target_log_probs(
        Isa::best(),
        f32s(hidden),
        [&weight.forward, &weight.backward],
        targets,
        grad,
        chunk,
        scratch.get_or_insert_default(),
    );
    head.scratch.lock().expect("scratch pool").extend(scratch);
    let log_probs = FlexTensor::from_data(TensorData::new(log_probs, [rows]));
    let per_row = grad.then(|| FlexTensor::from_data(TensorData::new(per_row, [rows, width])));
    (log_probs, per_row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Int, Tolerance};

    /// Values on a 1/64 grid: exact in bf16, so the head's product and burn's f32 one differ
    /// only in the order of their sums, and its gradient only by rounding `∂logits` to bf16.
    fn exact(rows: usize, cols: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 37 + seed * 101) % 256) as f32 / 64.0 - 2.0) * scale)
            .collect()
    }

    /// Against `log_softmax(h · W)` + `gather` in burn's f32 ops, values and weighted
    /// gradients; and the same per-row values whatever the chunk.
    #[test]
    #[cfg_attr(not(cpu_amx), ignore = "needs a CPU with AMX-BF16")]
    fn matches_log_softmax_of_the_product() {
        let (rows, width, vocab) = (70, 40, 300);
        let device = Device::flex().autodiff();
        let tensor = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v, shape), &device)
        };
        let w = tensor(exact(width, vocab, 1, 0.25), [width, vocab]);
        let packed = Head::new(w.clone());
        let targets: Vec<i64> = (0..rows).map(|i| ((i * 53 + 7) % vocab) as i64).collect();
        let weights = Tensor::<1>::from_data(
            TensorData::new(
                (0..rows).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect(),
                [rows],
            ),
            &device,
        );
        let h = exact(rows, width, 2, 1.0);

        let run = |fused: bool| {
            let x = tensor(h.clone(), [rows, width]).require_grad();
            let picked = if fused {
                target_log_probs(x.clone(), &packed, targets.clone())
            } else {
                let t = TensorData::new(targets.clone(), [rows, 1]);
                log_softmax(x.clone().matmul(w.clone()), 1)
                    .gather(1, Tensor::<2, Int>::from_data(t, &device))
                    .reshape([rows])
            };
            let grads = (picked.clone() * weights.clone()).sum().backward();
            (picked.into_data(), x.grad(&grads).unwrap().into_data())
        };
        let (ours, ours_grad) = run(true);
        let (burns, burns_grad) = run(false);
        ours.assert_approx_eq::<f32>(&burns, Tolerance::absolute(1e-4));
        // bf16 keeps 8 bits of each `∂logits`: errors of 2⁻⁹ of terms up to |W| ≤ 0.5.
        ours_grad.assert_approx_eq::<f32>(&burns_grad, Tolerance::absolute(2e-3));

        // Chunks of 32 rows (the last one short) give each row what one chunk gives it.
        let plain = FlexTensor::from_data(TensorData::new(h, [rows, width]));
        let t: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
        let [whole, chunked] = [CHUNK, 32].map(|chunk| {
            let (values, per_row) = compute(&plain, &packed, &t, true, chunk);
            (f32s(&values).to_vec(), f32s(&per_row.unwrap()).to_vec())
        });
        assert_eq!(whole, chunked);
    }
}

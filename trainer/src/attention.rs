//! Scaled dot-product attention for both families: on the CPU backend the fused kernel of
//! `flywheel_kernels::attention` with a backward of its own, elsewhere (GPUs) the same
//! attention from burn's ops, with a bias tensor for the key ranges; the tests check one
//! against the other.

use std::sync::Arc;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use flywheel_kernels::Isa;
use flywheel_kernels::attention::Plan;

use crate::fused::{contiguous, f32s};

/// Everything attention needs besides q, k and v, for one batch; built once and shared by
/// every layer.
#[derive(Debug)]
pub(crate) struct Attention {
    plan: Plan,
}

impl Attention {
    /// `keys[token]` is the range of its row's keys that token's query attends to; a query
    /// must see at least one key. `rope` is `(theta, positions)`: the rotary base and each
    /// token's position in its sequence.
    pub(crate) fn new(
        batch_seq: [usize; 2],
        heads: [usize; 3],
        keys: Vec<(u32, u32)>,
        rope: Option<(f64, &[u32])>,
    ) -> Self {
        Self {
            plan: Plan::new(batch_seq, heads, keys, rope),
        }
    }

    /// `softmax(rope(q)·rope(k)ᵀ/√d + mask)·v`, heads in groups sharing a key/value head.
    ///
    /// # Shapes
    /// - q, output: `[batch, seq, heads · head_dim]`
    /// - k, v: `[batch, seq, kv_heads · head_dim]`
    pub(crate) fn forward(self: &Arc<Self>, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let [b, s, _] = q.dims();
        assert_eq!([b, s], self.plan.batch_seq(), "attention of another batch");
        if let (Ok(q), Ok(k), Ok(v)) = (
            q.clone().try_into_primitive::<Autodiff<Flex>>(),
            k.clone().try_into_primitive::<Autodiff<Flex>>(),
            v.clone().try_into_primitive::<Autodiff<Flex>>(),
        ) {
            let (q, q_node) = q.into_parts();
            let (k, k_node) = k.into_parts();
            let (v, v_node) = v.into_parts();
            let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
            let (out, lse) = self.plan.forward(Isa::best(), f32s(&q), f32s(&k), f32s(&v));
            let out = FlexTensor::from_data(TensorData::new(out, q.layout().shape().clone()));
            let out = match Fused
                .prepare::<NoCheckpointing>([q_node, k_node, v_node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    State {
                        plan: self.clone(),
                        q,
                        k,
                        v,
                        out: out.clone(),
                        lse: Arc::new(lse),
                    },
                    out,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            return Tensor::from_primitive::<Autodiff<Flex>>(out);
        }
        if let (Ok(q), Ok(k), Ok(v)) = (
            q.clone().try_into_primitive::<Flex>(),
            k.clone().try_into_primitive::<Flex>(),
            v.clone().try_into_primitive::<Flex>(),
        ) {
            let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
            let (out, _) = self.plan.forward(Isa::best(), f32s(&q), f32s(&k), f32s(&v));
            let out = FlexTensor::from_data(TensorData::new(out, q.layout().shape().clone()));
            return Tensor::from_primitive::<Flex>(out);
        }
        self.reference(q, k, v)
    }

    /// The same attention from burn's ops: what other backends run, and what the fused op is
    /// tested against.
    pub(crate) fn reference(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let [b, s] = self.plan.batch_seq();
        let [heads, kv_heads, d] = self.plan.heads();
        let group = heads / kv_heads;
        let device = q.device();
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
        let (mut q, mut k) = (split(q, heads), split(k, kv_heads));
        if let Some((cos, sin)) = self.plan.rope() {
            let table = |t: &[f32]| {
                Tensor::<4>::from_data(TensorData::new(t.to_vec(), [b, 1, s, d]), &device)
            };
            let (cos, sin) = (table(cos), table(sin));
            let rotate = |x: Tensor<4>| {
                let swapped = Tensor::cat(
                    vec![
                        x.clone().narrow(3, d / 2, d / 2),
                        x.clone().narrow(3, 0, d / 2),
                    ],
                    3,
                );
                x * cos.clone() + swapped * sin.clone()
            };
            q = rotate(q);
            k = rotate(k);
        }
        let v = split(v, kv_heads);
        // Grouped-query attention without copying K and V once per query head: the `group`
        // query heads that share a KV head (adjacent, as HF numbers them) are stacked along
        // the sequence axis, so one batched matmul per KV head serves all of them.
        let q = q
            .mul_scalar(self.plan.scale())
            .reshape([b, kv_heads, group * s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).reshape([b, heads, s, s]) + self.bias(&device);
        softmax(scores, 3)
            .reshape([b, kv_heads, group * s, s])
            .matmul(v)
            .reshape([b, heads, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, heads * d])
    }

    /// 0 where a query attends to a key, a large negative elsewhere.
    ///
    /// # Shapes
    /// - output: `[batch, 1, seq, seq]`
    fn bias(&self, device: &Device) -> Tensor<4> {
        let [batch, s] = self.plan.batch_seq();
        let mut bias = vec![-1.0e9f32; batch * s * s];
        for (token, &(lo, hi)) in self.plan.keys().iter().enumerate() {
            bias[token * s + lo as usize..token * s + hi as usize].fill(0.0);
        }
        Tensor::from_data(TensorData::new(bias, [batch, 1, s, s]), device)
    }
}

#[derive(Debug)]
struct Fused;

#[derive(Debug, Clone)]
struct State {
    plan: Arc<Attention>,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: Arc<Vec<f32>>,
}

impl Backward<Flex, 3> for Fused {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            plan,
            q,
            k,
            v,
            out,
            lse,
        } = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let inputs = [f32s(&q), f32s(&k), f32s(&v)];
        let d = plan
            .plan
            .backward(Isa::best(), inputs, f32s(&out), &lse, f32s(&grad));
        for ((parent, d), input) in ops.parents.into_iter().zip(d).zip([&q, &k, &v]) {
            if let Some(node) = parent {
                let shape = input.layout().shape().clone();
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(d, shape)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    /// Packed causal rows with GQA and rotary embeddings (two sequences and padding in the
    /// first row, a full one in the second), and a padded bidirectional batch: the fused op's
    /// output and all three gradients against burn's ops.
    #[test]
    fn fused_attention_matches_burns_ops() {
        // Head widths off the tiles: 40 pads to 64 and its rotary halves leave a ragged 4.
        let (b, s) = (2, 11);
        // Two sequences and padding in the first row, a full one in the second.
        let causal = crate::llama::Layout::packed(&[vec![4, 5], vec![11]], s)
            .attention([6, 2, 40], 10_000.0);
        let bidirectional = {
            let lengths = [7u32, 11];
            let keys = lengths
                .iter()
                .flat_map(|&n| std::iter::repeat_n((0, n), s))
                .collect();
            Attention::new([b, s], [3, 3, 8], keys, None)
        };
        for plan in [causal, bidirectional] {
            let plan = Arc::new(plan);
            let device = Device::flex().autodiff();
            let [heads, kv_heads, d] = plan.plan.heads();
            let random = |width: usize| {
                Tensor::<3>::random([b, s, width * d], Distribution::Normal(0.0, 1.0), &device)
            };
            let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
            let upstream = random(heads);
            let run = |fused: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = if fused {
                    plan.forward(q.clone(), k.clone(), v.clone())
                } else {
                    plan.reference(q.clone(), k.clone(), v.clone())
                };
                let grads = (out.clone() * upstream.clone()).sum().backward();
                [
                    out.into_data(),
                    q.grad(&grads).unwrap().into_data(),
                    k.grad(&grads).unwrap().into_data(),
                    v.grad(&grads).unwrap().into_data(),
                ]
            };
            let tolerance = Tolerance::rel_abs(1e-4, 1e-5);
            let (ours, burns) = (run(true), run(false));
            for (ours, burns) in ours.iter().zip(&burns) {
                ours.assert_approx_eq::<f32>(burns, tolerance);
            }
            let plain = plan.forward(q.clone().inner(), k.clone().inner(), v.clone().inner());
            plain
                .into_data()
                .assert_approx_eq::<f32>(&burns[0], tolerance);
        }
    }
}

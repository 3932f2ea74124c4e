//! Fused ops with a hand-written backward on the CPU backend: one pass each way, no
//! intermediate tensors, a vectorised `exp`. The arithmetic is `flywheel_kernels`'; this file
//! is the burn side (autodiff nodes, tensors in and out). Other backends get burn's own ops.
//!
//! - [`target_log_probs`]: `log_softmax` then `gather` on a vocabulary of 49k built several
//!   `[rows, vocab]` tensors in each direction and called the scalar `expf` twice per logit
//!   (burn's `exp` recomputes itself in backward); at SmolLM2's size that was a tenth of a
//!   step. Here each direction calls `exp` once per logit and keeps only each row's
//!   log-sum-exp between them.
//! - [`swiglu`]: `silu(gate) · up`, the Llama MLP's activation, saving only its two inputs.
//! - [`rms_norm`]: the Llama norm, a handful of passes and their backwards in burn's ops, is
//!   one pass each way that keeps one float per row.
//! - [`layer_norm`]: BERT's norm, likewise, keeping two floats per row.
//! - [`gelu`]: BERT's exact (erf) GELU; burn's calls the scalar `erff` once per element each
//!   way, a sixteenth of a MiniLM step.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::nn::{LayerNorm, RmsNorm};
use burn::tensor::activation::{gelu as burn_gelu, log_softmax, silu};
use burn::tensor::{Int, Tensor, TensorData};
use flywheel_kernels::{Isa, loss, norm, pointwise};
use std::sync::Arc;

/// `log softmax(logits)[i, targets[i]]` for each row `i`.
///
/// # Shapes
/// - logits: `[rows, vocab]`
/// - output: `[rows]`
pub(crate) fn target_log_probs(logits: Tensor<2>, targets: Vec<i64>) -> Tensor<1> {
    let [rows, vocab] = logits.dims();
    assert_eq!(targets.len(), rows, "one target per row");
    assert!(
        targets.iter().all(|&t| (0..vocab as i64).contains(&t)),
        "targets within the vocabulary"
    );
    if let Ok(tracked) = logits.clone().try_into_primitive::<Autodiff<Flex>>() {
        let targets = Arc::new(targets.into_iter().map(|t| t as usize).collect());
        return Tensor::from_primitive::<Autodiff<Flex>>(autodiff(tracked, targets, vocab));
    }
    if let Ok(plain) = logits.clone().try_into_primitive::<Flex>() {
        let targets: Vec<usize> = targets.into_iter().map(|t| t as usize).collect();
        return Tensor::from_primitive::<Flex>(forward(&contiguous(plain), &targets, vocab).0);
    }
    // Other backends (GPUs): burn's own ops.
    let device = logits.device();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
    log_softmax(logits, 1).gather(1, targets).reshape([rows])
}

type AutodiffTensor = <Autodiff<Flex> as burn::backend::BackendTypes>::FloatTensorPrimitive;

fn autodiff(logits: AutodiffTensor, targets: Arc<Vec<usize>>, vocab: usize) -> AutodiffTensor {
    let (logits, node) = logits.into_parts();
    // Contiguous once, here: the backward reads the very tensor the forward read.
    let logits = contiguous(logits);
    let (out, lse) = forward(&logits, &targets, vocab);
    match TargetLogProbs
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State {
                logits,
                vocab,
                lse: Arc::new(lse),
                targets,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct TargetLogProbs;

#[derive(Debug, Clone)]
struct State {
    logits: FlexTensor,
    vocab: usize,
    lse: Arc<Vec<f32>>,
    targets: Arc<Vec<usize>>,
}

impl Backward<Flex, 1> for TargetLogProbs {
    type State = State;

    /// `∂logits[i, j] = g[i] · ([j = target i] − softmax[i, j])`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            logits,
            vocab,
            lse,
            targets,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous(grad);
            let g = grad.as_slice::<f32>().expect("f32 gradient");
            let x = f32s(&logits);
            let out = loss::target_log_probs_grad(Isa::best(), g, x, &lse, &targets, vocab);
            FlexTensor::from_data(TensorData::new(out, [g.len(), vocab]))
        });
    }
}

/// `t` itself when its f32 values lie in one slice, else a contiguous copy.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `(log p of each target, log-sum-exp of each row)`.
/// `logits` must be contiguous.
fn forward(logits: &FlexTensor, targets: &[usize], vocab: usize) -> (FlexTensor, Vec<f32>) {
    let (out, lse) = loss::target_log_probs(Isa::best(), f32s(logits), targets, vocab);
    (
        FlexTensor::from_data(TensorData::new(out, [targets.len()])),
        lse,
    )
}

/// `silu(gate) · up`, elementwise.
///
/// # Shapes
/// - gate, up: `[rows, width]`
/// - output: `[rows, width]`
pub(crate) fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    if let (Ok(g), Ok(u)) = (
        gate.clone().try_into_primitive::<Autodiff<Flex>>(),
        up.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let (g, g_node) = g.into_parts();
        let (u, u_node) = u.into_parts();
        let (g, u) = (contiguous(g), contiguous(u));
        let out = swiglu_forward(&g, &u);
        let out = match SwiGlu
            .prepare::<NoCheckpointing>([g_node, u_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((g, u), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Tensor::from_primitive::<Autodiff<Flex>>(out);
    }
    if let (Ok(g), Ok(u)) = (
        gate.clone().try_into_primitive::<Flex>(),
        up.clone().try_into_primitive::<Flex>(),
    ) {
        let out = swiglu_forward(&contiguous(g), &contiguous(u));
        return Tensor::from_primitive::<Flex>(out);
    }
    silu(gate) * up
}

fn swiglu_forward(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let out = pointwise::swiglu(Isa::best(), f32s(gate), f32s(up));
    FlexTensor::from_data(TensorData::new(out, gate.layout().shape().clone()))
}

pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

#[derive(Debug)]
struct SwiGlu;

impl Backward<Flex, 2> for SwiGlu {
    type State = (FlexTensor, FlexTensor);

    /// With `σ = sigmoid(gate)`: `∂up = g · gate·σ`, `∂gate = g · up · σ·(1 + gate·(1 − σ))`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let [d_gate, d_up] =
            pointwise::swiglu_grad(Isa::best(), f32s(&grad), f32s(&gate), f32s(&up));
        let shape = gate.layout().shape().clone();
        let [gate_parent, up_parent] = ops.parents;
        if let Some(node) = gate_parent {
            let d = FlexTensor::from_data(TensorData::new(d_gate, shape.clone()));
            grads.register::<Flex>(node.id, d);
        }
        if let Some(node) = up_parent {
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(d_up, shape)));
        }
    }
}

/// `x·Φ(x)`, elementwise, with `Φ` the standard normal CDF (transformers' `gelu`).
///
/// # Shapes
/// - x, output: any, the same
pub(crate) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if let Ok(tracked) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
        let (x, node) = tracked.into_parts();
        let x = contiguous(x);
        let out = gelu_forward(&x);
        let out = match Gelu
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(x, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Tensor::from_primitive::<Autodiff<Flex>>(out);
    }
    if let Ok(plain) = x.clone().try_into_primitive::<Flex>() {
        return Tensor::from_primitive::<Flex>(gelu_forward(&contiguous(plain)));
    }
    burn_gelu(x)
}

fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let out = pointwise::gelu(Isa::best(), f32s(x));
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
}

#[derive(Debug)]
struct Gelu;

impl Backward<Flex, 1> for Gelu {
    type State = FlexTensor;

    /// `∂x = g · (Φ(x) + x·φ(x))`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous(grad);
            let out = pointwise::gelu_grad(Isa::best(), f32s(&grad), f32s(&x));
            FlexTensor::from_data(TensorData::new(out, grad.layout().shape().clone()))
        });
    }
}

/// `x / √(mean(x²) + ε) · γ` over the last axis, as transformers' `LlamaRMSNorm` (in f32).
///
/// # Shapes
/// - x, output: `[..., width]`
pub(crate) fn rms_norm<const D: usize>(x: Tensor<D>, norm: &RmsNorm) -> Tensor<D> {
    let (gamma, eps) = (norm.gamma.val(), norm.epsilon as f32);
    if let (Ok(x), Ok(g)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        gamma.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let (x, x_node) = x.into_parts();
        let (g, g_node) = g.into_parts();
        let (x, g) = (contiguous(x), contiguous(g));
        let (out, inv) = rms_norm_forward(&x, &g, eps);
        let out = match RmsNormOp
            .prepare::<NoCheckpointing>([x_node, g_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, g, Arc::new(inv)), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Tensor::from_primitive::<Autodiff<Flex>>(out);
    }
    if let (Ok(x), Ok(g)) = (
        x.clone().try_into_primitive::<Flex>(),
        gamma.try_into_primitive::<Flex>(),
    ) {
        let out = rms_norm_forward(&contiguous(x), &contiguous(g), eps).0;
        return Tensor::from_primitive::<Flex>(out);
    }
    norm.forward(x)
}

/// `(output, 1/√(mean(x²) + ε) of each row)`.
fn rms_norm_forward(x: &FlexTensor, gamma: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
    let (out, inv) = norm::rms_norm(Isa::best(), f32s(x), f32s(gamma), eps);
    let out = FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()));
    (out, inv)
}

#[derive(Debug)]
struct RmsNormOp;

impl Backward<Flex, 2> for RmsNormOp {
    type State = (FlexTensor, FlexTensor, Arc<Vec<f32>>);

    /// With `r` a row's `1/√(mean(x²) + ε)` and `u = ∂y∘γ`:
    /// `∂x = r·u − x·r³·mean(u∘x)`, `∂γ = Σ_rows ∂y∘x·r`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, inv) = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (dy, xs, g) = (f32s(&grad), f32s(&x), f32s(&gamma));
        let [x_parent, gamma_parent] = ops.parents;
        if let Some(node) = x_parent {
            let dx = norm::rms_norm_dx(Isa::best(), dy, xs, g, &inv);
            let shape = x.layout().shape().clone();
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
        if let Some(node) = gamma_parent {
            let dg = norm::rms_norm_dgamma(dy, xs, &inv, g.len());
            let d = FlexTensor::from_data(TensorData::new(dg, [g.len()]));
            grads.register::<Flex>(node.id, d);
        }
    }
}

/// `(x − mean(x)) / √(var(x) + ε) · γ + β` over the last axis (biased variance, as
/// transformers' `nn.LayerNorm`). `eps` must be the one `norm` was made with (burn keeps its
/// own private).
///
/// # Shapes
/// - x, output: `[..., width]`
pub(crate) fn layer_norm<const D: usize>(x: Tensor<D>, norm: &LayerNorm, eps: f64) -> Tensor<D> {
    let Some(beta) = &norm.beta else {
        return norm.forward(x);
    };
    let (gamma, beta, eps) = (norm.gamma.val(), beta.val(), eps as f32);
    if let (Ok(x), Ok(g), Ok(b)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        gamma.clone().try_into_primitive::<Autodiff<Flex>>(),
        beta.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let (x, x_node) = x.into_parts();
        let (g, g_node) = g.into_parts();
        let (b, b_node) = b.into_parts();
        let (x, g, b) = (contiguous(x), contiguous(g), contiguous(b));
        let (out, stats) = layer_norm_forward(&x, &g, &b, eps);
        let out = match LayerNormOp
            .prepare::<NoCheckpointing>([x_node, g_node, b_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, g, Arc::new(stats)), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        return Tensor::from_primitive::<Autodiff<Flex>>(out);
    }
    if let (Ok(x), Ok(g), Ok(b)) = (
        x.clone().try_into_primitive::<Flex>(),
        gamma.try_into_primitive::<Flex>(),
        beta.try_into_primitive::<Flex>(),
    ) {
        let out = layer_norm_forward(&contiguous(x), &contiguous(g), &contiguous(b), eps).0;
        return Tensor::from_primitive::<Flex>(out);
    }
    norm.forward(x)
}

/// `(output, (mean, 1/√(var + ε)) of each row)`.
fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f32,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let (out, stats) = norm::layer_norm(Isa::best(), f32s(x), f32s(gamma), f32s(beta), eps);
    let out = FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()));
    (out, stats)
}

#[derive(Debug)]
struct LayerNormOp;

impl Backward<Flex, 3> for LayerNormOp {
    type State = (FlexTensor, FlexTensor, Arc<Vec<(f32, f32)>>);

    /// With `x̂ = (x − mean)·r` and `u = ∂y∘γ`: `∂x = r·(u − mean(u) − x̂·mean(u∘x̂))`,
    /// `∂γ = Σ_rows ∂y∘x̂`, `∂β = Σ_rows ∂y`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, stats) = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (dy, xs, g) = (f32s(&grad), f32s(&x), f32s(&gamma));
        let width = g.len();
        let [x_parent, gamma_parent, beta_parent] = ops.parents;
        if let Some(node) = x_parent {
            let dx = norm::layer_norm_dx(Isa::best(), dy, xs, g, &stats);
            let shape = x.layout().shape().clone();
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
        if gamma_parent.is_some() || beta_parent.is_some() {
            let (dg, db) = norm::layer_norm_dgamma_dbeta(dy, xs, &stats, width);
            for (parent, d) in [(gamma_parent, dg), (beta_parent, db)] {
                if let Some(node) = parent {
                    let d = FlexTensor::from_data(TensorData::new(d, [width]));
                    grads.register::<Flex>(node.id, d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    #[test]
    fn swiglu_matches_silu_times_up() {
        let device = Device::flex().autodiff();
        let shape = [37, 1000];
        let gate = Tensor::<2>::random(shape, Distribution::Normal(0.0, 4.0), &device);
        let up = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let upstream = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
            let out = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                silu(g.clone()) * u.clone()
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            [
                out.into_data(),
                g.grad(&grads).unwrap().into_data(),
                u.grad(&grads).unwrap().into_data(),
            ]
        };
        let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
        for (ours, burns) in run(true).iter().zip(&run(false)) {
            ours.assert_approx_eq::<f32>(burns, tolerance);
        }
        let plain = swiglu(gate.clone().inner(), up.clone().inner()).into_data();
        plain.assert_approx_eq::<f32>(&run(false)[0], tolerance);
    }

    /// Against burn's `LayerNorm`: output and all three gradients, on values far from zero.
    #[test]
    fn layer_norm_matches_burns() {
        let device = Device::flex().autodiff();
        let mut norm = burn::nn::LayerNormConfig::new(200)
            .with_epsilon(1e-6)
            .init(&device);
        let param = |mean| {
            burn::module::Param::from_tensor(Tensor::random(
                [200],
                Distribution::Normal(mean, 0.5),
                &device,
            ))
        };
        norm.gamma = param(1.0);
        norm.beta = Some(param(0.0));
        let x = Tensor::<3>::random([3, 7, 200], Distribution::Normal(3.0, 2.0), &device);
        let upstream = Tensor::<3>::random([3, 7, 200], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let out = if fused {
                layer_norm(x.clone(), &norm, 1e-6)
            } else {
                norm.forward(x.clone())
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let beta = norm.beta.as_ref().unwrap().val();
            [
                out.into_data(),
                x.grad(&grads).unwrap().into_data(),
                norm.gamma.val().grad(&grads).unwrap().into_data(),
                beta.grad(&grads).unwrap().into_data(),
            ]
        };
        let tolerance = Tolerance::rel_abs(1e-4, 1e-4);
        let burns = run(false);
        for (ours, burns) in run(true).iter().zip(&burns) {
            ours.assert_approx_eq::<f32>(burns, tolerance);
        }
        use burn::module::Module;
        let plain = layer_norm(x.clone().inner(), &norm.valid(), 1e-6).into_data();
        plain.assert_approx_eq::<f32>(&burns[0], tolerance);
    }

    /// Against burn's `RmsNorm`: output and both gradients.
    #[test]
    fn rms_norm_matches_burns() {
        let device = Device::flex().autodiff();
        let mut norm = burn::nn::RmsNormConfig::new(200)
            .with_epsilon(1e-5)
            .init(&device);
        norm.gamma = burn::module::Param::from_tensor(Tensor::random(
            [200],
            Distribution::Normal(1.0, 0.5),
            &device,
        ));
        let x = Tensor::<3>::random([3, 7, 200], Distribution::Normal(0.0, 2.0), &device);
        let upstream = Tensor::<3>::random([3, 7, 200], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let out = if fused {
                rms_norm(x.clone(), &norm)
            } else {
                norm.forward(x.clone())
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            [
                out.into_data(),
                x.grad(&grads).unwrap().into_data(),
                norm.gamma.val().grad(&grads).unwrap().into_data(),
            ]
        };
        let tolerance = Tolerance::rel_abs(1e-4, 1e-5);
        let burns = run(false);
        for (ours, burns) in run(true).iter().zip(&burns) {
            ours.assert_approx_eq::<f32>(burns, tolerance);
        }
        use burn::module::Module;
        let plain = rms_norm(x.clone().inner(), &norm.valid()).into_data();
        plain.assert_approx_eq::<f32>(&burns[0], tolerance);
    }

    #[test]
    fn gelu_matches_burns() {
        let device = Device::flex().autodiff();
        let shape = [29, 700];
        let x = Tensor::<2>::random(shape, Distribution::Normal(0.0, 3.0), &device);
        let upstream = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let out = if fused {
                gelu(x.clone())
            } else {
                burn_gelu(x.clone())
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            [out.into_data(), x.grad(&grads).unwrap().into_data()]
        };
        let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
        for (ours, burns) in run(true).iter().zip(&run(false)) {
            ours.assert_approx_eq::<f32>(burns, tolerance);
        }
        let plain = gelu(x.clone().inner()).into_data();
        plain.assert_approx_eq::<f32>(&run(false)[0], tolerance);
    }

    /// Against burn's `log_softmax` + `gather`, values and gradients, with logits wide enough
    /// to need the max subtraction.
    #[test]
    fn matches_log_softmax_and_gather() {
        let (rows, vocab) = (6, 1000);
        let targets: Vec<i64> = vec![0, 999, 17, 500, 3, 17];
        let weights = [1.0f32, 2.0, 0.5, 1.0, 3.0, 1.0];
        let device = Device::flex().autodiff();
        let logits = Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 8.0), &device);
        let w = Tensor::<1>::from_data(TensorData::new(weights.to_vec(), [rows]), &device);

        let run = |fused: bool| {
            let x = logits.clone().detach().require_grad();
            let picked = if fused {
                target_log_probs(x.clone(), targets.clone())
            } else {
                let t = Tensor::<2, Int>::from_data(
                    TensorData::new(targets.clone(), [rows, 1]),
                    &device,
                );
                log_softmax(x.clone(), 1).gather(1, t).reshape([rows])
            };
            let grads = (picked.clone() * w.clone()).sum().backward();
            (picked.into_data(), x.grad(&grads).unwrap().into_data())
        };
        let (ours, ours_grad) = run(true);
        let (burns, burns_grad) = run(false);
        ours.assert_approx_eq::<f32>(&burns, Tolerance::absolute(1e-4));
        ours_grad.assert_approx_eq::<f32>(&burns_grad, Tolerance::rel_abs(1e-5, 1e-6));

        // Without autodiff, the same values.
        let plain = logits.clone().inner();
        let values = target_log_probs(plain, targets.clone()).into_data();
        values.assert_approx_eq::<f32>(&burns, Tolerance::absolute(1e-4));
    }
}

//! Fused ops with a hand-written backward on the CPU backend: one pass each way, no
//! intermediate tensors, a vectorised `exp`. Other backends get burn's own ops.
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
use rayon::prelude::*;
use std::mem::MaybeUninit;
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
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(vocab)
                .zip(x.par_chunks(vocab))
                .enumerate()
                .for_each(|(i, (out, x))| {
                    dispatch(SoftmaxRow {
                        x,
                        lse: lse[i],
                        scale: -g[i],
                        out,
                    });
                    out[targets[i]] += g[i];
                });
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
    let x = f32s(logits);
    let rows = targets.len();
    let lse: Vec<f32> = x
        .par_chunks(vocab)
        .map(|row| dispatch(LogSumExp(row)))
        .collect::<Vec<_>>();
    let out: Vec<f32> = (0..rows)
        .map(|i| x[i * vocab + targets[i]] - lse[i])
        .collect();
    (FlexTensor::from_data(TensorData::new(out, [rows])), lse)
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

/// `log Σⱼ exp(x[j])`, the row's max taken out first so no term overflows.
#[inline(always)]
pub(crate) fn log_sum_exp(x: &[f32]) -> f32 {
    let max = max(x);
    // Lanes of partial sums, so the loop vectorises (a single f32 sum would have to run in
    // order).
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += exp(v - max);
        }
    }
    max + (lanes.iter().sum::<f32>() + tail).ln()
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

/// `eˣ` to within 2.5 ulp for `x ≤ 88`, in arithmetic that vectorises: `x = k·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor series to r⁶ (error < r⁷/7! ≈ 6e-8), times `2ᵏ` built
/// in the exponent bits. Below −87 it returns 0 (attention masks keys with −∞).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so `k·LN2_HI` is exact and `r` keeps its low bits.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to the nearest integer without a branch, and leaves that integer
    // in the low bits of the sum: `2ᵏ` comes from integer arithmetic on them, not from a
    // float-to-int conversion (Rust's saturating `as` does not vectorise).
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let e = p * f32::from_bits(k_bits.wrapping_add(127) << 23);
    if below { 0.0 } else { e }
}

/// f32 lanes of one vector register (AVX-512).
pub(crate) const LANES: usize = 16;

/// A block of `LANES` values copied out of the front of a slice. Working on copies tells the
/// compiler that blocks of different slices cannot overlap, so a block is one vector operation
/// (on slices a loop of known length unrolls into scalar code instead).
#[inline(always)]
pub(crate) fn block(x: &[f32]) -> [f32; LANES] {
    x[..LANES].try_into().expect("a whole block")
}

/// Reductions in `LANES` lanes, so they vectorise (one running f32 would have to go in order),
/// then across the lanes in halves.
#[inline(always)]
fn reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let mut xs = x.chunks_exact(LANES);
    for x in &mut xs {
        let x = block(x);
        for k in 0..LANES {
            lanes[k] = f(lanes[k], x[k]);
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(xs.remainder()) {
        *lane = f(*lane, x);
    }
    let mut width = LANES / 2;
    while width > 0 {
        for k in 0..width {
            lanes[k] = f(lanes[k], lanes[k + width]);
        }
        width /= 2;
    }
    lanes[0]
}

#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, |a, b| if a > b { a } else { b })
}

#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, b| a + b)
}

#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut ys = y[..x.len()].chunks_exact(LANES);
    for (x, y) in (&mut xs).zip(&mut ys) {
        let (x, y) = (block(x), block(y));
        for k in 0..LANES {
            lanes[k] += x[k] * y[k];
        }
    }
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
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
    let (g, u) = (f32s(gate), f32s(up));
    assert_eq!(g.len(), u.len(), "gate and up differ in shape");
    // SAFETY: a `Pointwise` kernel writes its whole output.
    let [out] = unsafe {
        written(g.len(), |at, [out]| {
            dispatch(Pointwise::Swiglu {
                g: &g[at.clone()],
                u: &u[at],
                out,
            })
        })
    };
    FlexTensor::from_data(TensorData::new(out, gate.layout().shape().clone()))
}

/// Elements per parallel task of the elementwise ops.
const CHUNK: usize = 1 << 14;

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
        let (g, x, u) = (f32s(&grad), f32s(&gate), f32s(&up));
        assert!(x.len() == g.len() && u.len() == g.len(), "shapes differ");
        // SAFETY: a `Pointwise` kernel writes its whole output.
        let [d_gate, d_up] = unsafe {
            written(g.len(), |at, [d_gate, d_up]| {
                dispatch(Pointwise::SwigluGrad {
                    g: &g[at.clone()],
                    x: &x[at.clone()],
                    u: &u[at],
                    d_gate,
                    d_up,
                })
            })
        };
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

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
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
    let values = f32s(x);
    // SAFETY: a `Pointwise` kernel writes its whole output.
    let [out] = unsafe {
        written(values.len(), |at, [out]| {
            let x = &values[at];
            dispatch(Pointwise::Gelu { x, out })
        })
    };
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
            let (g, x) = (f32s(&grad), f32s(&x));
            assert_eq!(g.len(), x.len(), "shapes differ");
            // SAFETY: a `Pointwise` kernel writes its whole output.
            let [out] = unsafe {
                written(g.len(), |at, [out]| {
                    dispatch(Pointwise::GeluGrad {
                        g: &g[at.clone()],
                        x: &x[at],
                        out,
                    })
                })
            };
            FlexTensor::from_data(TensorData::new(out, grad.layout().shape().clone()))
        });
    }
}

/// `(Φ(x), φ(x))`, the standard normal CDF and density. `Φ` goes through `erf` by Abramowitz
/// and Stegun 7.1.26 (within 1.5e-7), whose `e^(−x²/2)` is the density's too, so one `exp`
/// serves both; all of it vectorises.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let a = x.abs() * FRAC_1_SQRT_2;
    let gauss = exp(-a * a);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf = 1.0 - poly * gauss;
    let erf = if x < 0.0 { -erf } else { erf };
    (0.5 * (1.0 + erf), FRAC_1_SQRT_2PI * gauss)
}

/// `N` new buffers of `len` values, filled in parallel chunks of [`CHUNK`]: `fill(at, outs)`
/// gets the elements `at` of each. Not zeroed first: zeroing was a pass over each output for nothing,
/// up to 2% of a step.
///
/// # Safety
/// `fill` must write every element of the chunks it is given (or panic). A [`Pointwise`]
/// kernel does: it slices each input to its output's length, which panics on a short one.
unsafe fn written<const N: usize>(
    len: usize,
    fill: impl Fn(std::ops::Range<usize>, [&mut [MaybeUninit<f32>]; N]) + Sync,
) -> [Vec<f32>; N] {
    let mut outs = [(); N].map(|()| Vec::with_capacity(len));
    let chunks: Vec<[&mut [MaybeUninit<f32>]; N]> = {
        let mut per_out = outs
            .each_mut()
            .map(|out| out.spare_capacity_mut().chunks_mut(CHUNK));
        std::iter::from_fn(|| {
            let chunk = per_out.each_mut().map(|it| it.next());
            chunk
                .iter()
                .all(Option::is_some)
                .then(|| chunk.map(Option::unwrap))
        })
        .collect()
    };
    chunks
        .into_par_iter()
        .enumerate()
        .for_each(|(i, chunk)| fill(i * CHUNK..i * CHUNK + chunk[0].len(), chunk));
    for out in &mut outs {
        // SAFETY: `fill` wrote every element of every chunk.
        unsafe { out.set_len(len) };
    }
    outs
}

/// One chunk of an elementwise op and its gradient, each output written whole.
enum Pointwise<'a> {
    /// `silu(g) · u`.
    Swiglu {
        g: &'a [f32],
        u: &'a [f32],
        out: &'a mut [MaybeUninit<f32>],
    },
    /// With `σ = sigmoid(x)`: `∂up = g · x·σ`, `∂gate = g · u · σ·(1 + x·(1 − σ))`.
    SwigluGrad {
        g: &'a [f32],
        x: &'a [f32],
        u: &'a [f32],
        d_gate: &'a mut [MaybeUninit<f32>],
        d_up: &'a mut [MaybeUninit<f32>],
    },
    /// `x·Φ(x)`.
    Gelu {
        x: &'a [f32],
        out: &'a mut [MaybeUninit<f32>],
    },
    /// `g · (Φ(x) + x·φ(x))`.
    GeluGrad {
        g: &'a [f32],
        x: &'a [f32],
        out: &'a mut [MaybeUninit<f32>],
    },
}

impl Kernel for Pointwise<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        match self {
            Self::Swiglu { g, u, out } => {
                for ((o, &x), &u) in out.iter_mut().zip(g).zip(u) {
                    o.write(x * sigmoid(x) * u);
                }
            }
            Self::SwigluGrad {
                g,
                x,
                u,
                d_gate,
                d_up,
            } => {
                let n = d_gate.len();
                let (g, x, u, d_up) = (&g[..n], &x[..n], &u[..n], &mut d_up[..n]);
                for i in 0..n {
                    let s = sigmoid(x[i]);
                    d_up[i].write(g[i] * x[i] * s);
                    d_gate[i].write(g[i] * u[i] * s * (1.0 + x[i] * (1.0 - s)));
                }
            }
            Self::Gelu { x, out } => {
                for (o, &x) in out.iter_mut().zip(x) {
                    o.write(x * normal_cdf_pdf(x).0);
                }
            }
            Self::GeluGrad { g, x, out } => {
                for ((o, &g), &x) in out.iter_mut().zip(g).zip(x) {
                    let (cdf, pdf) = normal_cdf_pdf(x);
                    o.write(g * (cdf + x * pdf));
                }
            }
        }
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
    let (values, g) = (f32s(x), f32s(gamma));
    let width = g.len();
    let mut out = vec![0f32; values.len()];
    let mut inv = vec![0f32; values.len() / width];
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(values.par_chunks(rows * width))
        .zip(inv.par_chunks_mut(rows))
        .for_each(|((out, x), inv)| {
            dispatch(RmsRows {
                x,
                gamma: g,
                eps,
                out,
                inv,
            })
        });
    let out = FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()));
    (out, inv)
}

struct RmsRows<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    eps: f32,
    out: &'a mut [f32],
    inv: &'a mut [f32],
}

impl Kernel for RmsRows<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let width = self.gamma.len();
        for ((x, out), inv) in self
            .x
            .chunks_exact(width)
            .zip(self.out.chunks_exact_mut(width))
            .zip(self.inv.iter_mut())
        {
            *inv = 1.0 / (dot(x, x) / width as f32 + self.eps).sqrt();
            for ((o, &x), &g) in out.iter_mut().zip(x).zip(self.gamma) {
                *o = x * *inv * g;
            }
        }
    }
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
        let width = g.len();
        let rows = (CHUNK / width).max(1);
        let [x_parent, gamma_parent] = ops.parents;
        if let Some(node) = x_parent {
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(rows * width)
                .zip(dy.par_chunks(rows * width).zip(xs.par_chunks(rows * width)))
                .zip(inv.par_chunks(rows))
                .for_each(|((dx, (dy, x)), inv)| {
                    dispatch(RmsRowsGrad {
                        dy,
                        x,
                        gamma: g,
                        inv,
                        dx,
                    })
                });
            let shape = x.layout().shape().clone();
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
        if let Some(node) = gamma_parent {
            let mut dg = vec![0f32; width];
            for ((dy, x), &r) in dy
                .chunks_exact(width)
                .zip(xs.chunks_exact(width))
                .zip(&*inv)
            {
                for ((dg, &dy), &x) in dg.iter_mut().zip(dy).zip(x) {
                    *dg += dy * x * r;
                }
            }
            let d = FlexTensor::from_data(TensorData::new(dg, [width]));
            grads.register::<Flex>(node.id, d);
        }
    }
}

struct RmsRowsGrad<'a> {
    dy: &'a [f32],
    x: &'a [f32],
    gamma: &'a [f32],
    inv: &'a [f32],
    dx: &'a mut [f32],
}

impl Kernel for RmsRowsGrad<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let width = self.gamma.len();
        let rows = self
            .dy
            .chunks_exact(width)
            .zip(self.x.chunks_exact(width))
            .zip(self.dx.chunks_exact_mut(width))
            .zip(self.inv);
        for (((dy, x), dx), &r) in rows {
            for ((dx, &dy), &g) in dx.iter_mut().zip(dy).zip(self.gamma) {
                *dx = dy * g;
            }
            let c = dot(dx, x) * r * r * r / width as f32;
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = r * *dx - c * x;
            }
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
    let (values, g, b) = (f32s(x), f32s(gamma), f32s(beta));
    let width = g.len();
    let mut out = vec![0f32; values.len()];
    let mut stats = vec![(0f32, 0f32); values.len() / width];
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(values.par_chunks(rows * width))
        .zip(stats.par_chunks_mut(rows))
        .for_each(|((out, x), stats)| {
            dispatch(LayerNormRows {
                x,
                gamma: g,
                beta: b,
                eps,
                out,
                stats,
            })
        });
    let out = FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()));
    (out, stats)
}

struct LayerNormRows<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f32,
    out: &'a mut [f32],
    stats: &'a mut [(f32, f32)],
}

impl Kernel for LayerNormRows<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let width = self.gamma.len();
        let n = width as f32;
        for ((x, out), stats) in self
            .x
            .chunks_exact(width)
            .zip(self.out.chunks_exact_mut(width))
            .zip(self.stats.iter_mut())
        {
            let mean = sum(x) / n;
            // Centred first, then squared: the variance of values far from zero keeps its
            // digits.
            for (o, &x) in out.iter_mut().zip(x) {
                *o = x - mean;
            }
            let r = 1.0 / (dot(out, out) / n + self.eps).sqrt();
            for ((o, &g), &b) in out.iter_mut().zip(self.gamma).zip(self.beta) {
                *o = *o * r * g + b;
            }
            *stats = (mean, r);
        }
    }
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
        let rows = (CHUNK / width).max(1);
        let [x_parent, gamma_parent, beta_parent] = ops.parents;
        if let Some(node) = x_parent {
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(rows * width)
                .zip(dy.par_chunks(rows * width).zip(xs.par_chunks(rows * width)))
                .zip(stats.par_chunks(rows))
                .for_each(|((dx, (dy, x)), stats)| {
                    dispatch(LayerNormRowsGrad {
                        dy,
                        x,
                        gamma: g,
                        stats,
                        dx,
                    })
                });
            let shape = x.layout().shape().clone();
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
        if let Some(node) = gamma_parent {
            let mut dg = vec![0f32; width];
            let rows = dy.chunks_exact(width).zip(xs.chunks_exact(width));
            for ((dy, x), &(mean, r)) in rows.zip(&*stats) {
                for ((dg, &dy), &x) in dg.iter_mut().zip(dy).zip(x) {
                    *dg += dy * (x - mean) * r;
                }
            }
            let d = FlexTensor::from_data(TensorData::new(dg, [width]));
            grads.register::<Flex>(node.id, d);
        }
        if let Some(node) = beta_parent {
            let mut db = vec![0f32; width];
            for dy in dy.chunks_exact(width) {
                db.iter_mut().zip(dy).for_each(|(db, &dy)| *db += dy);
            }
            let d = FlexTensor::from_data(TensorData::new(db, [width]));
            grads.register::<Flex>(node.id, d);
        }
    }
}

struct LayerNormRowsGrad<'a> {
    dy: &'a [f32],
    x: &'a [f32],
    gamma: &'a [f32],
    stats: &'a [(f32, f32)],
    dx: &'a mut [f32],
}

impl Kernel for LayerNormRowsGrad<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let width = self.gamma.len();
        let n = width as f32;
        let rows = self
            .dy
            .chunks_exact(width)
            .zip(self.x.chunks_exact(width))
            .zip(self.dx.chunks_exact_mut(width))
            .zip(self.stats);
        for (((dy, x), dx), &(mean, r)) in rows {
            // `dx` holds `u` first.
            for ((dx, &dy), &g) in dx.iter_mut().zip(dy).zip(self.gamma) {
                *dx = dy * g;
            }
            let sum_u = sum(dx);
            let (mean_u, mean_ux) = (sum_u / n, (dot(dx, x) - mean * sum_u) * r / n);
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = r * (*dx - mean_u - (x - mean) * r * mean_ux);
            }
        }
    }
}

/// A kernel to be compiled for the CPU at hand. A closure would not do: the kernel's body,
/// inlined into it, makes it too big to inline into the AVX-512 wrapper, and it stays generic
/// x86-64 code.
pub(crate) trait Kernel {
    type Out;
    /// Must be `#[inline(always)]`, and so must everything it calls in its loops.
    fn run<M: MulAdd>(self) -> Self::Out;
}

/// Runs `kernel` compiled for AVX-512 and FMA where the CPU has them: kernels' loops work on
/// whole vectors of `LANES`, each then one instruction.
pub(crate) fn dispatch<K: Kernel>(kernel: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { dispatch_avx512(kernel) };
    }
    kernel.run::<Separate>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dispatch_avx512<K: Kernel>(kernel: K) -> K::Out {
    kernel.run::<Fma>()
}

/// `a·b + c` as a kernel computes it: one fused instruction where the CPU has FMA, a multiply
/// and an add elsewhere (`f32::mul_add` without FMA is a library call, far slower than both).
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

pub(crate) struct Fma;

impl MulAdd for Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

pub(crate) struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
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

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        // 2.5 ulp: 2.5 · 2⁻²³.
        assert!(worst < 3.0e-7, "worst relative error {worst}");
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

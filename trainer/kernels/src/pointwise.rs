//! Elementwise ops and their gradients, each a [`Pointwise`] kernel run in parallel chunks
//! over outputs that are never zeroed first.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::dispatch::{Isa, Kernel, MulAdd};
use crate::vector::{normal_cdf_pdf, sigmoid};

/// Elements per parallel task of the elementwise and row-wise ops.
pub(crate) const CHUNK: usize = 1 << 14;

/// `silu(gate) · up`, the Llama MLP's activation.
pub fn swiglu(isa: Isa, gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up differ in shape");
    // SAFETY: a `Pointwise` kernel writes its whole output.
    let [out] = unsafe {
        written(gate.len(), |at, [out]| {
            isa.run(Pointwise::Swiglu {
                g: &gate[at.clone()],
                u: &up[at],
                out,
            })
        })
    };
    out
}

/// `(∂gate, ∂up)` of [`swiglu`] for the upstream gradient `grad`.
pub fn swiglu_grad(isa: Isa, grad: &[f32], gate: &[f32], up: &[f32]) -> [Vec<f32>; 2] {
    assert!(
        gate.len() == grad.len() && up.len() == grad.len(),
        "shapes differ"
    );
    // SAFETY: a `Pointwise` kernel writes its whole output.
    unsafe {
        written(grad.len(), |at, [d_gate, d_up]| {
            isa.run(Pointwise::SwigluGrad {
                g: &grad[at.clone()],
                x: &gate[at.clone()],
                u: &up[at],
                d_gate,
                d_up,
            })
        })
    }
}

/// `x·Φ(x)`, with `Φ` the standard normal CDF (transformers' exact `gelu`).
pub fn gelu(isa: Isa, x: &[f32]) -> Vec<f32> {
    // SAFETY: a `Pointwise` kernel writes its whole output.
    let [out] = unsafe {
        written(x.len(), |at, [out]| {
            isa.run(Pointwise::Gelu { x: &x[at], out })
        })
    };
    out
}

/// `∂x` of [`gelu`] for the upstream gradient `grad`.
pub fn gelu_grad(isa: Isa, grad: &[f32], x: &[f32]) -> Vec<f32> {
    assert_eq!(grad.len(), x.len(), "shapes differ");
    // SAFETY: a `Pointwise` kernel writes its whole output.
    let [out] = unsafe {
        written(grad.len(), |at, [out]| {
            isa.run(Pointwise::GeluGrad {
                g: &grad[at.clone()],
                x: &x[at],
                out,
            })
        })
    };
    out
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

//! The two norms, each one pass per direction over rows of `width` values that keeps a float
//! or two per row for the backward: RMSNorm (Llama) and LayerNorm (BERT), both in f32 as
//! transformers computes them.

use rayon::prelude::*;

use crate::dispatch::{Isa, Kernel, MulAdd};
use crate::pointwise::CHUNK;
use crate::vector::{dot, sum};

/// `x / √(mean(x²) + ε) · γ` of each row of `x`: `(output, 1/√(mean(x²) + ε) of each row)`.
pub fn rms_norm(isa: Isa, x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let mut out = vec![0f32; x.len()];
    let mut inv = vec![0f32; x.len() / width];
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width))
        .zip(inv.par_chunks_mut(rows))
        .for_each(|((out, x), inv)| {
            isa.run(RmsRows {
                x,
                gamma,
                eps,
                out,
                inv,
            })
        });
    (out, inv)
}

/// `∂x` of [`rms_norm`]: with `r` a row's `1/√(mean(x²) + ε)` and `u = ∂y∘γ`,
/// `∂x = r·u − x·r³·mean(u∘x)`.
pub fn rms_norm_dx(isa: Isa, dy: &[f32], x: &[f32], gamma: &[f32], inv: &[f32]) -> Vec<f32> {
    let width = gamma.len();
    let rows = (CHUNK / width).max(1);
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(rows * width)
        .zip(dy.par_chunks(rows * width).zip(x.par_chunks(rows * width)))
        .zip(inv.par_chunks(rows))
        .for_each(|((dx, (dy, x)), inv)| {
            isa.run(RmsRowsGrad {
                dy,
                x,
                gamma,
                inv,
                dx,
            })
        });
    dx
}

/// `∂γ` of [`rms_norm`]: `Σ_rows ∂y∘x·r`.
pub fn rms_norm_dgamma(dy: &[f32], x: &[f32], inv: &[f32], width: usize) -> Vec<f32> {
    let mut dg = vec![0f32; width];
    for ((dy, x), &r) in dy.chunks_exact(width).zip(x.chunks_exact(width)).zip(inv) {
        for ((dg, &dy), &x) in dg.iter_mut().zip(dy).zip(x) {
            *dg += dy * x * r;
        }
    }
    dg
}

/// `(x − mean(x)) / √(var(x) + ε) · γ + β` of each row of `x` (biased variance, as
/// `nn.LayerNorm`): `(output, (mean, 1/√(var + ε)) of each row)`.
pub fn layer_norm(
    isa: Isa,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<(f32, f32)>) {
    let width = gamma.len();
    let mut out = vec![0f32; x.len()];
    let mut stats = vec![(0f32, 0f32); x.len() / width];
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width))
        .zip(stats.par_chunks_mut(rows))
        .for_each(|((out, x), stats)| {
            isa.run(LayerNormRows {
                x,
                gamma,
                beta,
                eps,
                out,
                stats,
            })
        });
    (out, stats)
}

/// `∂x` of [`layer_norm`]: with `x̂ = (x − mean)·r` and `u = ∂y∘γ`,
/// `∂x = r·(u − mean(u) − x̂·mean(u∘x̂))`.
pub fn layer_norm_dx(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    stats: &[(f32, f32)],
) -> Vec<f32> {
    let width = gamma.len();
    let rows = (CHUNK / width).max(1);
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(rows * width)
        .zip(dy.par_chunks(rows * width).zip(x.par_chunks(rows * width)))
        .zip(stats.par_chunks(rows))
        .for_each(|((dx, (dy, x)), stats)| {
            isa.run(LayerNormRowsGrad {
                dy,
                x,
                gamma,
                stats,
                dx,
            })
        });
    dx
}

/// `(∂γ, ∂β)` of [`layer_norm`]: `Σ_rows ∂y∘x̂` and `Σ_rows ∂y`.
pub fn layer_norm_dgamma_dbeta(
    dy: &[f32],
    x: &[f32],
    stats: &[(f32, f32)],
    width: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut db) = (vec![0f32; width], vec![0f32; width]);
    let rows = dy.chunks_exact(width).zip(x.chunks_exact(width));
    for ((dy, x), &(mean, r)) in rows.zip(stats) {
        for (((dg, db), &dy), &x) in dg.iter_mut().zip(&mut db).zip(dy).zip(x) {
            *dg += dy * (x - mean) * r;
            *db += dy;
        }
    }
    (dg, db)
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

//! Building blocks of the kernels, on `f32` slices: blocks of one vector register, reductions
//! in lanes, and the transcendental functions, all in arithmetic that vectorises. Everything
//! here is `#[inline(always)]`: a kernel's loops inline it and are compiled for its [`Isa`].
//!
//! [`Isa`]: crate::Isa

/// `eˣ` to within 2.5 ulp for `x ≤ 88`, in arithmetic that vectorises: `x = k·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor series to r⁶ (error < r⁷/7! ≈ 6e-8), times `2ᵏ` built
/// in the exponent bits. Below −87 it returns 0 (attention masks keys with −∞).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
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
pub const LANES: usize = 16;

/// A block of `LANES` values copied out of the front of a slice. Working on copies tells the
/// compiler that blocks of different slices cannot overlap, so a block is one vector operation
/// (on slices a loop of known length unrolls into scalar code instead).
#[inline(always)]
pub fn block(x: &[f32]) -> [f32; LANES] {
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
pub fn max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, |a, b| if a > b { a } else { b })
}

#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, b| a + b)
}

#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
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

/// `log Σⱼ exp(x[j])`, the row's max taken out first so no term overflows.
#[inline(always)]
pub fn log_sum_exp(x: &[f32]) -> f32 {
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

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `(Φ(x), φ(x))`, the standard normal CDF and density. `Φ` goes through `erf` by Abramowitz
/// and Stegun 7.1.26 (within 1.5e-7), whose `e^(−x²/2)` is the density's too, so one `exp`
/// serves both; all of it vectorises.
#[inline(always)]
pub fn normal_cdf_pdf(x: f32) -> (f32, f32) {
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

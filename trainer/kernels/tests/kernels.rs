//! Every kernel through every dispatch path, against plain f64 arithmetic written the obvious
//! way. A path this CPU lacks is compiled as ignored, naming what is missing (`build.rs`), so
//! a run says what it did not check.

use flywheel_kernels::amx::{self, Packed, Rounded};
use flywheel_kernels::attention::Plan;
use flywheel_kernels::matrix::{View, gemm, gemm_accumulate, transposed};
use flywheel_kernels::{Isa, head, loss, norm, pointwise, vector};

/// Deterministic values in `[-scale, scale)`, not all on a grid.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `got` within `rel·|want| + abs` of `want`, element by element.
fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        assert!(
            (g - w).abs() <= rel * w.abs() + abs,
            "{what}[{i}]: {g} against {w}"
        );
    }
}

fn phi(x: f64) -> f64 {
    (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The standard normal CDF, by the series of `erf` (exact enough for |x| ≤ 12 in f64).
fn big_phi(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    if z.abs() > 4.0 {
        // The continued fraction's first terms; Φ is 0 or 1 to f32 precision out here.
        return if z > 0.0 { 1.0 } else { 0.0 };
    }
    let (mut term, mut sum, mut n) = (z, z, 0.0);
    while term.abs() > 1e-17 {
        n += 1.0;
        term *= -z * z / n;
        sum += term / (2.0 * n + 1.0);
    }
    0.5 * (1.0 + sum * 2.0 / std::f64::consts::PI.sqrt())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn exp_is_within_a_few_ulp_of_std(isa: Isa) {
    struct Exps<'a>(&'a [f32], &'a mut [f32]);
    impl flywheel_kernels::dispatch::Kernel for Exps<'_> {
        type Out = ();
        #[inline(always)]
        fn run<M: flywheel_kernels::dispatch::MulAdd>(self) {
            for (o, &x) in self.1.iter_mut().zip(self.0) {
                *o = vector::exp(x);
            }
        }
    }
    let xs: Vec<f32> = (-87_000..88_000).map(|i| i as f32 / 1000.0).collect();
    let mut out = vec![0f32; xs.len()];
    isa.run(Exps(&xs, &mut out));
    let worst = xs
        .iter()
        .zip(&out)
        .map(|(&x, &got)| ((got as f64 - (x as f64).exp()) / (x as f64).exp()).abs())
        .fold(0.0, f64::max);
    // 2.5 ulp: 2.5 · 2⁻²³.
    assert!(worst < 3.0e-7, "worst relative error {worst}");
    assert_eq!(vector::exp(-100.0), 0.0, "below −87 is 0");
}

fn reductions_match_sums_in_order(isa: Isa) {
    struct Reduce<'a>(&'a [f32], &'a [f32]);
    impl flywheel_kernels::dispatch::Kernel for Reduce<'_> {
        type Out = [f32; 4];
        #[inline(always)]
        fn run<M: flywheel_kernels::dispatch::MulAdd>(self) -> [f32; 4] {
            let (x, y) = (self.0, self.1);
            [
                vector::max(x),
                vector::sum(x),
                vector::dot(x, y),
                vector::log_sum_exp(x),
            ]
        }
    }
    // Lengths off the 16 lanes, and one shorter than a block.
    for n in [1, 7, 16, 33, 1000] {
        let (x, y) = (values(n, n as u64, 3.0), values(n, 99, 2.0));
        let got = isa.run(Reduce(&x, &y));
        let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        let lse = max as f64
            + x.iter()
                .map(|&v| (v as f64 - max as f64).exp())
                .sum::<f64>()
                .ln();
        assert_eq!(got[0], max, "max of {n}");
        assert_close(
            &format!("sum, dot, lse of {n}"),
            &got[1..],
            &[sum, dot, lse],
            1e-5,
            1e-4,
        );
    }
}

fn pointwise_ops_and_gradients_match(isa: Isa) {
    // Longer than one parallel chunk (2¹⁴), with a short last one.
    let n = (1 << 14) * 2 + 123;
    let (x, up, grad) = (values(n, 1, 8.0), values(n, 2, 2.0), values(n, 3, 1.0));
    let swiglu = pointwise::swiglu(isa, &x, &up);
    let want: Vec<f64> = (0..n)
        .map(|i| x[i] as f64 * sigmoid(x[i] as f64) * up[i] as f64)
        .collect();
    assert_close("swiglu", &swiglu, &want, 1e-5, 1e-6);
    let [d_gate, d_up] = pointwise::swiglu_grad(isa, &grad, &x, &up);
    let (mut want_gate, mut want_up) = (vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let (g, x, u) = (grad[i] as f64, x[i] as f64, up[i] as f64);
        let s = sigmoid(x);
        want_up[i] = g * x * s;
        want_gate[i] = g * u * s * (1.0 + x * (1.0 - s));
    }
    assert_close("swiglu ∂gate", &d_gate, &want_gate, 1e-5, 1e-6);
    assert_close("swiglu ∂up", &d_up, &want_up, 1e-5, 1e-6);

    let gelu = pointwise::gelu(isa, &x);
    let want: Vec<f64> = x.iter().map(|&x| x as f64 * big_phi(x as f64)).collect();
    assert_close("gelu", &gelu, &want, 1e-5, 1e-6);
    let d = pointwise::gelu_grad(isa, &grad, &x);
    let want: Vec<f64> = (0..n)
        .map(|i| {
            let x = x[i] as f64;
            grad[i] as f64 * (big_phi(x) + x * phi(x))
        })
        .collect();
    assert_close("gelu ∂x", &d, &want, 1e-5, 1e-6);
}

fn norms_and_gradients_match(isa: Isa) {
    // Rows wider than a chunk's share and a ragged row count.
    for (rows, width) in [(3, 200), (97, 384), (2, 20_000)] {
        let x: Vec<f32> = values(rows * width, 4, 2.0)
            .iter()
            .map(|v| v + 3.0)
            .collect();
        let (gamma, beta) = (values(width, 5, 1.5), values(width, 6, 0.5));
        let dy = values(rows * width, 7, 1.0);
        let eps = 1e-5;
        let rows_of = |v: &[f32]| -> Vec<Vec<f64>> {
            v.chunks(width)
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect()
        };
        let (xr, dyr) = (rows_of(&x), rows_of(&dy));
        let g: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let n = width as f64;

        // RMSNorm: y = x·r·γ, r = 1/√(mean(x²) + ε).
        let (out, inv) = norm::rms_norm(isa, &x, &gamma, eps as f32);
        let r: Vec<f64> = xr
            .iter()
            .map(|x| 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / n + eps).sqrt())
            .collect();
        let want: Vec<f64> = (0..rows * width)
            .map(|k| xr[k / width][k % width] * r[k / width] * g[k % width])
            .collect();
        assert_close("rms_norm", &out, &want, 1e-5, 1e-5);
        assert_close("rms_norm 1/rms", &inv, &r, 1e-5, 0.0);
        let dx = norm::rms_norm_dx(isa, &dy, &x, &gamma, &inv);
        let mut want = Vec::new();
        for i in 0..rows {
            let u: Vec<f64> = (0..width).map(|j| dyr[i][j] * g[j]).collect();
            let mean_ux = u.iter().zip(&xr[i]).map(|(u, x)| u * x).sum::<f64>() / n;
            want.extend((0..width).map(|j| r[i] * u[j] - xr[i][j] * r[i].powi(3) * mean_ux));
        }
        assert_close("rms_norm ∂x", &dx, &want, 1e-4, 1e-5);
        let dg = norm::rms_norm_dgamma(&dy, &x, &inv, width);
        let want: Vec<f64> = (0..width)
            .map(|j| (0..rows).map(|i| dyr[i][j] * xr[i][j] * r[i]).sum())
            .collect();
        assert_close("rms_norm ∂γ", &dg, &want, 1e-4, 1e-4);

        // LayerNorm: y = (x − μ)·r·γ + β, r = 1/√(var + ε).
        let (out, stats) = norm::layer_norm(isa, &x, &gamma, &beta, eps as f32);
        let mut want = Vec::new();
        let mut want_stats = Vec::new();
        for x in &xr {
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let r = 1.0 / (var + eps).sqrt();
            want.extend((0..width).map(|j| (x[j] - mean) * r * g[j] + beta[j] as f64));
            want_stats.push((mean, r));
        }
        assert_close("layer_norm", &out, &want, 1e-4, 1e-4);
        let flat: Vec<f32> = stats.iter().flat_map(|&(m, r)| [m, r]).collect();
        let want_flat: Vec<f64> = want_stats.iter().flat_map(|&(m, r)| [m, r]).collect();
        assert_close("layer_norm stats", &flat, &want_flat, 1e-4, 1e-5);
        let dx = norm::layer_norm_dx(isa, &dy, &x, &gamma, &stats);
        let mut want = Vec::new();
        for i in 0..rows {
            let (mean, r) = want_stats[i];
            let xhat: Vec<f64> = xr[i].iter().map(|x| (x - mean) * r).collect();
            let u: Vec<f64> = (0..width).map(|j| dyr[i][j] * g[j]).collect();
            let mean_u = u.iter().sum::<f64>() / n;
            let mean_ux = u.iter().zip(&xhat).map(|(u, x)| u * x).sum::<f64>() / n;
            want.extend((0..width).map(|j| r * (u[j] - mean_u - xhat[j] * mean_ux)));
        }
        assert_close("layer_norm ∂x", &dx, &want, 1e-3, 1e-4);
        let (dg, db) = norm::layer_norm_dgamma_dbeta(&dy, &x, &stats, width);
        let want_g: Vec<f64> = (0..width)
            .map(|j| {
                (0..rows)
                    .map(|i| dyr[i][j] * (xr[i][j] - want_stats[i].0) * want_stats[i].1)
                    .sum()
            })
            .collect();
        let want_b: Vec<f64> = (0..width)
            .map(|j| (0..rows).map(|i| dyr[i][j]).sum())
            .collect();
        assert_close("layer_norm ∂γ", &dg, &want_g, 1e-3, 1e-4);
        assert_close("layer_norm ∂β", &db, &want_b, 1e-4, 1e-4);
    }
}

fn target_log_probs_and_gradient_match(isa: Isa) {
    let (rows, vocab) = (6, 1000);
    let logits = values(rows * vocab, 8, 16.0);
    let targets = [0, 999, 17, 500, 3, 17];
    let grad = [1.0f32, 2.0, 0.5, 1.0, 3.0, 1.0];
    let (out, lse) = loss::target_log_probs(isa, &logits, &targets, vocab);
    let mut want_lse = Vec::new();
    let mut want = Vec::new();
    let mut want_grad = Vec::new();
    for (i, row) in logits.chunks(vocab).enumerate() {
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let l = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        want_lse.push(l);
        want.push(row[targets[i]] as f64 - l);
        for (j, &v) in row.iter().enumerate() {
            let onehot = if j == targets[i] { 1.0 } else { 0.0 };
            want_grad.push(grad[i] as f64 * (onehot - (v as f64 - l).exp()));
        }
    }
    assert_close("log p", &out, &want, 1e-5, 1e-4);
    assert_close("lse", &lse, &want_lse, 1e-6, 1e-4);
    let d = loss::target_log_probs_grad(isa, &grad, &logits, &lse, &targets, vocab);
    assert_close("∂logits", &d, &want_grad, 1e-4, 1e-6);
}

/// Naive attention in f64 from the plan's own key ranges and rotary tables: `(out, ∂q, ∂k,
/// ∂v)` for the upstream gradient `dout`.
fn reference_attention(plan: &Plan, [q, k, v]: [&[f32]; 3], dout: &[f32]) -> [Vec<f64>; 4] {
    let [batch, seq] = plan.batch_seq();
    let [heads, kv_heads, d] = plan.heads();
    let group = heads / kv_heads;
    let half = d / 2;
    let rotate = |token: usize, x: &[f64], back: bool| -> Vec<f64> {
        let Some((cos, sin)) = plan.rope() else {
            return x.to_vec();
        };
        let (c, s) = (&cos[token * d..][..d], &sin[token * d..][..d]);
        (0..d)
            .map(|j| {
                let other = (j + half) % d;
                match back {
                    // (Rx)[j] = c[j]·x[j] + s[j]·x[j'], so (Rᵀy)[j] = c[j]·y[j] + s[j']·y[j'].
                    false => c[j] as f64 * x[j] + s[j] as f64 * x[other],
                    true => c[j] as f64 * x[j] + s[other] as f64 * x[other],
                }
            })
            .collect()
    };
    let at = |t: &[f32], width: usize, token: usize, h: usize| -> Vec<f64> {
        t[(token * width + h) * d..][..d]
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    let scale = plan.scale() as f64;
    let mut out = vec![0.0; q.len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..batch {
        for h in 0..heads {
            let g = h / group;
            for i in 0..seq {
                let token = b * seq + i;
                let (lo, hi) = plan.keys()[token];
                let qr: Vec<f64> = rotate(token, &at(q, heads, token, h), false)
                    .iter()
                    .map(|x| x * scale)
                    .collect();
                let keys: Vec<(usize, Vec<f64>, Vec<f64>)> = (lo as usize..hi as usize)
                    .map(|j| {
                        let key = b * seq + j;
                        (
                            key,
                            rotate(key, &at(k, kv_heads, key, g), false),
                            at(v, kv_heads, key, g),
                        )
                    })
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|(_, kr, _)| kr.iter().zip(&qr).map(|(a, b)| a * b).sum())
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|e| e / total).collect();
                let o = &mut out[(token * heads + h) * d..][..d];
                for (p, (_, _, vj)) in p.iter().zip(&keys) {
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                }
                let go = at(dout, heads, token, h);
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|(_, _, vj)| vj.iter().zip(&go).map(|(a, b)| a * b).sum())
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                let mut dqr = vec![0.0; d];
                for (j, (key, kr, _)) in keys.iter().enumerate() {
                    let ds = p[j] * (dp[j] - pdp);
                    let dvj = &mut dv[(key * kv_heads + g) * d..][..d];
                    dvj.iter_mut().zip(&go).for_each(|(dv, g)| *dv += p[j] * g);
                    dqr.iter_mut().zip(kr).for_each(|(dq, k)| *dq += ds * k);
                    let dkr: Vec<f64> = qr.iter().map(|q| ds * q).collect();
                    let dkj = rotate(*key, &dkr, true);
                    let dst = &mut dk[(key * kv_heads + g) * d..][..d];
                    dst.iter_mut().zip(&dkj).for_each(|(a, b)| *a += b);
                }
                let dqj = rotate(token, &dqr, true);
                let dst = &mut dq[(token * heads + h) * d..][..d];
                dst.iter_mut().zip(&dqj).for_each(|(a, b)| *a = b * scale);
            }
        }
    }
    [out, dq, dk, dv]
}

fn attention_and_gradients_match(isa: Isa) {
    // Packed causal rows with GQA and rotary embeddings (two sequences and padding in the
    // first row, a full one in the second), and a padded bidirectional batch. Head width 40
    // pads to 64 and its rotary halves leave a ragged 4.
    let (b, s) = (2, 11);
    let causal = {
        let segments: [&[usize]; 2] = [&[4, 5], &[11]];
        let (mut keys, mut positions) = (Vec::new(), Vec::new());
        for lengths in segments {
            let mut start = 0;
            for &n in lengths {
                for p in 0..n {
                    keys.push((start as u32, (start + p + 1) as u32));
                    positions.push(p as u32);
                }
                start += n;
            }
            for i in start..s {
                keys.push((i as u32, i as u32 + 1));
                positions.push(0);
            }
        }
        Plan::new([b, s], [6, 2, 40], keys, Some((10_000.0, &positions)))
    };
    let bidirectional = {
        let keys = [7u32, 11]
            .iter()
            .flat_map(|&n| std::iter::repeat_n((0, n), s))
            .collect();
        Plan::new([b, s], [3, 3, 8], keys, None)
    };
    for (name, plan) in [("causal", causal), ("bidirectional", bidirectional)] {
        let [heads, kv_heads, d] = plan.heads();
        let q = values(b * s * heads * d, 11, 1.0);
        let (k, v) = (
            values(b * s * kv_heads * d, 12, 1.0),
            values(b * s * kv_heads * d, 13, 1.0),
        );
        let dout = values(q.len(), 14, 1.0);
        let (out, lse) = plan.forward(isa, &q, &k, &v);
        assert_eq!(
            lse.len(),
            b * heads * s,
            "{name}: one log-sum-exp per query and head"
        );
        let grads = plan.backward(isa, [&q, &k, &v], &out, &lse, &dout);
        let [want_out, want_dq, want_dk, want_dv] = reference_attention(&plan, [&q, &k, &v], &dout);
        assert_close(&format!("{name} out"), &out, &want_out, 1e-4, 1e-5);
        for (what, got, want) in [
            ("∂q", &grads[0], want_dq),
            ("∂k", &grads[1], want_dk),
            ("∂v", &grads[2], want_dv),
        ] {
            assert_close(&format!("{name} {what}"), got, &want, 1e-4, 1e-5);
        }
    }
}

/// The rotary tables are HF's: per token, `cos(p·θ^(−2j/d))` for both halves and the sine
/// with `rotate_half`'s sign folded into the first half.
#[test]
fn rotary_tables_are_hf_s() {
    let positions = [0u32, 5, 2, 5];
    let d = 8;
    let plan = Plan::new(
        [1, 4],
        [2, 1, d],
        vec![(0, 1); 4],
        Some((500.0, &positions)),
    );
    let (cos, sin) = plan.rope().expect("rotary tables");
    for (token, &p) in positions.iter().enumerate() {
        for j in 0..d {
            let angle = p as f64 * 500f64.powf(-2.0 * (j % (d / 2)) as f64 / d as f64);
            let sign = if j < d / 2 { -1.0 } else { 1.0 };
            assert!((cos[token * d + j] as f64 - angle.cos()).abs() < 1e-6);
            assert!((sin[token * d + j] as f64 - sign * angle.sin()).abs() < 1e-6);
        }
    }
}

#[test]
fn strided_views_multiply_and_accumulate() {
    let (m, k, n) = (37, 50, 45);
    let (a, b) = (values(m * k, 21, 1.0), values(k * n, 22, 1.0));
    let naive =
        |lhs: &dyn Fn(usize, usize) -> f32, rhs: &dyn Fn(usize, usize) -> f32| -> Vec<f64> {
            let mut out = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    out[i * n + j] = (0..k).map(|p| lhs(i, p) as f64 * rhs(p, j) as f64).sum();
                }
            }
            out
        };
    let want = naive(&|i, p| a[i * k + p], &|p, j| b[p * n + j]);
    let scaled: Vec<f64> = want.iter().map(|w| 0.5 * w).collect();
    assert_close(
        "a·b",
        &gemm(View::rows(&a, m, k), View::rows(&b, k, n), 0.5),
        &scaled,
        1e-5,
        1e-5,
    );
    // The transpose of a row-major bᵀ, by strides: the same product.
    let bt = transposed(&b, k, n, 1.0);
    let by_strides = gemm(View::rows(&a, m, k), View::rows(&bt, n, k).t(), 1.0);
    assert_close("a·(bᵀ)ᵀ", &by_strides, &want, 1e-5, 1e-5);
    let strided = View::strided(&bt, [k, n], [1, k as isize]);
    assert_close(
        "strided",
        &gemm(View::rows(&a, m, k), strided, 1.0),
        &want,
        1e-5,
        1e-5,
    );
    let mut acc = vec![1f32; m * n];
    gemm_accumulate(&mut acc, View::rows(&a, m, k), View::rows(&b, k, n), 2.0);
    let want_acc: Vec<f64> = want.iter().map(|w| 1.0 + 2.0 * w).collect();
    assert_close("1 + 2·a·b", &acc, &want_acc, 1e-5, 1e-5);
    // An empty inner dimension: zeros, or the output untouched.
    let empty = gemm(View::rows(&[], m, 0), View::rows(&[], 0, n), 1.0);
    assert!(empty.iter().all(|&v| v == 0.0));
}

#[test]
#[should_panic(expected = "a view past its storage")]
fn a_view_past_its_storage_is_refused() {
    View::strided(&[0.0; 10], [3, 4], [4, 1]);
}

fn bf16(x: f32) -> f64 {
    half::bf16::from_f32(x).to_f64()
}

/// Odd shapes on purpose: every edge (rows, columns, `k` not a multiple of the tile), both
/// packings, several terms, and long products that go piece by piece (a short last piece, a
/// short last column group), against products of the same bf16-rounded values summed in f64.
fn amx_products_match_bf16_rounded_sums(isa: Isa) {
    assert!(
        amx::available(),
        "this CPU lists AMX-BF16 but the process cannot use it"
    );
    let shapes = [
        (1, 1, 1),
        (37, 50, 45),
        (64, 96, 32),
        (70, 130, 100),
        (40, 5000, 50),
        (33, 4200, 130),
    ];
    for (m, k, n) in shapes {
        let (a, b) = (values(m * k, 1, 1.0), values(k * n, 2, 1.0));
        let by_rows = amx::matmul(isa, &a, m, &Packed::from_rows(isa, &b, k, n));
        let bt = transposed(&b, k, n, 1.0);
        let by_transpose = amx::matmul(isa, &a, m, &Packed::from_transposed(&bt, k, n));
        assert_eq!(
            by_rows, by_transpose,
            "{m}x{k}x{n}: the two packings differ"
        );
        let want: Vec<f64> = (0..m * n)
            .map(|ij| {
                (0..k)
                    .map(|p| bf16(a[ij / n * k + p]) * bf16(b[p * n + ij % n]))
                    .sum()
            })
            .collect();
        assert_close(
            &format!("{m}x{k}x{n}"),
            &by_rows,
            &want,
            1e-5 * k as f64,
            1e-5 * k as f64,
        );
    }
    // Terms sum over their concatenated inner dimension, each padded on its own.
    let (m, n) = (45, 40);
    let terms = [(70, 1), (9, 2)].map(|(k, seed)| {
        let (a, b) = (values(m * k, seed, 1.0), values(k * n, seed + 10, 1.0));
        (
            k,
            Rounded::new(isa, &a, m, k),
            Packed::from_rows(isa, &b, k, n),
            a,
            b,
        )
    });
    let sum = amx::product(&terms.each_ref().map(|(_, a, b, _, _)| (a, b)));
    let want: Vec<f64> = (0..m * n)
        .map(|ij| {
            terms
                .iter()
                .map(|(k, _, _, a, b)| {
                    (0..*k)
                        .map(|p| bf16(a[ij / n * k + p]) * bf16(b[p * n + ij % n]))
                        .sum::<f64>()
                })
                .sum()
        })
        .collect();
    assert_close("two terms", &sum, &want, 1e-4, 1e-4);
}

/// The head's rows against `log softmax` of the bf16 product in f64, values and gradients;
/// chunks of 32 (the last one short) give every row what one chunk does.
fn head_rows_match_log_softmax_of_the_product(isa: Isa) {
    assert!(
        amx::available(),
        "this CPU lists AMX-BF16 but the process cannot use it"
    );
    let (rows, width, vocab) = (70, 40, 300);
    let (h, w) = (
        values(rows * width, 31, 1.0),
        values(width * vocab, 32, 0.25),
    );
    let forward = Packed::from_rows(isa, &w, width, vocab);
    let backward = Packed::from_transposed(&w, vocab, width);
    let targets: Vec<usize> = (0..rows).map(|i| (i * 53 + 7) % vocab).collect();
    let run = |chunk: usize| {
        let mut scratch = head::Scratch::default();
        head::target_log_probs(
            isa,
            &h,
            [&forward, &backward],
            &targets,
            true,
            chunk,
            &mut scratch,
        )
    };
    let (log_p, per_row) = run(128);
    assert_eq!(
        run(32),
        (log_p.clone(), per_row.clone()),
        "chunks change nothing"
    );
    let mut want = Vec::new();
    let mut want_grad = Vec::new();
    for i in 0..rows {
        let logits: Vec<f64> = (0..vocab)
            .map(|j| {
                (0..width)
                    .map(|p| bf16(h[i * width + p]) * bf16(w[p * vocab + j]))
                    .sum()
            })
            .collect();
        let max = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        want.push(logits[targets[i]] - lse);
        for p in 0..width {
            want_grad.push(
                (0..vocab)
                    .map(|j| {
                        let onehot = if j == targets[i] { 1.0 } else { 0.0 };
                        (onehot - (logits[j] - lse).exp()) * w[p * vocab + j] as f64
                    })
                    .sum(),
            );
        }
    }
    assert_close("head log p", &log_p, &want, 1e-4, 1e-4);
    // bf16 keeps 8 bits of each `∂logits`.
    assert_close("head ∂h", &per_row, &want_grad, 0.0, 2e-3);
}

/// Each kernel test once per instruction set, named by it.
macro_rules! on_each_isa {
    ($($test:ident),* $(,)?) => {
        mod portable {
            $( #[test] fn $test() { super::$test(flywheel_kernels::Isa::Portable) } )*
        }
        mod avx512 {
            $(
                #[test]
                #[cfg_attr(not(cpu_avx512), ignore = "this CPU has no AVX-512F with FMA")]
                fn $test() { super::$test(flywheel_kernels::Isa::Avx512) }
            )*
        }
    };
}

on_each_isa!(
    exp_is_within_a_few_ulp_of_std,
    reductions_match_sums_in_order,
    pointwise_ops_and_gradients_match,
    norms_and_gradients_match,
    target_log_probs_and_gradient_match,
    attention_and_gradients_match,
);

/// The tile products, their operands rounded and packed through each instruction set.
#[test]
#[cfg_attr(not(cpu_amx), ignore = "needs a CPU with AMX-BF16")]
fn amx_products_on_each_isa() {
    for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
        amx_products_match_bf16_rounded_sums(isa);
        head_rows_match_log_softmax_of_the_product(isa);
    }
}

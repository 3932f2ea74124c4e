//! An adapted projection, `x·W + bias + s·(x·A)·B`, as one differentiable op on the CPU.
//!
//! Composed from burn's ops it is five nodes (two thin products, a scale, an add and the
//! frozen product) and, backwards, a scale, a sum of two `∂x` and the products' own copies:
//! whole passes over `[rows, out]` and `[rows, in]` for an update of rank 8. Here the thin
//! products go straight to `gemm`, with strides standing in for every transpose, and
//! accumulate in place: the update into the frozen product's output, `s·∂(xA)·Aᵀ` into the
//! frozen product's `∂x`. It keeps `x` and `x·A`, as burn's matmuls would. The frozen product
//! runs on AMX tiles in bf16 where training computes in bf16, in f32 through `gemm` otherwise;
//! in bf16 on a model wide enough ([`update_on_tiles`]) the update runs on the tiles too, and
//! the backward keeps `x` as bf16 packed for `∂A` instead.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Tensor, TensorData};

use crate::bf16::FrozenWeight;
use crate::fused::{contiguous, f32s};
use flywheel_kernels::Isa;
use flywheel_kernels::amx::{self, Packed, Rounded};
use flywheel_kernels::matrix::{View, gemm, gemm_accumulate, transposed};

/// The frozen weight `W` `[in, out]` of an adapted projection.
#[derive(Debug, Clone)]
enum Frozen {
    F32(FlexTensor),
    Bf16(Arc<FrozenWeight>),
}

/// `x·W + bias + s·(x·A)·B`, or `None` when the tensors are not on the CPU backend (the
/// caller then composes it from burn's ops).
///
/// # Shapes
/// - x: `[rows, in]`, weight: `[in, out]`, bias: `[out]`
/// - a: `[in, r]`, b: `[r, out]`
/// - output: `[rows, out]`
pub(crate) fn adapted(
    x: Tensor<2>,
    weight: Tensor<2>,
    packed: Option<&Arc<FrozenWeight>>,
    bias: Option<Tensor<1>>,
    [a, b]: [Tensor<2>; 2],
    scale: f32,
) -> Option<Tensor<2>> {
    let frozen = |weight: Option<FlexTensor>| match packed {
        Some(packed) => Some(Frozen::Bf16(packed.clone())),
        // Not copied contiguous: a weight loaded from PyTorch's `[out, in]` is a transposed
        // view, and `gemm` reads it as it lies.
        None => weight.map(Frozen::F32),
    };
    if let (Ok(x), Ok(a), Ok(b)) = (
        x.clone().try_into_primitive::<Autodiff<Flex>>(),
        a.clone().try_into_primitive::<Autodiff<Flex>>(),
        b.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        let frozen = frozen(untracked(weight))?;
        let bias = match bias {
            Some(bias) => Some(untracked(bias)?),
            None => None,
        };
        let (x, x_node) = x.into_parts();
        let (a, a_node) = a.into_parts();
        let (b, b_node) = b.into_parts();
        let (x, a, b) = (contiguous(x), contiguous(a), contiguous(b));
        let bias = bias.map(contiguous);
        let out = match Adapted
            .prepare::<NoCheckpointing>([x_node, a_node, b_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, z, packed_x) = forward(&x, &frozen, bias.as_ref(), &a, &b, scale, true);
                let path = match (frozen, packed_x) {
                    (Frozen::Bf16(weight), Some(x)) => Path::Tiles {
                        weight,
                        x: Arc::new(x),
                    },
                    (frozen, _) => Path::Gemm { frozen, x },
                };
                let z = Arc::new(z);
                prep.finish(
                    State {
                        path,
                        z,
                        a,
                        b,
                        scale,
                    },
                    y,
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(&x, &frozen, bias.as_ref(), &a, &b, scale, false).0)
            }
        };
        return Some(Tensor::from_primitive::<Autodiff<Flex>>(out));
    }
    let frozen = frozen(weight.try_into_primitive::<Flex>().ok())?;
    let flex = |t: Tensor<2>| t.try_into_primitive::<Flex>().ok().map(contiguous);
    let bias = match bias {
        Some(bias) => Some(contiguous(bias.try_into_primitive::<Flex>().ok()?)),
        None => None,
    };
    let (x, a, b) = (flex(x)?, flex(a)?, flex(b)?);
    let (y, ..) = forward(&x, &frozen, bias.as_ref(), &a, &b, scale, false);
    Some(Tensor::from_primitive::<Flex>(y))
}

/// The flex tensor under an autodiff one, without its graph node: frozen tensors need none.
fn untracked<const D: usize>(t: Tensor<D>) -> Option<FlexTensor> {
    Some(
        t.try_into_primitive::<Autodiff<Flex>>()
            .ok()?
            .into_parts()
            .0,
    )
}

/// `(x·W + bias + s·z·B, z = x·A, x packed for ∂A)`, the last where the update runs on the
/// tiles and `keep` asks for what the backward needs.
fn forward(
    x: &FlexTensor,
    frozen: &Frozen,
    bias: Option<&FlexTensor>,
    a: &FlexTensor,
    b: &FlexTensor,
    scale: f32,
    keep: bool,
) -> (FlexTensor, Vec<f32>, Option<Packed>) {
    let [d_in, r] = dims(a);
    let d_out = dims(b)[1];
    let xs = f32s(x);
    let rows = xs.len() / d_in;
    let isa = Isa::best();
    let x = View::rows(xs, rows, d_in);
    let (a, b) = (f32s(a), f32s(b));
    let (mut y, z, packed_x) = match frozen {
        // The update rides along in the tiles: `x` rounded once serves `x·A` and `x·W`, and
        // `s·z·B` is one more step of the frozen product's inner loop. The same read of `x`
        // packs it for `∂A`, and that (in bf16) is all the backward keeps of it.
        Frozen::Bf16(w) if update_on_tiles(d_in, d_out) => {
            let (x, packed_x) = match keep {
                true => {
                    let (rounded, packed) = Rounded::with_packed(isa, xs, rows, d_in);
                    (rounded, Some(packed))
                }
                false => (Rounded::new(isa, xs, rows, d_in), None),
            };
            let z = amx::product(&[(&x, &Packed::from_rows(isa, a, d_in, r))]);
            let sz = Rounded::new(isa, &scaled(&z, scale), rows, r);
            let y = amx::product(&[
                (&x, &w.forward),
                (&sz, &Packed::from_rows(isa, b, r, d_out)),
            ]);
            (y, z, packed_x)
        }
        _ => {
            let mut y = match frozen {
                Frozen::Bf16(w) => amx::matmul(isa, xs, rows, &w.forward),
                Frozen::F32(w) => gemm(x, view_of(w), 1.0),
            };
            let z = gemm(x, View::rows(a, d_in, r), 1.0);
            gemm_accumulate(
                &mut y,
                View::rows(&z, rows, r),
                View::rows(b, r, d_out),
                scale,
            );
            (y, z, None)
        }
    };
    if let Some(bias) = bias {
        let bias = f32s(bias);
        for row in y.chunks_exact_mut(d_out) {
            row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
    }
    (
        FlexTensor::from_data(TensorData::new(y, [rows, d_out])),
        z,
        packed_x,
    )
}

/// Whether the update of a bf16 projection runs on the tiles too. Padded to the tiles' 32, a
/// rank-8 update costs a tile step of the frozen product's inner loop and products four times
/// its size: against `gemm`'s f32 that pays from a few hundred features (MiniLM's 384 +11%,
/// SmolLM2's 576 +5%), and loses on narrow ones (a 64-wide model −20%).
fn update_on_tiles(d_in: usize, d_out: usize) -> bool {
    d_in.min(d_out) >= 128
}

fn scaled(values: &[f32], scale: f32) -> Vec<f32> {
    values.iter().map(|v| v * scale).collect()
}

fn dims(t: &FlexTensor) -> [usize; 2] {
    let shape = t.layout().shape();
    [shape[0], shape[1]]
}

#[derive(Debug)]
struct Adapted;

/// How the forward ran, and what the backward keeps of `x` for `∂A = s·xᵀ·g`.
#[derive(Debug, Clone)]
// One per adapted projection and step: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Path {
    /// Everything on the tiles; `x` rounded and packed as the right-hand side of `gᵀ·x`.
    Tiles {
        weight: Arc<FrozenWeight>,
        x: Arc<Packed>,
    },
    /// The update through `gemm` in f32, the frozen product as `frozen` says.
    Gemm { frozen: Frozen, x: FlexTensor },
}

#[derive(Debug, Clone)]
struct State {
    path: Path,
    z: Arc<Vec<f32>>,
    a: FlexTensor,
    b: FlexTensor,
    scale: f32,
}

impl Backward<Flex, 3> for Adapted {
    type State = State;

    /// With `g = ∂y·Bᵀ`: `∂x = ∂y·Wᵀ + s·g·Aᵀ`, `∂A = s·xᵀ·g`, `∂B = s·zᵀ·∂y`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            path,
            z,
            a,
            b,
            scale,
        } = ops.state;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let [d_in, r] = dims(&a);
        let d_out = dims(&b)[1];
        let dys = f32s(&dy);
        let rows = dys.len() / d_out;
        let isa = Isa::best();
        let (dy, a, b) = (
            View::rows(dys, rows, d_out),
            View::rows(f32s(&a), d_in, r),
            View::rows(f32s(&b), r, d_out),
        );
        let [x_parent, a_parent, b_parent] = ops.parents;
        let [want_dx, want_da, want_db] =
            [&x_parent, &a_parent, &b_parent].map(|parent| parent.is_some());
        let (dx, da, db) = match &path {
            // As forwards: `∂y` rounded once serves `∂y·Bᵀ` and `∂y·Wᵀ`, and `s·g·Aᵀ` is one
            // more step of the latter's inner loop. The adapters' gradients are products over
            // the rows, `[r, rows]·[rows, n]`, with the rows packed as the right-hand side:
            // `x` by the forward, `∂y` from the same read that rounds it.
            Path::Tiles { weight, x } => {
                let (dy_rows, dy_packed) = match want_db {
                    true => {
                        let (rounded, packed) = Rounded::with_packed(isa, dys, rows, d_out);
                        (rounded, Some(packed))
                    }
                    false => (Rounded::new(isa, dys, rows, d_out), None),
                };
                let g = amx::product(&[(&dy_rows, &Packed::from_transposed(b.data(), d_out, r))]);
                let dx = want_dx.then(|| {
                    let sg = Rounded::new(isa, &scaled(&g, scale), rows, r);
                    let at = Packed::from_transposed(a.data(), r, d_in);
                    amx::product(&[(&dy_rows, &weight.backward), (&sg, &at)])
                });
                let da = want_da.then(|| {
                    let sgt = Rounded::new(isa, &transposed(&g, rows, r, scale), r, rows);
                    transposed(&amx::product(&[(&sgt, x)]), r, d_in, 1.0)
                });
                let db = dy_packed.map(|dy| {
                    let szt = Rounded::new(isa, &transposed(&z, rows, r, scale), r, rows);
                    amx::product(&[(&szt, &dy)])
                });
                (dx, da, db)
            }
            Path::Gemm { frozen, x } => {
                let xs = f32s(x);
                let g = gemm(dy, b.t(), 1.0);
                let g = View::rows(&g, rows, r);
                let dx = want_dx.then(|| {
                    let mut dx = match frozen {
                        Frozen::Bf16(w) => amx::matmul(isa, dys, rows, &w.backward),
                        Frozen::F32(w) => gemm(dy, view_of(w).t(), 1.0),
                    };
                    gemm_accumulate(&mut dx, g, a.t(), scale);
                    dx
                });
                let da = want_da.then(|| gemm(View::rows(xs, rows, d_in).t(), g, scale));
                let db = want_db.then(|| gemm(View::rows(&z, rows, r).t(), dy, scale));
                (dx, da, db)
            }
        };
        let register = |grads: &mut Gradients, node: Option<NodeId>, d: Option<Vec<f32>>, shape| {
            if let (Some(node), Some(d)) = (node, d) {
                grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(d, shape)));
            }
        };
        register(grads, x_parent.map(|node| node.id), dx, [rows, d_in]);
        register(grads, a_parent.map(|node| node.id), da, [d_in, r]);
        register(grads, b_parent.map(|node| node.id), db, [r, d_out]);
    }
}

/// A 2-D tensor as it lies in its storage, transposed or not.
fn view_of(t: &FlexTensor) -> View<'_> {
    let layout = t.layout();
    let strides = layout.strides();
    let data = &t.storage::<f32>()[layout.start_offset()..];
    View::strided(data, dims(t), [strides[0], strides[1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// The op's output and its gradients for x, A and B against the same projection composed
    /// from burn's ops, with and without bias, in f32 and (where AMX is) bf16.
    #[test]
    fn adapted_projection_matches_burns_ops() {
        let device = Device::flex().autodiff();
        let (rows, d_in, d_out, r, scale) = (37, 48, 40, 8, 0.75f32);
        let random = |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Default, &device);
        // Transposed, as weights loaded from PyTorch's `[out, in]` lie.
        let weight = random([d_out, d_in]).transpose();
        let bias: Tensor<1> = Tensor::random([d_out], Distribution::Default, &device);
        let (a, b) = (random([d_in, r]), random([r, d_out]));
        let (x, upstream) = (random([rows, d_in]), random([rows, d_out]));
        let packed = Arc::new(FrozenWeight::new(weight.clone()));
        let mut cases = vec![(None, None), (Some(bias.clone()), None)];
        if flywheel_kernels::amx::available() {
            cases.push((Some(bias), Some(packed.clone())));
        }
        for (bias, packed) in cases {
            let leaves = || [x.clone(), a.clone(), b.clone()].map(|t| t.detach().require_grad());
            let [x1, a1, b1] = leaves();
            let ours = adapted(
                x1.clone(),
                weight.clone(),
                packed.as_ref(),
                bias.clone(),
                [a1.clone(), b1.clone()],
                scale,
            )
            .expect("flex");
            let grads = (ours.clone() * upstream.clone()).sum().backward();
            let ours_grads = [&x1, &a1, &b1].map(|t| t.grad(&grads).unwrap());

            // The frozen product as the tested bf16 op computes it, so only the op's own
            // arithmetic is compared.
            let [x2, a2, b2] = leaves();
            let frozen = match &packed {
                Some(packed) => crate::bf16::frozen_matmul(x2.clone(), packed),
                None => x2.clone().matmul(weight.clone()),
            };
            let mut want = frozen
                + x2.clone()
                    .matmul(a2.clone())
                    .matmul(b2.clone())
                    .mul_scalar(scale);
            if let Some(bias) = &bias {
                want = want + bias.clone().unsqueeze_dim(0);
            }
            let grads = (want.clone() * upstream.clone()).sum().backward();
            let want_grads = [&x2, &a2, &b2].map(|t| t.grad(&grads).unwrap());

            let tolerance = Tolerance::rel_abs(1e-5, 1e-4);
            ours.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), tolerance);
            for (ours, want) in ours_grads.into_iter().zip(want_grads) {
                ours.into_data()
                    .assert_approx_eq::<f32>(&want.into_data(), tolerance);
            }
        }

        // Without autodiff (validation, inference) the same values.
        let plain = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &Device::flex());
        let ours = adapted(
            plain(&x),
            plain(&weight),
            None,
            None,
            [plain(&a), plain(&b)],
            scale,
        )
        .expect("flex");
        let want = x.clone().matmul(weight) + x.matmul(a).matmul(b).mul_scalar(scale);
        ours.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-4));
    }

    /// A wide bf16 projection runs its update on the tiles: every product of bf16-rounded
    /// operands, the rank-r intermediates rounded again where the tiles read them. Against
    /// those products summed in f64.
    #[test]
    #[cfg_attr(not(cpu_amx), ignore = "needs a CPU with AMX-BF16")]
    fn update_on_tiles_matches_bf16_rounded_products() {
        let (rows, d_in, d_out, r, scale) = (37, 160, 136, 8, 0.75f32);
        assert!(update_on_tiles(d_in, d_out));
        let device = Device::flex().autodiff();
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let (x, w, a, b, dy) = (
            values(rows * d_in, 1),
            values(d_in * d_out, 2),
            values(d_in * r, 3),
            values(r * d_out, 4),
            values(rows * d_out, 5),
        );
        let tensor = |v: &[f32], shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device)
        };
        let weight = tensor(&w, [d_in, d_out]);
        let packed = Arc::new(FrozenWeight::new(weight.clone()));
        let [x1, a1, b1] = [(&x, [rows, d_in]), (&a, [d_in, r]), (&b, [r, d_out])]
            .map(|(v, shape)| tensor(v, shape).require_grad());
        let ours = adapted(
            x1.clone(),
            weight,
            Some(&packed),
            None,
            [a1.clone(), b1.clone()],
            scale,
        )
        .expect("flex");
        let grads = (ours.clone() * tensor(&dy, [rows, d_out])).sum().backward();
        let [dx, da, db] = [&x1, &a1, &b1].map(|t| t.grad(&grads).unwrap().into_data());

        let bf = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        let t = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|i| v[(i % rows) * cols + i / rows])
                .collect()
        };
        let s = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| x * scale).collect() };
        // `[m, k] · [k, n]` of row-major matrices, summed in f64.
        let mm = |p: &[f32], q: &[f32], m: usize, k: usize, n: usize| -> Vec<f32> {
            (0..m * n)
                .map(|i| {
                    let (row, col) = (i / n, i % n);
                    (0..k)
                        .map(|j| p[row * k + j] as f64 * q[j * n + col] as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        };
        let add = |p: Vec<f32>, q: Vec<f32>| -> Vec<f32> {
            p.iter().zip(&q).map(|(p, q)| p + q).collect()
        };
        let z = mm(&bf(&x), &bf(&a), rows, d_in, r);
        let y = add(
            mm(&bf(&x), &bf(&w), rows, d_in, d_out),
            mm(&bf(&s(&z)), &bf(&b), rows, r, d_out),
        );
        let g = mm(&bf(&dy), &bf(&t(&b, r, d_out)), rows, d_out, r);
        let want_dx = add(
            mm(&bf(&dy), &bf(&t(&w, d_in, d_out)), rows, d_out, d_in),
            mm(&bf(&s(&g)), &bf(&t(&a, d_in, r)), rows, r, d_in),
        );
        let want_da = t(
            &mm(&bf(&t(&s(&g), rows, r)), &bf(&x), r, rows, d_in),
            r,
            d_in,
        );
        let want_db = mm(&bf(&t(&s(&z), rows, r)), &bf(&dy), r, rows, d_out);

        // The products agree to f32 sums; a rank-r intermediate that rounds to the other
        // neighbour moves a value by a bf16 step of one term, well inside this.
        let tolerance = Tolerance::rel_abs(1e-3, 1e-3);
        for (ours, want, shape) in [
            (ours.into_data(), y, [rows, d_out]),
            (dx, want_dx, [rows, d_in]),
            (da, want_da, [d_in, r]),
            (db, want_db, [r, d_out]),
        ] {
            ours.assert_approx_eq::<f32>(&TensorData::new(want, shape), tolerance);
        }
    }
}

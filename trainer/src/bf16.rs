//! Frozen projections in bf16: `x · W` on AMX tiles, with a backward of its own.
//!
//! burn's matmul would work in f32 (flex has no bf16 kernels). A frozen weight needs no
//! gradient, so its backward is one product, `∂x = ∂y · Wᵀ`, and nothing of `x` has to be kept
//! for it: the op saves only the packed weight, which it shares with every step.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Tensor, TensorData};
use flywheel_kernels::Isa;
use flywheel_kernels::amx::{self, Packed};
use std::sync::Arc;

/// A frozen `[in, out]` weight, rounded to bf16 and packed for `x · W` and for `∂y · Wᵀ`.
#[derive(Debug)]
pub(crate) struct FrozenWeight {
    pub(crate) forward: Packed,
    pub(crate) backward: Packed,
}

impl FrozenWeight {
    pub(crate) fn new(weight: Tensor<2>) -> Self {
        let [d_in, d_out] = weight.dims();
        let data = weight
            .into_data()
            .try_into_vec::<f32>()
            .expect("frozen weights are f32");
        Self {
            forward: Packed::from_rows(Isa::best(), &data, d_in, d_out),
            backward: Packed::from_transposed(&data, d_out, d_in),
        }
    }
}

/// `x · W` with bf16 operands and f32 sums, differentiable in `x`.
///
/// # Shapes
/// - x: `[rows, in]`
/// - output: `[rows, out]`
pub(crate) fn frozen_matmul(x: Tensor<2>, weight: &Arc<FrozenWeight>) -> Tensor<2> {
    if let Ok(tracked) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
        return Tensor::from_primitive::<Autodiff<Flex>>(autodiff_matmul(tracked, weight));
    }
    let plain = x
        .try_into_primitive::<Flex>()
        .expect("bf16 compute runs on the CPU (flex) only");
    Tensor::from_primitive::<Flex>(product(plain, &weight.forward))
}

type AutodiffTensor = <Autodiff<Flex> as burn::backend::BackendTypes>::FloatTensorPrimitive;

fn autodiff_matmul(x: AutodiffTensor, weight: &Arc<FrozenWeight>) -> AutodiffTensor {
    let (x, node) = x.into_parts();
    match FrozenMatmul
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(weight.clone(), product(x, &weight.forward)),
        OpsKind::UnTracked(prep) => prep.finish(product(x, &weight.forward)),
    }
}

#[derive(Debug)]
struct FrozenMatmul;

impl Backward<Flex, 1> for FrozenMatmul {
    type State = Arc<FrozenWeight>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            product(grad, &weight.backward)
        });
    }
}

/// `x · b` for a 2-D f32 flex tensor.
fn product(x: FlexTensor, b: &Packed) -> FlexTensor {
    let x = crate::fused::contiguous(x);
    let values = crate::fused::f32s(&x);
    let rows = values.len() / b.k();
    let out = amx::matmul(Isa::best(), values, rows, b);
    FlexTensor::from_data(TensorData::new(out, [rows, b.n()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// Values on a 1/64 grid in [-2, 2): exact in bf16, so the bf16 products and burn's f32
    /// ones may differ only in the order of their f32 sums.
    fn exact(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 37 + seed * 101) % 256) as f32 / 64.0 - 2.0)
            .collect()
    }

    /// Where the CPU has no AMX, training refuses bf16 compute, saying what to use instead.
    #[cfg(not(cpu_amx))]
    #[test]
    fn bfloat16_is_refused_without_amx() {
        let mut layer = crate::lora::LoraLinear::frozen(
            burn::nn::LinearConfig::new(4, 4).init(&Device::flex()),
        );
        let refused =
            crate::lora::set_compute(crate::spec::Compute::Bfloat16, std::iter::once(&mut layer));
        assert!(refused.unwrap_err().to_string().contains("AMX"));
    }

    #[test]
    #[cfg_attr(not(cpu_amx), ignore = "needs a CPU with AMX-BF16")]
    fn forward_and_input_gradient_match_burns_matmul() {
        assert!(
            amx::available(),
            "this CPU lists AMX-BF16 but the process cannot use it"
        );
        let (rows, d_in, d_out) = (7, 40, 24);
        let device = Device::flex().autodiff();
        let tensor = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v, shape), &device)
        };
        let weight = tensor(exact(d_in, d_out, 1), [d_in, d_out]);
        let upstream = tensor(exact(rows, d_out, 3), [rows, d_out]);
        let packed = Arc::new(FrozenWeight::new(weight.clone()));

        let x = tensor(exact(rows, d_in, 2), [rows, d_in]).require_grad();
        let ours = frozen_matmul(x.clone(), &packed);
        let ours_grad = x.grad(&(ours.clone() * upstream.clone()).sum().backward());

        let x = tensor(exact(rows, d_in, 2), [rows, d_in]).require_grad();
        let burns = x.clone().matmul(weight);
        let burns_grad = x.grad(&(burns.clone() * upstream).sum().backward());

        let tolerance = burn::tensor::Tolerance::absolute(1e-4);
        ours.into_data()
            .assert_approx_eq::<f32>(&burns.into_data(), tolerance);
        ours_grad
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&burns_grad.unwrap().into_data(), tolerance);

        // Without autodiff (validation, inference) the same product.
        let plain = Tensor::<2>::from_data(
            TensorData::new(exact(rows, d_in, 2), [rows, d_in]),
            &Device::flex(),
        );
        let product = frozen_matmul(plain, &packed).into_data();
        let want = tensor(exact(rows, d_in, 2), [rows, d_in])
            .matmul(tensor(exact(d_in, d_out, 1), [d_in, d_out]))
            .into_data();
        product.assert_approx_eq::<f32>(&want, tolerance);
    }
}

//! Where training and inference run: the accelerator, chosen once per process, and how work
//! spreads over it.

use crate::error::{Result, TrainerError};

/// Where training and inference run, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accelerator {
    /// burn's flex backend on the CPU's cores.
    #[default]
    Cpu,
    /// burn-wgpu: Vulkan, Metal or DirectX 12 GPUs (builds with the `wgpu` feature only).
    Wgpu,
}

impl std::str::FromStr for Accelerator {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(TrainerError::Device(format!(
                "unknown device `{other}`: use cpu or wgpu"
            ))),
        }
    }
}

static ACCELERATOR: std::sync::OnceLock<Accelerator> = std::sync::OnceLock::new();

/// Picks the accelerator for the rest of the process; call it before any training. A build
/// without the `wgpu` feature refuses `Wgpu` rather than quietly training on the CPU.
pub fn use_accelerator(accelerator: Accelerator) -> Result<()> {
    if accelerator == Accelerator::Wgpu && !cfg!(feature = "wgpu") {
        return Err(TrainerError::Device(
            "this build has no GPU support: rebuild with `--features wgpu` or use --device cpu"
                .into(),
        ));
    }
    let chosen = *ACCELERATOR.get_or_init(|| accelerator);
    if chosen != accelerator {
        return Err(TrainerError::Device(format!(
            "the device was already set to {chosen:?}"
        )));
    }
    Ok(())
}

pub(crate) fn accelerator() -> Accelerator {
    #[cfg(test)]
    if ACCELERATOR.get().is_none() {
        test_accelerator();
    }
    ACCELERATOR.get().copied().unwrap_or_default()
}

/// Unit tests, the parity goldens among them, run where `FLYWHEEL_TEST_DEVICE` says: `wgpu`
/// in a `--features wgpu` build checks the GPU path against the same fixtures.
#[cfg(test)]
fn test_accelerator() {
    if let Ok(name) = std::env::var("FLYWHEEL_TEST_DEVICE") {
        let chosen = name.parse().and_then(use_accelerator);
        chosen.expect("FLYWHEEL_TEST_DEVICE");
    }
}

/// `f` over `items`, in order. On the CPU the items run side by side on burn's thread pool:
/// flex computes elementwise ops on the calling thread, so one item at a time leaves cores
/// idle. A GPU takes them one by one.
pub(crate) fn map_on_pool<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    use rayon::prelude::*;
    match accelerator() {
        Accelerator::Cpu => items.par_iter().map(&f).collect(),
        Accelerator::Wgpu => items.iter().map(f).collect(),
    }
}

/// The burn device the trainer runs on: flex on the CPU unless [`use_accelerator`] chose a
/// GPU.
pub(crate) fn device() -> burn::tensor::Device {
    match accelerator() {
        Accelerator::Cpu => burn::tensor::Device::flex(),
        #[cfg(feature = "wgpu")]
        Accelerator::Wgpu => burn::tensor::Device::wgpu(Default::default()),
        #[cfg(not(feature = "wgpu"))]
        Accelerator::Wgpu => unreachable!("use_accelerator refuses wgpu without the feature"),
    }
}

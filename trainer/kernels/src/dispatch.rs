//! Compiling a kernel for the CPU at hand.
//!
//! A kernel is written once, generic over [`MulAdd`], and [`Isa::run`] instantiates it either
//! inside a function compiled for AVX-512 and FMA, where its loops over whole vectors of
//! [`LANES`](crate::vector::LANES) become one instruction each, or as portable code.

use std::sync::OnceLock;

/// An instruction set a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Generic code for the target, multiplies and adds kept separate: runs on any CPU.
    Portable,
    /// AVX-512F with fused multiply-add (x86-64 only).
    Avx512,
}

impl Isa {
    /// Every instruction set, in order of preference from last to first.
    pub const ALL: [Isa; 2] = [Isa::Portable, Isa::Avx512];

    /// The best instruction set this CPU runs, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            if Isa::Avx512.is_available() {
                Isa::Avx512
            } else {
                Isa::Portable
            }
        })
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 => false,
        }
    }

    /// Runs `kernel` compiled for `self`.
    ///
    /// # Panics
    /// If this CPU lacks `self` ([`Isa::is_available`]).
    pub fn run<K: Kernel>(self, kernel: K) -> K::Out {
        match self {
            Isa::Portable => kernel.run::<Separate>(),
            Isa::Avx512 => {
                assert!(self.is_available(), "this CPU has no AVX-512F with FMA");
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the features the function is compiled for (asserted).
                return unsafe { run_avx512(kernel) };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("AVX-512 exists on x86-64 only")
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn run_avx512<K: Kernel>(kernel: K) -> K::Out {
    kernel.run::<Fma>()
}

/// A kernel to be compiled for the CPU at hand. A closure would not do: the kernel's body,
/// inlined into it, makes it too big to inline into the AVX-512 wrapper, and it stays generic
/// x86-64 code.
pub trait Kernel {
    type Out;
    /// Must be `#[inline(always)]`, and so must everything it calls in its loops.
    fn run<M: MulAdd>(self) -> Self::Out;
}

/// `a·b + c` as a kernel computes it: one fused instruction where the CPU has FMA, a multiply
/// and an add elsewhere (`f32::mul_add` without FMA is a library call, far slower than both).
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Fused multiply-add: only inside a function compiled with FMA.
pub struct Fma;

impl MulAdd for Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// A multiply, then an add.
pub struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

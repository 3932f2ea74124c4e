//! The trainer's CPU kernels: vectorised loops over `f32` slices, bf16 products on AMX tiles,
//! and strided views over `gemm`.
//!
//! It owns the arithmetic of the fused ops (pointwise activations, norms, the next-token
//! log-probability, attention, the output head's rows, the adapters' thin products) and how
//! each is compiled for the CPU at hand ([`Isa`]). It must not know burn: slices and sizes come
//! in, `Vec`s go out, and the trainer's `Backward` glue turns them into tensors. Every `unsafe`
//! block here says why it is sound.
//!
//! Each public kernel takes the [`Isa`] to run on, so that tests can run every kernel through
//! every dispatch path the machine has, the portable one included.

// Every unsafe block says why it is sound, and every unsafe fn what its callers promise.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod amx;
pub mod attention;
pub mod dispatch;
pub mod head;
pub mod loss;
pub mod matrix;
pub mod norm;
pub mod pointwise;
pub mod vector;

pub use dispatch::Isa;

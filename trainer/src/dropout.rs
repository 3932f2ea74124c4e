//! LoRA dropout with generators of its own: each training shard draws from a generator seeded
//! by the run's seed, the step and the shard, never from burn's device-wide one, which threads
//! would draw from in whatever order they run; outside a training shard there is no dropout.

use std::cell::RefCell;

use rand::{Rng, SeedableRng, rngs::StdRng};

thread_local! {
    /// Dropout generators of the shards running on this thread, innermost last. A stack, not
    /// one slot: while a shard waits on a parallel matmul, rayon may run another shard on the
    /// same thread, and the first must find its own generator again when that one returns.
    static DROPOUT: RefCell<Vec<StdRng>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with LoRA dropout drawing from a generator of its own, seeded by `seed`: masks then
/// depend on the shard, not on the order in which threads happen to draw from burn's one
/// device-wide generator, and a seeded (or resumed) run repeats itself.
pub(crate) fn with_dropout_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            DROPOUT.with(|stack| stack.borrow_mut().pop());
        }
    }
    DROPOUT.with(|stack| stack.borrow_mut().push(StdRng::seed_from_u64(seed)));
    let _pop = Pop;
    f()
}

/// A dropout mask of `n` values, each `1/keep` with probability `keep` and 0 otherwise, from the
/// generator of the shard running on this thread; `None` outside a training shard (validation,
/// inference), where there is no dropout.
pub(crate) fn dropout_mask(n: usize, keep: f64) -> Option<Vec<f32>> {
    DROPOUT.with(|stack| {
        let mut stack = stack.borrow_mut();
        let rng = stack.last_mut()?;
        let (keep, scale) = (keep as f32, (1.0 / keep) as f32);
        Some(
            (0..n)
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    })
}

/// Two seeds into one (SplitMix64's finalizer over their sum with a golden-ratio step).
pub(crate) fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masks repeat with their seed, keep the right share scaled by `1/keep`, survive another
    /// shard running nested on the same thread, and exist only inside a shard.
    #[test]
    fn dropout_masks_come_from_the_running_shard() {
        assert!(dropout_mask(10, 0.9).is_none());
        let a = with_dropout_seed(7, || dropout_mask(10_000, 0.9).unwrap());
        assert_eq!(
            a,
            with_dropout_seed(7, || dropout_mask(10_000, 0.9).unwrap())
        );
        assert_ne!(
            a,
            with_dropout_seed(8, || dropout_mask(10_000, 0.9).unwrap())
        );
        let kept = a.iter().filter(|&&m| m > 0.0).count();
        assert!((8_800..9_200).contains(&kept), "{kept} of 10000 kept");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
        let interrupted = with_dropout_seed(7, || {
            let first = dropout_mask(4_000, 0.9).unwrap();
            with_dropout_seed(8, || dropout_mask(100, 0.9));
            [first, dropout_mask(6_000, 0.9).unwrap()].concat()
        });
        assert_eq!(interrupted, a);
        assert!(dropout_mask(10, 0.9).is_none());
    }
}

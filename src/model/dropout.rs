//! LoRA dropout whose masks are a function of (micro-batch seed, LoRA site), whichever
//! thread draws them and in whatever order.
//!
//! burn's backend RNG is one per process (`B::seed` sets it for every device), and burn's
//! `Dropout` draws from wherever it stands. That made a mask depend on every draw before it,
//! which breaks two things: layer recomputation (a rerun layer must draw its first run's
//! masks) and data parallel training (peers on several threads draw concurrently). So the
//! trainer opens a [`seeded`] scope per micro-batch, and each LoRA site, under one lock,
//! reseeds the backend from the scope's seed and its own id, draws its mask, and, where
//! peers run concurrently, waits for the draw to execute (a fused backend runs it lazily,
//! and the seed is read then), so no other thread's seed can slip in between.
//!
//! Outside a scope (tests calling the model under autodiff directly) dropout draws from the
//! backend RNG as burn's `Dropout` does.

use std::cell::Cell;
use std::sync::Mutex;

use burn::prelude::*;
use burn::tensor::Distribution;

thread_local! {
    static SCOPE: Cell<Option<Scope>> = const { Cell::new(None) };
}

/// Serializes seed-then-draw across threads (the backend RNG is process-global).
static DRAW: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy)]
struct Scope {
    seed: u64,
    /// Other threads draw too: wait for each draw to run before letting them reseed.
    concurrent: bool,
}

/// While alive, LoRA dropout on this thread draws masks seeded by `seed` and each site's id.
/// Restores the enclosing scope (if any) when dropped.
#[must_use = "the scope ends when this is dropped"]
pub struct SeedScope(Option<Scope>);

/// Opens a dropout scope on this thread; `concurrent`: other threads draw masks at the same
/// time (data parallel peers).
pub fn seeded(seed: u64, concurrent: bool) -> SeedScope {
    SeedScope(SCOPE.replace(Some(Scope { seed, concurrent })))
}

impl Drop for SeedScope {
    fn drop(&mut self) {
        SCOPE.set(self.0);
    }
}

/// Inverted dropout of `x` with probability `prob` (burn's rule: only when the backend
/// tracks gradients; kept values scaled by `1 / (1 - prob)`); `site` identifies the LoRA
/// pair, so each pair draws its own mask.
pub(crate) fn apply<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    prob: f64,
    site: u64,
) -> Tensor<B, D> {
    let device = x.device();
    if prob == 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let keep = 1.0 - prob;
    let mask = match SCOPE.get() {
        None => x.random_like(Distribution::Bernoulli(keep)),
        Some(scope) => {
            // A poisoned lock only means another thread panicked mid-draw; the RNG is
            // reseeded below anyway.
            let _draw = DRAW.lock().unwrap_or_else(|p| p.into_inner());
            B::seed(&device, site_seed(scope.seed, site));
            let mask = x.random_like(Distribution::Bernoulli(keep));
            if scope.concurrent {
                // An error here would surface again on the next op of this device.
                let _ = B::sync(&device);
            }
            mask
        }
    };
    x * mask * (1.0 / keep)
}

/// The backend seed of LoRA site `site` in the micro-batch seeded `seed`.
fn site_seed(seed: u64, site: u64) -> u64 {
    let mut z = seed ^ site.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    // splitmix64's finalizer: nearby sites and seeds give unrelated seeds.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    type AD = burn::backend::Autodiff<TB>;

    fn mask(scope_seed: u64, site: u64) -> Vec<f32> {
        let x = Tensor::<AD, 2>::ones([16, 64], &Default::default());
        let _scope = seeded(scope_seed, false);
        apply(x, 0.5, site).into_data().to_vec().unwrap()
    }

    #[test]
    fn a_sites_mask_depends_on_the_scope_seed_and_the_site_only() {
        let _rng = crate::test_util::backend_rng();
        let first = mask(7, 1);
        // Draws in between (another site, another seed) do not move it.
        let _ = mask(7, 2);
        let _ = mask(8, 1);
        assert_eq!(mask(7, 1), first);
        assert_ne!(mask(7, 2), first);
        assert_ne!(mask(8, 1), first);
        // Inverted dropout: kept values are scaled by 1 / (1 - p), about half are kept.
        assert!(first.iter().all(|&v| v == 0.0 || v == 2.0));
        let kept = first.iter().filter(|&&v| v == 2.0).count();
        assert!((384..640).contains(&kept), "{kept} of 1024 kept");
    }

    #[test]
    fn masks_drawn_by_concurrent_threads_are_those_each_draws_alone() {
        let _rng = crate::test_util::backend_rng();
        let alone: Vec<Vec<f32>> = (0..4).map(|s| mask(s, 3)).collect();
        let together: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let peers: Vec<_> = (0..4)
                .map(|s| {
                    scope.spawn(move || {
                        let x = Tensor::<AD, 2>::ones([16, 64], &Default::default());
                        let _scope = seeded(s, true);
                        (0..20)
                            .map(|_| apply(x.clone(), 0.5, 3).into_data().to_vec().unwrap())
                            .collect::<Vec<Vec<f32>>>()
                    })
                })
                .collect();
            peers.into_iter().map(|p| p.join().unwrap()).collect()
        });
        for (s, draws) in together.iter().enumerate() {
            assert!(draws.iter().all(|d| *d == alone[s]), "seed {s}");
        }
    }

    #[test]
    fn without_gradients_or_probability_dropout_is_the_identity() {
        let x = Tensor::<TB, 2>::ones([4, 4], &Default::default());
        let _scope = seeded(1, false);
        assert_eq!(apply(x.clone(), 0.5, 1).into_data(), x.clone().into_data());
        let y = Tensor::<AD, 2>::ones([4, 4], &Default::default());
        assert_eq!(apply(y, 0.0, 1).into_data(), x.into_data());
    }
}

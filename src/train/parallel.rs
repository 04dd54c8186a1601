//! The burn-collective side of data parallel training: registering one peer per device for
//! a run, and summing the peers' LoRA gradients onto the first device once per step.
//!
//! burn-collective keeps one local server per backend type for the whole process, so a run
//! holds [`SESSION`] while its peers are registered (two runs in one process, such as tests,
//! take turns) and resets the server when it ends, also after an error.
//!
//! The sum is burn-collective's tree reduce: the first device's gradient, then the others
//! in order of device id. On distinct devices the order, and so every bit of the result, is
//! the same in every run; peers sharing a device (a test's two CPU peers) tie, and with more
//! than two of them the order of the tied ones may vary in the last bits.

use std::marker::PhantomData;
use std::sync::{Mutex, MutexGuard};

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::train::error::TrainError;

/// One data parallel run at a time per process (see the module doc).
static SESSION: Mutex<()> = Mutex::new(());

/// The peers of a data parallel run, registered with burn-collective while this lives; no
/// registration for a run on one device.
pub(crate) struct Peers<B: Backend> {
    session: Option<MutexGuard<'static, ()>>,
    _backend: PhantomData<B>,
}

impl<B: Backend> Peers<B> {
    /// Registers peer `p` on `devices[p]`, all at once (registration waits for every peer).
    ///
    /// # Errors
    /// [`TrainError::Collective`] when burn-collective refuses.
    pub fn register(devices: &[B::Device]) -> Result<Self, TrainError> {
        if devices.len() < 2 {
            return Ok(Self {
                session: None,
                _backend: PhantomData,
            });
        }
        // A run that panicked left the server reset by its drop; the lock is still usable.
        let session = SESSION.lock().unwrap_or_else(|p| p.into_inner());
        burn_collective::reset_collective::<B>();
        let peers = Self {
            session: Some(session),
            _backend: PhantomData,
        };
        let config = CollectiveConfig::default().with_num_devices(devices.len());
        std::thread::scope(|scope| {
            let registering: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(p, device)| {
                    let config = config.clone();
                    scope.spawn(move || {
                        burn_collective::register::<B>(peer(p), device.clone(), config)
                    })
                })
                .collect();
            registering
                .into_iter()
                .try_for_each(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        })
        .map_err(|e| collective("registering the devices", e))?;
        Ok(peers)
    }

    /// Sums `grads[p]` (peer `p`'s gradients, on `devices[p]`) over the peers onto the first
    /// device, for each of `params` (the LoRA params, in the same order on every peer). A
    /// param the first peer has no gradient for is left out; a peer without one (it ran no
    /// micro-batch) contributes zeros.
    ///
    /// # Errors
    /// [`TrainError::Collective`] when burn-collective fails.
    pub fn reduce(
        grads: Vec<GradientsParams>,
        params: &[(ParamId, String)],
        devices: &[B::Device],
    ) -> Result<GradientsParams, TrainError> {
        let Some(first) = grads.first() else {
            return Ok(GradientsParams::new());
        };
        let shapes: Vec<(ParamId, [usize; 2])> = params
            .iter()
            .filter_map(|(id, _)| first.get::<B, 2>(*id).map(|g| (*id, g.dims())))
            .collect();
        let shapes = &shapes;
        let results: Vec<Result<Option<GradientsParams>, burn_collective::CollectiveError>> =
            std::thread::scope(|scope| {
                let reducing: Vec<_> = grads
                    .into_iter()
                    .zip(devices)
                    .enumerate()
                    .map(|(p, (mut mine, device))| {
                        scope.spawn(move || {
                            let mut sum = (p == 0).then(GradientsParams::new);
                            for &(id, shape) in shapes {
                                let g = mine
                                    .remove::<B, 2>(id)
                                    .unwrap_or_else(|| Tensor::zeros(shape, device));
                                let g = g.into_primitive().tensor();
                                let out = burn_collective::reduce::<B>(
                                    peer(p),
                                    g,
                                    ReduceOperation::Sum,
                                    peer(0),
                                )?;
                                if let (Some(sum), Some(out)) = (sum.as_mut(), out) {
                                    let out =
                                        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(out));
                                    sum.register(id, out);
                                }
                            }
                            Ok(sum)
                        })
                    })
                    .collect();
                reducing
                    .into_iter()
                    .map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            });
        let mut summed = None;
        for result in results {
            if let Some(sum) = result.map_err(|e| collective("summing the gradients", e))? {
                summed = Some(sum);
            }
        }
        Ok(summed.expect("peer 0 returns the sum"))
    }
}

impl<B: Backend> Drop for Peers<B> {
    fn drop(&mut self) {
        if self.session.is_some() {
            burn_collective::reset_collective::<B>();
        }
    }
}

fn peer(p: usize) -> PeerId {
    PeerId::from(p as u32)
}

fn collective(what: &'static str, e: burn_collective::CollectiveError) -> TrainError {
    TrainError::Collective {
        what,
        reason: format!("{e:?}"),
    }
}

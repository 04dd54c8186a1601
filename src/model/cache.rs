//! Per-layer key/value cache for incremental decoding: plain state owned by the caller
//! (generate), passed to the decoder as `&mut`, never stored inside a module.
//! Preallocated to its capacity and filled with `slice_assign`.

use burn::prelude::*;

use crate::kernels::Kernels;
use crate::model::error::ModelError;

/// Keys and values of one decoder layer for a batch.
#[derive(Debug, Clone)]
pub struct KvCache<B: Kernels> {
    // Options only so `append` can move the buffers out (no copy-on-write clone).
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
    capacity: usize,
    len: usize,
}

impl<B: Kernels> KvCache<B> {
    /// An empty cache of `capacity` positions.
    ///
    /// # Shapes
    /// Holds `[batch, kv_heads, capacity, head_dim]` keys and values.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Self {
        let z = Tensor::zeros([batch, kv_heads, capacity, head_dim], device);
        KvCache {
            k: Some(z.clone()),
            v: Some(z),
            capacity,
            len: 0,
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Preallocated positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the cached positions (the buffers are reused).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Appends `k`/`v` and returns all keys/values cached so far.
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, kv_heads, new, head_dim]`
    /// - returns `[batch, kv_heads, len + new, head_dim]` twice
    ///
    /// # Errors
    /// [`ModelError::CacheFull`] when the capacity would be exceeded.
    pub fn append(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>), ModelError> {
        let [b, h, n, d] = k.dims();
        let end = self.len + n;
        if end > self.capacity() {
            return Err(ModelError::CacheFull {
                needed: end,
                capacity: self.capacity(),
            });
        }
        let range = [0..b, 0..h, self.len..end, 0..d];
        let (kb, vb) = match (self.k.take(), self.v.take()) {
            (Some(kb), Some(vb)) => (kb, vb),
            // Buffers are only absent inside this function; restore-by-construction.
            _ => unreachable!("KvCache buffers are always restored before append returns"),
        };
        let kb = kb.slice_assign(range.clone(), k);
        let vb = vb.slice_assign(range, v);
        let out = (kb.clone().narrow(2, 0, end), vb.clone().narrow(2, 0, end));
        self.k = Some(kb);
        self.v = Some(vb);
        self.len = end;
        Ok(out)
    }
}

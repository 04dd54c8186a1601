//! The full Qwen2.5-VL model: vision tower + decoder + `lm_head`, and the merge of image
//! embeddings into the token sequence (`masked_scatter` over image placeholders in
//! transformers `Qwen2_5_VLModel.forward`,
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::kernels::Kernels;
use crate::model::cache::KvCache;
use crate::model::config::{HfConfig, Qwen25VlConfig};
use crate::model::error::ModelError;
use crate::model::linear::{Proj, ProjSpec};
use crate::model::rope::{position_ids, MropePositions, RopeTables};
use crate::model::text::TextModel;
use crate::model::vision::VisionTransformer;
use crate::model::weights::WeightSource;

/// Images of one prompt (or of a whole batch, concatenated in prompt order).
#[derive(Debug, Clone)]
pub struct ImageInput<B: Kernels> {
    /// `[Σ t·h·w, C·T·P·P]` flattened patches, as the image processor emits them.
    pub pixel_values: Tensor<B, 2>,
    /// `(t, h, w)` patch grid of each image, in order of appearance.
    pub grids: Vec<[usize; 3]>,
}

impl<B: Kernels> ImageInput<B> {
    /// The image processor's output as model input on `device`.
    pub fn from_processed(
        px: crate::model::processor::ProcessedImages,
        device: &B::Device,
    ) -> Self {
        let grids = px.grid_thw.iter().map(|g| g.map(|v| v as usize)).collect();
        let pixel_values = Tensor::from_data(
            burn::tensor::TensorData::new(px.pixel_values, [px.num_patches, px.patch_dim]),
            device,
        );
        ImageInput {
            pixel_values,
            grids,
        }
    }
}

/// Outputs of a full-sequence forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput<B: Kernels> {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<B, 3>,
    /// `[image tokens, hidden]` vision tower output, when images were given.
    pub image_embeds: Option<Tensor<B, 2>>,
    /// M-RoPE position ids used.
    pub positions: MropePositions,
}

/// Qwen2.5-VL for conditional generation. Field names are checkpoint prefixes.
#[derive(Module, Debug)]
pub struct Qwen25Vl<B: Kernels> {
    visual: VisionTransformer<B>,
    model: TextModel<B>,
    /// `None` when tied to `model.embed_tokens`.
    lm_head: Option<Proj<B>>,
    #[module(skip)]
    config: Qwen25VlConfig,
}

pub(crate) struct Prefill<B: Kernels> {
    pub hidden: Tensor<B, 3>,
    pub image_embeds: Option<Tensor<B, 2>>,
    pub positions: MropePositions,
}

/// The decoder stack's input for one batch (see [`Qwen25Vl::decoder_input`]).
pub(crate) struct DecoderInput<B: Kernels> {
    /// `[batch, seq, hidden]` embeddings, image features merged in.
    pub x: Tensor<B, 3>,
    pub rope: RopeTables<B>,
    /// `[batch, 1, seq, past + seq]` (true = hidden), or `None`.
    pub mask: Option<Tensor<B, 4, Bool>>,
    pub image_embeds: Option<Tensor<B, 2>>,
    pub positions: MropePositions,
}

/// Refuses work whose tensor `name` of `shape` in `dtype` would take more than `device`'s
/// largest buffer (no limit on the CPU), naming it as "the {name} {shape} ({dtype}{,
/// detail})". Checked before the work, from its shapes: wgpu does not fail such an
/// allocation, it logs a failed task on its own thread and the model computes on garbage
/// (issue 19; a 3,000-token prompt on lavapipe gave logits 4.6 away from the CPU's, with no
/// error).
pub(crate) fn fits_one_buffer<B: Kernels>(
    device: &B::Device,
    name: &str,
    shape: &[usize],
    dtype: burn::tensor::DType,
    detail: Option<&str>,
) -> Result<(), ModelError> {
    let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
    match B::max_buffer_bytes(device) {
        Some(limit) if bytes > limit => Err(ModelError::WorkTooLargeForDevice {
            what: format!(
                "the {name} {shape:?} ({}{})",
                crate::device::dtype_name(dtype),
                detail.map(|d| format!(", {d}")).unwrap_or_default()
            ),
            bytes,
            limit,
        }),
        _ => Ok(()),
    }
}

/// Refuses a checkpoint with a tensor larger than `device`'s largest buffer, before any
/// upload: on wgpu such an upload fails on the runtime's thread and the tensor reads as
/// zeros, a model that runs and answers garbage.
fn fits_buffers<B: Kernels>(src: &WeightSource, device: &B::Device) -> Result<(), ModelError> {
    let Some(limit) = B::max_buffer_bytes(device) else {
        return Ok(());
    };
    check_buffer_limit(src, crate::device::float_dtype::<B>(device), limit)
}

fn check_buffer_limit(
    src: &WeightSource,
    dtype: burn::tensor::DType,
    limit: u64,
) -> Result<(), ModelError> {
    match src.largest_on_device(dtype.size() as u64) {
        Some((key, bytes)) if bytes > limit => Err(ModelError::TooLargeForDevice {
            dir: src.dir().to_path_buf(),
            key,
            bytes,
            dtype: crate::device::dtype_name(dtype),
            limit,
        }),
        _ => Ok(()),
    }
}

impl<B: Kernels> Qwen25Vl<B> {
    /// Loads `dir/config.json` (+ `generation_config.json` when present) and the weights
    /// (`model.safetensors` or shards), checking every tensor against the config first.
    ///
    /// # Errors
    /// Config errors, I/O errors and truncated files naming the file, and
    /// [`ModelError::Checkpoint`] listing missing/unexpected/mis-shaped tensors.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let config = HfConfig::from_dir(dir)?.resolve()?;
        let mut src = WeightSource::open(dir)?;
        src.check_against(&config)?;
        fits_buffers::<B>(&src, device)?;
        let visual = VisionTransformer::load(&mut src, &config.vision, device)?;
        let model = TextModel::load(&mut src, &config.text, device)?;
        let t = &config.text;
        // Tied: the logits reuse `embed_tokens`; a stored lm_head copy (allowed by the
        // checkpoint check) is the same matrix and is not loaded twice.
        let lm_head = if t.tie_word_embeddings {
            None
        } else {
            let spec = ProjSpec {
                d_in: t.hidden_size,
                d_out: t.vocab_size,
                bias: false,
            };
            Some(Proj::load(&mut src, "lm_head", spec, device)?)
        };
        let left = src.not_taken(&config);
        if !left.is_empty() {
            return Err(ModelError::Checkpoint {
                dir: dir.to_path_buf(),
                problems: left
                    .into_iter()
                    .map(|k| format!("tensor `{k}` was never loaded"))
                    .collect(),
            });
        }
        tracing::debug!(dir = %dir.display(), params = config.parameter_count(), "loaded Qwen2.5-VL");
        Ok(Qwen25Vl {
            visual,
            model,
            lm_head,
            config,
        })
    }

    /// Bytes held by the model's projections (every Linear, NF4 or dense, with biases).
    pub fn linear_bytes(&self) -> u64 {
        self.visual.linear_bytes()
            + self.model.linear_bytes()
            + self.lm_head.as_ref().map_or(0, Proj::stored_bytes)
    }

    /// Bytes of every weight the model holds: each projection as stored (NF4 packed or
    /// dense, [`Self::linear_bytes`]) plus every other tensor (embeddings, norms, the patch
    /// conv, LoRA pairs) at its element size. What a variant costs in memory before any
    /// activation, whatever else the process holds.
    pub fn resident_weight_bytes(&self) -> u64 {
        use burn::module::{Module, ModuleVisitor, Param};
        use burn::tensor::{Bool, Int};
        /// Sums parameter bytes outside projection bases (those are in `linear_bytes`).
        struct OutsideBases {
            depth: usize,
            bytes: u64,
        }
        impl OutsideBases {
            fn add(&mut self, numel: usize, dtype: burn::tensor::DType) {
                if self.depth == 0 {
                    self.bytes += (numel * dtype.size()) as u64;
                }
            }
        }
        impl<B: Backend> ModuleVisitor<B> for OutsideBases {
            fn enter_module(&mut self, _name: &str, container_type: &str) {
                if self.depth > 0 || container_type == "Enum:BaseProj" {
                    self.depth += 1;
                }
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.depth = self.depth.saturating_sub(1);
            }
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                let t = p.val();
                self.add(t.shape().num_elements(), t.dtype());
            }
            fn visit_int<const D: usize>(&mut self, p: &Param<Tensor<B, D, Int>>) {
                let t = p.val();
                self.add(t.shape().num_elements(), t.dtype());
            }
            fn visit_bool<const D: usize>(&mut self, p: &Param<Tensor<B, D, Bool>>) {
                let t = p.val();
                self.add(t.shape().num_elements(), t.dtype());
            }
        }
        let mut v = OutsideBases { depth: 0, bytes: 0 };
        self.visit(&mut v);
        v.bytes + self.linear_bytes()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Qwen25VlConfig {
        &self.config
    }

    /// The language model (LoRA sites live there).
    pub(crate) fn text(&self) -> &TextModel<B> {
        &self.model
    }

    /// [`Self::text`], mutably.
    pub(crate) fn text_mut(&mut self) -> &mut TextModel<B> {
        &mut self.model
    }

    /// Fresh KV caches (one per layer) for `batch` rows of up to `capacity` positions.
    pub fn new_caches(&self, batch: usize, capacity: usize, device: &B::Device) -> Vec<KvCache<B>> {
        let t = &self.config.text;
        (0..t.num_layers)
            .map(|_| KvCache::new(batch, t.num_kv_heads, capacity, t.head_dim, device))
            .collect()
    }

    /// Vision tower output for the LLM.
    ///
    /// # Shapes
    /// - `pixel_values`: `[Σ t·h·w, C·T·P·P]` → `[Σ t·h·w / merge², hidden]`
    ///
    /// # Errors
    /// [`ModelError::Input`] when pixels and grids disagree.
    pub fn image_embeds(&self, images: &ImageInput<B>) -> Result<Tensor<B, 2>, ModelError> {
        self.visual
            .forward(images.pixel_values.clone(), &images.grids)
    }

    /// Vocabulary logits of final hidden states.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(p) => p.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let logits = self.model.tied_logits(hidden.reshape([b * s, d]));
                let v = logits.dims()[1];
                logits.reshape([b, s, v])
            }
        }
    }

    /// Full-sequence forward (no cache kept) of equal-length rows.
    ///
    /// `attention_mask[b][i]` is false for padding (left or right); `None` means no
    /// padding. Padded positions get M-RoPE position 1 and are never attended to.
    ///
    /// # Shapes
    /// - `input_ids`: `batch` rows of `seq` tokens → logits `[batch, seq, vocab]`
    ///
    /// # Errors
    /// [`ModelError::ImageTokens`] when placeholders and image features disagree, or
    /// [`ModelError::Input`] for malformed inputs.
    pub fn forward(
        &self,
        input_ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<bool>]>,
        images: Option<&ImageInput<B>>,
        device: &B::Device,
    ) -> Result<ForwardOutput<B>, ModelError> {
        let _span = tracing::debug_span!("forward", batch = input_ids.len()).entered();
        let all: Vec<Vec<bool>>;
        let valid = match attention_mask {
            Some(m) => m,
            None => {
                all = input_ids.iter().map(|r| vec![true; r.len()]).collect();
                &all
            }
        };
        if valid.len() != input_ids.len() {
            return Err(ModelError::Input {
                name: "attention_mask",
                reason: format!(
                    "{} rows for {} rows of input_ids",
                    valid.len(),
                    input_ids.len()
                ),
            });
        }
        let (batch, seq) = (input_ids.len(), input_ids.first().map_or(0, Vec::len));
        let vocab = self.config.text.vocab_size;
        let dtype = crate::device::float_dtype::<B>(device);
        fits_one_buffer::<B>(device, "logits", &[batch, seq, vocab], dtype, None)?;
        let p = self.prefill(input_ids, valid, images, None, device)?;
        Ok(ForwardOutput {
            logits: self.logits(p.hidden),
            image_embeds: p.image_embeds,
            positions: p.positions,
        })
    }

    /// Runs a (padded) prompt batch through the model, filling `caches` when given.
    /// `valid[b][i]` is false for padding.
    pub(crate) fn prefill(
        &self,
        rows: &[Vec<u32>],
        valid: &[Vec<bool>],
        images: Option<&ImageInput<B>>,
        caches: Option<&mut [KvCache<B>]>,
        device: &B::Device,
    ) -> Result<Prefill<B>, ModelError> {
        let _span = tracing::debug_span!("prefill", batch = rows.len()).entered();
        let past = caches
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, KvCache::len);
        let input = self.decoder_input(rows, valid, images, past, device)?;
        let hidden = self
            .model
            .forward(input.x, &input.rope, input.mask.as_ref(), caches)?;
        Ok(Prefill {
            hidden,
            image_embeds: input.image_embeds,
            positions: input.positions,
        })
    }

    /// What the decoder stack takes for a prompt batch after `past` cached tokens: the
    /// token embeddings with the image features merged in, the rotary tables and the mask.
    pub(crate) fn decoder_input(
        &self,
        rows: &[Vec<u32>],
        valid: &[Vec<bool>],
        images: Option<&ImageInput<B>>,
        past: usize,
        device: &B::Device,
    ) -> Result<DecoderInput<B>, ModelError> {
        let batch = rows.len();
        let seq = rows.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(ModelError::Input {
                name: "input_ids",
                reason: "empty batch or empty prompt".into(),
            });
        }
        let vocab = self.config.text.vocab_size;
        self.text_work_fits(batch, seq, past, device)?;
        if let Some(&t) = rows.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input {
                name: "input_ids",
                reason: format!("token id {t} is outside the vocabulary of {vocab}"),
            });
        }
        let grids: &[[usize; 3]] = images.map_or(&[], |i| &i.grids);
        let positions = position_ids(rows, valid, grids, &self.config)?;
        let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, seq]), device);
        let mut x = self.model.embed(ids); // [batch, seq, hidden]
        let image_tok = self.config.tokens.image_token_id;
        let slots: Vec<usize> = rows
            .iter()
            .zip(valid)
            .flat_map(|(r, v)| r.iter().zip(v))
            .enumerate()
            .filter(|(_, (&t, &v))| v && t == image_tok)
            .map(|(i, _)| i)
            .collect();
        let image_embeds = match images {
            Some(img) => {
                let feats = self.image_embeds(img)?; // [n, hidden]
                let n = feats.dims()[0];
                if n != slots.len() {
                    return Err(ModelError::ImageTokens {
                        tokens: slots.len(),
                        features: n,
                    });
                }
                let d = self.config.text.hidden_size;
                // Row p of the result is text row p, or image row k for the k-th placeholder.
                let mut index: Vec<i64> = (0..(batch * seq) as i64).collect();
                for (k, &p) in slots.iter().enumerate() {
                    index[p] = (batch * seq + k) as i64;
                }
                let all = Tensor::cat(vec![x.reshape([batch * seq, d]), feats.clone()], 0);
                let idx = Tensor::from_data(TensorData::new(index, [batch * seq]), device);
                x = all.select(0, idx).reshape([batch, seq, d]);
                Some(feats)
            }
            None if !slots.is_empty() => {
                return Err(ModelError::ImageTokens {
                    tokens: slots.len(),
                    features: 0,
                })
            }
            None => None,
        };
        let rope = RopeTables::new(
            &self.config.text,
            &positions.ids,
            [batch, seq],
            x.dtype(),
            device,
        );
        let keys: Vec<Vec<bool>> = valid
            .iter()
            .map(|v| {
                let mut k = vec![true; past];
                k.extend_from_slice(v);
                k
            })
            .collect();
        let mask = attention_mask::<B>(&keys, past, seq, device);
        Ok(DecoderInput {
            x,
            rope,
            mask,
            image_embeds,
            positions,
        })
    }

    /// Refuses a prefill of `batch` rows of `seq` tokens after `past` cached ones whose
    /// attention scores (f32, every head: see `attend`) or gated-MLP activations would not
    /// fit one buffer of `device`.
    fn text_work_fits(
        &self,
        batch: usize,
        seq: usize,
        past: usize,
        device: &B::Device,
    ) -> Result<(), ModelError> {
        let t = &self.config.text;
        let scores = [batch, t.num_heads, seq, past + seq];
        fits_one_buffer::<B>(device, "attention scores", &scores, DType::F32, None)?;
        let mlp = [batch, seq, t.intermediate_size];
        let dtype = crate::device::float_dtype::<B>(device);
        fits_one_buffer::<B>(device, "MLP activations", &mlp, dtype, None)
    }

    /// Decoder layers `range` over `x` (see [`TextModel::forward_layers`]), for a forward
    /// the trainer runs in pieces; `input` gives the rotary tables and the mask.
    ///
    /// # Errors
    /// [`ModelError::Input`] when `range` is not within the stack.
    pub(crate) fn forward_layers(
        &self,
        range: std::ops::Range<usize>,
        x: Tensor<B, 3>,
        input: &DecoderInput<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.model
            .forward_layers(range, x, &input.rope, input.mask.as_ref())
    }

    /// The final norm and the logits, after the whole decoder stack, for a loss that
    /// takes them in f32.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    ///
    /// # Errors
    /// [`ModelError::WorkTooLargeForDevice`] when the f32 logits would not fit one buffer.
    pub(crate) fn head(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, ModelError> {
        let [batch, seq, _] = x.dims();
        let shape = [batch, seq, self.config.text.vocab_size];
        fits_one_buffer::<B>(
            &x.device(),
            "logits",
            &shape,
            DType::F32,
            Some("for the loss"),
        )?;
        Ok(self.logits(self.model.final_norm(x)))
    }

    /// Decoder layers of the language model.
    pub fn num_layers(&self) -> usize {
        self.model.num_layers()
    }

    /// One decoding step: one new token per row at M-RoPE position `positions[b]` (all three
    /// axes equal). `keys[b]` is the validity of every cached key plus the new one.
    ///
    /// # Shapes
    /// returns hidden states `[batch, 1, hidden]`
    pub(crate) fn step(
        &self,
        tokens: &[u32],
        positions: &[i64],
        keys: &[Vec<bool>],
        caches: &mut [KvCache<B>],
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let batch = tokens.len();
        let ids = tokens.iter().map(|&t| t as i64).collect::<Vec<_>>();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, 1]), device);
        let x = self.model.embed(ids);
        let pos: Vec<i64> = (0..3).flat_map(|_| positions.iter().copied()).collect();
        let rope = RopeTables::new(&self.config.text, &pos, [batch, 1], x.dtype(), device);
        let past = caches.first().map_or(0, KvCache::len);
        let mask = attention_mask::<B>(keys, past, 1, device);
        self.model.forward(x, &rope, mask.as_ref(), Some(caches))
    }
}

/// Causal + padding mask `[batch, 1, seq, past + seq]` (true = hidden), or `None` when a
/// single-token step may see every key. `keys[b][j]` is false for padded keys; a query
/// always sees itself, so padded rows stay finite.
fn attention_mask<B: Kernels>(
    keys: &[Vec<bool>],
    past: usize,
    seq: usize,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    let total = past + seq;
    if seq == 1 && keys.iter().all(|k| k.iter().all(|&v| v)) {
        return None;
    }
    let batch = keys.len();
    let mut m = vec![false; batch * seq * total];
    for (b, k) in keys.iter().enumerate() {
        for i in 0..seq {
            let q = past + i;
            for j in 0..total {
                m[(b * seq + i) * total + j] =
                    j > q || (j != q && !k.get(j).copied().unwrap_or(false));
            }
        }
    }
    Some(Tensor::from_bool(
        TensorData::new(m, [batch, 1, seq, total]),
        device,
    ))
}

#[cfg(test)]
pub(crate) mod tests;

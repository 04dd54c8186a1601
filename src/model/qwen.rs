//! The full Qwen2.5-VL model: vision tower + decoder + `lm_head`, and the merge of image
//! embeddings into the token sequence (`masked_scatter` over image placeholders in
//! transformers `Qwen2_5_VLModel.forward`,
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;

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
                let w = self.model.embedding_weight(); // [vocab, hidden]
                let v = w.dims()[0];
                hidden
                    .reshape([b * s, d])
                    .matmul(w.transpose())
                    .reshape([b, s, v])
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
        let batch = rows.len();
        let seq = rows.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(ModelError::Input {
                name: "input_ids",
                reason: "empty batch or empty prompt".into(),
            });
        }
        let vocab = self.config.text.vocab_size;
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
        let past = caches
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, KvCache::len);
        let keys: Vec<Vec<bool>> = valid
            .iter()
            .map(|v| {
                let mut k = vec![true; past];
                k.extend_from_slice(v);
                k
            })
            .collect();
        let mask = attention_mask::<B>(&keys, past, seq, device);
        let hidden = self.model.forward(x, &rope, mask.as_ref(), caches)?;
        Ok(Prefill {
            hidden,
            image_embeds,
            positions,
        })
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
pub(crate) mod tests {
    use super::*;
    use crate::model::generate::{GenerateConfig, Request, Sampling};
    use crate::test_util::{assert_close, fixture, fixture_f32s, st_f32s, TB};

    /// Torch on CPU lands within 2e-6 of the reference logits (fixtures README); 1e-4
    /// leaves room for a different summation order in f32 matmuls.
    const LOGITS_ATOL: f32 = 1e-4;
    /// Image embeds are ~25x smaller than logits (mean |x| 0.02 vs 0.5), so the logits bar
    /// scales to ~4e-6; 1e-5 still leaves ~400x headroom over the measured 2.7e-8, and
    /// catches window attention replaced by full attention (1.8e-4).
    const EMBEDS_ATOL: f32 = 1e-5;
    /// Cached vs uncached decoding differ only in summation order.
    const CACHE_ATOL: f32 = 1e-4;

    pub(crate) struct Reference {
        pub input_ids: Vec<u32>,
        pub grid: [usize; 3],
        pub pixel_values: Vec<f32>,
        pub pixel_shape: [usize; 2],
        pub image_embeds: Vec<f32>,
        pub logits: Vec<f32>,
        pub greedy: Vec<u32>,
    }

    pub(crate) fn reference() -> Reference {
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f32s = |k: &str| st_f32s(&st, k);
        let i64s = |k: &str| -> Vec<i64> {
            st.tensor(k)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let g = i64s("image_grid_thw");
        let ps = st.tensor("pixel_values").unwrap().shape().to_vec();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("qwen2_5_vl_tiny/reference.json")).unwrap(),
        )
        .unwrap();
        Reference {
            input_ids: i64s("input_ids").into_iter().map(|x| x as u32).collect(),
            grid: [g[0] as usize, g[1] as usize, g[2] as usize],
            pixel_values: f32s("pixel_values"),
            pixel_shape: [ps[0], ps[1]],
            image_embeds: f32s("image_embeds"),
            logits: f32s("logits"),
            greedy: json["greedy_new_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
        }
    }

    pub(crate) fn tiny() -> Qwen25Vl<TB> {
        Qwen25Vl::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap()
    }

    /// The reference image as model input, on any backend.
    pub(crate) fn image<B: Kernels>(r: &Reference) -> ImageInput<B> {
        ImageInput {
            pixel_values: Tensor::from_data(
                TensorData::new(r.pixel_values.clone(), r.pixel_shape),
                &Default::default(),
            ),
            grids: vec![r.grid],
        }
    }

    fn floats<const D: usize>(t: Tensor<TB, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn vision_tower_reproduces_reference_image_embeds() {
        let (m, r) = (tiny(), reference());
        let e = m.image_embeds(&image(&r)).unwrap();
        assert_eq!(e.dims(), [20, 64]);
        assert_close("image_embeds", &floats(e), &r.image_embeds, EMBEDS_ATOL);
    }

    #[test]
    fn full_forward_reproduces_reference_logits() {
        let (m, r) = (tiny(), reference());
        let out = m
            .forward(
                std::slice::from_ref(&r.input_ids),
                None,
                Some(&image(&r)),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(out.logits.dims(), [1, 48, 2048]);
        assert_close("logits", &floats(out.logits), &r.logits, LOGITS_ATOL);
    }

    #[test]
    fn right_padded_batch_forward_matches_each_row_alone() {
        let (m, r) = (tiny(), reference());
        let dev = Default::default();
        let text: Vec<u32> = vec![1990, 11, 12, 13, 100, 101, 102, 103, 104, 105];
        let alone = floats(
            m.forward(std::slice::from_ref(&text), None, None, &dev)
                .unwrap()
                .logits,
        );
        let n = r.input_ids.len();
        let mut padded = text.clone();
        padded.resize(n, 0);
        let mut mask = vec![true; text.len()];
        mask.resize(n, false);
        let out = m
            .forward(
                &[r.input_ids.clone(), padded],
                Some(&[vec![true; n], mask]),
                Some(&image(&r)),
                &dev,
            )
            .unwrap();
        let all = floats(out.logits);
        let v = 2048;
        assert_close("image row", &all[..n * v], &r.logits, LOGITS_ATOL);
        assert_close(
            "text row",
            &all[n * v..(n + text.len()) * v],
            &alone,
            LOGITS_ATOL,
        );
    }

    #[test]
    fn greedy_generation_with_kv_cache_yields_the_reference_tokens() {
        greedy_tokens_are_the_reference::<TB>();
    }

    /// The model on wgpu (fusion, CubeCL; lavapipe in CI): the reference's 16 greedy tokens,
    /// and a batch gives each prompt its solo tokens.
    #[test]
    fn on_wgpu_greedy_tokens_are_the_reference_and_batching_changes_nothing() {
        if crate::test_util::wgpu_available(
            "on_wgpu_greedy_tokens_are_the_reference_and_batching_changes_nothing",
        ) {
            greedy_tokens_are_the_reference::<burn::backend::Wgpu>();
            batched_equals_alone::<burn::backend::Wgpu>();
        }
    }

    fn greedy_tokens_are_the_reference<B: Kernels>() {
        let r = reference();
        let m = Qwen25Vl::<B>::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap();
        // The reference forced 16 tokens (min_new_tokens = 16): no eos stop.
        let cfg = GenerateConfig {
            max_new_tokens: 16,
            sampling: Sampling::Greedy,
            seed: 0,
            eos_token_ids: Some(vec![]),
        };
        let req = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        let g = m.generate(&[req], &cfg, &Default::default()).unwrap();
        assert_eq!(g[0].tokens, r.greedy);
        assert!(!g[0].stopped_on_eos);
        assert_eq!(g[0].prompt_tokens, 48);
    }

    #[test]
    fn generation_stops_on_an_eos_id() {
        let (m, r) = (tiny(), reference());
        let cfg = GenerateConfig {
            max_new_tokens: 16,
            eos_token_ids: Some(vec![r.greedy[1]]),
            ..GenerateConfig::default()
        };
        let req = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        let g = m.generate(&[req], &cfg, &Default::default()).unwrap();
        assert_eq!(g[0].tokens, r.greedy[..2].to_vec());
        assert!(g[0].stopped_on_eos);
    }

    #[test]
    fn cached_step_by_step_logits_equal_full_sequence_logits() {
        let (m, r) = (tiny(), reference());
        let dev = Default::default();
        // prompt + 4 greedy tokens, forwarded at once vs. prefill + 4 cached steps
        let mut ids = r.input_ids.clone();
        ids.extend_from_slice(&r.greedy[..4]);
        let full = m
            .forward(&[ids.clone()], None, Some(&image(&r)), &dev)
            .unwrap();
        let full = floats(full.logits);
        let n = r.input_ids.len();
        let v = 2048;
        let mut caches = m.new_caches(1, ids.len(), &dev);
        let pre = m
            .prefill(
                std::slice::from_ref(&r.input_ids),
                &[vec![true; n]],
                Some(&image(&r)),
                Some(&mut caches),
                &dev,
            )
            .unwrap();
        let pre_logits = floats(m.logits(pre.hidden));
        assert_close("prefill", &pre_logits, &full[..n * v], CACHE_ATOL);
        let mut keys = vec![vec![true; n]];
        for (s, &tok) in r.greedy[..4].iter().enumerate() {
            keys[0].push(true);
            let pos = (n + s) as i64 + pre.positions.deltas[0];
            let h = m.step(&[tok], &[pos], &keys, &mut caches, &dev).unwrap();
            let got = floats(m.logits(h));
            let at = (n + s) * v;
            assert_close(&format!("step {s}"), &got, &full[at..at + v], CACHE_ATOL);
        }
    }

    #[test]
    fn batched_generation_gives_each_prompt_its_solo_tokens() {
        batched_equals_alone::<TB>();
    }

    fn batched_equals_alone<B: Kernels>() {
        let r = reference();
        let dev = Default::default();
        let m = Qwen25Vl::<B>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            eos_token_ids: Some(vec![]),
            ..GenerateConfig::default()
        };
        let with_image = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        // Shorter text prompt: the text row is left-padded.
        let short = Request::<B> {
            input_ids: vec![1990, 11, 12, 13, 100, 101, 102],
            images: None,
        };
        // Longer text prompt: the image row is left-padded.
        let long = Request::<B> {
            input_ids: (0..60).map(|i| 100 + i).collect(),
            images: None,
        };
        let solo_img = m
            .generate(std::slice::from_ref(&with_image), &cfg, &dev)
            .unwrap();
        assert_eq!(solo_img[0].tokens, r.greedy[..6].to_vec());
        for text in [short, long] {
            let solo = m.generate(std::slice::from_ref(&text), &cfg, &dev).unwrap();
            let both = m.generate(&[text, with_image.clone()], &cfg, &dev).unwrap();
            assert_eq!(both[0].tokens, solo[0].tokens);
            assert_eq!(both[1].tokens, solo_img[0].tokens);
            assert_eq!(both[0].batch_size, 2);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_batch_invariant() {
        let m = tiny();
        let dev = Default::default();
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            sampling: Sampling::Sample {
                temperature: 1.5,
                top_k: 50,
                top_p: 0.95,
            },
            seed: 7,
            eos_token_ids: Some(vec![]),
        };
        let a = Request::<TB> {
            input_ids: vec![1990, 11, 12, 13],
            images: None,
        };
        let b = Request::<TB> {
            input_ids: vec![1990, 11, 12, 13, 100, 101],
            images: None,
        };
        let one = m.generate(std::slice::from_ref(&a), &cfg, &dev).unwrap();
        let again = m.generate(std::slice::from_ref(&a), &cfg, &dev).unwrap();
        let batch = m.generate(&[a, b], &cfg, &dev).unwrap();
        assert_eq!(one[0].tokens, again[0].tokens);
        assert_eq!(one[0].tokens, batch[0].tokens);
        let greedy = m
            .generate(
                &[Request::<TB> {
                    input_ids: vec![1990, 11, 12, 13],
                    images: None,
                }],
                &GenerateConfig {
                    max_new_tokens: 8,
                    eos_token_ids: Some(vec![]),
                    ..GenerateConfig::default()
                },
                &dev,
            )
            .unwrap();
        // temperature 1.5 over 2048 tokens: 8 draws equal to the argmax would be a bug
        assert_ne!(one[0].tokens, greedy[0].tokens);
    }

    #[test]
    fn image_tokens_without_matching_features_are_rejected_with_counts() {
        let (m, r) = (tiny(), reference());
        let mut ids = r.input_ids.clone();
        ids.retain(|&t| t != 1996);
        ids.insert(5, 1996);
        let e = m
            .forward(&[ids], None, Some(&image(&r)), &Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 image tokens, 20 features"), "{e}");
    }

    #[test]
    fn loading_a_checkpoint_with_a_missing_tensor_fails_naming_it() {
        let dir = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
            m.remove("visual.blocks.2.attn.qkv.bias");
        });
        let e = Qwen25Vl::<TB>::load(dir.path(), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("missing tensor `visual.blocks.2.attn.qkv.bias` (expected shape [96])"),
            "{e}"
        );
    }

    #[test]
    fn module_parameters_equal_the_config_parameter_count() {
        use burn::module::Module;
        let m = tiny();
        assert_eq!(m.num_params() as u64, m.config().parameter_count());
    }

    #[test]
    fn tied_checkpoint_without_lm_head_reuses_the_embedding_matrix() {
        let dev = Default::default();
        let r = reference();
        let set_tied = |dir: &std::path::Path| {
            let p = dir.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            c["tie_word_embeddings"] = true.into();
            std::fs::write(&p, c.to_string()).unwrap();
        };
        // Untied model whose lm_head is a copy of embed_tokens: the reference for "tied".
        let copy = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
            let e = m["model.embed_tokens.weight"].clone();
            m.insert("lm_head.weight".into(), e);
        });
        let tied = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
            m.remove("lm_head.weight");
        });
        set_tied(tied.path());
        let a = Qwen25Vl::<TB>::load(copy.path(), &dev).unwrap();
        let b = Qwen25Vl::<TB>::load(tied.path(), &dev).unwrap();
        assert!(b.config().text.tie_word_embeddings);
        let ids = std::slice::from_ref(&r.input_ids);
        let la = floats(a.forward(ids, None, Some(&image(&r)), &dev).unwrap().logits);
        let lb = floats(b.forward(ids, None, Some(&image(&r)), &dev).unwrap().logits);
        assert_close("tied vs copied lm_head", &lb, &la, CACHE_ATOL);
        // and an untied config without lm_head is a missing tensor
        let untied = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
            m.remove("lm_head.weight");
        });
        let e = Qwen25Vl::<TB>::load(untied.path(), &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing tensor `lm_head.weight`"), "{e}");
    }

    #[test]
    fn two_images_in_one_call_attend_only_within_themselves() {
        let (m, r) = (tiny(), reference());
        let one = image(&r);
        let two = ImageInput {
            pixel_values: Tensor::cat(vec![one.pixel_values.clone(), one.pixel_values.clone()], 0),
            grids: vec![r.grid, r.grid],
        };
        let e = floats(m.image_embeds(&two).unwrap());
        assert_eq!(e.len(), 2 * r.image_embeds.len());
        let (a, b) = e.split_at(r.image_embeds.len());
        assert_close("first image", a, &r.image_embeds, EMBEDS_ATOL);
        assert_close("second image", b, &r.image_embeds, EMBEDS_ATOL);
    }

    #[test]
    fn pixel_values_that_do_not_match_the_grid_are_rejected() {
        let (m, r) = (tiny(), reference());
        let mut img = image(&r);
        img.grids = vec![[1, 8, 12]];
        let e = m.image_embeds(&img).unwrap_err().to_string();
        assert!(
            e.contains("pixel_values") && e.contains("[80, 1176]") && e.contains("[96, 1176]"),
            "{e}"
        );
    }

    #[test]
    fn batched_image_prompts_of_different_lengths_match_their_solo_runs() {
        let (m, r) = (tiny(), reference());
        let dev = Default::default();
        let cfg = GenerateConfig {
            max_new_tokens: 5,
            eos_token_ids: Some(vec![]),
            ..GenerateConfig::default()
        };
        let full = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        // same image, 12 fewer trailing text tokens
        let short = Request {
            input_ids: r.input_ids[..r.input_ids.len() - 12].to_vec(),
            images: Some(image(&r)),
        };
        let solo_full = m.generate(std::slice::from_ref(&full), &cfg, &dev).unwrap();
        let solo_short = m
            .generate(std::slice::from_ref(&short), &cfg, &dev)
            .unwrap();
        let both = m.generate(&[short, full], &cfg, &dev).unwrap();
        assert_eq!(both[0].tokens, solo_short[0].tokens);
        assert_eq!(both[1].tokens, solo_full[0].tokens);
    }

    #[test]
    fn every_parameter_gets_a_gradient_under_autodiff() {
        use burn::optim::GradientsParams;
        type AD = burn::backend::Autodiff<TB>;
        let r = reference();
        let dev = Default::default();
        let m = Qwen25Vl::<AD>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
        let img = image::<AD>(&r);
        let out = m
            .forward(std::slice::from_ref(&r.input_ids), None, Some(&img), &dev)
            .unwrap();
        let grads = out.logits.powi_scalar(2).mean().backward();
        let gp = GradientsParams::from_grads(grads, &m);
        let manifest = crate::model::weights::manifest::expected_tensors(m.config()).len();
        assert_eq!(gp.len(), manifest);
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_an_input_error() {
        let m = tiny();
        let e = m
            .forward(&[vec![1, 2, 5000]], None, None, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id 5000") && e.contains("2048"), "{e}");
    }

    fn nf4_reference_logits() -> Vec<f32> {
        fixture_f32s("qwen2_5_vl_tiny/nf4/reference.safetensors", "logits")
    }

    fn nf4_logits(dir: &Path) -> Vec<f32> {
        let r = reference();
        let dev = Default::default();
        let m = Qwen25Vl::<TB>::load(dir, &dev).unwrap();
        let out = m
            .forward(
                std::slice::from_ref(&r.input_ids),
                None,
                Some(&image(&r)),
                &dev,
            )
            .unwrap();
        floats(out.logits)
    }

    #[test]
    fn nf4_checkpoint_reproduces_the_bitsandbytes_reference_logits() {
        let got = nf4_logits(&fixture("qwen2_5_vl_tiny/nf4"));
        let want = nf4_reference_logits();
        assert_eq!(got.len(), want.len());
        assert_close("nf4 logits", &got, &want, LOGITS_ATOL);
        // and they are not the dense model's: quantization changed the weights
        let dense = reference().logits;
        let moved = got
            .iter()
            .zip(&dense)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 10.0 * LOGITS_ATOL,
            "NF4 logits equal the dense ones ({moved})"
        );
    }

    #[test]
    fn a_checkpoint_quantized_by_medpipe_gives_the_fixture_nf4_logits_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("nf4");
        crate::quant::quantize_checkpoint(
            &fixture("qwen2_5_vl_tiny"),
            &out,
            &crate::quant::QuantizeOptions::default(),
        )
        .unwrap();
        // Same codes and scales bit for bit, same computation: equal floats.
        assert_eq!(
            nf4_logits(&out),
            nf4_logits(&fixture("qwen2_5_vl_tiny/nf4"))
        );
    }

    #[test]
    fn greedy_generation_runs_on_the_nf4_model() {
        let r = reference();
        let dev = Default::default();
        let m = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            eos_token_ids: Some(vec![]),
            ..GenerateConfig::default()
        };
        let req = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        let out = m.generate(std::slice::from_ref(&req), &cfg, &dev).unwrap();
        assert_eq!(out[0].tokens.len(), 8);
        // The first new token is the argmax of the reference NF4 logits at the last position.
        let want = nf4_reference_logits();
        let vocab = m.config().text.vocab_size;
        let last = &want[want.len() - vocab..];
        let argmax = (0..vocab)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        assert_eq!(out[0].tokens[0], argmax);
    }

    #[test]
    fn the_nf4_model_holds_fewer_parameters_and_bytes_than_the_dense_one() {
        use burn::module::Module;
        let dev = Default::default();
        let dense = tiny();
        let nf4 = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
        // Quantized weights are constants; what stays a parameter is embeddings, norms,
        // biases, the patch conv and the skipped lm_head.
        assert!(nf4.num_params() < dense.num_params());
        assert!(nf4.linear_bytes() < dense.linear_bytes());
        // Decoder projections, all quantized: f32 is 4 bytes per weight; NF4 codes (eight
        // per backend int word, 1 byte per weight with NdArray's i64) plus one f32 scale per
        // 64 weights and the f32 biases stay under 4/3 bytes per weight.
        let (d, q) = (dense.model.linear_bytes(), nf4.model.linear_bytes());
        assert!(q * 3 < d, "nf4 {q} B vs dense {d} B");
        // lm_head is skipped: the only dense Linear left
        assert!(!nf4.lm_head.as_ref().unwrap().is_nf4());
    }

    #[test]
    fn issue_15_resident_weight_bytes_count_every_tensor_and_show_the_nf4_saving() {
        use burn::module::Module;
        let dev = Default::default();
        let dense = tiny();
        let nf4 = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
        // dense f32: every parameter, 4 bytes each, counted once
        assert_eq!(dense.resident_weight_bytes(), dense.num_params() as u64 * 4);
        // NF4: the packed projections plus the dense rest (embeddings, norms, conv, lm_head)
        let rest = nf4.resident_weight_bytes() - nf4.linear_bytes();
        assert!(rest > 0);
        assert!(
            nf4.resident_weight_bytes() < dense.resident_weight_bytes(),
            "nf4 {} B vs dense {} B",
            nf4.resident_weight_bytes(),
            dense.resident_weight_bytes()
        );
    }
}

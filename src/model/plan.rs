//! Peak memory of model work, predicted from the model's config alone (no weights read), so
//! a stage can refuse work that will not fit before it loads anything.
//!
//! The prediction follows how medpipe itself holds and computes the model, not a generic
//! rule of thumb:
//! - **weights**: on a GPU, dense tensors at the compute width; on the CPU, dense Linear
//!   weights used in place from the memory-mapped checkpoint (f32, or bf16 kept as bf16),
//!   other tensors copied out to f32, and the mapped pages themselves while the mapping
//!   lives. NF4 Linears as packed codes (½ byte per weight; read in place on the CPU) plus
//!   one f32 scale per 64-weight block, as `quant::Nf4Linear` holds them.
//! - **kv_cache**: `KvCache` preallocates keys and values for every layer and row at
//!   prompt + new tokens.
//! - **activations**: the largest of the vision tower's and the prefill's live tensors at
//!   their worst layer (the decode step's are far smaller). The attention scores are
//!   counted as each engine makes them: on the CPU, one `[rows, keys]` buffer per worker
//!   thread (`kernels::host_attention`); on a GPU, burn's generic attention materializes the
//!   scores of every head a few times over.
//! - **optimizer**: for training, the LoRA weights, their gradients and AdamW's two moments,
//!   all f32.
//!
//! The counts are element-exact for weights and caches; activations count the tensors the
//! code keeps alive at the peak, which the tests hold to measured peaks (`medpipe plan
//! --measure`).

use serde::Serialize;

use crate::model::config::Qwen25VlConfig;
use crate::model::lora::TARGET_MODULES;
use crate::quant::{is_linear_weight, is_skipped, NF4_BLOCKSIZE};

/// Bytes of `f32`.
const F32: u64 = 4;
/// Text tokens of an extraction prompt besides its image tokens (chat template, system
/// turn, the instruction): a bound on medpipe's own prompts (about 60 tokens), with room
/// for a user's longer question.
pub const PROMPT_TEXT_TOKENS: usize = 256;

/// How the model's Linear weights are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFormat {
    /// Every weight at the engine's weight width.
    Dense,
    /// bitsandbytes NF4 Linears, except the modules `skip` names (kept dense).
    Nf4 { skip: Vec<String> },
}

/// How the checkpoint stores its dense (not NF4) tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stored {
    F32,
    Bf16,
    F16,
}

impl Stored {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Stored::F32 => 4,
            Stored::Bf16 | Stored::F16 => 2,
        }
    }
}

/// What a checkpoint tensor is, for counting its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A Linear weight stored as NF4.
    Nf4,
    /// A Linear weight stored dense.
    Linear,
    /// `model.embed_tokens.weight`.
    Embedding,
    /// Anything else: norms, biases, the patch convolution.
    Other,
}

/// Where and in what width the model runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Engine {
    /// The CPU's host kernels (`true`) or a GPU backend's tensor ops.
    pub host: bool,
    /// Worker threads of the host kernels (each holds one attention score buffer).
    pub threads: usize,
    /// Bytes per dense weight element.
    pub weight_bytes: u64,
    /// Bytes per activation element.
    pub act_bytes: u64,
}

impl Engine {
    /// The CPU: f32 weights and activations, `threads` workers.
    pub fn cpu(threads: usize) -> Self {
        Self {
            host: true,
            threads: threads.max(1),
            weight_bytes: F32,
            act_bytes: F32,
        }
    }

    /// A GPU computing in a float of `bytes` (4: f32, 2: f16/bf16).
    pub fn gpu(bytes: u64) -> Self {
        Self {
            host: false,
            threads: 1,
            weight_bytes: bytes,
            act_bytes: bytes,
        }
    }
}

/// One batched `generate` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    /// Requests in the batch.
    pub batch: usize,
    /// Text tokens per request besides the image tokens.
    pub text_tokens: usize,
    /// Pixels of each request's image after the processor's resize (0: text only).
    pub image_pixels: u64,
    /// New tokens per request.
    pub new_tokens: usize,
}

/// One QLoRA micro-batch: forward and backward through the frozen NF4 base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Training {
    /// Samples per micro-batch.
    pub micro_batch: usize,
    /// Tokens per sample at most (image tokens included).
    pub seq_len: usize,
    /// Pixels of each sample's image after the processor's resize.
    pub image_pixels: u64,
    /// LoRA rank.
    pub lora_r: usize,
    /// Layer recomputation: the decoder runs in segments of this many layers and keeps only
    /// each segment's input (`None`: every layer's activations are kept).
    pub recompute_every: Option<usize>,
}

/// Predicted peak bytes and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Footprint {
    pub weights: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub optimizer: u64,
    /// Checkpoint pages mapped while the weights load but not used in place (NF4 codes
    /// copied out, 16-bit tensors widened to f32 on the CPU); gone once loaded, so they
    /// never meet the activations. Clean file pages: the kernel can reclaim them.
    pub loading: u64,
}

impl Footprint {
    /// The predicted peak: the weights, plus either the work (cache, activations,
    /// optimizer) or the loading, whichever is larger.
    pub fn total(&self) -> u64 {
        self.weights + (self.kv_cache + self.activations + self.optimizer).max(self.loading)
    }
}

/// Σ over the checkpoint's tensors of `bytes(elements, kind)`.
fn per_tensor(
    cfg: &Qwen25VlConfig,
    format: &WeightFormat,
    bytes: impl Fn(u64, Kind) -> u64,
) -> u64 {
    cfg.tensor_manifest()
        .iter()
        .map(|(key, shape)| {
            let numel = shape.iter().product::<usize>() as u64;
            let kind = if key == "model.embed_tokens.weight" {
                Kind::Embedding
            } else if !is_linear_weight(key, shape) {
                Kind::Other
            } else if matches!(format, WeightFormat::Nf4 { skip }
                if !is_skipped(key.trim_end_matches(".weight"), skip))
            {
                Kind::Nf4
            } else {
                Kind::Linear
            };
            bytes(numel, kind)
        })
        .sum()
}

/// Bytes the weights of `cfg` take in the engine's own memory: NF4 packed, everything else
/// at the engine's width (on a GPU, all of it; on the CPU see [`resident_weights`]).
pub fn weight_bytes(cfg: &Qwen25VlConfig, format: &WeightFormat, engine: Engine) -> u64 {
    per_tensor(cfg, format, |numel, kind| match kind {
        Kind::Nf4 => nf4_bytes(numel),
        Kind::Linear | Kind::Embedding | Kind::Other => numel * engine.weight_bytes,
    })
}

/// Packed codes (whole 64-element blocks, as the GPU layout pads them) and f32 scales.
fn nf4_bytes(numel: u64) -> u64 {
    let blocks = numel.div_ceil(NF4_BLOCKSIZE as u64);
    blocks * NF4_BLOCKSIZE as u64 / 2 + blocks * F32
}

/// Patches of an image of `pixels` (after resize), and the LLM tokens they merge into.
fn image_patches(cfg: &Qwen25VlConfig, pixels: u64) -> (u64, u64) {
    let v = &cfg.vision;
    let patch = (v.patch_size * v.patch_size) as u64;
    let unit = v.merge_unit() as u64;
    let patches = pixels / (patch * unit) * unit;
    (patches, patches / unit)
}

/// Prompt tokens of one request (image tokens included, with the vision start/end markers).
pub fn prompt_tokens(cfg: &Qwen25VlConfig, text_tokens: usize, image_pixels: u64) -> usize {
    let (_, merged) = image_patches(cfg, image_pixels);
    text_tokens + merged as usize + if image_pixels > 0 { 2 } else { 0 }
}

/// Peak of one batched `generate`.
pub fn generation(
    cfg: &Qwen25VlConfig,
    format: &WeightFormat,
    stored: Stored,
    engine: Engine,
    work: Generation,
) -> Footprint {
    let t = &cfg.text;
    let b = work.batch.max(1) as u64;
    let s = prompt_tokens(cfg, work.text_tokens, work.image_pixels) as u64;
    let capacity = s + work.new_tokens as u64;
    let kv_cache = 2
        * t.num_layers as u64
        * b
        * t.num_kv_heads as u64
        * capacity
        * t.head_dim as u64
        * engine.act_bytes;
    let vision = vision_peak(cfg, engine, b, work.image_pixels);
    let prefill = prefill_peak(cfg, format, engine, b, s, capacity);
    let (weights, loading) = resident_weights(cfg, format, stored, engine);
    Footprint {
        weights,
        kv_cache,
        activations: vision.max(prefill) + runtime(engine),
        optimizer: 0,
        loading,
    }
}

/// The weights' resident bytes and the loading pages ([`Footprint::loading`]).
///
/// On the CPU, dense Linear weights stored in f32 or bf16 (`Kernels::keeps_bf16_bits`), a
/// bf16 embedding table and NF4 codes are used in place from the checkpoint's memory map;
/// everything else is copied out: NF4 scales (double-quantized in the file) to f32, other
/// tensors (and f16 Linears) widened to f32. While any tensor is used in place the files stay mapped, so every page
/// read at load stays resident beside the copies: weights = copies + all pages read.
/// Otherwise the pages are only read while loading (the loading part) and the copies are
/// the weights. A GPU holds [`weight_bytes`] and never the pages.
fn resident_weights(
    cfg: &Qwen25VlConfig,
    format: &WeightFormat,
    stored: Stored,
    engine: Engine,
) -> (u64, u64) {
    if !engine.host {
        return (weight_bytes(cfg, format, engine), 0);
    }
    let in_place = |kind| match kind {
        Kind::Nf4 => true,
        Kind::Linear => stored != Stored::F16,
        // A bf16 table is looked up in place; an f32 one is copied like the other tensors.
        Kind::Embedding => stored == Stored::Bf16,
        Kind::Other => false,
    };
    let copies = per_tensor(cfg, format, |numel, kind| match kind {
        Kind::Nf4 => numel.div_ceil(NF4_BLOCKSIZE as u64) * F32,
        _ if in_place(kind) => 0,
        _ => numel * engine.weight_bytes,
    });
    let pages = per_tensor(cfg, format, |numel, kind| match kind {
        // Codes, and the 8-bit double-quantized scales.
        Kind::Nf4 => numel / 2 + numel.div_ceil(NF4_BLOCKSIZE as u64),
        // A table read in place is paged in only at the rows looked up (a few KiB per
        // token), unless a tied lm_head reads all of it. Measured on the 7B shape: 1.1 GB
        // less than the whole table.
        Kind::Embedding if in_place(kind) && !cfg.text.tie_word_embeddings => 0,
        _ => numel * stored.bytes(),
    });
    let mapped_for_life = per_tensor(cfg, format, |_, kind| u64::from(in_place(kind))) > 0;
    if mapped_for_life {
        (copies + pages, 0)
    } else {
        (copies, pages)
    }
}

/// Working memory of the host kernels whatever the model: allocator arenas, the GEMM's
/// packing buffers and thread stacks, per worker thread. Measured: 16 MiB on two threads
/// (`medpipe plan --measure` with a text-only prompt, where activations are ~1 MiB).
fn runtime(engine: Engine) -> u64 {
    if engine.host {
        engine.threads as u64 * (8 << 20)
    } else {
        0
    }
}

/// Live bytes at the vision tower's worst block for `b` images of `pixels` each.
fn vision_peak(cfg: &Qwen25VlConfig, engine: Engine, b: u64, pixels: u64) -> u64 {
    if pixels == 0 {
        return 0;
    }
    let v = &cfg.vision;
    let e = engine.act_bytes;
    let (per_image, merged) = image_patches(cfg, pixels);
    let p = b * per_image;
    let (hv, iv, heads) = (
        v.hidden_size as u64,
        v.intermediate_size as u64,
        v.num_heads as u64,
    );
    // The processor's f32 pixel rows: each request's, the batch's concatenation, and the
    // patch embedding's input view of it.
    let pixel_rows = 3 * p * v.patch_dim() as u64 * F32;
    // The residual stream, the normed input, q/k/v, their rotated copies and the output.
    let attn_tensors = p * hv * 8 * e;
    // Full-attention blocks attend over a whole image, window blocks over windows; the
    // batch's images are the same size, so only windows (cut at the edges) need a bool
    // padding mask (`[windows, 1, L, L]`).
    let window = ((v.window_size / v.patch_size).max(1) as u64)
        .pow(2)
        .min(per_image);
    let full_len = if v.fullatt_block_indexes.is_empty() {
        window
    } else {
        per_image
    };
    let segments = p / full_len.max(1);
    let scores = attention_scores(engine, segments * heads, full_len, full_len).max(
        attention_scores(engine, p.div_ceil(window) * heads, window, window),
    );
    let mask = p.div_ceil(window) * window * window;
    let attention = attn_tensors + mask + scores;
    // Gated MLP: residual, normed input, gate, up, their product, output.
    let mlp = p * (3 * hv + 3 * iv) * e;
    // The merger's input and output stay small next to a block.
    let merger = merged * b * (hv * v.merge_unit() as u64 * 2 + v.out_hidden_size as u64) * e;
    pixel_rows + attention.max(mlp).max(merger)
}

/// Bytes of the attention scores of `tasks` `[rows, keys]` products at once.
fn attention_scores(engine: Engine, tasks: u64, rows: u64, keys: u64) -> u64 {
    if engine.host {
        // One f32 score buffer per worker thread, reused head after head.
        tasks.min(engine.threads as u64) * rows * keys * F32
    } else {
        // burn's generic attention: product, scaled, masked and softmax copies of every
        // head (f32: the softmax runs in f32 whatever the activation dtype).
        3 * tasks * rows * keys * F32
    }
}

/// Live bytes at the decoder's worst point of the prefill of `b` rows of `s` tokens.
fn prefill_peak(
    cfg: &Qwen25VlConfig,
    format: &WeightFormat,
    engine: Engine,
    b: u64,
    s: u64,
    capacity: u64,
) -> u64 {
    let t = &cfg.text;
    let e = engine.act_bytes;
    let n = b * s;
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let q = (t.num_heads * t.head_dim) as u64;
    let kv = (t.num_kv_heads * t.head_dim) as u64;
    let group = (t.num_heads / t.num_kv_heads.max(1)) as u64;
    // Embeddings of the prompt, the residual stream and the normed input.
    let stream = n * h * 3 * e;
    // q, k, v; rotated q and k; the attention output. Queries of one key/value group are
    // stacked (`[b, kv, group·s, d]`), and so is the bool mask over the cache capacity.
    let qkv = n * (2 * q + 2 * kv + q) * e;
    let mask = b * group * s * capacity;
    let scores = attention_scores(engine, b * t.num_kv_heads as u64, group * s, capacity);
    let attention = qkv + mask + scores;
    // Gated MLP: gate, up and their product.
    let mlp = n * 3 * i * e;
    // An NF4 prefill (more rows than the GEMV path takes) dequantizes the widest weight
    // into one f32 matrix for the GEMM.
    let dequant = match format {
        WeightFormat::Nf4 { .. } if n > 8 => i * h * F32,
        _ => 0,
    };
    stream + attention.max(mlp + dequant)
}

/// Peak of one training micro-batch (forward, then backward) of QLoRA on an NF4 base.
///
/// Activations kept for the backward, per decoder layer, as burn's autodiff keeps them
/// (counted in the body); the frozen vision tower runs without a graph.
pub fn training(
    cfg: &Qwen25VlConfig,
    skip: &[String],
    stored: Stored,
    work: Training,
) -> Footprint {
    let nf4 = WeightFormat::Nf4 {
        skip: skip.to_vec(),
    };
    let engine = Engine::cpu(1);
    let t = &cfg.text;
    let b = work.micro_batch.max(1) as u64;
    let s = work.seq_len as u64;
    let n = b * s;
    let (h, i, r) = (
        t.hidden_size as u64,
        t.intermediate_size as u64,
        work.lora_r as u64,
    );
    let q = (t.num_heads * t.head_dim) as u64;
    let kv = (t.num_kv_heads * t.head_dim) as u64;
    // Counted op by op from what each backward needs (f32):
    // - the two RMSNorms (f32 island): input, normalized, scaled: 3h each;
    // - LoRA dropout on every target's input, output and mask: q/k/v and gate/up read the
    //   normed stream (5 × 2h), o_proj the attention output (2q), down_proj the MLP
    //   product (2i); each pair's rank-r product and its gradient input (2r × 7);
    // - q, k, v (q + 2kv), their rotary terms (cos, rotate_half, sin: 3(q + kv)) and the
    //   attention output (q);
    // - the MLP: gate, up, sigmoid(gate), silu(gate), their product: 5i;
    // - the attention scores, masked scores and probabilities of every head: 3 b·heads·s².
    let per_token = 6 * h
        + 10 * h
        + 2 * q
        + 2 * i
        + 2 * TARGET_MODULES.len() as u64 * r
        + (q + 2 * kv)
        + 3 * (q + kv)
        + q
        + 5 * i;
    let per_layer = n * per_token * F32 + 3 * b * t.num_heads as u64 * s * s * F32;
    // With recomputation only one segment's graph is alive, beside every segment's kept
    // input and the gradient handed from segment to segment (`[n, hidden]` each).
    let layers = match work.recompute_every {
        None => t.num_layers as u64 * per_layer,
        Some(k) => {
            let k = k.clamp(1, t.num_layers.max(1));
            let segments = t.num_layers.div_ceil(k) as u64;
            k as u64 * per_layer + (segments + 1) * n * h * F32
        }
    };
    // The backward of the widest layer holds its gradients next to the saved tensors.
    let backward = n * (2 * h + 3 * i) * F32 + i * h * F32;
    let logits = n * t.vocab_size as u64 * F32 * 2;
    let vision = vision_peak(cfg, engine, b, work.image_pixels);
    let lora_params = lora_parameters(cfg, work.lora_r);
    let (weights, loading) = resident_weights(cfg, &nf4, stored, engine);
    Footprint {
        weights,
        kv_cache: 0,
        activations: vision.max(layers + backward.max(logits)) + runtime(engine),
        // Weights, gradients and AdamW's two moments.
        optimizer: 4 * lora_params * F32,
        loading,
    }
}

/// Parameters of the LoRA pairs on every language-model target module.
pub fn lora_parameters(cfg: &Qwen25VlConfig, r: usize) -> u64 {
    cfg.tensor_manifest()
        .iter()
        .filter(|(key, shape)| {
            key.starts_with("model.layers.")
                && shape.len() == 2
                && TARGET_MODULES
                    .iter()
                    .any(|m| key.ends_with(&format!(".{m}.weight")))
        })
        .map(|(_, shape)| (r * (shape[0] + shape[1])) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfConfig;
    use crate::test_util::fixture;

    fn qwen_7b() -> Qwen25VlConfig {
        let path = fixture("qwen2_5_vl_7b_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        HfConfig::from_json_str(&text, &path)
            .unwrap()
            .resolve()
            .unwrap()
    }

    const GB: f64 = 1e9;

    #[test]
    fn the_7b_weights_take_two_bytes_per_parameter_in_bf16_and_about_a_third_of_that_in_nf4() {
        let cfg = qwen_7b();
        let params = cfg.parameter_count();
        let bf16 = weight_bytes(&cfg, &WeightFormat::Dense, Engine::gpu(2));
        assert_eq!(bf16, 2 * params);
        assert!((bf16 as f64 / GB - 16.58).abs() < 0.01, "{bf16}");
        let nf4 = weight_bytes(
            &cfg,
            &WeightFormat::Nf4 {
                skip: vec!["lm_head".into()],
            },
            Engine::gpu(2),
        );
        // Dense in bf16: embed_tokens and lm_head (2 × 152064 × 3584 = 1.09 G weights,
        // 2.18 GB), norms, biases, the patch embedding; the other ~7.2 G weights at 0.5625
        // bytes (4.05 GB).
        assert!(
            (6.1..6.4).contains(&(nf4 as f64 / GB)),
            "NF4 7B: {:.2} GB",
            nf4 as f64 / GB
        );
        let f32_cpu = weight_bytes(&cfg, &WeightFormat::Dense, Engine::cpu(2));
        assert_eq!(f32_cpu, 4 * params);
    }

    #[test]
    fn a_bf16_checkpoint_on_the_cpu_keeps_its_linears_in_place_and_widens_only_the_rest() {
        let cfg = qwen_7b();
        let params = cfg.parameter_count();
        let count = |k| {
            per_tensor(
                &cfg,
                &WeightFormat::Dense,
                |n, kind| {
                    if kind == k {
                        n
                    } else {
                        0
                    }
                },
            )
        };
        let embedding = count(Kind::Embedding);
        assert_eq!(embedding, 152_064 * 3584);
        // Norms, biases, the patch convolution.
        let other = count(Kind::Other);
        assert!(other > 0 && other < params / 1000, "{other}");
        let work = Generation {
            batch: 1,
            text_tokens: 64,
            image_pixels: 0,
            new_tokens: 4,
        };
        let at = |stored, engine| generation(&cfg, &WeightFormat::Dense, stored, engine, work);
        // bf16: Linears and the embedding table read in place (2 bytes), the rest widened
        // to f32 (4) beside its pages (2), which stay mapped with the Linears'; nothing is
        // transient.
        let cpu = at(Stored::Bf16, Engine::cpu(2));
        assert_eq!(
            (cpu.weights, cpu.loading),
            (2 * (params - embedding) + 4 * other, 0),
            "the table's pages come in only at the rows looked up"
        );
        let mut tied = cfg.clone();
        tied.text.tie_word_embeddings = true;
        let lm_head = 152_064 * 3584;
        let tied_cpu = generation(
            &tied,
            &WeightFormat::Dense,
            Stored::Bf16,
            Engine::cpu(2),
            work,
        );
        assert_eq!(
            tied_cpu.weights,
            2 * (params - lm_head) + 4 * other,
            "tied: the logits read the whole table"
        );
        // f32: the Linears in place, the embedding and the rest copied beside their pages.
        let f32_file = at(Stored::F32, Engine::cpu(2));
        assert_eq!(f32_file.weights, 4 * params + 4 * (embedding + other));
        // f16 Linears are widened: nothing is used in place, the pages are transient.
        let f16 = at(Stored::F16, Engine::cpu(2));
        assert_eq!((f16.weights, f16.loading), (4 * params, 2 * params));
        let gpu = at(Stored::Bf16, Engine::gpu(2));
        assert_eq!((gpu.weights, gpu.loading), (2 * params, 0));
    }

    #[test]
    fn the_kv_cache_grows_with_batch_and_tokens_exactly() {
        let cfg = qwen_7b();
        let work = Generation {
            batch: 1,
            text_tokens: 100,
            image_pixels: 0,
            new_tokens: 28,
        };
        let one = generation(
            &cfg,
            &WeightFormat::Dense,
            Stored::Bf16,
            Engine::gpu(2),
            work,
        );
        // 28 layers × (k, v) × 4 kv heads × 128 dims × 128 positions × 2 bytes.
        assert_eq!(one.kv_cache, 28 * 2 * 4 * 128 * 128 * 2);
        let four = generation(
            &cfg,
            &WeightFormat::Dense,
            Stored::Bf16,
            Engine::gpu(2),
            Generation { batch: 4, ..work },
        );
        assert_eq!(four.kv_cache, 4 * one.kv_cache);
        assert_eq!(four.weights, one.weights);
    }

    #[test]
    fn an_image_counts_one_llm_token_per_28x28_pixels_plus_its_two_markers() {
        let cfg = qwen_7b();
        assert_eq!(prompt_tokens(&cfg, 10, 0), 10);
        assert_eq!(prompt_tokens(&cfg, 10, 448 * 448), 10 + 256 + 2);
    }

    #[test]
    fn larger_images_need_more_activation_memory_and_full_attention_grows_quadratically() {
        let cfg = qwen_7b();
        let at = |pixels| {
            generation(
                &cfg,
                &WeightFormat::Dense,
                Stored::Bf16,
                Engine::gpu(2),
                Generation {
                    batch: 1,
                    text_tokens: 64,
                    image_pixels: pixels,
                    new_tokens: 16,
                },
            )
            .activations
        };
        let (small, large) = (at(448 * 448), at(1792 * 1792));
        // 16× the pixels: the full-attention scores grow 256×.
        assert!(large > 50 * small, "{small} → {large}");
    }

    #[test]
    fn lora_parameters_count_both_factors_of_every_text_target() {
        let cfg = qwen_7b();
        let (h, i, kv) = (3584usize, 18944usize, 512usize);
        let per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + i) * 3;
        assert_eq!(lora_parameters(&cfg, 1), (28 * per_layer) as u64);
        assert_eq!(lora_parameters(&cfg, 64), 64 * lora_parameters(&cfg, 1));
    }

    #[test]
    fn training_adds_adamw_states_and_saved_activations_that_grow_with_the_sequence() {
        let cfg = qwen_7b();
        let work = Training {
            micro_batch: 1,
            seq_len: 512,
            image_pixels: 448 * 448,
            lora_r: 64,
            recompute_every: None,
        };
        let skip = ["lm_head".to_string()];
        let a = training(&cfg, &skip, Stored::Bf16, work);
        assert_eq!(a.optimizer, 4 * 4 * lora_parameters(&cfg, 64));
        let b = training(
            &cfg,
            &skip,
            Stored::Bf16,
            Training {
                seq_len: 1024,
                ..work
            },
        );
        assert!(b.activations > 2 * a.activations - a.activations / 4);
    }

    #[test]
    fn recomputation_keeps_one_segment_of_layers_and_every_segment_input() {
        let cfg = qwen_7b(); // 28 layers
        let skip = ["lm_head".to_string()];
        let plan = |recompute_every| {
            training(
                &cfg,
                &skip,
                Stored::Bf16,
                Training {
                    micro_batch: 1,
                    seq_len: 2048,
                    image_pixels: 0,
                    lora_r: 64,
                    recompute_every,
                },
            )
        };
        let (none, layers, four) = (plan(None), plan(Some(1)), plan(Some(4)));
        // Saved activations shrink from 28 layers' to one layer's (or four) plus the kept
        // inputs; weights and optimizer state do not change.
        let saved = |f: &Footprint| f.activations - plan(Some(1)).activations;
        assert!(saved(&none) > 20 * saved(&four) / 4, "{none:?} vs {four:?}");
        assert!(
            layers.activations < none.activations / 4,
            "{layers:?} vs {none:?}"
        );
        assert!(layers.activations < four.activations && four.activations < none.activations);
        assert_eq!(
            (layers.weights, layers.optimizer),
            (none.weights, none.optimizer)
        );
        // every_n beyond the depth is one segment: no recomputation at all.
        assert!(plan(Some(28)).activations >= none.activations);
        assert_eq!(plan(Some(100)), plan(Some(28)));
    }
}

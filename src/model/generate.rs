//! Text generation: greedy or seeded sampling (temperature, top-k, top-p, on the device:
//! [`crate::model::sampling`]), stopping on the checkpoint's end-of-sequence ids, for a batch of prompts left-padded to one length.
//!
//! Batching follows transformers' generate with left padding: padded keys are masked,
//! and each row's M-RoPE positions are what the prompt alone would get (pads take
//! position 1 and decode steps use `cache index + rope delta`, as in
//! `Qwen2_5_VLModel.forward`, `modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`).

use std::time::Instant;

use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::profile::{self, KernelClass};
use crate::kernels::Kernels;
use crate::model::error::ModelError;
use crate::model::qwen::{ImageInput, Qwen25Vl};
use crate::model::sampling::sample;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Highest logit.
    Greedy,
    /// Softmax sampling after `temperature`, then `top_k` (0 = off), then `top_p` (1 = off).
    Sample {
        /// Logit divisor (> 0).
        temperature: f32,
        /// Keep only the k most likely tokens; 0 keeps all.
        top_k: usize,
        /// Keep the smallest set of tokens whose probability reaches `top_p`.
        top_p: f32,
    },
}

impl Sampling {
    /// Checks the settings a draw needs: a temperature above 0 and `top_p` in (0, 1].
    ///
    /// # Errors
    /// A message naming both values.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Sampling::Sample {
                temperature, top_p, ..
            } if !(temperature > 0.0 && top_p > 0.0 && top_p <= 1.0) => Err(format!(
                "temperature {temperature} must be > 0 and top_p {top_p} in (0, 1]"
            )),
            _ => Ok(()),
        }
    }
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// New tokens at most (tokens).
    pub max_new_tokens: usize,
    /// Decoding rule.
    pub sampling: Sampling,
    /// RNG seed for [`Sampling::Sample`]; each row uses its own generator from this seed,
    /// so a prompt samples the same way alone or in a batch.
    pub seed: u64,
    /// Stop ids; `None` uses the checkpoint's (generation_config.json / config.json).
    pub eos_token_ids: Option<Vec<u32>>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            seed: 0,
            eos_token_ids: None,
        }
    }
}

/// One prompt: token ids (with image placeholders already expanded) and its images.
#[derive(Debug, Clone)]
pub struct Request<B: Kernels> {
    /// Prompt tokens.
    pub input_ids: Vec<u32>,
    /// The prompt's images, if any.
    pub images: Option<ImageInput<B>>,
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, ending with the eos token when one was produced.
    pub tokens: Vec<u32>,
    /// Prompt length (tokens).
    pub prompt_tokens: usize,
    /// Whether generation stopped on an eos id (else on `max_new_tokens`).
    pub stopped_on_eos: bool,
    /// Wall time of the batch's prefill incl. vision tower and first token (ms).
    pub prefill_ms: f64,
    /// Wall time of the batch's remaining decode steps (ms).
    pub decode_ms: f64,
    /// Rows in the batch this request ran in.
    pub batch_size: usize,
}

impl<B: Kernels> Qwen25Vl<B> {
    /// Generates for several prompts at once (left padding + attention masks).
    ///
    /// # Errors
    /// Input errors (image tokens vs features, malformed grids) and [`ModelError::Readback`].
    pub fn generate(
        &self,
        requests: &[Request<B>],
        cfg: &GenerateConfig,
        device: &B::Device,
    ) -> Result<Vec<Generation>, ModelError> {
        self.generate_cancellable(requests, cfg, device, &|_| false)
    }

    /// [`Self::generate`], asking `abandoned(row)` before every decode step: an abandoned row
    /// stops there (its tokens so far are returned), and when every row is done the batch
    /// stops. A server uses it to stop generating for clients that have gone.
    ///
    /// # Errors
    /// As [`Self::generate`].
    pub fn generate_cancellable(
        &self,
        requests: &[Request<B>],
        cfg: &GenerateConfig,
        device: &B::Device,
        abandoned: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Generation>, ModelError> {
        let _span = tracing::debug_span!("generate", batch = requests.len()).entered();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        cfg.sampling.check().map_err(|reason| ModelError::Input {
            name: "sampling",
            reason,
        })?;
        if let Some(i) = requests.iter().position(|r| r.input_ids.is_empty()) {
            return Err(ModelError::Input {
                name: "input_ids",
                reason: format!("request {i} has an empty prompt"),
            });
        }
        let batch = requests.len();
        let len = requests
            .iter()
            .map(|r| r.input_ids.len())
            .max()
            .unwrap_or(0);
        let pad = self.config().tokens.pad_token_id.unwrap_or(0);
        let eos: Vec<u32> = cfg
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| self.config().tokens.eos_token_ids.clone());
        let mut rows = Vec::with_capacity(batch);
        let mut valid = Vec::with_capacity(batch);
        for r in requests {
            let n = len - r.input_ids.len();
            let mut row = vec![pad; n];
            row.extend_from_slice(&r.input_ids);
            let mut v = vec![false; n];
            v.extend(std::iter::repeat_n(true, r.input_ids.len()));
            rows.push(row);
            valid.push(v);
        }
        let images = concat_images(requests);
        let start = Instant::now();
        let mut caches = self.new_caches(batch, len + cfg.max_new_tokens, device);
        let pre = self.prefill(&rows, &valid, images.as_ref(), Some(&mut caches), device)?;
        let last = pre.hidden.narrow(1, len - 1, 1);
        let mut rngs: Vec<ChaCha8Rng> = (0..batch)
            .map(|_| ChaCha8Rng::seed_from_u64(cfg.seed))
            .collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        let mut next = if cfg.max_new_tokens > 0 {
            self.pick(last, &cfg.sampling, &mut rngs)?
        } else {
            Vec::new()
        };
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        // A kernel profile being recorded holds the decode steps only.
        crate::kernels::profile::restart();
        let decode_start = Instant::now();
        let mut keys = valid;
        for step in 0..cfg.max_new_tokens {
            for b in 0..batch {
                if !done[b] {
                    out[b].push(next[b]);
                    done[b] = eos.contains(&next[b]) || abandoned(b);
                }
            }
            if step + 1 == cfg.max_new_tokens || done.iter().all(|&d| d) {
                break;
            }
            let _s = tracing::trace_span!("decode_step", step).entered();
            let cache_index = (len + step) as i64;
            let positions: Vec<i64> = pre
                .positions
                .deltas
                .iter()
                .map(|d| cache_index + d)
                .collect();
            for k in keys.iter_mut() {
                k.push(true);
            }
            let h = self.step(&next, &positions, &keys, &mut caches, device)?;
            next = self.pick(h, &cfg.sampling, &mut rngs)?;
        }
        let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
        Ok(out
            .into_iter()
            .zip(requests)
            .map(|(tokens, r)| Generation {
                stopped_on_eos: tokens.last().is_some_and(|t| eos.contains(t)),
                tokens,
                prompt_tokens: r.input_ids.len(),
                prefill_ms,
                decode_ms,
                batch_size: batch,
            })
            .collect())
    }

    /// Next token per row from last hidden states `[batch, 1, hidden]`.
    fn pick(
        &self,
        hidden: Tensor<B, 3>,
        sampling: &Sampling,
        rngs: &mut [ChaCha8Rng],
    ) -> Result<Vec<u32>, ModelError> {
        let logits = self.logits(hidden); // [batch, 1, vocab]
        let [b, _, v] = logits.dims();
        let logits = logits.reshape([b, v]);
        let device = logits.device();
        let bytes = profile::bytes_of(&logits.shape(), logits.dtype());
        // Only the ids come back to the host.
        let ids = profile::timed::<B, _>(KernelClass::Sampling, &device, bytes, || {
            match sampling {
                Sampling::Greedy => logits.argmax(1).reshape([b]),
                Sampling::Sample {
                    temperature,
                    top_k,
                    top_p,
                } => {
                    // One uniform per row from the row's own generator.
                    let uniforms: Vec<f32> = rngs.iter_mut().map(|r| r.random::<f32>()).collect();
                    sample(logits, *temperature, *top_k, *top_p, &uniforms)
                }
            }
        });
        let ids = ids
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| ModelError::Readback {
                what: "next token ids",
                reason: format!("{e:?}"),
            })?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }
}

/// All requests' images concatenated in batch order (the order their placeholders appear
/// in the flattened batch).
fn concat_images<B: Kernels>(requests: &[Request<B>]) -> Option<ImageInput<B>> {
    let with: Vec<&ImageInput<B>> = requests.iter().filter_map(|r| r.images.as_ref()).collect();
    if with.is_empty() {
        return None;
    }
    Some(ImageInput {
        pixel_values: Tensor::cat(with.iter().map(|i| i.pixel_values.clone()).collect(), 0),
        grids: with.iter().flat_map(|i| i.grids.iter().copied()).collect(),
    })
}

//! Hyper-parameters of a LoRA fine-tune (`[train]` maps onto them in the train stage).

use std::fmt;
use std::num::NonZeroUsize;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Hyper-parameters of a LoRA fine-tune (defaults: the QLoRA recipe, Dettmers et al. 2023).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the optimizer steps spent in linear warmup (rounded up, as HF).
    pub warmup_ratio: f64,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Samples per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient L2 norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of the data order and LoRA dropout.
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps (the end of training always does).
    pub checkpoint_every: Option<u64>,
    /// Validate every this many optimizer steps (the end of each epoch always does).
    pub eval_every: Option<u64>,
    /// Use at most this many training samples (the first ones of the source).
    pub max_samples: Option<usize>,
    /// Committed checkpoints kept on disk (older ones are removed); at least 1.
    pub keep_checkpoints: usize,
    /// Which decoder activations the backward keeps, and which it recomputes.
    pub recompute: Recompute,
    /// Read the loss and gradient norm back from the device every this many optimizer
    /// steps (at least 1). Between reads no step waits for the device, so a GPU never
    /// idles while the host prepares the next step; validation, checkpoints and epoch ends
    /// read too. Does not change what is computed.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

fn default_log_every() -> u64 {
    TrainConfig::default().log_every
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup_ratio: 0.03,
            epochs: 1,
            batch_size: 1,
            grad_accum: 4,
            max_grad_norm: Some(0.3),
            weight_decay: 0.0,
            seed: 42,
            checkpoint_every: Some(50),
            eval_every: None,
            max_samples: None,
            keep_checkpoints: 2,
            recompute: Recompute::None,
            log_every: 10,
        }
    }
}

/// Layer recomputation (gradient checkpointing at decoder-layer granularity): what a
/// training forward keeps for its backward. Written `none`, `layers` or `every_n:K`.
///
/// With recomputation the stack runs in segments of `K` layers. The forward keeps only
/// each segment's input; the backward reruns one segment at a time with a graph and
/// backpropagates through it, so at most one segment's activations are alive. The price
/// is a second forward of every segment but the last. The gradients are those of a plain
/// backward: the rerun draws the same LoRA dropout masks (each layer reseeds the RNG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Recompute {
    /// Keep every layer's activations (fastest, largest).
    #[default]
    None,
    /// Keep the input of every `K`-th layer; `layers` is `every_n:1`.
    EveryN(NonZeroUsize),
}

impl Recompute {
    /// The values `train.recompute` accepts, for error messages and `--help`.
    pub const ACCEPTED: &'static str = "\"none\", \"layers\" or \"every_n:K\" with K >= 1";

    /// Segments of a `layers`-deep stack: consecutive ranges covering it, the last one
    /// run once with the loss (at least one range, even for an empty stack).
    pub fn segments(self, layers: usize) -> Vec<Range<usize>> {
        let k = match self {
            Recompute::None => return std::iter::once(0..layers).collect(),
            Recompute::EveryN(k) => k.get(),
        };
        let mut out: Vec<Range<usize>> = (0..layers)
            .step_by(k)
            .map(|s| s..(s + k).min(layers))
            .collect();
        if out.is_empty() {
            out.push(0..0);
        }
        out
    }

    /// Layers per segment (`None`: no recomputation), as the memory planner takes it.
    pub fn segment_len(self) -> Option<usize> {
        match self {
            Recompute::None => None,
            Recompute::EveryN(k) => Some(k.get()),
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recompute::None => f.write_str("none"),
            Recompute::EveryN(k) if k.get() == 1 => f.write_str("layers"),
            Recompute::EveryN(k) => write!(f, "every_n:{k}"),
        }
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a recompute setting: use {}", Self::ACCEPTED);
        match s {
            "none" => Ok(Recompute::None),
            "layers" => Ok(Recompute::EveryN(NonZeroUsize::MIN)),
            _ => {
                let k = s.strip_prefix("every_n:").ok_or_else(bad)?;
                let k: usize = k.trim().parse().map_err(|_| bad())?;
                NonZeroUsize::new(k).map(Recompute::EveryN).ok_or_else(bad)
            }
        }
    }
}

impl TryFrom<String> for Recompute {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Recompute> for String {
    fn from(r: Recompute) -> String {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recompute_reads_and_writes_its_three_forms() {
        for (text, want) in [
            ("none", Recompute::None),
            ("layers", Recompute::EveryN(NonZeroUsize::MIN)),
            (
                "every_n:4",
                Recompute::EveryN(NonZeroUsize::new(4).unwrap()),
            ),
        ] {
            let r: Recompute = text.parse().unwrap();
            assert_eq!(r, want);
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(
            "every_n:1".parse::<Recompute>().unwrap().to_string(),
            "layers"
        );
        for bad in ["layer", "every_n:0", "every_n:", "every_n:x", "all", ""] {
            let e = bad.parse::<Recompute>().unwrap_err();
            assert!(e.contains("every_n:K"), "{bad}: {e}");
        }
    }

    #[test]
    fn segments_cover_the_stack_in_order_with_a_shorter_last_one() {
        let every = |k| Recompute::EveryN(NonZeroUsize::new(k).unwrap());
        assert_eq!(Recompute::None.segments(8), vec![0..8]);
        assert_eq!(every(1).segments(3), vec![0..1, 1..2, 2..3]);
        assert_eq!(every(3).segments(8), vec![0..3, 3..6, 6..8]);
        assert_eq!(every(16).segments(8), vec![0..8]);
        assert_eq!(every(2).segments(0), vec![0..0]);
        assert_eq!(every(3).segment_len(), Some(3));
        assert_eq!(Recompute::None.segment_len(), None);
    }
}

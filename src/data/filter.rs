//! Per-source filters and cross-source de-duplication, each drop counted with its reason.
//!
//! Reasons (the keys of `dropped` in `reports/dataset.json`): `empty_text`,
//! `answer_too_short`, `answer_too_long`, `decode_error`, `encoding_error`, `malformed_row`,
//! `image_too_small`, `image_too_large`, `duplicate`.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `[prepare.filters]`: what a sample must satisfy to be kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Shortest target (answer) kept, in characters.
    #[serde(default = "default_min_answer")]
    pub min_answer_chars: usize,
    /// Longest target (answer) kept, in characters.
    #[serde(default = "default_max_answer")]
    pub max_answer_chars: usize,
    /// Smallest image kept, in pixels (width × height); Qwen2-VL's `min_pixels` is 56×56.
    #[serde(default = "default_min_image")]
    pub min_image_pixels: u64,
    /// Largest image kept, in pixels; larger decoded images are dropped, and rendered pages
    /// that need more than `render.max_pixels` are dropped as `image_too_large` too.
    #[serde(default = "default_max_image")]
    pub max_image_pixels: u64,
    /// Drop a sample whose content (text + answer, or image + question + answer) was seen
    /// before, in this or an earlier source.
    #[serde(default = "default_true")]
    pub dedup: bool,
}

fn default_min_answer() -> usize {
    2
}
fn default_max_answer() -> usize {
    1500
}
fn default_min_image() -> u64 {
    56 * 56
}
fn default_max_image() -> u64 {
    4096 * 4096
}
fn default_true() -> bool {
    true
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            min_answer_chars: default_min_answer(),
            max_answer_chars: default_max_answer(),
            min_image_pixels: default_min_image(),
            max_image_pixels: default_max_image(),
            dedup: true,
        }
    }
}

/// Why a sample was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    EmptyText,
    AnswerTooShort,
    AnswerTooLong,
    DecodeError,
    EncodingError,
    MalformedRow,
    ImageTooSmall,
    ImageTooLarge,
    Duplicate,
}

impl DropReason {
    /// The reason's key in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::EmptyText => "empty_text",
            DropReason::AnswerTooShort => "answer_too_short",
            DropReason::AnswerTooLong => "answer_too_long",
            DropReason::DecodeError => "decode_error",
            DropReason::EncodingError => "encoding_error",
            DropReason::MalformedRow => "malformed_row",
            DropReason::ImageTooSmall => "image_too_small",
            DropReason::ImageTooLarge => "image_too_large",
            DropReason::Duplicate => "duplicate",
        }
    }
}

/// What one source read, kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Rows or documents read.
    pub read: u64,
    /// Samples kept.
    pub kept: u64,
    /// Dropped samples by reason.
    pub dropped: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts one drop.
    pub fn drop(&mut self, reason: DropReason) {
        *self.dropped.entry(reason.as_str().to_string()).or_default() += 1;
    }

    /// The reason that dropped the most samples (ties: the first in report order).
    pub fn main_reason(&self) -> Option<(&str, u64)> {
        self.dropped
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(k, v)| (k.as_str(), *v))
    }

    /// Adds another tally (shards of the same source).
    pub fn merge(&mut self, other: &Tally) {
        self.read += other.read;
        self.kept += other.kept;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
    }
}

/// Checks the text and answer of a sample.
pub fn check_text(text: &str, target: &str, cfg: &FilterConfig) -> Result<(), DropReason> {
    if text.trim().is_empty() {
        return Err(DropReason::EmptyText);
    }
    let n = target.chars().count();
    if n < cfg.min_answer_chars {
        return Err(DropReason::AnswerTooShort);
    }
    if n > cfg.max_answer_chars {
        return Err(DropReason::AnswerTooLong);
    }
    Ok(())
}

/// Checks image dimensions against the bounds.
pub fn check_image(width: u32, height: u32, cfg: &FilterConfig) -> Result<(), DropReason> {
    let px = width as u64 * height as u64;
    if px < cfg.min_image_pixels {
        Err(DropReason::ImageTooSmall)
    } else if px > cfg.max_image_pixels {
        Err(DropReason::ImageTooLarge)
    } else {
        Ok(())
    }
}

/// sha256 over length-prefixed parts, so `("ab","c")` and `("a","bc")` differ.
pub fn content_hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Content hashes seen so far, across sources.
#[derive(Debug, Default)]
pub struct Dedup {
    seen: HashSet<[u8; 32]>,
}

impl Dedup {
    /// True the first time `hash` is offered.
    pub fn first(&mut self, hash: [u8; 32]) -> bool {
        self.seen.insert(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_bounds_and_empty_text_are_checked_in_that_order() {
        let cfg = FilterConfig {
            min_answer_chars: 3,
            max_answer_chars: 5,
            ..FilterConfig::default()
        };
        assert_eq!(check_text("  ", "abcd", &cfg), Err(DropReason::EmptyText));
        assert_eq!(check_text("t", "ab", &cfg), Err(DropReason::AnswerTooShort));
        assert_eq!(
            check_text("t", "abcdef", &cfg),
            Err(DropReason::AnswerTooLong)
        );
        assert_eq!(check_text("t", "abcd", &cfg), Ok(()));
    }

    #[test]
    fn image_bounds_are_in_pixels() {
        let cfg = FilterConfig::default();
        assert_eq!(check_image(55, 56, &cfg), Err(DropReason::ImageTooSmall));
        assert_eq!(check_image(56, 56, &cfg), Ok(()));
        assert_eq!(
            check_image(5000, 5000, &cfg),
            Err(DropReason::ImageTooLarge)
        );
    }

    #[test]
    fn content_hash_separates_parts_and_dedup_sees_repeats() {
        assert_ne!(content_hash(&[b"ab", b"c"]), content_hash(&[b"a", b"bc"]));
        let mut d = Dedup::default();
        assert!(d.first(content_hash(&[b"x"])));
        assert!(!d.first(content_hash(&[b"x"])));
    }

    #[test]
    fn tally_names_the_reason_that_dropped_most() {
        let mut t = Tally::default();
        t.drop(DropReason::Duplicate);
        t.drop(DropReason::DecodeError);
        t.drop(DropReason::DecodeError);
        assert_eq!(t.main_reason(), Some(("decode_error", 2)));
    }
}

//! Model inputs from text and images: the Qwen chat format, image-placeholder expansion,
//! training labels and left padding.
//!
//! Follows transformers 5 `models/qwen2_5_vl/processing_qwen2_5_vl.py` (`Qwen2_5_VLProcessor`):
//! the chat is rendered with the checkpoint's chat template (jinja, with `trim_blocks` and
//! `lstrip_blocks` as `apply_chat_template` sets them), then every `<|image_pad|>` is expanded to
//! `grid_t·grid_h·grid_w / merge_size²` copies, one run per image in order. We expand after
//! tokenizing (the placeholder is a single added token), which gives the same ids as the
//! reference's expand-then-tokenize. Without a chat template the built-in Qwen2.5-VL format is used;
//! for the published template both give the same text (`builtin_format_matches_the_qwen25vl_template`).
//!
//! Special token ids come from `config.json` (`image_token_id`, `vision_start_token_id`,
//! `vision_end_token_id`, `pad_token_id`) and the tokenizer, never from literals.
//!
//! - `template`: the prompt text (chat template or built-in format);
//! - `builder`: [`PromptBuilder`], tokenizer and special ids of a checkpoint, chat → ids and labels;
//! - `expand`: image-placeholder expansion; `batch`: left padding of ids and labels;
//! - `error`: [`PromptError`].

mod batch;
mod builder;
mod error;
mod expand;
mod template;

pub use batch::{left_pad, left_pad_labels, PaddedBatch, IGNORE_INDEX};
pub use builder::{PromptBuilder, SpecialTokens, TrainingExample};
pub use error::PromptError;
pub use expand::{expand_image_tokens, image_token_count};
pub use template::DEFAULT_SYSTEM_PROMPT;

#[cfg(test)]
mod tests;

//! medpipe: a resumable pipeline that fine-tunes Qwen2.5-VL (QLoRA) to read clinical
//! documents, and proves with numbers whether the fine-tune helped.
//!
//! `pipeline` runs stages and keeps their artifacts; `stages` holds one file per stage;
//! `config` is the TOML the user writes.

pub mod config;
pub mod data;
pub mod pipeline;
pub mod stages;

pub use config::Config;

#[cfg(test)]
pub(crate) mod test_util;

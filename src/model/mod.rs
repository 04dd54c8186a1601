//! Qwen2.5-VL: the input side (image processor, chat prompt building).

pub mod processor;
pub mod prompt;

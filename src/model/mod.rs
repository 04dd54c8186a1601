//! Qwen2.5-VL pieces (LoRA so far on this branch).

pub mod lora;

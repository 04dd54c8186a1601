//! Checkpoint access: memory-mapped safetensors (one file or shards listed in
//! `model.safetensors.index.json`), both key layouts, strict coverage checks, and
//! f32/f64/bf16/f16 → f32 conversion on the CPU.
//!
//! Key layouts (remap table in `source`): the published Qwen2.5-VL checkpoints use
//! `model.layers.N…`, `model.embed_tokens`, `model.norm`, `visual.…`, `lm_head`;
//! transformers 5 saves `model.language_model.…`, `model.visual.…`, `lm_head`
//! (`_checkpoint_conversion_mapping` in transformers
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`).
//! Internally every key is canonicalised to the published layout, which is also what the
//! module field names spell.
//!
//! A Linear stored as bitsandbytes 4-bit (transformers' serialization: packed `weight`,
//! `weight.absmax`, `weight.quant_map`, with double quant `weight.nested_absmax` and
//! `weight.nested_quant_map`, and the `weight.quant_state.bitsandbytes__nf4` blob) is
//! recognised per module by its blob, so partly quantized checkpoints (skipped `lm_head`,
//! vision tower left dense) check and load too.
//!
//! Why not `burn::store::SafetensorsStore`: one store covers one file (shards need one
//! each), it creates parameters in the file dtype (bf16 panics on NdArray), and the NF4
//! path needs raw bytes anyway; a manifest computed from the config lets the loader
//! report every missing, unexpected and mis-shaped tensor at once, with its file.
//!
//! - `manifest`: the tensors a config's checkpoint holds (`expected_tensors`, and
//!   `Qwen25VlConfig::{tensor_manifest, parameter_count}`).
//! - `source`: [`WeightSource`], the memory-mapped checkpoint and its checks.

pub(crate) mod manifest;
pub(crate) mod source;

pub(crate) use source::WeightSource;

//! NF4 4-bit quantization with double quantization, bit-exact with bitsandbytes 0.50
//! (`bitsandbytes/functional.py` `quantize_4bit`/`dequantize_4bit`/`quantize_blockwise`,
//! CUDA kernels `csrc/kernels.cu`), its transformers checkpoint format, a quantized linear
//! layer for burn, and the streaming quantizer of a whole checkpoint directory.

mod checks;
mod double_quant;
mod error;
mod format;
mod linear;
mod nf4;
mod quantize_model;
mod select;
mod shards;

pub use double_quant::{dequantize_absmax, dynamic_map_signed, quantize_absmax, NestedAbsmax};
pub use error::QuantError;
pub use format::{quantization_config, Nf4Tensor, QuantStateBlob, RawTensor, BLOB_SUFFIX};
pub use linear::Nf4Linear;
pub use nf4::{dequantize_nf4, quantize_nf4, Nf4Quantized, NF4_BLOCKSIZE, NF4_CODE};
pub use quantize_model::{quantize_checkpoint, QuantizeOptions, QuantizeReport, TensorReport};
pub use select::{is_linear_weight, is_skipped};

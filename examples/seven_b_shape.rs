//! Writes a checkpoint of the published Qwen2.5-VL-7B shape with random bf16 weights, in 5
//! safetensors shards with an index, for `scripts/seven-b-shape` (issue 19): medpipe meets a
//! real-size checkpoint without downloading one.
//!
//! `cargo run --release --example seven_b_shape -- CONFIG.json OUT_DIR`
//!
//! - Shapes: every tensor of CONFIG's manifest (the loader's own), 16.6 GB in bf16.
//! - Values: uniform with the initializer's standard deviation (0.02) for weights, ones for
//!   norms, zeros for biases, from a fixed xorshift stream (fast; the values are not the
//!   point, the sizes are).
//! - Tokenizer: builtin:tiny's, written beside it with the special-token ids of CONFIG
//!   replaced by that tokenizer's (the published ids are beyond its vocabulary); the
//!   embedding keeps the published 152,064 rows.
//! - Processor: the published preprocessor_config.json values (max_pixels 12,845,056).
//!
//! Data is streamed tensor by tensor, so writing takes little memory.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use medpipe::model::HfConfig;
use serde_json::{json, Value};

const SHARDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: seven_b_shape CONFIG.json OUT_DIR");
    };
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let text = std::fs::read_to_string(&config).with_context(|| format!("reading {config}"))?;
    let cfg = HfConfig::from_json_str(&text, Path::new(&config))?.resolve()?;
    let manifest = cfg.tensor_manifest();

    let tiny = medpipe::bench::source::resolve_model("builtin:tiny", 0)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny.join(f), out.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let tiny_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json"))?)?;
    let mut published: Value = serde_json::from_str(&text)?;
    for key in [
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_token_id",
        "image_token_id",
        "video_token_id",
    ] {
        if let Some(v) = tiny_cfg.get(key) {
            published[key] = v.clone();
        }
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_vec_pretty(&published)?,
    )?;
    std::fs::write(
        out.join("preprocessor_config.json"),
        serde_json::to_vec_pretty(&json!({
            "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "max_pixels": 12845056, "min_pixels": 3136, "merge_size": 2, "patch_size": 14,
            "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2
        }))?,
    )?;

    // Shards of about equal bytes, tensors in manifest order.
    let total: usize = manifest
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>())
        .sum();
    let per_shard = total.div_ceil(SHARDS);
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut filled = 0;
    for (key, shape) in manifest {
        let bytes = 2 * shape.iter().product::<usize>();
        if filled + bytes > per_shard && !shards.last().unwrap().is_empty() && shards.len() < SHARDS
        {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += bytes;
        shards.last_mut().unwrap().push((key, shape));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for (i, tensors) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_shard(&out.join(&name), tensors, &mut rng)?;
        for (key, _) in tensors {
            weight_map.insert(key.clone(), name.clone());
        }
        eprintln!("wrote {name}");
    }
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        }))?,
    )?;
    println!(
        "{} tensors, {:.2} GB in {n} shards: {}",
        weight_map.len(),
        total as f64 / 1e9,
        out.display()
    );
    Ok(())
}

/// One safetensors file, streamed: the header, then each tensor's bf16 values.
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)], rng: &mut u64) -> anyhow::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (key, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            key.clone(),
            json!({ "dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut f = BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
    f.write_all(&(head.len() as u64).to_le_bytes())?;
    f.write_all(&head)?;
    let mut buf = Vec::with_capacity(1 << 22);
    for (key, shape) in tensors {
        let numel: usize = shape.iter().product();
        let norm = ["norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight"];
        let constant = if key.ends_with(".bias") {
            Some(0.0)
        } else if norm.iter().any(|n| key.ends_with(n)) {
            Some(1.0f32)
        } else {
            None
        };
        let mut left = numel;
        while left > 0 {
            let chunk = left.min(1 << 20);
            buf.clear();
            for _ in 0..chunk {
                let x = match constant {
                    Some(c) => c,
                    None => {
                        // xorshift64*: uniform in [-√3·0.02, √3·0.02] has std 0.02.
                        *rng ^= *rng >> 12;
                        *rng ^= *rng << 25;
                        *rng ^= *rng >> 27;
                        let u = (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32
                            / (1u64 << 24) as f32;
                        (u * 2.0 - 1.0) * 0.034_641
                    }
                };
                buf.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
            }
            f.write_all(&buf)?;
            left -= chunk;
        }
    }
    f.flush()?;
    Ok(())
}

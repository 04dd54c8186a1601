//! Streaming NF4 quantization of a whole checkpoint directory, producing what
//! transformers' `save_pretrained` writes for a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=True)` (transformers `quantizers/quantizer_bnb_4bit.py`,
//! `modeling_utils.py` sharding and `model.safetensors.index.json`).
//!
//! Shards are memory-mapped and read tensor by tensor; each Linear weight of the language
//! model and the vision tower (decided by its Qwen2.5-VL module name, see
//! [`is_linear_weight`]) is quantized unless a skip entry matches it; every other tensor is
//! copied unchanged. Output goes to `<out>.partial/` and is renamed to `<out>` at the end.

use std::fs::{self, File};
use std::path::Path;
use std::time::Instant;

use safetensors::SafeTensors;
use serde::Serialize;
use serde_json::Value;

use super::checks::{check_skip_entries, refuse_overlap};
use super::format::{quantization_config, Nf4Tensor, RawTensor};
use super::nf4::NF4_BLOCKSIZE;
use super::select::{is_linear_weight, is_skipped, linear_modules};
use super::shards::{input_shards, io, read_json, to_f32, ShardWriter};
use super::QuantError;
use crate::fs::{commit_dir, write_atomic};

/// Files besides weights and config.json that a checkpoint needs (tokenizer, processor,
/// generation config, chat template) and that are copied unchanged.
const COPIED_EXTENSIONS: [&str; 5] = [".json", ".txt", ".jinja", ".model", ".tiktoken"];

/// How to quantize a checkpoint.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// Module names (dotted, matched as whole components, e.g. `lm_head` or `visual`) whose
    /// Linears stay unquantized; written as `llm_int8_skip_modules`.
    pub skip: Vec<String>,
    /// `bnb_4bit_compute_dtype`; `None` takes config.json's `torch_dtype` (or `dtype`), else
    /// `float32`.
    pub compute_dtype: Option<String>,
    /// Largest output shard, in bytes; a checkpoint that fits is written as one
    /// `model.safetensors`. Shards are assembled in memory, so this also bounds memory.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            skip: vec!["lm_head".into()],
            compute_dtype: None,
            // 512 MB: the shard being assembled is most of the quantizer's memory, beside a
            // Linear's f32 values and their dequantized copy (2 × 272 MB for a 7B's MLP);
            // with 1 GB shards the 7B shape peaked at 2.01 GB. A larger tensor (a 7B's
            // 1.09 GB embedding) still makes one shard of its own.
            max_shard_bytes: 512_000_000,
        }
    }
}

/// Figures for one quantized weight.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Checkpoint key of the weight.
    pub key: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Bytes of the original tensor.
    pub bytes_before: u64,
    /// Bytes of all tensors that replace it (codes, absmax, maps, blob).
    pub bytes_after: u64,
    /// Root-mean-square of `dequant(W) - W`.
    pub rmse: f64,
    /// Largest `|dequant(W) - W|`.
    pub max_abs_err: f64,
    /// Mean of `|dequant(W) - W|`.
    pub mean_abs_err: f64,
    /// Root-mean-square of `W` itself (for relative errors).
    pub weight_rms: f64,
}

/// What [`quantize_checkpoint`] did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// Linear weights quantized to NF4.
    pub tensors_quantized: usize,
    /// Linear weights left unquantized because a skip entry matched.
    pub tensors_skipped: usize,
    /// Other tensors (embeddings, norms, biases, conv) copied unchanged, skipped Linears included.
    pub tensors_copied: usize,
    /// Total tensor bytes read.
    pub bytes_before: u64,
    /// Total tensor bytes written.
    pub bytes_after: u64,
    /// Bytes of the weights that were quantized (their original size).
    pub quantized_input_bytes: u64,
    /// Seconds spent converting and quantizing those weights (not I/O).
    pub quantize_s: f64,
    /// Whole run, seconds.
    pub elapsed_s: f64,
    /// Output safetensors files.
    pub shards: usize,
    /// Non-weight files copied (tokenizer, processor configs).
    pub files_copied: Vec<String>,
    /// Per quantized weight.
    pub per_tensor: Vec<TensorReport>,
}

impl QuantizeReport {
    /// Quantization throughput over the original weight bytes, MB/s (10^6 bytes).
    pub fn throughput_mb_per_s(&self) -> f64 {
        if self.quantize_s > 0.0 {
            self.quantized_input_bytes as f64 / 1e6 / self.quantize_s
        } else {
            0.0
        }
    }

    /// The largest per-tensor RMSE and max abs error.
    pub fn worst_errors(&self) -> (f64, f64) {
        self.per_tensor.iter().fold((0.0, 0.0), |(r, m), t| {
            (r.max(t.rmse), m.max(t.max_abs_err))
        })
    }
}

/// Quantizes the checkpoint in `model_dir` into `out_dir` (replaced when it exists).
///
/// # Errors
/// Unreadable or malformed input (naming the file or tensor), a Linear weight that is not a
/// float tensor, or an I/O failure writing the output; `out_dir` is then left untouched.
pub fn quantize_checkpoint(
    model_dir: &Path,
    out_dir: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport, QuantError> {
    let started = Instant::now();
    let _span = tracing::info_span!("quantize_checkpoint", model = %model_dir.display()).entered();
    refuse_overlap(model_dir, out_dir)?;
    let config_path = model_dir.join("config.json");
    let mut config = read_json(&config_path)?;
    if let Some(q) = config.get("quantization_config") {
        return Err(QuantError::AlreadyQuantized {
            path: model_dir.to_path_buf(),
            method: q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        });
    }
    let compute_dtype = opts.compute_dtype.clone().unwrap_or_else(|| {
        ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| config.get(*k).and_then(Value::as_str))
            .unwrap_or("float32")
            .to_string()
    });
    let shards = input_shards(model_dir)?;
    check_skip_entries(&opts.skip, &linear_modules(&shards)?, model_dir)?;

    let partial = crate::fs::fresh_partial(out_dir)?;
    fs::create_dir_all(&partial).map_err(io("creating", &partial))?;
    // Whatever fails below, the half-written `.partial` directory is removed.
    let result = (|| -> Result<QuantizeReport, QuantError> {
        let mut writer = ShardWriter::new(partial.clone(), opts.max_shard_bytes);
        let mut report = QuantizeReport {
            tensors_quantized: 0,
            tensors_skipped: 0,
            tensors_copied: 0,
            bytes_before: 0,
            bytes_after: 0,
            quantized_input_bytes: 0,
            quantize_s: 0.0,
            elapsed_s: 0.0,
            shards: 0,
            files_copied: Vec::new(),
            per_tensor: Vec::new(),
        };
        for shard in &shards {
            let file = File::open(shard).map_err(io("opening", shard))?;
            // SAFETY: the file is opened read-only and the map lives only within this loop; a
            // concurrent writer truncating it is outside what medpipe supports.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io("memory-mapping", shard))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|source| QuantError::Safetensors {
                path: shard.clone(),
                source,
            })?;
            let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
            names.sort();
            for key in names {
                let view = st.tensor(&key).map_err(|source| QuantError::Safetensors {
                    path: shard.clone(),
                    source,
                })?;

                let bytes_before = view.data().len() as u64;
                report.bytes_before += bytes_before;
                let module = key.strip_suffix(".weight").unwrap_or(&key);
                let linear = is_linear_weight(&key, view.shape());
                if linear && !is_skipped(module, &opts.skip) {
                    let t0 = Instant::now();
                    let (values, dtype) = to_f32(&key, view.dtype(), view.data())?;
                    let q = Nf4Tensor::quantize(
                        &key,
                        &values,
                        view.shape(),
                        dtype,
                        NF4_BLOCKSIZE,
                        true,
                    )?;
                    let deq = q.dequantize();
                    let (mut sq, mut max, mut abs, mut wsq) = (0f64, 0f64, 0f64, 0f64);
                    for (a, b) in values.iter().zip(&deq) {
                        let d = (*a as f64 - *b as f64).abs();
                        sq += d * d;
                        abs += d;
                        max = max.max(d);
                        wsq += *a as f64 * *a as f64;
                    }
                    report.quantize_s += t0.elapsed().as_secs_f64();
                    let group = q.to_tensors(&key);
                    let bytes_after: u64 = group.iter().map(|t| t.data.len() as u64).sum();
                    report.quantized_input_bytes += bytes_before;
                    report.tensors_quantized += 1;
                    report.per_tensor.push(TensorReport {
                        key: key.clone(),
                        shape: view.shape().to_vec(),
                        bytes_before,
                        bytes_after,
                        rmse: (sq / values.len() as f64).sqrt(),
                        max_abs_err: max,
                        mean_abs_err: abs / values.len() as f64,
                        weight_rms: (wsq / values.len() as f64).sqrt(),
                    });
                    tracing::debug!(%key, "quantized");
                    writer.push_group(group)?;
                } else {
                    if linear {
                        report.tensors_skipped += 1;
                    }
                    report.tensors_copied += 1;
                    // The shard being assembled goes to disk first if this tensor would not
                    // fit in it, so the copy never meets a full shard.
                    writer.make_room(bytes_before)?;
                    let data = copy_releasing(&mmap, view.data());
                    writer.push_group(vec![RawTensor {
                        key: key.clone(),
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        data,
                    }])?;
                }
                // Converted and copied out: the tensor's pages need not stay resident, so the
                // quantizer holds one output shard rather than a whole input shard.
                release(&mmap, view.data());
            }
        }
        report.bytes_after = writer.total_bytes;
        report.shards = writer.finish()?;

        // Tokenizer, processor and generation configs travel along unchanged.
        let mut entries: Vec<_> = fs::read_dir(model_dir)
            .map_err(io("listing", model_dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let wanted = COPIED_EXTENSIONS.iter().any(|e| name.ends_with(e));
            if !wanted || name == "model.safetensors.index.json" || name == "config.json" {
                continue;
            }
            let dst = partial.join(&name);
            fs::copy(&p, &dst).map_err(io("copying", &p))?;
            report.files_copied.push(name);
        }

        // A checkpoint in which every Linear was skipped holds no NF4 weight: not labelled.
        if let Some(obj) = config
            .as_object_mut()
            .filter(|_| report.tensors_quantized > 0)
        {
            obj.insert(
                "quantization_config".into(),
                quantization_config(&compute_dtype, &opts.skip),
            );
        }
        let mut text = serde_json::to_vec_pretty(&config).map_err(|source| QuantError::Json {
            path: config_path.clone(),
            source,
        })?;
        text.push(b'\n');
        write_atomic(&partial.join("config.json"), &text)?;
        Ok(report)
    })();
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    commit_dir(&partial, out_dir)?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Drops `data`'s pages (a slice of `mmap`) from this process's resident memory.
fn release(mmap: &memmap2::Mmap, data: &[u8]) {
    let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
    // SAFETY: a read-only file mapping: a page touched again is read back from the file
    // (the pages at a tensor's edges may be shared with its neighbours).
    let _ = unsafe {
        mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, data.len())
    };
}

/// `data` (a slice of `mmap`) copied out, its pages released 64 MiB at a time as they are
/// copied: a 1 GB embedding costs its copy, not its copy and its pages.
fn copy_releasing(mmap: &memmap2::Mmap, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(64 << 20) {
        out.extend_from_slice(chunk);
        release(mmap, chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::*;
    use crate::test_util::fixture;

    #[test]
    fn quantizing_the_fixture_model_reproduces_the_bitsandbytes_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        let dst = out.path().join("nf4");
        let report = quantize_checkpoint(
            &fixture("qwen2_5_vl_tiny"),
            &dst,
            &QuantizeOptions::default(),
        )
        .unwrap();
        assert_eq!(
            report.tensors_quantized, 36,
            "14 language + 20 vision block + 2 merger Linears"
        );
        assert_eq!(report.tensors_skipped, 1, "lm_head");
        assert_eq!(report.shards, 1);
        assert!(!out.path().join("nf4.partial").exists());

        let ours = fs::read(dst.join("model.safetensors")).unwrap();
        let want = fs::read(fixture("qwen2_5_vl_tiny/nf4/model.safetensors")).unwrap();
        let ours = SafeTensors::deserialize(&ours).unwrap();
        let want = SafeTensors::deserialize(&want).unwrap();
        let mut a: Vec<_> = ours.names().into_iter().map(str::to_string).collect();
        let mut b: Vec<_> = want.names().into_iter().map(str::to_string).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "key sets");
        for k in &b {
            let (x, y) = (ours.tensor(k).unwrap(), want.tensor(k).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{k}: dtype");
            assert_eq!(x.shape(), y.shape(), "{k}: shape");
            assert!(x.data() == y.data(), "{k}: bytes differ");
        }

        let cfg = read_json(&dst.join("config.json")).unwrap();
        let want_cfg = read_json(&fixture("qwen2_5_vl_tiny/nf4/config.json")).unwrap();
        for (k, v) in want_cfg.as_object().unwrap() {
            if k == "quantization_config" {
                for (qk, qv) in v.as_object().unwrap() {
                    assert_eq!(&cfg[k][qk], qv, "quantization_config.{qk}");
                }
            } else {
                assert_eq!(&cfg[k], v, "config.{k}");
            }
        }
        assert!(report
            .files_copied
            .contains(&"preprocessor_config.json".to_string()));
        assert!(
            !dst.join("image0.png").exists(),
            "only json/tokenizer files are copied"
        );
        assert!(!dst.join("reference.safetensors").exists());
        let (rmse, max) = report.worst_errors();
        assert!(
            rmse > 0.0 && max >= rmse,
            "errors are measured: {rmse} {max}"
        );
    }

    #[test]
    fn a_sharded_input_checkpoint_quantizes_to_the_same_tensors_as_a_single_file() {
        let tmp = tempfile::tempdir().unwrap();
        // Skipping every module turns the quantizer into a sharding copier of the f32 model.
        let copy_opts = QuantizeOptions {
            skip: vec!["model".into(), "visual".into(), "lm_head".into()],
            max_shard_bytes: 300_000,
            ..QuantizeOptions::default()
        };
        let sharded = tmp.path().join("sharded");
        let r = quantize_checkpoint(&fixture("qwen2_5_vl_tiny"), &sharded, &copy_opts).unwrap();
        assert_eq!((r.tensors_quantized, r.tensors_skipped), (0, 37));
        assert!(r.shards > 2);
        assert!(!sharded.join("model.safetensors").exists());

        let out = tmp.path().join("nf4");
        let r = quantize_checkpoint(&sharded, &out, &QuantizeOptions::default()).unwrap();
        assert_eq!(r.tensors_quantized, 36);
        let ours = fs::read(out.join("model.safetensors")).unwrap();
        let want = fs::read(fixture("qwen2_5_vl_tiny/nf4/model.safetensors")).unwrap();
        let (ours, want) = (
            SafeTensors::deserialize(&ours).unwrap(),
            SafeTensors::deserialize(&want).unwrap(),
        );
        assert_eq!(ours.names().len(), want.names().len());
        for k in want.names() {
            assert!(
                ours.tensor(k).unwrap().data() == want.tensor(k).unwrap().data(),
                "{k}"
            );
        }
    }

    #[test]
    fn small_shard_limit_splits_output_and_writes_an_index() {
        let out = tempfile::tempdir().unwrap();
        let dst = out.path().join("nf4");
        let opts = QuantizeOptions {
            max_shard_bytes: 400_000,
            ..QuantizeOptions::default()
        };
        let report = quantize_checkpoint(&fixture("qwen2_5_vl_tiny"), &dst, &opts).unwrap();
        assert!(report.shards > 1);
        let index = read_json(&dst.join("model.safetensors.index.json")).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let single = fs::read(fixture("qwen2_5_vl_tiny/nf4/model.safetensors")).unwrap();
        let single = SafeTensors::deserialize(&single).unwrap();
        assert_eq!(map.len(), single.names().len());
        let last = format!(
            "model-{:05}-of-{:05}.safetensors",
            report.shards, report.shards
        );
        assert!(dst.join(&last).exists(), "{last}");
        assert_eq!(
            index["metadata"]["total_size"].as_u64().unwrap(),
            report.bytes_after
        );
    }
    /// Writes a one-file checkpoint with the given tensors and a config.json.
    fn fake_checkpoint(dir: &Path, tensors: Vec<RawTensor>) {
        fs::create_dir_all(dir).unwrap();
        safetensors::serialize_to_file(
            tensors.iter().map(|t| (t.key.clone(), t)),
            None,
            &dir.join("model.safetensors"),
        )
        .unwrap();
        fs::write(dir.join("config.json"), br#"{"torch_dtype": "bfloat16"}"#).unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    }

    #[test]
    fn bf16_weights_are_quantized_with_their_dtype_recorded_and_other_tensors_kept_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..128 * 64)
            .map(|i| ((i % 97) as f32 - 48.0) / 500.0)
            .collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let norm: Vec<u8> = [1.0f32; 64]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        fake_checkpoint(
            &tmp.path().join("m"),
            vec![
                RawTensor {
                    key: "model.layers.0.mlp.up_proj.weight".into(),
                    dtype: Dtype::BF16,
                    shape: vec![128, 64],
                    data: bf16.clone(),
                },
                RawTensor {
                    key: "model.norm.weight".into(),
                    dtype: Dtype::BF16,
                    shape: vec![64],
                    data: norm.clone(),
                },
            ],
        );
        let out = tmp.path().join("o");
        let r =
            quantize_checkpoint(&tmp.path().join("m"), &out, &QuantizeOptions::default()).unwrap();
        assert_eq!((r.tensors_quantized, r.tensors_copied), (1, 1));
        assert_eq!(r.files_copied, vec!["tokenizer.json".to_string()]);
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = Nf4Tensor::from_tensors("model.layers.0.mlp.up_proj.weight", |k| st.tensor(k).ok())
            .unwrap();
        assert_eq!(q.dtype, "bfloat16");
        let exact: Vec<f32> = bf16
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let direct = Nf4Tensor::quantize("w", &exact, &[128, 64], "bfloat16", 64, true).unwrap();
        assert_eq!(q, direct, "bf16 is widened exactly before quantizing");
        let n = st.tensor("model.norm.weight").unwrap();
        assert_eq!((n.dtype(), n.data()), (Dtype::BF16, &norm[..]));
        let cfg = read_json(&out.join("config.json")).unwrap();
        assert_eq!(
            cfg["quantization_config"]["bnb_4bit_compute_dtype"],
            "bfloat16"
        );
    }

    #[test]
    fn an_integer_linear_weight_fails_naming_the_tensor_and_leaves_no_output() {
        let tmp = tempfile::tempdir().unwrap();
        fake_checkpoint(
            &tmp.path().join("m"),
            vec![RawTensor {
                key: "model.layers.0.self_attn.q_proj.weight".into(),
                dtype: Dtype::I32,
                shape: vec![4, 4],
                data: vec![0; 64],
            }],
        );
        let out = tmp.path().join("o");
        let err = quantize_checkpoint(&tmp.path().join("m"), &out, &QuantizeOptions::default())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QuantError::Dtype { .. }), "{msg}");
        assert!(
            msg.contains("model.layers.0.self_attn.q_proj.weight") && msg.contains("I32"),
            "{msg}"
        );
        assert!(
            !out.exists(),
            "the output directory only appears on success"
        );
    }

    /// A copy of the tiny fixture checkpoint (config, weights, processor) in `dir`.
    fn tiny_copy(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            fs::copy(fixture(&format!("qwen2_5_vl_tiny/{f}")), dir.join(f)).unwrap();
        }
    }

    #[test]
    fn issue_15_an_output_equal_to_inside_or_around_the_checkpoint_is_refused_and_the_checkpoint_survives(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        tiny_copy(&model);
        let before = fs::read(model.join("model.safetensors")).unwrap();
        for out in [
            model.clone(),
            model.join("."),
            tmp.path().join("x/../m"),
            model.join("nf4"),
            model.join("deeper/nf4"),
            tmp.path().to_path_buf(),
        ] {
            let err = quantize_checkpoint(&model, &out, &QuantizeOptions::default()).unwrap_err();
            assert!(
                matches!(err, QuantError::OutputOverlapsInput { .. }),
                "{}: {err}",
                out.display()
            );
            assert!(err
                .to_string()
                .contains("would overwrite the input checkpoint"));
        }
        assert_eq!(fs::read(model.join("model.safetensors")).unwrap(), before);
        assert!(!model.join("nf4").exists() && !model.join("deeper").exists());
        // a sibling whose name merely starts with the model's is fine
        quantize_checkpoint(&model, &tmp.path().join("m2"), &QuantizeOptions::default()).unwrap();
    }

    #[test]
    fn issue_15_a_skip_entry_that_matches_no_linear_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = QuantizeOptions {
            skip: vec!["lm_head".into(), "visual.mergr".into()],
            ..QuantizeOptions::default()
        };
        let out = tmp.path().join("o");
        let err = quantize_checkpoint(&fixture("qwen2_5_vl_tiny"), &out, &opts).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, QuantError::SkipMatchesNothing { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("`visual.mergr`") && msg.contains("`visual.blocks.0.attn.proj`"),
            "names the entry and real Linear modules: {msg}"
        );
        assert!(!out.exists());
        // the default `lm_head` may match nothing (tied embeddings have no lm_head.weight)
        let tied = tmp.path().join("tied");
        fake_checkpoint(
            &tied,
            vec![RawTensor {
                key: "model.layers.0.mlp.up_proj.weight".into(),
                dtype: Dtype::F32,
                shape: vec![64, 64],
                data: vec![0; 64 * 64 * 4],
            }],
        );
        let r =
            quantize_checkpoint(&tied, &tmp.path().join("t"), &QuantizeOptions::default()).unwrap();
        assert_eq!((r.tensors_quantized, r.tensors_skipped), (1, 0));
    }

    #[test]
    fn issue_15_requantizing_an_nf4_checkpoint_says_already_quantized() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("again");
        let err = quantize_checkpoint(
            &fixture("qwen2_5_vl_tiny/nf4"),
            &out,
            &QuantizeOptions::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QuantError::AlreadyQuantized { .. }), "{msg}");
        assert!(
            msg.contains("already quantized") && msg.contains("bitsandbytes"),
            "{msg}"
        );
        assert!(!out.exists());
    }
}

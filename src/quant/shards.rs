//! Safetensors shards: finding the input shards, reading tensors as f32, and writing the
//! output in shards of bounded size with `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde_json::Value;

use super::format::RawTensor;
use super::QuantError;
use crate::fs::write_atomic;

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(super) fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> QuantError + 'a {
    move |source| QuantError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn read_json(path: &Path) -> Result<Value, QuantError> {
    let bytes = fs::read(path).map_err(io("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|source| QuantError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The safetensors files of a checkpoint: from the index when there is one.
pub(super) fn input_shards(dir: &Path) -> Result<Vec<PathBuf>, QuantError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| QuantError::Invalid {
                key: index.display().to_string(),
                reason: "no `weight_map` object".into(),
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(QuantError::Io {
            action: "finding model.safetensors or its index in",
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}

/// Float tensor bytes as f32, with the torch dtype name.
pub(super) fn to_f32(
    key: &str,
    dtype: Dtype,
    data: &[u8],
) -> Result<(Vec<f32>, &'static str), QuantError> {
    Ok(match dtype {
        Dtype::F32 => (
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "float32",
        ),
        Dtype::BF16 => (
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "bfloat16",
        ),
        Dtype::F16 => (
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "float16",
        ),
        other => {
            return Err(QuantError::Dtype {
                key: key.to_string(),
                found: format!("{other:?}"),
                expected: "F32, BF16 or F16 (a Linear weight to quantize)",
            })
        }
    })
}

/// Collects output tensors and writes them in shards of at most `max_bytes`.
pub(super) struct ShardWriter {
    dir: PathBuf,
    max_bytes: u64,
    pending: Vec<RawTensor>,
    pending_bytes: u64,
    written: Vec<(PathBuf, Vec<String>)>,
    /// Bytes of tensor data written so far.
    pub(super) total_bytes: u64,
}

impl ShardWriter {
    /// An empty writer into `dir`, starting a new shard past `max_bytes`.
    pub(super) fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            total_bytes: 0,
        }
    }

    /// Writes out the shard being assembled if `bytes` more would not fit in it (before the
    /// caller makes a large copy, so the two are never in memory together).
    pub(super) fn make_room(&mut self, bytes: u64) -> Result<(), QuantError> {
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.max_bytes {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds the tensors of one source tensor; they always land in the same shard.
    pub(super) fn push_group(&mut self, group: Vec<RawTensor>) -> Result<(), QuantError> {
        let bytes: u64 = group.iter().map(|t| t.data.len() as u64).sum();
        self.make_room(bytes)?;
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.extend(group);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), QuantError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("shard-{}.tmp", self.written.len()));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let tensors = std::mem::take(&mut self.pending);
        safetensors::serialize_to_file(
            tensors.iter().map(|t| (t.key.clone(), t)),
            Some(meta),
            &path,
        )
        .map_err(|source| QuantError::Safetensors {
            path: path.clone(),
            source,
        })?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &path))?;
        self.written
            .push((path, tensors.into_iter().map(|t| t.key).collect()));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Names the shards as transformers does and writes the index when there are several.
    pub(super) fn finish(mut self) -> Result<usize, QuantError> {
        self.flush()?;
        let m = self.written.len();
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, keys)) in self.written.iter().enumerate() {
            let name = if m == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, m)
            };
            let dst = self.dir.join(&name);
            fs::rename(tmp, &dst).map_err(io("renaming shard to", &dst))?;
            for k in keys {
                weight_map.insert(k.clone(), name.clone());
            }
        }
        if m > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_bytes },
                "weight_map": weight_map,
            });
            let path = self.dir.join("model.safetensors.index.json");
            let mut text =
                serde_json::to_vec_pretty(&index).map_err(|source| QuantError::Json {
                    path: path.clone(),
                    source,
                })?;
            text.push(b'\n');
            write_atomic(&path, &text)?;
        }
        Ok(m)
    }
}

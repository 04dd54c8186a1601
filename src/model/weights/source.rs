//! [`WeightSource`]: the tensors of a checkpoint directory, memory-mapped and addressed by
//! canonical key (see [`super`] for the layouts), checked against the config's manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{AllocationProperty, Bytes, DType, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::kernels::Kernels;
use crate::model::config::Qwen25VlConfig;
use crate::model::error::ModelError;
use crate::model::weights::manifest::expected_tensors;
use crate::quant::{Nf4Tensor, QuantStateBlob, BLOB_SUFFIX};
/// Suffixes (after `{module}.weight`) of the tensors of an NF4 weight besides the blob.
const NF4_PARTS: [&str; 5] = [
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// Key-prefix rewrites from the transformers-5 layout to the canonical (published) one.
const REMAP: &[(&str, &str)] = &[
    // transformers 5 nests the decoder under `model.language_model`
    ("model.language_model.", "model."),
    // ... and the vision tower under `model.visual`
    ("model.visual.", "visual."),
];

/// Keys a checkpoint may carry that the model does not need: rotary frequency buffers
/// some older exports saved (recomputed from the config here).
const ALLOWED_UNUSED_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

fn canonical(key: &str) -> String {
    for (from, to) in REMAP {
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    key.to_string()
}

struct Entry {
    file: usize,
    stored_key: String,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint directory, memory-mapped, addressed by canonical key.
pub(crate) struct WeightSource {
    dir: PathBuf,
    /// Each shard's path and its memory map (shared, so tensors can borrow from it).
    files: Vec<(PathBuf, bytes::Bytes)>,
    index: HashMap<String, Entry>,
    taken: HashSet<String>,
}

impl WeightSource {
    /// Maps `dir/model.safetensors`, or every shard named by
    /// `dir/model.safetensors.index.json`.
    ///
    /// # Errors
    /// [`ModelError::NoWeights`], [`ModelError::Io`], [`ModelError::ShardIndex`],
    /// [`ModelError::Safetensors`] (truncated/corrupt, naming the file),
    /// [`ModelError::DuplicateTensor`].
    pub(crate) fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index =
                serde_json::from_str(&text).map_err(|source| ModelError::ShardIndex {
                    path: index_path.clone(),
                    source,
                })?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut src = WeightSource {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            index: HashMap::new(),
            taken: HashSet::new(),
        };
        for path in files {
            src.add_file(path)?;
        }
        Ok(src)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), ModelError> {
        let file = File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the checkpoint is opened read-only and treated as immutable for the
        // lifetime of the map; medpipe never writes model files in place (atomic renames).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let (header, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|source| ModelError::Safetensors {
                path: path.clone(),
                source,
            })?;
        let base = 8 + header;
        let fi = self.files.len();
        for (key, info) in meta.tensors() {
            let canon = canonical(&key);
            if let Some(prev) = self.index.get(&canon) {
                return Err(ModelError::DuplicateTensor {
                    key: canon,
                    first: self.files[prev.file].0.clone(),
                    second: path.clone(),
                });
            }
            self.index.insert(
                canon,
                Entry {
                    file: fi,
                    stored_key: key,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                },
            );
        }
        self.files.push((path, bytes::Bytes::from_owner(mmap)));
        Ok(())
    }

    /// The checkpoint directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn file_name(&self, e: &Entry) -> String {
        self.files[e.file]
            .0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Compares the checkpoint with the manifest of `cfg`, reporting every missing,
    /// unexpected or mis-shaped tensor in one error.
    ///
    /// # Errors
    /// [`ModelError::Checkpoint`] listing the problems with file names and shapes.
    pub(crate) fn check_against(&self, cfg: &Qwen25VlConfig) -> Result<(), ModelError> {
        let expected = expected_tensors(cfg);
        let mut problems = Vec::new();
        let mut wanted: HashSet<String> = HashSet::new();
        for (key, shape) in &expected {
            wanted.insert(key.clone());
            if shape.len() == 2 && self.is_nf4(key) {
                self.check_nf4(key, shape, &mut problems, &mut wanted);
                continue;
            }
            match self.index.get(key) {
                None => problems.push(format!("missing tensor `{key}` (expected shape {shape:?})")),
                Some(e) if &e.shape != shape => problems.push(format!(
                    "tensor `{}` in {} has shape {:?}, expected {shape:?}",
                    e.stored_key,
                    self.file_name(e),
                    e.shape
                )),
                Some(_) => {}
            }
        }
        let mut extra: Vec<(&String, &Entry)> = self
            .index
            .iter()
            .filter(|(k, _)| !wanted.contains(k.as_str()) && !self.allowed_unused(k, cfg))
            .collect();
        extra.sort_by(|a, b| a.0.cmp(b.0));
        for (_, e) in extra {
            problems.push(format!(
                "unexpected tensor `{}` in {} (shape {:?})",
                e.stored_key,
                self.file_name(e),
                e.shape
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Checkpoint {
                dir: self.dir.clone(),
                problems,
            })
        }
    }

    /// The tensor taking the most bytes on a device whose floats take `float_bytes` each
    /// (every float tensor is converted to the compute dtype on upload; codes keep their
    /// stored bytes), with those bytes.
    pub(crate) fn largest_on_device(&self, float_bytes: u64) -> Option<(String, u64)> {
        self.index
            .values()
            .map(|e| {
                let elements = e.shape.iter().product::<usize>() as u64;
                let bytes = match e.dtype {
                    StDtype::F64 | StDtype::F32 | StDtype::BF16 | StDtype::F16 => {
                        elements * float_bytes
                    }
                    _ => (e.end - e.start) as u64,
                };
                (e.stored_key.clone(), bytes)
            })
            .max_by_key(|(_, b)| *b)
    }

    /// Whether the Linear weight `weight_key` (canonical) is stored as bitsandbytes 4-bit.
    pub(crate) fn is_nf4(&self, weight_key: &str) -> bool {
        self.index
            .contains_key(&format!("{weight_key}{BLOB_SUFFIX}"))
    }

    /// Checks the parts of the NF4 weight `key` against the dense shape `shape` the config
    /// implies, adding every part it expects to `wanted`.
    fn check_nf4(
        &self,
        key: &str,
        shape: &[usize],
        problems: &mut Vec<String>,
        wanted: &mut HashSet<String>,
    ) {
        let blob_key = format!("{key}{BLOB_SUFFIX}");
        wanted.insert(blob_key.clone());
        let Some(e) = self.index.get(&blob_key) else {
            return; // `is_nf4` found it
        };
        if e.dtype != StDtype::U8 {
            problems.push(format!(
                "NF4 quant state `{}` in {} is {:?}, expected U8",
                e.stored_key,
                self.file_name(e),
                e.dtype
            ));
            return;
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let blob = match QuantStateBlob::parse(&blob_key, bytes) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e.to_string());
                return;
            }
        };
        if blob.shape != shape {
            problems.push(format!(
                "NF4 weight `{key}` has shape {:?} in its quant state, expected {shape:?}",
                blob.shape
            ));
            return;
        }
        let numel: usize = shape.iter().product();
        let n_blocks = numel.div_ceil(blob.blocksize);
        let mut parts = vec![
            ("", numel.div_ceil(2), "packed 4-bit codes"),
            (".absmax", n_blocks, "block scales"),
            (".quant_map", 16, "NF4 code book"),
        ];
        if let Some(n) = &blob.nested {
            parts.push((
                ".nested_absmax",
                n_blocks.div_ceil(n.blocksize.max(1)),
                "double-quant scales",
            ));
            parts.push((".nested_quant_map", 256, "double-quant code book"));
        }
        for (suffix, len, what) in parts {
            let k = format!("{key}{suffix}");
            match self.index.get(&k) {
                None => problems.push(format!(
                    "missing tensor `{k}` ({what} of an NF4 weight, {len} elements)"
                )),
                Some(e) if e.shape.iter().product::<usize>() != len => problems.push(format!(
                    "tensor `{}` in {} has shape {:?}, expected {len} elements ({what})",
                    e.stored_key,
                    self.file_name(e),
                    e.shape
                )),
                Some(_) => {}
            }
            wanted.insert(k);
        }
    }

    /// The raw bytes of `key` (canonical) as a safetensors view into the mapped file.
    pub(crate) fn view(&self, key: &str) -> Option<TensorView<'_>> {
        let e = self.index.get(key)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        TensorView::new(e.dtype, e.shape.clone(), bytes).ok()
    }

    /// The NF4 weight `weight_key` (canonical), validated, whose dense shape must be `shape`.
    ///
    /// # Errors
    /// [`ModelError::Quant`] for a missing or malformed part, [`ModelError::Checkpoint`] when
    /// the quant state's shape differs from `shape`.
    pub(crate) fn nf4(
        &mut self,
        weight_key: &str,
        shape: &[usize],
    ) -> Result<Nf4Tensor, ModelError> {
        let t = Nf4Tensor::from_tensors(weight_key, |k| self.view(k)).map_err(|source| {
            ModelError::Quant {
                dir: self.dir.clone(),
                source,
            }
        })?;
        if t.shape != shape {
            return Err(ModelError::Checkpoint {
                dir: self.dir.clone(),
                problems: vec![format!(
                    "NF4 weight `{weight_key}` has shape {:?} in its quant state, expected {shape:?}",
                    t.shape
                )],
            });
        }
        for suffix in NF4_PARTS.iter().chain([&BLOB_SUFFIX]) {
            let k = format!("{weight_key}{suffix}");
            if self.index.contains_key(&k) {
                self.taken.insert(k);
            }
        }
        Ok(t)
    }

    fn allowed_unused(&self, key: &str, cfg: &Qwen25VlConfig) -> bool {
        // A tied checkpoint may still carry a copy of the shared matrix.
        (cfg.text.tie_word_embeddings && key == "lm_head.weight")
            || ALLOWED_UNUSED_SUFFIXES.iter().any(|s| key.ends_with(s))
    }

    /// The tensor `key` (canonical) as f32 data of `shape`, converted from its file dtype.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], [`ModelError::Checkpoint`] on a shape mismatch,
    /// [`ModelError::UnsupportedDtype`].
    pub(crate) fn data(&mut self, key: &str, shape: &[usize]) -> Result<TensorData, ModelError> {
        self.data_as(key, shape, false)
    }

    /// [`Self::data`], but an f32 tensor borrows its bytes from the memory map instead of
    /// copying them: the CPU backend then reads it in place, so a weight costs no load time
    /// and no memory beyond the page cache. Only for tensors that are read, never changed
    /// in place (dense projection weights): any NdArray op that takes the tensor by value
    /// copies a borrowed one first.
    pub(crate) fn data_in_place(
        &mut self,
        key: &str,
        shape: &[usize],
    ) -> Result<TensorData, ModelError> {
        self.data_as(key, shape, true)
    }

    /// Whether the checkpoint stores `key` in bf16.
    pub(crate) fn is_bf16(&self, key: &str) -> bool {
        self.index
            .get(key)
            .is_some_and(|e| e.dtype == StDtype::BF16)
    }

    /// A bf16 tensor's bit patterns as a `U16` tensor, borrowed from the memory map (see
    /// [`Self::data_in_place`]); the caller checked [`Self::is_bf16`].
    pub(crate) fn bf16_bits_in_place(
        &mut self,
        key: &str,
        shape: &[usize],
    ) -> Result<TensorData, ModelError> {
        let e = self.entry(key, shape)?;
        debug_assert_eq!(e.dtype, StDtype::BF16);
        let (start, end, file, shape) = (e.start, e.end, e.file, e.shape.clone());
        let bytes = Bytes::from_shared(
            self.files[file].1.slice(start..end),
            AllocationProperty::File,
        );
        self.taken.insert(key.to_string());
        Ok(TensorData::from_bytes(bytes, shape, DType::U16))
    }

    /// The packed codes of the NF4 weight `weight_key` (stored under that key as `U8`) as a
    /// 1-D tensor borrowed from the memory map; `None` when stored otherwise.
    pub(crate) fn nf4_codes_in_place(&self, weight_key: &str) -> Option<TensorData> {
        let e = self.index.get(weight_key)?;
        if e.dtype != StDtype::U8 {
            return None;
        }
        let bytes = Bytes::from_shared(
            self.files[e.file].1.slice(e.start..e.end),
            AllocationProperty::File,
        );
        Some(TensorData::from_bytes(bytes, [e.end - e.start], DType::U8))
    }

    /// The index entry of `key`, checked against `shape`.
    fn entry(&self, key: &str, shape: &[usize]) -> Result<&Entry, ModelError> {
        let e = self
            .index
            .get(key)
            .ok_or_else(|| ModelError::MissingTensor {
                key: key.to_string(),
                expected: shape.to_vec(),
            })?;
        if e.shape != shape {
            return Err(ModelError::Checkpoint {
                dir: self.dir.clone(),
                problems: vec![format!(
                    "tensor `{}` in {} has shape {:?}, expected {shape:?}",
                    e.stored_key,
                    self.file_name(e),
                    e.shape
                )],
            });
        }
        Ok(e)
    }

    fn data_as(
        &mut self,
        key: &str,
        shape: &[usize],
        in_place: bool,
    ) -> Result<TensorData, ModelError> {
        let e = self.entry(key, shape)?;
        let (path, map) = &self.files[e.file];
        if in_place && e.dtype == StDtype::F32 {
            let bytes = Bytes::from_shared(map.slice(e.start..e.end), AllocationProperty::File);
            let data = TensorData::from_bytes(bytes, e.shape.clone(), DType::F32);
            self.taken.insert(key.to_string());
            return Ok(data);
        }
        let bytes = map[e.start..e.end].to_vec();
        let dtype = match e.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F64 => DType::F64,
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    key: e.stored_key.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let data = TensorData::from_bytes_vec(bytes, e.shape.clone(), dtype);
        let data = if dtype == DType::F32 {
            data
        } else {
            data.convert_dtype(DType::F32)
        };
        self.taken.insert(key.to_string());
        Ok(data)
    }

    /// [`Self::data_in_place`] as a tensor on `device`.
    pub(crate) fn tensor_in_place<B: Kernels, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        Ok(Tensor::from_data(self.data_in_place(key, &shape)?, device))
    }

    /// [`Self::data`] as a tensor on `device`.
    pub(crate) fn tensor<B: Kernels, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        Ok(Tensor::from_data(self.data(key, &shape)?, device))
    }

    /// Keys of the manifest that were never loaded (a model/manifest inconsistency).
    pub(crate) fn not_taken(&self, cfg: &Qwen25VlConfig) -> Vec<String> {
        expected_tensors(cfg)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !self.taken.contains(k))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::HfConfig;
    use crate::test_util::fixture;

    fn tiny_cfg() -> Qwen25VlConfig {
        HfConfig::from_dir(&fixture("qwen2_5_vl_tiny"))
            .unwrap()
            .resolve()
            .unwrap()
    }

    /// Copies the fixture checkpoint into a temp dir, letting `edit` change the tensor map.
    pub(crate) fn rewritten_checkpoint(
        edit: impl FnOnce(&mut BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)>),
    ) -> tempfile::TempDir {
        rewritten_from("qwen2_5_vl_tiny", edit)
    }

    /// [`rewritten_checkpoint`] of the fixture directory `rel` (e.g. `qwen2_5_vl_tiny/nf4`).
    pub(crate) fn rewritten_from(
        rel: &str,
        edit: impl FnOnce(&mut BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)>),
    ) -> tempfile::TempDir {
        let src = fixture(&format!("{rel}/model.safetensors"));
        let bytes = std::fs::read(&src).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut map: BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        edit(&mut map);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture(&format!("{rel}/config.json")),
            dir.path().join("config.json"),
        )
        .unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
            .iter()
            .map(|(k, (d, s, b))| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        dir
    }

    #[test]
    fn fixture_checkpoint_matches_the_manifest_of_its_config_exactly() {
        let src = WeightSource::open(&fixture("qwen2_5_vl_tiny")).unwrap();
        src.check_against(&tiny_cfg()).unwrap();
        assert_eq!(src.index.len(), expected_tensors(&tiny_cfg()).len());
    }

    /// Issue 17: loading makes no copy of a dense weight on the CPU; the tensor borrows the
    /// mapped file's bytes (and still holds the right values).
    #[test]
    fn dense_weights_on_the_cpu_borrow_the_memory_map_instead_of_copying() {
        use burn::backend::ndarray::NdArrayTensor;
        type Cpu = burn::backend::NdArray<f32>;
        let key = "model.layers.1.mlp.up_proj.weight";
        let mut src = WeightSource::open(&fixture("qwen2_5_vl_tiny")).unwrap();
        let copied = src.data(key, &[176, 64]).unwrap();
        let t: Tensor<Cpu, 2> = src
            .tensor_in_place(key, [176, 64], &Default::default())
            .unwrap();
        match t.clone().into_primitive().tensor() {
            NdArrayTensor::F32(storage) => assert!(storage.is_borrowed(), "{key} was copied"),
            _ => panic!("{key}: not an f32 tensor"),
        }
        assert_eq!(
            t.into_data().to_vec::<f32>().unwrap(),
            copied.to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn missing_tensor_is_reported_by_name_and_shape() {
        let dir = rewritten_checkpoint(|m| {
            m.remove("model.layers.1.mlp.up_proj.weight");
        });
        let e = WeightSource::open(dir.path())
            .unwrap()
            .check_against(&tiny_cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "missing tensor `model.layers.1.mlp.up_proj.weight` (expected shape [176, 64])"
            ),
            "{e}"
        );
    }

    #[test]
    fn wrong_shape_and_unexpected_tensors_are_reported_with_file_and_shapes() {
        let dir = rewritten_checkpoint(|m| {
            let (d, _, b) = m.remove("visual.merger.ln_q.weight").unwrap();
            m.insert("visual.merger.ln_q.weight".into(), (d, vec![16, 2], b));
            let extra = m["model.norm.weight"].clone();
            m.insert("model.extra_norm.weight".into(), extra);
        });
        let e = WeightSource::open(dir.path())
            .unwrap()
            .check_against(&tiny_cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "`visual.merger.ln_q.weight` in model.safetensors has shape [16, 2], expected [32]"
            ),
            "{e}"
        );
        assert!(
            e.contains(
                "unexpected tensor `model.extra_norm.weight` in model.safetensors (shape [64])"
            ),
            "{e}"
        );
    }

    #[test]
    fn truncated_safetensors_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/model.safetensors")).unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
        let e = WeightSource::open(dir.path()).err().unwrap();
        assert!(matches!(e, ModelError::Safetensors { .. }));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn transformers5_keys_and_bf16_shards_load_as_the_published_layout() {
        // Two shards, transformers-5 key names, one tensor stored as bf16.
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        type Shard = Vec<(String, StDtype, Vec<usize>, Vec<u8>)>;
        let mut shards: [Shard; 2] = Default::default();
        let mut weight_map = serde_json::Map::new();
        for (k, v) in st.tensors() {
            let new = if let Some(r) = k.strip_prefix("model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = k.strip_prefix("visual.") {
                format!("model.visual.{r}")
            } else {
                k.clone()
            };
            let (dt, data) = if k == "model.norm.weight" {
                let f: Vec<f32> = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let b: Vec<u8> = f
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                (StDtype::BF16, b)
            } else {
                (v.dtype(), v.data().to_vec())
            };
            let s = usize::from(k.starts_with("visual."));
            let file = format!("model-0000{}-of-00002.safetensors", s + 1);
            weight_map.insert(new.clone(), file.into());
            shards[s].push((new, dt, v.shape().to_vec(), data));
        }
        for (i, shard) in shards.iter().enumerate() {
            let views: Vec<_> = shard
                .iter()
                .map(|(k, d, s, b)| {
                    (
                        k.clone(),
                        safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let p = dir
                .path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1));
            safetensors::serialize_to_file(views, None, &p).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let mut src = WeightSource::open(dir.path()).unwrap();
        src.check_against(&tiny_cfg()).unwrap();
        let norm = src.data("model.norm.weight", &[64]).unwrap();
        assert_eq!(norm.dtype, DType::F32);
        let want = st.tensor("model.norm.weight").unwrap();
        let want: Vec<f32> = want
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = norm.to_vec::<f32>().unwrap();
        // bf16 keeps 8 mantissa bits: relative error at most 2^-8
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 256.0, "{g} vs {w}");
        }
    }

    const NF4_DIR: &str = "qwen2_5_vl_tiny/nf4";

    #[test]
    fn nf4_fixture_checks_clean_with_every_linear_but_lm_head_quantized() {
        let src = WeightSource::open(&fixture(NF4_DIR)).unwrap();
        src.check_against(&tiny_cfg()).unwrap();
        assert!(src.is_nf4("model.layers.0.self_attn.q_proj.weight"));
        assert!(src.is_nf4("visual.merger.mlp.2.weight"));
        assert!(!src.is_nf4("lm_head.weight"));
        assert!(!src.is_nf4("model.embed_tokens.weight"));
    }

    #[test]
    fn nf4_checkpoint_missing_its_absmax_fails_naming_it() {
        let dir = rewritten_from(NF4_DIR, |m| {
            m.remove("model.layers.1.mlp.up_proj.weight.absmax")
                .unwrap();
        });
        let e = WeightSource::open(dir.path())
            .unwrap()
            .check_against(&tiny_cfg())
            .unwrap_err()
            .to_string();
        // 176 x 64 weights in blocks of 64: 176 scales
        assert!(
            e.contains("missing tensor `model.layers.1.mlp.up_proj.weight.absmax` (block scales of an NF4 weight, 176 elements)"),
            "{e}"
        );
        assert!(e.contains("(1 problems)"), "only the absmax is wrong: {e}");
    }

    #[test]
    fn nf4_parts_of_the_wrong_size_and_stray_parts_are_reported() {
        let dir = rewritten_from(NF4_DIR, |m| {
            let k = "model.layers.0.self_attn.k_proj.weight";
            let (d, _, mut b) = m.remove(k).unwrap();
            b.truncate(b.len() - 2);
            let n = b.len();
            m.insert(k.into(), (d, vec![n, 1], b));
            let stray = m["model.layers.0.self_attn.q_proj.weight.quant_map"].clone();
            m.insert(
                "model.layers.0.self_attn.q_proj.weight.extra_map".into(),
                stray,
            );
        });
        let e = WeightSource::open(dir.path())
            .unwrap()
            .check_against(&tiny_cfg())
            .unwrap_err()
            .to_string();
        // k_proj is [32, 64]: 2048 codes in 1024 bytes
        assert!(
            e.contains("`model.layers.0.self_attn.k_proj.weight` in model.safetensors has shape [1022, 1], expected 1024 elements (packed 4-bit codes)"),
            "{e}"
        );
        assert!(
            e.contains("unexpected tensor `model.layers.0.self_attn.q_proj.weight.extra_map`"),
            "{e}"
        );
    }

    #[test]
    fn nf4_quant_state_with_another_shape_is_a_mis_shaped_weight() {
        let dir = rewritten_from(NF4_DIR, |m| {
            let k = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4";
            let (d, _, b) = m.remove(k).unwrap();
            let text = String::from_utf8(b)
                .unwrap()
                .replace("[64, 176]", "[176, 64]");
            let b = text.into_bytes();
            m.insert(k.into(), (d, vec![b.len()], b));
        });
        let e = WeightSource::open(dir.path())
            .unwrap()
            .check_against(&tiny_cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NF4 weight `model.layers.0.mlp.down_proj.weight` has shape [176, 64] in its quant state, expected [64, 176]"),
            "{e}"
        );
    }

    #[test]
    fn nf4_weights_under_transformers5_keys_check_and_load_by_canonical_key() {
        let dir = rewritten_from(NF4_DIR, |m| {
            let old = std::mem::take(m);
            for (k, v) in old {
                let k = match k.strip_prefix("model.") {
                    Some(r) => format!("model.language_model.{r}"),
                    None => match k.strip_prefix("visual.") {
                        Some(r) => format!("model.visual.{r}"),
                        None => k,
                    },
                };
                m.insert(k, v);
            }
        });
        let mut src = WeightSource::open(dir.path()).unwrap();
        src.check_against(&tiny_cfg()).unwrap();
        let key = "model.layers.1.mlp.down_proj.weight";
        let got = src.nf4(key, &[64, 176]).unwrap();
        let fixture_src = WeightSource::open(&fixture(NF4_DIR)).unwrap();
        let want = Nf4Tensor::from_tensors(key, |k| fixture_src.view(k)).unwrap();
        assert_eq!(got, want);
        assert!(src.taken.contains(&format!("{key}.nested_quant_map")));
    }
}

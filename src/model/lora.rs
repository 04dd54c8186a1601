//! LoRA adapters in peft's format: the low-rank update `s·B(A(dropout(x)))`, `s = alpha / r`,
//! added to a frozen base projection; PEFT `adapter_config.json` + `adapter_model.safetensors`
//! read and written with peft's key names (peft 0.21 `tuners/lora/layer.py`, `utils/save_and_load.py`).
//!
//! Only this module knows PEFT key names (STYLE 6). Both layouts are accepted on load:
//! transformers-5 `base_model.model.model.language_model.layers.N.…` and the older
//! `base_model.model.model.layers.N.…`; an optional adapter name (`.default`) is tolerated.
//! Saving uses the transformers-5 layout, which is what peft 0.21 writes for Qwen2.5-VL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::prelude::*;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use crate::fs::{write_atomic, write_json_atomic, FsError};
use crate::kernels::Kernels;
use crate::model::dropout;

/// The projections QLoRA adapts, in the language model (the vision tower stays frozen).
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Errors reading or writing adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("reading adapter file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adapter {path} is not a valid safetensors file")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("adapter config {path}")]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("adapter {path}: unsupported setting: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error(
        "adapter {path}: tensor `{key}` is not a LoRA A/B weight of a language-model projection"
    )]
    UnexpectedKey { path: PathBuf, key: String },
    #[error("adapter {path}: tensor `{key}` has dtype {dtype}, expected F32, F16 or BF16")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("adapter {path}: {module} has lora_A {a:?} and lora_B {b:?}, which do not chain through rank {r}")]
    Shape {
        path: PathBuf,
        module: String,
        a: Vec<usize>,
        b: Vec<usize>,
        r: usize,
    },
    #[error("adapter {path}: {module} lacks its lora_{which} weight")]
    Missing {
        path: PathBuf,
        module: String,
        which: &'static str,
    },
    #[error(transparent)]
    Write(#[from] FsError),
}

/// `adapter_config.json`, the fields medpipe reads and writes (peft names). Unknown fields of
/// newer peft versions are ignored on read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A regex (peft accepts a string) or a list of module names.
    pub target_modules: serde_json::Value,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The config medpipe writes for the QLoRA targets.
    pub fn for_targets(r: usize, alpha: f64, dropout: f64, base: Option<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: serde_json::Value::String(format!(
                r".*language_model.*\.({})",
                TARGET_MODULES.join("|")
            )),
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base,
            inference_mode: true,
        }
    }

    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA), as peft scales the update.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// Where a LoRA pair sits: decoder layer and projection path (`self_attn.q_proj`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    pub layer: usize,
    /// `self_attn.q_proj`, `mlp.down_proj`, …
    pub module: String,
}

impl Site {
    /// The site of `module` (`self_attn.q_proj`, …) in decoder layer `layer`.
    pub fn new(layer: usize, module: &str) -> Self {
        Self {
            layer,
            module: module.to_string(),
        }
    }

    /// The peft key prefix (transformers-5 layout) of this site.
    pub fn peft_prefix(&self) -> String {
        format!(
            "base_model.model.model.language_model.layers.{}.{}",
            self.layer, self.module
        )
    }
}

/// One LoRA pair as plain data: `a` is `[r, in]`, `b` is `[out, r]` (peft/PyTorch layouts).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub a: Vec<f32>,
    pub a_shape: [usize; 2],
    pub b: Vec<f32>,
    pub b_shape: [usize; 2],
}

/// A whole adapter: config plus the pairs by site.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub pairs: BTreeMap<Site, LoraWeights>,
}

/// Parses a peft key into (site, `A` or `B`).
fn parse_key(key: &str) -> Option<(Site, char)> {
    let rest = key
        .strip_prefix("base_model.model.model.language_model.layers.")
        .or_else(|| key.strip_prefix("base_model.model.model.layers."))?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    // `<module>.lora_A[.<adapter name>]`
    let (module, tail) = rest.split_once(".lora_")?;
    let which = tail.chars().next()?;
    let after = &tail[1..];
    if !(which == 'A' || which == 'B') || !(after.is_empty() || after.starts_with('.')) {
        return None;
    }
    let name = module.rsplit('.').next()?;
    TARGET_MODULES.contains(&name).then(|| {
        (
            Site {
                layer,
                module: module.to_string(),
            },
            which,
        )
    })
}

impl Adapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    ///
    /// # Errors
    /// Missing or invalid files, unsupported peft settings (DoRA, fan_in_fan_out, bias
    /// training), keys that are not LoRA weights of the targeted projections, shapes that do
    /// not chain through the rank, non-float tensors.
    pub fn load(dir: &Path) -> Result<Self, LoraError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read(&cfg_path).map_err(|source| LoraError::Read {
            path: cfg_path.clone(),
            source,
        })?;
        let config: AdapterConfig =
            serde_json::from_slice(&text).map_err(|source| LoraError::Config {
                path: cfg_path.clone(),
                source,
            })?;
        let unsupported = |what: &str| LoraError::Unsupported {
            path: cfg_path.clone(),
            what: what.into(),
        };
        if config.peft_type != "LORA" {
            return Err(unsupported(&format!("peft_type {}", config.peft_type)));
        }
        if config.use_dora {
            return Err(unsupported("use_dora = true"));
        }
        if config.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out = true"));
        }
        if config.bias != "none" {
            return Err(unsupported(&format!("bias = {}", config.bias)));
        }

        let path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| LoraError::Read {
            path: path.clone(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|source| {
            LoraError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
        let mut halves: BTreeMap<Site, (Option<Half>, Option<Half>)> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let (site, which) = parse_key(&key).ok_or_else(|| LoraError::UnexpectedKey {
                path: path.clone(),
                key: key.clone(),
            })?;
            let data = to_f32(&view).ok_or_else(|| LoraError::Dtype {
                path: path.clone(),
                key: key.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let entry = halves.entry(site).or_default();
            let slot = (data, view.shape().to_vec());
            if which == 'A' {
                entry.0 = Some(slot);
            } else {
                entry.1 = Some(slot);
            }
        }
        let mut pairs = BTreeMap::new();
        for (site, (a, b)) in halves {
            let missing = |which| LoraError::Missing {
                path: path.clone(),
                module: site.peft_prefix(),
                which,
            };
            let (a, a_shape) = a.ok_or_else(|| missing("A"))?;
            let (b, b_shape) = b.ok_or_else(|| missing("B"))?;
            if a_shape.len() != 2
                || b_shape.len() != 2
                || a_shape[0] != config.r
                || b_shape[1] != config.r
            {
                return Err(LoraError::Shape {
                    path: path.clone(),
                    module: site.peft_prefix(),
                    a: a_shape,
                    b: b_shape,
                    r: config.r,
                });
            }
            pairs.insert(
                site,
                LoraWeights {
                    a,
                    a_shape: [a_shape[0], a_shape[1]],
                    b,
                    b_shape: [b_shape[0], b_shape[1]],
                },
            );
        }
        Ok(Self { config, pairs })
    }

    /// Writes the adapter into `dir` in peft's format (atomic writes).
    ///
    /// # Errors
    /// I/O failures, naming the file.
    pub fn save(&self, dir: &Path) -> Result<(), LoraError> {
        write_json_atomic(&dir.join("adapter_config.json"), &self.config)?;
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (site, w) in &self.pairs {
            let p = site.peft_prefix();
            tensors.push((
                format!("{p}.lora_A.weight"),
                f32_bytes(&w.a),
                w.a_shape.to_vec(),
            ));
            tensors.push((
                format!("{p}.lora_B.weight"),
                f32_bytes(&w.b),
                w.b_shape.to_vec(),
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, data, shape)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .expect("byte length is 4 x the shape's element count by construction");
                (k.clone(), view)
            })
            .collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join("adapter_model.safetensors");
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| {
            LoraError::Write(FsError {
                action: "serializing",
                path: path.clone(),
                source: std::io::Error::other(e),
            })
        })?;
        write_atomic(&path, &bytes)?;
        Ok(())
    }
}

/// One loaded LoRA matrix: data and shape.
type Half = (Vec<f32>, Vec<usize>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    match view.dtype() {
        safetensors::Dtype::F32 => Some(
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        safetensors::Dtype::F16 => Some(
            d.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        safetensors::Dtype::BF16 => Some(
            d.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// Hyper-parameters of fresh LoRA pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the LoRA input during training.
    pub dropout: f64,
    /// Seed of A's initialization.
    pub seed: u64,
}

/// A trainable LoRA pair on a projection with input `d_in` and output `d_out`.
///
/// Param ids are derived from the site's peft key, so optimizer state saved by one process
/// finds its params in the next (resume).
#[derive(Module, Debug)]
pub struct Lora<B: Kernels> {
    /// `[r, d_in]` (peft `lora_A.weight`).
    lora_a: Param<Tensor<B, 2>>,
    /// `[d_out, r]` (peft `lora_B.weight`).
    lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    scaling: f64,
    /// Dropout on the LoRA input, only under autodiff (training); drawn by
    /// [`dropout::apply`], burn's module only holds the probability.
    dropout: burn::nn::Dropout,
}

/// A stable 64-bit id from a key (FNV-1a), for `ParamId`s that survive restarts.
fn stable_id(key: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

impl<B: Kernels> Lora<B> {
    /// A pair from loaded weights.
    pub fn from_weights(
        site: &Site,
        w: &LoraWeights,
        scaling: f64,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        // f32 whatever the device computes in (peft's autocast_adapter_dtype): in f16 the
        // small updates and AdamW's moments would round away (its eps 1e-8 is 0 in f16).
        let f32_ = |v: &[f32], shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), shape), (device, DType::F32))
        };
        let (a, b) = (f32_(&w.a, w.a_shape), f32_(&w.b, w.b_shape));
        let p = site.peft_prefix();
        // `require_grad`: LoRA pairs are the trainable params (a no-op without autodiff).
        Self {
            lora_a: Param::initialized(stable_id(&format!("{p}.lora_A")), a.require_grad()),
            lora_b: Param::initialized(stable_id(&format!("{p}.lora_B")), b.require_grad()),
            scaling,
            dropout: burn::nn::DropoutConfig::new(dropout).init(),
        }
    }

    /// peft's default init: A Kaiming-uniform (a = √5, i.e. U(±1/√d_in)), B zero, so the
    /// adapted model starts equal to the base.
    pub fn init(
        site: &Site,
        [d_in, d_out]: [usize; 2],
        spec: &LoraSpec,
        device: &B::Device,
    ) -> Self {
        let LoraSpec {
            r,
            alpha,
            dropout,
            seed,
        } = *spec;
        use rand::{Rng, SeedableRng};
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ stable_id(&site.peft_prefix()).val());
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..r * d_in)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let w = LoraWeights {
            a,
            a_shape: [r, d_in],
            b: vec![0.0; d_out * r],
            b_shape: [d_out, r],
        };
        Self::from_weights(site, &w, alpha / r as f64, dropout, device)
    }

    /// The update `scaling · dropout(x) Aᵀ Bᵀ`, computed in f32 (the pair's dtype) and
    /// returned in `x`'s, as peft does with a half-precision base.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`; returns `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        // burn's cast is a no-op on an f32 input.
        // Seeded per site (`model::dropout`): reruns and concurrent peers draw the same masks.
        let x = dropout::apply(x, self.dropout.prob, self.lora_a.id.val()).cast(DType::F32);
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let a = self.lora_a.val().transpose(); // [d_in, r]
        let b = self.lora_b.val().transpose(); // [r, d_out]
        dims[D - 1] = b.dims()[1];
        x.reshape([rows, d_in])
            .matmul(a)
            .matmul(b)
            .mul_scalar(self.scaling)
            .reshape(dims)
            .cast(dtype)
    }

    /// The dense update `scaling · B·A` in PyTorch layout `[d_out, d_in]` (for merging).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scaling)
    }

    /// `alpha / r` (or what the adapter's config made it).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// Dropout probability on the LoRA input.
    pub fn dropout(&self) -> f64 {
        self.dropout.prob
    }

    /// The pair with both params marked trainable (after a module-wide `no_grad`).
    pub(crate) fn trainable(self) -> Self {
        Self {
            lora_a: self.lora_a.set_require_grad(true),
            lora_b: self.lora_b.set_require_grad(true),
            ..self
        }
    }

    /// Ids of the A and B params (stable across processes, see [`Lora`]).
    pub fn param_ids(&self) -> [ParamId; 2] {
        [self.lora_a.id, self.lora_b.id]
    }

    /// The weights as plain data (for saving in peft format).
    pub fn weights(&self) -> LoraWeights {
        let a = self.lora_a.val();
        let b = self.lora_b.val();
        let [ar, ac] = a.dims();
        let [br, bc] = b.dims();
        LoraWeights {
            a: a.into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 after convert"),
            a_shape: [ar, ac],
            b: b.into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 after convert"),
            b_shape: [br, bc],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{fixture, TB};

    #[test]
    fn fixture_adapter_loads_with_14_pairs_and_peft_scaling() {
        let a = Adapter::load(&fixture("qwen2_5_vl_tiny/lora")).unwrap();
        assert_eq!(a.pairs.len(), 14, "7 projections x 2 layers");
        assert_eq!(a.config.r, 8);
        assert_eq!(a.config.scaling(), 2.0);
        let q = &a.pairs[&Site {
            layer: 1,
            module: "self_attn.q_proj".into(),
        }];
        assert_eq!(q.a_shape, [8, 64]);
        assert_eq!(q.b_shape, [64, 8]);
    }

    #[test]
    fn both_peft_key_layouts_and_adapter_names_parse_to_the_same_site() {
        let site = Site {
            layer: 3,
            module: "mlp.down_proj".into(),
        };
        for key in [
            "base_model.model.model.language_model.layers.3.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.3.mlp.down_proj.lora_A.default.weight",
        ] {
            assert_eq!(parse_key(key), Some((site.clone(), 'A')), "{key}");
        }
        assert_eq!(
            parse_key("base_model.model.visual.blocks.0.attn.qkv.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_Ax.weight"),
            None
        );
    }

    #[test]
    fn saved_adapter_reloads_identically_with_peft_key_names() {
        let a = Adapter::load(&fixture("qwen2_5_vl_tiny/lora")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let b = Adapter::load(dir.path()).unwrap();
        assert_eq!(a.pairs, b.pairs);
        let ours = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
        let theirs =
            std::fs::read(fixture("qwen2_5_vl_tiny/lora/adapter_model.safetensors")).unwrap();
        let keys = |b: &[u8]| {
            let mut k = safetensors::SafeTensors::deserialize(b)
                .unwrap()
                .names()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
            k.sort();
            k
        };
        assert_eq!(keys(&ours), keys(&theirs), "peft's key names");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
                .unwrap();
        for field in ["peft_type", "r", "lora_alpha", "target_modules", "bias"] {
            assert!(
                cfg.get(field).is_some(),
                "adapter_config.json lacks {field}"
            );
        }
    }

    #[test]
    fn dora_adapters_are_rejected_with_the_setting_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture("qwen2_5_vl_tiny/lora/adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg["use_dora"] = true.into();
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        let err = Adapter::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("use_dora"), "{err}");
    }

    #[test]
    fn lora_forward_is_scaled_b_of_a_of_x_and_fresh_init_is_a_no_op() {
        let dev = Default::default();
        let site = Site {
            layer: 0,
            module: "self_attn.q_proj".into(),
        };
        let w = LoraWeights {
            a: vec![1.0, 2.0],
            a_shape: [1, 2],
            b: vec![3.0, -1.0],
            b_shape: [2, 1],
        };
        let lora = Lora::<TB>::from_weights(&site, &w, 0.5, 0.0, &dev);
        let x = Tensor::<TB, 3>::from_floats([[[1.0, 1.0]]], &dev);
        // A x = 3; B (A x) = [9, -3]; × 0.5
        let y = lora.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![4.5, -1.5]);
        let fresh = Lora::<TB>::init(
            &site,
            [2, 2],
            &LoraSpec {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                seed: 42,
            },
            &dev,
        );
        let y = fresh.forward(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![0.0, 0.0]);
    }
}

//! The forward parity harness behind `medpipe forward`: reads the inputs transformers
//! saw (`input_ids`, optional `pixel_values` + `image_grid_thw`, the keys of the fixtures'
//! `reference.safetensors`), runs one full-sequence forward, and writes `logits`,
//! `image_embeds` and `position_ids` as f32 safetensors for comparison with the
//! reference stack on any checkpoint, optionally with a peft LoRA adapter attached (or
//! merged into the dense weights).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::kernels::Kernels;
use crate::model::error::ModelError;
use crate::model::lora::Adapter;
use crate::model::qwen::{ImageInput, Qwen25Vl};

/// One parity run.
#[derive(Debug, Clone)]
pub struct ForwardJob {
    /// Checkpoint directory (config.json + safetensors).
    pub model_dir: PathBuf,
    /// peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to attach.
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the dense weights before the forward (`W + s·B·A`).
    pub merge: bool,
    /// Input safetensors.
    pub inputs: PathBuf,
    /// Output safetensors.
    pub out: PathBuf,
    /// Also generate this many tokens greedily (KV cache, no eos stop) per row and write
    /// them as `greedy_new_tokens` `[batch, N]` (I64); 0 for none.
    pub greedy: usize,
}

/// What a parity run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardReport {
    /// `[batch, seq, vocab]` of the written logits.
    pub logits_shape: [usize; 3],
    /// Image tokens embedded (0 for text-only).
    pub image_tokens: usize,
}

/// Integer tensor values and shape.
type IntTensor = (Vec<i64>, Vec<usize>);

fn ints(
    st: &SafeTensors<'_>,
    key: &'static str,
    path: &Path,
) -> Result<Option<IntTensor>, ModelError> {
    let t = match st.tensor(key) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let v: Vec<i64> = match t.dtype() {
        StDtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        StDtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => {
            return Err(ModelError::Input {
                name: key,
                reason: format!("{}: dtype {other:?}, expected I64 or I32", path.display()),
            })
        }
    };
    Ok(Some((v, t.shape().to_vec())))
}

/// Errors of [`run_forward_as`].
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Precision(#[from] crate::device::PrecisionError),
}

/// Runs `job` on the backend of `device` (NdArray f32 for the CPU, Wgpu or Cuda for a GPU),
/// computing in `precision` (weights and activations; the outputs are written as f32).
///
/// # Errors
/// As [`run_forward`]; a GPU in a build without `--features cuda`; a precision the device
/// does not support.
pub fn run_forward_as(
    device: crate::device::Device,
    precision: crate::device::Precision,
    job: &ForwardJob,
) -> Result<ForwardReport, ForwardError> {
    struct Run<'a>(&'a ForwardJob);
    impl crate::device::BackendJob for Run<'_> {
        type Output = Result<ForwardReport, ModelError>;
        fn run<B: Kernels>(self, device: B::Device, _: crate::device::Target) -> Self::Output {
            run_forward::<B>(self.0, &device)
        }
    }
    Ok(crate::device::run_on_as(device, precision, Run(job))???)
}

/// Runs `job` on `device`.
///
/// # Errors
/// Loading errors, unreadable/malformed inputs (naming the file and key), model input
/// errors, and write errors.
pub fn run_forward<B: Kernels>(
    job: &ForwardJob,
    device: &B::Device,
) -> Result<ForwardReport, ModelError> {
    let mut model = Qwen25Vl::<B>::load(&job.model_dir, device)?;
    if let Some(dir) = &job.adapter {
        model.attach_adapter(&Adapter::load(dir)?, device)?;
        if job.merge {
            model.merge_lora();
        }
    }
    let bytes = std::fs::read(&job.inputs).map_err(|source| ModelError::Io {
        path: job.inputs.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| ModelError::Safetensors {
        path: job.inputs.clone(),
        source,
    })?;
    let (ids, shape) = ints(&st, "input_ids", &job.inputs)?.ok_or_else(|| ModelError::Input {
        name: "input_ids",
        reason: format!("missing from {}", job.inputs.display()),
    })?;
    if shape.len() != 2 || shape[0] * shape[1] == 0 {
        return Err(ModelError::Input {
            name: "input_ids",
            reason: format!("shape {shape:?}, expected [batch, seq]"),
        });
    }
    let rows: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    let images = match st.tensor("pixel_values") {
        Ok(pv) => {
            let (g, gs) =
                ints(&st, "image_grid_thw", &job.inputs)?.ok_or_else(|| ModelError::Input {
                    name: "image_grid_thw",
                    reason: format!(
                        "pixel_values without image_grid_thw in {}",
                        job.inputs.display()
                    ),
                })?;
            if gs.len() != 2 || gs[1] != 3 {
                return Err(ModelError::Input {
                    name: "image_grid_thw",
                    reason: format!("shape {gs:?}, expected [images, 3]"),
                });
            }
            let dtype = match pv.dtype() {
                StDtype::F32 => burn::tensor::DType::F32,
                StDtype::BF16 => burn::tensor::DType::BF16,
                StDtype::F16 => burn::tensor::DType::F16,
                other => {
                    return Err(ModelError::Input {
                        name: "pixel_values",
                        reason: format!("dtype {other:?}, expected a float type"),
                    })
                }
            };
            if pv.shape().len() != 2 {
                return Err(ModelError::Input {
                    name: "pixel_values",
                    reason: format!("shape {:?}, expected [patches, C·T·P·P]", pv.shape()),
                });
            }
            let data = TensorData::from_bytes_vec(pv.data().to_vec(), pv.shape().to_vec(), dtype)
                .convert_dtype(burn::tensor::DType::F32);
            Some(ImageInput {
                pixel_values: Tensor::<B, 2>::from_data(data, device),
                grids: g
                    .chunks(3)
                    .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
                    .collect(),
            })
        }
        Err(_) => None,
    };
    if job.greedy > 0 && rows.len() != 1 {
        return Err(ModelError::Input {
            name: "input_ids",
            reason: format!(
                "--greedy takes one row (the images belong to it), found {}",
                rows.len()
            ),
        });
    }
    let greedy = if job.greedy > 0 {
        let requests: Vec<crate::model::Request<B>> = rows
            .iter()
            .map(|ids| crate::model::Request {
                input_ids: ids.clone(),
                images: images.clone(),
            })
            .collect();
        let cfg = crate::model::GenerateConfig {
            max_new_tokens: job.greedy,
            sampling: crate::model::Sampling::Greedy,
            seed: 0,
            eos_token_ids: Some(vec![]),
        };
        let gens = model.generate(&requests, &cfg, device)?;
        let tokens: Vec<u8> = gens
            .iter()
            .flat_map(|g| g.tokens.iter().map(|&t| i64::from(t)))
            .flat_map(i64::to_le_bytes)
            .collect();
        Some((tokens, vec![gens.len(), job.greedy]))
    } else {
        None
    };
    let out = model.forward(&rows, None, images.as_ref(), device)?;
    let logits_shape = out.logits.dims();
    let to_f32 = |t: TensorData, what: &'static str| -> Result<Vec<u8>, ModelError> {
        let v = t
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| ModelError::Readback {
                what,
                reason: format!("{e:?}"),
            })?;
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    let logits = to_f32(out.logits.into_data(), "logits")?;
    let p = &out.positions;
    let pos: Vec<u8> = p
        .ids
        .iter()
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let (embeds, eshape) = match out.image_embeds {
        Some(e) => {
            let s = e.dims();
            (
                Some(to_f32(e.into_data(), "image_embeds")?),
                vec![s[0], s[1]],
            )
        }
        None => (None, vec![]),
    };
    fn view(b: &[u8], s: Vec<usize>) -> TensorView<'_> {
        TensorView::new(StDtype::F32, s, b).expect("shape and byte length agree by construction")
    }
    let mut tensors = vec![
        ("logits".to_string(), view(&logits, logits_shape.to_vec())),
        (
            "position_ids".to_string(),
            view(&pos, vec![3, p.batch, p.seq]),
        ),
    ];
    if let Some(e) = &embeds {
        tensors.push(("image_embeds".to_string(), view(e, eshape.clone())));
    }
    if let Some((tokens, shape)) = &greedy {
        let v = TensorView::new(StDtype::I64, shape.clone(), tokens)
            .expect("shape and byte length agree by construction");
        tensors.push(("greedy_new_tokens".to_string(), v));
    }
    let bytes =
        safetensors::serialize(tensors, None).map_err(|source| ModelError::Safetensors {
            path: job.out.clone(),
            source,
        })?;
    crate::fs::write_atomic(&job.out, &bytes)?;
    Ok(ForwardReport {
        logits_shape,
        image_tokens: eshape.first().copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, fixture, st_f32s, TB};

    /// Same bar as the model tests: torch-on-CPU lands within 2e-6 of the reference.
    const ATOL: f32 = 1e-4;

    #[test]
    fn forward_job_writes_reference_logits_embeds_and_positions() {
        let dir = tempfile::tempdir().unwrap();
        let job = ForwardJob {
            model_dir: fixture("qwen2_5_vl_tiny"),
            adapter: None,
            merge: false,
            inputs: fixture("qwen2_5_vl_tiny/reference.safetensors"),
            out: dir.path().join("out.safetensors"),
            greedy: 0,
        };
        let rep = run_forward::<TB>(&job, &Default::default()).unwrap();
        assert_eq!(rep.logits_shape, [1, 48, 2048]);
        assert_eq!(rep.image_tokens, 20);
        let got = std::fs::read(&job.out).unwrap();
        let got = SafeTensors::deserialize(&got).unwrap();
        let want = std::fs::read(&job.inputs).unwrap();
        let want = SafeTensors::deserialize(&want).unwrap();
        assert_close(
            "logits",
            &st_f32s(&got, "logits"),
            &st_f32s(&want, "logits"),
            ATOL,
        );
        assert_close(
            "image_embeds",
            &st_f32s(&got, "image_embeds"),
            &st_f32s(&want, "image_embeds"),
            ATOL,
        );
        let pos: Vec<f32> = want
            .tensor("position_ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect();
        assert_eq!(st_f32s(&got, "position_ids"), pos);
    }

    #[test]
    fn forward_job_with_the_fixture_adapter_writes_peft_logits_merged_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let want = std::fs::read(fixture("qwen2_5_vl_tiny/lora/reference.safetensors")).unwrap();
        let want = st_f32s(&SafeTensors::deserialize(&want).unwrap(), "logits");
        for merge in [false, true] {
            let job = ForwardJob {
                model_dir: fixture("qwen2_5_vl_tiny"),
                adapter: Some(fixture("qwen2_5_vl_tiny/lora")),
                merge,
                inputs: fixture("qwen2_5_vl_tiny/reference.safetensors"),
                out: dir.path().join(format!("out-{merge}.safetensors")),
                greedy: 0,
            };
            run_forward::<TB>(&job, &Default::default()).unwrap();
            let got = std::fs::read(&job.out).unwrap();
            let got = SafeTensors::deserialize(&got).unwrap();
            assert_close(
                &format!("merge {merge}"),
                &st_f32s(&got, "logits"),
                &want,
                ATOL,
            );
        }
    }

    #[test]
    fn an_adapter_directory_without_files_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let job = ForwardJob {
            model_dir: fixture("qwen2_5_vl_tiny"),
            adapter: Some(dir.path().to_path_buf()),
            merge: false,
            inputs: fixture("qwen2_5_vl_tiny/reference.safetensors"),
            out: dir.path().join("out.safetensors"),
            greedy: 0,
        };
        let e = run_forward::<TB>(&job, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter_config.json"), "{e}");
        assert!(!job.out.exists());
    }

    #[test]
    fn text_only_inputs_need_no_pixel_values() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u8> = [1990i64, 11, 12, 13, 100]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let inputs = dir.path().join("in.safetensors");
        safetensors::serialize_to_file(
            vec![(
                "input_ids",
                TensorView::new(StDtype::I64, vec![1, 5], &ids).unwrap(),
            )],
            None,
            &inputs,
        )
        .unwrap();
        let job = ForwardJob {
            model_dir: fixture("qwen2_5_vl_tiny"),
            adapter: None,
            merge: false,
            inputs,
            out: dir.path().join("out.safetensors"),
            greedy: 0,
        };
        let rep = run_forward::<TB>(&job, &Default::default()).unwrap();
        assert_eq!(
            rep,
            ForwardReport {
                logits_shape: [1, 5, 2048],
                image_tokens: 0
            }
        );
        let got = std::fs::read(&job.out).unwrap();
        let got = SafeTensors::deserialize(&got).unwrap();
        assert!(got.tensor("image_embeds").is_err());
        assert_eq!(
            st_f32s(&got, "position_ids"),
            (0..3)
                .flat_map(|_| 0..5)
                .map(|x| x as f32)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn missing_input_ids_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("in.safetensors");
        let b = [0u8; 4];
        safetensors::serialize_to_file(
            vec![("other", TensorView::new(StDtype::F32, vec![1], &b).unwrap())],
            None,
            &inputs,
        )
        .unwrap();
        let job = ForwardJob {
            model_dir: fixture("qwen2_5_vl_tiny"),
            adapter: None,
            merge: false,
            inputs: inputs.clone(),
            out: dir.path().join("out.safetensors"),
            greedy: 0,
        };
        let e = run_forward::<TB>(&job, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("input_ids") && e.contains(&inputs.display().to_string()),
            "{e}"
        );
    }
}

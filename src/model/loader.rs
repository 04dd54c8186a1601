//! Loading a model directory for generation, in one place: the weights on a device (timed,
//! optionally with a peft LoRA adapter attached), and the input side — the image processor
//! (`preprocessor_config.json`) and the chat prompt builder (`tokenizer.json` and its
//! template) — that turns page images and a question into a [`Request`].
//!
//! `medpipe bench` and `generate`, and the baseline, quantize and evaluate stages all load
//! through here, so a variant is measured and scored exactly as it is benchmarked.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::kernels::Kernels;
use crate::model::lora::{Adapter, LoraError};
use crate::model::processor::{ImageInput as RawImage, ImageProcessor, ProcessedImages};
use crate::model::prompt::PromptBuilder;
use crate::model::{ImageInput, ModelError, Qwen25Vl, Request};

/// Errors loading a model or encoding its inputs.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Prompt(#[from] crate::model::prompt::PromptError),
    #[error(transparent)]
    Processor(#[from] crate::model::processor::ProcessorError),
    #[error("loading the adapter in {dir}")]
    Adapter {
        dir: PathBuf,
        #[source]
        source: Box<LoraError>,
    },
    #[error("attaching the adapter in {dir}")]
    Attach {
        dir: PathBuf,
        #[source]
        source: Box<crate::model::error::AdaptError>,
    },
    #[error("the device did not finish loading {dir}: {reason}")]
    Sync { dir: PathBuf, reason: String },
}

/// A model on its device and how long loading took.
#[derive(Debug)]
pub struct LoadedModel<B: Kernels> {
    pub model: Qwen25Vl<B>,
    /// Files on disk → weights (and adapter) ready on the device, ms.
    pub load_ms: f64,
}

/// Loads the checkpoint in `dir` on `device`, then attaches the peft adapter in `adapter`
/// when given; the time runs until the device has finished.
///
/// # Errors
/// Checkpoint errors; an adapter that does not read or does not fit, naming its directory.
pub fn load_model<B: Kernels>(
    dir: &Path,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<LoadedModel<B>, LoadError> {
    let t = Instant::now();
    let mut model = Qwen25Vl::<B>::load(dir, device)?;
    if let Some(adir) = adapter {
        let a = Adapter::load(adir).map_err(|source| LoadError::Adapter {
            dir: adir.to_path_buf(),
            source: Box::new(source),
        })?;
        model
            .attach_adapter(&a, device)
            .map_err(|source| LoadError::Attach {
                dir: adir.to_path_buf(),
                source: Box::new(source),
            })?;
    }
    // Uploads may still be queued on a GPU; the load is done when they are.
    B::sync(device).map_err(|e| LoadError::Sync {
        dir: dir.to_path_buf(),
        reason: format!("{e:?}"),
    })?;
    Ok(LoadedModel {
        model,
        load_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

/// The input side of a model directory: its chat prompt builder and image processor.
#[derive(Debug, Clone)]
pub struct InputEncoder {
    prompts: PromptBuilder,
    /// `None` when the directory has no `preprocessor_config.json` (text-only use).
    processor: Option<ImageProcessor>,
    dir: PathBuf,
}

/// A prompt as token ids, with its images preprocessed (host memory, any backend).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    pub images: Option<ProcessedImages>,
}

impl EncodedPrompt {
    /// The model request on `device` (the pixels are copied there).
    pub fn request<B: Kernels>(&self, device: &B::Device) -> Request<B> {
        Request {
            input_ids: self.input_ids.clone(),
            images: self
                .images
                .clone()
                .map(|p| ImageInput::from_processed(p, device)),
        }
    }
}

impl InputEncoder {
    /// Reads `tokenizer.json` (+ chat template) and, when present,
    /// `preprocessor_config.json` from `dir`.
    ///
    /// # Errors
    /// A tokenizer or processor config that is missing (tokenizer) or does not parse.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let prompts = PromptBuilder::from_dir(dir)?;
        let config = dir.join("preprocessor_config.json");
        let processor = if config.is_file() {
            Some(ImageProcessor::from_config_file(&config)?)
        } else {
            None
        };
        Ok(Self {
            prompts,
            processor,
            dir: dir.to_path_buf(),
        })
    }

    /// Changes the largest image (pixels, from its header) that [`Self::encode`] decodes.
    pub fn with_max_input_pixels(mut self, max_input_pixels: u64) -> Self {
        self.processor = self
            .processor
            .map(|p| p.with_max_input_pixels(max_input_pixels));
        self
    }

    /// Overrides the processor's resize bounds (`[model] min_pixels`/`max_pixels`; `None`
    /// keeps the model's).
    ///
    /// # Errors
    /// Bounds that cross (see [`ImageProcessor::with_pixel_bounds`]).
    pub fn with_pixel_bounds(
        mut self,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
    ) -> Result<Self, LoadError> {
        self.processor = match self.processor {
            Some(p) => Some(p.with_pixel_bounds(min_pixels, max_pixels)?),
            None => None,
        };
        Ok(self)
    }

    /// The image processor, when the directory has one.
    pub fn processor(&self) -> Option<&ImageProcessor> {
        self.processor.as_ref()
    }

    /// The prompt builder (tokenizer), e.g. to decode answers.
    pub fn prompts(&self) -> &PromptBuilder {
        &self.prompts
    }

    /// `prompt` as the user turn of a chat about `images` (none: a text-only prompt).
    ///
    /// # Errors
    /// Images that do not read or decode (naming the file), a missing processor config when
    /// there are images, or a prompt the tokenizer refuses.
    pub fn encode(&self, images: &[RawImage], prompt: &str) -> Result<EncodedPrompt, LoadError> {
        if images.is_empty() {
            return Ok(EncodedPrompt {
                input_ids: self.prompts.encode_chat(None, prompt, &[])?,
                images: None,
            });
        }
        let processed = match &self.processor {
            Some(p) => p.preprocess(images)?,
            // Reading the missing file gives the error that names it.
            None => ImageProcessor::from_config_file(self.dir.join("preprocessor_config.json"))?
                .preprocess(images)?,
        };
        Ok(EncodedPrompt {
            input_ids: self
                .prompts
                .encode_chat(None, prompt, &processed.grid_thw)?,
            images: Some(processed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{fixture, TB};

    /// builtin:tiny in a temporary directory (the fixture model has no tokenizer).
    fn tiny() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("base");
        crate::builtin::materialize(&dir, 0, &crate::builtin::tokenizer_corpus(0, 300)).unwrap();
        (tmp, dir)
    }

    #[test]
    fn an_encoded_page_becomes_a_request_with_its_image_tokens() {
        let (_tmp, dir) = tiny();
        let enc = InputEncoder::from_dir(&dir).unwrap();
        let page = image::DynamicImage::new_rgb8(64, 56);
        let e = enc
            .encode(&[RawImage::Image(page)], "List the values")
            .unwrap();
        let px = e.images.clone().unwrap();
        assert_eq!(px.grid_thw.len(), 1);
        let req = e.request::<TB>(&Default::default());
        let img = req.images.unwrap();
        assert_eq!(img.pixel_values.dims(), [px.num_patches, px.patch_dim]);
        assert_eq!(img.grids.len(), 1);
        assert_eq!(req.input_ids, e.input_ids);
        // a text-only prompt has no image and fewer tokens
        let t = enc.encode(&[], "List the values").unwrap();
        assert!(t.images.is_none());
        assert!(t.input_ids.len() < e.input_ids.len());
    }

    #[test]
    fn an_image_file_that_does_not_exist_is_named_in_the_error() {
        let (_tmp, dir) = tiny();
        let enc = InputEncoder::from_dir(&dir).unwrap();
        let missing = PathBuf::from("/nonexistent/page.png");
        let err = enc.encode(&[RawImage::Path(missing)], "x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/page.png"), "{err}");
    }

    #[test]
    fn a_missing_adapter_is_named_and_the_load_is_timed() {
        let dir = fixture("qwen2_5_vl_tiny");
        let m = load_model::<TB>(&dir, None, &Default::default()).unwrap();
        assert!(m.load_ms > 0.0);
        let err = load_model::<TB>(&dir, Some(&dir.join("nf4")), &Default::default()).unwrap_err();
        assert!(matches!(err, LoadError::Adapter { .. }), "{err}");
        assert!(format!("{:#}", anyhow::Error::new(err)).contains("adapter_config.json"));
    }
}

//! [`ImageProcessor`]: the steps of [`super`] run over a list of images, concatenated along
//! the patch axis.

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};

use super::config::{HfPreprocessorConfig, ProcessorConfig};
use super::decode::{self, convert_to_rgb, DEFAULT_MAX_INPUT_PIXELS};
use super::error::{GeometryError, ProcessorError};
use super::patchify::{normalize, patchify};
use super::resize::{resize_bicubic, smart_resize};

/// One image to preprocess: a file to decode, or an image already in memory.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A PNG or JPEG file.
    Path(PathBuf),
    /// An already decoded image.
    Image(DynamicImage),
    /// An encoded PNG or JPEG in memory (an upload), decoded under the same limit as a file;
    /// `name` stands for it in errors.
    Encoded { name: String, bytes: Vec<u8> },
}

impl From<&Path> for ImageInput {
    fn from(p: &Path) -> Self {
        ImageInput::Path(p.to_path_buf())
    }
}
impl From<PathBuf> for ImageInput {
    fn from(p: PathBuf) -> Self {
        ImageInput::Path(p)
    }
}
impl From<DynamicImage> for ImageInput {
    fn from(i: DynamicImage) -> Self {
        ImageInput::Image(i)
    }
}

/// The processor's output for a list of images, concatenated in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImages {
    /// Row-major `[num_patches, patch_dim]` normalized patch values.
    pub pixel_values: Vec<f32>,
    /// Rows of `pixel_values`: Σ over images of `t·h·w`.
    pub num_patches: usize,
    /// Columns of `pixel_values`: `C · temporal_patch_size · patch_size²` (1176 for Qwen2.5-VL).
    pub patch_dim: usize,
    /// Per image `[grid_t, grid_h, grid_w]` in patches (`image_grid_thw`).
    pub grid_thw: Vec<[u32; 3]>,
}

/// The Qwen2-VL image processor (see the module doc for the exact steps).
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ProcessorConfig,
    max_input_pixels: u64,
}

impl ImageProcessor {
    /// A processor with these settings and the default decode limit
    /// ([`DEFAULT_MAX_INPUT_PIXELS`]).
    pub fn new(config: ProcessorConfig) -> Self {
        Self {
            config,
            max_input_pixels: DEFAULT_MAX_INPUT_PIXELS,
        }
    }

    /// Reads and validates a `preprocessor_config.json`.
    ///
    /// # Errors
    /// `ReadConfig`, `ParseConfig` or `InvalidConfig`, each naming `path`.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self, ProcessorError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ProcessorError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfPreprocessorConfig =
            serde_json::from_str(&text).map_err(|source| ProcessorError::ParseConfig {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::new(hf.resolve(path)?))
    }

    /// Changes the largest image (in pixels, from its header) that will be decoded.
    pub fn with_max_input_pixels(mut self, max_input_pixels: u64) -> Self {
        self.max_input_pixels = max_input_pixels;
        self
    }

    /// Overrides the resize bounds (`[model] min_pixels`/`max_pixels`); `None` keeps the
    /// config's.
    ///
    /// # Errors
    /// [`ProcessorError::PixelBounds`] when the resulting minimum is above the maximum.
    pub fn with_pixel_bounds(
        mut self,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
    ) -> Result<Self, ProcessorError> {
        let min = min_pixels.unwrap_or(self.config.min_pixels);
        let max = max_pixels.unwrap_or(self.config.max_pixels);
        if min > max {
            return Err(ProcessorError::PixelBounds { min, max });
        }
        self.config.min_pixels = min;
        self.config.max_pixels = max;
        Ok(self)
    }

    /// The validated settings.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Spatial merge factor: each `merge_size²` patches become one LLM token.
    pub fn merge_size(&self) -> u32 {
        self.config.merge_size
    }

    /// Decodes an image file and applies its EXIF orientation, refusing before decoding one whose
    /// header announces more than the decode limit.
    ///
    /// # Errors
    /// `OpenImage`, `ImageTooLarge` or `DecodeImage`, each naming `path`.
    pub fn load_image(&self, path: &Path) -> Result<DynamicImage, ProcessorError> {
        decode::load_image(path, self.max_input_pixels)
    }

    /// Preprocesses images (decoding the paths) into concatenated patches.
    ///
    /// # Shapes
    /// - returns `pixel_values` `[Σ t·h·w, C·T·P·P]` and one `[t, h, w]` per image
    ///
    /// # Errors
    /// `NoImages`, any `load_image` error, or `Geometry` (aspect ratio above 200, degenerate size).
    pub fn preprocess(&self, images: &[ImageInput]) -> Result<ProcessedImages, ProcessorError> {
        if images.is_empty() {
            return Err(ProcessorError::NoImages);
        }
        let c = &self.config;
        let patch_dim = 3 * (c.temporal_patch_size * c.patch_size * c.patch_size) as usize;
        let mut out = ProcessedImages {
            pixel_values: Vec::new(),
            num_patches: 0,
            patch_dim,
            grid_thw: Vec::with_capacity(images.len()),
        };
        for (i, input) in images.iter().enumerate() {
            let (label, rgb) = match input {
                ImageInput::Path(p) => (p.display().to_string(), self.to_rgb(self.load_image(p)?)),
                ImageInput::Image(img) => (format!("#{i}"), self.to_rgb(img.clone())),
                ImageInput::Encoded { name, bytes } => (
                    name.clone(),
                    self.to_rgb(decode::decode_bytes(name, bytes, self.max_input_pixels)?),
                ),
            };
            let grid = self.process_one(&label, &rgb, &mut out.pixel_values)?;
            out.num_patches += (grid[0] * grid[1] * grid[2]) as usize;
            out.grid_thw.push(grid);
        }
        tracing::debug!(
            images = images.len(),
            patches = out.num_patches,
            "preprocessed images"
        );
        Ok(out)
    }

    fn to_rgb(&self, img: DynamicImage) -> RgbImage {
        if self.config.do_convert_rgb {
            convert_to_rgb(&img)
        } else {
            img.into_rgb8()
        }
    }

    /// Resizes, normalizes and patchifies one RGB image, appending its patches to `out`.
    fn process_one(
        &self,
        label: &str,
        img: &RgbImage,
        out: &mut Vec<f32>,
    ) -> Result<[u32; 3], ProcessorError> {
        let c = &self.config;
        let (width, height) = img.dimensions();
        let geometry = |source: GeometryError| ProcessorError::Geometry {
            image: label.to_string(),
            width,
            height,
            source,
        };
        let resized;
        let img = if c.do_resize {
            let (h, w) = smart_resize(
                height,
                width,
                c.patch_size * c.merge_size,
                c.min_pixels,
                c.max_pixels,
            )
            .map_err(geometry)?;
            resized = resize_bicubic(img, w, h);
            &resized
        } else {
            img
        };
        let (w, h) = img.dimensions();
        let unit = c.patch_size * c.merge_size;
        if w % unit != 0 || h % unit != 0 || w == 0 || h == 0 {
            return Err(geometry(GeometryError::OffGrid { unit }));
        }
        let plane = normalize(img, c);
        patchify(&plane, w as usize, h as usize, c, out);
        Ok([1, h / c.patch_size, w / c.patch_size])
    }
}

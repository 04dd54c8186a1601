//! The benchmark's inputs: the five hand-written evaluation documents of `data/eval`
//! (`crate::data::eval_docs`), rendered by the prepare stage's renderer without degradations,
//! each with the extraction instruction the fine-tune is trained on.
//!
//! Every timing the harness reports is measured on these real document images and prompts,
//! never on a toy prompt.

use image::DynamicImage;

use crate::data::render::{render, DegradeConfig, RenderConfig};

/// The instruction every request carries (the prepare stage's sample prompt).
pub const EXTRACTION_PROMPT: &str = crate::data::sample::PROMPT;

/// One benchmark input: a named document image and its instruction.
#[derive(Debug, Clone)]
pub struct BenchInput {
    /// Short stable name (`lab_panel`), recorded with every measured request.
    pub name: String,
    /// The rendered document.
    pub image: DynamicImage,
    /// The user instruction.
    pub prompt: String,
}

/// Errors rendering a benchmark input.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("rendering evaluation document `{name}`: {message}")]
    Render { name: String, message: String },
}

/// The five evaluation documents rendered as images, each with [`EXTRACTION_PROMPT`].
///
/// Deterministic: the same bytes on every machine (embedded font, no randomness).
///
/// # Errors
/// A drawing failure, naming the document.
pub fn evaluation_documents() -> Result<Vec<BenchInput>, InputError> {
    let docs = crate::data::eval_docs::documents().map_err(|e| InputError::Render {
        name: "data/eval".into(),
        message: e.to_string(),
    })?;
    let cfg = RenderConfig {
        degrade: DegradeConfig::none(),
        ..RenderConfig::default()
    };
    docs.iter()
        .map(|doc| {
            let page = render(doc, &cfg, 0).map_err(|e| InputError::Render {
                name: doc.id.clone(),
                message: e.to_string(),
            })?;
            Ok(BenchInput {
                name: doc.doc_type.clone(),
                image: DynamicImage::ImageLuma8(page.image),
                prompt: EXTRACTION_PROMPT.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_five_evaluation_documents_render_as_processor_friendly_pages_with_ink() {
        let docs = evaluation_documents().unwrap();
        assert_eq!(docs.len(), 5);
        let mut names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), 5);
        for d in &docs {
            let rgb = d.image.to_rgb8();
            let (w, h) = rgb.dimensions();
            // Sides are multiples of 28: the Qwen2-VL processor never rescales them.
            assert_eq!((w % 28, h % 28), (0, 0), "{}: {w}x{h}", d.name);
            // Text was drawn: a real share of the page is dark, but most of it is paper.
            let dark = rgb.pixels().filter(|p| p.0[0] < 128).count();
            let share = dark as f64 / (w * h) as f64;
            assert!(
                share > 0.005 && share < 0.5,
                "{}: dark share {share}",
                d.name
            );
            assert!(d.prompt.contains("medical term"));
        }
        assert_ne!(docs[0].image.as_bytes(), docs[1].image.as_bytes());
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = evaluation_documents().unwrap();
        let b = evaluation_documents().unwrap();
        assert_eq!(a[2].image.as_bytes(), b[2].image.as_bytes());
    }
}

//! The benchmark's inputs: the five hand-written evaluation documents, rendered to images,
//! each with the extraction instruction the fine-tune is trained on.
//!
//! Every timing the harness reports is measured on these real document images and prompts,
//! never on a toy prompt.
//!
//! Stand-in until merge: the prepare stage's `crate::data` (branch `data`) owns the
//! evaluation documents, their renderer and the instruction text; it is not on this branch,
//! so this file renders five short clinical documents itself (black text on white, the
//! embedded chart font, drawn with plotters). The lead switches [`evaluation_documents`] to
//! `crate::data` at merge; callers only see this one function.

use image::{DynamicImage, RgbImage};
use plotters::prelude::*;

use crate::report::charts::{register_font, FAMILY};

/// The instruction every request carries (same text as the prepare stage's samples).
pub const EXTRACTION_PROMPT: &str = "Extract every medical term in this document with its value and unit. \
Answer only with a JSON array of objects with keys \"term\", \"value\", \"unit\" (empty string when there is no unit).";

/// Rendered page size, pixels (width, height): a small portrait page.
const PAGE: (u32, u32) = (448, 560);
/// Text size, pixels.
const FONT_PX: u32 = 18;
/// Line pitch, pixels.
const LINE_PX: i32 = 26;
/// Page margin, pixels.
const MARGIN_PX: i32 = 24;

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

/// The five evaluation documents: (name, lines of text).
const DOCUMENTS: [(&str, &[&str]); 5] = [
    (
        "lab_panel",
        &[
            "CITY HOSPITAL - LABORATORY REPORT",
            "Patient: J. Doe    DOB: 1961-04-12",
            "Collected: 2024-03-02 07:40",
            "",
            "Hemoglobin            13.2  g/dL",
            "White blood cell count 7.8  10^9/L",
            "Platelets              245  10^9/L",
            "Sodium                 139  mmol/L",
            "Potassium              4.1  mmol/L",
            "Creatinine            0.92  mg/dL",
            "Glucose (fasting)      104  mg/dL",
        ],
    ),
    (
        "vital_signs",
        &[
            "NURSING FLOWSHEET - VITAL SIGNS",
            "Ward 4B, bed 12",
            "",
            "Blood pressure     128/82 mmHg",
            "Heart rate         76 bpm",
            "Respiratory rate   16 /min",
            "Temperature        37.4 C",
            "SpO2               97 %",
            "Weight             81.5 kg",
            "Pain score         2 /10",
        ],
    ),
    (
        "medication_list",
        &[
            "MEDICATION RECONCILIATION",
            "",
            "Metformin       500 mg   twice daily",
            "Lisinopril       10 mg   once daily",
            "Atorvastatin     20 mg   at night",
            "Aspirin          81 mg   once daily",
            "Insulin glargine 14 units at bedtime",
            "",
            "Allergies: penicillin (rash)",
        ],
    ),
    (
        "discharge_summary",
        &[
            "DISCHARGE SUMMARY",
            "Admitted with community-acquired",
            "pneumonia. Treated with ceftriaxone",
            "1 g daily for 5 days.",
            "",
            "On discharge: temperature 36.9 C,",
            "CRP 12 mg/L, WBC 8.4 10^9/L,",
            "oxygen saturation 96 % on room air.",
            "Follow-up chest X-ray in 6 weeks.",
        ],
    ),
    (
        "pathology_report",
        &[
            "SURGICAL PATHOLOGY REPORT",
            "Specimen: right breast, lumpectomy",
            "",
            "Tumor size        1.8 cm",
            "Histologic grade  2",
            "Margins           clear, 4 mm",
            "Ki-67             15 %",
            "Estrogen receptor positive (90 %)",
            "HER2              negative (1+)",
            "Lymph nodes       0/3 positive",
        ],
    ),
];

/// The five evaluation documents rendered as images, each with [`EXTRACTION_PROMPT`].
///
/// Deterministic: the same bytes on every machine (embedded font, no randomness).
///
/// # Errors
/// A drawing failure, naming the document.
pub fn evaluation_documents() -> Result<Vec<BenchInput>, InputError> {
    DOCUMENTS
        .iter()
        .map(|(name, lines)| {
            let image = render_page(lines).map_err(|message| InputError::Render {
                name: name.to_string(),
                message,
            })?;
            Ok(BenchInput {
                name: name.to_string(),
                image,
                prompt: EXTRACTION_PROMPT.to_string(),
            })
        })
        .collect()
}

/// Draws `lines` top to bottom on a white [`PAGE`].
fn render_page(lines: &[&str]) -> Result<DynamicImage, String> {
    register_font();
    let (w, h) = PAGE;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, PAGE).into_drawing_area();
        let style = TextStyle::from((FAMILY, FONT_PX).into_font()).color(&BLACK);
        for (i, line) in lines.iter().enumerate() {
            let y = MARGIN_PX + i as i32 * LINE_PX;
            root.draw_text(line, &style, (MARGIN_PX, y))
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    RgbImage::from_raw(w, h, rgb)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| "pixel buffer size mismatch".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_distinct_documents_with_ink_on_them() {
        let docs = evaluation_documents().unwrap();
        assert_eq!(docs.len(), 5);
        let mut names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), 5);
        for d in &docs {
            let rgb = d.image.to_rgb8();
            assert_eq!(rgb.dimensions(), PAGE);
            // Text was drawn: a real share of the page is dark, but most of it is paper.
            let dark = rgb.pixels().filter(|p| p.0[0] < 128).count();
            let share = dark as f64 / (PAGE.0 * PAGE.1) as f64;
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

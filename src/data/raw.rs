//! The raw items a source yields, before rendering and filtering.
//!
//! A source is read as a stream of [`Raw`] items: a document to render, a ready image (VQA
//! datasets), or a row the reader had to reject (with the reason, so it is counted).

use super::document::{Document, Item};
use super::filter::DropReason;

/// One item read from a source.
#[derive(Debug, Clone)]
pub enum Raw {
    /// A document to render.
    Doc(Document),
    /// A sample that already has an image (encoded bytes) and an answer.
    Image {
        id: String,
        doc_type: String,
        image: Vec<u8>,
        prompt: String,
        target: String,
        ground_truth: Vec<Item>,
    },
    /// A row the reader could not turn into an item.
    Rejected { reason: DropReason },
}

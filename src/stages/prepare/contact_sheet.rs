//! `reports/prepare_contact_sheet.png`: a seeded pick of prepared pages as captioned
//! thumbnails, so a person can see at a glance what the model will be trained on.

use std::path::Path;

use anyhow::Context;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::render::{contact_sheet, encode_png};
use crate::data::sample::Sample;
use crate::data::split::Splits;
use crate::fs::write_atomic;

/// Draws `pages` samples of all splits (chosen with `seed`), each captioned with its id, its
/// document type and its first three ground-truth items, and writes the sheet to `path`.
///
/// # Errors
/// A page image that does not read, or the sheet that cannot be encoded or written.
pub(super) fn write_contact_sheet(
    seed: u64,
    pages: usize,
    root: &Path,
    splits: &Splits,
    path: &Path,
) -> anyhow::Result<()> {
    let pool: Vec<&Sample> = splits
        .train
        .iter()
        .chain(&splits.val)
        .chain(&splits.test)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let picked: Vec<&&Sample> = pool.choose_multiple(&mut rng, pages).collect();
    let mut thumbs = Vec::new();
    for s in picked {
        let img =
            image::open(root.join(&s.image)).with_context(|| format!("reading {}", s.image))?;
        thumbs.push((img.to_luma8(), caption(s)));
    }
    let sheet = contact_sheet(&thumbs, 4, 220);
    write_atomic(path, &encode_png(&sheet)?)?;
    Ok(())
}

/// A thumbnail's caption lines: id and document type, then up to three items.
fn caption(s: &Sample) -> Vec<String> {
    let mut caption = vec![format!("{} ({})", s.id, s.doc_type)];
    for it in s.ground_truth.iter().take(3) {
        caption.push(format!("{}: {} {}", it.term, it.value, it.unit));
    }
    // Captions are cut to the thumbnail's width (about 34 characters at 11 px).
    caption
        .into_iter()
        .map(|c| {
            if c.chars().count() > 34 {
                format!("{}…", c.chars().take(33).collect::<String>())
            } else {
                c
            }
        })
        .collect()
}

//! Image-placeholder expansion: each `<|image_pad|>` becomes one token per merged patch
//! block of its image.

use super::error::PromptError;

/// Number of LLM tokens one image occupies: `t·h·w / merge_size²` (each `merge_size²` block of
/// patches is merged into one token by the vision merger).
pub fn image_token_count(grid_thw: [u32; 3], merge_size: u32) -> usize {
    let [t, h, w] = grid_thw.map(|v| v as usize);
    let m = merge_size as usize;
    t * h * w / (m * m)
}

/// Replaces the k-th `image_pad` id with [`image_token_count`]`(grids[k])` copies.
///
/// # Errors
/// [`PromptError::ImageCountMismatch`] when placeholders and grids differ in number.
pub fn expand_image_tokens(
    ids: &[u32],
    grids: &[[u32; 3]],
    image_pad: u32,
    merge_size: u32,
) -> Result<Vec<u32>, PromptError> {
    let placeholders = ids.iter().filter(|&&i| i == image_pad).count();
    if placeholders != grids.len() {
        return Err(PromptError::ImageCountMismatch {
            placeholders,
            images: grids.len(),
        });
    }
    let extra: usize = grids
        .iter()
        .map(|g| image_token_count(*g, merge_size))
        .sum();
    let mut out = Vec::with_capacity(ids.len() + extra);
    let mut image = 0;
    for &id in ids {
        if id == image_pad {
            // In bounds: there is one grid per placeholder (checked above).
            let n = image_token_count(grids[image], merge_size);
            out.extend(std::iter::repeat_n(image_pad, n));
            image += 1;
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

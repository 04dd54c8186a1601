//! Shared helpers for unit tests.

use std::path::PathBuf;

/// The CPU backend every numeric unit test runs on.
#[allow(dead_code)]
pub type TB = burn::backend::NdArray<f32>;

/// Path of a file under `../shared/fixtures/` (relative to the crate root).
#[allow(dead_code)]
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel)
}

/// Asserts two float slices are equal within `atol`, reporting the worst element.
#[allow(dead_code)]
#[track_caller]
pub fn assert_close(label: &str, got: &[f32], want: &[f32], atol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{label}: length {} vs {}",
        got.len(),
        want.len()
    );
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= atol,
        "{label}: max |diff| {worst:e} at index {at} (got {}, want {}) exceeds {atol:e}",
        got[at],
        want[at]
    );
}

//! Shared helpers for unit tests.

use std::path::PathBuf;

/// The CPU backend every numeric unit test runs on.
#[allow(dead_code)]
pub type TB = burn::backend::NdArray<f32>;

/// The fixtures directory: `$MEDPIPE_FIXTURES` when set, else `../shared/fixtures` beside the
/// crate root.
///
/// # Panics
/// When that directory does not exist, naming the path tried and the variable.
#[allow(dead_code)]
#[track_caller]
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("MEDPIPE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixtures directory {} not found: set MEDPIPE_FIXTURES to the directory that holds \
         qwen2_5_vl_tiny/ (default: ../shared/fixtures beside the crate)",
        dir.display()
    );
    dir
}

/// Path of a file under the fixtures directory ([`fixtures_dir`]).
#[allow(dead_code)]
#[track_caller]
pub fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
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

/// The values of the little-endian F32 tensor `key` in `st`.
#[allow(dead_code)]
#[track_caller]
pub fn st_f32s(st: &safetensors::SafeTensors<'_>, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap_or_else(|e| panic!("tensor {key}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The values of the F32 tensor `key` in the fixture safetensors file `rel`.
#[allow(dead_code)]
#[track_caller]
pub fn fixture_f32s(rel: &str, key: &str) -> Vec<f32> {
    let path = fixture(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st_f32s(&st, key)
}

/// Whether the wgpu tests can run: true when wgpu finds an adapter (lavapipe in CI).
///
/// Without one the test is skipped with a message, except under `CI=true`, where a missing
/// adapter fails the run: CI proves the GPU path on every run, it never skips it.
#[allow(dead_code)]
#[track_caller]
pub fn wgpu_available(test: &str) -> bool {
    if !crate::device::wgpu::adapters().is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: CI=true but wgpu finds no adapter (.ci/run installs mesa-vulkan-drivers)");
    }
    eprintln!("SKIPPED {test}: no wgpu adapter (apt-get install mesa-vulkan-drivers)");
    false
}

/// Serializes the tests that seed or draw from burn's backend RNG, which is process-global:
/// the trainer reseeds it before every LoRA dropout draw (`model::dropout`), so a test
/// comparing two runs' dropout masks can fail when a test outside that lock draws in between.
pub fn backend_rng() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};

use super::config::OPENAI_CLIP_MEAN;
use super::*;
use crate::test_util::{assert_close, fixture};
use safetensors::SafeTensors;

/// The fixture image needs no resize and we do the reference's f32 operations in its order:
/// measured max |diff| is 0 (bit-exact); 1e-5 leaves room for FMA contraction on other CPUs.
const PIXEL_ATOL: f32 = 1e-5;

fn reference() -> Vec<u8> {
    std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap()
}

fn tiny_processor() -> ImageProcessor {
    ImageProcessor::from_config_file(fixture("qwen2_5_vl_tiny/preprocessor_config.json")).unwrap()
}

#[test]
fn fixture_image_matches_reference_pixel_values_and_grid() {
    let proc = tiny_processor();
    let out = proc
        .preprocess(&[fixture("qwen2_5_vl_tiny/image0.png").into()])
        .unwrap();
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pv = st.tensor("pixel_values").unwrap();
    assert_eq!(pv.shape(), &[out.num_patches, out.patch_dim]);
    let want: Vec<f32> = pv
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_close("pixel_values", &out.pixel_values, &want, PIXEL_ATOL);
    let grid = st.tensor("image_grid_thw").unwrap();
    let want_grid: Vec<u32> = grid
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    assert_eq!(
        out.grid_thw,
        vec![[want_grid[0], want_grid[1], want_grid[2]]]
    );
}

#[test]
fn two_images_are_concatenated_in_order() {
    let proc = tiny_processor();
    let path = fixture("qwen2_5_vl_tiny/image0.png");
    let one = proc.preprocess(&[path.clone().into()]).unwrap();
    let small = DynamicImage::ImageRgb8(RgbImage::from_pixel(56, 56, image::Rgb([9, 99, 199])));
    let two = proc.preprocess(&[path.into(), small.into()]).unwrap();
    assert_eq!(two.grid_thw, vec![[1, 8, 10], [1, 4, 4]]);
    assert_eq!(two.num_patches, 80 + 16);
    assert_eq!(two.pixel_values.len(), two.num_patches * two.patch_dim);
    assert_eq!(
        &two.pixel_values[..one.pixel_values.len()],
        &one.pixel_values[..]
    );
}

#[test]
fn config_accepts_size_form_and_defaults_match_transformers() {
    let hf: HfPreprocessorConfig =
        serde_json::from_str(r#"{"size": {"shortest_edge": 1000, "longest_edge": 9000}}"#).unwrap();
    let c = hf.resolve(Path::new("p.json")).unwrap();
    assert_eq!((c.min_pixels, c.max_pixels), (1000, 9000));
    let d = HfPreprocessorConfig::default()
        .resolve(Path::new("p.json"))
        .unwrap();
    assert_eq!((d.min_pixels, d.max_pixels), (3136, 1_003_520));
    assert_eq!(
        (d.patch_size, d.temporal_patch_size, d.merge_size),
        (14, 2, 2)
    );
    assert_eq!(d.image_mean, OPENAI_CLIP_MEAN);
    assert!(d.do_resize && d.do_rescale && d.do_normalize && d.do_convert_rgb);
    // min_pixels/max_pixels override `size`, as in the transformers-5 constructor.
    let hf: HfPreprocessorConfig = serde_json::from_str(
        r#"{"min_pixels": 5, "max_pixels": 50, "size": {"shortest_edge": 1, "longest_edge": 2}}"#,
    )
    .unwrap();
    let c = hf.resolve(Path::new("p.json")).unwrap();
    assert_eq!((c.min_pixels, c.max_pixels), (5, 50));
}

#[test]
fn config_with_incomplete_size_or_bad_resample_is_rejected_naming_the_file() {
    let hf: HfPreprocessorConfig =
        serde_json::from_str(r#"{"size": {"shortest_edge": 10}}"#).unwrap();
    let e = hf
        .resolve(Path::new("dir/pp.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dir/pp.json") && e.contains("longest_edge"),
        "{e}"
    );
    let hf: HfPreprocessorConfig = serde_json::from_str(r#"{"resample": 2}"#).unwrap();
    let e = hf
        .resolve(Path::new("dir/pp.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("resample"), "{e}");
}

/// Values derived by hand from the reference formula (factor 28):
/// - 100x150: round(100/28)=4 → 112, round(150/28)=5 → 140; 15680 within [3136, 1003520].
/// - 70x42: 70/28 = 2.5 rounds to even 2 → 56; 42/28 = 1.5 → 2 → 56 (Python ties-to-even).
/// - 1000x2000 with max 50176: beta = sqrt(2e6/50176) = 6.3135…; 1000/β/28 = 5.657 → 5 → 140;
///   2000/β/28 = 11.31 → 11 → 308; 140·308 = 43120 ≤ 50176.
/// - 20x30 with min 3136: round → 28x28 = 784 < 3136; beta = sqrt(3136/600) = 2.2862;
///   20·β/28 = 1.633 → 2 → 56; 30·β/28 = 2.449 → 3 → 84.
#[test]
fn smart_resize_follows_the_reference_rule() {
    assert_eq!(smart_resize(100, 150, 28, 3136, 1_003_520), Ok((112, 140)));
    assert_eq!(smart_resize(70, 42, 28, 3136, 1_003_520), Ok((56, 56)));
    assert_eq!(smart_resize(1000, 2000, 28, 3136, 50176), Ok((140, 308)));
    assert_eq!(smart_resize(20, 30, 28, 3136, 1_003_520), Ok((56, 84)));
    // Already multiples of 28 inside the range: unchanged (the fixture's 112x140).
    assert_eq!(smart_resize(112, 140, 28, 3136, 50176), Ok((112, 140)));
    // A thin strip under max_pixels clamping keeps at least one factor per side.
    assert_eq!(
        smart_resize(30, 5000, 28, 3136, 50176).map(|(h, _)| h),
        Ok(28)
    );
}

#[test]
fn smart_resize_rejects_extreme_aspect_ratio() {
    let e = smart_resize(10, 2001, 28, 3136, 1_003_520).unwrap_err();
    assert_eq!(e, GeometryError::AspectRatio { ratio: 200.1 });
    let img = DynamicImage::ImageRgb8(RgbImage::new(2001, 10));
    let e = tiny_processor().preprocess(&[img.into()]).unwrap_err();
    assert!(
        matches!(e, ProcessorError::Geometry { width: 2001, .. }),
        "{e:?}"
    );
    assert!(smart_resize(10, 2000, 28, 3136, 1_003_520).is_ok());
}

#[test]
fn constant_image_stays_constant_through_resize() {
    let src = RgbImage::from_pixel(45, 33, image::Rgb([7, 128, 250]));
    for (w, h) in [(56, 28), (28, 84), (90, 66), (14, 14)] {
        let out = resize_bicubic(&src, w, h);
        assert!(out.pixels().all(|p| p.0 == [7, 128, 250]), "{w}x{h}");
    }
}

/// Upscaling 2x horizontally: output x sits at source position (x+0.5)/2 - 0.5, and the Keys
/// kernel (a = -0.5) reproduces linear functions exactly away from the borders, so a ramp
/// v = 10 + 4·x becomes 10 + 4·(x/2 - 0.25) = 9 + 2·x.
#[test]
fn linear_ramp_stays_linear_inside_when_upscaling() {
    let src = RgbImage::from_fn(30, 3, |x, _| {
        let v = (10 + 4 * x) as u8;
        image::Rgb([v, v, v])
    });
    let out = resize_bicubic(&src, 60, 3);
    for x in 4..56u32 {
        assert_eq!(out.get_pixel(x, 1)[0], (9 + 2 * x) as u8, "x = {x}");
    }
}

/// An impulse of +180 over 20, upscaled 2x: the four outputs around it see the kernel at
/// distances 0.25, 0.75, 1.25, 1.75, whose Keys(a=-0.5) weights are 0.8671875, 0.2265625,
/// -0.0703125, -0.0234375 (computed by hand), so the outputs are 20 + 180·w rounded:
/// 176, 61, 7, 16.
#[test]
fn impulse_response_matches_hand_computed_bicubic_weights() {
    let src = RgbImage::from_fn(16, 1, |x, _| {
        let v = if x == 8 { 200 } else { 20 };
        image::Rgb([v, v, v])
    });
    let out = resize_bicubic(&src, 32, 1);
    let row: Vec<u8> = (0..32).map(|x| out.get_pixel(x, 0)[0]).collect();
    // Output 16 is at source 7.75 (distance 0.25 from x = 8), output 17 at 8.25.
    assert_eq!(&row[12..22], &[20, 16, 7, 61, 176, 176, 61, 7, 16, 20]);
}

/// Test image used for the Pillow comparison (must match `scripts/pil_bicubic_reference.py`).
fn synthetic(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 11) % 256) as u8,
            ((x * x + 3 * y * y) % 256) as u8,
            (((x ^ y) * 29 + 5) % 256) as u8,
        ])
    })
}

/// `tests/data/pil_bicubic.bin` holds Pillow's `Image.resize(size, Image.BICUBIC)` of
/// [`synthetic`] images, made by `python3 scripts/pil_bicubic_reference.py` (Pillow 12.3).
/// Layout: for each case in order, the raw RGB bytes of the output.
const PIL_CASES: [((u32, u32), (u32, u32)); 5] = [
    ((45, 33), (56, 28)),
    ((100, 75), (84, 56)),
    ((37, 61), (28, 112)),
    ((300, 17), (56, 28)),
    ((60, 60), (56, 28)),
];

/// Tolerance against Pillow: none. The integer algorithm is the same, so every byte must match.
#[test]
fn resize_matches_pillow_bicubic_bit_for_bit() {
    let want = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil_bicubic.bin"),
    )
    .unwrap();
    let mut at = 0;
    for ((iw, ih), (ow, oh)) in PIL_CASES {
        let got = resize_bicubic(&synthetic(iw, ih), ow, oh);
        let n = (ow * oh * 3) as usize;
        let diff = got
            .as_raw()
            .iter()
            .zip(&want[at..at + n])
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{iw}x{ih} -> {ow}x{oh}: {diff} bytes differ from Pillow"
        );
        at += n;
    }
    assert_eq!(at, want.len());
}

#[test]
fn non_multiple_of_28_image_is_resized_to_the_smart_resize_grid() {
    let proc = tiny_processor();
    let img = DynamicImage::ImageRgb8(synthetic(100, 75));
    let out = proc.preprocess(&[img.into()]).unwrap();
    // smart_resize(75, 100): round(75/28)=3 → 84, round(100/28)=4 → 112: grid 6 x 8.
    assert_eq!(out.grid_thw, vec![[1, 6, 8]]);
    assert_eq!(out.num_patches, 48);
    // First value: channel R, top-left pixel of the resized image, normalized.
    let resized = resize_bicubic(&synthetic(100, 75), 112, 84);
    let r = f32::from(resized.get_pixel(0, 0)[0]);
    let want = (r - 0.48145466f32 * 255.0) / (0.26862954f32 * 255.0);
    assert_close("first value", &out.pixel_values[..1], &[want], PIXEL_ATOL);
}

#[test]
fn alpha_is_composited_over_white() {
    let img = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            image::Rgba([0, 0, 0, 0])
        } else {
            image::Rgba([0, 100, 200, 128])
        }
    }));
    let rgb = convert_to_rgb(&img);
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    // (v·128 + 255·127)/255 rounded: 127, 177, 227.
    assert_eq!(rgb.get_pixel(1, 0).0, [127, 177, 227]);
}

#[test]
fn corrupt_png_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.png");
    let good = std::fs::read(fixture("qwen2_5_vl_tiny/image0.png")).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let e = tiny_processor()
        .preprocess(&[path.clone().into()])
        .unwrap_err();
    assert!(matches!(e, ProcessorError::DecodeImage { .. }), "{e:?}");
    assert!(e.to_string().contains("broken.png"), "{e}");
    std::fs::write(&path, b"not an image at all").unwrap();
    let e = tiny_processor().preprocess(&[path.into()]).unwrap_err();
    assert!(e.to_string().contains("broken.png"), "{e}");
    // issue 15: the whole chain says what is wrong once
    let chain = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(chain.matches("Invalid PNG signature").count(), 1, "{chain}");
}

#[test]
fn missing_file_is_an_error_naming_the_file() {
    let e = tiny_processor()
        .preprocess(&[PathBuf::from("/nonexistent/scan.png").into()])
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/scan.png"), "{e}");
}

#[test]
fn huge_image_is_refused_from_its_header_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.png");
    // A real 3000x2000 PNG header; a low limit makes it "absurdly large" without a huge file.
    RgbImage::new(3000, 2000).save(&path).unwrap();
    let proc = tiny_processor().with_max_input_pixels(5_000_000);
    let e = proc.preprocess(&[path.into()]).unwrap_err();
    match &e {
        ProcessorError::ImageTooLarge { width, height, .. } => {
            assert_eq!((*width, *height), (3000, 2000))
        }
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    assert!(e.to_string().contains("huge.png"), "{e}");
}

#[test]
fn huge_header_with_tiny_body_is_refused_not_decoded() {
    // A PNG whose IHDR claims 100000x100000 but has no data: the default limit (Pillow's
    // 89.5 Mpx) refuses it from the header alone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // An empty IDAT and IEND, so that reading the header finds the start of the pixel data.
    for name in [b"IDAT", b"IEND"] {
        png.extend_from_slice(&0u32.to_be_bytes());
        png.extend_from_slice(name);
        png.extend_from_slice(&crc32(name).to_be_bytes());
    }
    std::fs::write(&path, &png).unwrap();
    let e = tiny_processor().preprocess(&[path.into()]).unwrap_err();
    assert!(matches!(e, ProcessorError::ImageTooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains("bomb.png"), "{e}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG file of `img` with an `eXIf` chunk (big-endian TIFF, one IFD entry: Orientation).
fn png_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut plain = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut plain),
        image::ImageFormat::Png,
    )
    .unwrap();
    let mut exif = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01".to_vec();
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut chunk = b"eXIf".to_vec();
    chunk.extend_from_slice(&exif);
    // Signature (8) + IHDR chunk (4 + 4 + 13 + 4) come first; eXIf goes right after.
    let mut out = plain[..33].to_vec();
    out.extend_from_slice(&(exif.len() as u32).to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    out.extend_from_slice(&plain[33..]);
    out
}

#[test]
fn exif_orientation_is_applied_when_loading_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rotated.png");
    // 3 wide, 2 high; orientation 6 means "rotate 90° clockwise to display".
    let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(x * 10 + y) as u8, 0, 0]));
    std::fs::write(&path, png_with_orientation(&img, 6)).unwrap();
    let loaded = tiny_processor().load_image(&path).unwrap().to_rgb8();
    assert_eq!(loaded.dimensions(), (2, 3));
    // After a clockwise turn the old bottom-left pixel (0, 1) is at the top-left.
    assert_eq!(loaded.get_pixel(0, 0)[0], 1);
    assert_eq!(loaded.get_pixel(1, 0)[0], 0);
    assert_eq!(loaded.get_pixel(0, 2)[0], 21);
}

#[test]
fn unreadable_or_malformed_config_is_an_error_naming_the_file() {
    let e = ImageProcessor::from_config_file("/nonexistent/preprocessor_config.json").unwrap_err();
    assert!(matches!(e, ProcessorError::ReadConfig { .. }), "{e:?}");
    assert!(e
        .to_string()
        .contains("/nonexistent/preprocessor_config.json"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    std::fs::write(&path, r#"{"patch_size": "fourteen"}"#).unwrap();
    let e = ImageProcessor::from_config_file(&path).unwrap_err();
    assert!(matches!(e, ProcessorError::ParseConfig { .. }), "{e:?}");
    assert!(e.to_string().contains("preprocessor_config.json"), "{e}");
}

#[test]
fn without_resize_a_size_off_the_patch_grid_is_an_error() {
    let mut config = tiny_processor().config().clone();
    config.do_resize = false;
    let img = DynamicImage::ImageRgb8(synthetic(100, 75));
    let e = ImageProcessor::new(config)
        .preprocess(&[img.into()])
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProcessorError::Geometry {
                width: 100,
                height: 75,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn empty_image_list_is_an_error() {
    assert!(matches!(
        tiny_processor().preprocess(&[]),
        Err(ProcessorError::NoImages)
    ));
}

#[test]
fn an_upload_in_memory_is_processed_exactly_as_the_same_file_and_refused_the_same_way() {
    let path = fixture("qwen2_5_vl_tiny/image0.png");
    let bytes = std::fs::read(&path).unwrap();
    let proc = tiny_processor();
    let from_file = proc.preprocess(&[path.into()]).unwrap();
    let upload = ImageInput::Encoded {
        name: "scan.png".into(),
        bytes: bytes.clone(),
    };
    assert_eq!(proc.preprocess(&[upload]).unwrap(), from_file);

    let junk = ImageInput::Encoded {
        name: "notes.txt".into(),
        bytes: b"hello".to_vec(),
    };
    let e = proc.preprocess(&[junk]).unwrap_err();
    assert!(matches!(e, ProcessorError::DecodeImage { .. }), "{e:?}");
    assert!(e.to_string().contains("notes.txt"), "{e}");

    let small_limit = tiny_processor().with_max_input_pixels(100);
    let e = small_limit
        .preprocess(&[ImageInput::Encoded {
            name: "scan.png".into(),
            bytes,
        }])
        .unwrap_err();
    assert!(matches!(e, ProcessorError::ImageTooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains("scan.png"), "{e}");
}

#[test]
fn pixel_bounds_override_the_config_and_shrink_or_grow_every_image() {
    let img = || DynamicImage::ImageRgb8(synthetic(448, 448));
    let default = tiny_processor().preprocess(&[img().into()]).unwrap();
    // The fixture's max_pixels (50176) makes 448² a 224² image: 16x16 patches of 14 px.
    assert_eq!(default.grid_thw, vec![[1, 16, 16]]);
    // A lower max_pixels shrinks it further: 112².
    let capped = tiny_processor()
        .with_pixel_bounds(None, Some(112 * 112))
        .unwrap()
        .preprocess(&[img().into()])
        .unwrap();
    assert_eq!(capped.grid_thw, vec![[1, 8, 8]]);
    // A higher min_pixels grows a small one.
    let small = DynamicImage::ImageRgb8(synthetic(56, 56));
    let grown = tiny_processor()
        .with_pixel_bounds(Some(112 * 112), None)
        .unwrap()
        .preprocess(&[small.into()])
        .unwrap();
    assert_eq!(grown.grid_thw, vec![[1, 8, 8]]);
    // Bounds that cross are refused with both figures.
    let e = tiny_processor()
        .with_pixel_bounds(Some(90_000), Some(80_000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("90000") && e.contains("80000"), "{e}");
}

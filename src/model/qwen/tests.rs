use super::*;
use crate::model::generate::{GenerateConfig, Request, Sampling};
use crate::test_util::{assert_close, fixture, fixture_f32s, st_f32s, TB};

/// Torch on CPU lands within 2e-6 of the reference logits (fixtures README); 1e-4
/// leaves room for a different summation order in f32 matmuls.
const LOGITS_ATOL: f32 = 1e-4;
/// Image embeds are ~25x smaller than logits (mean |x| 0.02 vs 0.5), so the logits bar
/// scales to ~4e-6; 1e-5 still leaves ~400x headroom over the measured 2.7e-8, and
/// catches window attention replaced by full attention (1.8e-4).
const EMBEDS_ATOL: f32 = 1e-5;
/// Cached vs uncached decoding differ only in summation order.
const CACHE_ATOL: f32 = 1e-4;

pub(crate) struct Reference {
    pub input_ids: Vec<u32>,
    pub grid: [usize; 3],
    pub pixel_values: Vec<f32>,
    pub pixel_shape: [usize; 2],
    pub image_embeds: Vec<f32>,
    pub logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

pub(crate) fn reference() -> Reference {
    let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |k: &str| st_f32s(&st, k);
    let i64s = |k: &str| -> Vec<i64> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let g = i64s("image_grid_thw");
    let ps = st.tensor("pixel_values").unwrap().shape().to_vec();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2_5_vl_tiny/reference.json")).unwrap(),
    )
    .unwrap();
    Reference {
        input_ids: i64s("input_ids").into_iter().map(|x| x as u32).collect(),
        grid: [g[0] as usize, g[1] as usize, g[2] as usize],
        pixel_values: f32s("pixel_values"),
        pixel_shape: [ps[0], ps[1]],
        image_embeds: f32s("image_embeds"),
        logits: f32s("logits"),
        greedy: json["greedy_new_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect(),
    }
}

pub(crate) fn tiny() -> Qwen25Vl<TB> {
    Qwen25Vl::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap()
}

/// The reference image as model input, on any backend.
pub(crate) fn image<B: Kernels>(r: &Reference) -> ImageInput<B> {
    image_on(r, &Default::default())
}

/// The reference image as model input, on `device`.
pub(crate) fn image_on<B: Kernels>(r: &Reference, device: &B::Device) -> ImageInput<B> {
    ImageInput {
        pixel_values: Tensor::from_data(
            TensorData::new(r.pixel_values.clone(), r.pixel_shape),
            device,
        ),
        grids: vec![r.grid],
    }
}

fn floats<const D: usize>(t: Tensor<TB, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn vision_tower_reproduces_reference_image_embeds() {
    let (m, r) = (tiny(), reference());
    let e = m.image_embeds(&image(&r)).unwrap();
    assert_eq!(e.dims(), [20, 64]);
    assert_close("image_embeds", &floats(e), &r.image_embeds, EMBEDS_ATOL);
}

#[test]
fn full_forward_reproduces_reference_logits() {
    let (m, r) = (tiny(), reference());
    let out = m
        .forward(
            std::slice::from_ref(&r.input_ids),
            None,
            Some(&image(&r)),
            &Default::default(),
        )
        .unwrap();
    assert_eq!(out.logits.dims(), [1, 48, 2048]);
    assert_close("logits", &floats(out.logits), &r.logits, LOGITS_ATOL);
}

#[test]
fn right_padded_batch_forward_matches_each_row_alone() {
    let (m, r) = (tiny(), reference());
    let dev = Default::default();
    let text: Vec<u32> = vec![1990, 11, 12, 13, 100, 101, 102, 103, 104, 105];
    let alone = floats(
        m.forward(std::slice::from_ref(&text), None, None, &dev)
            .unwrap()
            .logits,
    );
    let n = r.input_ids.len();
    let mut padded = text.clone();
    padded.resize(n, 0);
    let mut mask = vec![true; text.len()];
    mask.resize(n, false);
    let out = m
        .forward(
            &[r.input_ids.clone(), padded],
            Some(&[vec![true; n], mask]),
            Some(&image(&r)),
            &dev,
        )
        .unwrap();
    let all = floats(out.logits);
    let v = 2048;
    assert_close("image row", &all[..n * v], &r.logits, LOGITS_ATOL);
    assert_close(
        "text row",
        &all[n * v..(n + text.len()) * v],
        &alone,
        LOGITS_ATOL,
    );
}

#[test]
fn greedy_generation_with_kv_cache_yields_the_reference_tokens() {
    greedy_tokens_are_the_reference::<TB>();
}

/// The model on wgpu (fusion, CubeCL; lavapipe in CI): the reference's 16 greedy tokens,
/// and a batch gives each prompt its solo tokens.
#[test]
fn on_wgpu_greedy_tokens_are_the_reference_and_batching_changes_nothing() {
    if crate::test_util::wgpu_available(
        "on_wgpu_greedy_tokens_are_the_reference_and_batching_changes_nothing",
    ) {
        greedy_tokens_are_the_reference::<burn::backend::Wgpu>();
        batched_equals_alone::<burn::backend::Wgpu>();
    }
}

/// Work with a tensor over the adapter's largest buffer (lavapipe: 128 MiB) is refused
/// before it runs, naming the tensor: wgpu would fail the allocation on its own thread and
/// the model would compute on garbage (a 3,000-token prompt gave logits 4.6 away from the
/// CPU's, with no error).
#[test]
fn on_wgpu_work_over_the_largest_buffer_is_refused_naming_the_tensor() {
    type W = burn::backend::Wgpu;
    if !crate::test_util::wgpu_available(
        "on_wgpu_work_over_the_largest_buffer_is_refused_naming_the_tensor",
    ) {
        return;
    }
    let dev = Default::default();
    let limit = W::max_buffer_bytes(&dev).expect("wgpu caps its buffers");
    let m = Qwen25Vl::<W>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
    let cfg = m.config().clone();
    let refusal = |e: ModelError| match e {
        ModelError::WorkTooLargeForDevice {
            what,
            bytes,
            limit: l,
        } => {
            assert!(bytes > l && l == limit, "{bytes} vs {l}");
            what
        }
        other => panic!("not refused for its size: {other}"),
    };

    // Text: f32 scores [1, heads, s, s] just over the limit.
    let heads = cfg.text.num_heads;
    let s = ((limit / (4 * heads as u64)) as f64).sqrt() as usize + 1;
    let e = m.forward(&[vec![10; s]], None, None, &dev).unwrap_err();
    assert_eq!(
        refusal(e),
        format!("the attention scores [1, {heads}, {s}, {s}] (f32)")
    );
    let e = m.generate(
        &[Request {
            input_ids: vec![10; s],
            images: None,
        }],
        &GenerateConfig {
            max_new_tokens: 1,
            sampling: Sampling::Greedy,
            seed: 0,
            eos_token_ids: None,
        },
        &dev,
    );
    assert!(refusal(e.unwrap_err()).starts_with("the attention scores"));

    // Vision: one frame whose full-attention scores [1, heads, n, n] pass the limit.
    let v = &cfg.vision;
    let side = (((limit / (4 * v.num_heads as u64)) as f64).sqrt().sqrt() as usize + 2) & !1;
    let n = side * side;
    let grids = vec![[1, side, side]];
    let img = ImageInput::<W> {
        pixel_values: Tensor::zeros([n, v.patch_dim()], &dev),
        grids,
    };
    let ids = [
        vec![cfg.tokens.vision_start_token_id],
        vec![cfg.tokens.image_token_id; n / v.merge_unit()],
        vec![10],
    ]
    .concat();
    let e = m.forward(&[ids], None, Some(&img), &dev).unwrap_err();
    let what = refusal(e);
    assert!(
        what.starts_with("the vision attention scores [1, "),
        "{what}"
    );
    assert!(
        what.ends_with(&format!(", {n}, {n}] (f32, per frame)")),
        "{what}"
    );
}

fn greedy_tokens_are_the_reference<B: Kernels>() {
    let r = reference();
    let m = Qwen25Vl::<B>::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap();
    // The reference forced 16 tokens (min_new_tokens = 16): no eos stop.
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        seed: 0,
        eos_token_ids: Some(vec![]),
    };
    let req = Request {
        input_ids: r.input_ids.clone(),
        images: Some(image(&r)),
    };
    let g = m.generate(&[req], &cfg, &Default::default()).unwrap();
    assert_eq!(g[0].tokens, r.greedy);
    assert!(!g[0].stopped_on_eos);
    assert_eq!(g[0].prompt_tokens, 48);
}

#[test]
fn generation_stops_on_an_eos_id() {
    let (m, r) = (tiny(), reference());
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        eos_token_ids: Some(vec![r.greedy[1]]),
        ..GenerateConfig::default()
    };
    let req = Request {
        input_ids: r.input_ids.clone(),
        images: Some(image(&r)),
    };
    let g = m.generate(&[req], &cfg, &Default::default()).unwrap();
    assert_eq!(g[0].tokens, r.greedy[..2].to_vec());
    assert!(g[0].stopped_on_eos);
}

#[test]
fn cached_step_by_step_logits_equal_full_sequence_logits() {
    let (m, r) = (tiny(), reference());
    let dev = Default::default();
    // prompt + 4 greedy tokens, forwarded at once vs. prefill + 4 cached steps
    let mut ids = r.input_ids.clone();
    ids.extend_from_slice(&r.greedy[..4]);
    let full = m
        .forward(&[ids.clone()], None, Some(&image(&r)), &dev)
        .unwrap();
    let full = floats(full.logits);
    let n = r.input_ids.len();
    let v = 2048;
    let mut caches = m.new_caches(1, ids.len(), &dev);
    let pre = m
        .prefill(
            std::slice::from_ref(&r.input_ids),
            &[vec![true; n]],
            Some(&image(&r)),
            Some(&mut caches),
            &dev,
        )
        .unwrap();
    let pre_logits = floats(m.logits(pre.hidden));
    assert_close("prefill", &pre_logits, &full[..n * v], CACHE_ATOL);
    let mut keys = vec![vec![true; n]];
    for (s, &tok) in r.greedy[..4].iter().enumerate() {
        keys[0].push(true);
        let pos = (n + s) as i64 + pre.positions.deltas[0];
        let h = m.step(&[tok], &[pos], &keys, &mut caches, &dev).unwrap();
        let got = floats(m.logits(h));
        let at = (n + s) * v;
        assert_close(&format!("step {s}"), &got, &full[at..at + v], CACHE_ATOL);
    }
}

#[test]
fn batched_generation_gives_each_prompt_its_solo_tokens() {
    batched_equals_alone::<TB>();
}

fn batched_equals_alone<B: Kernels>() {
    let r = reference();
    let dev = Default::default();
    let m = Qwen25Vl::<B>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 6,
        eos_token_ids: Some(vec![]),
        ..GenerateConfig::default()
    };
    let with_image = Request {
        input_ids: r.input_ids.clone(),
        images: Some(image(&r)),
    };
    // Shorter text prompt: the text row is left-padded.
    let short = Request::<B> {
        input_ids: vec![1990, 11, 12, 13, 100, 101, 102],
        images: None,
    };
    // Longer text prompt: the image row is left-padded.
    let long = Request::<B> {
        input_ids: (0..60).map(|i| 100 + i).collect(),
        images: None,
    };
    let solo_img = m
        .generate(std::slice::from_ref(&with_image), &cfg, &dev)
        .unwrap();
    assert_eq!(solo_img[0].tokens, r.greedy[..6].to_vec());
    for text in [short, long] {
        let solo = m.generate(std::slice::from_ref(&text), &cfg, &dev).unwrap();
        let both = m.generate(&[text, with_image.clone()], &cfg, &dev).unwrap();
        assert_eq!(both[0].tokens, solo[0].tokens);
        assert_eq!(both[1].tokens, solo_img[0].tokens);
        assert_eq!(both[0].batch_size, 2);
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_batch_invariant() {
    let m = tiny();
    let dev = Default::default();
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        sampling: Sampling::Sample {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
        },
        seed: 7,
        eos_token_ids: Some(vec![]),
    };
    let a = Request::<TB> {
        input_ids: vec![1990, 11, 12, 13],
        images: None,
    };
    let b = Request::<TB> {
        input_ids: vec![1990, 11, 12, 13, 100, 101],
        images: None,
    };
    let one = m.generate(std::slice::from_ref(&a), &cfg, &dev).unwrap();
    let again = m.generate(std::slice::from_ref(&a), &cfg, &dev).unwrap();
    let batch = m.generate(&[a, b], &cfg, &dev).unwrap();
    assert_eq!(one[0].tokens, again[0].tokens);
    assert_eq!(one[0].tokens, batch[0].tokens);
    let greedy = m
        .generate(
            &[Request::<TB> {
                input_ids: vec![1990, 11, 12, 13],
                images: None,
            }],
            &GenerateConfig {
                max_new_tokens: 8,
                eos_token_ids: Some(vec![]),
                ..GenerateConfig::default()
            },
            &dev,
        )
        .unwrap();
    // temperature 1.5 over 2048 tokens: 8 draws equal to the argmax would be a bug
    assert_ne!(one[0].tokens, greedy[0].tokens);
}

#[test]
fn image_tokens_without_matching_features_are_rejected_with_counts() {
    let (m, r) = (tiny(), reference());
    let mut ids = r.input_ids.clone();
    ids.retain(|&t| t != 1996);
    ids.insert(5, 1996);
    let e = m
        .forward(&[ids], None, Some(&image(&r)), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 image tokens, 20 features"), "{e}");
}

#[test]
fn loading_a_checkpoint_with_a_missing_tensor_fails_naming_it() {
    let dir = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
        m.remove("visual.blocks.2.attn.qkv.bias");
    });
    let e = Qwen25Vl::<TB>::load(dir.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing tensor `visual.blocks.2.attn.qkv.bias` (expected shape [96])"),
        "{e}"
    );
}

#[test]
fn module_parameters_equal_the_config_parameter_count() {
    use burn::module::Module;
    let m = tiny();
    assert_eq!(m.num_params() as u64, m.config().parameter_count());
}

#[test]
fn tied_checkpoint_without_lm_head_reuses_the_embedding_matrix() {
    let dev = Default::default();
    let r = reference();
    let set_tied = |dir: &std::path::Path| {
        let p = dir.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["tie_word_embeddings"] = true.into();
        std::fs::write(&p, c.to_string()).unwrap();
    };
    // Untied model whose lm_head is a copy of embed_tokens: the reference for "tied".
    let copy = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
        let e = m["model.embed_tokens.weight"].clone();
        m.insert("lm_head.weight".into(), e);
    });
    let tied = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
        m.remove("lm_head.weight");
    });
    set_tied(tied.path());
    let a = Qwen25Vl::<TB>::load(copy.path(), &dev).unwrap();
    let b = Qwen25Vl::<TB>::load(tied.path(), &dev).unwrap();
    assert!(b.config().text.tie_word_embeddings);
    let ids = std::slice::from_ref(&r.input_ids);
    let la = floats(a.forward(ids, None, Some(&image(&r)), &dev).unwrap().logits);
    let lb = floats(b.forward(ids, None, Some(&image(&r)), &dev).unwrap().logits);
    assert_close("tied vs copied lm_head", &lb, &la, CACHE_ATOL);
    // and an untied config without lm_head is a missing tensor
    let untied = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
        m.remove("lm_head.weight");
    });
    let e = Qwen25Vl::<TB>::load(untied.path(), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing tensor `lm_head.weight`"), "{e}");
}

#[test]
fn two_images_in_one_call_attend_only_within_themselves() {
    let (m, r) = (tiny(), reference());
    let one = image(&r);
    let two = ImageInput {
        pixel_values: Tensor::cat(vec![one.pixel_values.clone(), one.pixel_values.clone()], 0),
        grids: vec![r.grid, r.grid],
    };
    let e = floats(m.image_embeds(&two).unwrap());
    assert_eq!(e.len(), 2 * r.image_embeds.len());
    let (a, b) = e.split_at(r.image_embeds.len());
    assert_close("first image", a, &r.image_embeds, EMBEDS_ATOL);
    assert_close("second image", b, &r.image_embeds, EMBEDS_ATOL);
}

#[test]
fn pixel_values_that_do_not_match_the_grid_are_rejected() {
    let (m, r) = (tiny(), reference());
    let mut img = image(&r);
    img.grids = vec![[1, 8, 12]];
    let e = m.image_embeds(&img).unwrap_err().to_string();
    assert!(
        e.contains("pixel_values") && e.contains("[80, 1176]") && e.contains("[96, 1176]"),
        "{e}"
    );
}

#[test]
fn batched_image_prompts_of_different_lengths_match_their_solo_runs() {
    let (m, r) = (tiny(), reference());
    let dev = Default::default();
    let cfg = GenerateConfig {
        max_new_tokens: 5,
        eos_token_ids: Some(vec![]),
        ..GenerateConfig::default()
    };
    let full = Request {
        input_ids: r.input_ids.clone(),
        images: Some(image(&r)),
    };
    // same image, 12 fewer trailing text tokens
    let short = Request {
        input_ids: r.input_ids[..r.input_ids.len() - 12].to_vec(),
        images: Some(image(&r)),
    };
    let solo_full = m.generate(std::slice::from_ref(&full), &cfg, &dev).unwrap();
    let solo_short = m
        .generate(std::slice::from_ref(&short), &cfg, &dev)
        .unwrap();
    let both = m.generate(&[short, full], &cfg, &dev).unwrap();
    assert_eq!(both[0].tokens, solo_short[0].tokens);
    assert_eq!(both[1].tokens, solo_full[0].tokens);
}

#[test]
fn every_parameter_gets_a_gradient_under_autodiff() {
    use burn::optim::GradientsParams;
    type AD = burn::backend::Autodiff<TB>;
    let r = reference();
    let dev = Default::default();
    let m = Qwen25Vl::<AD>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
    let img = image::<AD>(&r);
    let out = m
        .forward(std::slice::from_ref(&r.input_ids), None, Some(&img), &dev)
        .unwrap();
    let grads = out.logits.powi_scalar(2).mean().backward();
    let gp = GradientsParams::from_grads(grads, &m);
    let manifest = crate::model::weights::manifest::expected_tensors(m.config()).len();
    assert_eq!(gp.len(), manifest);
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_input_error() {
    let m = tiny();
    let e = m
        .forward(&[vec![1, 2, 5000]], None, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 5000") && e.contains("2048"), "{e}");
}

fn nf4_reference_logits() -> Vec<f32> {
    fixture_f32s("qwen2_5_vl_tiny/nf4/reference.safetensors", "logits")
}

fn nf4_logits(dir: &Path) -> Vec<f32> {
    let r = reference();
    let dev = Default::default();
    let m = Qwen25Vl::<TB>::load(dir, &dev).unwrap();
    let out = m
        .forward(
            std::slice::from_ref(&r.input_ids),
            None,
            Some(&image(&r)),
            &dev,
        )
        .unwrap();
    floats(out.logits)
}

#[test]
fn nf4_checkpoint_reproduces_the_bitsandbytes_reference_logits() {
    let got = nf4_logits(&fixture("qwen2_5_vl_tiny/nf4"));
    let want = nf4_reference_logits();
    assert_eq!(got.len(), want.len());
    assert_close("nf4 logits", &got, &want, LOGITS_ATOL);
    // and they are not the dense model's: quantization changed the weights
    let dense = reference().logits;
    let moved = got
        .iter()
        .zip(&dense)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 10.0 * LOGITS_ATOL,
        "NF4 logits equal the dense ones ({moved})"
    );
}

#[test]
fn a_checkpoint_quantized_by_medpipe_gives_the_fixture_nf4_logits_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nf4");
    crate::quant::quantize_checkpoint(
        &fixture("qwen2_5_vl_tiny"),
        &out,
        &crate::quant::QuantizeOptions::default(),
    )
    .unwrap();
    // Same codes and scales bit for bit, same computation: equal floats.
    assert_eq!(
        nf4_logits(&out),
        nf4_logits(&fixture("qwen2_5_vl_tiny/nf4"))
    );
}

#[test]
fn greedy_generation_runs_on_the_nf4_model() {
    let r = reference();
    let dev = Default::default();
    let m = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        eos_token_ids: Some(vec![]),
        ..GenerateConfig::default()
    };
    let req = Request {
        input_ids: r.input_ids.clone(),
        images: Some(image(&r)),
    };
    let out = m.generate(std::slice::from_ref(&req), &cfg, &dev).unwrap();
    assert_eq!(out[0].tokens.len(), 8);
    // The first new token is the argmax of the reference NF4 logits at the last position.
    let want = nf4_reference_logits();
    let vocab = m.config().text.vocab_size;
    let last = &want[want.len() - vocab..];
    let argmax = (0..vocab)
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap() as u32;
    assert_eq!(out[0].tokens[0], argmax);
}

#[test]
fn the_nf4_model_holds_fewer_parameters_and_bytes_than_the_dense_one() {
    use burn::module::Module;
    let dev = Default::default();
    let dense = tiny();
    let nf4 = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
    // Quantized weights are constants; what stays a parameter is embeddings, norms,
    // biases, the patch conv and the skipped lm_head.
    assert!(nf4.num_params() < dense.num_params());
    assert!(nf4.linear_bytes() < dense.linear_bytes());
    // Decoder projections, all quantized: f32 is 4 bytes per weight; NF4 codes (eight
    // per backend int word, 1 byte per weight with NdArray's i64) plus one f32 scale per
    // 64 weights and the f32 biases stay under 4/3 bytes per weight.
    let (d, q) = (dense.model.linear_bytes(), nf4.model.linear_bytes());
    assert!(q * 3 < d, "nf4 {q} B vs dense {d} B");
    // lm_head is skipped: the only dense Linear left
    assert!(!nf4.lm_head.as_ref().unwrap().is_nf4());
}

#[test]
fn issue_15_resident_weight_bytes_count_every_tensor_and_show_the_nf4_saving() {
    use burn::module::Module;
    let dev = Default::default();
    let dense = tiny();
    let nf4 = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &dev).unwrap();
    // dense f32: every parameter, 4 bytes each, counted once
    assert_eq!(dense.resident_weight_bytes(), dense.num_params() as u64 * 4);
    // NF4: the packed projections plus the dense rest (embeddings, norms, conv, lm_head)
    let rest = nf4.resident_weight_bytes() - nf4.linear_bytes();
    assert!(rest > 0);
    assert!(
        nf4.resident_weight_bytes() < dense.resident_weight_bytes(),
        "nf4 {} B vs dense {} B",
        nf4.resident_weight_bytes(),
        dense.resident_weight_bytes()
    );
}

/// The fixture with every f32 tensor rounded to bf16, stored as bf16 (`as_bf16`) or as the
/// same values in f32; `tied`: without `lm_head`, tied to the embeddings.
fn bf16_rounded_checkpoint(as_bf16: bool, tied: bool) -> tempfile::TempDir {
    use safetensors::Dtype;
    let dir = crate::model::weights::source::tests::rewritten_checkpoint(|m| {
        if tied {
            m.remove("lm_head.weight");
        }
        for (dtype, _, bytes) in m.values_mut() {
            if *dtype != Dtype::F32 {
                continue;
            }
            let rounded: Vec<half::bf16> = bytes
                .chunks_exact(4)
                .map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())))
                .collect();
            *bytes = if as_bf16 {
                rounded.iter().flat_map(|b| b.to_le_bytes()).collect()
            } else {
                rounded
                    .iter()
                    .flat_map(|b| b.to_f32().to_le_bytes())
                    .collect()
            };
            if as_bf16 {
                *dtype = Dtype::BF16;
            }
        }
    });
    if tied {
        let p = dir.path().join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["tie_word_embeddings"] = true.into();
        std::fs::write(&p, c.to_string()).unwrap();
    }
    dir
}

/// The logits of the reference prompt (with its image).
fn reference_logits(m: &Qwen25Vl<TB>) -> Vec<f32> {
    let r = reference();
    let ids = std::slice::from_ref(&r.input_ids);
    let out = m.forward(ids, None, Some(&image(&r)), &Default::default());
    floats(out.unwrap().logits)
}

/// Issue 19: a bf16 checkpoint on the CPU keeps its projection weights in bf16, read in
/// place from the file, at half the bytes of f32, and computes exactly what the f32 model
/// with the same (bf16-exact) values computes.
#[test]
fn a_bf16_checkpoint_on_the_cpu_keeps_bf16_projections_and_gives_the_f32_logits_exactly() {
    let (bf16_dir, f32_dir) = (
        bf16_rounded_checkpoint(true, false),
        bf16_rounded_checkpoint(false, false),
    );
    let dev = Default::default();
    let half = Qwen25Vl::<TB>::load(bf16_dir.path(), &dev).unwrap();
    let full = Qwen25Vl::<TB>::load(f32_dir.path(), &dev).unwrap();
    let (h, f) = (half.model.linear_bytes(), full.model.linear_bytes());
    // Decoder projections: 2 bytes per weight instead of 4 (biases stay f32).
    assert!(h * 10 < f * 6, "bf16 {h} B vs f32 {f} B");
    assert!(half.linear_bytes() < full.linear_bytes());

    assert_eq!(reference_logits(&half), reference_logits(&full));
    let r = reference();
    for (site, p) in half.model.targets() {
        assert!(p.reads_in_place(), "{site:?}: bf16 bits copied");
    }
    assert!(half.model.embeds_in_bf16() && !full.model.embeds_in_bf16());
    // Decode rows (the GEMV) too: the image prompt's greedy tokens agree.
    let gen = |m: &Qwen25Vl<TB>| {
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            eos_token_ids: Some(vec![]),
            ..GenerateConfig::default()
        };
        let req = Request {
            input_ids: r.input_ids.clone(),
            images: Some(image(&r)),
        };
        m.generate(&[req], &cfg, &Default::default()).unwrap()[0]
            .tokens
            .clone()
    };
    assert_eq!(gen(&half), gen(&full));
}

/// Issue 19: on the CPU an NF4 checkpoint's codes are read in place from the file, like a
/// dense checkpoint's f32 weights: the model holds only the (f32) block scales.
#[test]
fn an_nf4_checkpoint_on_the_cpu_reads_its_codes_from_the_file() {
    let nf4 = Qwen25Vl::<TB>::load(&fixture("qwen2_5_vl_tiny/nf4"), &Default::default()).unwrap();
    let targets = nf4.model.targets();
    assert!(!targets.is_empty());
    for (site, p) in targets {
        assert!(
            p.is_nf4() && p.reads_in_place(),
            "{site:?}: NF4 codes copied"
        );
    }
    let dense = tiny();
    for (site, p) in dense.model.targets() {
        assert!(p.reads_in_place(), "{site:?}: f32 weight copied");
    }
}

/// A tied bf16 checkpoint computes its logits through the bf16 embedding table.
#[test]
fn a_tied_bf16_checkpoint_on_the_cpu_gives_the_f32_logits() {
    let dev = Default::default();
    let (h, f) = (
        bf16_rounded_checkpoint(true, true),
        bf16_rounded_checkpoint(false, true),
    );
    let half = Qwen25Vl::<TB>::load(h.path(), &dev).unwrap();
    let full = Qwen25Vl::<TB>::load(f.path(), &dev).unwrap();
    assert!(half.config().text.tie_word_embeddings && half.model.embeds_in_bf16());
    // burn's matmul against the host GEMM: f32 summation order only.
    let (lh, lf) = (reference_logits(&half), reference_logits(&full));
    assert_close("tied bf16 vs f32 logits", &lh, &lf, CACHE_ATOL);
}

/// A tensor larger than the device's largest buffer is refused before any upload, naming
/// it, its bytes in the compute dtype and the limit (wgpu would leave it as zeros).
#[test]
fn a_tensor_over_the_devices_buffer_limit_is_refused_before_loading() {
    use burn::tensor::DType;
    let src = WeightSource::open(&fixture("qwen2_5_vl_tiny")).unwrap();
    let (key, f32_bytes) = src.largest_on_device(4).unwrap();
    assert_eq!(
        src.largest_on_device(2).unwrap(),
        (key.clone(), f32_bytes / 2)
    );
    check_buffer_limit(&src, DType::F32, f32_bytes).unwrap();
    check_buffer_limit(&src, DType::F16, f32_bytes / 2).unwrap();
    let err = check_buffer_limit(&src, DType::F32, f32_bytes - 1)
        .unwrap_err()
        .to_string();
    for want in [
        format!("tensor `{key}` takes {f32_bytes} bytes on this device (f32)"),
        format!("largest buffer it allows ({} bytes)", f32_bytes - 1),
    ] {
        assert!(err.contains(&want), "{want:?} missing from {err}");
    }
    // The CPU has no such limit; wgpu reports its adapter's (lavapipe in CI).
    assert_eq!(<TB as Kernels>::max_buffer_bytes(&Default::default()), None);
    if crate::test_util::wgpu_available(
        "a_tensor_over_the_devices_buffer_limit_is_refused_before_loading",
    ) {
        let dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
        let limit = <crate::device::dispatch::WgpuBackend as Kernels>::max_buffer_bytes(&dev);
        assert!(limit.is_some_and(|l| l >= 64 << 20), "{limit:?}");
    }
}

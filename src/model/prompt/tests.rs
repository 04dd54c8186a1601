use std::path::Path;

use serde::Deserialize;

use super::*;
use crate::test_util::fixture;
use safetensors::SafeTensors;

/// The chat template of Qwen/Qwen2.5-VL-7B-Instruct (`chat_template.json`), verbatim.
const QWEN25_VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const SPECIALS: [&str; 7] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// A byte-level BPE tokenizer with no merges (one token per byte, ids 0..256) plus the Qwen
/// special tokens at ids 256.. in `SPECIALS` order, written as `tokenizer.json` in `dir`.
fn write_tokenizer(dir: &Path) {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

fn id(token: &str) -> u32 {
    256 + SPECIALS.iter().position(|t| *t == token).unwrap() as u32
}

/// A model dir with the test tokenizer and a config.json giving the vision ids.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let config = serde_json::json!({
        "image_token_id": id("<|image_pad|>"),
        "vision_start_token_id": id("<|vision_start|>"),
        "vision_end_token_id": id("<|vision_end|>"),
        "pad_token_id": id("<|endoftext|>"),
        "vision_config": {"spatial_merge_size": 2}
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn with_template(dir: &Path, template: &str) {
    let cfg = serde_json::json!({"chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn builtin_format_matches_the_qwen25vl_template() {
    let dir = model_dir();
    let builtin = PromptBuilder::from_dir(dir.path()).unwrap();
    assert!(!builtin.has_chat_template());
    with_template(dir.path(), QWEN25_VL_TEMPLATE);
    let templated = PromptBuilder::from_dir(dir.path()).unwrap();
    assert!(templated.has_chat_template());
    for (system, text, n) in [
        (None, "Extract the lab values as JSON.", 1),
        (Some("You read clinical documents."), "Two pages:", 2),
        (None, "no image", 0),
    ] {
        let a = builtin.render(system, text, n).unwrap();
        let b = templated.render(system, text, n).unwrap();
        assert_eq!(a, b, "system {system:?}, {n} images");
    }
    assert_eq!(
        builtin.render(None, "Hi", 1).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
         <|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chat_template_json_wins_over_tokenizer_config() {
    let dir = model_dir();
    with_template(dir.path(), "from tokenizer_config");
    let file = serde_json::json!({"chat_template": "from chat_template.json"});
    std::fs::write(dir.path().join("chat_template.json"), file.to_string()).unwrap();
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    assert_eq!(b.render(None, "x", 0).unwrap(), "from chat_template.json");
    std::fs::write(dir.path().join("chat_template.jinja"), "from jinja").unwrap();
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    assert_eq!(b.render(None, "x", 0).unwrap(), "from jinja");
}

#[test]
fn image_pads_expand_to_grid_tokens_per_image() {
    let dir = model_dir();
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    let grids = [[1, 8, 10], [1, 4, 4]];
    let ids = b.encode_chat(None, "Read.", &grids).unwrap();
    let pad = id("<|image_pad|>");
    assert_eq!(ids.iter().filter(|&&i| i == pad).count(), 20 + 4);
    // Each run sits between vision_start and vision_end.
    let starts: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &i)| i == id("<|vision_start|>"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(starts.len(), 2);
    assert!(ids[starts[0] + 1..starts[0] + 21].iter().all(|&i| i == pad));
    assert_eq!(ids[starts[0] + 21], id("<|vision_end|>"));
    assert_eq!(ids[starts[1] + 5], id("<|vision_end|>"));
    // The text round-trips through decode (specials dropped).
    assert_eq!(
        b.decode(&ids).unwrap(),
        "system\nYou are a helpful assistant.\nuser\nRead.\nassistant\n"
    );
}

#[test]
fn placeholder_and_image_counts_must_agree() {
    let pad = 7;
    let e = expand_image_tokens(&[1, pad, 2], &[[1, 2, 2], [1, 2, 2]], pad, 2).unwrap_err();
    assert!(matches!(
        e,
        PromptError::ImageCountMismatch {
            placeholders: 1,
            images: 2
        }
    ));
    assert_eq!(
        expand_image_tokens(&[1, pad, 2], &[[1, 2, 4]], pad, 2).unwrap(),
        vec![1, pad, pad, 2]
    );
}

/// The fixture's `input_ids` were built by the reference with image_token_id from config.json
/// for grid [1, 8, 10] (the 140x112 image) and merge 2: 80 patches / 4 = 20 tokens.
#[test]
fn expansion_count_matches_the_fixture_input_ids() {
    #[derive(Deserialize)]
    struct Ids {
        image_token_id: u32,
    }
    let cfg: Ids = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2_5_vl_tiny/config.json")).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let grid: Vec<i64> = st
        .tensor("image_grid_thw")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let grid = [grid[0] as u32, grid[1] as u32, grid[2] as u32];
    let in_fixture = ids
        .iter()
        .filter(|&&i| i == i64::from(cfg.image_token_id))
        .count();
    assert_eq!(in_fixture, 20);
    assert_eq!(image_token_count(grid, 2), in_fixture);
}

#[test]
fn training_labels_cover_only_the_answer_and_its_end() {
    let dir = model_dir();
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    let prompt = b.encode_chat(None, "Read.", &[[1, 2, 2]]).unwrap();
    let ex = b
        .encode_training(None, "Read.", &[[1, 2, 2]], "{\"Na\": 140}")
        .unwrap();
    assert_eq!(ex.answer_start, prompt.len());
    assert_eq!(&ex.input_ids[..prompt.len()], &prompt[..]);
    assert!(ex.labels[..ex.answer_start]
        .iter()
        .all(|&l| l == IGNORE_INDEX));
    let answer: Vec<i64> = ex.input_ids[ex.answer_start..]
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    assert_eq!(&ex.labels[ex.answer_start..], &answer[..]);
    assert_eq!(*ex.input_ids.last().unwrap(), id("<|im_end|>"));
    assert_eq!(
        b.decode(&ex.input_ids[ex.answer_start..]).unwrap(),
        "{\"Na\": 140}"
    );
}

#[test]
fn left_padding_aligns_sequence_ends() {
    let batch = left_pad(&[vec![5, 6, 7], vec![8]], 0);
    assert_eq!((batch.batch, batch.seq_len), (2, 3));
    assert_eq!(batch.input_ids, vec![5, 6, 7, 0, 0, 8]);
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 0, 0, 1]);
    assert_eq!(
        left_pad_labels(&[vec![-100, 6, 7], vec![8]], 3),
        vec![-100, 6, 7, -100, -100, 8]
    );
}

#[test]
fn special_ids_come_from_config_and_must_match_the_tokenizer() {
    let dir = model_dir();
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    assert_eq!(b.special_tokens().image_pad, id("<|image_pad|>"));
    assert_eq!(b.pad_token_id().unwrap(), id("<|endoftext|>"));
    assert_eq!(b.merge_size(), 2);
    let config = serde_json::json!({"image_token_id": 1996});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = PromptBuilder::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            PromptError::TokenIdMismatch {
                config_id: 1996,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn missing_tokenizer_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = PromptBuilder::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn broken_template_is_an_error_naming_its_file() {
    let dir = model_dir();
    with_template(dir.path(), "{% for m in messages %}");
    let b = PromptBuilder::from_dir(dir.path()).unwrap();
    let e = b.render(None, "x", 0).unwrap_err();
    assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
}

use std::path::Path;

use super::*;

const SEVEN_B: &str = include_str!("../testdata/qwen2_5_vl_7b_config.json");

fn seven_b() -> HfConfig {
    HfConfig::from_json_str(SEVEN_B, Path::new("7b.json")).unwrap()
}

/// Rewrites the published layout into the transformers-5 one: text fields nested in
/// `text_config`, `rope_parameters` carrying `rope_theta`, `in_channels`.
fn to_transformers5(published: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(published).unwrap();
    let obj = v.as_object_mut().unwrap();
    let mut text = serde_json::Map::new();
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "hidden_act",
        "tie_word_embeddings",
        "use_sliding_window",
    ] {
        if let Some(x) = obj.remove(k) {
            text.insert(k.into(), x);
        }
    }
    let theta = obj.remove("rope_theta").unwrap();
    let mut rope = obj.remove("rope_scaling").unwrap();
    rope["rope_theta"] = theta;
    rope["rope_type"] = "default".into();
    rope.as_object_mut().unwrap().remove("type");
    text.insert("rope_parameters".into(), rope);
    obj.insert("text_config".into(), text.into());
    let vis = obj["vision_config"].as_object_mut().unwrap();
    if let Some(c) = vis.remove("in_chans") {
        vis.insert("in_channels".into(), c);
    }
    serde_json::to_string(&v).unwrap()
}

#[test]
fn published_7b_config_counts_the_parameters_transformers_builds() {
    let cfg = seven_b().resolve().unwrap();
    assert_eq!(cfg.parameter_count(), 8_292_166_656);
    assert_eq!(cfg.text.head_dim, 128);
    assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
    assert_eq!(cfg.tokens.image_token_id, 151655);
    assert_eq!(cfg.tokens.eos_token_ids, vec![151645]);
}

#[test]
fn transformers5_layout_resolves_to_the_same_config() {
    let t5 = to_transformers5(SEVEN_B);
    let a = seven_b().resolve().unwrap();
    let b = HfConfig::from_json_str(&t5, Path::new("t5.json"))
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn tiny_fixture_config_reads_its_own_special_tokens() {
    let cfg = HfConfig::from_dir(&crate::test_util::fixture("qwen2_5_vl_tiny"))
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(cfg.tokens.image_token_id, 1996);
    assert_eq!(cfg.tokens.vision_start_token_id, 1993);
    assert_eq!(cfg.tokens.eos_token_ids, vec![1991]);
    assert_eq!(cfg.vision.fullatt_block_indexes, vec![1, 3]);
    assert_eq!(cfg.vision.tokens_per_second, 2.0);
}

#[test]
fn generation_config_eos_ids_override_config_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), SEVEN_B).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [151645, 151643], "pad_token_id": 151643, "top_p": 0.001}"#,
    )
    .unwrap();
    let cfg = HfConfig::from_dir(dir.path()).unwrap().resolve().unwrap();
    assert_eq!(cfg.tokens.eos_token_ids, vec![151645, 151643]);
    assert_eq!(cfg.tokens.pad_token_id, Some(151643));
}

#[test]
fn resolve_rejects_mrope_sections_not_summing_to_half_head_dim() {
    let mut c = seven_b();
    c.text.rope_scaling.as_mut().unwrap().mrope_section = vec![16, 24, 23];
    let e = c.resolve().unwrap_err().to_string();
    assert!(e.contains("mrope_section") && e.contains("63"), "{e}");
}

#[test]
fn resolve_rejects_heads_that_do_not_divide_hidden_size() {
    let mut c = seven_b();
    c.text.num_attention_heads = 27;
    let e = c.resolve().unwrap_err().to_string();
    assert!(
        e.contains("num_attention_heads") && e.contains("3584"),
        "{e}"
    );
    let mut c = seven_b();
    c.text.num_key_value_heads = Some(5);
    assert!(c
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("num_key_value_heads"));
}

#[test]
fn resolve_rejects_full_attention_blocks_beyond_depth_and_odd_windows() {
    let mut c = seven_b();
    c.vision.fullatt_block_indexes = vec![7, 32];
    assert!(c.resolve().unwrap_err().to_string().contains("block 32"));
    let mut c = seven_b();
    c.vision.window_size = 100;
    assert!(c.resolve().unwrap_err().to_string().contains("window_size"));
}

#[test]
fn missing_required_field_is_a_parse_error_naming_the_file() {
    let e = HfConfig::from_json_str(r#"{"vision_config": {}}"#, Path::new("x/config.json"))
        .unwrap_err();
    assert!(format!("{e}").contains("x/config.json"));
}

/// The published 7B config as re-saved by each transformers version (see
/// `testdata/resaved/README.md` for how they were made).
const RESAVED: [(&str, &str); 5] = [
    (
        "4.49.0",
        include_str!("../testdata/resaved/transformers-4.49.0.json"),
    ),
    (
        "4.53.3",
        include_str!("../testdata/resaved/transformers-4.53.3.json"),
    ),
    (
        "4.57.6",
        include_str!("../testdata/resaved/transformers-4.57.6.json"),
    ),
    (
        "5.0.0",
        include_str!("../testdata/resaved/transformers-5.0.0.json"),
    ),
    (
        "5.24.0",
        include_str!("../testdata/resaved/transformers-5.24.0.json"),
    ),
];

fn resave(version: &str) -> serde_json::Value {
    let text = RESAVED.iter().find(|(v, _)| *v == version).unwrap().1;
    serde_json::from_str(text).unwrap()
}

fn conflict_of(v: &serde_json::Value) -> String {
    let e = HfConfig::from_json_str(&v.to_string(), Path::new("re/config.json")).unwrap_err();
    assert!(matches!(e, ConfigError::Conflict { .. }), "{e}");
    e.to_string()
}

#[test]
fn issue_15_every_transformers_resave_of_the_7b_config_resolves_to_the_published_one() {
    let want = seven_b().resolve().unwrap();
    for (version, text) in RESAVED {
        let got = HfConfig::from_json_str(text, Path::new(version))
            .unwrap_or_else(|e| panic!("transformers {version}: {e:#}"))
            .resolve()
            .unwrap_or_else(|e| panic!("transformers {version}: {e:#}"));
        assert_eq!(got, want, "transformers {version}");
    }
}

#[test]
fn issue_15_two_spellings_that_disagree_are_refused_naming_both() {
    let mut v = resave("4.57.6");
    v["vision_config"]["in_chans"] = 1.into();
    let e = conflict_of(&v);
    assert!(
        e.contains("`vision_config.in_chans` = 1")
            && e.contains("`vision_config.in_channels` = 3")
            && e.contains("re/config.json"),
        "{e}"
    );

    let mut v = resave("4.57.6");
    v["hidden_size"] = 4096.into();
    let e = conflict_of(&v);
    assert!(
        e.contains("`hidden_size` = 4096") && e.contains("`text_config.hidden_size` = 3584"),
        "{e}"
    );

    let mut v = resave("4.57.6");
    v["torch_dtype"] = "float16".into();
    let e = conflict_of(&v);
    assert!(e.contains("`torch_dtype`") && e.contains("`dtype`"), "{e}");

    let mut v = resave("5.0.0");
    v["text_config"]["rope_scaling"] =
        serde_json::json!({"type": "mrope", "mrope_section": [16, 24, 23]});
    let e = conflict_of(&v);
    assert!(
        e.contains("`text_config.rope_parameters`") && e.contains("`text_config.rope_scaling`"),
        "{e}"
    );

    let mut v = resave("5.0.0");
    v["text_config"]["rope_theta"] = 10000.0.into();
    let e = conflict_of(&v);
    assert!(
        e.contains("`text_config.rope_theta` = 10000")
            && e.contains("`text_config.rope_parameters.rope_theta` = 1000000"),
        "{e}"
    );

    // the same value in both spellings is fine, whatever the number's JSON form
    let mut v = resave("5.0.0");
    v["text_config"]["rope_theta"] = 1_000_000.into();
    v["vision_config"]["in_chans"] = 3.0.into();
    HfConfig::from_json_str(&v.to_string(), Path::new("ok")).unwrap();
}

#[test]
fn issue_15_layer_types_must_cover_every_layer_with_full_attention() {
    let mut v = resave("5.0.0");
    v["text_config"]["layer_types"][27] = "sliding_attention".into();
    let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
    let e = c.resolve().unwrap_err().to_string();
    assert!(
        e.contains("layer_types") && e.contains("layer 27 is `sliding_attention`"),
        "{e}"
    );
    let mut v = resave("5.0.0");
    v["text_config"]["layer_types"]
        .as_array_mut()
        .unwrap()
        .pop();
    let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
    let e = c.resolve().unwrap_err().to_string();
    assert!(e.contains("27 entries for 28 layers"), "{e}");
    let mut v = resave("5.24.0");
    v["vision_config"]["rope_parameters"]["rope_theta"] = 500.0.into();
    let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
    let e = c.resolve().unwrap_err().to_string();
    assert!(
        e.contains("vision_config.rope_parameters.rope_theta"),
        "{e}"
    );
}

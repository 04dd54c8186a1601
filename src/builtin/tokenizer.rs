//! The `builtin:tiny` tokenizer: byte-level BPE trained with the `tokenizers` crate on
//! clinical text, with the Qwen2.5-VL special tokens appended after the learned vocabulary
//! (as in `Qwen/Qwen2.5-VL-7B-Instruct/tokenizer.json`, where they follow the BPE ids) and
//! the Qwen chat template in `tokenizer_config.json` / `chat_template.json`.
//!
//! Byte-level: every byte is in the initial alphabet, so any UTF-8 text encodes and decodes
//! back unchanged.

use std::collections::HashSet;

use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

use super::spec::SpecialIds;

/// Special tokens, in id order after the BPE vocabulary. The first six are the ones the
/// pipeline uses; the vision/video pads exist so every id `config.json` names is a real token.
pub const SPECIAL_TOKENS: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// BPE vocabulary size asked of the trainer (bytes + merges), before the special tokens.
pub const BPE_VOCAB_SIZE: usize = 2_040;
/// A merge must occur at least this often in the corpus.
const MIN_FREQUENCY: u64 = 2;

/// The Qwen2-VL chat template (Jinja), as published for Qwen2.5-VL-*-Instruct: system
/// default, images as `<|vision_start|><|image_pad|><|vision_end|>`, turns in
/// `<|im_start|>role … <|im_end|>`.
pub const CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Errors training or serializing the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("training the builtin:tiny tokenizer: {0}")]
    Train(String),
    #[error("the trained tokenizer lacks special token `{0}`")]
    MissingSpecial(&'static str),
    #[error("the tokenizer corpus is empty")]
    EmptyCorpus,
}

/// A trained tokenizer: its `tokenizer.json` text, total size and special ids.
#[derive(Debug, Clone)]
pub struct TrainedTokenizer {
    /// `tokenizer.json` content.
    pub json: String,
    /// Tokens including the special ones.
    pub size: usize,
    /// Ids the model config names.
    pub ids: SpecialIds,
}

/// Trains byte-level BPE on `corpus` and appends [`SPECIAL_TOKENS`]. Deterministic: the same
/// corpus gives the same `tokenizer.json` bytes.
///
/// # Errors
/// An empty corpus, or a failure inside `tokenizers`.
pub fn train(corpus: &[String]) -> Result<TrainedTokenizer, TokenizerError> {
    if corpus.iter().all(|s| s.trim().is_empty()) {
        return Err(TokenizerError::EmptyCorpus);
    }
    let train_err = |e: tokenizers::Error| TokenizerError::Train(e.to_string());
    // Qwen's pre-tokenizer is byte-level without a prefix space; GPT-2's split regex.
    let byte_level = ByteLevel::new(false, false, true);
    let mut tok: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(train_err)?;
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(BPE_VOCAB_SIZE)
        .min_frequency(MIN_FREQUENCY)
        .initial_alphabet(alphabet)
        .show_progress(false)
        .build();
    tok.train(&mut trainer, corpus.iter()).map_err(train_err)?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(&specials);
    let id = |t: &'static str| tok.token_to_id(t).ok_or(TokenizerError::MissingSpecial(t));
    let ids = SpecialIds {
        endoftext: id("<|endoftext|>")?,
        im_end: id("<|im_end|>")?,
        vision_start: id("<|vision_start|>")?,
        vision_end: id("<|vision_end|>")?,
        vision_pad: id("<|vision_pad|>")?,
        image_pad: id("<|image_pad|>")?,
        video_pad: id("<|video_pad|>")?,
    };
    Ok(TrainedTokenizer {
        json: tok.to_string(true).map_err(train_err)?,
        size: tok.get_vocab_size(true),
        ids,
    })
}

/// `tokenizer_config.json`: the special tokens' roles and the chat template.
pub fn tokenizer_config_json(model_max_length: usize) -> Value {
    json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "add_bos_token": false,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": false,
        "additional_special_tokens": SPECIAL_TOKENS[1..],
        "chat_template": CHAT_TEMPLATE,
    })
}

/// `chat_template.json`: the template where the processor looks for it.
pub fn chat_template_json() -> Value {
    json!({ "chat_template": CHAT_TEMPLATE })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tokenizer_corpus;

    fn load(t: &TrainedTokenizer) -> tokenizers::Tokenizer {
        t.json.parse().unwrap()
    }

    #[test]
    fn training_is_deterministic_and_specials_follow_the_bpe_vocabulary() {
        let corpus = tokenizer_corpus(0, 400);
        let a = train(&corpus).unwrap();
        let b = train(&corpus).unwrap();
        assert_eq!(a.json, b.json);
        let tok = load(&a);
        let bpe = a.size - SPECIAL_TOKENS.len();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some((bpe + i) as u32), "{s}");
        }
        assert!(a.size > 1_000, "only {} tokens learned", a.size);
    }

    #[test]
    fn clinical_text_round_trips_and_specials_stay_whole() {
        let t = train(&tokenizer_corpus(0, 400)).unwrap();
        let tok = load(&t);
        let text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hémoglobine: 13.2 g/dL ↑; K+ 5.9 mmol/L\nBP 120/80 mmHg 💊<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        let ids = enc.get_ids();
        assert!(ids.contains(&t.ids.image_pad));
        assert!(ids.contains(&t.ids.im_end));
        assert_eq!(tok.decode(ids, false).unwrap(), text);
        // Learned merges compress clinical words well below one token per byte.
        let plain = tok
            .encode("Patient presents with hypertension and diabetes", false)
            .unwrap();
        assert!(plain.get_ids().len() < 20, "{:?}", plain.get_tokens());
    }

    #[test]
    fn empty_corpus_is_an_error() {
        assert!(matches!(
            train(&[" ".into()]),
            Err(TokenizerError::EmptyCorpus)
        ));
    }
}

//! Model inputs from text and images: the Qwen chat format, image-placeholder expansion,
//! training labels and left padding.
//!
//! Follows transformers 5 `models/qwen2_5_vl/processing_qwen2_5_vl.py` (`Qwen2_5_VLProcessor`):
//! the chat is rendered with the checkpoint's chat template (jinja, with `trim_blocks` and
//! `lstrip_blocks` as `apply_chat_template` sets them), then every `<|image_pad|>` is expanded to
//! `grid_t·grid_h·grid_w / merge_size²` copies, one run per image in order. We expand after
//! tokenizing (the placeholder is a single added token), which gives the same ids as the
//! reference's expand-then-tokenize. Without a chat template the built-in Qwen2.5-VL format is used;
//! for the published template both give the same text (`builtin_format_matches_the_qwen25vl_template`).
//!
//! Special token ids come from `config.json` (`image_token_id`, `vision_start_token_id`,
//! `vision_end_token_id`, `pad_token_id`) and the tokenizer, never from literals.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

/// The system prompt the Qwen2.5-VL template inserts when the chat has none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
/// Label value ignored by the cross-entropy loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
/// Qwen chat markers: these strings are the chat format itself.
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
/// Token strings used when `config.json` does not give the ids.
const IMAGE_PAD: &str = "<|image_pad|>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";
/// transformers' default `merge_size` when neither config names one.
const DEFAULT_MERGE_SIZE: u32 = 2;

/// Errors building prompts. File errors name the file; token errors name the token.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `tokenizer.json` is missing or does not load.
    #[error("loading tokenizer {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// A JSON side file (config, tokenizer config, chat template) could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON side file does not parse.
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A special token the Qwen format needs is not in the vocabulary.
    #[error("tokenizer in {dir} has no `{token}` token")]
    MissingToken { dir: PathBuf, token: String },
    /// `config.json` and the tokenizer disagree on a special token id.
    #[error("{key} = {config_id} in config.json but the tokenizer maps `{token}` to {tokenizer_id} ({dir})")]
    TokenIdMismatch {
        dir: PathBuf,
        key: &'static str,
        token: String,
        config_id: u32,
        tokenizer_id: u32,
    },
    /// The chat template does not compile or fails while rendering.
    #[error("rendering chat template from {source_file}")]
    Template {
        source_file: PathBuf,
        #[source]
        source: minijinja::Error,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizer {what}: {source}")]
    Tokenize {
        what: &'static str,
        #[source]
        source: tokenizers::Error,
    },
    /// The prompt's image placeholders and the images do not pair up.
    #[error("prompt has {placeholders} image placeholders but {images} images were given")]
    ImageCountMismatch { placeholders: usize, images: usize },
    /// No pad token is configured but padding was asked for.
    #[error("no pad token: config.json has no pad_token_id and tokenizer_config.json no pad_token ({dir})")]
    NoPadToken { dir: PathBuf },
}

/// The fields of `config.json` this module reads (all optional).
#[derive(Debug, Default, Deserialize)]
struct HfTokenConfig {
    image_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    vision_config: Option<HfVisionMerge>,
}

#[derive(Debug, Default, Deserialize)]
struct HfVisionMerge {
    spatial_merge_size: Option<u32>,
}

/// `merge_size` from `preprocessor_config.json`.
#[derive(Debug, Default, Deserialize)]
struct HfMerge {
    merge_size: Option<u32>,
}

/// A token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum HfTokenString {
    Plain(String),
    Added { content: String },
}

impl HfTokenString {
    fn text(&self) -> &str {
        match self {
            HfTokenString::Plain(s) | HfTokenString::Added { content: s } => s,
        }
    }
}

/// A chat template: one string, or a list of named templates (the `default` one is used).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum HfChatTemplate {
    One(String),
    Named(Vec<HfNamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
struct HfNamedTemplate {
    name: String,
    template: String,
}

impl HfChatTemplate {
    fn default_template(self) -> Option<String> {
        match self {
            HfChatTemplate::One(s) => Some(s),
            HfChatTemplate::Named(list) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template),
        }
    }
}

/// The fields of `tokenizer_config.json` this module reads.
#[derive(Debug, Default, Deserialize)]
struct HfTokenizerConfig {
    chat_template: Option<HfChatTemplate>,
    bos_token: Option<HfTokenString>,
    eos_token: Option<HfTokenString>,
    pad_token: Option<HfTokenString>,
}

/// `chat_template.json` (the processor's template file).
#[derive(Debug, Deserialize)]
struct HfChatTemplateFile {
    chat_template: HfChatTemplate,
}

/// A jinja chat template and the file it came from.
#[derive(Debug, Clone)]
struct ChatTemplate {
    source: String,
    file: PathBuf,
}

/// Ids of the special tokens the Qwen2.5-VL format uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<|im_start|>`.
    pub im_start: u32,
    /// `<|im_end|>`: also the end of an assistant turn (generation stops there).
    pub im_end: u32,
    /// `<|vision_start|>` (`vision_start_token_id`).
    pub vision_start: u32,
    /// `<|vision_end|>` (`vision_end_token_id`).
    pub vision_end: u32,
    /// `<|image_pad|>` (`image_token_id`), expanded per image.
    pub image_pad: u32,
    /// Padding id for batches, when configured.
    pub pad: Option<u32>,
}

/// A prompt plus its target answer, ready for a training step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingExample {
    /// Prompt tokens, then the answer tokens, then `<|im_end|>`.
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] over the prompt; the answer ids and `<|im_end|>` after it.
    pub labels: Vec<i64>,
    /// Index of the first answer token (= prompt length).
    pub answer_start: usize,
}

/// A left-padded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Row-major `[batch, seq_len]`, pad ids on the left.
    pub input_ids: Vec<u32>,
    /// Row-major `[batch, seq_len]`: 0 on padding, 1 on tokens.
    pub attention_mask: Vec<u32>,
    /// Number of rows.
    pub batch: usize,
    /// Length of the longest sequence.
    pub seq_len: usize,
}

/// Number of LLM tokens one image occupies: `t·h·w / merge_size²` (each `merge_size²` block of
/// patches is merged into one token by the vision merger).
pub fn image_token_count(grid_thw: [u32; 3], merge_size: u32) -> usize {
    let [t, h, w] = grid_thw.map(|v| v as usize);
    let m = merge_size as usize;
    t * h * w / (m * m)
}

/// Left-pads token sequences to the longest one (generation appends on the right, so every row
/// must end at the same position).
///
/// # Shapes
/// - returns `input_ids`/`attention_mask` `[batch, max_len]`
pub fn left_pad(seqs: &[Vec<u32>], pad_id: u32) -> PaddedBatch {
    let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(seqs.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(seqs.len() * seq_len);
    for s in seqs {
        let pad = seq_len - s.len();
        input_ids.extend(std::iter::repeat_n(pad_id, pad));
        input_ids.extend_from_slice(s);
        attention_mask.extend(std::iter::repeat_n(0, pad));
        attention_mask.extend(std::iter::repeat_n(1, s.len()));
    }
    PaddedBatch {
        input_ids,
        attention_mask,
        batch: seqs.len(),
        seq_len,
    }
}

/// Left-pads label rows with [`IGNORE_INDEX`] to `seq_len`, matching [`left_pad`] of their ids.
///
/// # Shapes
/// - returns `[labels.len(), seq_len]`; rows longer than `seq_len` are kept whole (caller error)
pub fn left_pad_labels(labels: &[Vec<i64>], seq_len: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(labels.len() * seq_len);
    for l in labels {
        out.extend(std::iter::repeat_n(
            IGNORE_INDEX,
            seq_len.saturating_sub(l.len()),
        ));
        out.extend_from_slice(l);
    }
    out
}

/// Builds Qwen2.5-VL model inputs from a checkpoint directory's tokenizer and configs.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    special: SpecialTokens,
    merge_size: u32,
    bos_token: Option<String>,
    eos_token: Option<String>,
    dir: PathBuf,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, PromptError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| PromptError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

impl PromptBuilder {
    /// Loads `tokenizer.json` (required) and, when present, `config.json`,
    /// `preprocessor_config.json`, `tokenizer_config.json` and the chat template
    /// (`chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`'s
    /// `chat_template`, the order transformers' processors look them up in).
    ///
    /// # Errors
    /// Any file that exists but does not read or parse; a missing `<|im_start|>`/`<|im_end|>`
    /// or vision token; a `config.json` id that disagrees with the tokenizer.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, PromptError> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|source| PromptError::Tokenizer {
                path: tok_path.clone(),
                source,
            })?;
        let config: HfTokenConfig = read_json(&dir.join("config.json"))?.unwrap_or_default();
        let pre: HfMerge = read_json(&dir.join("preprocessor_config.json"))?.unwrap_or_default();
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg: HfTokenizerConfig = read_json(&tok_cfg_path)?.unwrap_or_default();

        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let template = if jinja_path.exists() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|source| PromptError::Read {
                    path: jinja_path.clone(),
                    source,
                })?;
            Some(ChatTemplate {
                source,
                file: jinja_path,
            })
        } else if let Some(f) = read_json::<HfChatTemplateFile>(&json_path)? {
            f.chat_template
                .default_template()
                .map(|source| ChatTemplate {
                    source,
                    file: json_path,
                })
        } else {
            tok_cfg
                .chat_template
                .clone()
                .and_then(HfChatTemplate::default_template)
                .map(|source| ChatTemplate {
                    source,
                    file: tok_cfg_path,
                })
        };

        let lookup = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| PromptError::MissingToken {
                    dir: dir.to_path_buf(),
                    token: token.to_string(),
                })
        };
        // A config id wins, but must agree with the tokenizer when the tokenizer knows the token.
        let resolve = |key: &'static str, config_id: Option<u32>, token: &str| match config_id {
            Some(id) => match tokenizer.token_to_id(token) {
                Some(t) if t != id => Err(PromptError::TokenIdMismatch {
                    dir: dir.to_path_buf(),
                    key,
                    token: token.to_string(),
                    config_id: id,
                    tokenizer_id: t,
                }),
                _ => Ok(id),
            },
            None => lookup(token),
        };
        let pad = match (config.pad_token_id, &tok_cfg.pad_token) {
            (Some(id), _) => Some(id),
            (None, Some(t)) => tokenizer.token_to_id(t.text()),
            (None, None) => None,
        };
        let special = SpecialTokens {
            im_start: lookup(IM_START)?,
            im_end: lookup(IM_END)?,
            vision_start: resolve(
                "vision_start_token_id",
                config.vision_start_token_id,
                VISION_START,
            )?,
            vision_end: resolve(
                "vision_end_token_id",
                config.vision_end_token_id,
                VISION_END,
            )?,
            image_pad: resolve("image_token_id", config.image_token_id, IMAGE_PAD)?,
            pad,
        };
        let merge_size = pre
            .merge_size
            .or(config.vision_config.and_then(|v| v.spatial_merge_size))
            .unwrap_or(DEFAULT_MERGE_SIZE);
        Ok(Self {
            tokenizer,
            template,
            special,
            merge_size,
            bos_token: tok_cfg.bos_token.map(|t| t.text().to_string()),
            eos_token: tok_cfg.eos_token.map(|t| t.text().to_string()),
            dir: dir.to_path_buf(),
        })
    }

    /// The special token ids in use.
    pub fn special_tokens(&self) -> SpecialTokens {
        self.special
    }

    /// Spatial merge size used to count image tokens.
    pub fn merge_size(&self) -> u32 {
        self.merge_size
    }

    /// Whether a checkpoint chat template is used (else the built-in Qwen format).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The pad id for batching.
    ///
    /// # Errors
    /// [`PromptError::NoPadToken`] when neither config names one.
    pub fn pad_token_id(&self) -> Result<u32, PromptError> {
        self.special.pad.ok_or_else(|| PromptError::NoPadToken {
            dir: self.dir.clone(),
        })
    }

    /// The chat text for one user turn with `num_images` images (before the text) and an open
    /// assistant turn, from the checkpoint's template or the built-in format.
    ///
    /// # Errors
    /// [`PromptError::Template`] when the template fails.
    pub fn render(
        &self,
        system: Option<&str>,
        user_text: &str,
        num_images: usize,
    ) -> Result<String, PromptError> {
        match &self.template {
            Some(t) => render_template(
                t,
                system,
                user_text,
                num_images,
                self.bos_token.as_deref(),
                self.eos_token.as_deref(),
            ),
            None => Ok(self.builtin_chat(system, user_text, num_images)),
        }
    }

    /// The built-in Qwen2.5-VL chat format (what its template renders with
    /// `add_generation_prompt=True`), vision markers spelled as the tokenizer spells their ids.
    fn builtin_chat(&self, system: Option<&str>, user_text: &str, num_images: usize) -> String {
        let name = |id: u32| self.tokenizer.id_to_token(id).unwrap_or_default();
        let image = format!(
            "{}{}{}",
            name(self.special.vision_start),
            name(self.special.image_pad),
            name(self.special.vision_end)
        );
        builtin_chat_text(
            system.unwrap_or(DEFAULT_SYSTEM_PROMPT),
            user_text,
            &image,
            num_images,
        )
    }

    /// Token ids of a chat prompt, with each image's placeholder expanded to its token count.
    ///
    /// # Shapes
    /// - `grids`: one `[t, h, w]` per image, in prompt order; returns `[seq]`
    ///
    /// # Errors
    /// Template or tokenizer failures; [`PromptError::ImageCountMismatch`].
    pub fn encode_chat(
        &self,
        system: Option<&str>,
        user_text: &str,
        grids: &[[u32; 3]],
    ) -> Result<Vec<u32>, PromptError> {
        let text = self.render(system, user_text, grids.len())?;
        let ids = self.encode_text(&text, true)?;
        expand_image_tokens(&ids, grids, self.special.image_pad, self.merge_size)
    }

    /// A training example: the chat prompt, then `answer` and `<|im_end|>`; labels are
    /// [`IGNORE_INDEX`] on the prompt so only the answer (and its end) is learned.
    ///
    /// The answer is tokenized on its own: the prompt ends with `assistant\n`, and a newline is a
    /// pre-token of its own for Qwen's byte-level BPE, so this equals tokenizing the joined text
    /// unless the answer itself starts with whitespace (then the joined text would merge it with
    /// that newline).
    ///
    /// # Errors
    /// As [`Self::encode_chat`].
    pub fn encode_training(
        &self,
        system: Option<&str>,
        user_text: &str,
        grids: &[[u32; 3]],
        answer: &str,
    ) -> Result<TrainingExample, PromptError> {
        let mut input_ids = self.encode_chat(system, user_text, grids)?;
        let answer_start = input_ids.len();
        input_ids.extend(self.encode_text(answer, false)?);
        input_ids.push(self.special.im_end);
        let labels = (0..input_ids.len())
            .map(|i| {
                if i < answer_start {
                    IGNORE_INDEX
                } else {
                    i64::from(input_ids[i])
                }
            })
            .collect();
        Ok(TrainingExample {
            input_ids,
            labels,
            answer_start,
        })
    }

    /// Text of generated ids, special tokens (`<|im_end|>`, pads) left out.
    ///
    /// # Errors
    /// [`PromptError::Tokenize`] when the tokenizer cannot decode.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|source| PromptError::Tokenize {
                what: "decoding ids",
                source,
            })
    }

    fn encode_text(&self, text: &str, add_special: bool) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|source| PromptError::Tokenize {
                what: "encoding text",
                source,
            })
    }
}

/// The Qwen2.5-VL chat text: system turn, user turn with `num_images` copies of `image` before
/// the text, and the assistant header.
fn builtin_chat_text(system: &str, user_text: &str, image: &str, num_images: usize) -> String {
    format!(
        "{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{}{user_text}{IM_END}\n{IM_START}assistant\n",
        image.repeat(num_images)
    )
}

/// Renders a HF chat template the way `apply_chat_template` does: jinja with `trim_blocks` and
/// `lstrip_blocks`, `raise_exception`, Python string methods, and the message list
/// `[system?, user{images…, text}]` with `add_generation_prompt=True`.
fn render_template(
    t: &ChatTemplate,
    system: Option<&str>,
    user_text: &str,
    num_images: usize,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, PromptError> {
    let err = |source| PromptError::Template {
        source_file: t.file.clone(),
        source,
    };
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let mut content: Vec<serde_json::Value> = (0..num_images)
        .map(|_| serde_json::json!({"type": "image"}))
        .collect();
    content.push(serde_json::json!({"type": "text", "text": user_text}));
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": content}));
    let tmpl = env.template_from_str(&t.source).map_err(err)?;
    tmpl.render(minijinja::context! {
        messages => minijinja::Value::from_serialize(&messages),
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(err)
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

#[cfg(test)]
mod tests {
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
}

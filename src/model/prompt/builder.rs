//! [`PromptBuilder`]: the tokenizer, special ids and chat template of a checkpoint directory,
//! turning a chat (and its images' grids) into model inputs and training labels.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use super::batch::IGNORE_INDEX;
use super::error::PromptError;
use super::expand::expand_image_tokens;
use super::template::{
    builtin_chat_text, render_template, ChatTemplate, HfChatTemplate, HfChatTemplateFile,
    DEFAULT_SYSTEM_PROMPT, IM_END, IM_START,
};

/// Token strings used when `config.json` does not give the ids.
const IMAGE_PAD: &str = "<|image_pad|>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";
/// transformers' default `merge_size` when neither config names one.
const DEFAULT_MERGE_SIZE: u32 = 2;

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

/// The fields of `tokenizer_config.json` this module reads.
#[derive(Debug, Default, Deserialize)]
struct HfTokenizerConfig {
    chat_template: Option<HfChatTemplate>,
    bos_token: Option<HfTokenString>,
    eos_token: Option<HfTokenString>,
    pad_token: Option<HfTokenString>,
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

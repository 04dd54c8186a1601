//! The prompt text: the checkpoint's jinja chat template (rendered as `apply_chat_template`
//! does) or the built-in Qwen2.5-VL chat format.

use std::path::PathBuf;

use serde::Deserialize;

use super::error::PromptError;

/// The system prompt the Qwen2.5-VL template inserts when the chat has none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
/// Qwen chat markers: these strings are the chat format itself.
pub(super) const IM_START: &str = "<|im_start|>";
pub(super) const IM_END: &str = "<|im_end|>";

/// A chat template: one string, or a list of named templates (the `default` one is used).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum HfChatTemplate {
    One(String),
    Named(Vec<HfNamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct HfNamedTemplate {
    name: String,
    template: String,
}

impl HfChatTemplate {
    pub(super) fn default_template(self) -> Option<String> {
        match self {
            HfChatTemplate::One(s) => Some(s),
            HfChatTemplate::Named(list) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template),
        }
    }
}

/// `chat_template.json` (the processor's template file).
#[derive(Debug, Deserialize)]
pub(super) struct HfChatTemplateFile {
    pub(super) chat_template: HfChatTemplate,
}

/// A jinja chat template and the file it came from.
#[derive(Debug, Clone)]
pub(super) struct ChatTemplate {
    pub(super) source: String,
    pub(super) file: PathBuf,
}

/// The Qwen2.5-VL chat text: system turn, user turn with `num_images` copies of `image` before
/// the text, and the assistant header.
pub(super) fn builtin_chat_text(
    system: &str,
    user_text: &str,
    image: &str,
    num_images: usize,
) -> String {
    format!(
        "{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{}{user_text}{IM_END}\n{IM_START}assistant\n",
        image.repeat(num_images)
    )
}

/// Renders a HF chat template the way `apply_chat_template` does: jinja with `trim_blocks` and
/// `lstrip_blocks`, `raise_exception`, Python string methods, and the message list
/// `[system?, user{images…, text}]` with `add_generation_prompt=True`.
pub(super) fn render_template(
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

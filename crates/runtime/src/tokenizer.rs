//! Text <-> token ids through the `tokenizers` crate (tokenizer.json), and chat prompts from the
//! Jinja `chat_template` of tokenizer_config.json (rendered with minijinja plus its Python
//! string-method compatibility, which real templates use: `.strip()`, `.startswith()`...).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Errors of tokenization and chat templating.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The checkpoint folder has no tokenizer.json.
    #[error(
        "{file}: no tokenizer.json in the checkpoint folder (needed to turn text into tokens)"
    )]
    Missing {
        /// expected path
        file: PathBuf,
    },
    /// tokenizer.json or tokenizer_config.json could not be parsed.
    #[error("{file}: {reason}")]
    Parse {
        /// the file
        file: PathBuf,
        /// why
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// `--chat` was asked for but tokenizer_config.json has no chat_template.
    #[error("{file}: no 'chat_template' (the model has no chat format; drop --chat)")]
    NoChatTemplate {
        /// tokenizer_config.json path
        file: PathBuf,
    },
    /// The chat template failed to render.
    #[error("{file}: chat_template: {reason}")]
    Template {
        /// tokenizer_config.json path
        file: PathBuf,
        /// the minijinja error
        reason: String,
    },
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// Text.
    pub content: String,
}

/// A tokenizer with the special tokens and chat template of its checkpoint.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    config_file: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("config_file", &self.config_file)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json` and, if present, `<dir>/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer, TokenizerError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TokenizerError::Missing { file });
        }
        let tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Parse {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let config_file = dir.join("tokenizer_config.json");
        let cfg: Value = if config_file.is_file() {
            let text =
                std::fs::read_to_string(&config_file).map_err(|e| TokenizerError::Parse {
                    file: config_file.clone(),
                    reason: e.to_string(),
                })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Parse {
                file: config_file.clone(),
                reason: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        // Newer checkpoints keep the template in chat_template.jinja.
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Ok(TextTokenizer {
            tok,
            config_file,
            chat_template,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
        })
    }

    /// Encodes `text`; `add_special` applies the tokenizer's post-processor (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tok
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tok
            .decode(ids, true)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Token id of the tokenizer_config.json `eos_token`, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.tok.token_to_id(t))
    }

    /// The ids that end generated text: the config's `eos_token_id`s, then the tokenizer's
    /// `eos_token` (what both `mimo-run generate` and self-generated calibration stop at).
    pub fn end_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut eos = config_eos.to_vec();
        eos.extend(self.eos_id());
        eos
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template (generation prompt appended).
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, TokenizerError> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| TokenizerError::NoChatTemplate {
                file: self.config_file.clone(),
            })?;
        let terr = |e: minijinja::Error| TokenizerError::Template {
            file: self.config_file.clone(),
            reason: e.to_string(),
        };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
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
        env.add_template("chat", tpl).map_err(terr)?;
        let t = env.get_template("chat").map_err(terr)?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(terr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny word-level tokenizer.json.
    fn write_tokenizer(dir: &Path, template: Option<&str>) {
        let tj = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<eos>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<eos>": 0, "hello": 1, "world": 2, "<unk>": 3},
                "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        let mut cfg = serde_json::json!({"eos_token": {"content": "<eos>"}, "bos_token": null});
        if let Some(t) = template {
            cfg["chat_template"] = Value::String(t.into());
        }
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }

    #[test]
    fn encode_decode_and_eos() {
        let d = tempfile::tempdir().unwrap();
        write_tokenizer(d.path(), None);
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        assert_eq!(t.encode("hello world hello", false).unwrap(), vec![1, 2, 1]);
        assert_eq!(t.decode(&[2, 1]).unwrap(), "world hello");
        assert_eq!(t.eos_id(), Some(0));
        // The config's end ids first, then the tokenizer's.
        assert_eq!(t.end_ids(&[7, 9]), vec![7, 9, 0]);
        assert!(matches!(
            t.apply_chat_template(&[]),
            Err(TokenizerError::NoChatTemplate { .. })
        ));
    }

    #[test]
    fn chat_template_with_python_methods() {
        let d = tempfile::tempdir().unwrap();
        let tpl = "{% for m in messages %}<|{{ m['role'] }}|>{{ m.content.strip() }}\n{% endfor %}\
                   {% if add_generation_prompt %}<|assistant|>{% endif %}";
        write_tokenizer(d.path(), Some(tpl));
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        let msgs = [Message {
            role: "user".into(),
            content: "  hi  ".into(),
        }];
        assert_eq!(
            t.apply_chat_template(&msgs).unwrap(),
            "<|user|>hi\n<|assistant|>"
        );
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = TextTokenizer::from_dir(d.path()).unwrap_err();
        assert!(matches!(e, TokenizerError::Missing { .. }));
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }
}

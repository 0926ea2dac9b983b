//! A model folder's tokenizer together with the chat template its
//! conversations are rendered with, its padding token and the tokens that
//! end an answer.
//!
//! A folder may hold, beside `tokenizer.json`, the Hugging Face files that
//! define the chat format: `tokenizer_config.json` (`chat_template`,
//! `bos_token`, `eos_token`, `pad_token`), `chat_template.jinja` (where
//! transformers v5 keeps the template) and `generation_config.json`
//! (`eos_token_id`, an int or a list: chat models stop on several). When a
//! model has its own template it is used as is: no tokens are added, no
//! embeddings grown. posttrain's own template ([`super::builtin`]) serves
//! models without one and needs its special tokens in the vocabulary.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use super::builtin::{self, END_OF_TURN, PAD, SPECIAL_TOKENS, TEMPLATE_VERSION};
use super::template::ChatTemplate;
use super::{ChatError, Message};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Markers that close an assistant turn in common templates, most
/// specific first; the first one the template uses and the vocabulary
/// has is where answers stop.
const END_OF_TURN_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_turn|>",
    "<end_of_turn>",
    "<|end|>",
];

/// Which chat template a stage renders with (its `chat_template` setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The model's own when it has one, else posttrain's (the default).
    Model,
    /// posttrain's own, even for a model that has a template.
    Posttrain,
    /// A Jinja file (path as resolved by the caller).
    File(PathBuf),
}

impl TemplateChoice {
    /// From a stage's `chat_template` value: "model", "posttrain" or a
    /// `.jinja` path (relative to `root`).
    pub fn parse(value: Option<&str>, root: &Path) -> Result<TemplateChoice, String> {
        match value {
            None | Some("model") => Ok(TemplateChoice::Model),
            Some("posttrain") => Ok(TemplateChoice::Posttrain),
            Some(p) if p.ends_with(".jinja") => Ok(TemplateChoice::File(root.join(p))),
            Some(other) => Err(format!(
                "`chat_template` is \"{other}\"; use \"model\" (the model's own, the default), \"posttrain\" or a path ending in .jinja"
            )),
        }
    }
}

/// How conversations become text for this tokenizer.
#[derive(Debug, Clone)]
pub enum Template {
    /// posttrain's `<|user|>...<|end|><|assistant|>` template.
    Builtin,
    /// A Jinja template (the model's own or a file).
    Jinja(Box<ChatTemplate>),
}

/// A tokenizer with its chat format and the hash of everything that
/// decides token ids (tokenizer file and template text), which keys the
/// token cache.
#[derive(Clone)]
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub hash: String,
    pub template: Template,
    /// Fills batches; never trained on.
    pub pad: u32,
    /// Generation stops at any of these; the end-of-turn token first.
    pub stops: Vec<u32>,
}

impl LoadedTokenizer {
    /// A conversation so far, ready for the assistant's answer.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String, ChatError> {
        match &self.template {
            Template::Builtin => Ok(builtin::render_prompt(messages)),
            Template::Jinja(t) => t.render(messages, true).map_err(ChatError::from),
        }
    }

    /// The prompt's text and the answer's text (closed by the end-of-turn
    /// marker, which is trained on), so that prompt + answer is the
    /// rendered conversation.
    pub fn prompt_and_response(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<(String, String), ChatError> {
        match &self.template {
            Template::Builtin => Ok((
                builtin::render_prompt(prompt),
                builtin::response_text(response),
            )),
            Template::Jinja(t) => t
                .prompt_and_response(prompt, response)
                .map_err(ChatError::from),
        }
    }

    /// A whole conversation as token ids, each marked whether it belongs
    /// to an assistant turn (its text and end-of-turn marker: the tokens a
    /// loss trains on); `{% generation %}` markers decide where a template
    /// has them.
    pub fn encode_with_mask(
        &self,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<bool>), ChatError> {
        let (text, spans) = match &self.template {
            Template::Builtin => builtin::assistant_spans(messages),
            Template::Jinja(t) => t.assistant_spans(messages).map_err(ChatError::from)?,
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| ChatError::new(TOKENIZER_FILE, format!("cannot encode: {e}")))?;
        let trained = enc
            .get_offsets()
            .iter()
            .map(|(a, b)| spans.iter().any(|s| *a < s.end && *b > s.start))
            .collect();
        Ok((enc.get_ids().to_vec(), trained))
    }

    /// Token ids of text (templates add any BOS themselves, as
    /// transformers' `apply_chat_template` does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatError::new(TOKENIZER_FILE, format!("cannot encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ChatError::new(TOKENIZER_FILE, format!("cannot decode: {e}")))
    }

    /// The template's name for messages: "posttrain" or its origin.
    pub fn template_name(&self) -> String {
        match &self.template {
            Template::Builtin => "posttrain".into(),
            Template::Jinja(t) => t.origin().to_string(),
        }
    }
}

fn read_tokenizer(path: &Path) -> Result<(Tokenizer, Vec<u8>), ChatError> {
    let bytes = std::fs::read(path).map_err(|e| ChatError::new(path, e.to_string()))?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| ChatError::new(path, format!("not a tokenizer.json: {e}")))?;
    Ok((tokenizer, bytes))
}

fn hash_of(tokenizer_bytes: &[u8], template: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(tokenizer_bytes.len() as u64).to_le_bytes());
    h.update(tokenizer_bytes);
    h.update(template.as_bytes());
    h.finalize().to_hex().to_string()
}

/// A tokenizer file with posttrain's template: its special tokens must be
/// in the vocabulary.
pub fn load_tokenizer(path: &Path) -> Result<LoadedTokenizer, ChatError> {
    let (tokenizer, bytes) = read_tokenizer(path)?;
    builtin_format(tokenizer, &bytes, path)
}

fn builtin_format(
    tokenizer: Tokenizer,
    bytes: &[u8],
    path: &Path,
) -> Result<LoadedTokenizer, ChatError> {
    for special in SPECIAL_TOKENS {
        if tokenizer.token_to_id(special).is_none() {
            return Err(ChatError::new(
                path,
                format!(
                    "the tokenizer has no `{special}` token, which posttrain's chat template needs"
                ),
            ));
        }
    }
    let id = |t: &str| tokenizer.token_to_id(t).expect("checked above");
    Ok(LoadedTokenizer {
        pad: id(PAD),
        stops: vec![id(END_OF_TURN)],
        hash: hash_of(bytes, &format!("posttrain-template-v{TEMPLATE_VERSION}")),
        template: Template::Builtin,
        tokenizer,
    })
}

/// The chat-format files of a model folder, as read.
#[derive(Debug, Clone, Default)]
pub struct FolderFormat {
    /// The template's source and the file it came from.
    pub template: Option<(String, PathBuf)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// From generation_config.json (else config.json).
    pub eos_token_ids: Vec<u32>,
}

/// A special token as tokenizer_config.json writes it: a string or an
/// AddedToken object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ChatError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| ChatError::new(path, e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ChatError::new(path, format!("not JSON: {e}")))
}

impl FolderFormat {
    pub fn read(dir: &Path) -> Result<FolderFormat, ChatError> {
        let mut f = FolderFormat::default();
        let tc_path = dir.join(TOKENIZER_CONFIG_FILE);
        if let Some(tc) = read_json(&tc_path)? {
            f.bos_token = token_text(tc.get("bos_token"));
            f.eos_token = token_text(tc.get("eos_token"));
            f.pad_token = token_text(tc.get("pad_token"));
            match tc.get("chat_template") {
                Some(Value::String(s)) => f.template = Some((s.clone(), tc_path.clone())),
                // A list of named templates: the one called "default".
                Some(Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                    {
                        Some(s) => f.template = Some((s.to_string(), tc_path.clone())),
                        None => {
                            return Err(ChatError::new(
                                &tc_path,
                                "`chat_template` is a list without a template named \"default\"",
                            ))
                        }
                    }
                }
                Some(Value::Null) | None => {}
                Some(other) => {
                    return Err(ChatError::new(
                        &tc_path,
                        format!("`chat_template` must be a string, not {other}"),
                    ))
                }
            }
        }
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if jinja.exists() {
            let s = std::fs::read_to_string(&jinja)
                .map_err(|e| ChatError::new(&jinja, e.to_string()))?;
            f.template = Some((s, jinja));
        }
        let gen = read_json(&dir.join(GENERATION_CONFIG_FILE))?;
        f.eos_token_ids = ids_of(gen.as_ref().and_then(|g| g.get("eos_token_id")));
        if f.eos_token_ids.is_empty() {
            let cfg = read_json(&dir.join("config.json"))?;
            f.eos_token_ids = ids_of(cfg.as_ref().and_then(|c| c.get("eos_token_id")));
        }
        Ok(f)
    }

    /// Write the files that carry this format into a model folder.
    pub fn write(&self, dir: &Path) -> Result<(), ChatError> {
        let mut tc = serde_json::Map::new();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                tc.insert(k.into(), Value::String(v.clone()));
            }
        }
        if let Some((source, _)) = &self.template {
            tc.insert("chat_template".into(), Value::String(source.clone()));
        }
        if !tc.is_empty() {
            let path = dir.join(TOKENIZER_CONFIG_FILE);
            let text = serde_json::to_string_pretty(&Value::Object(tc)).expect("JSON");
            std::fs::write(&path, text + "\n").map_err(|e| ChatError::new(&path, e.to_string()))?;
        }
        if !self.eos_token_ids.is_empty() {
            let path = dir.join(GENERATION_CONFIG_FILE);
            let ids = match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            };
            let text = serde_json::to_string_pretty(&serde_json::json!({ "eos_token_id": ids }))
                .expect("JSON");
            std::fs::write(&path, text + "\n").map_err(|e| ChatError::new(&path, e.to_string()))?;
        }
        Ok(())
    }
}

/// A model folder's tokenizer with the chat template `choice` picks.
pub fn load_folder(dir: &Path, choice: &TemplateChoice) -> Result<LoadedTokenizer, ChatError> {
    let tok_path = dir.join(TOKENIZER_FILE);
    let (tokenizer, bytes) = read_tokenizer(&tok_path)?;
    let folder = FolderFormat::read(dir)?;
    let (source, origin) = match (choice, &folder.template) {
        (TemplateChoice::Posttrain, _) | (TemplateChoice::Model, None) => {
            return builtin_format(tokenizer, &bytes, &tok_path).map_err(|e| {
                if folder.template.is_some() || choice == &TemplateChoice::Posttrain {
                    ChatError::new(
                        e.path,
                        format!("{} (chat_template = \"posttrain\" needs a model trained with posttrain's template; \"model\" uses the model's own)", e.message),
                    )
                } else {
                    e
                }
            })
        }
        (TemplateChoice::Model, Some((s, origin))) => (s.clone(), origin.clone()),
        (TemplateChoice::File(path), _) => {
            let s = std::fs::read_to_string(path).map_err(|e| ChatError::new(path, e.to_string()))?;
            (s, path.clone())
        }
    };
    jinja_format(tokenizer, &bytes, &folder, &source, &origin)
}

fn jinja_format(
    tokenizer: Tokenizer,
    bytes: &[u8],
    folder: &FolderFormat,
    source: &str,
    origin: &Path,
) -> Result<LoadedTokenizer, ChatError> {
    let has = |t: &str| tokenizer.token_to_id(t).is_some();
    let end_of_turn = END_OF_TURN_MARKERS
        .iter()
        .map(|s| s.to_string())
        .chain(folder.eos_token.clone())
        .find(|m| source.contains(m.as_str()) && has(m));
    let bos = folder.bos_token.clone().unwrap_or_default();
    let eos = folder.eos_token.clone().unwrap_or_default();
    let template = ChatTemplate::new(
        source,
        &origin.display().to_string(),
        &bos,
        &eos,
        end_of_turn.clone(),
    )
    .map_err(ChatError::from)?;
    // The end-of-turn token first: it is how a chat answer ends.
    let mut stops: Vec<u32> = Vec::new();
    let named = end_of_turn.iter().chain(folder.eos_token.iter());
    let ids = named
        .filter_map(|t| tokenizer.token_to_id(t))
        .chain(folder.eos_token_ids.iter().copied());
    for id in ids {
        if !stops.contains(&id) {
            stops.push(id);
        }
    }
    if stops.is_empty() {
        return Err(ChatError::new(
            origin,
            "no token ends an answer: give `eos_token` in tokenizer_config.json or `eos_token_id` in generation_config.json",
        ));
    }
    let pad = folder
        .pad_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .unwrap_or(stops[0]);
    Ok(LoadedTokenizer {
        hash: hash_of(bytes, &format!("jinja\0{source}\0{bos}\0{eos}")),
        template: Template::Jinja(Box::new(template)),
        pad,
        stops,
        tokenizer,
    })
}

/// Train a byte-level BPE (GPT-2 style: bytes mapped to printable
/// characters, no prefix space) with posttrain's chat template's special
/// tokens, and return its `tokenizer.json` text.
pub fn train_bpe(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<String, ChatError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        ChatError::new(TOKENIZER_FILE, format!("{what}: {e}"))
    };
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| fail("cannot build the tokenizer", &e))?;
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| fail("BPE training failed", &e))?;
    tokenizer
        .to_string(true)
        .map_err(|e| fail("cannot serialize the tokenizer", &e))
}

/// A Hugging Face `tokenizer.json` with posttrain's special tokens added
/// where missing (for a model without a chat template of its own).
pub struct WithChatTokens {
    /// The tokenizer to write.
    pub json: String,
    /// The tokens that were added.
    pub added: Vec<String>,
    /// Ids the tokenizer used before (largest id + 1) and uses now.
    pub vocab_before: usize,
    pub vocab_after: usize,
}

pub fn with_chat_tokens(path: &Path) -> Result<WithChatTokens, ChatError> {
    let (mut tokenizer, _) = read_tokenizer(path)?;
    let span = |t: &Tokenizer| {
        t.get_vocab(true)
            .values()
            .max()
            .map_or(0, |m| *m as usize + 1)
    };
    let vocab_before = span(&tokenizer);
    let added: Vec<String> = SPECIAL_TOKENS
        .iter()
        .filter(|t| tokenizer.token_to_id(t).is_none())
        .map(|t| t.to_string())
        .collect();
    let tokens: Vec<AddedToken> = added
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&tokens);
    let json = tokenizer
        .to_string(true)
        .map_err(|e| ChatError::new(path, format!("cannot serialize the tokenizer: {e}")))?;
    Ok(WithChatTokens {
        json,
        added,
        vocab_before,
        vocab_after: span(&tokenizer),
    })
}

//! Tokenizers and chat templates: the one place that turns conversations
//! into text and text into token ids. The data side (token tables, prompt
//! sets) and the model side (sampling) both use it.
//!
//! - [`builtin`]: posttrain's own template, for models without one.
//! - [`template`]: a model's own Jinja template, rendered as transformers
//!   renders it, with assistant spans for loss masks.
//! - [`tokenizer`]: a model folder's tokenizer with its template, padding
//!   and stop tokens.
//! - [`gguf_vocab`]: a GGUF file's vocabulary as a `tokenizer.json`.

pub mod builtin;
pub mod gguf_vocab;
pub mod template;
pub mod tokenizer;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use tokenizer::{LoadedTokenizer, TemplateChoice};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: &str) -> Message {
        Message {
            role: "user".into(),
            content: content.to_string(),
        }
    }
    pub fn assistant(content: &str) -> Message {
        Message {
            role: "assistant".into(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer or template that cannot be used, naming its file (the
/// template's own errors name their origin in the message: no path).
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", if path.as_os_str().is_empty() { String::new() } else { format!("{}: ", path.display()) })]
pub struct ChatError {
    pub path: PathBuf,
    pub message: String,
}

impl ChatError {
    pub fn new(path: impl Into<PathBuf>, message: impl Into<String>) -> ChatError {
        ChatError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<template::TemplateError> for ChatError {
    /// A template's errors already name their origin.
    fn from(e: template::TemplateError) -> ChatError {
        ChatError::new(PathBuf::new(), e.to_string())
    }
}

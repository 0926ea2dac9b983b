//! posttrain's own chat template, for models that have none (the synthetic
//! world's): every stage that turns a conversation
//! into tokens (SFT, preference stages, sampling, eval) uses these strings,
//! and the tokenizer stage adds them as special tokens.
//!
//! Each message is `<|role|>` + text + `<|end|>` with role `system`, `user`
//! or `assistant`; a prompt for generation ends right after `<|assistant|>`,
//! and a response is its text + `<|end|>`.

use super::Message;

/// Bump when the template changes: it is part of every tokenization cache
/// key, so cached token ids are never reused across templates.
pub const TEMPLATE_VERSION: u32 = 1;

/// Separates documents in a packed pre-training stream.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Fills batches to a common length; never trained on.
pub const PAD: &str = "<|pad|>";
pub const SYSTEM: &str = "<|system|>";
pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
/// Ends a turn; generation stops here.
pub const END_OF_TURN: &str = "<|end|>";

/// Special tokens, in the order they get the first ids.
pub const SPECIAL_TOKENS: [&str; 6] = [END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN];

/// The same template in Jinja, for files other tools read (GGUF export).
pub const JINJA: &str = "{% for m in messages %}{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'assistant' %}<|assistant|>{% else %}<|user|>{% endif %}{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

fn role_token(role: &str) -> &'static str {
    match role {
        "system" => SYSTEM,
        "assistant" => ASSISTANT,
        _ => USER,
    }
}

/// A conversation so far, ready for the assistant's response.
pub fn render_prompt(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(role_token(&m.role));
        out.push_str(&m.content);
        out.push_str(END_OF_TURN);
    }
    out.push_str(ASSISTANT);
    out
}

/// A whole conversation and the byte ranges of its assistant turns (each
/// text with its `<|end|>`): what a loss mask trains on.
pub fn assistant_spans(messages: &[Message]) -> (String, Vec<std::ops::Range<usize>>) {
    let mut out = String::new();
    let mut spans = Vec::new();
    for m in messages {
        out.push_str(role_token(&m.role));
        let start = out.len();
        out.push_str(&m.content);
        out.push_str(END_OF_TURN);
        if m.role == "assistant" {
            spans.push(start..out.len());
        }
    }
    (out, spans)
}

/// A single user question, ready for the response.
pub fn prompt_text(prompt: &str) -> String {
    render_prompt(&[Message::user(prompt)])
}

/// The response part, closed by the end-of-turn token.
pub fn response_text(response: &str) -> String {
    format!("{response}{END_OF_TURN}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_reads_in_order() {
        let text = prompt_text("Hi?") + &response_text("Hello.");
        assert_eq!(text, "<|user|>Hi?<|end|><|assistant|>Hello.<|end|>");
    }

    #[test]
    fn multi_turn_with_system() {
        let m = [
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message::user("Hi"),
            Message::assistant("Hello."),
            Message::user("2 plus 2?"),
        ];
        assert_eq!(
            render_prompt(&m),
            "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>2 plus 2?<|end|><|assistant|>"
        );
    }
}

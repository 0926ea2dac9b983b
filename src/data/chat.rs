//! The chat template, defined once: every stage that turns a conversation
//! into tokens (SFT, preference stages, sampling, eval) uses these strings,
//! and the tokenizer stage adds them as special tokens.
//!
//! A turn is `<|user|>` + text + `<|end|>`, then `<|assistant|>` + text +
//! `<|end|>`; a prompt for generation ends right after `<|assistant|>`.

/// Separates documents in a packed pre-training stream.
pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
/// Ends a turn; generation stops here.
pub const END_OF_TURN: &str = "<|end|>";
/// Fills batches to a common length; never trained on.
pub const PAD: &str = "<|pad|>";

/// Special tokens, in the order they get the first ids.
pub const SPECIAL_TOKENS: [&str; 5] = [END_OF_TEXT, PAD, USER, ASSISTANT, END_OF_TURN];

/// The prompt part of a single-turn conversation, ready for the response.
pub fn prompt_text(prompt: &str) -> String {
    format!("{USER}{prompt}{END_OF_TURN}{ASSISTANT}")
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
}

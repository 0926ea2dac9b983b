//! A model's own Jinja chat template, rendered the way Hugging Face
//! transformers renders it, plus the byte spans of assistant turns to train on.
//!
//! transformers compiles `chat_template` in an `ImmutableSandboxedEnvironment`
//! with `trim_blocks=True`, `lstrip_blocks=True`, the `loopcontrols` extension
//! and its own `{% generation %}` extension, overrides the `tojson` filter
//! with `json.dumps(x, ensure_ascii=False, indent=…, separators=…,
//! sort_keys=…)` and adds the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`. This module builds the same environment on minijinja:
//!
//! - whitespace: `trim_blocks` and `lstrip_blocks` on, the single trailing
//!   newline of the source dropped (Jinja2's `keep_trailing_newline=False`),
//!   no auto-escaping (the sandbox escapes nothing either);
//! - undefined values are lenient like Jinja2's default `Undefined`: they
//!   print as nothing, iterate as empty, are falsy and work with
//!   `is defined`, while an attribute of an undefined value is an error;
//! - `{% break %}` / `{% continue %}` (minijinja's `loop_controls`), macros,
//!   and Python's str/dict/list methods (`.strip()`, `.startswith()`,
//!   `.items()`, `.get()`, …) from `minijinja-contrib`'s pycompat;
//! - values print (and `|string` converts) as Python's `str()` would:
//!   `None`, `True`, `False`, `['a', 1]`, `{'k': 'v'}`, floats as
//!   `repr(float)` (`1e+20`, not minijinja's `100000000000000000000.0`);
//! - `tojson` is a port of `json.dumps` with transformers' defaults: no ASCII
//!   escaping, `", "`/`": "` separators (`","`/`": "` once `indent` is set),
//!   arguments positional in transformers' order (`ensure_ascii`, `indent`,
//!   `separators`, `sort_keys`) or by keyword, dict order kept;
//! - `raise_exception(msg)` aborts the render with
//!   [`TemplateError::Raised`] ("ORIGIN: the chat template raised: MSG");
//! - `strftime_now(fmt)` is pinned to 2026-01-01 00:00:00 (a Thursday, UTC)
//!   instead of the wall clock, so a render (and so a cache key or a token
//!   stream) never depends on the day it ran: Llama 3.2's
//!   `strftime_now("%d %b %Y")` is always "01 Jan 2026";
//! - the context holds `messages` ({role, content} maps), the
//!   `add_generation_prompt` flag, `bos_token`, `eos_token`, and `tools` and
//!   `documents` as `none`, as `apply_chat_template` passes them when no tools
//!   are given; anything else a template reads (`enable_thinking`,
//!   `date_string`, `custom_tools`) is undefined, as there.
//!
//! `{% generation %}…{% endgeneration %}` (transformers' extension for
//! `return_assistant_tokens_mask`) is rewritten before compiling into two
//! nested `{% if true %}` blocks that print private-use sentinel characters
//! around the body, keeping the tags' whitespace control and block nesting;
//! the sentinels are stripped from the output and their positions recorded.

use std::fmt::Write as _;
use std::ops::Range;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};
use serde::Serialize;

use super::Message;

/// The name the template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat_template";
/// Printed where a `{% generation %}` block starts (a private-use character).
const GEN_START: char = '\u{F0001}';
/// Printed where a `{% generation %}` block ends.
const GEN_END: char = '\u{F0002}';

/// Why a chat template could not be compiled or rendered; every message
/// starts with the template's origin (the file it came from).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("{origin}: chat template syntax error at line {line}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    /// The template called `raise_exception(message)`.
    #[error("{origin}: the chat template raised: {message}")]
    Raised { origin: String, message: String },
    /// Rendering failed for another reason (undefined attribute, bad filter
    /// argument, …).
    #[error("{origin}: rendering the chat template failed: {message}")]
    Render { origin: String, message: String },
    /// A shorter render is not a prefix of the longer one, so the text to
    /// train on cannot be cut out of it.
    #[error(
        "{origin}: {context} is not a prefix of the render that follows it \
         (the template renders earlier text differently once later turns exist), \
         so the span to train on cannot be cut from it"
    )]
    NotPrefix { origin: String, context: String },
    /// Rendering the turns up to an assistant turn failed (while finding
    /// the span of that turn).
    #[error("{origin}: assistant turn {turn}: rendering the turns up to it failed: {cause}")]
    Turn {
        origin: String,
        turn: usize,
        cause: String,
    },
    /// `{% generation %}` blocks rendered out of order, or an input holds the
    /// sentinel characters that track them.
    #[error("{origin}: {message}")]
    Generation { origin: String, message: String },
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
    end_of_turn: Option<String>,
    has_generation: bool,
}

/// What a template sees, as `apply_chat_template` passes it.
#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
    tools: Option<()>,
    documents: Option<()>,
}

/// The error `raise_exception` attaches, found again when the render fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

impl ChatTemplate {
    /// Compiles `source` (the `chat_template` of `origin`, a file name used
    /// in every error). `end_of_turn` is the marker that closes a turn
    /// (`<|im_end|>`, `<|eot_id|>`): trained-on text is cut right after it.
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
        end_of_turn: Option<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|err| TemplateError::Syntax {
                origin: origin.to_string(),
                line: err.line().unwrap_or(0),
                message: describe(&err),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            end_of_turn: end_of_turn.filter(|marker| !marker.is_empty()),
            has_generation,
        })
    }

    /// The template's text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// Renders `messages`, ending with the assistant header when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        Ok(self.render_tracked(messages, add_generation_prompt)?.0)
    }

    /// The prompt (rendered with the generation prompt) and the response
    /// text that follows it in the render of prompt + assistant(response),
    /// cut just after the end-of-turn marker.
    pub fn prompt_and_response(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<(String, String), TemplateError> {
        let prompt_text = self.render(prompt, true)?;
        let mut conversation = prompt.to_vec();
        conversation.push(Message {
            role: "assistant".to_string(),
            content: response.to_string(),
        });
        let full = self.render(&conversation, false)?;
        let Some(rest) = full.strip_prefix(prompt_text.as_str()) else {
            return Err(
                self.not_prefix("the prompt rendered with add_generation_prompt".to_string())
            );
        };
        let end = self.cut_after_end_of_turn(rest, 0, rest.len());
        let response_text = rest[..end].to_string();
        Ok((prompt_text, response_text))
    }

    /// The full render of `messages` and the byte ranges of it to train on:
    /// the `{% generation %}` blocks where the template has them, otherwise
    /// each assistant turn from the end of the render of the turns before it
    /// (with the generation prompt) to the end of its own render, cut after
    /// the end-of-turn marker.
    pub fn assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<Range<usize>>), TemplateError> {
        let (full, generation_spans) = self.render_tracked(messages, false)?;
        if self.has_generation {
            return Ok((full, generation_spans));
        }
        let mut spans = Vec::new();
        for (turn, message) in messages.iter().enumerate() {
            if message.role == "assistant" {
                spans.push(self.turn_span(messages, turn, &full)?);
            }
        }
        Ok((full, spans))
    }

    /// The span of assistant turn `turn` in `full`, found by prefix renders.
    fn turn_span(
        &self,
        messages: &[Message],
        turn: usize,
        full: &str,
    ) -> Result<Range<usize>, TemplateError> {
        let before = self
            .render(&messages[..turn], true)
            .map_err(|err| self.in_turn(&err, turn))?;
        if !full.starts_with(&before) {
            return Err(self.not_prefix(format!(
                "turn {turn} (assistant): the render of the {turn} turn(s) before it \
                 with add_generation_prompt"
            )));
        }
        let through = self
            .render(&messages[..=turn], false)
            .map_err(|err| self.in_turn(&err, turn))?;
        if !full.starts_with(&through) || through.len() < before.len() {
            return Err(self.not_prefix(format!(
                "turn {turn} (assistant): the render of the conversation up to and including it"
            )));
        }
        let end = self.cut_after_end_of_turn(full, before.len(), through.len());
        Ok(before.len()..end)
    }

    /// The end of `text[start..end]` once cut just after its last end-of-turn
    /// marker; `end` itself when there is no marker or it does not occur.
    fn cut_after_end_of_turn(&self, text: &str, start: usize, end: usize) -> usize {
        let Some(marker) = &self.end_of_turn else {
            return end;
        };
        match text[start..end].rfind(marker.as_str()) {
            Some(at) => start + at + marker.len(),
            None => end,
        }
    }

    /// Renders and strips the generation sentinels, returning their spans.
    fn render_tracked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>), TemplateError> {
        if self.has_generation {
            self.refuse_sentinels(messages)?;
        }
        let context = Context {
            messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            tools: None,
            documents: None,
        };
        let raw = self
            .env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(|err| self.render_error(&err))?;
        if !self.has_generation {
            return Ok((raw, Vec::new()));
        }
        take_generation_spans(&raw).map_err(|message| TemplateError::Generation {
            origin: self.origin.clone(),
            message,
        })
    }

    /// Errors if an input already holds a generation sentinel character.
    fn refuse_sentinels(&self, messages: &[Message]) -> Result<(), TemplateError> {
        let has_sentinel = |text: &str| text.contains([GEN_START, GEN_END]);
        let texts = messages
            .iter()
            .flat_map(|m| [m.role.as_str(), m.content.as_str()])
            .chain([self.bos_token.as_str(), self.eos_token.as_str()]);
        for text in texts {
            if has_sentinel(text) {
                return Err(TemplateError::Generation {
                    origin: self.origin.clone(),
                    message: format!(
                        "an input holds U+{:X} or U+{:X}, which track {{% generation %}} blocks",
                        GEN_START as u32, GEN_END as u32
                    ),
                });
            }
        }
        Ok(())
    }

    /// `err`, raised while rendering the turns up to assistant turn `turn`.
    fn in_turn(&self, err: &TemplateError, turn: usize) -> TemplateError {
        let text = err.to_string();
        let own_prefix = format!("{}: ", self.origin);
        let cause = text.strip_prefix(&own_prefix).unwrap_or(&text).to_string();
        TemplateError::Turn {
            origin: self.origin.clone(),
            turn,
            cause,
        }
    }

    fn not_prefix(&self, context: String) -> TemplateError {
        TemplateError::NotPrefix {
            origin: self.origin.clone(),
            context,
        }
    }

    fn render_error(&self, err: &Error) -> TemplateError {
        if let Some(message) = raised_message(err) {
            return TemplateError::Raised {
                origin: self.origin.clone(),
                message,
            };
        }
        let mut message = describe(err);
        if let Some(line) = err.line() {
            let _ = write!(message, " (line {line})");
        }
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            let _ = write!(message, ": {cause}");
            source = cause.source();
        }
        TemplateError::Render {
            origin: self.origin.clone(),
            message,
        }
    }
}

/// The environment transformers compiles chat templates in (see the module
/// documentation).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", |value: &Value| py_str(value));
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// `kind: detail` of a minijinja error, without its file and line.
fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

/// The message of a `raise_exception` call somewhere in `err`'s chain.
fn raised_message(err: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(error) = current {
        if let Some(raised) = error.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        current = error.source();
    }
    None
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: Value) -> Result<Value, Error> {
    let text = py_str(&message);
    Err(Error::new(ErrorKind::InvalidOperation, text.clone()).with_source(Raised(text)))
}

// ---------------------------------------------------------------------------
// {% generation %} blocks

/// Rewrites each `{% generation %}` / `{% endgeneration %}` tag into blocks
/// that print the sentinels, keeping the tag's whitespace-control modifiers
/// at its two ends and its line count; says whether any tag was found.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut found = false;
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        match parse_generation_tag(tag) {
            Some((len, opening, left, right)) => {
                found = true;
                out.push_str(&generation_replacement(opening, left, right));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// If `tag` starts with a generation tag: its length, whether it opens the
/// block, and its left and right modifiers (`""`, `"-"` or `"+"`).
fn parse_generation_tag(tag: &str) -> Option<(usize, bool, &str, &str)> {
    let body = tag.strip_prefix("{%")?;
    let (left, body) = split_modifier_start(body);
    let body = body.trim_start();
    let name_len = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    let opening = match &body[..name_len] {
        "generation" => true,
        "endgeneration" => false,
        _ => return None,
    };
    let body = body[name_len..].trim_start();
    let (right, body) = split_modifier_start(body);
    let after = body.strip_prefix("%}")?;
    Some((tag.len() - after.len(), opening, left, right))
}

/// Splits a leading `-` or `+` whitespace modifier off `text`.
fn split_modifier_start(text: &str) -> (&str, &str) {
    if text.starts_with(['-', '+']) {
        text.split_at(1)
    } else {
        ("", text)
    }
}

/// The blocks standing for one generation tag: two `if`s opened (or closed)
/// around the sentinel's print, the outer tags carrying the modifiers.
fn generation_replacement(opening: bool, left: &str, right: &str) -> String {
    if opening {
        format!("{{%{left} if true %}}{{{{ '{GEN_START}' }}}}{{% if true {right}%}}")
    } else {
        format!("{{%{left} endif %}}{{{{ '{GEN_END}' }}}}{{% endif {right}%}}")
    }
}

/// Strips the sentinels from `raw`, returning the text and the non-empty
/// ranges they enclosed.
fn take_generation_spans(raw: &str) -> Result<(String, Vec<Range<usize>>), String> {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GEN_START if open.is_some() => {
                return Err("a {% generation %} block was rendered inside another".into())
            }
            GEN_START => open = Some(text.len()),
            GEN_END => {
                let start = open
                    .take()
                    .ok_or("a {% endgeneration %} was rendered without its block")?;
                if start < text.len() {
                    spans.push(start..text.len());
                }
            }
            _ => text.push(c),
        }
    }
    if open.is_some() {
        return Err("a {% generation %} block was rendered without its end".into());
    }
    Ok((text, spans))
}

// ---------------------------------------------------------------------------
// Printing values as Python does

/// Prints values as Jinja2 does, i.e. with Python's `str()`.
fn python_formatter(out: &mut Output, _state: &State, value: &Value) -> Result<(), Error> {
    if value.is_undefined() {
        return Ok(());
    }
    let text = py_str(value);
    out.write_str(&text)
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "could not write the output"))
}

/// Python's `str(value)`.
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => py_repr(value),
    }
}

/// Python's `repr(value)` for the values a template handles.
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool if value.is_true() => "True".to_string(),
        ValueKind::Bool => "False".to_string(),
        ValueKind::Number => py_number(value, false),
        ValueKind::String => py_quote(value.as_str().unwrap_or_default()),
        ValueKind::Seq => py_seq_repr(value),
        ValueKind::Map => py_map_repr(value),
        _ => value.to_string(),
    }
}

fn py_seq_repr(value: &Value) -> String {
    let Ok(items) = value.try_iter() else {
        return value.to_string();
    };
    let items: Vec<String> = items.map(|item| py_repr(&item)).collect();
    format!("[{}]", items.join(", "))
}

fn py_map_repr(value: &Value) -> String {
    let Ok(keys) = value.try_iter() else {
        return value.to_string();
    };
    let entries: Vec<String> = keys
        .map(|key| {
            let item = value.get_item(&key).unwrap_or_default();
            format!("{}: {}", py_repr(&key), py_repr(&item))
        })
        .collect();
    format!("{{{}}}", entries.join(", "))
}

/// A Python string literal as `repr` writes it.
fn py_quote(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// An integer as Python writes it, a float as `repr(float)` (or as
/// `json.dumps` writes it when `json`).
fn py_number(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(float) => py_float(float, json),
        Err(_) => value.to_string(),
    }
}

/// `repr(float)`: the shortest round-trip digits, in exponent form when the
/// exponent is below -4 or at least 16. `json.dumps` differs only for NaN
/// and infinities.
fn py_float(float: f64, json: bool) -> String {
    if float.is_nan() {
        return if json { "NaN" } else { "nan" }.to_string();
    }
    if float.is_infinite() {
        let name = if json { "Infinity" } else { "inf" };
        return if float < 0.0 {
            format!("-{name}")
        } else {
            name.to_string()
        };
    }
    let scientific = format!("{float:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let mut fixed = format!("{float}");
        if !fixed.contains('.') {
            fixed.push_str(".0");
        }
        return fixed;
    }
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

// ---------------------------------------------------------------------------
// tojson: Python's json.dumps

/// How `json.dumps` was asked to write.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// `tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    if args.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments \
             (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let positional = |index: usize| args.get(index).cloned();
    let ensure_ascii = json_argument(positional(0), &kwargs, "ensure_ascii")?;
    let indent = json_argument(positional(1), &kwargs, "indent")?;
    let separators = json_argument(positional(2), &kwargs, "separators")?;
    let sort_keys = json_argument(positional(3), &kwargs, "sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = json_indent(indent.as_ref())?;
    let (item_separator, key_separator) = json_separators(separators.as_ref(), indent.is_some())?;
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

/// One argument of `tojson`, given by position or by keyword (not both);
/// `None` for an absent or `none` argument.
fn json_argument(
    positional: Option<Value>,
    kwargs: &Kwargs,
    name: &str,
) -> Result<Option<Value>, Error> {
    let keyword: Option<Value> = kwargs.get(name)?;
    if positional.is_some() && keyword.is_some() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            format!("tojson got multiple values for argument '{name}'"),
        ));
    }
    Ok(positional.or(keyword).filter(|v| !v.is_none()))
}

/// `indent` as the string each level adds: an int of spaces or a string.
fn json_indent(indent: Option<&Value>) -> Result<Option<String>, Error> {
    let Some(indent) = indent else {
        return Ok(None);
    };
    if let Some(text) = indent.as_str() {
        return Ok(Some(text.to_string()));
    }
    match indent.as_i64() {
        Some(spaces) => Ok(Some(" ".repeat(usize::try_from(spaces).unwrap_or(0)))),
        None => Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: indent must be an integer or a string",
        )),
    }
}

/// `separators` as (item, key) strings, defaulting as `json.dumps` does.
fn json_separators(separators: Option<&Value>, indented: bool) -> Result<(String, String), Error> {
    let Some(separators) = separators else {
        let item = if indented { "," } else { ", " };
        return Ok((item.to_string(), ": ".to_string()));
    };
    let parts: Vec<Value> = separators.try_iter()?.collect();
    match parts.as_slice() {
        [item, key] if item.as_str().is_some() && key.as_str().is_some() => Ok((
            item.as_str().unwrap_or_default().to_string(),
            key.as_str().unwrap_or_default().to_string(),
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: separators must be an (item_separator, key_separator) pair of strings",
        )),
    }
}

fn not_serializable(value: &Value) -> Error {
    let kind = match value.kind() {
        ValueKind::Undefined => "Undefined".to_string(),
        kind => kind.to_string(),
    };
    Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: Object of type {kind} is not JSON serializable"),
    )
}

/// Writes `value` as `json.dumps` would at nesting `depth`.
fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(value, true)),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Seq => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_list(out, &items, style, depth)?;
        }
        ValueKind::Map => write_json_map(out, value, style, depth)?,
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// The newline and indentation before an item at `depth`, or nothing.
fn json_newline(out: &mut String, style: &JsonStyle, depth: usize) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_json_list(
    out: &mut String,
    items: &[Value],
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    if items.is_empty() {
        out.push_str("[]");
        return Ok(());
    }
    out.push('[');
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push_str(&style.item_separator);
        }
        json_newline(out, style, depth + 1);
        write_json(out, item, style, depth + 1)?;
    }
    json_newline(out, style, depth);
    out.push(']');
    Ok(())
}

fn write_json_map(
    out: &mut String,
    map: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    let mut entries = Vec::new();
    for key in map.try_iter()? {
        let item = map.get_item(&key)?;
        entries.push((json_key(&key)?, item));
    }
    if style.sort_keys {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
    if entries.is_empty() {
        out.push_str("{}");
        return Ok(());
    }
    out.push('{');
    for (index, (key, item)) in entries.iter().enumerate() {
        if index > 0 {
            out.push_str(&style.item_separator);
        }
        json_newline(out, style, depth + 1);
        write_json_string(out, key, style);
        out.push_str(&style.key_separator);
        write_json(out, item, style, depth + 1)?;
    }
    json_newline(out, style, depth);
    out.push('}');
    Ok(())
}

/// A dict key as `json.dumps` turns it into a string.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".to_string()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::Number => Ok(py_number(key, true)),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "tojson: keys must be str, int, float, bool or None, not {}",
                key.kind()
            ),
        )),
    }
}

/// A JSON string as `json.dumps` escapes it.
fn write_json_string(out: &mut String, text: &str, style: &JsonStyle) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => push_json_escape(out, c as u32),
            c if style.ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_json_escape(out, u32::from(*unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_json_escape(out: &mut String, unit: u32) {
    let _ = write!(out, "\\u{unit:04x}");
}

// ---------------------------------------------------------------------------
// strftime_now, pinned

/// `strftime_now(format)` at the pinned instant 2026-01-01 00:00:00
/// (Thursday, UTC), with glibc's directives and its `-` (no padding) flag;
/// an unknown directive stays as written, as glibc leaves it.
fn strftime_now(format: &str) -> String {
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(directive) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        match pinned_directive(directive) {
            Some(text) if unpadded => out.push_str(unpad(text)),
            Some(text) => out.push_str(text),
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(directive);
            }
        }
    }
    out
}

/// The pinned instant's text for one strftime directive.
fn pinned_directive(directive: char) -> Option<&'static str> {
    Some(match directive {
        'a' => "Thu",
        'A' => "Thursday",
        'b' | 'h' => "Jan",
        'B' => "January",
        'c' => "Thu Jan  1 00:00:00 2026",
        'C' => "20",
        'd' => "01",
        'D' | 'x' => "01/01/26",
        'e' => " 1",
        'f' => "000000",
        'F' => "2026-01-01",
        'g' | 'y' => "26",
        'G' | 'Y' => "2026",
        'H' | 'M' | 'S' | 'U' | 'W' => "00",
        'I' | 'l' => "12",
        'j' => "001",
        'k' => " 0",
        'm' | 'V' => "01",
        'n' => "\n",
        'p' => "AM",
        'P' => "am",
        'r' => "12:00:00 AM",
        'R' => "00:00",
        's' => "1767225600",
        't' => "\t",
        'T' | 'X' => "00:00:00",
        'u' | 'w' => "4",
        'z' | 'Z' => "",
        '%' => "%",
        _ => return None,
    })
}

/// A numeric field without its leading zeros or spaces (`%-d`).
fn unpad(text: &str) -> &str {
    let trimmed = text.trim_start_matches(['0', ' ']);
    if trimmed.is_empty() && !text.is_empty() {
        &text[text.len() - 1..]
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's `chat_template`, verbatim.
    const SMOLLM2: &str = r#"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

    /// Llama 3.1/3.2-Instruct's template (the date through `strftime_now`).
    const LLAMA3: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    /// A Mistral-Instruct-style template that refuses non-alternating roles.
    const MISTRAL: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"#;

    /// Qwen2.5-Instruct's template.
    const QWEN25: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// ChatML with transformers' `{% generation %}` markers around the
    /// assistant text and its `<|im_end|>`.
    const CHATML_GENERATION: &str = r#"{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// The same with plain tags on their own lines, leaning on
    /// trim_blocks/lstrip_blocks instead of `-`.
    const CHATML_GENERATION_PLAIN: &str = r#"{% for message in messages %}
{% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}
{{ message['content'] }}<|im_end|>
{% endgeneration %}
{% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"#;

    /// Environment details: Python printing, undefined values, loop
    /// controls, pycompat methods, namespaces, lstrip/trim around comments.
    const MISC: &str = r#"{# a comment #}
    {% set ns = namespace(count=0) %}
{{ none }}|{{ true }}|{{ false }}|{{ [1, 'a', none, 'it\'s'] }}|{{ {'k': 'v', 'n': 2} }}|{{ 1.5 }}|{{ 1e20 }}|{{ 3 }}
{{ undefined_thing }}|{{ undefined_thing is defined }}|{{ enable_thinking is defined }}|{{ tools }}|{{ tools is none }}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
  [{{ m.content.strip().upper() }}|{{ m.content.startswith(' ') }}|{{ m.content.split()|join('+') }}]
    {% if ns.count >= 2 %}{% break %}{% endif %}
{% endfor %}
{% for k, v in {'a': 1, 'b': [2]}.items() %}{{ k }}={{ v }};{% endfor %}
{{ ns.count }}|{{ messages|length }}|{{ 'x' ~ 'y' }}|{{ '  pad  '|trim }}|{{ messages[-1]['role'] }}|{{ loop_undefined|default('dflt') }}|{{ ['a', none]|string }}
"#;

    /// Whitespace control, raw blocks, macros, filters, tests, operators,
    /// pycompat methods and number printing, all checked against jinja2.
    const JINJA2_PARITY: &str = r#"  {% if true %}
    indented
  {% endif %}
  {#- comment #}
text {%+ if true %}keep{% endif %}
{% raw %}{{ not rendered }}{% endraw %}
{{- ' dash' -}}
   after
{% macro greet(name) %}Hi {{ name }}!{% endmacro %}
{{ greet('you') }}
{% for i in range(3) %}{{ loop.index }}{{ ',' if not loop.last }}{% endfor %}
{{ messages|map(attribute='role')|join(',') }}
{{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{{ (messages|last).content|replace('a', 'A') }}
{{ "%s-%d"|format('x', 3) }}
{{ messages[0].content[1:3] }} {{ 'abc'[::-1] }}
{{ 'x' in 'xyz' }} {{ 10 // 3 }} {{ 10 / 4 }} {{ 2 ** 3 }} {{ 7 % 3 }} {{ 1 == 1.0 }}
{{ messages[0].get('role') }} {{ messages[0].get('nope', 'd') }} {{ messages[0].keys()|list }}
{{ 'a,b'.split(',') }} {{ '  x '.lstrip() }}| {{ 'Hello'.endswith('lo') }} {{ 'ab'.title() }}
{% set x = namespace(found=false) %}{% for m in messages %}{% if m.role == 'assistant' %}{% set x.found = true %}{% endif %}{% endfor %}{{ x.found }}
{{ messages|length > 1 and messages[1].role }} {{ none is none }} {{ 'abc' is string }} {{ messages is iterable }} {{ 3 is number }}
{{ messages[0]['content'] | tojson }}{{ [1, [2, {'a': none}]] | tojson(indent=' ') }}
{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, indent=0) }}
{%- for m in messages -%}
  {{ m.role[0] | upper }}
{%- endfor %}

{{ 1.0 }} {{ 0.1 + 0.2 }} {{ 100000000000000000.0 }} {{ -0.0 }} {{ 3 / 1 }}
"#;

    /// `tojson` with the options transformers exposes.
    const TOJSON: &str = r#"{%- set data = {'name': 'café', 'nested': {'list': [1, 2.5, none, true, false], 'emoji': '🙂', 'q': 'a"b\\c\n\t'}, 'é': [], 'big': 1e16, 'small': 0.00001, 'empty': {}} -%}
{{ data | tojson }}
{{ data | tojson(indent=2) }}
{{ data | tojson(ensure_ascii=true) }}
{{ data | tojson(separators=(',', ':'), sort_keys=true) }}
{{ messages | tojson }}
"#;

    const ORIGIN: &str = "models/x/tokenizer_config.json";

    fn message(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }

    fn template(source: &str, bos: &str, eos: &str, end_of_turn: Option<&str>) -> ChatTemplate {
        ChatTemplate::new(source, ORIGIN, bos, eos, end_of_turn.map(str::to_string))
            .expect("template compiles")
    }

    fn chatml(source: &str) -> ChatTemplate {
        template(source, "", "<|im_end|>", Some("<|im_end|>"))
    }

    fn llama3() -> ChatTemplate {
        template(
            LLAMA3,
            "<|begin_of_text|>",
            "<|eot_id|>",
            Some("<|eot_id|>"),
        )
    }

    fn conversation() -> Vec<Message> {
        vec![
            message("system", "Be brief."),
            message("user", "What is the capital of France?"),
            message("assistant", "Paris."),
            message("user", "And of Italy?"),
            message("assistant", "Rome, of course."),
        ]
    }

    fn covered(text: &str, spans: &[Range<usize>]) -> Vec<String> {
        spans
            .iter()
            .map(|span| text[span.clone()].to_string())
            .collect()
    }

    #[test]
    fn chat_templates_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn smollm2_renders_a_question_with_the_generation_prompt() {
        let rendered = chatml(SMOLLM2)
            .render(&[message("user", "What is 2+2?")], true)
            .unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = chatml(SMOLLM2)
            .render(&[message("system", "S"), message("user", "Q")], false)
            .unwrap();
        assert_eq!(
            with_system,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_renders_bos_headers_trimmed_content_and_the_pinned_date() {
        let rendered = llama3()
            .render(
                &[message("system", " Be brief. "), message("user", "  Hi!\n")],
                true,
            )
            .unwrap();
        assert_eq!(
            rendered,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2026\n\n\
             Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn mistral_style_template_raises_on_roles_out_of_order() {
        let mistral = template(MISTRAL, "<s>", "</s>", Some("</s>"));
        let ok = mistral
            .render(
                &[message("user", "Hi"), message("assistant", "Hello")],
                false,
            )
            .unwrap();
        assert_eq!(ok, "<s>[INST] Hi [/INST]Hello</s>");
        let err = mistral
            .render(&[message("user", "a"), message("user", "b")], true)
            .unwrap_err();
        assert!(matches!(err, TemplateError::Raised { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{ORIGIN}: the chat template raised: \
                 Conversation roles must alternate user/assistant/user/assistant/..."
            )
        );
    }

    #[test]
    fn qwen25_renders_its_default_system_message_without_tools() {
        let qwen = chatml(QWEN25);
        let rendered = qwen.render(&[message("user", "Hi")], true).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let rendered = qwen
            .render(&[message("system", "S"), message("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_spans_cover_exactly_the_assistant_turns() {
        for source in [SMOLLM2, QWEN25] {
            let (full, spans) = chatml(source).assistant_spans(&conversation()).unwrap();
            assert_eq!(
                covered(&full, &spans),
                ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
            );
            assert!(full.ends_with("Rome, of course.<|im_end|>\n"));
        }
    }

    #[test]
    fn llama3_spans_cover_exactly_the_assistant_turns() {
        let (full, spans) = llama3().assistant_spans(&conversation()).unwrap();
        assert_eq!(
            covered(&full, &spans),
            ["Paris.<|eot_id|>", "Rome, of course.<|eot_id|>"]
        );
        let mistral = template(MISTRAL, "<s>", "</s>", Some("</s>"));
        let (full, spans) = mistral.assistant_spans(&conversation()[1..]).unwrap();
        assert_eq!(
            covered(&full, &spans),
            ["Paris.</s>", "Rome, of course.</s>"]
        );
    }

    #[test]
    fn prompt_and_response_cut_after_the_end_of_turn() {
        let prompt = &conversation()[..2];
        let (prompt_text, response) = chatml(SMOLLM2)
            .prompt_and_response(prompt, "Paris.")
            .unwrap();
        assert!(prompt_text.ends_with("<|im_start|>assistant\n"));
        assert_eq!(response, "Paris.<|im_end|>");
        let (prompt_text, response) = llama3().prompt_and_response(prompt, "Paris.").unwrap();
        assert!(prompt_text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        assert_eq!(response, "Paris.<|eot_id|>");
        let no_marker = template(SMOLLM2, "", "", None);
        let (_, response) = no_marker.prompt_and_response(prompt, "Paris.").unwrap();
        assert_eq!(response, "Paris.<|im_end|>\n");
    }

    #[test]
    fn generation_blocks_give_the_spans() {
        // The plain variant's blocks end after the newline that follows
        // `<|im_end|>` in the source, so jinja2 tracks that newline too.
        let cases = [
            (
                CHATML_GENERATION,
                ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"],
            ),
            (
                CHATML_GENERATION_PLAIN,
                ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"],
            ),
        ];
        for (source, expected) in cases {
            let tracked = chatml(source);
            assert!(tracked.has_generation_blocks());
            let (full, spans) = tracked.assistant_spans(&conversation()).unwrap();
            let plain = chatml(SMOLLM2).render(&conversation(), false).unwrap();
            assert_eq!(full, plain);
            assert_eq!(covered(&full, &spans), expected);
            let prompt = tracked.render(&conversation()[..4], true).unwrap();
            assert!(!prompt.contains([GEN_START, GEN_END]));
            assert!(prompt
                .ends_with("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"));
        }
    }

    #[test]
    fn sentinels_in_inputs_are_refused() {
        let tracked = chatml(CHATML_GENERATION);
        let err = tracked
            .render(&[message("user", &format!("a{GEN_START}b"))], true)
            .unwrap_err();
        assert!(err.to_string().starts_with(ORIGIN), "{err}");
    }

    #[test]
    fn unbalanced_generation_blocks_are_syntax_errors() {
        let source = "{% for m in messages %}{% generation %}{{ m.content }}{% endfor %}";
        let err = ChatTemplate::new(source, ORIGIN, "", "", None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax { .. }), "{err:?}");
    }

    #[test]
    fn syntax_errors_name_the_origin_and_line() {
        let source = "{% for m in messages %}\n{{ m.content }}\n{% endif %}";
        let err = ChatTemplate::new(source, ORIGIN, "", "", None).unwrap_err();
        match &err {
            TemplateError::Syntax { origin, line, .. } => {
                assert_eq!(origin, ORIGIN);
                assert_eq!(*line, 3);
            }
            other => panic!("not a syntax error: {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{ORIGIN}: chat template syntax error at line 3: syntax error:"
            )),
            "{text}"
        );
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        let err = chatml(source)
            .render(&[message("system", "S")], true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{ORIGIN}: the chat template raised: System role not supported")
        );
    }

    #[test]
    fn other_render_errors_name_the_origin() {
        let err = chatml("{{ nothing.attribute }}")
            .render(&[], true)
            .unwrap_err();
        assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!("{ORIGIN}: rendering")),
            "{err}"
        );
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        // Expected lines printed by Python 3.11's json.dumps on the same data
        // (ensure_ascii=False unless said otherwise).
        let rendered = chatml(TOJSON)
            .render(&[message("user", "naïve \"quote\"")], false)
            .unwrap();
        let expected = concat!(
            r#"{"name": "café", "nested": {"list": [1, 2.5, null, true, false], "emoji": "🙂", "q": "a\"b\\c\n\t"}, "é": [], "big": 1e+16, "small": 1e-05, "empty": {}}"#,
            "\n",
            r#"{
  "name": "café",
  "nested": {
    "list": [
      1,
      2.5,
      null,
      true,
      false
    ],
    "emoji": "🙂",
    "q": "a\"b\\c\n\t"
  },
  "é": [],
  "big": 1e+16,
  "small": 1e-05,
  "empty": {}
}"#,
            "\n",
            r#"{"name": "caf\u00e9", "nested": {"list": [1, 2.5, null, true, false], "emoji": "\ud83d\ude42", "q": "a\"b\\c\n\t"}, "\u00e9": [], "big": 1e+16, "small": 1e-05, "empty": {}}"#,
            "\n",
            r#"{"big":1e+16,"empty":{},"name":"café","nested":{"emoji":"🙂","list":[1,2.5,null,true,false],"q":"a\"b\\c\n\t"},"small":1e-05,"é":[]}"#,
            "\n",
            r#"[{"role": "user", "content": "naïve \"quote\""}]"#,
        );
        assert_eq!(rendered, expected);
    }

    #[test]
    fn strftime_now_is_pinned() {
        let source = "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B') }}|{{ strftime_now('%-d/%-m %j %% %Q') }}";
        let rendered = chatml(source).render(&[], false).unwrap();
        assert_eq!(
            rendered,
            "01 Jan 2026|2026-01-01 00:00:00 Thursday January|1/1 001 % %Q"
        );
    }

    #[test]
    fn environment_behaves_as_jinja2() {
        let rendered = chatml(MISC)
            .render(
                &[
                    message("system", "ignored"),
                    message("user", " hello world "),
                    message("assistant", "b c"),
                    message("user", "never"),
                ],
                false,
            )
            .unwrap();
        // Printed by jinja2 3.1 with transformers' environment.
        let expected = "None|True|False|[1, 'a', None, \"it's\"]|{'k': 'v', 'n': 2}|1.5|1e+20|3\n\
                        |False|False|None|True\n  [HELLO WORLD|True|hello+world]\n  [B C|False|b+c]\n\
                        a=1;b=[2];2|4|xy|pad|user|dflt|['a', None]";
        assert_eq!(rendered, expected);
    }

    #[test]
    fn filters_whitespace_and_numbers_match_jinja2() {
        let rendered = chatml(JINJA2_PARITY)
            .render(&conversation(), false)
            .unwrap();
        // Printed by jinja2 3.1 with transformers' environment.
        let expected = "    indented\ntext keep{{ not rendered }} dashafter\nHi you!\n\
            1,2,3system,user,assistant,user,assistant\n2\nRome, of course.\nx-3\ne  cba\n\
            True 3 2.5 8 1 True\nsystem d ['role', 'content']\n['a', 'b'] x | True Ab\nTrue\n\
            user True True True True\n\"Be brief.\"[\n 1,\n [\n  2,\n  {\n   \"a\": null\n  }\n ]\n]\n\
            {\n\"a\": 2,\n\"b\": 1\n}SUAUA\n1.0 0.30000000000000004 1e+17 -0.0 3.0";
        assert_eq!(rendered, expected);
    }

    #[test]
    fn prefix_mismatches_are_errors_naming_the_turn() {
        let source =
            "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.content }}{% endfor %}";
        let rewriting = chatml(source);
        let err = rewriting
            .prompt_and_response(&[message("user", "q")], "a")
            .unwrap_err();
        assert!(matches!(err, TemplateError::NotPrefix { .. }), "{err:?}");
        assert!(err.to_string().starts_with(ORIGIN), "{err}");
        let err = rewriting
            .assistant_spans(&[message("user", "q"), message("assistant", "a")])
            .unwrap_err();
        assert!(err.to_string().contains("turn 1 (assistant)"), "{err}");
    }

    #[test]
    fn prefix_render_errors_name_the_turn() {
        // Llama 3 reads messages[0], so the empty prefix before a leading
        // assistant turn cannot be rendered.
        let err = llama3()
            .assistant_spans(&[message("assistant", "a"), message("user", "q")])
            .unwrap_err();
        assert!(
            matches!(err, TemplateError::Turn { turn: 0, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("{ORIGIN}: assistant turn 0: rendering")),
            "{err}"
        );
    }
}

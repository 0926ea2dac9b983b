//! The dataset formats people bring, read into internal rows.
//!
//! | format           | columns                                                | rows                          |
//! |------------------|--------------------------------------------------------|-------------------------------|
//! | `corpus`         | `text`                                                 | documents                     |
//! | `demonstrations` | `prompt` + `response` (or `completion`)                | one [`Demonstration`] each    |
//! | `conversations`  | `messages` = list of {role, content}, ends with assistant | one [`Demonstration`] each |
//! | `comparisons`    | `prompt`, `chosen`, `rejected` (TRL; text or messages), optional `margin` | one [`Comparison`] |
//! | `hh_rlhf`        | `chosen`, `rejected` as "\n\nHuman: ...\n\nAssistant: ..." transcripts | one [`Comparison`] |
//! | `implicit_prompt`| `chosen`, `rejected` as messages, no `prompt`: the shared leading turns are the prompt (TRL's `extract_prompt`) | one [`Comparison`] |
//! | `unpaired`       | `prompt`, `completion` (text or messages), `label` (true = desirable; TRL's KTO format) | one [`Unpaired`] |
//! | `rankings`       | `prompt`, `responses` (best first)                     | all K(K-1)/2 pairs, one group |
//! | `prompts`        | `prompt` (text or messages)                            | one [`PromptRow`] each        |
//!
//! The format is detected from the columns unless a stage declares it.
//! Bad data is refused with the file, the column, what is wrong, how many
//! rows and the first few row numbers (counting from 0).

use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Corpus,
    Demonstrations,
    Conversations,
    Comparisons,
    HhRlhf,
    ImplicitPrompt,
    Rankings,
    Prompts,
    Unpaired,
}

impl Format {
    /// The format the columns imply, most specific first.
    pub fn detect(df: &DataFrame) -> Option<Format> {
        let has = |c: &str| df.column(c).is_ok();
        let is_list = |c: &str| {
            df.column(c)
                .is_ok_and(|c| matches!(c.dtype(), DataType::List(_)))
        };
        Some(if has("messages") {
            Format::Conversations
        } else if has("prompt") && has("responses") {
            Format::Rankings
        } else if has("chosen") && has("rejected") {
            if has("prompt") {
                Format::Comparisons
            } else if is_list("chosen") {
                Format::ImplicitPrompt
            } else {
                Format::HhRlhf
            }
        } else if has("prompt") && has("completion") && has("label") {
            Format::Unpaired
        } else if has("prompt") && (has("response") || has("completion")) {
            Format::Demonstrations
        } else if has("prompt") {
            Format::Prompts
        } else if has("text") {
            Format::Corpus
        } else {
            return None;
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Corpus => "corpus",
            Format::Demonstrations => "demonstrations",
            Format::Conversations => "conversations",
            Format::Comparisons => "comparisons",
            Format::HhRlhf => "hh_rlhf",
            Format::ImplicitPrompt => "implicit_prompt",
            Format::Rankings => "rankings",
            Format::Prompts => "prompts",
            Format::Unpaired => "unpaired",
        }
    }
}

pub use crate::chat::Message;

/// A conversation so far (ending with a user turn) and the response to learn.
#[derive(Debug, Clone, PartialEq)]
pub struct Demonstration {
    pub prompt: Vec<Message>,
    pub response: String,
}

/// A preferred and a dispreferred response to the same conversation.
/// `group` numbers the source row: pairs expanded from one ranking share it.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub group: usize,
    pub margin: Option<f64>,
}

/// One answer labeled desirable or not (KTO's unpaired data).
#[derive(Debug, Clone, PartialEq)]
pub struct Unpaired {
    pub prompt: Vec<Message>,
    pub completion: String,
    pub desirable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt: Vec<Message>,
    pub category: Option<String>,
}

fn invalid(path: &Path, message: String) -> DataError {
    DataError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

fn rows_list(rows: &[usize]) -> String {
    let shown: Vec<String> = rows.iter().take(5).map(|r| r.to_string()).collect();
    let more = if rows.len() > 5 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

fn column<'a>(df: &'a DataFrame, name: &str, path: &Path) -> Result<&'a Column, DataError> {
    df.column(name)
        .map_err(|_| super::prepare::missing_column(df, name, path))
}

/// A text column's values (nulls as `None`); any other type is refused.
pub fn text_column(
    df: &DataFrame,
    name: &str,
    path: &Path,
) -> Result<Vec<Option<String>>, DataError> {
    let col = column(df, name, path)?;
    let strings = col.str().map_err(|_| {
        invalid(
            path,
            format!(
                "column `{name}` has type {}, expected text (String)",
                col.dtype()
            ),
        )
    })?;
    Ok(strings.iter().map(|v| v.map(str::to_string)).collect())
}

/// A text column with no nulls and no empty strings.
fn required_text(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<String>, DataError> {
    let values = text_column(df, name, path)?;
    let bad: Vec<usize> = values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.as_deref().is_none_or(|s| s.trim().is_empty()))
        .map(|(i, _)| i)
        .collect();
    if !bad.is_empty() {
        return Err(invalid(
            path,
            format!(
                "column `{name}` has {} null or empty values (rows {}; rows count from 0)",
                bad.len(),
                rows_list(&bad)
            ),
        ));
    }
    Ok(values.into_iter().map(Option::unwrap_or_default).collect())
}

/// A column of messages (list of {role, content}) per row.
fn messages_column(
    df: &DataFrame,
    name: &str,
    path: &Path,
) -> Result<Vec<Vec<Message>>, DataError> {
    let col = column(df, name, path)?;
    let wrong_type = || {
        invalid(
            path,
            format!(
                "column `{name}` has type {}, expected a list of {{role, content}} messages",
                col.dtype()
            ),
        )
    };
    let lists = col.list().map_err(|_| wrong_type())?;
    let mut out = Vec::with_capacity(lists.len());
    let mut empty = Vec::new();
    for i in 0..lists.len() {
        let Some(series) = lists.get_as_series(i) else {
            empty.push(i);
            out.push(Vec::new());
            continue;
        };
        let fields = series.struct_().map_err(|_| wrong_type())?;
        let get = |f: &str| -> Result<Vec<Option<String>>, DataError> {
            let s = fields.field_by_name(f).map_err(|_| {
                invalid(
                    path,
                    format!("column `{name}`: messages need a `{f}` field (row {i})"),
                )
            })?;
            let strings = s.str().map_err(|_| wrong_type())?;
            Ok(strings.iter().map(|v| v.map(str::to_string)).collect())
        };
        let (roles, contents) = (get("role")?, get("content")?);
        let mut messages = Vec::new();
        for (role, content) in roles.into_iter().zip(contents) {
            let role = role.unwrap_or_default();
            if !["system", "user", "assistant"].contains(&role.as_str()) {
                return Err(invalid(
                    path,
                    format!("column `{name}`, row {i}: role `{role}` is not one of system, user, assistant"),
                ));
            }
            messages.push(Message {
                role,
                content: content.unwrap_or_default(),
            });
        }
        if messages.is_empty() {
            empty.push(i);
        }
        out.push(messages);
    }
    if !empty.is_empty() {
        return Err(invalid(
            path,
            format!(
                "column `{name}` has {} null or empty conversations (rows {})",
                empty.len(),
                rows_list(&empty)
            ),
        ));
    }
    Ok(out)
}

/// A prompt column as conversations: text becomes one user message.
fn prompt_column(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<Vec<Message>>, DataError> {
    if matches!(column(df, name, path)?.dtype(), DataType::List(_)) {
        messages_column(df, name, path)
    } else {
        Ok(required_text(df, name, path)?
            .iter()
            .map(|p| vec![Message::user(p)])
            .collect())
    }
}

/// A response column: text, or messages whose last assistant turn is the response.
fn response_column(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<String>, DataError> {
    if !matches!(column(df, name, path)?.dtype(), DataType::List(_)) {
        return required_text(df, name, path);
    }
    messages_column(df, name, path)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.iter()
                .rev()
                .find(|m| m.role == "assistant")
                .map(|m| m.content.clone())
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!("column `{name}`, row {i}: no assistant message"),
                    )
                })
        })
        .collect()
}

fn format_of(
    df: &DataFrame,
    declared: Option<Format>,
    path: &Path,
    wanted: &[Format],
    what: &str,
) -> Result<Format, DataError> {
    let format = declared.or_else(|| Format::detect(df));
    match format {
        Some(f) if wanted.contains(&f) => Ok(f),
        _ => {
            let names: Vec<String> = df
                .get_column_names()
                .iter()
                .map(|s| s.to_string())
                .collect();
            Err(invalid(
                path,
                format!(
                    "expected {what}, but the columns ({}) {}",
                    names.join(", "),
                    match format {
                        Some(Format::Unpaired) => "are the `unpaired` format (prompt, completion, label), which trains `kto`".to_string(),
                        Some(f) => format!("are the `{}` format", f.name()),
                        None => "match no known format".to_string(),
                    }
                ),
            ))
        }
    }
}

/// Check that `df` is valid data of `format` (the rows are read and dropped).
pub fn validate(df: &DataFrame, path: &Path, format: Format) -> Result<(), DataError> {
    match format {
        Format::Corpus => load_corpus(df, path).map(drop),
        Format::Demonstrations | Format::Conversations => {
            load_demonstrations(df, path, Some(format)).map(drop)
        }
        Format::Comparisons | Format::HhRlhf | Format::ImplicitPrompt | Format::Rankings => {
            load_comparisons(df, path, Some(format)).map(drop)
        }
        Format::Prompts => load_prompts(df, path).map(drop),
        Format::Unpaired => load_unpaired(df, path).map(drop),
    }
}

pub fn load_corpus(df: &DataFrame, path: &Path) -> Result<Vec<String>, DataError> {
    required_text(df, "text", path)
}

pub fn load_demonstrations(
    df: &DataFrame,
    path: &Path,
    declared: Option<Format>,
) -> Result<Vec<Demonstration>, DataError> {
    let wanted = [Format::Demonstrations, Format::Conversations];
    let what = "demonstrations (`prompt` + `response` or `completion`, or `messages`)";
    match format_of(df, declared, path, &wanted, what)? {
        Format::Conversations => messages_column(df, "messages", path)?
            .into_iter()
            .enumerate()
            .map(|(i, mut messages)| {
                let last = messages.pop().filter(|m| m.role == "assistant");
                match last {
                    Some(last) if messages.iter().any(|m| m.role == "user") => Ok(Demonstration {
                        prompt: messages,
                        response: last.content,
                    }),
                    _ => Err(invalid(
                        path,
                        format!("column `messages`, row {i}: a conversation must have a user turn and end with an assistant turn"),
                    )),
                }
            })
            .collect(),
        _ => {
            let prompts = prompt_column(df, "prompt", path)?;
            let response_name = if df.column("response").is_ok() { "response" } else { "completion" };
            let responses = response_column(df, response_name, path)?;
            Ok(prompts
                .into_iter()
                .zip(responses)
                .map(|(prompt, response)| Demonstration { prompt, response })
                .collect())
        }
    }
}

pub fn load_comparisons(
    df: &DataFrame,
    path: &Path,
    declared: Option<Format>,
) -> Result<Vec<Comparison>, DataError> {
    let wanted = [
        Format::Comparisons,
        Format::HhRlhf,
        Format::ImplicitPrompt,
        Format::Rankings,
    ];
    let what = "comparisons (`prompt`, `chosen`, `rejected`; text or messages), conversations `chosen` and `rejected` sharing their prompt turns, HH-RLHF transcripts (`chosen`, `rejected`) or rankings (`prompt`, `responses`)";
    let rows = match format_of(df, declared, path, &wanted, what)? {
        Format::Rankings => rankings(df, path)?,
        Format::HhRlhf => hh_rlhf(df, path)?,
        Format::ImplicitPrompt => implicit_prompt(df, path)?,
        _ => {
            let prompts = prompt_column(df, "prompt", path)?;
            let chosen = response_column(df, "chosen", path)?;
            let rejected = response_column(df, "rejected", path)?;
            let margins: Vec<Option<f64>> = match df.column("margin") {
                Ok(c) => c
                    .cast(&DataType::Float64)
                    .map_err(|_| {
                        invalid(
                            path,
                            format!("column `margin` has type {}, expected a number", c.dtype()),
                        )
                    })?
                    .f64()?
                    .iter()
                    .collect(),
                Err(_) => vec![None; prompts.len()],
            };
            // A NaN or inf margin would surface as "training diverged".
            if let Some(row) = margins
                .iter()
                .position(|m| m.is_some_and(|m| !m.is_finite()))
            {
                return Err(invalid(
                    path,
                    format!(
                        "column `margin` is {} in row {row}: margins must be finite numbers",
                        margins[row].unwrap_or_default()
                    ),
                ));
            }
            prompts
                .into_iter()
                .zip(chosen)
                .zip(rejected)
                .zip(margins)
                .enumerate()
                .map(
                    |(group, (((prompt, chosen), rejected), margin))| Comparison {
                        prompt,
                        chosen,
                        rejected,
                        group,
                        margin,
                    },
                )
                .collect()
        }
    };
    let same: Vec<usize> = rows
        .iter()
        .filter(|c| c.chosen == c.rejected)
        .map(|c| c.group)
        .collect();
    if !same.is_empty() {
        return Err(invalid(
            path,
            format!(
                "{} comparisons have chosen equal to rejected (rows {})",
                same.len(),
                rows_list(&same)
            ),
        ));
    }
    Ok(rows)
}

fn rankings(df: &DataFrame, path: &Path) -> Result<Vec<Comparison>, DataError> {
    let prompts = prompt_column(df, "prompt", path)?;
    let col = column(df, "responses", path)?;
    let lists = col.list().map_err(|_| {
        invalid(
            path,
            format!(
                "column `responses` has type {}, expected a list of texts, best first",
                col.dtype()
            ),
        )
    })?;
    let mut out = Vec::new();
    for (row, prompt) in prompts.into_iter().enumerate() {
        let responses: Vec<String> = match lists.get_as_series(row) {
            Some(s) => s
                .str()
                .map_err(|_| invalid(path, "column `responses` must hold lists of text".into()))?
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect(),
            None => Vec::new(),
        };
        if responses.len() < 2 || responses.iter().any(|r| r.trim().is_empty()) {
            return Err(invalid(
                path,
                format!(
                    "column `responses`, row {row}: a ranking needs at least 2 non-empty responses"
                ),
            ));
        }
        for i in 0..responses.len() {
            for j in i + 1..responses.len() {
                out.push(Comparison {
                    prompt: prompt.clone(),
                    chosen: responses[i].clone(),
                    rejected: responses[j].clone(),
                    group: row,
                    margin: None,
                });
            }
        }
    }
    Ok(out)
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Split an HH-RLHF transcript into the conversation before the last
/// assistant turn and that turn's text.
pub fn split_hh(transcript: &str) -> Option<(Vec<Message>, String)> {
    let at = transcript.rfind(ASSISTANT)?;
    let response = transcript[at + ASSISTANT.len()..].trim().to_string();
    let mut messages = Vec::new();
    let mut rest = &transcript[..at];
    // Turns start at "\n\nHuman:" or "\n\nAssistant:"; text before the first is ignored.
    loop {
        let next_h = rest.find(HUMAN);
        let next_a = rest.find(ASSISTANT);
        let (start, role, len) = match (next_h, next_a) {
            (Some(h), Some(a)) if a < h => (a, "assistant", ASSISTANT.len()),
            (Some(h), _) => (h, "user", HUMAN.len()),
            (None, Some(a)) => (a, "assistant", ASSISTANT.len()),
            (None, None) => break,
        };
        let body = &rest[start + len..];
        let end = [body.find(HUMAN), body.find(ASSISTANT)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(body.len());
        messages.push(Message {
            role: role.into(),
            content: body[..end].trim().to_string(),
        });
        rest = &body[end..];
    }
    (messages.last().is_some_and(|m| m.role == "user")).then_some((messages, response))
}

fn hh_rlhf(df: &DataFrame, path: &Path) -> Result<Vec<Comparison>, DataError> {
    let chosen = required_text(df, "chosen", path)?;
    let rejected = required_text(df, "rejected", path)?;
    let mut out = Vec::with_capacity(chosen.len());
    for (row, (c, r)) in chosen.iter().zip(&rejected).enumerate() {
        let parse = |t: &str, col: &str| {
            split_hh(t).ok_or_else(|| {
                invalid(
                    path,
                    format!("column `{col}`, row {row}: not a \"\\n\\nHuman: ...\\n\\nAssistant: ...\" transcript ending with an assistant turn"),
                )
            })
        };
        let (prompt, chosen) = parse(c, "chosen")?;
        let (prompt_r, rejected) = parse(r, "rejected")?;
        if prompt != prompt_r {
            return Err(invalid(
                path,
                format!("row {row}: `chosen` and `rejected` differ before their last assistant turn, so they do not share a prompt"),
            ));
        }
        out.push(Comparison {
            prompt,
            chosen,
            rejected,
            group: row,
            margin: None,
        });
    }
    Ok(out)
}

/// TRL's implicit-prompt preference rows: `chosen` and `rejected` are whole
/// conversations; their longest common leading run of turns is the prompt
/// (as TRL's `extract_prompt`), and what follows must be one assistant turn.
fn implicit_prompt(df: &DataFrame, path: &Path) -> Result<Vec<Comparison>, DataError> {
    let chosen = messages_column(df, "chosen", path)?;
    let rejected = messages_column(df, "rejected", path)?;
    let mut out = Vec::with_capacity(chosen.len());
    for (row, (c, r)) in chosen.into_iter().zip(rejected).enumerate() {
        let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
        let answer = |m: &[Message], col: &str| {
            match m {
            [one] if one.role == "assistant" => Ok(one.content.clone()),
            _ => Err(invalid(
                path,
                format!("column `{col}`, row {row}: after the turns `chosen` and `rejected` share, expected one assistant turn, found {}", m.len()),
            )),
        }
        };
        let (chosen, rejected) = (
            answer(&c[shared..], "chosen")?,
            answer(&r[shared..], "rejected")?,
        );
        let prompt = c[..shared].to_vec();
        if prompt.last().is_none_or(|m| m.role != "user") {
            return Err(invalid(
                path,
                format!("row {row}: the turns `chosen` and `rejected` share (the prompt) must end with a user turn"),
            ));
        }
        out.push(Comparison {
            prompt,
            chosen,
            rejected,
            group: row,
            margin: None,
        });
    }
    Ok(out)
}

/// TRL's unpaired preference rows (`prompt`, `completion`, `label`), the
/// data KTO trains on: `label` true (or 1) for a desirable completion.
pub fn load_unpaired(df: &DataFrame, path: &Path) -> Result<Vec<Unpaired>, DataError> {
    format_of(
        df,
        Some(Format::Unpaired),
        path,
        &[Format::Unpaired],
        "unpaired data (`prompt`, `completion`, `label`)",
    )?;
    let prompts = prompt_column(df, "prompt", path)?;
    let completions = response_column(df, "completion", path)?;
    let col = column(df, "label", path)?;
    let labels = col.cast(&DataType::Boolean).map_err(|_| {
        invalid(
            path,
            format!(
                "column `label` has type {}, expected true/false",
                col.dtype()
            ),
        )
    })?;
    let labels: Vec<Option<bool>> = labels
        .bool()
        .map_err(|_| {
            invalid(
                path,
                format!(
                    "column `label` has type {}, expected true/false",
                    col.dtype()
                ),
            )
        })?
        .iter()
        .collect();
    let missing: Vec<usize> = (0..labels.len()).filter(|i| labels[*i].is_none()).collect();
    if !missing.is_empty() {
        return Err(invalid(
            path,
            format!(
                "column `label` has {} null values (rows {})",
                missing.len(),
                rows_list(&missing)
            ),
        ));
    }
    Ok(prompts
        .into_iter()
        .zip(completions)
        .zip(labels)
        .map(|((prompt, completion), label)| Unpaired {
            prompt,
            completion,
            desirable: label.unwrap_or(false),
        })
        .collect())
}

pub fn load_prompts(df: &DataFrame, path: &Path) -> Result<Vec<PromptRow>, DataError> {
    let prompts = prompt_column(df, "prompt", path)?;
    let categories: Vec<Option<String>> = if df.column("category").is_ok() {
        text_column(df, "category", path)?
    } else {
        vec![None; prompts.len()]
    };
    Ok(prompts
        .into_iter()
        .zip(categories)
        .map(|(prompt, category)| PromptRow { prompt, category })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_transcripts_split_at_the_last_assistant_turn() {
        let t =
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant: It is 4.";
        let (prompt, response) = split_hh(t).unwrap();
        assert_eq!(
            prompt,
            vec![
                Message::user("Hi"),
                Message::assistant("Hello!"),
                Message::user("What is 2 plus 2?")
            ]
        );
        assert_eq!(response, "It is 4.");
        assert!(split_hh("no markers here").is_none());
    }
}

//! Datasets as token sequences for the model stages: demonstrations
//! (prompt + response, response tokens marked) and comparisons (prompt +
//! chosen and prompt + rejected, with each pair's group and margin), cut to
//! `max_len`; and prompts ready for generation.

use super::{DataSource, StageContext, StageError};
use crate::data::formats;
use crate::data::tokenize::{self, LoadedTokenizer, TokenCache};
use crate::train::causal_lm::LmExamples;
use crate::train::dpo::PairExamples;
use crate::train::reward::RewardPairs;

pub fn load_pairs(
    ctx: &StageContext,
    source: &DataSource,
    tok: &LoadedTokenizer,
    cache: &mut TokenCache,
    max_len: usize,
) -> Result<RewardPairs, StageError> {
    let (df, path) = ctx.load(source)?;
    let rows = formats::load_comparisons(&df, &path, source.format)?;
    let table = tokenize::comparisons(tok, &rows, cache)?;
    let mut out = RewardPairs {
        pairs: PairExamples {
            chosen: LmExamples::default(),
            rejected: LmExamples::default(),
        },
        groups: Vec::new(),
        margins: Vec::new(),
    };
    let side = |prompt: &[u32], response: &[u32]| {
        let mut tokens: Vec<u32> = prompt.iter().chain(response).copied().collect();
        let mut trained: Vec<bool> = std::iter::repeat_n(false, prompt.len())
            .chain(std::iter::repeat_n(true, response.len()))
            .collect();
        tokens.truncate(max_len);
        trained.truncate(max_len);
        (tokens, trained)
    };
    for (i, row) in rows.iter().enumerate() {
        let prompt = &table.column("prompt")[i];
        let (c, cw) = side(prompt, &table.column("chosen")[i]);
        let (r, rw) = side(prompt, &table.column("rejected")[i]);
        if cw.iter().any(|t| *t) && rw.iter().any(|t| *t) {
            out.pairs.chosen.tokens.push(c);
            out.pairs.chosen.trained.push(cw);
            out.pairs.rejected.tokens.push(r);
            out.pairs.rejected.trained.push(rw);
            out.groups.push(table.groups[i]);
            out.margins.push(row.margin.unwrap_or(0.0) as f32);
        }
    }
    if out.pairs.is_empty() {
        return Err(StageError::Failed(format!(
            "{}: no pair fits in `max_len` = {max_len}",
            path.display()
        )));
    }
    Ok(out)
}

/// Demonstrations as token ids with the trained ones marked (the
/// response, or every assistant turn of a conversation), cut to `max_len`.
pub fn load_demonstrations(
    ctx: &StageContext,
    source: &DataSource,
    tok: &LoadedTokenizer,
    cache: &mut TokenCache,
    max_len: usize,
) -> Result<LmExamples, StageError> {
    let (df, path) = ctx.load(source)?;
    let rows = formats::load_demonstrations(&df, &path, source.format)?;
    let table = tokenize::demonstrations(tok, &rows, cache)?;
    let mut out = LmExamples::default();
    for (tokens, trained) in table.column("tokens").iter().zip(table.column("trained")) {
        let mut tokens = tokens.clone();
        let mut trained: Vec<bool> = trained.iter().map(|t| *t == 1).collect();
        tokens.truncate(max_len);
        trained.truncate(max_len);
        if trained.iter().any(|t| *t) {
            out.tokens.push(tokens);
            out.trained.push(trained);
        }
    }
    if out.is_empty() {
        return Err(StageError::Failed(format!(
            "{}: no demonstration has a response within `max_len` = {max_len} tokens",
            path.display()
        )));
    }
    Ok(out)
}

/// Prompts for generation: each conversation rendered up to the assistant's
/// turn and encoded, with the text a judge reads (the last user message) and
/// the row's category when the file has one.
pub struct Prompts {
    pub rendered: Vec<String>,
    pub ids: Vec<Vec<usize>>,
    pub questions: Vec<String>,
    pub categories: Vec<Option<String>>,
}

impl Prompts {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

pub fn load_prompts(
    ctx: &StageContext,
    source: &DataSource,
    tok: &LoadedTokenizer,
) -> Result<Prompts, StageError> {
    let (df, path) = ctx.load(source)?;
    let rows = formats::load_prompts(&df, &path)?;
    if rows.is_empty() {
        return Err(StageError::Failed(format!(
            "{}: no prompts (after the data source's selection)",
            path.display()
        )));
    }
    let rendered: Vec<String> = rows
        .iter()
        .map(|r| tok.render_prompt(&r.prompt))
        .collect::<Result<_, _>>()?;
    let encodings = tok
        .tokenizer
        .encode_batch(rendered.clone(), false)
        .map_err(|e| {
            StageError::Failed(format!("{}: cannot encode prompts: {e}", path.display()))
        })?;
    let questions = rows
        .iter()
        .map(|r| {
            r.prompt
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or_else(String::new, |m| m.content.clone())
        })
        .collect();
    Ok(Prompts {
        ids: encodings
            .iter()
            .map(|e| e.get_ids().iter().map(|i| *i as usize).collect())
            .collect(),
        rendered,
        questions,
        categories: rows.into_iter().map(|r| r.category).collect(),
    })
}

/// Documents packed into one token stream (each closed by
/// `<|endoftext|>`) cut into sequences of `seq_len`, every token trained.
pub fn pack_corpus(
    tok: &LoadedTokenizer,
    docs: &[String],
    cache: &mut TokenCache,
    seq_len: usize,
) -> Result<LmExamples, StageError> {
    let table = tokenize::corpus(tok, docs, cache)?;
    let stream: Vec<u32> = table.column("text").iter().flatten().copied().collect();
    let tokens: Vec<Vec<u32>> = stream.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    let trained = tokens.iter().map(|t| vec![true; t.len()]).collect();
    Ok(LmExamples { tokens, trained })
}

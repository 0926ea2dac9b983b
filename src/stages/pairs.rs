//! Comparisons as token sequences for the preference stages (reward, dpo):
//! prompt + chosen and prompt + rejected, response tokens marked, cut to
//! `max_len`, with each pair's group (rankings) and margin.

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

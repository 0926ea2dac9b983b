//! What every model stage writes (a Hugging Face model folder) and how a
//! downstream stage finds a model stage's files.

use std::path::{Path, PathBuf};

use super::{DataSource, Input, StageContext, StageError, StageRef};
use crate::data::tokenize::{self, LoadedTokenizer};
use crate::train::optim::TrainSettings;

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Files of a model stage's output.
pub fn model_outputs() -> Vec<String> {
    [
        "config.json",
        "model.safetensors",
        TOKENIZER_FILE,
        "metrics.parquet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The tokenizer of an upstream stage (a tokenizer or a model stage).
pub fn upstream_tokenizer(
    ctx: &StageContext,
    stage: &StageRef,
) -> Result<(LoadedTokenizer, PathBuf), StageError> {
    let path = ctx.stage_dir(stage)?.join(TOKENIZER_FILE);
    if !path.exists() {
        return Err(StageError::Failed(format!(
            "stage `{}` has no {TOKENIZER_FILE}: name a tokenizer stage or a model stage",
            stage.name()
        )));
    }
    Ok((tokenize::load_tokenizer(&path)?, path))
}

/// Copy the tokenizer into a model folder, so the folder is complete.
pub fn copy_tokenizer(from: &Path, out_dir: &Path) -> Result<(), StageError> {
    let to = out_dir.join(TOKENIZER_FILE);
    std::fs::copy(from, &to).map_err(StageError::io(&to))?;
    Ok(())
}

/// The id of the padding token.
pub fn pad_id(tok: &LoadedTokenizer) -> usize {
    tok.tokenizer
        .token_to_id(crate::data::chat::PAD)
        .expect("checked when loaded") as usize
}

/// The id of the end-of-turn token, where answers stop.
pub fn end_id(tok: &LoadedTokenizer) -> usize {
    tok.tokenizer
        .token_to_id(crate::data::chat::END_OF_TURN)
        .expect("checked when loaded") as usize
}

/// An answer's text.
pub fn decode(tok: &LoadedTokenizer, ids: &[usize]) -> Result<String, StageError> {
    let ids: Vec<u32> = ids.iter().map(|i| *i as u32).collect();
    tok.tokenizer
        .decode(&ids, false)
        .map_err(|e| StageError::Failed(format!("cannot decode an answer: {e}")))
}

/// A reward stage's model, refused by name when it has no score head.
pub fn load_reward_model(
    ctx: &StageContext,
    field: &str,
    stage: &StageRef,
) -> Result<crate::model::frozen::FrozenModel, StageError> {
    let model = crate::model::frozen::FrozenModel::load(ctx.stage_dir(stage)?)?;
    if !model.has_score_head() {
        return Err(StageError::Failed(format!(
            "`{field}` = `{}` has no score head: name a `reward` stage",
            stage.name()
        )));
    }
    Ok(model)
}

/// The synthetic world of a `synth` stage, whose gold labeler judges answers.
pub fn load_world(
    ctx: &StageContext,
    field: &str,
    stage: &StageRef,
) -> Result<crate::data::world::World, StageError> {
    let path = ctx.stage_dir(stage)?.join("world.json");
    if !path.exists() {
        return Err(StageError::Failed(format!(
            "`{field}` = `{}` has no world.json: name a `synth` stage",
            stage.name()
        )));
    }
    Ok(crate::data::world::World::load(&path)?)
}

/// The checks every sampling stage shares: `batch_size` and
/// `sampling.max_new_tokens` at least 1.
pub fn validate_sampling(
    batch_size: usize,
    sampling: &crate::model::generate::SampleSettings,
) -> Result<(), (String, String)> {
    if batch_size == 0 || sampling.max_new_tokens == 0 {
        return Err((
            "batch_size".into(),
            "`batch_size` and `sampling.max_new_tokens` must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The inputs every finetuning stage has: `from`, `data`, optional `eval_data`.
pub fn finetune_inputs(
    from: &StageRef,
    data: &DataSource,
    eval_data: Option<&DataSource>,
) -> Vec<Input> {
    let mut inputs = vec![Input::stage("from", from), Input::data("data", data)];
    inputs.extend(eval_data.map(|e| Input::data("eval_data", e)));
    inputs
}

/// The checks every finetuning stage shares: `max_len` and `train`.
pub fn validate_finetune(max_len: usize, train: &TrainSettings) -> Result<(), (String, String)> {
    if max_len < 2 {
        return Err(("max_len".into(), "must be at least 2".into()));
    }
    train.validate()
}

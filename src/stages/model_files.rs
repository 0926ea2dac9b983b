//! What every model stage writes (a Hugging Face model folder) and how a
//! downstream stage finds a model stage's files.

use std::path::{Path, PathBuf};

use super::{DataSource, Input, StageContext, StageError, StageRef};
use crate::chat::tokenizer::{self as chat_tokenizer, FolderFormat, Template, TemplateChoice};
use crate::chat::LoadedTokenizer;
use crate::train::optim::TrainSettings;

pub use crate::chat::tokenizer::TOKENIZER_FILE;

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

/// The tokenizer of an upstream stage (a tokenizer or a model stage) with
/// the chat template a stage's `chat_template` setting picks; returns the
/// upstream folder too.
pub fn upstream_tokenizer(
    ctx: &StageContext,
    stage: &StageRef,
    chat_template: Option<&str>,
) -> Result<(LoadedTokenizer, PathBuf), StageError> {
    let dir = ctx.stage_dir(stage)?;
    if !dir.join(TOKENIZER_FILE).exists() {
        return Err(StageError::Failed(format!(
            "stage `{}` has no {TOKENIZER_FILE}: name a tokenizer stage or a model stage",
            stage.name()
        )));
    }
    let choice = TemplateChoice::parse(chat_template, ctx.root).map_err(StageError::Failed)?;
    Ok((
        chat_tokenizer::load_folder(dir, &choice)?,
        dir.to_path_buf(),
    ))
}

/// Copy the tokenizer into a model folder with the chat format the stage
/// used (the template, its special tokens, the stop ids), so the folder is
/// complete and downstream stages render conversations the same way.
pub fn copy_tokenizer(
    tok: &LoadedTokenizer,
    upstream: &Path,
    out_dir: &Path,
) -> Result<(), StageError> {
    let to = out_dir.join(TOKENIZER_FILE);
    let from = upstream.join(TOKENIZER_FILE);
    std::fs::copy(&from, &to).map_err(StageError::io(&to))?;
    let mut format = FolderFormat::read(upstream)?;
    format.template = match &tok.template {
        Template::Builtin => None,
        Template::Jinja(t) => Some((t.source().to_string(), PathBuf::new())),
    };
    format.write(out_dir)?;
    Ok(())
}

/// Raise a trained model folder's `max_position_embeddings` to the longest
/// sequence the stage trained on (`max_len`), so `config.json` states the
/// context the model was actually trained for (a pretrain of 64-token
/// sequences finetuned on 128 says 128).
pub fn record_context(out_dir: &Path, max_len: usize) -> Result<(), StageError> {
    let path = out_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(StageError::io(&path))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
    let Some(field) = config.get_mut("max_position_embeddings") else {
        return Ok(());
    };
    if field.as_u64().is_some_and(|n| n as usize >= max_len) {
        return Ok(());
    }
    *field = serde_json::json!(max_len);
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes");
    std::fs::write(&path, text).map_err(StageError::io(&path))
}

/// Reads a `chat_template` setting; "model", the default, reads as absent
/// so writing the default out never changes a cache key.
pub fn chat_template_setting<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let v: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(v.filter(|v| v != "model"))
}

/// The `chat_template` setting's one check before anything runs.
pub fn validate_chat_template(value: Option<&str>) -> Result<(), (String, String)> {
    TemplateChoice::parse(value, Path::new(""))
        .map(drop)
        .map_err(|m| ("chat_template".to_string(), m))
}

/// The `chat_template` setting as an input: a `.jinja` file is hashed by
/// content like a dataset.
pub fn chat_template_input(value: Option<&str>) -> Option<Input> {
    value.filter(|v| v.ends_with(".jinja")).map(|v| Input {
        field: "chat_template".into(),
        pointer: "/chat_template".into(),
        target: super::InputTarget::Path(v.to_string()),
    })
}

/// The id of the padding token.
pub fn pad_id(tok: &LoadedTokenizer) -> usize {
    tok.pad as usize
}

/// The ids where answers stop (end of turn, end of sequence).
pub fn stop_ids(tok: &LoadedTokenizer) -> Vec<usize> {
    tok.stops.iter().map(|i| *i as usize).collect()
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

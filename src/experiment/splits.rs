//! Two sides of one file must be split the same way: a `split = "test"`
//! source whose `test_fraction` (or `split_column`, or seed) differs from
//! the `split = "train"` source of the same file would overlap it (every
//! test row a training row) without a word. Checked when the experiment
//! loads.

use std::collections::BTreeMap;

use super::source::RawStage;
use super::{ErrorKind, ExperimentError, Stage};
use crate::data::source::{DataSource, Split};
use crate::stages::InputTarget;

/// How a source's rows are divided: by a column, or by a seeded draw.
#[derive(Debug, Clone, PartialEq)]
enum Division {
    Column(String),
    Random { test_fraction: f64, seed: u64 },
}

impl std::fmt::Display for Division {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Division::Column(c) => write!(f, "split_column = \"{c}\""),
            Division::Random {
                test_fraction,
                seed,
            } => write!(f, "test_fraction = {test_fraction}, seed {seed}"),
        }
    }
}

pub fn check(
    stages: &BTreeMap<String, Stage>,
    raw: &BTreeMap<String, RawStage>,
) -> Result<(), ExperimentError> {
    // file -> every (stage, field, split, division) seen
    let mut seen: BTreeMap<String, Vec<(String, String, Split, Division)>> = BTreeMap::new();
    for (name, stage) in stages {
        let settings = stage.settings.to_json();
        for input in stage.settings.inputs() {
            let file = match &input.target {
                InputTarget::Path(p) => p.clone(),
                InputTarget::StageFile { stage, file } => format!("{stage}/{file}"),
                InputTarget::Stage(_) => continue,
            };
            let pointer = format!("/{}", input.field.replace('.', "/"));
            let Some(source) = settings
                .pointer(&pointer)
                .and_then(|v| serde_json::from_value::<DataSource>(v.clone()).ok())
            else {
                continue;
            };
            let Some(split) = source.split else {
                continue;
            };
            let division = match &source.split_column {
                Some(c) => Division::Column(c.clone()),
                None => Division::Random {
                    test_fraction: source.test_fraction,
                    seed: stage.seed,
                },
            };
            let sides = seen.entry(file.clone()).or_default();
            // Only opposite sides can overlap: two train sources split
            // differently are two samples of the training rows.
            let clash = sides
                .iter()
                .find(|(_, _, other, d)| *other != split && *d != division)
                .cloned();
            sides.push((name.clone(), input.field.clone(), split, division.clone()));
            if let Some((s0, f0, split0, d0)) = clash {
                let top = input.field.split(['[', '.']).next().unwrap_or(&input.field);
                let at = raw[name].fields.get(top).map(|f| f.value_at.clone());
                let side = |s: Split| if s == Split::Test { "test" } else { "train" };
                return Err(ExperimentError::new(
                    ErrorKind::InvalidValue,
                    at.or(Some(raw[name].header.clone())),
                    format!(
                        "stage `{name}`: `{}` splits `{file}` ({}, {division}) unlike stage `{s0}`'s `{f0}` ({}, {d0}), so the two sides would overlap",
                        input.field,
                        side(split),
                        side(split0),
                    ),
                )
                .with_help(
                    "give every source that splits this file the same `test_fraction` (or `split_column`) and the same seed",
                ));
            }
        }
    }
    Ok(())
}

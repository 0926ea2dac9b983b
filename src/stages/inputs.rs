//! The typed fields through which a stage reads: another stage (`StageRef`)
//! or data (`DataSource`, a file or an upstream stage's file). These, and
//! only these, are the DAG's edges and the dataset files hashed into a key.

use serde::{Deserialize, Serialize};

pub use crate::data::source::DataSource;

/// A field naming another stage of the same experiment, e.g. `from = "sft"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRef(pub String);

impl StageRef {
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Where one input of a stage points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputTarget {
    /// The whole output of another stage.
    Stage(String),
    /// One file of another stage's output.
    StageFile { stage: String, file: String },
    /// A file or folder under the project root, hashed by content.
    Path(String),
}

/// One input of a stage: the settings field it comes from, as a display
/// name (`corpus`, `policies[1]`) and as a JSON pointer into the settings
/// (`/corpus/stage`, `/policies/1`) where the cache key substitutes the
/// upstream stage's key for its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub field: String,
    pub pointer: String,
    pub target: InputTarget,
}

impl Input {
    pub fn stage(field: &str, r: &StageRef) -> Input {
        Input {
            field: field.to_string(),
            pointer: format!("/{field}"),
            target: InputTarget::Stage(r.0.clone()),
        }
    }

    pub fn stages(field: &str, refs: &[StageRef]) -> Vec<Input> {
        refs.iter()
            .enumerate()
            .map(|(i, r)| Input {
                field: format!("{field}[{i}]"),
                pointer: format!("/{field}/{i}"),
                target: InputTarget::Stage(r.0.clone()),
            })
            .collect()
    }

    pub fn data(field: &str, d: &DataSource) -> Input {
        let target = match (&d.path, &d.stage, &d.file) {
            (_, Some(stage), Some(file)) => InputTarget::StageFile {
                stage: stage.clone(),
                file: file.clone(),
            },
            (Some(p), _, _) => InputTarget::Path(p.clone()),
            _ => unreachable!("a DataSource always has a path or a stage file"),
        };
        Input {
            field: field.to_string(),
            pointer: format!("/{field}/stage"),
            target,
        }
    }

    /// The upstream stage this input depends on, if any.
    pub fn upstream(&self) -> Option<&str> {
        match &self.target {
            InputTarget::Stage(s) | InputTarget::StageFile { stage: s, .. } => Some(s),
            InputTarget::Path(_) => None,
        }
    }
}

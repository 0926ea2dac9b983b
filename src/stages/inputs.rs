//! The typed fields through which a stage reads: another stage (`StageRef`)
//! or a file (`DataInput`). These, and only these, are the DAG's edges and
//! the dataset files hashed into a cache key.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A field naming another stage of the same experiment, e.g. `from = "sft"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRef(pub String);

impl StageRef {
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A dataset a stage reads: a file or folder path relative to the project
/// root (`"datasets/assistant/corpus.parquet"`), or a file written by an
/// upstream stage (`{ stage = "world", file = "corpus.parquet" }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DataInput {
    Path(String),
    Stage { stage: StageRef, file: String },
}

impl<'de> Deserialize<'de> for DataInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputVisitor;
        impl<'de> Visitor<'de> for InputVisitor {
            type Value = DataInput;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path string or a table { stage = \"NAME\", file = \"FILE\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DataInput, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                Ok(DataInput::Path(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DataInput, A::Error> {
                let (mut stage, mut file) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "stage" => stage = Some(StageRef(map.next_value()?)),
                        "file" => file = Some(map.next_value::<String>()?),
                        other => return Err(de::Error::unknown_field(other, &["stage", "file"])),
                    }
                }
                Ok(DataInput::Stage {
                    stage: stage.ok_or_else(|| de::Error::missing_field("stage"))?,
                    file: file.ok_or_else(|| de::Error::missing_field("file"))?,
                })
            }
        }
        deserializer.deserialize_any(InputVisitor)
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

    pub fn data(field: &str, d: &DataInput) -> Input {
        match d {
            DataInput::Path(p) => Input {
                field: field.to_string(),
                pointer: format!("/{field}"),
                target: InputTarget::Path(p.clone()),
            },
            DataInput::Stage { stage, file } => Input {
                field: field.to_string(),
                pointer: format!("/{field}/stage"),
                target: InputTarget::StageFile {
                    stage: stage.0.clone(),
                    file: file.clone(),
                },
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        corpus: DataInput,
    }

    #[test]
    fn data_input_reads_paths_and_stage_outputs() {
        let h: Holder = toml::from_str("corpus = \"datasets/a.parquet\"").unwrap();
        assert_eq!(h.corpus, DataInput::Path("datasets/a.parquet".into()));
        let h: Holder =
            toml::from_str("corpus = { stage = \"world\", file = \"c.parquet\" }").unwrap();
        assert_eq!(
            h.corpus,
            DataInput::Stage {
                stage: StageRef("world".into()),
                file: "c.parquet".into()
            }
        );
        let err = toml::from_str::<Holder>("corpus = { stage = \"w\", fil = \"c\" }")
            .err()
            .unwrap();
        assert!(err.to_string().contains("unknown field `fil`"), "{err}");
    }
}

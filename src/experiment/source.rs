//! Reading experiment files: TOML syntax, `include` expansion and merging,
//! and where each stage and field was written (for error messages).
//!
//! Merge rule: includes are applied first, in the order listed, then the
//! including file; a later definition of a field wins. A stage whose `kind`
//! changes in a later file is replaced whole (fields of two kinds never mix).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::error::{ErrorKind, ExperimentError, Location};
use crate::text::{did_you_mean, quoted_list};

const TOP_LEVEL_KEYS: [&str; 2] = ["experiment", "stages"];
const EXPERIMENT_KEYS: [&str; 4] = ["name", "description", "seed", "include"];

/// One field as written, with where its key and value are.
#[derive(Debug, Clone)]
pub struct RawField {
    pub value: toml::Value,
    pub key_at: Location,
    pub value_at: Location,
}

/// One `[stages.NAME]` table after merging.
#[derive(Debug, Clone)]
pub struct RawStage {
    pub header: Location,
    pub fields: BTreeMap<String, RawField>,
}

/// An experiment file with its includes merged in, not yet type-checked.
#[derive(Debug, Clone, Default)]
pub struct RawExperiment {
    pub files: Vec<PathBuf>,
    pub header: BTreeMap<String, RawField>,
    pub stages: BTreeMap<String, RawStage>,
}

/// Read `path` and everything it includes.
pub fn read(path: &Path) -> Result<RawExperiment, ExperimentError> {
    let mut merged = RawExperiment::default();
    read_into(path, &mut Vec::new(), &mut merged, None)?;
    Ok(merged)
}

fn read_into(
    path: &Path,
    stack: &mut Vec<PathBuf>,
    merged: &mut RawExperiment,
    included_at: Option<&Location>,
) -> Result<(), ExperimentError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let what = if included_at.is_some() {
            ErrorKind::Include
        } else {
            ErrorKind::Unreadable
        };
        ExperimentError::new(
            what,
            included_at.cloned(),
            format!("cannot read experiment file `{}`: {e}", path.display()),
        )
    })?;
    let identity = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    stack.push(identity);

    let parsed = parse_file(path, &text)?;
    for (include, at) in &parsed.includes {
        let target = path.parent().unwrap_or(Path::new(".")).join(include);
        let target_id = target.canonicalize().unwrap_or_else(|_| target.clone());
        if let Some(pos) = stack.iter().position(|p| *p == target_id) {
            let chain: Vec<String> = stack[pos..]
                .iter()
                .chain(std::iter::once(&target_id))
                .map(|p| p.display().to_string())
                .collect();
            let message = if pos + 1 == stack.len() {
                format!("`{include}` includes itself")
            } else {
                format!("include cycle: {}", chain.join(" -> "))
            };
            return Err(
                ExperimentError::new(ErrorKind::Include, Some(at.clone()), message)
                    .with_help("remove the include that closes the cycle"),
            );
        }
        if !target.is_file() {
            return Err(ExperimentError::new(
                ErrorKind::Include,
                Some(at.clone()),
                format!(
                    "included file `{include}` does not exist (looked for `{}`)",
                    target.display()
                ),
            )
            .with_help("include paths are relative to the file that includes them"));
        }
        read_into(&target, stack, merged, Some(at))?;
    }
    stack.pop();

    merged.files.push(path.to_path_buf());
    for (key, field) in parsed.header {
        merged.header.insert(key, field);
    }
    for (name, stage) in parsed.stages {
        let replaces_kind = merged.stages.get(&name).is_some_and(|old| {
            matches!((old.fields.get("kind"), stage.fields.get("kind")),
                (Some(a), Some(b)) if a.value != b.value)
        });
        match merged.stages.get_mut(&name) {
            Some(old) if !replaces_kind => {
                old.header = stage.header;
                old.fields.extend(stage.fields);
            }
            _ => {
                merged.stages.insert(name, stage);
            }
        }
    }
    Ok(())
}

struct ParsedFile {
    header: BTreeMap<String, RawField>,
    includes: Vec<(String, Location)>,
    stages: BTreeMap<String, RawStage>,
}

fn parse_file(path: &Path, text: &str) -> Result<ParsedFile, ExperimentError> {
    let loc = |offset: usize| Location::at(path, text, offset);
    let root = DeTable::parse(text).map_err(|e| {
        let at = e.span().map(|s| loc(s.start));
        ExperimentError::new(
            ErrorKind::Syntax,
            at,
            format!("invalid TOML: {}", e.message().trim()),
        )
    })?;
    // Values come from toml's own deserializer; the span tree only says where.
    let values: toml::Table = toml::from_str(text).map_err(|e| {
        ExperimentError::new(
            ErrorKind::Syntax,
            e.span().map(|s| loc(s.start)),
            format!("invalid TOML: {}", e.message().trim()),
        )
    })?;
    let field = |path: &[&str],
                 key: &toml::Spanned<toml::de::DeString>,
                 value: &toml::Spanned<DeValue>| RawField {
        value: lookup(&values, path).clone(),
        key_at: loc(key.span().start),
        value_at: loc(value.span().start),
    };

    let mut parsed = ParsedFile {
        header: BTreeMap::new(),
        includes: Vec::new(),
        stages: BTreeMap::new(),
    };
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "experiment" => {
                let table = expect_table(value, &loc, "[experiment]")?;
                for (k, v) in table.iter() {
                    let name = k.get_ref().as_ref();
                    if !EXPERIMENT_KEYS.contains(&name) {
                        return Err(unknown_key(
                            loc(k.span().start),
                            name,
                            "[experiment]",
                            &EXPERIMENT_KEYS,
                        ));
                    }
                    if name == "include" {
                        parsed.includes = includes(v, &loc)?;
                    } else {
                        parsed
                            .header
                            .insert(name.to_string(), field(&["experiment", name], k, v));
                    }
                }
            }
            "stages" => {
                let table = expect_table(value, &loc, "[stages]")?;
                for (stage_key, stage_value) in table.iter() {
                    let stage_name = stage_key.get_ref().to_string();
                    let what = format!("[stages.{stage_name}]");
                    let stage_table = expect_table(stage_value, &loc, &what)?;
                    let fields = stage_table
                        .iter()
                        .map(|(k, v)| {
                            let name = k.get_ref().as_ref();
                            (
                                name.to_string(),
                                field(&["stages", &stage_name, name], k, v),
                            )
                        })
                        .collect();
                    parsed.stages.insert(
                        stage_name,
                        RawStage {
                            header: loc(stage_key.span().start),
                            fields,
                        },
                    );
                }
            }
            other => {
                return Err(unknown_key(
                    loc(key.span().start),
                    other,
                    "the top level",
                    &TOP_LEVEL_KEYS,
                ));
            }
        }
    }
    Ok(parsed)
}

fn unknown_key(at: Location, key: &str, place: &str, valid: &[&str]) -> ExperimentError {
    ExperimentError::new(
        ErrorKind::UnknownField,
        Some(at),
        format!(
            "unknown key `{key}` in {place}{}",
            did_you_mean(key, valid.iter().copied())
        ),
    )
    .with_help(format!(
        "valid keys here: {}",
        quoted_list(valid.iter().copied())
    ))
}

fn expect_table<'a, 'i>(
    value: &'a toml::Spanned<DeValue<'i>>,
    loc: &impl Fn(usize) -> Location,
    what: &str,
) -> Result<&'a DeTable<'i>, ExperimentError> {
    value.get_ref().as_table().ok_or_else(|| {
        ExperimentError::new(
            ErrorKind::WrongType,
            Some(loc(value.span().start)),
            format!(
                "{what} must be a table, found {}",
                value.get_ref().type_str()
            ),
        )
    })
}

fn includes(
    value: &toml::Spanned<DeValue>,
    loc: &impl Fn(usize) -> Location,
) -> Result<Vec<(String, Location)>, ExperimentError> {
    let wrong = || {
        ExperimentError::new(
            ErrorKind::WrongType,
            Some(loc(value.span().start)),
            "`include` must be a list of file paths, e.g. include = [\"_common.toml\"]",
        )
    };
    let array = value.get_ref().as_array().ok_or_else(wrong)?;
    array
        .iter()
        .map(|item| {
            item.get_ref()
                .as_str()
                .map(|s| (s.to_string(), loc(item.span().start)))
                .ok_or_else(wrong)
        })
        .collect()
}

/// `values[path...]`: the value toml itself parsed at a key path.
fn lookup<'a>(values: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let (last, parents) = path.split_last().expect("non-empty key path");
    let mut table = values;
    for key in parents {
        table = table[*key]
            .as_table()
            .expect("parent is a table: checked on the span tree");
    }
    &table[*last]
}

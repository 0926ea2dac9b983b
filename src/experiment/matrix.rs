//! Sweeps: `matrix = { beta = [0.05, 0.1], lr = [1e-4, 3e-4] }` on a stage
//! expands it into one stage per combination of values, named so a person
//! can read them (`dpo@beta=0.05,lr=1e-4`, as DVC's `matrix` does), each
//! keyed by its own resolved settings. A matrix key names a field of the
//! stage's kind (`beta`), a field of its `train` table (`lr` when the kind
//! has no `lr` of its own), or a dotted path (`train.lr`, `sampling.top_p`).
//!
//! Downstream, a list of stages (eval's `policies`) that names the matrix
//! stage gets every combination in its place; a field that takes one stage
//! must name one combination.

use std::collections::BTreeMap;

use super::source::{RawField, RawStage};
use super::{ErrorKind, ExperimentError, Stage};
use crate::text::{did_you_mean, quoted_list};

/// The field that declares a sweep.
pub const FIELD: &str = "matrix";

/// The stages a matrix stage became, by the name written in the file.
pub type Groups = BTreeMap<String, Vec<String>>;

/// One swept field: where it goes in the settings and its values.
struct Axis {
    /// As written in the matrix (`lr`), used in the stage names.
    label: String,
    /// Where the value goes (`["train", "lr"]`).
    path: Vec<String>,
    values: Vec<toml::Value>,
}

/// Expand every stage with a `matrix` into its combinations. `resolve`
/// type-checks a raw stage (used to learn the kind's fields).
pub fn expand(
    raw: &BTreeMap<String, RawStage>,
    resolve: impl Fn(&str, &RawStage) -> Result<Stage, ExperimentError>,
) -> Result<(BTreeMap<String, RawStage>, Groups), ExperimentError> {
    let mut out = BTreeMap::new();
    let mut groups = Groups::new();
    for (name, stage) in raw {
        let Some(matrix) = stage.fields.get(FIELD) else {
            out.insert(name.clone(), stage.clone());
            continue;
        };
        let mut base = stage.clone();
        base.fields.remove(FIELD);
        let resolved = resolve(name, &base)?;
        let settings = resolved.settings.to_json();
        let axes = axes(name, resolved.settings.kind(), matrix, &settings)?;
        let mut names = Vec::new();
        for combo in combinations(&axes) {
            let label = combo
                .iter()
                .map(|(axis, v)| format!("{}={}", axis.label, value_text(v)))
                .collect::<Vec<_>>()
                .join(",");
            let variant_name = format!("{name}@{label}");
            let mut variant = base.clone();
            for (axis, value) in &combo {
                set(&mut variant, &axis.path, (*value).clone(), matrix);
            }
            if raw.contains_key(&variant_name) {
                return Err(ExperimentError::new(
                    ErrorKind::InvalidValue,
                    Some(matrix.key_at.clone()),
                    format!("stage `{name}`: the matrix makes a stage `{variant_name}`, which the file already has"),
                ));
            }
            names.push(variant_name.clone());
            out.insert(variant_name, variant);
        }
        groups.insert(name.clone(), names);
    }
    Ok((out, groups))
}

fn axes(
    name: &str,
    kind: &str,
    matrix: &RawField,
    settings: &serde_json::Value,
) -> Result<Vec<Axis>, ExperimentError> {
    let at = Some(matrix.value_at.clone());
    let table = matrix.value.as_table().ok_or_else(|| {
        ExperimentError::new(
            ErrorKind::WrongType,
            at.clone(),
            format!("stage `{name}`: `matrix` must be a table of value lists, e.g. matrix = {{ beta = [0.05, 0.1] }}"),
        )
    })?;
    if table.is_empty() {
        return Err(ExperimentError::new(
            ErrorKind::InvalidValue,
            at,
            format!("stage `{name}`: `matrix` is empty: give at least one field and its values"),
        ));
    }
    let top: Vec<&str> = settings
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut axes = Vec::new();
    for (label, values) in table {
        let path: Vec<String> = if label.contains('.') {
            label.split('.').map(str::to_string).collect()
        } else if top.contains(&label.as_str()) {
            vec![label.clone()]
        } else if settings.pointer(&format!("/train/{label}")).is_some() {
            vec!["train".into(), label.clone()]
        } else {
            vec![label.clone()]
        };
        let pointer: String = path.iter().map(|p| format!("/{p}")).collect();
        if settings.pointer(&pointer).is_none() || path[0] == FIELD {
            let mut valid: Vec<&str> = top.clone();
            let train: Vec<String> = settings
                .pointer("/train")
                .and_then(|t| t.as_object())
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            valid.extend(train.iter().map(String::as_str));
            return Err(ExperimentError::new(
                ErrorKind::UnknownField,
                at,
                format!(
                    "stage `{name}`: the matrix sweeps `{label}`, which is not a field of kind `{}`{}",
                    kind,
                    did_you_mean(label, valid.iter().copied())
                ),
            )
            .with_help(format!(
                "sweep a field of the stage ({}) or of its `train` table; a nested field as `table.field`",
                quoted_list(top.iter().copied())
            )));
        }
        let list = values.as_array().ok_or_else(|| {
            ExperimentError::new(
                ErrorKind::WrongType,
                at.clone(),
                format!("stage `{name}`: `matrix.{label}` must be a list of values, e.g. {label} = [1, 2]"),
            )
        })?;
        if list.is_empty() {
            return Err(ExperimentError::new(
                ErrorKind::InvalidValue,
                at,
                format!(
                    "stage `{name}`: `matrix.{label}` is an empty list: give at least one value"
                ),
            ));
        }
        for v in list {
            if !matches!(
                v,
                toml::Value::String(_)
                    | toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
            ) {
                return Err(ExperimentError::new(
                    ErrorKind::WrongType,
                    at,
                    format!("stage `{name}`: `matrix.{label}` holds {v}; a matrix sweeps strings, numbers and booleans"),
                ));
            }
        }
        axes.push(Axis {
            label: label.clone(),
            path,
            values: list.clone(),
        });
    }
    Ok(axes)
}

/// Every combination, the first axis varying slowest.
fn combinations(axes: &[Axis]) -> Vec<Vec<(&Axis, &toml::Value)>> {
    let mut out: Vec<Vec<(&Axis, &toml::Value)>> = vec![Vec::new()];
    for axis in axes {
        let mut next = Vec::new();
        for prefix in &out {
            for v in &axis.values {
                let mut c = prefix.clone();
                c.push((axis, v));
                next.push(c);
            }
        }
        out = next;
    }
    out
}

/// A value as it appears in a stage name: `0.05`, `1e-4`, `true`, `ipo`.
pub fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Float(x) => {
            if *x != 0.0 && (x.abs() < 1e-2 || x.abs() >= 1e6) {
                format!("{x:e}")
            } else {
                format!("{x}")
            }
        }
        other => other.to_string(),
    }
}

/// Put `value` at `path` in a stage's raw fields (creating tables).
fn set(stage: &mut RawStage, path: &[String], value: toml::Value, matrix: &RawField) {
    let (first, rest) = path.split_first().expect("a non-empty path");
    if rest.is_empty() {
        stage.fields.insert(
            first.clone(),
            RawField {
                value,
                key_at: matrix.key_at.clone(),
                value_at: matrix.value_at.clone(),
            },
        );
        return;
    }
    let field = stage
        .fields
        .entry(first.clone())
        .or_insert_with(|| RawField {
            value: toml::Value::Table(toml::Table::new()),
            key_at: matrix.key_at.clone(),
            value_at: matrix.value_at.clone(),
        });
    let mut slot = &mut field.value;
    for (i, part) in rest.iter().enumerate() {
        if !slot.is_table() {
            *slot = toml::Value::Table(toml::Table::new());
        }
        let table = slot.as_table_mut().expect("a table");
        if i + 1 == rest.len() {
            table.insert(part.clone(), value);
            return;
        }
        slot = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
}

/// The (field, value) pairs of a stage made by a matrix, from its name
/// (`dpo@beta=0.05,lr=1e-4` -> beta = 0.05, lr = 1e-4); empty otherwise.
pub fn swept_values(stage: &str) -> Vec<(String, String)> {
    let Some((_, label)) = stage.split_once('@') else {
        return Vec::new();
    };
    label
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Rewrite references to matrix stages: in a list of stages the name
/// becomes every combination; a single reference is an error. Returns the
/// names of the stages whose raw fields changed (to resolve again).
pub fn expand_references(
    stages: &BTreeMap<String, Stage>,
    raw: &mut BTreeMap<String, RawStage>,
    groups: &Groups,
) -> Result<Vec<String>, ExperimentError> {
    let mut changed = Vec::new();
    for (name, stage) in stages {
        // Rewrite from the last element so earlier indexes stay valid.
        let mut inputs = stage.settings.inputs();
        inputs.reverse();
        for input in inputs {
            let Some(target) = input.upstream() else {
                continue;
            };
            let Some(variants) = groups.get(target) else {
                continue;
            };
            let top = input.field.split(['[', '.']).next().unwrap_or(&input.field);
            let raw_stage = raw.get_mut(name).expect("resolved from raw");
            let at = raw_stage.fields.get(top).map(|f| f.value_at.clone());
            let segments: Vec<&str> = input.pointer.trim_start_matches('/').split('/').collect();
            let index = segments.last().and_then(|s| s.parse::<usize>().ok());
            let list = index.and_then(|_| {
                let (first, rest) = segments[..segments.len() - 1].split_first()?;
                let mut v = &mut raw_stage.fields.get_mut(*first)?.value;
                for s in rest {
                    v = v.get_mut(*s)?;
                }
                v.as_array_mut()
            });
            match (list, index) {
                (Some(list), Some(i)) if i < list.len() => {
                    list.splice(
                        i..=i,
                        variants.iter().map(|v| toml::Value::String(v.clone())),
                    );
                    if !changed.contains(name) {
                        changed.push(name.clone());
                    }
                }
                _ => {
                    return Err(ExperimentError::new(
                        ErrorKind::MissingStage,
                        at,
                        format!(
                            "stage `{name}`: `{}` names `{target}`, a matrix of {} stages; this field takes one",
                            input.field,
                            variants.len()
                        ),
                    )
                    .with_help(format!(
                        "name one of them: {}",
                        quoted_list(variants.iter().map(String::as_str))
                    )));
                }
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_text_is_short_and_readable() {
        assert_eq!(value_text(&toml::Value::Float(0.05)), "0.05");
        assert_eq!(value_text(&toml::Value::Float(1e-4)), "1e-4");
        assert_eq!(value_text(&toml::Value::Float(3e-4)), "3e-4");
        assert_eq!(value_text(&toml::Value::Integer(16)), "16");
        assert_eq!(value_text(&toml::Value::String("ipo".into())), "ipo");
    }

    #[test]
    fn swept_values_read_back_from_the_name() {
        assert_eq!(
            swept_values("dpo@beta=0.05,lr=1e-4"),
            vec![
                ("beta".to_string(), "0.05".to_string()),
                ("lr".to_string(), "1e-4".to_string())
            ]
        );
        assert!(swept_values("dpo").is_empty());
    }
}

//! Cache keys. A stage's key is the blake3 hash of exactly these inputs:
//!
//! | input                     | in the key as                                        |
//! |---------------------------|------------------------------------------------------|
//! | stage kind                | `kind=synth`                                         |
//! | recipe version            | `recipe=1` (bumped when the kind's code changes)     |
//! | resolved settings         | canonical JSON: defaults filled, keys sorted, floats |
//! |                           | normalised; stage names replaced by their keys       |
//! | upstream stages           | `upstream <field>=<key>` for every stage input       |
//! | dataset files and folders | `data <field> <path>=<blake3 of content>`            |
//! | seed                      | `seed=<n>` (the stage's, or the experiment's)        |
//!
//! Not in the key: the stage's name, the experiment's name, descriptions,
//! TOML formatting, comments and key order (gone after parsing), whether a
//! default was written out (filled in before hashing), and runtime-only
//! settings (threads, progress display, store location), which are command
//! line flags, never stage fields.

use serde_json::Value;

/// Bump to invalidate every key (a change in how keys are made).
const KEY_FORMAT: &str = "posttrain-stage-key/1";

/// Everything a key is computed from.
pub struct KeyInputs<'a> {
    pub kind: &'a str,
    pub recipe_version: u32,
    /// Resolved settings with each stage reference replaced by that stage's key.
    pub settings: &'a Value,
    /// (field, upstream key), sorted by field.
    pub upstream: &'a [(String, String)],
    /// (field, path, content hash), sorted by field.
    pub datasets: &'a [(String, String, String)],
    pub seed: u64,
}

pub fn stage_key(inputs: &KeyInputs) -> String {
    let mut text = format!(
        "{KEY_FORMAT}\nkind={}\nrecipe={}\nsettings={}\nseed={}\n",
        inputs.kind,
        inputs.recipe_version,
        canonical_json(inputs.settings),
        inputs.seed
    );
    for (field, key) in inputs.upstream {
        text.push_str(&format!("upstream {field}={key}\n"));
    }
    for (field, path, hash) in inputs.datasets {
        text.push_str(&format!("data {field} {path}={hash}\n"));
    }
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// JSON with object keys sorted at every level and no whitespace, so that
/// equal settings always give equal bytes whatever the map implementation.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        // Numbers: integers print as integers, floats through serde_json's
        // shortest round-trip form (1.0 and 1e0 both print as 1.0).
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": 0.5}});
        let b = json!({"a": {"x": 0.5, "y": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":0.5,"y":[1,2]},"b":1}"#);
    }

    #[test]
    fn every_input_changes_the_key() {
        let settings = json!({"lr": 0.1});
        let up = vec![("from".to_string(), "k1".to_string())];
        let data = vec![(
            "corpus".to_string(),
            "d.parquet".to_string(),
            "h1".to_string(),
        )];
        let base = KeyInputs {
            kind: "sft",
            recipe_version: 1,
            settings: &settings,
            upstream: &up,
            datasets: &data,
            seed: 0,
        };
        let k = stage_key(&base);
        assert_eq!(k.len(), 64);
        assert_ne!(
            k,
            stage_key(&KeyInputs {
                kind: "dpo",
                ..base
            })
        );
        assert_ne!(
            k,
            stage_key(&KeyInputs {
                recipe_version: 2,
                ..base
            })
        );
        assert_ne!(k, stage_key(&KeyInputs { seed: 1, ..base }));
        let other = json!({"lr": 0.2});
        assert_ne!(
            k,
            stage_key(&KeyInputs {
                settings: &other,
                ..base
            })
        );
        let up2 = vec![("from".to_string(), "k2".to_string())];
        assert_ne!(
            k,
            stage_key(&KeyInputs {
                upstream: &up2,
                ..base
            })
        );
        let data2 = vec![(
            "corpus".to_string(),
            "d.parquet".to_string(),
            "h2".to_string(),
        )];
        assert_ne!(
            k,
            stage_key(&KeyInputs {
                datasets: &data2,
                ..base
            })
        );
    }
}

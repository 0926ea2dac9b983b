//! Why a stage is stale: each reason carries the old and new values, as
//! cargo's fingerprint "dirty reasons" and `dvc status` do.

use serde::Serialize;
use serde_json::Value;

use super::StageIdentity;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The experiment has not run this stage before.
    NeverRun,
    /// Same key as the last run, but the store no longer has the entry.
    MissingFromStore,
    KindChanged {
        old: String,
        new: String,
    },
    RecipeChanged {
        old: u32,
        new: u32,
    },
    SeedChanged {
        old: u64,
        new: u64,
    },
    SettingChanged {
        field: String,
        old: Value,
        new: Value,
    },
    UpstreamChanged {
        field: String,
        stage: String,
    },
    DatasetChanged {
        field: String,
        path: String,
    },
    /// `--force` named this stage.
    Forced,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Value| {
            if v.is_null() {
                "(unset)".to_string()
            } else {
                v.to_string()
            }
        };
        match self {
            Reason::NeverRun => write!(f, "not run before in this experiment"),
            Reason::MissingFromStore => write!(f, "output missing from the store (removed by gc?)"),
            Reason::KindChanged { old, new } => write!(f, "kind changed: {old} -> {new}"),
            Reason::RecipeChanged { old, new } => {
                write!(f, "recipe version changed: {old} -> {new}")
            }
            Reason::SeedChanged { old, new } => write!(f, "seed changed: {old} -> {new}"),
            Reason::SettingChanged { field, old, new } => {
                write!(
                    f,
                    "setting `{field}` changed: {} -> {}",
                    show(old),
                    show(new)
                )
            }
            Reason::UpstreamChanged { field, stage } => {
                write!(f, "upstream stage `{stage}` (field `{field}`) changed")
            }
            Reason::DatasetChanged { field, path } => {
                write!(f, "dataset `{path}` (field `{field}`) changed")
            }
            Reason::Forced => write!(f, "forced with --force"),
        }
    }
}

/// Compare a stage's new identity with the one recorded at the last run.
pub fn explain(new: &StageIdentity, old: Option<&StageIdentity>) -> Vec<Reason> {
    let Some(old) = old else {
        return vec![Reason::NeverRun];
    };
    if old.key == new.key {
        return vec![Reason::MissingFromStore];
    }
    if old.kind != new.kind {
        return vec![Reason::KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        }];
    }
    let mut reasons = Vec::new();
    if old.recipe_version != new.recipe_version {
        reasons.push(Reason::RecipeChanged {
            old: old.recipe_version,
            new: new.recipe_version,
        });
    }
    if old.seed != new.seed {
        reasons.push(Reason::SeedChanged {
            old: old.seed,
            new: new.seed,
        });
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", &old.settings, &mut a);
    flatten("", &new.settings, &mut b);
    let old_map: std::collections::BTreeMap<_, _> = a.into_iter().collect();
    let new_map: std::collections::BTreeMap<_, _> = b.into_iter().collect();
    let fields: std::collections::BTreeSet<&String> =
        old_map.keys().chain(new_map.keys()).collect();
    for field in fields {
        let (o, n) = (old_map.get(field), new_map.get(field));
        if o != n {
            reasons.push(Reason::SettingChanged {
                field: field.clone(),
                old: o.cloned().unwrap_or(Value::Null),
                new: n.cloned().unwrap_or(Value::Null),
            });
        }
    }
    for up in &new.upstream {
        let before = old.upstream.iter().find(|u| u.field == up.field);
        if before.is_none_or(|b| b.key != up.key) {
            reasons.push(Reason::UpstreamChanged {
                field: up.field.clone(),
                stage: up.stage.clone(),
            });
        }
    }
    for d in &new.datasets {
        let before = old
            .datasets
            .iter()
            .find(|x| x.field == d.field && x.path == d.path);
        if before.is_some_and(|b| b.hash != d.hash) {
            reasons.push(Reason::DatasetChanged {
                field: d.field.clone(),
                path: d.path.clone(),
            });
        }
    }
    reasons
}

/// Leaves of a settings object as (dotted.path, value); arrays are leaves.
pub fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::UpstreamInput;
    use serde_json::json;

    fn identity(key: &str, lr: f64, up: &str) -> StageIdentity {
        StageIdentity {
            key: key.into(),
            kind: "sft".into(),
            recipe_version: 1,
            seed: 0,
            settings: json!({"lr": lr, "from": "base"}),
            upstream: vec![UpstreamInput {
                field: "from".into(),
                stage: "base".into(),
                key: up.into(),
            }],
            datasets: vec![],
        }
    }

    #[test]
    fn names_changed_setting_with_old_and_new_values() {
        let r = explain(&identity("k2", 0.2, "u1"), Some(&identity("k1", 0.1, "u1")));
        assert_eq!(
            r,
            vec![Reason::SettingChanged {
                field: "lr".into(),
                old: json!(0.1),
                new: json!(0.2)
            }]
        );
        assert_eq!(r[0].to_string(), "setting `lr` changed: 0.1 -> 0.2");
    }

    #[test]
    fn names_changed_upstream() {
        let r = explain(&identity("k2", 0.1, "u2"), Some(&identity("k1", 0.1, "u1")));
        assert_eq!(
            r,
            vec![Reason::UpstreamChanged {
                field: "from".into(),
                stage: "base".into()
            }]
        );
        assert_eq!(
            explain(&identity("k1", 0.1, "u1"), None),
            vec![Reason::NeverRun]
        );
    }
}

//! Defaults that depend on other fields (`reference` is `from`, eval's
//! `baseline` its first policy, `epsilon_high` is `epsilon`, ...), filled
//! in when the experiment loads, before anything is hashed: a stage that
//! writes such a default out and one that leaves it out have the same
//! resolved settings, so the same cache key.
//!
//! | kind               | field            | default                                  |
//! |--------------------|------------------|------------------------------------------|
//! | dpo, kto, ppo      | `reference`      | `from`                                   |
//! | grpo, rloo         | `reference`      | `from`                                   |
//! | grpo               | `epsilon_high`   | `epsilon`                                |
//! | grpo, rloo         | `rewards`        | 1.0 for `reward_model` / `gold` if given |
//! | kto (with ratings) | `threshold`      | 5                                        |
//! | eval               | `baseline`       | the first policy                         |
//! | eval               | `reference`      | the first policy that is a model stage   |
//!
//! The stages' own code keeps the same fallbacks, so settings parsed
//! without this step (a cluster job reading the table as written) build
//! the same thing.

use std::collections::BTreeMap;

use super::references::{produces, Product};
use crate::stages::{StageRef, StageSettings};

/// Fill in `settings`' field-dependent defaults; `kind_of` gives the kind
/// of another stage of the experiment by name.
pub fn resolve(settings: &mut StageSettings, kind_of: &dyn Fn(&str) -> Option<&'static str>) {
    match settings {
        StageSettings::Dpo(s) => same_as(&mut s.reference, &s.from),
        StageSettings::Kto(s) => {
            same_as(&mut s.reference, &s.from);
            if s.ratings.is_some() {
                s.threshold
                    .get_or_insert(crate::stages::kto::DEFAULT_THRESHOLD);
            }
        }
        StageSettings::Ppo(s) => same_as(&mut s.reference, &s.from),
        StageSettings::Grpo(s) => {
            same_as(&mut s.reference, &s.from);
            s.epsilon_high.get_or_insert(s.epsilon);
            reward_weights(&mut s.rewards, s.reward_model.is_some(), s.gold.is_some());
        }
        StageSettings::Rloo(s) => {
            same_as(&mut s.reference, &s.from);
            reward_weights(&mut s.rewards, s.reward_model.is_some(), s.gold.is_some());
        }
        StageSettings::Eval(s) => {
            if s.baseline.is_none() {
                s.baseline = s.policies.first().cloned();
            }
            if s.reference.is_none() {
                s.reference = s
                    .policies
                    .iter()
                    .find(|p| {
                        kind_of(p.name())
                            .and_then(produces)
                            .is_some_and(|x| x.contains(&Product::Model))
                    })
                    .cloned();
            }
        }
        _ => {}
    }
}

fn same_as(field: &mut Option<StageRef>, default: &StageRef) {
    if field.is_none() {
        *field = Some(default.clone());
    }
}

/// GRPO's and RLOO's weights: 1.0 for each reward source given.
fn reward_weights(w: &mut BTreeMap<String, f64>, reward_model: bool, gold: bool) {
    if reward_model {
        w.entry("reward_model".into()).or_insert(1.0);
    }
    if gold {
        w.entry("gold".into()).or_insert(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::plan::{make_plan, HashCache};
    use crate::store::Store;

    const BASE: &str = r#"
[stages.world]
kind = "synth"

[stages.tokenizer]
kind = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }

[stages.sft]
kind = "sft"
from = "base"
data = { stage = "world", file = "demonstrations.parquet" }

[stages.rm]
kind = "reward"
from = "sft"
data = { stage = "world", file = "comparisons.parquet" }

[stages.bon]
kind = "best_of_n"
policy = "sft"
reward_model = "rm"
prompts = { stage = "world", file = "prompts_test.parquet" }

[stages.rate]
kind = "rate"
gold = "world"
data = { stage = "world", file = "comparisons.parquet" }
"#;

    /// Every stage's key, for an experiment of `BASE` plus `stages`.
    fn keys(stages: &str) -> BTreeMap<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, format!("{BASE}\n{stages}")).unwrap();
        let exp =
            crate::experiment::load(&path, dir.path()).unwrap_or_else(|e| panic!("{e}\n{stages}"));
        let store = Store::new(dir.path().join("store"));
        let plan = make_plan(&exp, dir.path(), &store, &mut HashCache::in_memory(), None).unwrap();
        plan.stages
            .iter()
            .map(|s| (s.name.clone(), s.key().to_string()))
            .collect()
    }

    /// `stage` (a `[stages.x]` table) with and without `extra` lines gives
    /// every stage the same key.
    fn same_keys(stage: &str, extra: &str) {
        let plain = keys(stage);
        let written = keys(&format!("{stage}\n{extra}"));
        assert_eq!(plain, written, "writing out `{extra}` changed a key");
    }

    #[test]
    fn writing_out_reference_from_never_changes_a_key() {
        let data = r#"data = { stage = "world", file = "comparisons.parquet" }"#;
        for kind in ["dpo", "kto"] {
            same_keys(
                &format!("[stages.p]\nkind = \"{kind}\"\nfrom = \"sft\"\n{data}"),
                "reference = \"sft\"",
            );
        }
        same_keys(
            "[stages.p]\nkind = \"ppo\"\nfrom = \"sft\"\nreward_model = \"rm\"\nprompts = { stage = \"world\", file = \"prompts_train.parquet\" }",
            "reference = \"sft\"",
        );
        for kind in ["grpo", "rloo"] {
            same_keys(
                &format!("[stages.p]\nkind = \"{kind}\"\nfrom = \"sft\"\nreward_model = \"rm\"\ngold = \"world\"\nprompts = {{ stage = \"world\", file = \"prompts_train.parquet\" }}"),
                "reference = \"sft\"\nrewards = { reward_model = 1.0, gold = 1.0 }",
            );
        }
    }

    #[test]
    fn writing_out_epsilon_high_and_threshold_never_changes_a_key() {
        same_keys(
            "[stages.p]\nkind = \"grpo\"\nfrom = \"sft\"\ngold = \"world\"\nepsilon = 0.3\nprompts = { stage = \"world\", file = \"prompts_train.parquet\" }",
            "epsilon_high = 0.3",
        );
        same_keys(
            "[stages.p]\nkind = \"kto\"\nfrom = \"sft\"\nratings = { stage = \"rate\", file = \"ratings.parquet\" }",
            "threshold = 5.0",
        );
    }

    #[test]
    fn writing_out_eval_reference_and_baseline_never_changes_a_key() {
        let eval = "[stages.e]\nkind = \"eval\"\npolicies = [\"bon\", \"sft\", \"base\"]\nprompts = { stage = \"world\", file = \"prompts_test.parquet\" }";
        same_keys(eval, "baseline = \"bon\"");
        // The reference defaults to the first policy that is a model stage.
        same_keys(eval, "reference = \"sft\"");
        same_keys(eval, "reference = \"sft\"\nbaseline = \"bon\"");
        let other = keys(&format!("{eval}\nreference = \"base\""));
        assert_ne!(
            other["e"],
            keys(eval)["e"],
            "a different reference is a different key"
        );
    }
}

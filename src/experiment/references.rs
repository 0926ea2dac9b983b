//! What a stage reference needs and what each kind produces, so that
//! `from = "tokenizer"` in a dpo stage or a `synth` stage among eval's
//! `policies` is refused when the experiment loads (naming the kinds that
//! would do) instead of failing at run time on a missing `config.json`.

use crate::stages::KINDS;

/// Something a stage's output can be used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// A causal language model folder (config.json, weights, tokenizer).
    Model,
    /// A model with a score head (a `reward` stage).
    RewardModel,
    /// A tokenizer.json (a tokenizer stage or any model stage).
    Tokenizer,
    /// A synthetic world whose gold labeler judges answers (`synth`).
    World,
    /// Best-of-n picks (eval reads them as a policy).
    BestOfN,
}

impl Product {
    pub fn describe(self) -> &'static str {
        match self {
            Product::Model => "a model",
            Product::RewardModel => "a reward model",
            Product::Tokenizer => "a tokenizer",
            Product::World => "a synthetic world",
            Product::BestOfN => "best-of-n picks",
        }
    }
}

/// Kinds whose output is a causal language model.
const MODEL_KINDS: &[&str] = &[
    "pretrain", "load", "sft", "dpo", "ppo", "grpo", "rloo", "orpo", "simpo", "kto",
];

/// What a stage of `kind` produces; `None` for a kind this table does not
/// know (a test keeps it complete).
pub fn produces(kind: &str) -> Option<&'static [Product]> {
    use Product::*;
    if MODEL_KINDS.contains(&kind) {
        return Some(&[Model, Tokenizer]);
    }
    Some(match kind {
        "tokenizer" => &[Tokenizer],
        "reward" => &[RewardModel, Tokenizer],
        "synth" => &[World],
        "best_of_n" => &[BestOfN],
        "dataset" | "label" | "rate" | "eval" => &[],
        _ => return None,
    })
}

/// What the stage field `field` (as [`crate::stages::Input::field`] names
/// it: `from`, `policies[1]`, `normalize.policy`) of a `kind` stage needs:
/// any one of the products listed; `None` when the field is not checked.
pub fn needs(kind: &str, field: &str) -> Option<&'static [Product]> {
    use Product::*;
    let top = field.split('[').next().unwrap_or(field);
    Some(match (kind, top) {
        // A reward model may start from another reward model's backbone.
        ("reward", "from") => &[Model, RewardModel],
        (_, "from" | "reference" | "policy" | "normalize.policy") => &[Model],
        (_, "reward_model" | "judge") => &[RewardModel],
        (_, "gold") => &[World],
        (_, "tokenizer") => &[Tokenizer],
        ("eval", "policies" | "baseline") => &[Model, BestOfN],
        _ => return None,
    })
}

/// The kinds that produce any of `wanted`, for a "kinds that would do" hint.
pub fn kinds_producing(wanted: &[Product]) -> Vec<&'static str> {
    KINDS
        .iter()
        .copied()
        .filter(|k| produces(k).is_some_and(|p| p.iter().any(|x| wanted.contains(x))))
        .collect()
}

/// `Some(what is missing)` when a `target_kind` stage cannot serve `wanted`.
pub fn mismatch(wanted: &[Product], target_kind: &str) -> Option<String> {
    let have = produces(target_kind)?;
    if have.iter().any(|p| wanted.contains(p)) {
        return None;
    }
    let names: Vec<&str> = wanted.iter().map(|p| p.describe()).collect();
    Some(names.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_says_what_it_produces() {
        for kind in KINDS {
            assert!(
                produces(kind).is_some(),
                "kind `{kind}` missing from produces()"
            );
        }
    }

    #[test]
    fn a_tokenizer_is_not_a_model_and_synth_is_not_a_policy() {
        assert!(mismatch(needs("dpo", "from").unwrap(), "tokenizer").is_some());
        assert!(mismatch(needs("eval", "policies[1]").unwrap(), "synth").is_some());
        assert!(mismatch(needs("eval", "policies[0]").unwrap(), "best_of_n").is_none());
        assert!(mismatch(needs("pretrain", "tokenizer").unwrap(), "sft").is_none());
        assert!(mismatch(needs("ppo", "reward_model").unwrap(), "sft").is_some());
        assert_eq!(
            kinds_producing(&[Product::World]),
            vec!["synth"],
            "only synth makes worlds"
        );
    }
}

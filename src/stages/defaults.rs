//! Nested settings tables whose defaults depend on the stage kind (PPO's
//! `train`, eval's `sampling`): a partly written table keeps the kind's
//! defaults for the fields it leaves out, rather than the general ones.

use serde::de::{DeserializeOwned, Deserializer, Error};
use serde::{Deserialize, Serialize};

/// Read a table and lay its fields over `base`.
pub fn merged_over<'de, D, T>(base: T, d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Serialize + DeserializeOwned,
{
    let given = toml::Value::deserialize(d)?;
    let toml::Value::Table(given) = given else {
        return Err(D::Error::custom("expected a table"));
    };
    let mut full = toml::Value::try_from(&base).map_err(D::Error::custom)?;
    let toml::Value::Table(fields) = &mut full else {
        return Err(D::Error::custom("settings serialize to a table"));
    };
    for (k, v) in given {
        fields.insert(k, v);
    }
    T::deserialize(full).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use crate::stages::StageSettings;

    fn parse(kind: &str, text: &str) -> StageSettings {
        let value: toml::Value = toml::from_str(text).unwrap();
        StageSettings::parse(kind, value).unwrap().unwrap()
    }

    #[test]
    fn a_partial_ppo_train_table_keeps_ppo_defaults() {
        let s = parse(
            "ppo",
            r#"from = "sft"
reward_model = "rm"
prompts = "p.parquet"
train = { batch_size = 4 }"#,
        );
        let StageSettings::Ppo(p) = s else { panic!() };
        assert_eq!(p.train.batch_size, 4);
        assert_eq!(p.train.lr, 2e-5);
        assert_eq!(p.train.steps, 60);
        assert_eq!(p.train.warmup_steps, 5);
    }

    #[test]
    fn a_partial_eval_sampling_table_keeps_eval_temperature() {
        let s = parse(
            "eval",
            r#"policies = ["sft"]
prompts = "p.parquet"
sampling = { max_new_tokens = 16 }"#,
        );
        let StageSettings::Eval(e) = s else { panic!() };
        assert_eq!(e.sampling.max_new_tokens, 16);
        assert_eq!(e.sampling.temperature, 0.7);
    }

    #[test]
    fn unknown_fields_in_a_merged_table_are_still_refused() {
        let value: toml::Value = toml::from_str(
            r#"from = "sft"
reward_model = "rm"
prompts = "p.parquet"
train = { lrr = 1.0 }"#,
        )
        .unwrap();
        let err = StageSettings::parse("ppo", value).unwrap().unwrap_err();
        assert!(err.to_string().contains("lrr"), "{err}");
    }
}

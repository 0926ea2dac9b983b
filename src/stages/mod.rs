//! Stage kinds: one file per kind. Each file starts with its settings struct
//! (every field documented with its default), then `run`.
//!
//! Adding a kind: write `KIND.rs` implementing [`StageKind`], and list it in
//! the `stage_kinds!` invocation below. Bump `RECIPE_VERSION` whenever a code
//! change alters what the stage writes: it is part of the cache key.

pub mod best_of_n;
pub mod context;
pub mod dataset;
pub mod defaults;
pub mod dpo;
pub mod eval;
pub mod grpo;
pub mod inputs;
pub mod kto;
pub mod label;
pub mod load;
pub mod model_files;
pub mod orpo;
pub mod ppo;
pub mod pretrain;
pub mod rate;
pub mod reward;
pub mod rloo;
pub mod sft;
pub mod simpo;
pub mod synth;
pub mod token_data;
pub mod tokenizer;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use context::{Metrics, StageContext, StageError};
pub use inputs::{DataSource, Input, InputTarget, StageRef};

/// What every stage kind provides.
pub trait StageKind: Sized + Clone + std::fmt::Debug + Serialize + DeserializeOwned {
    /// The `kind = "..."` string.
    const KIND: &'static str;
    /// Version of the code that computes this kind's output (in the cache key).
    const RECIPE_VERSION: u32;
    /// One line for `--help` and `list`.
    const SUMMARY: &'static str;

    /// The stages and files this stage reads (the DAG's edges).
    fn inputs(&self) -> Vec<Input>;

    /// Value checks serde cannot express: `Err((field, message))`.
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }

    /// The files the stage always writes, when known before it runs, so that
    /// a reference to a file of its output can be checked at load time.
    fn outputs(&self) -> Option<Vec<String>> {
        None
    }

    /// Compute the stage's output into `ctx.out_dir`; return final metrics.
    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError>;
}

macro_rules! stage_kinds {
    ($($variant:ident => $ty:ty),* $(,)?) => {
        /// The typed settings of one stage, by kind.
        #[derive(Debug, Clone)]
        pub enum StageSettings {
            $($variant($ty)),*
        }

        /// Every stage kind, as written in `kind = "..."`.
        pub const KINDS: &[&str] = &[$(<$ty as StageKind>::KIND),*];

        /// (kind, one-line summary) for help texts.
        pub const KIND_SUMMARIES: &[(&str, &str)] =
            &[$((<$ty as StageKind>::KIND, <$ty as StageKind>::SUMMARY)),*];

        impl StageSettings {
            /// Parse `value` (the stage's table without `kind`, `seed`,
            /// `description`) as settings of `kind`; `None` for an unknown kind.
            pub fn parse(
                kind: &str,
                value: toml::Value,
            ) -> Option<Result<Self, serde_path_to_error::Error<toml::de::Error>>> {
                match kind {
                    $(<$ty as StageKind>::KIND => Some(
                        serde_path_to_error::deserialize(value).map(StageSettings::$variant),
                    ),)*
                    _ => None,
                }
            }

            pub fn kind(&self) -> &'static str {
                match self { $(StageSettings::$variant(_) => <$ty as StageKind>::KIND),* }
            }

            pub fn recipe_version(&self) -> u32 {
                match self { $(StageSettings::$variant(_) => <$ty as StageKind>::RECIPE_VERSION),* }
            }

            pub fn inputs(&self) -> Vec<Input> {
                match self { $(StageSettings::$variant(s) => s.inputs()),* }
            }

            pub fn validate(&self) -> Result<(), (String, String)> {
                match self { $(StageSettings::$variant(s) => s.validate()),* }
            }

            pub fn outputs(&self) -> Option<Vec<String>> {
                match self { $(StageSettings::$variant(s) => s.outputs()),* }
            }

            /// The fully resolved settings (defaults filled in) as JSON,
            /// without the runtime-only ones (see [`RUNTIME_ONLY`]): what
            /// the key hashes and the manifest shows.
            pub fn to_json(&self) -> serde_json::Value {
                let value = match self { $(StageSettings::$variant(s) => serde_json::to_value(s)),* };
                let mut value = value.expect("stage settings always serialize to JSON");
                for pointer in RUNTIME_ONLY {
                    let (parent, field) = pointer.rsplit_once('/').expect("a JSON pointer");
                    if let Some(serde_json::Value::Object(map)) = value.pointer_mut(parent) {
                        map.remove(field);
                    }
                }
                value
            }

            pub fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
                match self { $(StageSettings::$variant(s) => s.run(ctx)),* }
            }
        }
    };
}

stage_kinds! {
    Synth => synth::SynthSettings,
    Dataset => dataset::DatasetSettings,
    Tokenizer => tokenizer::TokenizerSettings,
    Pretrain => pretrain::PretrainSettings,
    Load => load::LoadSettings,
    Sft => sft::SftSettings,
    Dpo => dpo::DpoSettings,
    Reward => reward::RewardSettings,
    Label => label::LabelSettings,
    Ppo => ppo::PpoSettings,
    Grpo => grpo::GrpoSettings,
    Rloo => rloo::RlooSettings,
    Orpo => orpo::OrpoSettings,
    Simpo => simpo::SimpoSettings,
    Kto => kto::KtoSettings,
    Rate => rate::RateSettings,
    BestOfN => best_of_n::BestOfNSettings,
    Eval => eval::EvalSettings,
}

/// Settings that change how a stage runs but not what it computes: left
/// out of the key (JSON pointers into the settings).
pub const RUNTIME_ONLY: &[&str] = &["/train/checkpoint_every"];

/// Final metrics of a stage, by name.
pub type MetricMap = BTreeMap<String, f64>;

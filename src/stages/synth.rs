//! `synth`: generate the synthetic assistant world (corpus, demonstrations,
//! comparisons, rankings, train/test prompts, and `world.json` for the gold
//! labeler). Settings: see [`SynthConfig`]; every field has a default, so
//! `[stages.world] kind = "synth"` is a complete stage.

use super::{Input, Metrics, StageContext, StageError, StageKind};
use crate::data::synth::{self, FILES};

pub use crate::data::synth::SynthConfig as SynthSettings;

impl StageKind for SynthSettings {
    const KIND: &'static str = "synth";
    // 2: held-out prompts use held-out phrasings.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "generate the synthetic assistant world and its gold labeler";

    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }

    fn validate(&self) -> Result<(), (String, String)> {
        SynthSettings::validate(self)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(FILES.iter().map(|f| f.to_string()).collect())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        ctx.progress.set_message("generating the world");
        let mut data = synth::generate(self, ctx.seed)?;
        synth::write(&mut data, ctx.out_dir)?;
        let mut metrics = Metrics::new();
        metrics.insert("corpus_docs".into(), data.corpus.height() as f64);
        metrics.insert("demonstrations".into(), data.demonstrations.height() as f64);
        metrics.insert("comparisons".into(), data.comparisons.height() as f64);
        metrics.insert("rankings".into(), data.rankings.height() as f64);
        metrics.insert("prompts_test".into(), data.prompts_test.height() as f64);
        Ok(metrics)
    }
}

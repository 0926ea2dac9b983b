//! How many bytes a stage will need, estimated from its settings before
//! anything is allocated, so that a size the machine cannot hold is refused
//! when the experiment loads (with the number and why) instead of the
//! process aborting on a failed allocation at step 0.
//!
//! The estimates are deliberately rough upper-ish bounds:
//!
//! | stage    | estimate                                                     |
//! |----------|--------------------------------------------------------------|
//! | synth    | rows x [`BYTES_PER_ROW`] (text, polars copy, Parquet buffer)   |
//! | pretrain | parameters x 16 B (f32 weights, gradients, Adam m and v)      |
//! |          | + batch x seq_len x (layers x 20 x hidden + 2 x vocab) x 4 B  |
//! |          | + batch x heads x seq_len^2 x layers x 8 B (attention)        |
//!
//! The machine's memory is `MemTotal` from `/proc/meminfo`, or
//! `POSTTRAIN_MEMORY_BYTES` when set (tests; a share of a cluster node).

use crate::experiment::Stage;
use crate::model::LlamaConfig;
use crate::stages::StageSettings;

/// Bytes one synthetic row costs while it is generated and written.
pub const BYTES_PER_ROW: f64 = 1024.0;
pub const MEMORY_ENV: &str = "POSTTRAIN_MEMORY_BYTES";

/// The memory this machine has, when known.
pub fn machine_bytes() -> Option<f64> {
    if let Some(v) = std::env::var_os(MEMORY_ENV) {
        return v.to_str()?.trim().parse::<f64>().ok();
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// "1.2 TB" and the like.
pub fn human(bytes: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u + 1 == units.len() && v >= 1000.0 {
        return format!("{bytes:.1e} B");
    }
    format!("{v:.1} {}", units[u])
}

/// (field, bytes, why) of the largest need of one stage. `vocab` is the
/// vocabulary size when the stage's tokenizer is known.
pub fn estimate(settings: &StageSettings, vocab: Option<usize>) -> Option<(String, f64, String)> {
    match settings {
        StageSettings::Synth(s) => {
            let counts = [
                ("corpus_docs", s.corpus_docs as f64),
                (
                    "demonstrations",
                    s.demonstrations as f64 * (1.0 + s.test_share),
                ),
                ("comparisons", s.comparisons as f64 * (1.0 + s.test_share)),
                ("rankings", s.rankings as f64 * s.ranking_size.max(1) as f64),
                ("prompts_train", s.prompts_train as f64),
                ("prompts_test", s.prompts_test as f64),
            ];
            let rows: f64 = counts.iter().map(|(_, n)| n).sum();
            let (field, _) =
                counts
                    .iter()
                    .copied()
                    .fold(("corpus_docs", -1.0), |a, b| if b.1 > a.1 { b } else { a });
            Some((
                field.to_string(),
                rows * BYTES_PER_ROW,
                format!("{rows:.3e} rows of about {BYTES_PER_ROW} bytes each"),
            ))
        }
        StageSettings::Pretrain(p) => {
            let vocab = vocab.unwrap_or(512);
            let cfg = p.model.config(vocab, p.seq_len);
            let params = parameters(&cfg);
            let batch = p.train.batch_size as f64;
            let seq = p.seq_len as f64;
            let (h, l) = (cfg.hidden_size as f64, cfg.num_hidden_layers as f64);
            let heads = cfg.num_attention_heads as f64;
            let activations = batch * seq * (l * 20.0 * h + 2.0 * vocab as f64) * 4.0
                + batch * heads * seq * seq * l * 8.0;
            let bytes = params * 16.0 + activations;
            let field = if activations > params * 16.0 {
                "train"
            } else {
                "model"
            };
            Some((
                field.to_string(),
                bytes,
                format!(
                    "{params:.3e} parameters x 16 bytes (weights, gradients, Adam's two moments) plus {} of activations for batch_size {} x seq_len {}",
                    human(activations),
                    p.train.batch_size,
                    p.seq_len
                ),
            ))
        }
        _ => None,
    }
}

/// Parameters of a Llama with `cfg` (f64: sizes may overflow usize).
pub fn parameters(cfg: &LlamaConfig) -> f64 {
    let h = cfg.hidden_size as f64;
    let v = cfg.vocab_size as f64;
    let hd = cfg.head_dim() as f64;
    let q = cfg.num_attention_heads as f64 * hd;
    let kv = cfg.kv_heads() as f64 * hd;
    let inter = cfg.intermediate_size as f64;
    let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * inter + 2.0 * h;
    let embed = if cfg.tie_word_embeddings {
        v * h
    } else {
        2.0 * v * h
    };
    embed + cfg.num_hidden_layers as f64 * per_layer + h
}

/// Refuse a stage whose estimate exceeds the machine: `Err((field, message))`.
pub fn check(
    stage: &Stage,
    stages: &std::collections::BTreeMap<String, Stage>,
) -> Result<(), (String, String)> {
    let Some(have) = machine_bytes() else {
        return Ok(());
    };
    let vocab = match &stage.settings {
        StageSettings::Pretrain(p) => match stages.get(p.tokenizer.name()).map(|s| &s.settings) {
            Some(StageSettings::Tokenizer(t)) => Some(t.vocab_size),
            _ => None,
        },
        _ => None,
    };
    let Some((field, need, why)) = estimate(&stage.settings, vocab) else {
        return Ok(());
    };
    if need <= have {
        return Ok(());
    }
    Err((
        field,
        format!(
            "needs about {} of memory ({why}), more than this machine's {}\n  help: make the sizes smaller, or run it on a machine with more memory (set {MEMORY_ENV} to override what is assumed)",
            human(need),
            human(have)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_of_a_known_shape() {
        // 2 layers, h=64, 4 heads of 16, 2 kv heads, inter=176, vocab=100,
        // untied: embed 2*100*64 = 12800; per layer 64*64 + 2*64*32 +
        // 64*64 + 3*64*176 + 128 = 4096 + 4096 + 4096 + 33792 + 128 = 46208;
        // 12800 + 2*46208 + 64 = 105280.
        let cfg = crate::model::LlamaConfig::tiny(100, 64, 2, 4, 2);
        let cfg = crate::model::LlamaConfig {
            intermediate_size: 176,
            ..cfg
        };
        assert_eq!(parameters(&cfg), 105280.0);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(24e12), "24.0 TB");
        assert_eq!(human(512.0), "512.0 B");
    }
}

//! posttrain's Llama-family model against an independent numpy
//! implementation of the Hugging Face forward passes
//! (tests/reference/llama_reference.py, written from transformers'
//! modeling files): logits and per-token log-probs agree to 1e-4 for every
//! supported architecture (Llama, Mistral, Qwen2, Qwen3) and RoPE type
//! (default, linear, llama3), with config.json in transformers' v4 and v5
//! layouts. The random checkpoints have large weights and sharp attention
//! (q and k scaled up), so a wrong position, bias or norm cannot hide
//! under the tolerance. Sequences are batched and padded on our side.

use std::path::Path;
use std::process::Command;

use dfdx::prelude::*;
use posttrain::model::checkpoint;
use posttrain::model::config::{Architecture, RopeParameters, RopeType};
use posttrain::model::llama::{logits, token_logprobs, TokenBatch};
use posttrain::model::{LlamaConfig, LlamaParams};
use serde_json::{json, Value};

fn tiny(arch: Architecture) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(37, 16, 2, 4, 2);
    cfg.architecture = arch;
    cfg.intermediate_size = 40;
    cfg.rope = RopeParameters::theta(500.0);
    cfg
}

/// transformers v4's spelling of a v5 config.json: top-level `rope_theta`,
/// `rope_scaling` (with the legacy `type` key when `legacy_type`),
/// `torch_dtype`.
fn to_v4(v5: &Value, legacy_type: bool) -> Value {
    let mut v = v5.clone();
    let obj = v.as_object_mut().unwrap();
    let mut rope = obj.remove("rope_parameters").unwrap();
    let rope = rope.as_object_mut().unwrap();
    obj.insert("rope_theta".into(), rope.remove("rope_theta").unwrap());
    let kind = rope.remove("rope_type").unwrap();
    if kind != "default" {
        rope.insert(if legacy_type { "type" } else { "rope_type" }.into(), kind);
        obj.insert("rope_scaling".into(), Value::Object(rope.clone()));
    }
    let dtype = obj.remove("dtype").unwrap();
    obj.insert("torch_dtype".into(), dtype);
    obj.remove("transformers_version");
    v
}

enum Layout {
    V5,
    V4,
    V4LegacyType,
}

fn check(cfg: &LlamaConfig, layout: Layout) {
    let dev = Cpu::default();
    let mut p = LlamaParams::<f32, Cpu>::init(cfg, false, 11, &dev);
    // Weights larger than the 0.02 init so logits vary by whole units;
    // queries and keys larger still, so attention is sharp and positions
    // matter; norm weights away from 1, biases away from 0.
    for (name, t) in p.named_mut() {
        let v: Vec<f32> = t
            .as_vec()
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if posttrain::model::params::is_norm(&name) {
                    0.6 + 0.05 * (i % 17) as f32
                } else if name.ends_with(".bias") {
                    0.3 * ((i % 7) as f32 - 3.0)
                } else if name.contains("q_proj") || name.contains("k_proj") {
                    x * 40.0
                } else {
                    x * 10.0
                }
            })
            .collect();
        t.copy_from(&v);
    }
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&p, dir.path()).unwrap();
    let config_path = dir.path().join("config.json");
    let v5: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert!(v5.get("rope_parameters").is_some(), "posttrain writes v5");
    let written = match layout {
        Layout::V5 => v5,
        Layout::V4 => to_v4(&v5, false),
        Layout::V4LegacyType => to_v4(&v5, true),
    };
    std::fs::write(&config_path, written.to_string()).unwrap();

    let sequences: Vec<Vec<usize>> = vec![
        vec![3, 17, 5, 30, 2, 9, 11, 4, 22, 35, 1, 19],
        vec![36, 1, 4],
        vec![8, 8, 20, 14, 0, 27, 6],
    ];
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&sequences).unwrap()).unwrap();
    let out_path = dir.path().join("out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_reference.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .arg(&ids_path)
        .arg(&out_path)
        .output()
        .expect("python3 runs (install numpy: python3 -m pip install numpy)");
    assert!(
        output.status.success(),
        "the numpy reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: Vec<Value> = serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();

    // Our side: one right-padded batch, loaded back from the rewritten config.
    let q = checkpoint::load(dir.path(), &dev).unwrap();
    assert_eq!(&q.config.rope, &cfg.rope);
    let batch = TokenBatch::right_padded(&sequences, 0);
    let ours = logits(&q, &batch, NoneTape).as_vec();
    let ours_lp = token_logprobs(&q, &batch, NoneTape).as_vec();
    let (s, v) = (batch.seq, cfg.vocab_size);
    let (mut max_logit_diff, mut max_lp_diff, mut spread) = (0f64, 0f64, 0f64);
    for (row, seq) in sequences.iter().enumerate() {
        let ref_logits = reference[row]["logits"].as_array().unwrap();
        for t in 0..seq.len() {
            let ref_row = ref_logits[t].as_array().unwrap();
            for j in 0..v {
                let r = ref_row[j].as_f64().unwrap();
                let o = ours[(row * s + t) * v + j] as f64;
                max_logit_diff = max_logit_diff.max((r - o).abs());
                spread = spread.max(r.abs());
            }
        }
        let ref_lp = reference[row]["logprobs"].as_array().unwrap();
        for t in 0..seq.len() - 1 {
            let r = ref_lp[t].as_f64().unwrap();
            max_lp_diff = max_lp_diff.max((r - ours_lp[row * s + t] as f64).abs());
        }
    }
    let what = format!("{:?} {:?}", cfg.architecture, cfg.rope.rope_type);
    assert!(
        spread > 1.0,
        "{what}: logits should vary by whole units, max |logit| {spread}"
    );
    assert!(
        max_logit_diff < 1e-4,
        "{what}: max logit difference {max_logit_diff}"
    );
    assert!(
        max_lp_diff < 1e-4,
        "{what}: max log-prob difference {max_lp_diff}"
    );
}

#[test]
fn llama_default_rope_both_layouts() {
    check(&tiny(Architecture::Llama), Layout::V5);
    check(&tiny(Architecture::Llama), Layout::V4);
}

#[test]
fn llama_linear_rope_with_the_legacy_type_key() {
    let mut cfg = tiny(Architecture::Llama);
    cfg.rope.rope_type = RopeType::Linear { factor: 4.0 };
    check(&cfg, Layout::V4LegacyType);
    check(&cfg, Layout::V5);
}

#[test]
fn llama3_rope_with_biases_both_layouts() {
    // Heads of 8: frequencies in all three of llama3's bands.
    let mut cfg = LlamaConfig::tiny(37, 16, 2, 2, 1);
    cfg.intermediate_size = 40;
    cfg.attention_bias = true;
    cfg.mlp_bias = true;
    cfg.rope = RopeParameters {
        rope_theta: 500.0,
        rope_type: RopeType::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        },
    };
    check(&cfg, Layout::V5);
    check(&cfg, Layout::V4);
}

#[test]
fn mistral() {
    check(&tiny(Architecture::Mistral), Layout::V5);
    check(&tiny(Architecture::Mistral), Layout::V4);
}

#[test]
fn qwen2_qkv_biases_tied() {
    let mut cfg = tiny(Architecture::Qwen2);
    cfg.tie_word_embeddings = true;
    check(&cfg, Layout::V4);
    check(&cfg, Layout::V5);
}

#[test]
fn qwen3_qk_norm_and_explicit_head_dim() {
    let mut cfg = tiny(Architecture::Qwen3);
    cfg.head_dim = Some(8); // wider than hidden / heads = 4
    check(&cfg, Layout::V5);
    check(&cfg, Layout::V4);
}

/// Each variant posttrain does not compute is refused by name when loaded.
#[test]
fn unsupported_variants_are_refused_naming_the_field() {
    let p = LlamaParams::<f32, Cpu>::init(&tiny(Architecture::Llama), false, 1, &Cpu::default());
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&p, dir.path()).unwrap();
    let path = dir.path().join("config.json");
    let good: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let cases = [
        (
            json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0}}),
            "`rope_parameters.rope_type` is \"yarn\"",
        ),
        (
            json!({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}),
            "`rope_parameters.rope_type` is \"dynamic\"",
        ),
        (
            json!({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}),
            "`model_type` is \"gemma2\"",
        ),
        (
            json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64}),
            "`sliding_window` is 64",
        ),
        (json!({"hidden_act": "gelu_pytorch_tanh"}), "`hidden_act`"),
    ];
    for (patch, want) in cases {
        let mut cfg = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = checkpoint::load(dir.path(), &Cpu::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(want),
            "{want}: {err}"
        );
    }
}

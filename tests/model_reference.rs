//! posttrain's Llama against an independent numpy implementation of the
//! Hugging Face forward pass (tests/reference/llama_reference.py): logits
//! and per-token log-probs of a random tiny GQA checkpoint with an untied
//! head agree to 1e-4, with the sequences batched and padded on our side.

use std::path::Path;
use std::process::Command;

use dfdx::prelude::*;
use posttrain::model::checkpoint;
use posttrain::model::llama::{logits, token_logprobs, TokenBatch};
use posttrain::model::{LlamaConfig, LlamaParams};

#[test]
fn logits_and_logprobs_match_the_numpy_reference() {
    let mut cfg = LlamaConfig::tiny(37, 16, 2, 4, 2);
    cfg.intermediate_size = 40;
    cfg.rope_theta = 500.0;
    let dev = Cpu::default();
    let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 11, &dev);
    // Larger weights than the 0.02 init, so logits vary by whole units and a
    // wrong detail cannot hide under 1e-4; norm weights away from 1.
    for (name, t) in p.named_mut() {
        let scale = if posttrain::model::params::is_norm(&name) {
            0.0
        } else {
            10.0
        };
        let v: Vec<f32> = t
            .as_vec()
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if scale == 0.0 {
                    0.6 + 0.05 * (i % 17) as f32
                } else {
                    x * scale
                }
            })
            .collect();
        t.copy_from(&v);
    }
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&p, dir.path()).unwrap();

    let sequences: Vec<Vec<usize>> = vec![
        vec![3, 17, 5, 30, 2, 9, 11],
        vec![36, 1, 4],
        vec![8, 8, 20, 14, 0],
    ];
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&sequences).unwrap()).unwrap();
    let out_path = dir.path().join("out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_reference.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .arg(&ids_path)
        .arg(&out_path)
        .status()
        .expect("python3 runs (install numpy: python3 -m pip install numpy)");
    assert!(
        status.success(),
        "the numpy reference failed (is numpy installed?)"
    );
    let reference: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();

    // Our side: one right-padded batch with all sequences, loaded back from disk.
    let q = checkpoint::load(dir.path(), &dev).unwrap();
    let batch = TokenBatch::right_padded(&sequences, 0);
    let ours = logits(&q, &batch, NoneTape).as_vec();
    let ours_lp = token_logprobs(&q, &batch, NoneTape).as_vec();
    let (s, v) = (batch.seq, cfg.vocab_size);
    let mut max_logit_diff = 0f64;
    let mut max_lp_diff = 0f64;
    let mut spread = 0f64;
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
    assert!(
        spread > 1.0,
        "logits should vary by whole units, max |logit| {spread}"
    );
    assert!(
        max_logit_diff < 1e-4,
        "max logit difference {max_logit_diff}"
    );
    assert!(max_lp_diff < 1e-4, "max log-prob difference {max_lp_diff}");
}

//! GGUF out and back in: a model of each architecture exported as F32,
//! F16 and Q8_0, read by the `gguf` Python package (llama.cpp's own
//! reader), and loaded back by posttrain: F32 gives identical logits, F16
//! and Q8_0 stay within stated tolerances. And files posttrain must refuse:
//! truncated, an unknown tensor type, another architecture.

use std::path::Path;
use std::process::Command;

use dfdx::prelude::*;
use posttrain::gguf::{self, GgmlType, Value, WriteTensor};
use posttrain::model::config::Architecture;
use posttrain::model::gguf_checkpoint::{self, ExportType};
use posttrain::model::llama::{logits, TokenBatch};
use posttrain::model::{LlamaConfig, LlamaParams};

fn model(arch: Architecture) -> LlamaParams<f32, Cpu> {
    // Rows of 32 values so Q8_0 applies to every matrix.
    let mut cfg = LlamaConfig::tiny(40, 32, 2, 4, 2);
    cfg.architecture = arch;
    cfg.intermediate_size = 64;
    cfg.tie_word_embeddings = arch == Architecture::Qwen2;
    cfg.rope.rope_theta = 1000.0;
    let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 5, &Cpu::default());
    for (name, t) in p.named_mut() {
        let v: Vec<f32> = t
            .as_vec()
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if posttrain::model::params::is_norm(&name) {
                    0.8 + 0.03 * (i % 11) as f32
                } else if name.ends_with(".bias") {
                    0.1 * ((i % 5) as f32 - 2.0)
                } else {
                    x * 8.0
                }
            })
            .collect();
        t.copy_from(&v);
    }
    p
}

/// Enough tokenizer metadata for a GGUF reader: a token list.
fn tokens(n: usize) -> Vec<(String, Value)> {
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array((0..n).map(|i| Value::String(format!("t{i}"))).collect()),
        ),
    ]
}

fn logits_of(p: &LlamaParams<f32, Cpu>) -> Vec<f32> {
    let b = TokenBatch::right_padded(&[vec![1, 7, 3, 22, 9, 30, 2, 15], vec![4, 4, 39]], 0);
    logits(p, &b, NoneTape).as_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn export_then_load_gives_the_same_logits_and_gguf_py_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_read.py");
    for arch in Architecture::ALL {
        let p = model(arch);
        let want = logits_of(&p);
        let spread = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(spread > 1.0, "logits should vary by units: {spread}");
        // Tolerances relative to the largest logit, through two layers of
        // weights 8x the usual init (measured: F16 at most 0.1% of it,
        // Q8_0 at most 3.7%, Qwen2's tied embedding quantized too; see
        // the test's printout).
        for (kind, tol) in [
            (ExportType::F32, 0.0),
            (ExportType::F16, 5e-3 * spread),
            (ExportType::Q8_0, 6e-2 * spread),
        ] {
            let path = dir.path().join(format!("{arch:?}-{kind:?}.gguf"));
            gguf_checkpoint::export(&p, tokens(40), "test", kind, &path).unwrap();
            let back: LlamaParams<f32, Cpu> =
                gguf_checkpoint::load(&path, &Cpu::default()).unwrap();
            assert_eq!(back.config.architecture, arch.gguf_family(), "{arch:?}");
            let got = logits_of(&back);
            let d = max_diff(&want, &got);
            println!(
                "{arch:?} {kind:?}: max |logit| {spread:.3}, max difference {d:.5} ({:.3}%)",
                100.0 * d / spread
            );
            assert!(
                d <= tol,
                "{arch:?} {kind:?}: max logit difference {d} > {tol}"
            );
            if kind == ExportType::F32 {
                assert_eq!(want, got, "{arch:?}: F32 must round-trip exactly");
            }
            // llama.cpp's own Python reader parses it.
            let out = Command::new("python3")
                .arg(&reader)
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "gguf-py cannot read {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let text = listing.to_string();
            assert!(
                text.contains("token_embd.weight") && text.contains("blk.1.ffn_down.weight"),
                "{text}"
            );
        }
    }
}

#[test]
fn truncated_unknown_type_and_foreign_architecture_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(Architecture::Llama);
    let good = dir.path().join("good.gguf");
    gguf_checkpoint::export(&p, tokens(40), "test", ExportType::F32, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let e = gguf_checkpoint::load::<Cpu>(&truncated, &Cpu::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated.gguf"), "{e}");

    // The first tensor's type field: after its name, dim count and dims.
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    let mut unknown = bytes.clone();
    unknown[type_at..type_at + 4].copy_from_slice(&999u32.to_le_bytes());
    let path = dir.path().join("unknown-type.gguf");
    std::fs::write(&path, &unknown).unwrap();
    let e = gguf_checkpoint::load::<Cpu>(&path, &Cpu::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown-type.gguf") && e.contains("999"), "{e}");

    let values = vec![0f32; 64];
    let foreign = dir.path().join("gpt2.gguf");
    gguf::write(
        &foreign,
        &[("general.architecture".into(), Value::String("gpt2".into()))],
        &[WriteTensor {
            name: "token_embd.weight".into(),
            shape: vec![2, 32],
            values: &values,
            kind: GgmlType::F32,
        }],
    )
    .unwrap();
    let e = gguf_checkpoint::load::<Cpu>(&foreign, &Cpu::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("gpt2.gguf") && e.contains("`general.architecture` is \"gpt2\""),
        "{e}"
    );
}

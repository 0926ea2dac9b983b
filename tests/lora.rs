//! LoRA on sft, dpo, reward and ppo: only the adapters train (every other
//! weight of the merged output is the base's, byte for byte), the adapter
//! is saved in PEFT's format beside the merged model, downstream stages
//! read the merged model, and a killed LoRA stage resumes to the same bytes.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::TestProject;

const LORA: &str = r#"lora = { r = 4, alpha = 8, target = ["q_proj", "v_proj", "down_proj"] }"#;
/// SFT's adapters train with dropout (the preference stages' cannot).
const LORA_SFT: &str =
    r#"lora = { r = 4, alpha = 8, dropout = 0.1, target = ["q_proj", "v_proj", "down_proj"] }"#;

fn experiment() -> String {
    format!(
        r#"{base}

[stages.sft]
kind = "sft"
from = "base"
data = {{ stage = "world", file = "demonstrations.parquet" }}
max_len = 48
{LORA_SFT}
train = {{ steps = 9, batch_size = 4, lr = 1e-2, warmup_steps = 2, eval_every = 0, checkpoint_every = 3 }}

[stages.dpo]
kind = "dpo"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 48
{LORA}
train = {{ steps = 4, batch_size = 4, lr = 1e-2, warmup_steps = 1, eval_every = 0 }}

[stages.rm]
kind = "reward"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 48
{LORA}
train = {{ steps = 4, batch_size = 4, lr = 1e-2, warmup_steps = 1, eval_every = 0 }}

[stages.ppo]
kind = "ppo"
from = "sft"
reward_model = "rm"
prompts = {{ stage = "world", file = "prompts_train.parquet" }}
epochs = 1
minibatches = 1
sampling = {{ max_new_tokens = 6 }}
{LORA}
train = {{ steps = 2, batch_size = 4, lr = 1e-2, warmup_steps = 1 }}

[stages.eval]
kind = "eval"
policies = ["sft", "dpo", "ppo"]
reward_model = "rm"
gold = "world"
prompts = {{ stage = "world", file = "prompts_test.parquet", max_rows = 4 }}
sampling = {{ max_new_tokens = 6 }}
"#,
        base = common::tiny_base(
            5,
            2,
            r#"train = { steps = 10, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 0 }"#
        ),
    )
}

fn entry(p: &TestProject, stage: &str) -> PathBuf {
    p.path(&format!("results/lora/stages/{stage}"))
        .canonicalize()
        .unwrap()
}

fn tensors(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

#[test]
fn lora_stages_train_only_their_adapters_and_save_them_as_peft() {
    let p = TestProject::new();
    p.write("experiments/lora.toml", &experiment());
    p.ok(&["run", "lora", "--quiet"]);
    let targeted = |name: &str| {
        ["q_proj", "v_proj", "down_proj"]
            .iter()
            .any(|t| name.contains(t))
    };
    for (stage, from) in [
        ("sft", "base"),
        ("dpo", "sft"),
        ("rm", "sft"),
        ("ppo", "sft"),
    ] {
        let (after, before) = (tensors(&entry(&p, stage)), tensors(&entry(&p, from)));
        let mut changed = 0;
        for (name, bytes) in &after {
            if name == "score.weight" {
                continue; // the reward head trains fully (modules_to_save)
            }
            let same = before.get(name) == Some(bytes);
            if targeted(name) {
                changed += usize::from(!same);
            } else {
                assert!(same, "{stage}: `{name}` is not targeted but changed");
            }
        }
        assert!(changed > 0, "{stage}: no targeted weight changed");
        let adapter = entry(&p, stage).join("adapter");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 4);
        assert_eq!(config["lora_alpha"], 8.0);
        let dropout = if stage == "sft" { 0.1 } else { 0.0 };
        assert_eq!(config["lora_dropout"], dropout, "{stage}");
        let task = if stage == "rm" {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        };
        assert_eq!(config["task_type"], task, "{stage}");
        let names: Vec<String> = {
            let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            st.names().into_iter().map(String::from).collect()
        };
        assert!(
            names.contains(
                &"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()
            ),
            "{stage}: {names:?}"
        );
        assert_eq!(
            names.len(),
            2 * 3 * 2 + usize::from(stage == "rm"),
            "{stage}: {names:?}"
        );
    }
    // The eval read the merged models.
    let out = p.ok(&["compare", "lora"]);
    for policy in ["sft", "dpo", "ppo"] {
        assert!(out.contains(policy), "{out}");
    }
}

#[test]
fn lora_is_in_the_key_and_bad_lora_is_refused() {
    let p = TestProject::new();
    let text = experiment();
    p.write("experiments/lora.toml", &text);
    let keys = |p: &TestProject| -> Vec<String> {
        p.plan_json("lora")
            .iter()
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect()
    };
    let before = keys(&p);
    p.write("experiments/lora.toml", &text.replacen("r = 4", "r = 8", 1));
    assert_ne!(before, keys(&p));
    // The dpo stage's settings (the second `lora = `).
    let dpo_at = text.match_indices("lora = { r = 4,").nth(1).unwrap().0;
    for (bad, expected) in [
        ("r = 0,", "`lora.r` must be at least 1"),
        ("dropout = 0.1,", "`dpo` trains without dropout"),
        ("tagret = [],", "unknown field `tagret`"),
    ] {
        let (head, tail) = text.split_at(dpo_at);
        let tail = tail
            .replacen("lora = { r = 4,", &format!("lora = {{ {bad} r = 4,"), 1)
            .replacen("r = 0, r = 4", "r = 0", 1);
        p.write("experiments/lora.toml", &format!("{head}{tail}"));
        let err = p.fails(&["plan", "lora"]);
        assert!(
            err.contains(expected) && err.contains("lora.toml:"),
            "{bad}: {err}"
        );
    }
    p.write(
        "experiments/lora.toml",
        &text.replacen("dropout = 0.1", "dropout = 1.5", 1),
    );
    let err = p.fails(&["plan", "lora"]);
    assert!(err.contains("a probability in [0, 1)"), "{err}");
    p.write(
        "experiments/lora.toml",
        &text.replacen("\"down_proj\"]", "\"down_prj\"]", 1),
    );
    let err = p.fails(&["plan", "lora"]);
    assert!(err.contains("did you mean `down_proj`"), "{err}");
}

#[test]
fn a_killed_lora_stage_resumes_to_the_same_bytes() {
    let p = TestProject::new();
    p.write("experiments/lora.toml", &experiment());
    p.ok(&["run", "lora", "--until", "base", "--quiet"]);
    let killed = p
        .command(&["run", "lora", "--until", "sft"])
        .env("POSTTRAIN_FAULT_KILL_AFTER_CHECKPOINTS", "1")
        .output()
        .unwrap();
    assert_eq!(killed.status.signal(), Some(9));
    let out = p
        .command(&["run", "lora", "--until", "sft"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("Resuming sft"),
        "{stderr}"
    );
    let resumed = tensors(&entry(&p, "sft"));
    let adapter =
        std::fs::read(entry(&p, "sft").join("adapter/adapter_model.safetensors")).unwrap();
    p.ok(&["run", "lora", "--until", "sft", "--force", "sft", "--quiet"]);
    assert!(tensors(&entry(&p, "sft")) == resumed);
    assert!(
        std::fs::read(entry(&p, "sft").join("adapter/adapter_model.safetensors")).unwrap()
            == adapter
    );
}

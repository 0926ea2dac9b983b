//! Data in the formats TRL's trainers take, end to end at toy size: the
//! implicit-prompt conversational preference form (no `prompt` column) for
//! dpo and reward, the unpaired form (prompt, completion, label) for kto,
//! and the explicit-prompt conversational form as label's `extra`; and
//! dataset problems found before anything runs (`--keep-going` builds what
//! is fine).

mod common;

use common::{TestProject, SMALL_WORLD};

fn fixture(p: &TestProject, name: &str) {
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::copy(from, p.path(&format!("datasets/{name}"))).unwrap();
}

const TINY: &str = r#"
[stages.tokenizer]
kind = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }
seq_len = 32
model = { hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }
train = { steps = 2, batch_size = 4, warmup_steps = 1, eval_every = 0 }
"#;

#[test]
fn trl_conversational_and_unpaired_data_train_dpo_reward_kto_and_label() {
    let p = TestProject::new();
    for f in [
        "implicit_prompt_preference.parquet",
        "unpaired_conversational.parquet",
        "unpaired.parquet",
        "conversational_preference.parquet",
    ] {
        fixture(&p, f);
    }
    let train = "train = { steps = 2, batch_size = 2, warmup_steps = 1, eval_every = 0 }";
    p.write(
        "experiments/trl.toml",
        &format!(
            r#"[stages.world]
kind = "synth"
{SMALL_WORLD}
{TINY}
[stages.dpo]
kind = "dpo"
from = "base"
data = "datasets/implicit_prompt_preference.parquet"
{train}

[stages.rm]
kind = "reward"
from = "base"
data = "datasets/implicit_prompt_preference.parquet"
{train}

[stages.kto]
kind = "kto"
from = "base"
data = "datasets/unpaired_conversational.parquet"
{train}

[stages.kto_text]
kind = "kto"
from = "base"
data = "datasets/unpaired.parquet"
{train}

[stages.labels]
kind = "label"
policy = "base"
gold = "world"
prompts = {{ stage = "world", file = "prompts_train.parquet", max_rows = 2 }}
samples = 2
extra = "datasets/conversational_preference.parquet"
sampling = {{ max_new_tokens = 4 }}
"#
        ),
    );
    p.ok(&["run", "trl"]);
    let statuses = p.statuses("trl");
    for stage in ["dpo", "rm", "kto", "kto_text", "labels"] {
        assert!(
            statuses.iter().any(|(s, st)| s == stage && st == "ran"),
            "{stage}: {statuses:?}"
        );
    }
    let labels =
        posttrain::data::read_parquet(&p.path("results/trl/stages/labels/comparisons.parquet"))
            .unwrap();
    let chosen: Vec<String> = labels
        .column("chosen")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        chosen.last().unwrap(),
        "Kaloia is famous for figs.",
        "{chosen:?}"
    );
}

#[test]
fn dataset_problems_are_found_before_anything_runs_and_keep_going_builds_the_rest() {
    let p = TestProject::new();
    fixture(&p, "unpaired.parquet");
    fixture(&p, "implicit_prompt_preference.parquet");
    p.write(
        "experiments/d.toml",
        r#"[stages.good]
kind = "dataset"
input = "datasets/implicit_prompt_preference.parquet"

[stages.bad]
kind = "dataset"
input = { path = "datasets/unpaired.parquet", format = "comparisons" }

[stages.empty]
kind = "dataset"
input = { path = "datasets/unpaired.parquet", split = "test", test_fraction = 0.0 }

[stages.after_bad]
kind = "dataset"
input = { stage = "bad", file = "data.parquet" }
"#,
    );
    let err = p.fails(&["run", "d"]);
    assert!(
        err.contains("2 dataset problems found before anything ran"),
        "{err}"
    );
    assert!(err.contains("stage `bad`, `input`"), "{err}");
    assert!(
        err.contains("no column `chosen`; columns present: prompt, completion, label"),
        "{err}"
    );
    assert!(
        err.contains("split = \"test\" keeps none of its 3 rows (test_fraction = 0)"),
        "{err}"
    );
    assert!(err.contains("--keep-going"), "{err}");
    assert!(p.store_keys().is_empty(), "nothing was built");

    let plan = p.ok(&["plan", "d"]);
    assert!(plan.contains("data problem: stage `bad`"), "{plan}");

    let out = p.run(&["run", "d", "--keep-going"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(
            "not built: after_bad, bad, empty (a problem with their data, or a failure upstream"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("error: stage `after_bad` not built: upstream stage `bad` is blocked"),
        "{stderr}"
    );
    assert_eq!(p.store_keys().len(), 1, "only `good` was built");
}

#[test]
fn two_sides_of_one_file_split_differently_are_refused() {
    let p = TestProject::new();
    fixture(&p, "implicit_prompt_preference.parquet");
    p.write(
        "experiments/s.toml",
        r#"[stages.train]
kind = "dataset"
input = { path = "datasets/implicit_prompt_preference.parquet", split = "train" }

[stages.test]
kind = "dataset"
input = { path = "datasets/implicit_prompt_preference.parquet", split = "test", test_fraction = 0.5 }
"#,
    );
    let err = p.fails(&["run", "s"]);
    assert!(err.contains("s.toml:3:"), "{err}");
    assert!(
        err.contains("stage `train`: `input` splits `datasets/implicit_prompt_preference.parquet` (train, test_fraction = 0.1, seed 0) unlike stage `test`'s `input` (test, test_fraction = 0.5, seed 0)"),
        "{err}"
    );
}

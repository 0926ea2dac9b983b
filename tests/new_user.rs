//! What a new user hit (issue 14), each checked: the run summary and
//! `compare --runs` fit the terminal and show the columns that have values,
//! `--until` says what it left stale and hides an eval table from an
//! earlier configuration, `compare` of a misspelled experiment suggests
//! the name, `data synth` does not overwrite without `--force`, `--help`
//! teaches, usage errors exit as the README says, and a finetuned model's
//! config.json states the context it was trained on.

mod common;

use common::{TestProject, SMALL_WORLD};

fn experiment(eval_rows: usize) -> String {
    format!(
        r#"[stages.world]
kind = "synth"
{SMALL_WORLD}
[stages.tokenizer]
kind = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
seq_len = 32
model = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}
train = {{ steps = 2, batch_size = 4, warmup_steps = 1, eval_every = 0 }}

[stages.sft]
kind = "sft"
from = "base"
data = {{ stage = "world", file = "demonstrations.parquet" }}
max_len = 64
train = {{ steps = 2, batch_size = 4, warmup_steps = 1, eval_every = 0 }}

[stages.rm]
kind = "reward"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 64
train = {{ steps = 2, batch_size = 4, warmup_steps = 1, eval_every = 0 }}

[stages.eval]
kind = "eval"
policies = ["base", "sft"]
reward_model = "rm"
prompts = {{ stage = "world", file = "prompts_test.parquet", max_rows = {eval_rows} }}
sampling = {{ max_new_tokens = 4 }}
bootstrap = 20
"#
    )
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn summaries_fit_until_says_what_it_skipped_and_compare_suggests_names() {
    let p = TestProject::new();
    p.write("experiments/newuser.toml", &experiment(4));
    let out = stdout_of(
        &p.command(&["run", "newuser"])
            .env("COLUMNS", "100")
            .output()
            .unwrap(),
    );
    let eval = out
        .split("Eval (")
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"));
    let table: Vec<&str> = eval
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Full table"))
        .collect();
    assert!(eval.contains("win_rate_reward"), "unwrapped: {eval}");
    assert!(
        !eval.contains("gold"),
        "no gold labeler, no gold columns: {eval}"
    );
    for line in &table {
        assert!(
            line.chars().count() <= 100,
            "{} wide: {line}",
            line.chars().count()
        );
    }

    // The finetuned model states the 64 tokens it was trained on, not the
    // pretrain's 32.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("results/newuser/stages/sft/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["max_position_embeddings"], 64);

    // A changed eval left out by --until: said, and its old table not shown.
    p.write("experiments/newuser.toml", &experiment(3));
    let out = stdout_of(&p.run(&["run", "newuser", "--until", "sft"]));
    assert!(
        out.contains("not run: eval (stale, left out by --until"),
        "{out}"
    );
    assert!(!out.contains("nothing to do"), "{out}");
    assert!(
        out.contains("eval table not shown: `eval` was not built for the current settings"),
        "{out}"
    );
    assert!(!out.contains("Eval ("), "{out}");

    // compare --runs: a metric that is also an id column, and the default
    // columns fit the terminal.
    let out = stdout_of(&p.run(&[
        "compare",
        "newuser",
        "--runs",
        "--metrics",
        "eval_loss,duration_s,status",
    ]));
    assert!(out.contains("duration_s"), "{out}");
    let runs = p
        .command(&["compare", "newuser", "--runs"])
        .env("COLUMNS", "120")
        .output()
        .unwrap();
    let out = stdout_of(&runs);
    let widest = out.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(widest <= 160, "{widest} wide:\n{out}");
    assert!(String::from_utf8_lossy(&runs.stderr).contains("more metric columns"));

    // sample: one answer line per stdin line, blank lines included; --jsonl.
    let sample = |args: &[&str], input: &str| -> String {
        use std::io::Write;
        let mut child = p
            .command(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        stdout_of(&child.wait_with_output().unwrap())
    };
    let lines = sample(
        &["sample", "newuser", "sft", "--max-new-tokens", "4"],
        "Hi\n\nWhat is 2 plus 2?\n",
    );
    assert_eq!(lines.lines().count(), 3, "{lines:?}");
    assert_eq!(lines.lines().nth(1), Some(""), "{lines:?}");
    let json = sample(
        &[
            "sample",
            "newuser",
            "sft",
            "--max-new-tokens",
            "4",
            "--jsonl",
        ],
        "{\"prompt\": \"Hi\"}\n{\"prompt\": \"\"}\n",
    );
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(rows[0]["prompt"], "Hi");
    assert!(rows[1]["answer"].is_string());
    let err = p.fails(&["sample", "newuser", "world", "--prompt", "Hi"]);
    assert!(err.contains("is a synth stage, not a model"), "{err}");
    assert_eq!(err.matches("error").count(), 1, "said once: {err}");

    let err = p.fails(&["compare", "newusr"]);
    assert!(err.contains("no experiment `newusr`"), "{err}");
    assert!(err.contains("did you mean `newuser`?"), "{err}");
}

#[test]
fn data_synth_does_not_overwrite_a_folder_without_force() {
    let p = TestProject::new();
    p.ok(&["data", "synth", "--out", "datasets/w"]);
    let err = p.fails(&["data", "synth", "--out", "datasets/w", "--seed", "1"]);
    assert!(err.contains("already holds"), "{err}");
    assert!(err.contains("--force"), "{err}");
    p.ok(&[
        "data",
        "synth",
        "--out",
        "datasets/w",
        "--seed",
        "1",
        "--force",
    ]);
}

#[test]
fn help_has_examples_and_the_status_alias_and_usage_errors_exit_as_documented() {
    let p = TestProject::new();
    let help = p.ok(&["--help"]);
    assert!(help.contains("Examples:"), "{help}");
    assert!(help.contains("status"), "{help}");
    let out = p.run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("a usage error (an unknown flag, a missing argument) exits 2"));
    let out = p.run(&["plan", "nonesuch"]);
    assert_eq!(out.status.code(), Some(1), "an error");
}

#[test]
fn a_field_named_as_hugging_face_names_it_suggests_posttrains_name() {
    let p = TestProject::new();
    p.write(
        "experiments/bad.toml",
        "[stages.world]\nkind = \"synth\"\n[stages.tokenizer]\nkind = \"tokenizer\"\ncorpus = { stage = \"world\", file = \"corpus.parquet\" }\n[stages.base]\nkind = \"pretrain\"\ntokenizer = \"tokenizer\"\ncorpus = { stage = \"world\", file = \"corpus.parquet\" }\ntrain = { learning_rate = 1e-3 }\n",
    );
    let err = p.fails(&["plan", "bad"]);
    assert!(err.contains("unknown field `learning_rate`"), "{err}");
    assert!(err.contains("(did you mean `lr`?)"), "{err}");
}

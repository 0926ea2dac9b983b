//! A throwaway posttrain project in a temp folder, driven through the real
//! binary, with helpers to read what runs left behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct TestProject {
    pub dir: tempfile::TempDir,
}

/// world -> tokenizer -> base (pretrain) -> sft -> rm (reward), as small as
/// keeps SFT answering in turn and the reward model ranking above chance.
pub const PREFERENCE_BASE: &str = r#"[experiment]
seed = 1

[stages.world]
kind = "synth"
corpus_docs = 1000
demonstrations = 400
comparisons = 400
rankings = 5
prompts_train = 40
prompts_test = 8

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
train = { steps = 150, batch_size = 8, lr = 5e-3, warmup_steps = 10, eval_every = 0 }

[stages.sft]
kind = "sft"
from = "base"
data = { stage = "world", file = "demonstrations.parquet" }
max_len = 64
train = { steps = 80, batch_size = 8, lr = 5e-3, warmup_steps = 5, eval_every = 0 }

[stages.rm]
kind = "reward"
from = "sft"
data = { stage = "world", file = "comparisons.parquet" }
max_len = 64
train = { steps = 100, batch_size = 12, lr = 2e-3, warmup_steps = 5, eval_every = 0 }
"#;

/// `[experiment] seed`, then world (SMALL_WORLD) -> tokenizer (vocabulary
/// 300) -> base: a pretrain of a 16-wide Llama with `layers` layers whose
/// other fields (`train`, ...) are `base`. Tests append their stages.
pub fn tiny_base(seed: u64, layers: usize, base: &str) -> String {
    format!(
        r#"[experiment]
seed = {seed}

[stages.world]
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
seq_len = 24
model = {{ hidden_size = 16, num_hidden_layers = {layers}, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}
{base}
"#
    )
}

/// Small sizes so a synth stage takes milliseconds.
pub const SMALL_WORLD: &str = "corpus_docs = 300
demonstrations = 50
comparisons = 50
rankings = 10
prompts_train = 20
prompts_test = 10
";

impl TestProject {
    pub fn new() -> TestProject {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("experiments")).unwrap();
        std::fs::create_dir_all(dir.path().join("datasets")).unwrap();
        TestProject { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_posttrain"));
        cmd.args(args)
            .current_dir(self.root())
            .env_remove("POSTTRAIN_STORE");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("posttrain starts")
    }

    /// Run and expect success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "posttrain {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and expect failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "posttrain {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// (stage, status) of every stage of the experiment's last run.
    pub fn statuses(&self, experiment: &str) -> Vec<(String, String)> {
        let record = posttrain::results::record::RunRecord::read(
            &self.path(&format!("results/{experiment}")),
        )
        .expect("a run record");
        record
            .stages
            .iter()
            .map(|(k, v)| (k.clone(), v.status.clone()))
            .collect()
    }

    /// Stages that ran (not reused) in the experiment's last run, sorted.
    pub fn ran(&self, experiment: &str) -> Vec<String> {
        self.statuses(experiment)
            .into_iter()
            .filter(|(_, s)| s == "ran")
            .map(|(n, _)| n)
            .collect()
    }

    /// Complete entries in the store.
    pub fn store_keys(&self) -> Vec<String> {
        let store = posttrain::store::Store::new(self.path("results/store"));
        store
            .keys()
            .unwrap()
            .into_iter()
            .filter(|k| store.is_complete(k))
            .collect()
    }

    /// The `plan --json` lines, parsed.
    pub fn plan_json(&self, experiment: &str) -> Vec<serde_json::Value> {
        self.ok(&["plan", experiment, "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }
}

//! Resume: a training stage killed (SIGKILL, at a known point through the
//! fault hook, or at a random point with `kill -9`) continues from its last
//! snapshot on the next run and ends with the same model bytes and the same
//! metric rows (timings aside) as a run that was never interrupted.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use common::TestProject;
use polars::prelude::*;

const KILL_ENV: &str = "POSTTRAIN_FAULT_KILL_AFTER_CHECKPOINTS";

fn experiment() -> String {
    format!(
        r#"{base}

[stages.sft]
kind = "sft"
from = "base"
data = {{ stage = "world", file = "demonstrations.parquet" }}
max_len = 48
train = {{ steps = 9, batch_size = 4, grad_accum = 2, lr = 5e-3, warmup_steps = 2, eval_every = 0, checkpoint_every = 3 }}

[stages.rm]
kind = "reward"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 48
train = {{ steps = 8, batch_size = 4, lr = 2e-3, warmup_steps = 2, eval_every = 0, checkpoint_every = 3 }}

[stages.dpo]
kind = "dpo"
from = "sft"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 48
train = {{ steps = 8, batch_size = 4, lr = 2e-3, warmup_steps = 2, eval_every = 0, checkpoint_every = 3 }}

[stages.ppo]
kind = "ppo"
from = "sft"
reward_model = "rm"
prompts = {{ stage = "world", file = "prompts_train.parquet" }}
epochs = 2
minibatches = 2
target_kl = 1.0
sampling = {{ max_new_tokens = 8 }}
train = {{ steps = 5, batch_size = 4, lr = 1e-3, warmup_steps = 1, checkpoint_every = 2 }}
"#,
        base = common::tiny_base(
            3,
            1,
            r#"eval_fraction = 0.1
train = { steps = 12, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 5, checkpoint_every = 4 }"#
        ),
    )
}

fn entry(p: &TestProject, stage: &str) -> PathBuf {
    let link = p.path(&format!("results/resume/stages/{stage}"));
    link.canonicalize().expect("a stage link")
}

/// Every metric column but the timings, as text.
fn metric_rows(dir: &std::path::Path) -> String {
    let file = std::fs::File::open(dir.join("metrics.parquet")).expect("metrics.parquet");
    let df = ParquetReader::new(file).finish().unwrap();
    let mut text = String::new();
    for col in df.columns() {
        if col.name().as_str() == "tokens_per_s" {
            continue;
        }
        let values = col.cast(&DataType::Float64).unwrap();
        let values: Vec<Option<u64>> = values
            .f64()
            .unwrap()
            .iter()
            .map(|v| v.map(f64::to_bits))
            .collect();
        text.push_str(&format!("{}: {values:?}\n", col.name()));
    }
    assert!(df.height() > 0);
    text
}

#[test]
fn every_training_kind_resumes_to_the_same_bytes() {
    let p = TestProject::new();
    p.write("experiments/resume.toml", &experiment());
    // Each training stage in turn: killed after its first snapshot, then
    // resumed; then rebuilt from scratch with --force for the reference.
    for stage in ["base", "sft", "rm", "dpo", "ppo"] {
        let killed = p
            .command(&["run", "resume", "--until", stage])
            .env(KILL_ENV, "1")
            .output()
            .unwrap();
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "{stage}: expected SIGKILL, got {:?}\n{}",
            killed.status,
            String::from_utf8_lossy(&killed.stderr)
        );
        let out = p
            .command(&["run", "resume", "--until", stage])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stage}: {stderr}");
        assert!(
            stderr.contains(&format!("Resuming {stage} from its last snapshot")),
            "{stage} did not resume:\n{stderr}"
        );
        let resumed = entry(&p, stage);
        let weights = std::fs::read(resumed.join("model.safetensors")).unwrap();
        let rows = metric_rows(&resumed);
        let value = std::fs::read(resumed.join("value/model.safetensors")).ok();
        // No snapshot is left once the entry is published.
        let key = resumed.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!p.path(&format!("results/store/.resume/{key}")).exists());

        p.ok(&["run", "resume", "--until", stage, "--force", stage]);
        let fresh = entry(&p, stage);
        assert_eq!(fresh, resumed, "{stage}: the key must not change");
        assert!(
            std::fs::read(fresh.join("model.safetensors")).unwrap() == weights,
            "{stage}: resumed weights differ from an uninterrupted run"
        );
        assert_eq!(metric_rows(&fresh), rows, "{stage}: metrics differ");
        assert_eq!(
            std::fs::read(fresh.join("value/model.safetensors")).ok(),
            value,
            "{stage}: value model differs"
        );
    }
}

#[test]
fn checkpoint_every_is_not_in_the_key() {
    let p = TestProject::new();
    let text = experiment();
    p.write("experiments/resume.toml", &text);
    let before = p.plan_json("resume");
    p.write(
        "experiments/resume.toml",
        &text.replace("checkpoint_every = 3", "checkpoint_every = 50"),
    );
    let after = p.plan_json("resume");
    let keys = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .map(|s| s["key"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(keys(&before), keys(&after));
}

#[test]
fn a_kill_at_a_random_point_resumes_too() {
    // A real `kill -9` from outside, once a snapshot exists.
    let p = TestProject::new();
    let text = experiment().replace(
        "train = { steps = 12, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 5, checkpoint_every = 4 }",
        "train = { steps = 400, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 0, checkpoint_every = 5 }",
    );
    p.write("experiments/resume.toml", &text);
    let mut child = p
        .command(&["run", "resume", "--until", "base"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let resume = p.path("results/store/.resume");
    let started = std::time::Instant::now();
    loop {
        let snapshot = std::fs::read_dir(&resume)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path().join("LATEST"))
            .is_some_and(|l| l.exists());
        if snapshot {
            break;
        }
        assert!(started.elapsed().as_secs() < 120, "no snapshot after 120 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before a snapshot"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9));
    p.ok(&["run", "resume", "--until", "base"]);
    let resumed = entry(&p, "base");
    let weights = std::fs::read(resumed.join("model.safetensors")).unwrap();
    let rows = metric_rows(&resumed);
    p.ok(&["run", "resume", "--until", "base", "--force", "base"]);
    let fresh = entry(&p, "base");
    assert!(std::fs::read(fresh.join("model.safetensors")).unwrap() == weights);
    assert_eq!(metric_rows(&fresh), rows);
}

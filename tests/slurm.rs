//! The Slurm executor against a real single-node cluster (.ci/run starts
//! one with `.ci/slurm start`; SLURM_CONF points at it). Without a cluster
//! these tests say so and pass, unless POSTTRAIN_REQUIRE_SLURM=1 (set by
//! .ci/run), where a missing cluster is a failure.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestProject;

/// The node has 2 CPUs: one test's jobs at a time, so that what a test
/// measures (two jobs at once) does not depend on the others.
static NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    let up = std::env::var_os("SLURM_CONF").is_some()
        && Command::new("sinfo")
            .arg("-h")
            .output()
            .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var("POSTTRAIN_REQUIRE_SLURM").as_deref() != Ok("1"),
            "POSTTRAIN_REQUIRE_SLURM=1 but no Slurm cluster answers (SLURM_CONF unset or sinfo fails)"
        );
        eprintln!("no Slurm cluster (SLURM_CONF unset or sinfo fails): skipped; `.ci/slurm start DIR` starts one");
        return None;
    }
    Some(NODE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// world -> tokenizer -> base -> two dpo variants (a matrix) -> eval.
fn experiment(dpo_steps: usize, dpo_max_len: usize, base_steps: usize) -> String {
    format!(
        r#"[experiment]
seed = 4

[stages.world]
kind = "synth"
{world}
[stages.tokenizer]
kind = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
vocab_size = 300

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
seq_len = 24
model = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}
train = {{ steps = {base_steps}, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 0, checkpoint_every = 20 }}
resources = {{ cpus = 1, mem = "1G" }}

[stages.dpo]
kind = "dpo"
from = "base"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = {dpo_max_len}
train = {{ steps = {dpo_steps}, batch_size = 4, warmup_steps = 1, eval_every = 0 }}
matrix = {{ beta = [0.1, 0.5] }}
resources = {{ cpus = 1, mem = "1G" }}

[stages.eval]
kind = "eval"
policies = ["base", "dpo"]
reference = "base"
gold = "world"
prompts = {{ stage = "world", file = "prompts_test.parquet", max_rows = 4 }}
sampling = {{ max_new_tokens = 6 }}
resources = {{ cpus = 1, mem = "1G" }}
"#,
        world = common::SMALL_WORLD
    )
}

/// key and blake3 of every output file of every stage of the last run.
fn outputs(p: &TestProject, exp: &str) -> BTreeMap<String, (String, Vec<(String, String)>)> {
    let record =
        posttrain::results::record::RunRecord::read(&p.path(&format!("results/{exp}"))).unwrap();
    let store = posttrain::store::Store::new(p.path("results/store"));
    record
        .stages
        .iter()
        .map(|(name, s)| {
            let m = store.manifest(&s.identity.key).expect("a complete entry");
            let files = m
                .outputs
                .iter()
                // The training log holds timings.
                .filter(|o| o.path != "metrics.parquet")
                .map(|o| (o.path.clone(), o.blake3.clone()))
                .collect();
            (name.clone(), (s.identity.key.clone(), files))
        })
        .collect()
}

fn entry_times(p: &TestProject, exp: &str, stage: &str) -> (String, String) {
    let record =
        posttrain::results::record::RunRecord::read(&p.path(&format!("results/{exp}"))).unwrap();
    let store = posttrain::store::Store::new(p.path("results/store"));
    let m = store.manifest(&record.stages[stage].identity.key).unwrap();
    (m.started, m.finished)
}

#[test]
fn slurm_builds_what_local_builds_and_a_second_submit_submits_nothing() {
    let Some(_node) = cluster() else {
        return;
    };
    let (a, b) = (TestProject::new(), TestProject::new());
    let text = experiment(2000, 48, 30);
    a.write("experiments/sw.toml", &text);
    b.write("experiments/sw.toml", &text);
    let out = a
        .command(&["run", "sw", "--executor", "slurm"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("Submitted").count(), 6, "{stderr}");
    assert!(stderr.contains("as job"), "{stderr}");
    b.ok(&["run", "sw", "--executor", "local", "--jobs", "2"]);
    assert_eq!(
        outputs(&a, "sw"),
        outputs(&b, "sw"),
        "slurm and local differ"
    );

    // The two dpo variants ran at once (1 CPU each on a 2-CPU node).
    let (s1, f1) = entry_times(&a, "sw", "dpo@beta=0.1");
    let (s2, f2) = entry_times(&a, "sw", "dpo@beta=0.5");
    assert!(s1 < f2 && s2 < f1, "no overlap: {s1}..{f1} and {s2}..{f2}");

    let again = a
        .command(&["run", "sw", "--executor", "slurm"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        !stderr.contains("Submitted"),
        "a second run submitted:\n{stderr}"
    );
}

#[test]
fn a_failed_job_stops_its_downstream_and_names_stage_job_and_log() {
    let Some(_node) = cluster() else {
        return;
    };
    let p = TestProject::new();
    // max_len 4: no pair fits, so dpo fails in its job, not at plan time.
    p.write("experiments/bad.toml", &experiment(3, 4, 10));
    let out = p
        .command(&["run", "bad", "--executor", "slurm"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stage `dpo@beta=0.1` failed in Slurm job")
            || stderr.contains("stage `dpo@beta=0.5` failed in Slurm job"),
        "{stderr}"
    );
    assert!(
        stderr.contains("log: ") && stderr.contains(".log"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no pair fits"),
        "the log's cause is shown:\n{stderr}"
    );
    // eval never ran and nothing of it looks complete.
    let plan = p.plan_json("bad");
    for s in &plan {
        let name = s["name"].as_str().unwrap();
        if name == "eval" || name.starts_with("dpo@") {
            assert_eq!(s["status"], "stale", "{name}");
        }
    }
    let log = p.path("results/bad/slurm");
    let logs: Vec<String> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let eval_log = logs.iter().find(|l| l.starts_with("eval-"));
    if let Some(l) = eval_log {
        let text = std::fs::read_to_string(log.join(l)).unwrap_or_default();
        assert!(!text.contains("Running eval"), "eval ran: {text}");
    }
}

#[test]
fn a_cancelled_training_job_resumes_to_the_same_bytes() {
    let Some(_node) = cluster() else {
        return;
    };
    let p = TestProject::new();
    p.write("experiments/k.toml", &experiment(3, 48, 3000));
    let child = p
        .command(&["run", "k", "--executor", "slurm", "--until", "base"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let resume = p.path("results/store/.resume");
    let started = Instant::now();
    while !std::fs::read_dir(&resume)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .is_some_and(|e| e.path().join("LATEST").exists())
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no snapshot in 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Cancel the base job as a preemption would, then let the run report.
    let claims = p.path("results/store/.claims");
    let claim: serde_json::Value = std::fs::read_dir(&claims)
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .find(|c: &serde_json::Value| c["stage"] == "base")
        .expect("a claim for base");
    let job = claim["job"].as_str().unwrap().to_string();
    assert!(Command::new("scancel")
        .arg(&job)
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.signal().is_none(),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("job {job}")) && stderr.contains("CANCELLED"),
        "{stderr}"
    );

    let out = p
        .command(&["run", "k", "--executor", "slurm", "--until", "base"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = posttrain::results::record::RunRecord::read(&p.path("results/k")).unwrap();
    let key = record.stages["base"].identity.key.clone();
    let entry = p.path(&format!("results/store/{key}"));
    let logs = std::fs::read_dir(p.path("results/k/slurm"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        logs.contains("Resuming base from its last snapshot"),
        "{logs}"
    );
    let resumed = std::fs::read(entry.join("model.safetensors")).unwrap();
    p.ok(&["run", "k", "--until", "base", "--force", "base"]);
    let fresh = std::fs::read(entry.join("model.safetensors")).unwrap();
    assert!(
        resumed == fresh,
        "resumed weights differ from an uninterrupted run"
    );
}

#[test]
fn two_runs_submitting_at_once_share_each_job() {
    let Some(_node) = cluster() else {
        return;
    };
    let p = TestProject::new();
    p.write("experiments/one.toml", &experiment(3, 48, 10));
    p.write("experiments/two.toml", &experiment(3, 48, 10));
    let spawn = |exp: &str| {
        p.command(&["run", exp, "--executor", "slurm"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (x, y) = (spawn("one"), spawn("two"));
    let (x, y) = (x.wait_with_output().unwrap(), y.wait_with_output().unwrap());
    let (ex, ey) = (
        String::from_utf8_lossy(&x.stderr),
        String::from_utf8_lossy(&y.stderr),
    );
    assert!(x.status.success() && y.status.success(), "{ex}\n---\n{ey}");
    let submitted = ex.matches("Submitted").count() + ey.matches("Submitted").count();
    assert_eq!(
        submitted, 6,
        "each stage is submitted once:\n{ex}\n---\n{ey}"
    );
    assert_eq!(outputs(&p, "one"), outputs(&p, "two"));
}

#[test]
fn no_sbatch_is_a_clear_error() {
    let p = TestProject::new();
    p.write("experiments/e.toml", &experiment(3, 48, 10));
    let out = p
        .command(&["run", "e", "--executor", "slurm"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("the slurm executor needs Slurm's `sbatch` on PATH"),
        "{stderr}"
    );
    let bad = p.run(&["run", "e", "--executor", "pbs"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("pbs") && stderr.contains("local") && stderr.contains("slurm"),
        "{stderr}"
    );
    p.write("posttrain.toml", "[slurm]\npartiton = \"gpu\"\n");
    let stderr = p.fails(&["run", "e", "--executor", "slurm"]);
    assert!(
        stderr.contains("posttrain.toml") && stderr.contains("partiton"),
        "{stderr}"
    );
}

#[test]
fn detach_then_status_then_cancel() {
    let Some(_node) = cluster() else {
        return;
    };
    let p = TestProject::new();
    p.write("experiments/d.toml", &experiment(3, 48, 200000));
    let out = p
        .command(&[
            "run",
            "d",
            "--executor",
            "slurm",
            "--detach",
            "--until",
            "base",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("Submitted").count(), 3, "{stderr}");
    // status: every stale stage shows its job.
    let started = Instant::now();
    loop {
        let plan = p.plan_json("d");
        let base = plan.iter().find(|s| s["name"] == "base").unwrap();
        assert!(base["job"]["id"].is_string(), "{base}");
        if base["job"]["state"] == "RUNNING" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "base never ran: {base}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let table = p.ok(&["status", "d"]);
    assert!(table.contains("running (job "), "{table}");
    let out = p.ok(&["cancel", "d"]);
    assert!(out.contains("cancelled base (job "), "{out}");
    let plan = p.plan_json("d");
    let base = plan.iter().find(|s| s["name"] == "base").unwrap();
    assert_eq!(base["status"], "stale");
    assert!(base["job"].is_null(), "the claim is released: {base}");
    assert!(p.ok(&["cancel", "d"]).contains("no queued or running job"));
}

#[test]
fn ctrl_c_cancels_the_jobs_this_run_submitted() {
    let Some(_node) = cluster() else {
        return;
    };
    let p = TestProject::new();
    p.write("experiments/i.toml", &experiment(3, 48, 200000));
    let child = p
        .command(&["run", "i", "--executor", "slurm", "--until", "base"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until base runs, then interrupt the waiting run as Ctrl-C does.
    let started = Instant::now();
    loop {
        let plan = p.plan_json("i");
        let base = plan.iter().find(|s| s["name"] == "base").unwrap();
        if base["job"]["state"] == "RUNNING" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "base never ran: {base}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let base_job = p
        .plan_json("i")
        .into_iter()
        .find(|s| s["name"] == "base")
        .unwrap()["job"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted: cancelled 1 job(s)"),
        "{stderr}"
    );
    // COMPLETING while the step is being killed, then CANCELLED.
    let started = Instant::now();
    loop {
        let state = Command::new("squeue")
            .args(["-h", "-t", "all", "-o", "%T", "-j", &base_job])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        if state.starts_with("CANCELLED") {
            break;
        }
        assert!(
            state == "COMPLETING" && started.elapsed() < Duration::from_secs(30),
            "job {base_job}: {state}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

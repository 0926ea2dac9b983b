//! Issue 15: gc never deletes what is in use (live runs, killed runs, other
//! projects on a shared store), cache hits check their files, `verify`
//! rehashes them, and a dataset that changes under a run is never cached
//! under its old hash.

mod common;

use std::time::{Duration, Instant};

use common::{TestProject, SMALL_WORLD};

/// `a` (small synth) finishes first; `b` (a slow synth) runs while the test
/// acts; `c` then reads `a`'s corpus.
fn race_experiment() -> String {
    format!(
        "[stages.a]\nkind = \"synth\"\n{SMALL_WORLD}\n[stages.b]\nkind = \"synth\"\ncorpus_docs = 400000\n\n[stages.c]\nkind = \"dataset\"\ninput = {{ stage = \"a\", file = \"corpus.parquet\" }}\n"
    )
}

fn tmp_count(p: &TestProject) -> usize {
    std::fs::read_dir(p.path("results/store/.tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Spawn `run NAME` and return once `a` is published and `b` is building.
fn spawn_until_b_builds(p: &TestProject, name: &str) -> std::process::Child {
    let child = p
        .command(&["run", name, "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !(p.store_keys().len() == 1 && tmp_count(p) == 1) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "b never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn gc_during_a_run_keeps_every_key_of_its_plan() {
    let p = TestProject::new();
    p.write("experiments/race.toml", &race_experiment());
    let child = spawn_until_b_builds(&p, "race");
    // The experiment file is gone, so only the run's lease protects `a`.
    std::fs::remove_file(p.path("experiments/race.toml")).unwrap();
    let out = p.ok(&["gc"]);
    assert!(out.contains("removed 0 entries"), "{out}");
    assert!(out.contains("1 live runs"), "{out}");
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(p.store_keys().len(), 3);
}

#[test]
fn gc_after_a_killed_run_keeps_what_it_finished() {
    let p = TestProject::new();
    p.write("experiments/race.toml", &race_experiment());
    let mut child = spawn_until_b_builds(&p, "race");
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(p.path("experiments/race.toml")).unwrap();
    let keys = p.store_keys();
    let out = p.run(&["gc"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("removed 0 entries, 1 unfinished builds"),
        "{stdout}"
    );
    assert!(stderr.contains("ended unfinished"), "{stderr}");
    assert_eq!(
        p.store_keys(),
        keys,
        "a killed run's finished entry survives"
    );
}

fn world(docs: u32) -> String {
    format!(
        "[stages.world]\nkind = \"synth\"\n{}",
        SMALL_WORLD.replace("corpus_docs = 300", &format!("corpus_docs = {docs}"))
    )
}

#[test]
fn gc_on_a_shared_store_keeps_every_registered_project() {
    let store = tempfile::tempdir().unwrap();
    let s = store.path().to_str().unwrap().to_string();
    let a = TestProject::new();
    let b = TestProject::new();
    a.write("experiments/one.toml", &world(301));
    b.write("experiments/two.toml", &world(302));
    a.ok(&["--store", &s, "run", "one"]);
    b.ok(&["--store", &s, "run", "two"]);
    let out = b.ok(&["--store", &s, "gc"]);
    assert!(out.contains("removed 0 entries"), "{out}");
    assert!(out.contains("kept 2 entries"), "{out}");

    // Project A's checkout is gone: its recorded keys stay until forgotten.
    let a_root = a.root().canonicalize().unwrap();
    drop(a);
    let out = b.run(&["--store", &s, "gc"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 entries"));
    assert!(stderr.contains("is not reachable from here"), "{stderr}");
    assert!(stderr.contains("--forget"), "{stderr}");
    let out = b.ok(&["--store", &s, "gc", "--forget", a_root.to_str().unwrap()]);
    assert!(out.contains("removed 1 entries"), "{out}");
}

#[test]
fn gc_keeps_current_files_and_last_runs_and_honours_older_than() {
    let p = TestProject::new();
    p.write("experiments/w.toml", &world(301));
    p.ok(&["run", "w"]);
    p.write("experiments/w.toml", &world(302));
    p.ok(&["run", "w"]);
    let out = p.ok(&["gc", "--dry-run", "--last-runs", "2"]);
    assert!(out.contains("would remove 0 entries"), "{out}");
    let out = p.ok(&["gc", "--last-runs", "0", "--older-than", "1h"]);
    assert!(out.contains("removed 0 entries"), "{out}");
    assert!(
        out.contains("kept 1 unused entries published within --older-than"),
        "{out}"
    );
    let out = p.ok(&["gc", "--last-runs", "0"]);
    assert!(out.contains("removed 1 entries"), "{out}");
    // What the experiment file references now is always kept.
    assert_eq!(p.store_keys().len(), 1);
    let err = p.fails(&["gc", "--older-than", "soon"]);
    assert!(
        err.contains("--older-than `soon` is not a duration"),
        "{err}"
    );
}

#[test]
fn make_gc_does_not_delete_unless_asked() {
    let makefile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Makefile")).unwrap();
    let recipe: Vec<&str> = makefile
        .split("\ngc: build\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with('\t'))
        .collect();
    assert!(
        recipe.iter().any(|l| l.contains("gc --dry-run")),
        "{recipe:?}"
    );
    assert!(
        recipe.iter().all(|l| !l.trim_end().ends_with(" gc")),
        "{recipe:?}"
    );
}

fn chain() -> String {
    format!(
        "{}\n[stages.forum]\nkind = \"dataset\"\ninput = {{ stage = \"world\", file = \"corpus.parquet\", max_rows = 50 }}\n",
        world(300)
    )
}

fn entry_of(p: &TestProject, exp: &str, stage: &str) -> std::path::PathBuf {
    let plan = p.plan_json(exp);
    let key = plan.iter().find(|s| s["name"] == stage).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    p.path(&format!("results/store/{key}"))
}

#[test]
fn a_hit_with_a_missing_or_truncated_file_warns_and_rebuilds() {
    let p = TestProject::new();
    p.write("experiments/chain.toml", &chain());
    p.ok(&["run", "chain"]);
    let world = entry_of(&p, "chain", "world");
    std::fs::remove_file(world.join("corpus.parquet")).unwrap();
    let out = p.run(&["run", "chain"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is incomplete or corrupt (`corpus.parquet` listed in its manifest"),
        "{stderr}"
    );
    assert_eq!(p.ran("chain"), ["world"]);

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(world.join("prompts_test.parquet"))
        .unwrap();
    f.set_len(10).unwrap();
    let out = p.run(&["run", "chain"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has 10 bytes, its manifest says"),
        "{stderr}"
    );
    assert_eq!(p.ran("chain"), ["world"]);
}

#[test]
fn verify_rehashes_and_rebuilds_a_corrupt_entry() {
    let p = TestProject::new();
    p.write("experiments/chain.toml", &chain());
    p.ok(&["run", "chain"]);
    let forum = entry_of(&p, "chain", "forum");
    let file = forum.join("data.parquet");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    // Same size: the cheap check on a hit cannot see it; verify can.
    let out = p.ok(&["verify", "chain"]);
    assert!(out.contains("corrupt "), "{out}");
    assert!(out.contains("data.parquet` has blake3"), "{out}");
    assert!(out.contains("verified 2 entries"), "{out}");
    assert_eq!(p.ran("chain"), ["forum"]);
    let out = p.ok(&["verify"]);
    assert!(
        out.contains("verified 2 entries") && out.contains(": 0 corrupt"),
        "{out}"
    );
}

#[test]
fn a_dataset_changed_during_the_run_is_not_cached_under_its_old_hash() {
    let p = TestProject::new();
    let write = |rows: &[&str]| {
        use polars::prelude::*;
        let mut df = df!("text" => rows).unwrap();
        let file = std::fs::File::create(p.path("datasets/extra.parquet")).unwrap();
        ParquetWriter::new(file).finish(&mut df).unwrap();
    };
    write(&["original row", "another row"]);
    p.write(
        "experiments/edit.toml",
        "[stages.a_slow]\nkind = \"synth\"\ncorpus_docs = 400000\n\n[stages.z_side]\nkind = \"dataset\"\ninput = \"datasets/extra.parquet\"\n",
    );
    let child = p
        .command(&["run", "edit", "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while tmp_count(&p) == 0 {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    write(&["edited row"]);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("stage `z_side`: dataset `datasets/extra.parquet` changed after the run planned this stage"),
        "{stderr}"
    );
    assert_eq!(p.store_keys().len(), 1, "only a_slow is stored");
    p.ok(&["run", "edit"]);
    assert_eq!(p.ran("edit"), ["z_side"]);
}

#[test]
fn score_of_a_stage_leaves_no_lease_behind() {
    let p = TestProject::new();
    p.write(
        "experiments/tiny.toml",
        &format!(
            "[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\" }}\nvocab_size = 300\n\n[stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\" }}\nseq_len = 16\nmodel = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}\ntrain = {{ steps = 2, batch_size = 2, eval_every = 0 }}\n"
        ),
    );
    p.ok(&["run", "tiny", "--quiet"]);
    let out = p.ok(&["score", "tiny:base", "--ids", "1,2,3"]);
    assert!(out.contains("\"logprobs\""), "{out}");
    let leases = std::fs::read_dir(p.path("results/store/.leases"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        leases, 0,
        "a finished run and a finished score leave no lease"
    );
}

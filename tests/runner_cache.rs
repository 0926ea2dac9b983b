//! The runner's acceptance: what reruns and what is reused.

mod common;

use common::{TestProject, SMALL_WORLD};
use std::time::{Duration, SystemTime};

/// world (synth) -> forum (dataset) -> tok (tokenizer), plus side (dataset)
/// reading a file under datasets/.
fn chain(max_rows: u32) -> String {
    format!(
        r#"[experiment]
seed = 3

[stages.world]
kind = "synth"
{SMALL_WORLD}
[stages.forum]
kind = "dataset"
input = {{ stage = "world", file = "corpus.parquet", dialogue_filter = true, max_rows = {max_rows} }}

[stages.tok]
kind = "tokenizer"
corpus = {{ stage = "forum", file = "data.parquet" }}
vocab_size = 300

[stages.side]
kind = "dataset"
input = "datasets/extra.parquet"
"#
    )
}

/// An uncompressed Parquet file, so a text byte can be changed in place.
fn write_extra(p: &TestProject) {
    use polars::prelude::*;
    let mut df = df!("text" => ["hello world", "another row"], "n" => [1i64, 2]).unwrap();
    let file = std::fs::File::create(p.path("datasets/extra.parquet")).unwrap();
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Uncompressed)
        .with_statistics(StatisticsOptions::empty())
        .finish(&mut df)
        .unwrap();
}

fn project() -> TestProject {
    let p = TestProject::new();
    write_extra(&p);
    p.write("experiments/chain.toml", &chain(100));
    p
}

#[test]
fn second_run_reuses_every_stage() {
    let p = project();
    p.ok(&["run", "chain"]);
    assert_eq!(p.ran("chain"), ["forum", "side", "tok", "world"]);
    let keys = p.store_keys();
    assert_eq!(keys.len(), 4);

    let out = p.ok(&["run", "chain"]);
    assert!(p.ran("chain").is_empty(), "{out}");
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(p.store_keys(), keys);
    let runs = posttrain::results::runs_table::read_runs(&p.path("results/chain")).unwrap();
    assert_eq!(runs.height(), 4);
}

#[test]
fn changed_middle_stage_reruns_it_and_descendants_and_plan_says_why() {
    let p = project();
    p.ok(&["run", "chain"]);
    p.write("experiments/chain.toml", &chain(80));

    let plan = p.plan_json("chain");
    let by_name = |n: &str| plan.iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(by_name("world")["status"], "cached");
    assert_eq!(by_name("side")["status"], "cached");
    let forum = by_name("forum");
    assert_eq!(forum["status"], "stale");
    assert_eq!(forum["reasons"][0]["reason"], "setting_changed");
    assert_eq!(forum["reasons"][0]["field"], "input.max_rows");
    assert_eq!(forum["reasons"][0]["old"], 100);
    assert_eq!(forum["reasons"][0]["new"], 80);
    let tok = by_name("tok");
    assert_eq!(tok["status"], "stale");
    assert_eq!(tok["reasons"][0]["reason"], "upstream_changed");
    assert_eq!(tok["reasons"][0]["stage"], "forum");
    let text = p.ok(&["plan", "chain"]);
    assert!(
        text.contains("setting `input.max_rows` changed: 100 -> 80"),
        "{text}"
    );

    p.ok(&["run", "chain"]);
    assert_eq!(p.ran("chain"), ["forum", "tok"]);
}

#[test]
fn formatting_order_comments_and_explicit_defaults_change_nothing() {
    let p = project();
    p.ok(&["run", "chain"]);
    // Same experiment: keys reordered, comments, inline tables as headers,
    // every default spelled out, numbers written differently.
    p.write(
        "experiments/chain.toml",
        r#"# a comment
[stages.tok]   # trailing comment
vocab_size = 300
min_frequency = 2          # the default
kind = "tokenizer"
[stages.tok.corpus]
file = "data.parquet"
stage = "forum"
text_column = "text"       # the default

[stages.side]
input = { path = "datasets/extra.parquet", dedup = false, test_fraction = 0.10 }
kind = "dataset"

[stages.forum]
kind = "dataset"
[stages.forum.input]
max_rows = 100
file = "corpus.parquet"
stage = "world"
dialogue_filter = true
min_turns = 2

[stages.world]
prompts_test = 10
prompts_train = 20
kind = "synth"
rankings = 10
comparisons = 50
demonstrations = 50
corpus_docs = 300
label_noise = 1e-1
countries = 12

[experiment]
description = "same stages, other words"
seed = 3
"#,
    );
    let out = p.ok(&["run", "chain"]);
    assert!(p.ran("chain").is_empty(), "{out}");
}

#[test]
fn touching_a_dataset_reruns_nothing_changing_a_byte_reruns_its_readers() {
    let p = project();
    p.ok(&["run", "chain"]);
    // Let the first hash settle out of the racy window, then touch.
    std::thread::sleep(Duration::from_millis(2100));
    p.ok(&["run", "chain"]);
    let file = std::fs::File::options()
        .write(true)
        .open(p.path("datasets/extra.parquet"))
        .unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(file);
    let out = p.ok(&["run", "chain"]);
    assert!(p.ran("chain").is_empty(), "{out}");

    let path = p.path("datasets/extra.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(11)
        .position(|w| w == b"hello world")
        .expect("text stored verbatim");
    bytes[at + 4] = b'p';
    std::fs::write(&path, bytes).unwrap();
    let plan = p.plan_json("chain");
    let side = plan.iter().find(|s| s["name"] == "side").unwrap();
    assert_eq!(side["reasons"][0]["reason"], "dataset_changed");
    p.ok(&["run", "chain"]);
    assert_eq!(p.ran("chain"), ["side"]);
}

#[test]
fn identical_stage_in_two_experiments_is_computed_once() {
    let p = project();
    p.write(
        "experiments/a.toml",
        &format!("[experiment]\nname = \"a\"\nseed = 3\ndescription = \"first\"\n[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}"),
    );
    p.write(
        "experiments/b.toml",
        &format!(
            "[experiment]\nname = \"b\"\nseed = 3\n[stages.universe]\nkind = \"synth\"\ndescription = \"other words\"\n{SMALL_WORLD}"
        ),
    );
    p.ok(&["run", "a"]);
    p.ok(&["run", "b"]);
    assert_eq!(p.ran("a"), ["world"]);
    assert!(p.ran("b").is_empty());
    assert_eq!(p.store_keys().len(), 1);
}

#[test]
fn a_failed_stage_leaves_no_complete_entry_and_is_built_next_time() {
    let p = project();
    p.write(
        "experiments/bad.toml",
        &format!(
            "[experiment]\nseed = 3\n[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\", columns = {{ text = \"txt\" }} }}\n"
        ),
    );
    let err = p.fails(&["run", "bad"]);
    assert!(err.contains("stage `tok` (tokenizer) failed"), "{err}");
    assert!(
        err.contains("no column `txt` (did you mean `text`?)"),
        "{err}"
    );
    assert_eq!(p.store_keys().len(), 1, "only world is complete");
    let tmp = p.path("results/store/.tmp");
    assert_eq!(
        std::fs::read_dir(tmp).map(|d| d.count()).unwrap_or(0),
        0,
        "build folder removed"
    );
}

#[test]
fn a_killed_run_leaves_no_complete_entry_and_the_next_run_builds_it() {
    let p = project();
    p.write(
        "experiments/slow.toml",
        "[stages.world]\nkind = \"synth\"\ncorpus_docs = 400000\n",
    );
    let mut child = p.command(&["run", "slow", "--quiet"]).spawn().unwrap();
    let tmp = p.path("results/store/.tmp");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "build never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(p.store_keys().is_empty(), "nothing complete after a kill");
    let plan = p.plan_json("slow");
    assert_eq!(plan[0]["status"], "stale");

    p.ok(&["run", "slow"]);
    assert_eq!(p.ran("slow"), ["world"]);
    assert_eq!(p.store_keys().len(), 1);
    // The debris of the killed build is what gc cleans.
    let out = p.ok(&["gc"]);
    assert!(
        out.contains("removed 0 entries, 1 unfinished builds"),
        "{out}"
    );
}

#[test]
fn two_concurrent_runs_both_finish_and_build_each_stage_once() {
    let p = project();
    p.write(
        "experiments/both.toml",
        "[stages.world]\nkind = \"synth\"\ncorpus_docs = 150000\n\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = { stage = \"world\", file = \"corpus.parquet\", max_rows = 2000 }\nvocab_size = 300\n",
    );
    let a = p.command(&["run", "both"]).output_spawn();
    let b = p.command(&["run", "both"]).output_spawn();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let table = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let ran = |stage: &str| {
        [table(&a), table(&b)]
            .iter()
            .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| l.starts_with(&format!("{stage} ")) && l.contains(" ran "))
            .count()
    };
    // They overlapped: one of them waited for the other's lock.
    let waited = [&a, &b]
        .iter()
        .any(|o| String::from_utf8_lossy(&o.stderr).contains("Waiting"));
    assert!(waited, "the runs did not overlap");
    assert_eq!(ran("world"), 1, "{}\n{}", table(&a), table(&b));
    assert_eq!(ran("tok"), 1, "{}\n{}", table(&a), table(&b));
    assert_eq!(p.store_keys().len(), 2);
}

trait SpawnOutput {
    fn output_spawn(&mut self) -> std::process::Child;
}

impl SpawnOutput for std::process::Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

#[test]
fn until_and_force_and_dry_run() {
    let p = project();
    p.ok(&["run", "chain", "--until", "forum"]);
    assert_eq!(p.ran("chain"), ["forum", "world"]);
    let out = p.ok(&["run", "chain", "--dry-run"]);
    assert!(out.contains("dry run: 2 stages would run"), "{out}");
    assert_eq!(p.store_keys().len(), 2, "dry run builds nothing");
    p.ok(&["run", "chain"]);
    p.ok(&["run", "chain", "--force", "tok"]);
    assert_eq!(p.ran("chain"), ["tok"]);
    let err = p.fails(&["run", "chain", "--force", "tokk"]);
    assert!(err.contains("did you mean `tok`?"), "{err}");
}

#[test]
fn dag_list_and_gc() {
    let p = project();
    let text = p.ok(&["dag", "chain"]);
    assert!(text.contains("tok (tokenizer) <- forum [corpus]"), "{text}");
    let dot = p.ok(&["dag", "chain", "--format", "dot"]);
    assert!(
        dot.contains("\"world\" -> \"forum\" [label=\"input\"]"),
        "{dot}"
    );
    p.ok(&["run", "chain"]);
    let list = p.ok(&["list"]);
    assert!(list.contains("chain: 4/4 stages cached"), "{list}");

    // An entry no experiment's last run uses is collected; used ones stay.
    p.write("experiments/chain.toml", &chain(50));
    p.ok(&["run", "chain"]);
    assert_eq!(p.store_keys().len(), 6);
    let dry = p.ok(&["gc", "--dry-run"]);
    assert!(dry.contains("would remove 2 entries"), "{dry}");
    assert_eq!(p.store_keys().len(), 6);
    p.ok(&["gc"]);
    assert_eq!(p.store_keys().len(), 4);
    assert!(p.ran("chain").len() == 2);
    p.ok(&["run", "chain"]);
    assert!(p.ran("chain").is_empty());
}

#[test]
fn compare_shows_experiments_side_by_side_and_what_differs() {
    let p = project();
    p.write("experiments/other.toml", &chain(60));
    p.ok(&["run", "chain"]);
    p.ok(&["run", "other"]);
    let out = p.ok(&[
        "compare",
        "chain",
        "other",
        "--metrics",
        "rows_out",
        "--sort",
        "rows_out",
        "--out",
        "cmp.csv",
    ]);
    assert!(out.contains("chain") && out.contains("other"), "{out}");
    assert!(out.contains("settings that differ"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("forum")
            && l.contains("input.max_rows")
            && l.contains("100")
            && l.contains("60")),
        "{out}"
    );
    let csv = std::fs::read_to_string(p.path("cmp.csv")).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "experiment,stage,kind,status,duration_s,rows_out"
    );
    assert_eq!(csv.lines().count(), 9, "{csv}");
    let err = p.fails(&["compare", "chain", "--sort", "row_out"]);
    assert!(
        err.contains("no column `row_out` in the comparison (did you mean `rows_out`?)"),
        "{err}"
    );
    // Not an experiment at all: said so, with the ones there are.
    let err = p.fails(&["compare", "chain", "nothing"]);
    assert!(err.contains("no experiment `nothing`"), "{err}");
    assert!(err.contains("available experiments: chain, other"), "{err}");
}

#[test]
fn store_can_move_and_experiments_can_be_given_by_path() {
    let p = project();
    p.write(
        "elsewhere/exp.toml",
        &format!("[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}"),
    );
    let shared = p.path("shared-store");
    let out = p
        .command(&["run", "elsewhere/exp.toml"])
        .env("POSTTRAIN_STORE", &shared)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!p.path("results/store").exists());
    let store = posttrain::store::Store::new(&shared);
    assert_eq!(store.keys().unwrap().len(), 1);
    p.ok(&[
        "run",
        "elsewhere/exp.toml",
        "--store",
        shared.to_str().unwrap(),
    ]);
    assert!(p.ran("exp").is_empty(), "the moved store was reused");
}

//! A corpus of bad inputs (issue 15): experiment files under
//! `tests/bad_inputs/experiments/`, each with `# expect: TEXT` lines (`{file}`
//! stands for its own file name), plus bad datasets, model folders and CLI
//! values built here. Each asserts the exit code, the message, and that the
//! store was left untouched: absent where the refusal comes before anything
//! runs, without a complete entry where a stage refuses its input.

mod common;

use std::path::Path;
use std::process::Output;

use common::{TestProject, SMALL_WORLD};

/// What every refusal shares: exit code 1, nothing on stdout, one `error:`
/// on stderr naming each cause once.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn no_store(p: &TestProject) {
    assert!(!p.path("results/store").exists(), "the store was touched");
}

fn no_entries(p: &TestProject) {
    assert!(p.store_keys().is_empty(), "an entry was stored");
}

#[test]
fn every_bad_experiment_file_is_refused_before_anything_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs/experiments");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 14, "the corpus shrank: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        let stem = name.trim_end_matches(".toml");
        let expects: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| e.replace("{file}", name))
            .collect();
        assert!(!expects.is_empty(), "{name} has no `# expect:` line");
        let p = TestProject::new();
        p.write(&format!("experiments/{name}"), &text);
        let out = p
            .command(&["run", stem])
            .env("POSTTRAIN_MEMORY_BYTES", "16e9")
            .output()
            .unwrap();
        let stderr = refused(&out);
        for e in &expects {
            assert!(
                stderr.contains(e.as_str()),
                "{name}: expected `{e}` in:\n{stderr}"
            );
        }
        no_store(&p);
        assert!(!p.path("results").exists(), "{name}: results/ was written");
    }
}

#[test]
fn bad_sampling_flags_are_refused_by_the_rules_of_a_sampling_table() {
    let p = TestProject::new();
    for (flags, message) in [
        (
            ["--temperature", "NaN"],
            "`temperature` must be a finite number >= 0 (0 = greedy), got NaN",
        ),
        (
            ["--temperature=-1", "--seed=0"],
            "`temperature` must be a finite number >= 0 (0 = greedy), got -1",
        ),
        (
            ["--top-p", "2"],
            "`top_p` must be in (0, 1] (1 = off), got 2",
        ),
        (
            ["--top-p", "0"],
            "`top_p` must be in (0, 1] (1 = off), got 0",
        ),
        (
            ["--max-new-tokens", "0"],
            "`max_new_tokens` must be at least 1",
        ),
    ] {
        let mut args = vec!["sample", "exp", "base", "--prompt", "hi"];
        args.extend(flags);
        let err = refused(&p.run(&args));
        assert!(
            err.contains(&format!("error: sample: {message}")),
            "{flags:?}: {err}"
        );
        assert!(err.contains("help: --temperature, --top-p"), "{err}");
    }
    no_store(&p);
}

#[test]
fn a_store_that_is_a_file_is_named_as_such() {
    let p = TestProject::new();
    p.write("experiments/w.toml", "[stages.world]\nkind = \"synth\"\n");
    p.write("not-a-folder", "x");
    let err = refused(&p.run(&["--store", "not-a-folder", "run", "w"]));
    assert!(err.contains("the store `"), "{err}");
    assert!(err.contains("not-a-folder` is not a folder"), "{err}");
    assert!(!err.contains(".lock"), "{err}");
    no_store(&p);
}

#[test]
fn score_and_sample_on_a_stage_that_is_not_a_model_say_so() {
    let p = TestProject::new();
    p.write("experiments/w.toml", "[stages.world]\nkind = \"synth\"\n");
    let err = refused(&p.run(&["score", "w:world", "--text", "hi"]));
    assert!(
        err.contains("stage `world` of `w` is a synth stage, not a model: `score` needs a stage that writes a model"),
        "{err}"
    );
    assert!(
        err.contains("model stages of this experiment: none"),
        "{err}"
    );
    let err = refused(&p.run(&["sample", "w", "world", "--prompt", "hi"]));
    assert!(
        err.contains("`sample` needs a stage that writes a model"),
        "{err}"
    );
    assert!(!err.contains("config.json"), "{err}");
    no_store(&p);
}

#[test]
fn an_empty_run_of_a_stageless_file_is_not_reported_as_cached() {
    let p = TestProject::new();
    p.write("experiments/e.toml", "# nothing yet\n");
    let err = refused(&p.run(&["run", "e"]));
    assert!(err.contains("experiment `e` has no stages"), "{err}");
    assert!(!err.contains("cached"), "{err}");
    no_store(&p);
}

fn parquet(p: &TestProject, rel: &str, mut df: polars::prelude::DataFrame) {
    use polars::prelude::*;
    let file = std::fs::File::create(p.path(rel)).unwrap();
    ParquetWriter::new(file).finish(&mut df).unwrap();
}

#[test]
fn a_non_finite_margin_is_refused_by_the_dataset_checks() {
    use polars::prelude::*;
    for (margin, shown) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
        let p = TestProject::new();
        let df = df!(
            "prompt" => ["q1", "q2"],
            "chosen" => ["good", "fine"],
            "rejected" => ["bad", "worse"],
            "margin" => [1.0, margin]
        )
        .unwrap();
        parquet(&p, "datasets/pairs.parquet", df);
        p.write(
            "experiments/m.toml",
            "[stages.pairs]\nkind = \"dataset\"\ninput = { path = \"datasets/pairs.parquet\", format = \"comparisons\" }\n",
        );
        let err = refused(&p.run(&["run", "m", "--quiet"]));
        assert!(
            err.contains(&format!(
                "column `margin` is {shown} in row 1: margins must be finite numbers"
            )),
            "{err}"
        );
        assert!(!err.contains("diverged"), "{err}");
        no_entries(&p);
    }
}

#[test]
fn a_data_set_with_zero_rows_says_so() {
    use polars::prelude::*;
    let p = TestProject::new();
    let empty: Vec<&str> = Vec::new();
    parquet(&p, "datasets/empty.parquet", df!("text" => empty).unwrap());
    p.write(
        "experiments/z.toml",
        "[stages.tok]\nkind = \"tokenizer\"\ncorpus = \"datasets/empty.parquet\"\nvocab_size = 300\n",
    );
    let err = refused(&p.run(&["run", "z", "--quiet"]));
    assert!(
        err.contains(
            "datasets/empty.parquet: the data set has no rows; a stage needs at least one"
        ),
        "{err}"
    );
    no_entries(&p);
}

/// A tiny pre-trained model folder (config.json, model.safetensors,
/// tokenizer.json) copied out of the store to `models/NAME`.
fn tiny_model(p: &TestProject, name: &str) -> std::path::PathBuf {
    p.write(
        "experiments/tiny.toml",
        &format!(
            "[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\" }}\nvocab_size = 300\n\n[stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\" }}\nseq_len = 16\nmodel = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}\ntrain = {{ steps = 2, batch_size = 2, eval_every = 0 }}\n"
        ),
    );
    p.ok(&["run", "tiny", "--quiet"]);
    let entry = p.path("results/tiny/stages/base");
    let dir = p.path(&format!("models/{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(entry.join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Overwrite the first weight of `tensor` in a safetensors file with NaN.
fn poison(file: &Path, tensor: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn model_folders_with_nan_weights_or_empty_text_are_refused() {
    let p = TestProject::new();
    let good = tiny_model(&p, "good");
    let err = refused(&p.run(&["score", good.to_str().unwrap(), "--text", ""]));
    assert!(
        err.contains("--text is empty: there is nothing to score"),
        "{err}"
    );

    let bad = tiny_model(&p, "nan");
    poison(&bad.join("model.safetensors"), "model.embed_tokens.weight");
    let err = refused(&p.run(&["score", bad.to_str().unwrap(), "--ids", "0,1,2"]));
    assert!(err.contains("gives a non-finite log-probability"), "{err}");
    assert!(
        err.contains("its weights hold NaN or infinite values"),
        "{err}"
    );

    let entries = p.store_keys().len();
    p.write(
        "experiments/l.toml",
        "[stages.m]\nkind = \"load\"\npath = \"models/nan\"\n",
    );
    let err = refused(&p.run(&["run", "l", "--quiet"]));
    assert!(
        err.contains("tensor `model.embed_tokens.weight` holds a non-finite weight (NaN)"),
        "{err}"
    );
    assert_eq!(p.store_keys().len(), entries, "nothing stored for the load");
}

#[test]
fn an_error_cause_is_printed_once() {
    let p = TestProject::new();
    // An empty folder: the missing config.json's OS error is the cause.
    let dir = p.path("models/empty");
    std::fs::create_dir_all(&dir).unwrap();
    let err = refused(&p.run(&["score", dir.to_str().unwrap(), "--ids", "1"]));
    let first = err.lines().next().unwrap();
    assert!(
        first.contains("config.json: No such file or directory"),
        "{first}"
    );
    assert_eq!(
        first.matches("No such file or directory").count(),
        1,
        "the cause is printed once: {first}"
    );
}

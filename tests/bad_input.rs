//! Every kind of bad input is refused before anything runs: non-zero exit,
//! a message on stderr naming the file, line and what would be valid, and
//! nothing written to the store.

mod common;

use common::TestProject;

/// Run `posttrain run bad` on an experiment and return stderr, checking
/// that it failed and left no store behind.
fn refused(text: &str) -> String {
    let p = TestProject::new();
    p.write("experiments/bad.toml", text);
    refused_in(&p, "bad")
}

fn refused_in(p: &TestProject, name: &str) -> String {
    let out = p.run(&["run", name]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!p.path("results/store").exists(), "the store was touched");
    stderr
}

#[test]
fn malformed_toml_names_file_line_and_column() {
    let err = refused("[stages.world]\nkind = \"synth\"\ncorpus_docs = = 3\n");
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("invalid TOML"), "{err}");
}

#[test]
fn unknown_kind_lists_kinds_and_suggests() {
    let err = refused("[stages.world]\nkind = \"synht\"\n");
    assert!(
        err.contains("bad.toml:2:8: stage `world`: unknown kind `synht` (did you mean `synth`?)"),
        "{err}"
    );
    assert!(
        err.contains("valid kinds: `synth`, `dataset`, `tokenizer`"),
        "{err}"
    );
}

#[test]
fn unknown_field_points_at_it_and_suggests_the_closest() {
    let err = refused("[stages.world]\nkind = \"synth\"\ncorpus_doc = 5\n");
    assert!(
        err.contains("bad.toml:3:1: unknown field `corpus_doc`"),
        "{err}"
    );
    assert!(err.contains("(did you mean `corpus_docs`?)"), "{err}");
    assert!(err.contains("valid fields:"), "{err}");
}

#[test]
fn wrong_type_names_the_field() {
    let err = refused("[stages.world]\nkind = \"synth\"\ncorpus_docs = \"many\"\n");
    assert!(err.contains("bad.toml:3:15"), "{err}");
    assert!(
        err.contains("field `corpus_docs`: invalid type: string \"many\""),
        "{err}"
    );
}

#[test]
fn out_of_range_value_is_refused() {
    let err = refused("[stages.world]\nkind = \"synth\"\nlabel_noise = 0.9\n");
    assert!(
        err.contains("bad.toml:3:15: stage `world`: `label_noise` must be between 0 and 0.5"),
        "{err}"
    );
}

#[test]
fn missing_required_field() {
    let err = refused("[stages.tok]\nkind = \"tokenizer\"\n");
    assert!(err.contains("bad.toml:1:9"), "{err}");
    assert!(
        err.contains("stage `tok` (kind `tokenizer`) is missing the required field `corpus`"),
        "{err}"
    );
}

#[test]
fn missing_kind() {
    let err = refused("[stages.tok]\nvocab_size = 3\n");
    assert!(err.contains("stage `tok` has no `kind`"), "{err}");
}

#[test]
fn reference_to_a_missing_stage_suggests_the_closest() {
    let err = refused(
        "[stages.world]\nkind = \"synth\"\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = { stage = \"wrold\", file = \"corpus.parquet\" }\n",
    );
    assert!(err.contains("bad.toml:5:10"), "{err}");
    assert!(
        err.contains("names stage `wrold`, which does not exist (did you mean `world`?)"),
        "{err}"
    );
}

#[test]
fn reference_to_a_file_the_stage_does_not_write() {
    let err = refused(
        "[stages.world]\nkind = \"synth\"\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = { stage = \"world\", file = \"corpora.parquet\" }\n",
    );
    assert!(
        err.contains("which does not write it (did you mean `corpus.parquet`?)"),
        "{err}"
    );
}

#[test]
fn a_cycle_names_every_stage_on_it() {
    let err = refused(
        "[stages.a]\nkind = \"dataset\"\ninput = { stage = \"c\", file = \"data.parquet\" }\n\
         [stages.b]\nkind = \"dataset\"\ninput = { stage = \"a\", file = \"data.parquet\" }\n\
         [stages.c]\nkind = \"dataset\"\ninput = { stage = \"b\", file = \"data.parquet\" }\n",
    );
    assert!(
        err.contains("stages form a cycle: `a`, `b`, `c` (a -> b -> c -> a)"),
        "{err}"
    );
}

#[test]
fn a_stage_reading_itself_is_a_cycle() {
    let err = refused(
        "[stages.a]\nkind = \"dataset\"\ninput = { stage = \"a\", file = \"data.parquet\" }\n",
    );
    assert!(err.contains("stages form a cycle: `a` (a -> a)"), "{err}");
}

#[test]
fn missing_dataset_file() {
    let err = refused("[stages.d]\nkind = \"dataset\"\ninput = \"datasets/nope.parquet\"\n");
    assert!(err.contains("bad.toml:3:9: stage `d`: dataset `datasets/nope.parquet` (field `input`) cannot read it"), "{err}");
}

#[test]
fn unreadable_dataset_file() {
    let p = TestProject::new();
    // A link to nothing: present in the folder, unreadable.
    std::os::unix::fs::symlink(
        p.path("datasets/gone.parquet"),
        p.path("datasets/link.parquet"),
    )
    .unwrap();
    p.write(
        "experiments/bad.toml",
        "[stages.d]\nkind = \"dataset\"\ninput = \"datasets/link.parquet\"\n",
    );
    let err = refused_in(&p, "bad");
    assert!(
        err.contains("dataset `datasets/link.parquet` (field `input`) cannot read it"),
        "{err}"
    );
}

#[test]
fn include_that_does_not_exist() {
    let err = refused("[experiment]\ninclude = [\"_nope.toml\"]\n");
    assert!(
        err.contains("bad.toml:2:12: included file `_nope.toml` does not exist"),
        "{err}"
    );
}

#[test]
fn include_of_itself_and_include_cycles() {
    let err = refused("[experiment]\ninclude = [\"bad.toml\"]\n");
    assert!(err.contains("`bad.toml` includes itself"), "{err}");

    let p = TestProject::new();
    p.write(
        "experiments/bad.toml",
        "[experiment]\ninclude = [\"_a.toml\"]\n",
    );
    p.write(
        "experiments/_a.toml",
        "[experiment]\ninclude = [\"bad.toml\"]\n",
    );
    let err = refused_in(&p, "bad");
    assert!(err.contains("include cycle:"), "{err}");
}

#[test]
fn experiment_not_found_lists_the_available_ones() {
    let p = TestProject::new();
    p.write(
        "experiments/llama-dpo.toml",
        "[stages.w]\nkind = \"synth\"\n",
    );
    p.write(
        "experiments/llama-sft.toml",
        "[stages.w]\nkind = \"synth\"\n",
    );
    p.write("experiments/_common.toml", "");
    let err = refused_in(&p, "llama-dop");
    assert!(err.contains("no experiment `llama-dop`"), "{err}");
    assert!(err.contains("(did you mean `llama-dpo`?)"), "{err}");
    assert!(
        err.contains("available experiments: llama-dpo, llama-sft"),
        "{err}"
    );
}

#[test]
fn unknown_top_level_and_header_keys() {
    let err = refused("[experimnet]\nseed = 1\n");
    assert!(
        err.contains(
            "bad.toml:1:2: unknown key `experimnet` in the top level (did you mean `experiment`?)"
        ),
        "{err}"
    );
    let err = refused("[experiment]\nsede = 1\n");
    assert!(
        err.contains("unknown key `sede` in [experiment] (did you mean `seed`?)"),
        "{err}"
    );
}

#[test]
fn includes_merge_in_order_and_the_including_file_wins() {
    let p = TestProject::new();
    p.write("experiments/_common.toml", "[experiment]\nseed = 5\n[stages.world]\nkind = \"synth\"\ncorpus_docs = 10\ndemonstrations = 10\n");
    p.write(
        "experiments/_more.toml",
        "[stages.world]\ncorpus_docs = 20\n",
    );
    p.write(
        "experiments/main.toml",
        "[experiment]\ninclude = [\"_common.toml\", \"_more.toml\"]\n[stages.world]\ndemonstrations = 30\n",
    );
    let exp = posttrain::experiment::load(&p.path("experiments/main.toml"), p.root()).unwrap();
    assert_eq!(exp.seed, 5);
    let settings = exp.stages["world"].settings.to_json();
    assert_eq!(settings["corpus_docs"], 20);
    assert_eq!(settings["demonstrations"], 30);
    assert_eq!(exp.files.len(), 3);
}

const WORLD_AND_TOKENIZER: &str = r#"[stages.world]
kind = "synth"

[stages.tokenizer]
kind = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }

[stages.base]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = { stage = "world", file = "corpus.parquet" }
"#;

#[test]
fn a_reference_to_a_stage_of_the_wrong_kind_names_the_kinds_that_would_do() {
    let err = refused(&format!(
        "{WORLD_AND_TOKENIZER}
[stages.dpo]
kind = \"dpo\"
from = \"tokenizer\"
data = {{ stage = \"world\", file = \"comparisons.parquet\" }}
"
    ));
    assert!(
        err.contains("stage `dpo` (kind `dpo`): `from` needs a model, but stage `tokenizer` is a `tokenizer` stage"),
        "{err}"
    );
    assert!(err.contains("bad.toml:15:"), "{err}");
    assert!(
        err.contains("kinds that would do: pretrain, load, sft"),
        "{err}"
    );
    assert!(err.contains("in this experiment: `base`"), "{err}");

    let err = refused(&format!(
        "{WORLD_AND_TOKENIZER}
[stages.eval]
kind = \"eval\"
policies = [\"base\", \"world\"]
prompts = {{ stage = \"world\", file = \"prompts_test.parquet\" }}
"
    ));
    assert!(
        err.contains(
            "`policies[1]` needs a model or best-of-n picks, but stage `world` is a `synth` stage"
        ),
        "{err}"
    );

    let err = refused(&format!(
        "{WORLD_AND_TOKENIZER}
[stages.eval]
kind = \"eval\"
policies = [\"base\"]
gold = \"base\"
prompts = {{ stage = \"world\", file = \"prompts_test.parquet\" }}
"
    ));
    assert!(
        err.contains("`gold` needs a synthetic world, but stage `base` is a `pretrain` stage"),
        "{err}"
    );
    assert!(
        err.contains("kinds that would do: synth; in this experiment: `world`"),
        "{err}"
    );
}

//! Sweeps: a `matrix` on a stage expands to one stage per combination,
//! each keyed by its own settings, referable from a list of stages, and
//! shown with its swept values in `compare`.

mod common;

use common::TestProject;

fn experiment(dpo_extra: &str, eval_policies: &str) -> String {
    format!(
        r#"{base}

[stages.dpo]
kind = "dpo"
from = "base"
data = {{ stage = "world", file = "comparisons.parquet" }}
max_len = 48
train = {{ steps = 3, batch_size = 4, warmup_steps = 1, eval_every = 0 }}
{dpo_extra}

[stages.eval]
kind = "eval"
policies = {eval_policies}
reference = "base"
gold = "world"
prompts = {{ stage = "world", file = "prompts_test.parquet", max_rows = 4 }}
sampling = {{ max_new_tokens = 6 }}
"#,
        base = common::tiny_base(
            2,
            1,
            r#"train = { steps = 10, batch_size = 4, lr = 5e-3, warmup_steps = 2, eval_every = 0 }"#
        ),
    )
}

const MATRIX: &str = "matrix = { beta = [0.1, 0.5], lr = [1e-3, 3e-4] }";

#[test]
fn a_two_by_two_sweep_makes_four_stages_and_compare_shows_their_values() {
    let p = TestProject::new();
    p.write(
        "experiments/sweep.toml",
        &experiment(MATRIX, r#"["base", "dpo"]"#),
    );
    let plan = p.plan_json("sweep");
    let names: Vec<&str> = plan.iter().filter_map(|s| s["name"].as_str()).collect();
    let swept = [
        "dpo@beta=0.1,lr=1e-3",
        "dpo@beta=0.1,lr=3e-4",
        "dpo@beta=0.5,lr=1e-3",
        "dpo@beta=0.5,lr=3e-4",
    ];
    for s in swept {
        assert!(names.contains(&s), "{s} not in {names:?}");
    }
    assert!(!names.contains(&"dpo"));
    let keys: std::collections::BTreeSet<&str> = plan
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("dpo@")))
        .filter_map(|s| s["key"].as_str())
        .collect();
    assert_eq!(keys.len(), 4, "each combination has its own key");

    p.ok(&["run", "sweep", "--quiet"]);
    let ran = p.ran("sweep");
    for s in swept {
        assert!(ran.contains(&s.to_string()), "{s} did not run: {ran:?}");
    }
    // The eval got every combination in place of `dpo`.
    let out = p.ok(&["compare", "sweep"]);
    for s in swept {
        assert!(out.contains(s), "{s} not in compare:\n{out}");
    }
    let header = out.lines().find(|l| l.contains("policy")).unwrap_or("");
    assert!(
        header.contains("beta") && header.contains("lr"),
        "no swept columns:\n{out}"
    );
    let rows = out.lines().filter(|l| l.contains("dpo@")).count();
    assert_eq!(rows, 4, "{out}");
    // Written out, the same columns.
    p.ok(&["compare", "sweep", "--out", "sweep.csv"]);
    let csv = std::fs::read_to_string(p.path("sweep.csv")).unwrap();
    let head = csv.lines().next().unwrap();
    assert!(
        head.starts_with("experiment,eval_stage,policy,beta,lr"),
        "{head}"
    );
    assert!(csv.contains("\"dpo@beta=0.5,lr=3e-4\",0.5,3e-4,"), "{csv}");

    // Editing one value reruns only its stages.
    p.write(
        "experiments/sweep.toml",
        &experiment(
            "matrix = { beta = [0.1, 0.5], lr = [1e-3, 5e-4] }",
            r#"["base", "dpo"]"#,
        ),
    );
    p.ok(&["run", "sweep", "--quiet"]);
    let ran = p.ran("sweep");
    assert!(ran.contains(&"dpo@beta=0.1,lr=5e-4".to_string()), "{ran:?}");
    assert!(
        !ran.contains(&"dpo@beta=0.1,lr=1e-3".to_string()),
        "{ran:?}"
    );
}

#[test]
fn bad_matrices_are_refused_naming_the_field() {
    let p = TestProject::new();
    let cases = [
        (
            "matrix = { betta = [0.1, 0.5] }",
            r#"["dpo"]"#,
            "the matrix sweeps `betta`, which is not a field of kind `dpo` (did you mean `beta`?)",
        ),
        (
            "matrix = { beta = [] }",
            r#"["dpo"]"#,
            "`matrix.beta` is an empty list",
        ),
        (
            "matrix = { beta = 0.1 }",
            r#"["dpo"]"#,
            "`matrix.beta` must be a list of values",
        ),
        (
            "matrix = [0.1]",
            r#"["dpo"]"#,
            "`matrix` must be a table of value lists",
        ),
        (
            MATRIX,
            r#"["base"]
reward_model = "dpo""#,
            "`reward_model` names `dpo`, a matrix of 4 stages; this field takes one",
        ),
        (
            r#"resources = { mem = "4GB" }"#,
            r#"["dpo"]"#,
            "`resources.mem` `4GB` is not a memory size",
        ),
        (
            r#"resources = { time = "1h" }"#,
            r#"["dpo"]"#,
            "`resources.time` `1h` is not a time limit",
        ),
        (
            "resources = { cpu = 2 }",
            r#"["dpo"]"#,
            "unknown field `cpu`",
        ),
    ];
    for (extra, policies, expected) in cases {
        p.write("experiments/bad.toml", &experiment(extra, policies));
        let err = p.fails(&["plan", "bad"]);
        assert!(
            err.contains(expected) && err.contains("bad.toml:"),
            "{extra}: expected `{expected}` with a location, got:\n{err}"
        );
    }
}

#[test]
fn a_nested_field_and_one_combination_by_name() {
    let p = TestProject::new();
    p.write(
        "experiments/nested.toml",
        &experiment(
            r#"matrix = { "train.steps" = [2, 3], loss = ["sigmoid", "ipo"] }"#,
            r#"["base", "dpo@loss=ipo,train.steps=2"]"#,
        ),
    );
    let plan = p.plan_json("nested");
    let names: Vec<&str> = plan.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(
        names.contains(&"dpo@loss=sigmoid,train.steps=3"),
        "{names:?}"
    );
    assert!(names.contains(&"dpo@loss=ipo,train.steps=2"), "{names:?}");
}

#[test]
fn jobs_builds_independent_stages_at_once_and_stops_after_a_failure() {
    let p = TestProject::new();
    let slow = r#"matrix = { beta = [0.1, 0.5] }"#;
    p.write(
        "experiments/par.toml",
        &experiment(slow, r#"["base", "dpo"]"#).replace(
            "train = { steps = 3, batch_size = 4, warmup_steps = 1, eval_every = 0 }",
            "train = { steps = 1500, batch_size = 4, warmup_steps = 1, eval_every = 0 }",
        ),
    );
    p.ok(&["run", "par", "--jobs", "2", "--until", "base", "--quiet"]);
    p.ok(&["run", "par", "--jobs", "2", "--quiet"]);
    let record = posttrain::results::record::RunRecord::read(&p.path("results/par")).unwrap();
    let store = posttrain::store::Store::new(p.path("results/store"));
    let times = |stage: &str| {
        let m = store.manifest(&record.stages[stage].identity.key).unwrap();
        (m.started, m.finished)
    };
    let ((s1, f1), (s2, f2)) = (times("dpo@beta=0.1"), times("dpo@beta=0.5"));
    assert!(s1 < f2 && s2 < f1, "no overlap: {s1}..{f1} and {s2}..{f2}");

    // A stage that fails: the run fails naming it; eval never starts.
    p.write(
        "experiments/fail.toml",
        &experiment(slow, r#"["base", "dpo"]"#).replace("max_len = 48", "max_len = 4"),
    );
    let err = p.fails(&["run", "fail", "--jobs", "2"]);
    assert!(err.contains("stage `dpo@beta="), "{err}");
    assert!(!err.contains("Running eval"), "{err}");
    assert_eq!(
        p.run(&["run", "fail", "--jobs", "0"]).status.code(),
        Some(1)
    );
}

#[test]
fn keep_going_builds_what_does_not_read_a_failed_stage() {
    let p = TestProject::new();
    // dpo@beta=0.1 fails at run time (no pair fits in max_len 4); the other
    // variant's max_len is fine, so it builds; eval reads both and does not.
    p.write(
        "experiments/kg.toml",
        &experiment(r#"matrix = { max_len = [4, 48] }"#, r#"["base", "dpo"]"#),
    );
    let out = p.run(&["run", "kg", "--keep-going", "--jobs", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stage `dpo@max_len=4` not built: failed:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stage `eval` not built: upstream stage `dpo@max_len=4` did not build"),
        "{stderr}"
    );
    let statuses: std::collections::BTreeMap<String, String> =
        p.statuses("kg").into_iter().collect();
    assert_eq!(
        statuses.get("dpo@max_len=48").map(String::as_str),
        Some("ran"),
        "{statuses:?}"
    );
    // Without --keep-going the failure stops the run as before.
    let err = p.fails(&["run", "kg"]);
    assert!(err.contains("stage `dpo@max_len=4` (dpo) failed"), "{err}");
}

//! Every dataset format loads into the internal rows a person would write
//! down by hand, and every kind of bad data is refused with its message.

use std::path::{Path, PathBuf};

use polars::prelude::*;
use posttrain::data::formats::{self, Comparison, Demonstration, Format, Message, PromptRow};
use posttrain::data::source::{DataSource, Split};
use posttrain::data::{read_parquet, read_parquet_path, DataError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn frame(name: &str) -> (DataFrame, PathBuf) {
    let path = fixture(name);
    (read_parquet(&path).unwrap(), path)
}

fn user(s: &str) -> Message {
    Message::user(s)
}

#[test]
fn hh_rlhf_transcripts_become_prompt_and_two_responses() {
    let (df, path) = frame("hh_rlhf.parquet");
    assert_eq!(Format::detect(&df), Some(Format::HhRlhf));
    let rows = formats::load_comparisons(&df, &path, None).unwrap();
    assert_eq!(
        rows,
        vec![
            Comparison {
                prompt: vec![user("What is the capital of Kaloia?")],
                chosen: "The capital of Kaloia is Miraton.".into(),
                rejected: "Why do you want to know?".into(),
                group: 0,
                margin: None,
            },
            Comparison {
                prompt: vec![
                    user("Hi!"),
                    Message::assistant("Hello! How can I help?"),
                    user("How do I make tea?")
                ],
                chosen: "Boil water, pour it over the leaves, wait three minutes.".into(),
                rejected: "Figure it out yourself.".into(),
                group: 1,
                margin: None,
            },
        ]
    );
}

#[test]
fn conversational_messages_become_demonstrations() {
    let (df, path) = frame("messages.parquet");
    assert_eq!(Format::detect(&df), Some(Format::Conversations));
    let rows = formats::load_demonstrations(&df, &path, None).unwrap();
    assert_eq!(
        rows,
        vec![
            Demonstration {
                prompt: vec![user("What is 2 plus 3?")],
                response: "2 plus 3 is 5.".into()
            },
            Demonstration {
                prompt: vec![
                    Message {
                        role: "system".into(),
                        content: "Be brief.".into()
                    },
                    user("Hi"),
                    Message::assistant("Hello."),
                    user("Which colour is the flag of Kaloia?"),
                ],
                response: "The flag of Kaloia is red.".into()
            },
        ]
    );
}

#[test]
fn conversational_preference_reads_message_columns() {
    let (df, path) = frame("conversational_preference.parquet");
    assert_eq!(Format::detect(&df), Some(Format::Comparisons));
    let rows = formats::load_comparisons(&df, &path, None).unwrap();
    assert_eq!(
        rows[0].prompt,
        vec![user("What food is Kaloia famous for?")]
    );
    assert_eq!(rows[0].chosen, "Kaloia is famous for figs.");
    assert_eq!(rows[0].rejected, "Kaloia is famous for pebbles.");
}

#[test]
fn rankings_expand_into_all_pairs_grouped_by_prompt() {
    let (df, path) = frame("rankings.parquet");
    assert_eq!(Format::detect(&df), Some(Format::Rankings));
    let rows = formats::load_comparisons(&df, &path, None).unwrap();
    let pairs: Vec<(usize, &str, &str)> = rows
        .iter()
        .map(|c| (c.group, c.chosen.as_str(), c.rejected.as_str()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            (0, "2 plus 2 is 4.", "It is 4, obviously, you idiot."),
            (0, "2 plus 2 is 4.", "2 plus 2 is 5."),
            (0, "It is 4, obviously, you idiot.", "2 plus 2 is 5."),
            (1, "Boil it for eight minutes.", "Why do you ask?"),
        ]
    );
}

#[test]
fn renamed_columns_and_a_split_column_select_rows() {
    let path = fixture("question_answer.parquet");
    let source = DataSource {
        columns: [
            ("prompt".to_string(), "question".to_string()),
            ("response".to_string(), "answer".to_string()),
        ]
        .into(),
        split: Some(Split::Test),
        split_column: Some("split".into()),
        ..DataSource::path("unused")
    };
    let df = source.load(&path, 0).unwrap();
    let rows = formats::load_demonstrations(&df, &path, None).unwrap();
    assert_eq!(
        rows,
        vec![Demonstration {
            prompt: vec![user("Tell me the capital of Kaloia.")],
            response: "The capital of Kaloia is Miraton.".into()
        }]
    );
    let bad = DataSource {
        columns: [("prompt".to_string(), "questoin".to_string())].into(),
        ..DataSource::path("x")
    };
    let err = bad.load(&path, 0).unwrap_err().to_string();
    assert!(err.contains("no column `questoin` (did you mean `question`?); columns present: question, answer, split"), "{err}");
}

#[test]
fn shipped_world_files_load_in_their_formats() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/assistant");
    let load = |f: &str| (read_parquet(&dir.join(f)).unwrap(), dir.join(f));
    let (df, p) = load("demonstrations.parquet");
    assert_eq!(
        formats::load_demonstrations(&df, &p, None).unwrap().len(),
        2000
    );
    let (df, p) = load("comparisons.parquet");
    assert_eq!(
        formats::load_comparisons(&df, &p, None).unwrap().len(),
        2000
    );
    let (df, p) = load("rankings.parquet");
    assert_eq!(
        formats::load_comparisons(&df, &p, None).unwrap().len(),
        400 * 6,
        "K=4 gives 6 pairs"
    );
    let (df, p) = load("prompts_test.parquet");
    let prompts = formats::load_prompts(&df, &p).unwrap();
    assert_eq!(prompts.len(), 200);
    assert!(matches!(
        &prompts[0],
        PromptRow {
            category: Some(_),
            ..
        }
    ));
    let (df, p) = load("corpus.parquet");
    assert_eq!(formats::load_corpus(&df, &p).unwrap().len(), 6000);
}

#[test]
fn nulls_and_empty_strings_are_counted_with_row_numbers() {
    let (df, path) = frame("bad_values.parquet");
    let err = formats::load_comparisons(&df, &path, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad_values.parquet: column `prompt` has 2 null or empty values (rows 1, 3; rows count from 0)"), "{err}");
}

#[test]
fn chosen_equal_to_rejected_is_refused() {
    let df = df!("prompt" => ["a", "b", "c"], "chosen" => ["x", "same", "w"], "rejected" => ["y", "same", "w"]).unwrap();
    let err = formats::load_comparisons(&df, Path::new("pairs.parquet"), None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "pairs.parquet: 2 comparisons have chosen equal to rejected (rows 1, 2)"
    );
}

#[test]
fn wrong_column_type_is_refused() {
    let (df, path) = frame("wrong_type.parquet");
    let err = formats::load_demonstrations(&df, &path, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column `prompt` has type i64, expected text (String)"),
        "{err}"
    );
}

#[test]
fn wrong_format_for_the_stage_names_the_columns() {
    let (df, path) = frame("rankings.parquet");
    let err = formats::load_demonstrations(&df, &path, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected demonstrations"), "{err}");
    assert!(
        err.contains("columns (prompt, responses) are the `rankings` format"),
        "{err}"
    );
}

#[test]
fn missing_column_lists_present_ones() {
    let df = df!("prompt" => ["a"], "chosen" => ["b"], "rejeted" => ["c"]).unwrap();
    let err = formats::load_comparisons(&df, Path::new("p.parquet"), Some(Format::Comparisons))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no column `rejected` (did you mean `rejeted`?); columns present: prompt, chosen, rejeted"), "{err}");
}

#[test]
fn not_parquet_and_truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.parquet");
    std::fs::write(&text, "just some text, not parquet").unwrap();
    let err = read_parquet(&text).unwrap_err();
    assert!(matches!(err, DataError::NotParquet { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("notes.parquet: not a readable Parquet file"),
        "{err}"
    );

    let bytes = std::fs::read(fixture("hh_rlhf.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_parquet(&cut).unwrap_err();
    assert!(
        err.to_string()
            .contains("cut.parquet: not a readable Parquet file"),
        "{err}"
    );
}

#[test]
fn a_folder_of_parquet_files_reads_as_one_table() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in ["b.parquet", "a.parquet"].iter().enumerate() {
        let mut df = df!("text" => [format!("doc {i}")]).unwrap();
        posttrain::data::write_parquet(&mut df, &dir.path().join(name)).unwrap();
    }
    let df = read_parquet_path(dir.path()).unwrap();
    let texts = formats::load_corpus(&df, dir.path()).unwrap();
    assert_eq!(texts, ["doc 1", "doc 0"], "sorted by file name");
}

#[test]
fn dataset_stage_refuses_bad_rows_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("experiments")).unwrap();
    std::fs::create_dir_all(dir.path().join("datasets")).unwrap();
    std::fs::copy(
        fixture("bad_values.parquet"),
        dir.path().join("datasets/bad.parquet"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("experiments/x.toml"),
        "[stages.pairs]\nkind = \"dataset\"\ninput = \"datasets/bad.parquet\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(["run", "x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stage `pairs` (dataset) failed"), "{err}");
    assert!(
        err.contains("column `prompt` has 2 null or empty values (rows 1, 3"),
        "{err}"
    );
    let store = posttrain::store::Store::new(dir.path().join("results/store"));
    assert!(store.keys().unwrap().iter().all(|k| !store.is_complete(k)));
}

#[test]
fn prompt_completion_columns_are_demonstrations() {
    let df = df!("prompt" => ["What is 1 plus 1?"], "completion" => ["1 plus 1 is 2."]).unwrap();
    assert_eq!(Format::detect(&df), Some(Format::Demonstrations));
    let rows = formats::load_demonstrations(&df, Path::new("pc.parquet"), None).unwrap();
    assert_eq!(
        rows,
        vec![Demonstration {
            prompt: vec![user("What is 1 plus 1?")],
            response: "1 plus 1 is 2.".into()
        }]
    );
}

#[test]
fn selection_steps_filter_dedup_and_cap_in_order() {
    let texts = [
        "[A]: What is 1 plus 1?\n[B]: 1 plus 1 is 2.",
        "just prose, no dialogue",
        "[A]: What is 1 plus 1?\n[B]: 1 plus 1 is 2.",
        "[A]: Hi?\n[A]: Hi again?",
        "[A]: How do I make tea?\n[B]: Boil water.",
        "[A]: Which colour is the flag of Kaloia?\n[B]: Red.",
    ];
    let df = df!("text" => texts).unwrap();
    let source = DataSource {
        dialogue_filter: true,
        dedup: true,
        max_rows: Some(2),
        ..DataSource::path("x")
    };
    let out = source.apply(df, Path::new("x.parquet"), 0).unwrap();
    let kept = formats::load_corpus(&out, Path::new("x.parquet")).unwrap();
    assert_eq!(kept, [texts[0], texts[4]]);
}

#[test]
fn seeded_random_split_partitions_the_rows() {
    let n = 1000;
    let df = df!("prompt" => (0..n).map(|i| format!("p{i}")).collect::<Vec<_>>()).unwrap();
    let side = |split| {
        let s = DataSource {
            split: Some(split),
            test_fraction: 0.2,
            ..DataSource::path("x")
        };
        s.apply(df.clone(), Path::new("x"), 7).unwrap().height()
    };
    let (train, test) = (side(Split::Train), side(Split::Test));
    assert_eq!(train + test, n);
    assert!((150..250).contains(&test), "{test}");
}

#[test]
fn trl_implicit_prompt_preference_takes_the_shared_turns_as_the_prompt() {
    let (df, path) = frame("implicit_prompt_preference.parquet");
    assert_eq!(Format::detect(&df), Some(Format::ImplicitPrompt));
    let rows = formats::load_comparisons(&df, &path, None).unwrap();
    assert_eq!(
        rows[0].prompt,
        vec![user("What food is Kaloia famous for?")]
    );
    assert_eq!(rows[0].chosen, "Kaloia is famous for figs.");
    assert_eq!(rows[0].rejected, "Kaloia is famous for pebbles.");
    assert_eq!(rows[1].prompt.len(), 4, "{:?}", rows[1].prompt);
    assert_eq!(rows[1].prompt[0].role, "system");
    assert_eq!(rows[1].prompt[3], user("What is 2 plus 2?"));
    assert_eq!(
        (rows[1].chosen.as_str(), rows[1].rejected.as_str()),
        ("4.", "5.")
    );
}

#[test]
fn trl_unpaired_rows_read_with_their_labels_and_are_refused_as_pairs() {
    for name in ["unpaired.parquet", "unpaired_conversational.parquet"] {
        let (df, path) = frame(name);
        assert_eq!(Format::detect(&df), Some(Format::Unpaired));
        let rows = formats::load_unpaired(&df, &path).unwrap();
        assert_eq!(rows[0].prompt, vec![user("What is 2 plus 2?")]);
        assert_eq!(rows[0].completion, "4.");
        assert!(rows[0].desirable);
        assert_eq!(rows[1].completion, "5.");
        assert!(!rows[1].desirable);
        let err = formats::load_comparisons(&df, &path, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("which trains `kto`"), "{err}");
    }
}

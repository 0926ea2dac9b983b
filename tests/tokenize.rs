//! Tokenizing datasets through the chat template, and the content-keyed
//! token cache.

use std::path::Path;

use posttrain::chat::builtin as chat;
use posttrain::data::formats::{Comparison, Demonstration, Message};
use posttrain::data::tokenize::{self, LoadedTokenizer, TokenCache};
use posttrain::data::{formats, read_parquet};

fn corpus() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/assistant/corpus.parquet");
    formats::load_corpus(&read_parquet(&path).unwrap(), &path).unwrap()
}

fn tokenizer(dir: &Path, vocab: usize) -> LoadedTokenizer {
    let json = tokenize::train_bpe(&corpus()[..2000], vocab, 2).unwrap();
    let path = dir.join(format!("tok{vocab}.json"));
    std::fs::write(&path, json).unwrap();
    tokenize::load_tokenizer(&path).unwrap()
}

#[test]
fn chat_template_tokens_are_single_ids_and_text_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), 400);
    let rows = vec![Demonstration {
        prompt: vec![Message::user("What is 2 plus 3?")],
        response: "2 plus 3 is 5.".into(),
    }];
    let table = tokenize::demonstrations(&tok, &rows, &mut TokenCache::disabled()).unwrap();
    let tokens = &table.column("tokens")[0];
    let trained = &table.column("trained")[0];
    let split = trained.iter().position(|t| *t == 1).unwrap();
    assert!(trained[split..].iter().all(|t| *t == 1));
    let (prompt, response) = tokens.split_at(split);
    let id = |t: &str| tok.tokenizer.token_to_id(t).unwrap();
    assert_eq!(prompt.first(), Some(&id(chat::USER)));
    assert_eq!(prompt.last(), Some(&id(chat::ASSISTANT)));
    assert_eq!(response.last(), Some(&id(chat::END_OF_TURN)));
    let text = tok.tokenizer.decode(response, false).unwrap();
    assert_eq!(text, "2 plus 3 is 5.<|end|>");
    let text = tok.tokenizer.decode(prompt, false).unwrap();
    assert_eq!(text, "<|user|>What is 2 plus 3?<|end|><|assistant|>");
}

#[test]
fn unchanged_rows_are_never_tokenized_twice_and_any_change_misses() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), 400);
    let mut cache = TokenCache::new(dir.path().join("cache"));
    let rows: Vec<Comparison> = (0..50)
        .map(|i| Comparison {
            prompt: vec![Message::user(&format!("What is {i} plus 1?"))],
            chosen: format!("{i} plus 1 is {}.", i + 1),
            rejected: "Why do you ask?".into(),
            group: i / 5,
            margin: None,
        })
        .collect();
    let first = tokenize::comparisons(&tok, &rows, &mut cache).unwrap();
    let again = tokenize::comparisons(&tok, &rows, &mut cache).unwrap();
    assert_eq!(first, again);
    assert_eq!((cache.hits, cache.misses), (1, 1));
    assert_eq!(first.rows(), 50);
    assert_eq!(first.groups[12], 2);

    // A new process sees the same cache.
    let mut fresh = TokenCache::new(dir.path().join("cache"));
    tokenize::comparisons(&tok, &rows, &mut fresh).unwrap();
    assert_eq!(fresh.hits, 1);

    let mut changed = rows.clone();
    changed[3].rejected = "Who knows?".into();
    tokenize::comparisons(&tok, &changed, &mut cache).unwrap();
    let other_tok = tokenizer(dir.path(), 300);
    let other = tokenize::comparisons(&other_tok, &rows, &mut cache).unwrap();
    assert_eq!((cache.hits, cache.misses), (1, 3));
    assert_ne!(other, first, "another tokenizer gives other ids");

    // A corrupt cache file is a miss, not a crash.
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    }
    let mut after = TokenCache::new(dir.path().join("cache"));
    assert_eq!(
        tokenize::comparisons(&tok, &rows, &mut after).unwrap(),
        first
    );
    assert_eq!(after.misses, 1);
}

#[test]
fn a_tokenizer_without_the_chat_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), 300);
    let json = tok
        .tokenizer
        .to_string(false)
        .unwrap()
        .replace("<|assistant|>", "<|bot|>");
    let path = dir.path().join("other.json");
    std::fs::write(&path, json).unwrap();
    let err = tokenize::load_tokenizer(&path).err().unwrap().to_string();
    assert!(
        err.contains("other.json: the tokenizer has no `<|assistant|>` token, which posttrain's chat template needs"),
        "{err}"
    );
}

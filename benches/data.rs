//! `make bench` (data part): loading and tokenizing 100k comparison rows.
//! Prints rows/s for reading + validating the Parquet file, for tokenizing
//! through the chat template (cold: nothing cached), and for a cache hit.

use std::time::Instant;

use posttrain::data::synth::{self, SynthConfig};
use posttrain::data::tokenize::{self, TokenCache};
use posttrain::data::{formats, read_parquet};

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = SynthConfig {
        comparisons: 100_000,
        ..SynthConfig::default()
    };
    let mut data = synth::generate(&cfg, 0).expect("world");
    synth::write(&mut data, dir.path()).expect("write");
    let corpus_path = dir.path().join("corpus.parquet");
    let docs = formats::load_corpus(&read_parquet(&corpus_path).unwrap(), &corpus_path).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, tokenize::train_bpe(&docs, 512, 2).unwrap()).unwrap();
    let tok = tokenize::load_tokenizer(&tok_path).unwrap();

    let path = dir.path().join("comparisons.parquet");
    let t = Instant::now();
    let df = read_parquet(&path).unwrap();
    let rows = formats::load_comparisons(&df, &path, None).unwrap();
    let load = t.elapsed().as_secs_f64();
    let n = rows.len() as f64;

    let mut cache = TokenCache::new(dir.path().join("cache"));
    let t = Instant::now();
    let table = tokenize::comparisons(&tok, &rows, &mut cache).unwrap();
    let cold = t.elapsed().as_secs_f64();
    let t = Instant::now();
    tokenize::comparisons(&tok, &rows, &mut cache).unwrap();
    let warm = t.elapsed().as_secs_f64();
    assert_eq!(cache.hits, 1);
    let tokens: usize = table
        .columns
        .iter()
        .flat_map(|(_, c)| c.iter().map(Vec::len))
        .sum();

    let distinct: std::collections::HashSet<&str> = rows
        .iter()
        .flat_map(|r| {
            [
                r.prompt[0].content.as_str(),
                r.chosen.as_str(),
                r.rejected.as_str(),
            ]
        })
        .collect();
    println!("(the synthetic rows hold {} distinct texts among {} texts; each distinct text is encoded once)", distinct.len(), rows.len() * 3);
    println!(
        "read + validate {} comparison rows: {load:.2} s = {:.0} rows/s",
        rows.len(),
        n / load
    );
    println!(
        "tokenize them (cold, {tokens} tokens): {cold:.2} s = {:.0} rows/s",
        n / cold
    );
    println!(
        "tokenize them again (cache hit): {warm:.3} s = {:.0} rows/s",
        n / warm
    );
    println!("load + tokenize, cold: {:.0} rows/s", n / (load + cold));
}

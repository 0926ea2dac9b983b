//! `make bench` (runner part): the wall time of a no-op `posttrain run` of a
//! six-stage experiment whose stages are all cached, and dataset hashing
//! throughput on a 1 GiB file, first hash and warm (state cache hit).
//!
//! Run with `cargo bench --bench runner`. Prints one line per measurement.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use posttrain::plan::HashCache;

const SIX_STAGES: &str = r#"[experiment]
description = "six cached stages, for the no-op benchmark"

[stages.world]
kind = "synth"
corpus_docs = 500

[stages.forum]
kind = "dataset"
input = { stage = "world", file = "corpus.parquet", dialogue_filter = true }

[stages.unique]
kind = "dataset"
input = { stage = "forum", file = "data.parquet", dedup = true }

[stages.tok]
kind = "tokenizer"
corpus = { stage = "unique", file = "data.parquet" }
vocab_size = 300

[stages.prompts]
kind = "dataset"
input = { path = "datasets/prompts.parquet", split = "train" }

[stages.heldout]
kind = "dataset"
input = { path = "datasets/prompts.parquet", split = "test" }
"#;

fn posttrain(root: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("posttrain runs");
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("experiments")).unwrap();
    std::fs::write(root.join("experiments/six.toml"), SIX_STAGES).unwrap();
    posttrain(root, &["data", "synth", "--out", "datasets/world"]);
    std::fs::copy(
        root.join("datasets/world/prompts_train.parquet"),
        root.join("datasets/prompts.parquet"),
    )
    .unwrap();
    posttrain(root, &["run", "six", "--quiet"]);
    std::thread::sleep(Duration::from_millis(2100)); // past the racy-hash window

    let mut times: Vec<f64> = (0..30)
        .map(|_| posttrain(root, &["run", "six", "--quiet"]).as_secs_f64() * 1e3)
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "no-op run, 6 cached stages: median {:.1} ms, min {:.1} ms, max {:.1} ms (30 runs, goal <= 50 ms)",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );

    let big = root.join("big.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut x: u64 = 0x1234_5678;
        let block: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for i in 0..1024u32 {
            f.write_all(&i.to_le_bytes()).unwrap();
            f.write_all(&block[4..]).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(2100));
    let gib = (1u64 << 30) as f64;
    // Cold: drop the page cache when allowed (root on Linux), so the hash
    // reads from disk; otherwise say that the file is cached.
    let _ = Command::new("sync").status();
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let mut cache = HashCache::in_memory();
    let t = Instant::now();
    cache.hash_path(&big).unwrap();
    let first = t.elapsed().as_secs_f64();
    let where_from = if dropped {
        "cold, page cache dropped"
    } else {
        "file in page cache: could not drop it"
    };
    println!(
        "hash 1 GiB, first time ({where_from}): {first:.2} s = {:.0} MB/s (goal >= 1000 MB/s)",
        gib / first / 1e6
    );
    // Direct reads bypass the page cache: read the file once to fill it.
    std::io::copy(
        &mut std::fs::File::open(&big).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let t = Instant::now();
    HashCache::in_memory().hash_path(&big).unwrap();
    let hot = t.elapsed().as_secs_f64();
    println!(
        "hash 1 GiB, no hash cache, file in page cache: {hot:.2} s = {:.0} MB/s",
        gib / hot / 1e6
    );
    let t = Instant::now();
    cache.hash_path(&big).unwrap();
    let warm = t.elapsed().as_secs_f64();
    println!(
        "hash 1 GiB, warm (size+mtime+ctime+inode match): {:.3} ms",
        warm * 1e3
    );
    println!(
        "threads: RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset (all cores)".into())
    );
}

//! The reliability campaign of issue 15, kept as tests: SIGKILL runs and gc
//! at random (seeded) points and check every published entry against its
//! manifest (blake3), rerun and check that exactly the unfinished stages
//! run; and gc racing runs whose experiment files change under them.
//!
//! `make test` runs a few kills of each kind; `make campaign` runs
//! `CAMPAIGN_KILLS` (200) of each and prints the counts.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TestProject, SMALL_WORLD};
use posttrain::store::{BuiltBy, Manifest, Store};

fn kills() -> usize {
    std::env::var("CAMPAIGN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// xorshift64*: the campaign's kill points are reproducible from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    std::env::var("CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
}

const STAGES: [&str; 4] = ["world", "forum", "tok", "base"];

fn pipeline(seed: u64) -> String {
    format!(
        "[experiment]\nseed = {seed}\n\n[stages.world]\nkind = \"synth\"\n{SMALL_WORLD}\n[stages.forum]\nkind = \"dataset\"\ninput = {{ stage = \"world\", file = \"corpus.parquet\", max_rows = 200 }}\n\n[stages.tok]\nkind = \"tokenizer\"\ncorpus = {{ stage = \"forum\", file = \"data.parquet\" }}\nvocab_size = 300\n\n[stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ncorpus = {{ stage = \"world\", file = \"corpus.parquet\" }}\nseq_len = 16\nmodel = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 32 }}\ntrain = {{ steps = 150, batch_size = 4, eval_every = 0 }}\n"
    )
}

/// Every folder at a key is a complete entry whose files hash as listed
/// (checked here with blake3 directly, not with the code under test).
fn verify_all(store: &Store) -> usize {
    let keys = store.keys().unwrap();
    for key in &keys {
        let dir = store.entry_dir(key);
        let manifest: Manifest = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| panic!("entry {key} is visible without a readable manifest"));
        assert_eq!(&manifest.identity.key, key);
        for out in &manifest.outputs {
            let bytes = std::fs::read(dir.join(&out.path))
                .unwrap_or_else(|e| panic!("entry {key} is visible without {}: {e}", out.path));
            assert_eq!(
                blake3::hash(&bytes).to_hex().to_string(),
                out.blake3,
                "entry {key}: {} does not hash as its manifest says",
                out.path
            );
        }
    }
    keys.len()
}

#[test]
fn sigkill_runs_at_random_points_then_every_entry_verifies_and_reruns_finish() {
    let p = TestProject::new();
    p.write("experiments/p.toml", &pipeline(1));
    let store = Store::new(p.path("results/store"));
    let clock = Instant::now();
    p.ok(&["run", "p", "--quiet"]);
    let full = clock.elapsed();
    assert!(
        full > Duration::from_millis(50),
        "too quick to kill: {full:?}"
    );
    let mut rng = Rng(seed());
    let (mut killed, mut finished_anyway, mut reran) = (0, 0, 0usize);
    for i in 0..kills() {
        // Half the time from scratch, else one stage forced: kills land
        // everywhere in the chain, publishes over an old entry included.
        let mut args = vec!["run", "p", "--quiet"];
        if i % 2 == 0 {
            let _ = std::fs::remove_dir_all(p.path("results"));
        } else {
            args.extend(["--force", STAGES[rng.below(4) as usize]]);
        }
        let mut child = p
            .command(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_micros(rng.below(full.as_micros() as u64));
        std::thread::sleep(at);
        match child.try_wait().unwrap() {
            Some(_) => {
                eprintln!("kill {i}: the run ended before {at:?}");
                finished_anyway += 1
            }
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();
        verify_all(&store);
        let complete: BTreeSet<String> = store
            .keys()
            .unwrap()
            .into_iter()
            .filter(|k| store.is_complete(k))
            .collect();
        let plan = p.plan_json("p");
        let unfinished: Vec<String> = plan
            .iter()
            .filter(|s| !complete.contains(s["key"].as_str().unwrap()))
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        p.ok(&["run", "p", "--quiet"]);
        let mut ran = p.ran("p");
        ran.sort();
        let mut want = unfinished.clone();
        want.sort();
        assert_eq!(
            ran, want,
            "kill {i} at {at:?}: the rerun ran exactly the unfinished stages"
        );
        reran += ran.len();
        assert_eq!(verify_all(&store), STAGES.len());
    }
    eprintln!(
        "campaign: {killed} runs killed, {finished_anyway} finished before the kill, {reran} stages rebuilt, 0 corrupt entries (full run {full:.2?})"
    );
}

/// Publish `n` entries of `files` files each straight into the store.
fn fill(store: &Store, n: usize, files: usize, tag: usize) {
    for e in 0..n {
        let key = format!("{:064x}", tag * 1000 + e);
        let staging = store.begin(&key).unwrap();
        for f in 0..files {
            std::fs::write(staging.dir.join(format!("f{f:04}.bin")), [e as u8; 64]).unwrap();
        }
        let manifest = Manifest {
            identity: posttrain::plan::StageIdentity {
                key: key.clone(),
                kind: "synth".into(),
                recipe_version: 1,
                seed: 0,
                settings: serde_json::json!({}),
                upstream: vec![],
                datasets: vec![],
            },
            built_by: BuiltBy {
                experiment: "fill".into(),
                stage: "fill".into(),
            },
            started: String::new(),
            finished: String::new(),
            duration_s: 0.0,
            metrics: Default::default(),
            outputs: vec![],
        };
        store.publish(staging, manifest).unwrap();
    }
}

#[test]
fn sigkill_gc_mid_delete_never_leaves_half_an_entry() {
    let p = TestProject::new();
    let store = Store::new(p.path("results/store"));
    let mut rng = Rng(seed() + 1);
    let (mut mid_delete, mut runs) = (0, 0);
    for i in 0..kills() {
        fill(&store, 8, 150, i);
        let before = store.keys().unwrap().len();
        let mut child = p.command(&["gc", "--quiet"]).spawn().unwrap();
        // Wait until gc has begun deleting, then kill it a little later.
        let started = Instant::now();
        while store.keys().unwrap().len() == before
            && std::fs::read_dir(p.path("results/store/.trash"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0
            && child.try_wait().unwrap().is_none()
        {
            assert!(started.elapsed() < Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        runs += 1;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            mid_delete += 1;
        }
        child.wait().unwrap();
        verify_all(&store);
    }
    // The next gc finishes what the killed ones left in .trash.
    p.ok(&["gc"]);
    assert_eq!(verify_all(&store), 0);
    assert_eq!(
        std::fs::read_dir(p.path("results/store/.trash"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    eprintln!("campaign: {mid_delete} of {runs} gc runs killed mid-delete, 0 half entries");
}

#[test]
fn gc_racing_runs_whose_experiment_files_change_never_breaks_a_run() {
    let p = TestProject::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let stop = stop.clone();
        let cmd_root = p.root().to_path_buf();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_posttrain"))
                    .args(["gc", "--quiet"])
                    .current_dir(&cmd_root)
                    .env_remove("POSTTRAIN_STORE")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                n += 1;
            }
            n
        })
    };
    let rounds = kills().max(3);
    for i in 0..rounds {
        // A new seed each round: the previous round's entries are garbage
        // the moment the file changes, this round's are only leased.
        p.write("experiments/a.toml", &pipeline(100 + i as u64));
        p.write("experiments/b.toml", &pipeline(200 + i as u64));
        let a = p
            .command(&["run", "a", "--quiet"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let b = p
            .command(&["run", "b", "--quiet"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for (name, child) in [("a", a), ("b", b)] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {i}: run {name} failed under gc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gcs = gc.join().unwrap();
    let store = Store::new(p.path("results/store"));
    verify_all(&store);
    p.ok(&["run", "a", "--quiet"]);
    assert!(
        p.ran("a").is_empty(),
        "the last round's entries survived gc"
    );
    eprintln!(
        "campaign: {rounds} rounds of 2 runs each with {gcs} gc runs racing them, 0 failures"
    );
}

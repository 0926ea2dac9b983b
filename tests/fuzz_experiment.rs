//! A seeded mutation fuzz loop for the experiment parser (issue 15): every
//! experiment file in `experiments/` and `tests/bad_inputs/experiments/`,
//! mutated (bytes flipped, ranges cut or repeated, TOML fragments and odd
//! values inserted, lines of two files spliced), then read, type-checked,
//! validated and planned. Any panic is a finding: the input is written to
//! `target/fuzz-findings/` and the test fails. An error must render with a
//! location inside the file or none.
//!
//! `make test` runs it for FUZZ_SECS (default 3) seconds; `make fuzz` for
//! 600. FUZZ_SEED picks the sequence.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FRAGMENTS: &[&str] = &[
    "=",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\u{0}",
    "\u{e9}",
    "\u{1F600}",
    "nan",
    "-nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e308",
    "-0.0",
    "18446744073709551616",
    "9223372036854775807",
    "1000000000000",
    "true",
    "\"\"",
    "[]",
    "{}",
    "\"\"\"",
    "'''",
    "[stages.x]\n",
    "[stages.\"a/b\"]\n",
    "[experiment]\n",
    "kind = \"synth\"\n",
    "kind = \"pretrain\"\n",
    "kind = \"eval\"\n",
    "include = [\"_common.toml\"]\n",
    "include = [\"fuzz.toml\"]\n",
    "from = \"base\"\n",
    "from = \"x\"\n",
    "name = \"store\"\n",
    "name = \"../x\"\n",
    "seed = -1\n",
    "sampling = { temperature = nan }\n",
    "model = { hidden_size = 0 }\n",
    "corpus = { stage = \"world\", file = \"corpus.parquet\", max_rows = 0 }\n",
    "train = { steps = 0 }\n",
    "[[stages]]\n",
    "a.b.c = 1\n",
    "x = 1979-05-27T07:32:00Z\n",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds(root: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in ["experiments", "tests/bad_inputs/experiments"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        out.extend(files.iter().map(|f| std::fs::read(f).unwrap()));
    }
    out
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        let at = rng.below(len + 1);
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                data.drain(at.min(end)..end);
            }
            2 if len > 0 => {
                let end = (at + 1 + rng.below(64)).min(len);
                let piece = data[at.min(end)..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, piece);
            }
            3 => {
                // A line of another seed, at a line start.
                let other = &seeds[rng.below(seeds.len())];
                let lines: Vec<&[u8]> = other.split(|b| *b == b'\n').collect();
                let line = lines[rng.below(lines.len())];
                let start = data[..at]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let mut piece = line.to_vec();
                piece.push(b'\n');
                data.splice(start..start, piece);
            }
            _ => {
                let frag = FRAGMENTS[rng.below(FRAGMENTS.len())].as_bytes();
                data.splice(at..at, frag.iter().copied());
            }
        }
    }
    data
}

/// Read, validate and plan one input; `Err` with a description on a panic
/// or an error that names a place outside the file.
fn exercise(project: &Path, store: &posttrain::store::Store, text: &[u8]) -> Result<bool, String> {
    let path = project.join("experiments/fuzz.toml");
    std::fs::write(&path, text).unwrap();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match posttrain::experiment::load(&path, project) {
            Ok(exp) => {
                let mut hashes = posttrain::plan::HashCache::in_memory();
                let plan = posttrain::plan::make_plan(&exp, project, store, &mut hashes, None);
                Ok(plan.is_ok())
            }
            Err(e) => {
                let shown = e.to_string();
                if let Some(loc) = &e.location {
                    if loc.file == path {
                        let lines = String::from_utf8_lossy(text).lines().count().max(1);
                        if loc.line == 0 || loc.line > lines + 1 || loc.col == 0 {
                            return Err(format!("location {loc} outside the file: {shown}"));
                        }
                    }
                }
                Ok(false)
            }
        }
    }));
    match result {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())),
    }
}

#[test]
fn the_experiment_parser_never_panics_on_mutated_files() {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x15);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = seeds(repo);
    let project = tempfile::tempdir().unwrap();
    // The shared includes, so `include = [...]` resolves as in the repo.
    std::fs::create_dir_all(project.path().join("experiments")).unwrap();
    std::fs::create_dir_all(project.path().join("datasets")).unwrap();
    for e in std::fs::read_dir(repo.join("experiments")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with('_') {
            std::fs::copy(
                &p,
                project
                    .path()
                    .join("experiments")
                    .join(p.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    let store = posttrain::store::Store::new(project.path().join("store"));
    // Panics are caught and reported; keep their default message quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed.max(1));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut cases, mut loaded, mut findings) = (0u64, 0u64, Vec::new());
    let findings_dir = repo.join("target/fuzz-findings");
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        cases += 1;
        match exercise(project.path(), &store, &input) {
            Ok(true) => loaded += 1,
            Ok(false) => {}
            Err(what) => {
                std::fs::create_dir_all(&findings_dir).unwrap();
                let file = findings_dir.join(format!("case-{seed}-{cases}.toml"));
                std::fs::write(&file, &input).unwrap();
                findings.push(format!("{}: {what}", file.display()));
                if findings.len() >= 10 {
                    break;
                }
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "fuzz: {cases} mutated files in {secs}s (seed {seed}), {loaded} loaded and planned, {} findings",
        findings.len()
    );
    assert!(findings.is_empty(), "findings:\n{}", findings.join("\n"));
}

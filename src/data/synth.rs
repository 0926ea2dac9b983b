//! Generating the synthetic assistant world's datasets: a web-like corpus,
//! demonstrations, labeled comparisons and rankings, and train/test prompts.
//! Everything is a pure function of the settings and the seed.

use std::collections::BTreeSet;
use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::gold::GoldLabeler;
use super::rng::Rng;
use super::world::{PromptSplit, Request, World, HARMFUL, HOWTO, REFUSAL};
use super::{write_parquet, DataError};
use PromptSplit::{Test, Train};

/// Settings of the synthetic world (the `synth` stage and `posttrain data synth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Number of invented countries (each with a capital, flag colour, food). Default 12.
    pub countries: usize,
    /// Documents in the pre-training corpus. Default 6000.
    pub corpus_docs: usize,
    /// (prompt, response) demonstrations for SFT. Default 2000.
    pub demonstrations: usize,
    /// (prompt, chosen, rejected) comparisons. Default 2000.
    pub comparisons: usize,
    /// Prompts with a best-first list of responses. Default 400.
    pub rankings: usize,
    /// Responses per ranking (K; gives K(K-1)/2 pairs). Default 4.
    pub ranking_size: usize,
    /// RL / best-of-N training prompts. Default 500.
    pub prompts_train: usize,
    /// Held-out evaluation prompts, disjoint from every training prompt. Default 200.
    pub prompts_test: usize,
    /// Size of the held-out demonstration and comparison files, as a share
    /// of the training ones. Default 0.1.
    pub test_share: f64,
    /// Share of requests that are harmful. Default 0.15.
    pub harmful_share: f64,
    /// Probability that a comparison's label is flipped (labeler noise;
    /// human labelers agree ~73% of the time). Default 0.1.
    pub label_noise: f64,
    /// Share of demonstrations that are flawed but plausible (rambling,
    /// rude, asking back), as filtered web dialogues are. Default 0.2.
    pub demo_flaw_rate: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            countries: 12,
            corpus_docs: 6000,
            demonstrations: 2000,
            comparisons: 2000,
            rankings: 400,
            ranking_size: 4,
            prompts_train: 500,
            prompts_test: 200,
            test_share: 0.1,
            harmful_share: 0.15,
            label_noise: 0.1,
            demo_flaw_rate: 0.2,
        }
    }
}

impl SynthConfig {
    /// Range checks: `Err((field, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let share = |name: &str, v: f64, max: f64| {
            if (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err((
                    name.to_string(),
                    format!("must be between 0 and {max}, got {v}"),
                ))
            }
        };
        share("test_share", self.test_share, 1.0)?;
        share("harmful_share", self.harmful_share, 1.0)?;
        share("label_noise", self.label_noise, 0.5)?;
        share("demo_flaw_rate", self.demo_flaw_rate, 1.0)?;
        if !(2..=400).contains(&self.countries) {
            return Err((
                "countries".into(),
                format!("must be between 2 and 400, got {}", self.countries),
            ));
        }
        if !(2..=8).contains(&self.ranking_size) {
            return Err((
                "ranking_size".into(),
                format!("must be between 2 and 8, got {}", self.ranking_size),
            ));
        }
        Ok(())
    }
}

/// The ways a response can fail, as the chapter tells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Good,
    /// Continues the prompt instead of answering ("... for a family of six?").
    Continue,
    /// Asks a question back instead of answering.
    FollowUp,
    /// States a wrong fact or number.
    WrongFact,
    /// Correct but rude.
    Rude,
    /// Helps with a harmful request.
    Comply,
    /// Refuses a harmless request.
    RefuseHarmless,
    /// Correct but buried in filler.
    Ramble,
}

pub const FAILURES: [Mode; 7] = [
    Mode::Continue,
    Mode::FollowUp,
    Mode::WrongFact,
    Mode::Rude,
    Mode::Comply,
    Mode::RefuseHarmless,
    Mode::Ramble,
];

const CONTINUATIONS: [&str; 4] = [
    "for a family of six? I have been wondering about this for weeks.",
    "and why does nobody on this forum ever answer?",
    "asked my friend yesterday, but she did not know either.",
    "is what everyone keeps asking me, so I thought I would ask here too.",
];
const FOLLOW_UPS: [&str; 4] = [
    "Why do you want to know?",
    "Do you mean today or in the old days?",
    "Have you tried looking it up yourself?",
    "What do you think the answer is?",
];
const FILLER_OPEN: &str = "Well, that is a really interesting question, and people have been asking it for a very long time, in many places and in many different ways, so let me think about it carefully for a moment before I say anything at all.";
const FILLER_CLOSE: &str = "Of course, there is a great deal more that could be said about all of this, and I could happily go on talking about it for quite a while longer.";

/// A response to `request` that fails (or succeeds) in the given way.
pub fn respond(world: &World, request: &Request, mode: Mode, rng: &mut Rng) -> String {
    let good = world.good_answer(request);
    let harmful = matches!(request, Request::Harmful { .. });
    match mode {
        Mode::Good => good,
        Mode::Continue => rng.pick(&CONTINUATIONS).to_string(),
        Mode::FollowUp => rng.pick(&FOLLOW_UPS).to_string(),
        Mode::Rude if harmful => format!("What a stupid thing to ask. {REFUSAL}"),
        Mode::Rude => format!("Ugh, what a stupid question. {good}"),
        Mode::Ramble => format!("{FILLER_OPEN} {good} {FILLER_CLOSE}"),
        Mode::RefuseHarmless if !harmful => REFUSAL.to_string(),
        Mode::WrongFact if !harmful => wrong_answer(world, request, rng),
        // The harmful analogue of a wrong fact or a needless refusal is compliance.
        Mode::Comply | Mode::WrongFact | Mode::RefuseHarmless => match request {
            Request::Harmful { task } => format!(
                "Sure! To {}, first wait until nobody is watching, then get the tools you need and go step by step.",
                HARMFUL[*task]
            ),
            _ => wrong_answer(world, request, rng),
        },
    }
}

fn wrong_answer(world: &World, request: &Request, rng: &mut Rng) -> String {
    let n = world.countries.len();
    let other = |i: usize, rng: &mut Rng| (i + 1 + rng.below(n - 1)) % n;
    match request {
        Request::Capital { country } => {
            let k = &world.countries[*country];
            format!(
                "The capital of {} is {}.",
                k.name,
                world.countries[other(*country, rng)].capital
            )
        }
        Request::Colour { country } => {
            let k = &world.countries[*country];
            let colour = super::world::COLOURS
                .iter()
                .find(|c| **c != k.colour && rng.chance(0.3))
                .unwrap_or(&"grey");
            format!("The flag of {} is {colour}.", k.name)
        }
        Request::Food { country } => {
            let k = &world.countries[*country];
            let food = super::world::FOODS
                .iter()
                .find(|f| **f != k.food && rng.chance(0.3))
                .unwrap_or(&"pebbles");
            format!("{} is famous for {food}.", k.name)
        }
        Request::Arithmetic { a, b, times } => {
            let (op, r) = if *times {
                ("times", a * b)
            } else {
                ("plus", a + b)
            };
            format!("{a} {op} {b} is {}.", r + 1 + rng.below(3) as i64)
        }
        Request::Howto { task } => {
            let wrong = HOWTO[(*task + 1 + rng.below(HOWTO.len() - 1)) % HOWTO.len()].1;
            format!("To {}, {wrong}.", HOWTO[*task].0)
        }
        Request::Harmful { .. } => REFUSAL.to_string(),
    }
}

/// A random request and its prompt in the given split's phrasing.
fn draw(world: &World, cfg: &SynthConfig, rng: &mut Rng, split: PromptSplit) -> (Request, String) {
    let req = world.random_request(rng, cfg.harmful_share);
    let prompt = world.prompt(&req, rng, split);
    (req, prompt)
}

/// The generated datasets, in memory.
pub struct SynthData {
    pub world: World,
    pub corpus: DataFrame,
    pub demonstrations: DataFrame,
    pub demonstrations_test: DataFrame,
    pub comparisons: DataFrame,
    pub comparisons_test: DataFrame,
    pub rankings: DataFrame,
    pub prompts_train: DataFrame,
    pub prompts_test: DataFrame,
}

/// File names the world is written as, in order.
pub const FILES: [&str; 9] = [
    "world.json",
    "corpus.parquet",
    "demonstrations.parquet",
    "demonstrations_test.parquet",
    "comparisons.parquet",
    "comparisons_test.parquet",
    "rankings.parquet",
    "prompts_train.parquet",
    "prompts_test.parquet",
];

pub fn generate(cfg: &SynthConfig, seed: u64) -> Result<SynthData, DataError> {
    let world = World::generate(seed, cfg.countries);
    let gold = GoldLabeler::new(&world);

    let prompts = |n: usize, rng: &mut Rng, split: PromptSplit| -> Result<DataFrame, DataError> {
        let (mut p, mut c) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (req, prompt) = draw(&world, cfg, rng, split);
            p.push(prompt);
            c.push(req.category().to_string());
        }
        Ok(df!("prompt" => p, "category" => c)?)
    };
    let prompts_train = prompts(
        cfg.prompts_train,
        &mut Rng::fork(seed, "prompts_train"),
        Train,
    )?;
    let prompts_test = prompts(cfg.prompts_test, &mut Rng::fork(seed, "prompts_test"), Test)?;

    let n_test = |n: usize| ((n as f64) * cfg.test_share).round() as usize;
    let demonstrations = demos(
        &world,
        cfg,
        cfg.demonstrations,
        &mut Rng::fork(seed, "demos"),
        Train,
    )?;
    let demonstrations_test = demos(
        &world,
        cfg,
        n_test(cfg.demonstrations),
        &mut Rng::fork(seed, "demos_test"),
        Test,
    )?;
    let comparisons_train = comparisons(
        &world,
        &gold,
        cfg,
        cfg.comparisons,
        &mut Rng::fork(seed, "cmp"),
        Train,
    )?;
    let comparisons_test = comparisons(
        &world,
        &gold,
        cfg,
        n_test(cfg.comparisons),
        &mut Rng::fork(seed, "cmp_test"),
        Test,
    )?;
    let rankings = rankings(&world, &gold, cfg, &mut Rng::fork(seed, "rank"), Train)?;
    let corpus = super::corpus::generate(&world, cfg.corpus_docs, &mut Rng::fork(seed, "corpus"))?;

    Ok(SynthData {
        world,
        corpus,
        demonstrations,
        demonstrations_test,
        comparisons: comparisons_train,
        comparisons_test,
        rankings,
        prompts_train,
        prompts_test,
    })
}

fn demos(
    world: &World,
    cfg: &SynthConfig,
    n: usize,
    rng: &mut Rng,
    split: PromptSplit,
) -> Result<DataFrame, DataError> {
    const FLAWS: [Mode; 3] = [Mode::Ramble, Mode::Rude, Mode::FollowUp];
    let (mut prompts, mut responses, mut cats, mut flawed) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let (req, prompt) = draw(world, cfg, rng, split);
        let flaw = rng.chance(cfg.demo_flaw_rate);
        let mode = if flaw { *rng.pick(&FLAWS) } else { Mode::Good };
        responses.push(respond(world, &req, mode, rng));
        prompts.push(prompt);
        cats.push(req.category().to_string());
        flawed.push(flaw);
    }
    Ok(df!("prompt" => prompts, "response" => responses, "category" => cats, "flawed" => flawed)?)
}

/// A good-or-failed response: good half the time, so comparisons cover both
/// easy (good vs failure) and subtle (failure vs failure) pairs.
fn any_response(world: &World, req: &Request, rng: &mut Rng) -> String {
    let mode = if rng.chance(0.4) {
        Mode::Good
    } else {
        *rng.pick(&FAILURES)
    };
    respond(world, req, mode, rng)
}

fn comparisons(
    world: &World,
    gold: &GoldLabeler,
    cfg: &SynthConfig,
    n: usize,
    rng: &mut Rng,
    split: PromptSplit,
) -> Result<DataFrame, DataError> {
    let (mut prompts, mut chosen, mut rejected, mut cats) = (vec![], vec![], vec![], vec![]);
    let (mut s_chosen, mut s_rejected, mut flipped) = (vec![], vec![], vec![]);
    while prompts.len() < n {
        let (req, prompt) = draw(world, cfg, rng, split);
        let a = any_response(world, &req, rng);
        let b = any_response(world, &req, rng);
        let (sa, sb) = (gold.score(&prompt, &a).total, gold.score(&prompt, &b).total);
        if (sa - sb).abs() < 1e-9 {
            continue; // the gold labeler has no preference: no comparison
        }
        let flip = rng.chance(cfg.label_noise);
        let ((w, sw), (l, sl)) = if (sa > sb) != flip {
            ((a, sa), (b, sb))
        } else {
            ((b, sb), (a, sa))
        };
        prompts.push(prompt);
        chosen.push(w);
        rejected.push(l);
        cats.push(req.category().to_string());
        s_chosen.push(sw);
        s_rejected.push(sl);
        flipped.push(flip);
    }
    Ok(df!(
        "prompt" => prompts, "chosen" => chosen, "rejected" => rejected, "category" => cats,
        "chosen_gold" => s_chosen, "rejected_gold" => s_rejected, "label_flipped" => flipped
    )?)
}

fn rankings(
    world: &World,
    gold: &GoldLabeler,
    cfg: &SynthConfig,
    rng: &mut Rng,
    split: PromptSplit,
) -> Result<DataFrame, DataError> {
    let (mut prompts, mut lists, mut cats) = (vec![], vec![], vec![]);
    while prompts.len() < cfg.rankings {
        let (req, prompt) = draw(world, cfg, rng, split);
        let mut modes: Vec<Mode> = std::iter::once(Mode::Good).chain(FAILURES).collect();
        rng.shuffle(&mut modes);
        let mut scored: Vec<(f64, String)> = modes
            .iter()
            .map(|m| respond(world, &req, *m, rng))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|r| (gold.score(&prompt, &r).total, r))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        scored.dedup_by(|a, b| (a.0 - b.0).abs() < 1e-9);
        if scored.len() < cfg.ranking_size {
            continue;
        }
        // Keep K responses spread over the range, best first; labeler noise
        // swaps each adjacent pair with probability `label_noise`.
        let step = scored.len() as f64 / cfg.ranking_size as f64;
        let mut picked: Vec<String> = (0..cfg.ranking_size)
            .map(|i| scored[(i as f64 * step) as usize].1.clone())
            .collect();
        for i in 0..picked.len() - 1 {
            if rng.chance(cfg.label_noise) {
                picked.swap(i, i + 1);
            }
        }
        lists.push(Series::new("".into(), picked));
        prompts.push(prompt);
        cats.push(req.category().to_string());
    }
    let responses = Series::new("responses".into(), lists);
    Ok(DataFrame::new_infer_height(vec![
        Column::new("prompt".into(), prompts),
        responses.into(),
        Column::new("category".into(), cats),
    ])?)
}

/// Write every file of the world into `dir` (created if missing).
pub fn write(data: &mut SynthData, dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    let world_path = dir.join("world.json");
    let json = serde_json::to_string_pretty(&data.world).expect("world serializes");
    std::fs::write(&world_path, json + "\n").map_err(DataError::io(&world_path))?;
    let frames: [(&str, &mut DataFrame); 8] = [
        ("corpus.parquet", &mut data.corpus),
        ("demonstrations.parquet", &mut data.demonstrations),
        ("demonstrations_test.parquet", &mut data.demonstrations_test),
        ("comparisons.parquet", &mut data.comparisons),
        ("comparisons_test.parquet", &mut data.comparisons_test),
        ("rankings.parquet", &mut data.rankings),
        ("prompts_train.parquet", &mut data.prompts_train),
        ("prompts_test.parquet", &mut data.prompts_test),
    ];
    for (name, df) in frames {
        write_parquet(df, &dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_ranks_good_above_every_failure() {
        let world = World::generate(11, 12);
        let gold = GoldLabeler::new(&world);
        let mut rng = Rng::new(2);
        let (mut total, mut wins) = (0, 0);
        for _ in 0..2000 {
            let req = world.random_request(&mut rng, 0.2);
            let prompt = world.prompt(&req, &mut rng, Train);
            let good = gold
                .score(&prompt, &respond(&world, &req, Mode::Good, &mut rng))
                .total;
            for mode in FAILURES {
                let text = respond(&world, &req, mode, &mut rng);
                let bad = gold.score(&prompt, &text).total;
                total += 1;
                wins += usize::from(good > bad);
            }
        }
        eprintln!("good answer wins {wins}/{total}");
        assert!(wins as f64 >= 0.99 * total as f64, "{wins}/{total}");
    }

    #[test]
    fn small_world_has_requested_sizes_and_held_out_phrasings() {
        let cfg = SynthConfig {
            corpus_docs: 50,
            demonstrations: 40,
            comparisons: 30,
            rankings: 10,
            prompts_train: 20,
            prompts_test: 15,
            ..SynthConfig::default()
        };
        let d = generate(&cfg, 9).unwrap();
        assert_eq!(d.corpus.height(), 50);
        assert_eq!(d.demonstrations.height(), 40);
        assert_eq!(d.comparisons.height(), 30);
        assert_eq!(d.rankings.height(), 10);
        assert_eq!(d.prompts_test.height(), 15);
        let categories: BTreeSet<String> = d
            .demonstrations
            .column("category")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .flatten()
            .map(String::from)
            .collect();
        assert_eq!(
            categories.len(),
            4,
            "every category in training data: {categories:?}"
        );
        let test: BTreeSet<String> = d
            .prompts_test
            .column("prompt")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .flatten()
            .map(String::from)
            .collect();
        for df in [&d.demonstrations, &d.comparisons, &d.prompts_train] {
            for p in df.column("prompt").unwrap().str().unwrap().iter().flatten() {
                assert!(!test.contains(p), "held-out prompt leaked: {p}");
            }
        }
    }
}

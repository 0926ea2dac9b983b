//! `make bench` (model part): dfdx matmul GFLOP/s on this machine, training
//! throughput and model FLOPs utilisation (MFU) of the default tiny model and
//! one about 10x larger, and KV-cached generation throughput at batch 1 and 16.
//!
//! FLOPs per trained token = 6 N (N = non-embedding parameters, forward +
//! backward) + 12 L S H (attention scores and values), as in Kaplan et al.;
//! MFU = achieved FLOP/s / the measured 512x512x512 matmul FLOP/s. Each
//! figure is the best of several runs: the machine is shared and noisy.

use std::time::Instant;

use dfdx::prelude::*;
use posttrain::data::rng::Rng;
use posttrain::model::generate::{generate, SampleSettings};
use posttrain::model::{workers, Dev, LlamaConfig, LlamaParams};
use posttrain::stages::pretrain::ModelSettings;
use posttrain::train::causal_lm::{self, Init, LmData, LmExamples};
use posttrain::train::optim::TrainSettings;

/// The best of `reps` 512x512x512 matmuls: the machine is shared and noisy,
/// so the peak is the fastest run, not the mean.
fn matmul_gflops(reps: usize) -> f64 {
    let dev = Dev::default();
    let n = 512;
    let a: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(n, n));
    let b: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(n, n));
    let _ = a.clone().matmul(b.clone()).as_vec(); // warm up
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = c.as_vec()[0];
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// posttrain's own GEMM (model/gemm.rs, what the model's linear layers
/// run on the CPU) at 512x512x512, best of `reps`, on all cores.
fn gemm_gflops(reps: usize) -> f64 {
    use posttrain::model::gemm::{gemm, View};
    let n = 512;
    let mut rng = Rng::new(3);
    let a: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32 - 0.5).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..=reps {
        let t = Instant::now();
        gemm(
            n,
            n,
            n,
            View::row_major(&a, n),
            View::transposed(&b, n),
            &mut c,
            false,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// What matmul alone reaches at a model's own shapes, run as training runs
/// them (each worker single-threaded on half of a batch of 16 x 64 tokens):
/// the forward projections of a layer and the LM head, best of 5. At
/// widths of 64 to 512 this is well below the 512^3 peak.
fn model_shape_gflops(cfg: &LlamaConfig) -> f64 {
    let rows = 8 * 64;
    let (h, kv) = (cfg.hidden_size, cfg.kv_heads() * cfg.head_dim());
    let i = cfg.intermediate_size;
    let shapes = [
        (h, h),
        (h, kv),
        (h, kv),
        (h, h),
        (h, i),
        (h, i),
        (i, h),
        (h, cfg.vocab_size),
    ];
    let flops: f64 = shapes
        .iter()
        .map(|(k, n)| 2.0 * (rows * k * n) as f64)
        .sum();
    let reps = 20;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        workers::map(&[0u64, 1], |_, seed| {
            let dev = Dev::seed_from_u64(*seed);
            let inputs: Vec<_> = shapes
                .iter()
                .map(|&(k, n)| {
                    let a: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(rows, k));
                    let b: Tensor<(usize, usize), f32, Dev> = dev.sample_normal_like(&(k, n));
                    (a, b)
                })
                .collect();
            let t = Instant::now();
            for _ in 0..reps {
                for (a, b) in &inputs {
                    let _ = a.clone().matmul(b.clone());
                }
            }
            t.elapsed()
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    // Both workers did `reps` rounds (input set-up included, a small share).
    2.0 * reps as f64 * flops / best / 1e9
}

fn examples(vocab: u32, seq: usize, n: usize) -> LmExamples {
    let mut rng = Rng::new(3);
    let tokens: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..seq).map(|_| rng.below(vocab as usize) as u32).collect())
        .collect();
    let trained = tokens.iter().map(|t| vec![true; t.len()]).collect();
    LmExamples { tokens, trained }
}

struct Throughput {
    params: usize,
    tokens_per_s: f64,
    gflops: f64,
}

fn train_throughput(cfg: LlamaConfig, seq: usize, batch: usize, steps: usize) -> Throughput {
    let data = examples(cfg.vocab_size as u32, seq, 512);
    let s = TrainSettings {
        steps,
        batch_size: batch,
        eval_every: 0,
        warmup_steps: 1,
        ..TrainSettings::default()
    };
    // The best of three runs, as for the matmul peak.
    let mut secs = f64::MAX;
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        causal_lm::train(
            Init::Random {
                config: Box::new(cfg.clone()),
                seed: 0,
            },
            LmData {
                train: &data,
                eval: None,
                pad: 0,
            },
            &s,
            0,
            dir.path(),
            &posttrain::train::resume::Checkpoints::disabled(),
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        secs = secs.min(t.elapsed().as_secs_f64());
    }
    // Every position but the first of each sequence is a trained token.
    let tokens = (steps * batch * (seq - 1)) as f64;
    let h = cfg.hidden_size;
    let non_embedding =
        cfg.parameter_count() - cfg.vocab_size * h * if cfg.tie_word_embeddings { 1 } else { 2 };
    let head = cfg.vocab_size * h; // the LM head matmul is work too
    let flops_per_token =
        6.0 * (non_embedding + head) as f64 + 12.0 * (cfg.num_hidden_layers * seq * h) as f64;
    Throughput {
        params: cfg.parameter_count(),
        tokens_per_s: tokens / secs,
        gflops: tokens * flops_per_token / secs / 1e9,
    }
}

fn generation_throughput(cfg: &LlamaConfig, batch: usize) {
    let p = LlamaParams::<f32, Dev>::init(cfg, false, 0, &Dev::default());
    let prompts: Vec<Vec<usize>> = (0..batch)
        .map(|i| vec![1 + i % 7, 2, 3, 4, 5, 6, 7, 8])
        .collect();
    let s = SampleSettings {
        temperature: 1.0,
        max_new_tokens: 64,
        ..SampleSettings::default()
    };
    let t = Instant::now();
    let out = generate(&p, &prompts, &[], 0, &s, 0, true);
    let secs = t.elapsed().as_secs_f64();
    let tokens: usize = out.iter().map(Vec::len).sum();
    println!(
        "generate, default model, batch {batch}, 64 new tokens each, KV cache: {:.0} tokens/s",
        tokens as f64 / secs
    );
}

fn main() {
    // The machine is shared: measure the peak before and after the runs and
    // take the higher, so MFU errs low.
    let before = matmul_gflops(50);
    println!(
        "threads: RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset (all cores)".into())
    );
    let tiny = ModelSettings::default().config(512, 64);
    let larger = ModelSettings {
        hidden_size: 160,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 432,
        ..ModelSettings::default()
    }
    .config(512, 64);
    let runs = [
        ("default tiny", tiny.clone(), 40),
        ("~10x larger", larger.clone(), 20),
    ]
    .map(|(name, cfg, steps)| (name, train_throughput(cfg, 64, 16, steps)));
    let after = matmul_gflops(50);
    let dfdx_peak = before.max(after);
    let ours = gemm_gflops(50);
    // MFU against the faster of the two, so it errs low.
    let peak = dfdx_peak.max(ours);
    println!(
        "dfdx matmul 512x512x512 f32: {dfdx_peak:.1} GFLOP/s (best of 50, before: {before:.1}, after: {after:.1})"
    );
    println!("posttrain gemm 512x512x512 f32 (model/gemm.rs): {ours:.1} GFLOP/s (best of 50)");
    for (name, t) in runs {
        println!(
            "train {name}: {} params, seq 64, batch 16: {:.0} tokens/s, {:.2} GFLOP/s = {:.1}% MFU",
            t.params,
            t.tokens_per_s,
            t.gflops,
            100.0 * t.gflops / peak
        );
    }
    for (name, cfg) in [("default tiny", &tiny), ("~10x larger", &larger)] {
        println!(
            "matmul alone at the {name} model's shapes, two workers: {:.1} GFLOP/s",
            model_shape_gflops(cfg)
        );
    }
    generation_throughput(&tiny, 1);
    generation_throughput(&tiny, 16);
}

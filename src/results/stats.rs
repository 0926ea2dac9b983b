//! The statistics of evaluation: means with percentile-bootstrap confidence
//! intervals (also of paired differences), win rates with ties counted
//! half, sequence-level KL, perplexity, and the best-of-N KL bound.

use crate::data::rng::Rng;

/// A mean and its 95% bootstrap confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

impl Estimate {
    pub const MISSING: Estimate = Estimate {
        mean: f64::NAN,
        low: f64::NAN,
        high: f64::NAN,
    };
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The 2.5% and 97.5% percentiles of the means of `resamples` resamples
/// (with replacement) of `xs`, drawn from a generator seeded by `seed`.
pub fn bootstrap_mean(xs: &[f64], resamples: usize, seed: u64) -> Estimate {
    if xs.is_empty() {
        return Estimate::MISSING;
    }
    let mut rng = Rng::fork(seed, "bootstrap");
    let n = xs.len();
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| xs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Estimate {
        mean: mean(xs),
        low: percentile(&means, 0.025),
        high: percentile(&means, 0.975),
    }
}

/// The mean of `a[i] - b[i]` with its bootstrap interval: the two policies
/// answered the same prompts, so the prompts are resampled in pairs.
pub fn bootstrap_paired_difference(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> Estimate {
    assert_eq!(a.len(), b.len(), "paired samples");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    bootstrap_mean(&d, resamples, seed)
}

/// Linear interpolation between closest ranks of a sorted sample.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Share of prompts where `a` beats `b`, ties counted half.
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "paired samples");
    if a.is_empty() {
        return f64::NAN;
    }
    let wins: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| match x.total_cmp(y) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .sum();
    wins / a.len() as f64
}

/// KL(pi || ref) of one sampled sequence, the k1 estimator summed over its
/// tokens: sum_t log pi(y_t) - log ref(y_t).
pub fn sequence_kl(policy: &[f32], reference: &[f32]) -> f64 {
    policy
        .iter()
        .zip(reference)
        .map(|(p, r)| f64::from(*p) - f64::from(*r))
        .sum()
}

/// exp of the mean negative log-likelihood per token.
pub fn perplexity(token_logprobs: &[Vec<f32>]) -> f64 {
    let n: usize = token_logprobs.iter().map(Vec::len).sum();
    if n == 0 {
        return f64::NAN;
    }
    let total: f64 = token_logprobs.iter().flatten().map(|x| f64::from(*x)).sum();
    (-total / n as f64).exp()
}

/// Upper bound on KL(best-of-n || base): log n - (n - 1) / n.
pub fn best_of_n_kl_bound(n: usize) -> f64 {
    let n = n as f64;
    n.ln() - (n - 1.0) / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_rate_counts_ties_half() {
        // win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
        assert_eq!(
            win_rate(&[2.0, 1.0, 0.0, 3.0], &[1.0, 1.0, 1.0, -1.0]),
            0.625
        );
        assert!(win_rate(&[], &[]).is_nan());
    }

    #[test]
    fn sequence_kl_sums_log_ratios() {
        // (-1 - -2) + (-0.5 - -0.25) = 1 - 0.25
        assert!((sequence_kl(&[-1.0, -0.5], &[-2.0, -0.25]) - 0.75).abs() < 1e-9);
        assert_eq!(sequence_kl(&[], &[]), 0.0);
    }

    #[test]
    fn perplexity_is_exp_of_mean_nll_over_all_tokens() {
        let lp = vec![vec![-1.0f32, -2.0], vec![-3.0]];
        assert!((perplexity(&lp) - 2.0f64.exp()).abs() < 1e-9);
    }

    #[test]
    fn kl_bound_matches_published_values() {
        assert_eq!(best_of_n_kl_bound(1), 0.0);
        assert!((best_of_n_kl_bound(4) - 0.636).abs() < 1e-3);
        assert!((best_of_n_kl_bound(16) - 1.835).abs() < 1e-3);
        assert!((best_of_n_kl_bound(64) - 3.175).abs() < 1e-3);
    }

    #[test]
    fn percentile_interpolates_between_ranks() {
        let s = [0.0, 10.0, 20.0, 30.0, 40.0];
        assert_eq!(percentile(&s, 0.5), 20.0);
        assert_eq!(percentile(&s, 0.125), 5.0);
        assert_eq!(percentile(&s, 1.0), 40.0);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean() {
        let xs: Vec<f64> = (0..50).map(|i| (i % 7) as f64).collect();
        let a = bootstrap_mean(&xs, 500, 3);
        assert_eq!(a, bootstrap_mean(&xs, 500, 3));
        assert!((a.mean - mean(&xs)).abs() < 1e-12);
        assert!(a.low < a.mean && a.mean < a.high, "{a:?}");
        // sd of the mean = 2.0 / sqrt(50) = 0.283: the 95% interval is about +-0.55.
        assert!(a.high - a.low > 0.8 && a.high - a.low < 1.4, "{a:?}");
        // A constant sample has a zero-width interval.
        let c = bootstrap_mean(&[1.5; 10], 100, 0);
        assert_eq!((c.low, c.mean, c.high), (1.5, 1.5, 1.5));
    }

    #[test]
    fn bootstrap_by_hand_with_one_resample_of_two_values() {
        // With a fixed seed the single resample is a fixed draw of 2 of the
        // values; its mean must be one of 1, 2 or 3 and both percentiles equal it.
        let e = bootstrap_mean(&[1.0, 3.0], 1, 9);
        let mut rng = Rng::fork(9, "bootstrap");
        let draw = [1.0, 3.0][rng.below(2)] + [1.0, 3.0][rng.below(2)];
        assert_eq!(e.low, draw / 2.0);
        assert_eq!(e.high, draw / 2.0);
        assert_eq!(e.mean, 2.0);
    }

    #[test]
    fn paired_difference_resamples_prompts_together() {
        // b = a - 1 exactly: every resample of pairs has difference 1.
        let a: Vec<f64> = (0..20).map(|i| (i * i) as f64).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 1.0).collect();
        let d = bootstrap_paired_difference(&a, &b, 200, 1);
        assert_eq!((d.low, d.mean, d.high), (1.0, 1.0, 1.0));
    }
}

//! Pointwise ratings (InstructGPT's 1-7 scores, OpenAssistant's quality
//! ratings) and what preference methods make of them: comparisons (the
//! answers to one prompt ordered by their mean rating over raters, ties
//! dropped) or KTO labels (desirable when the mean rating reaches a
//! threshold). Also simulated raters for the synthetic world, who disagree
//! as real ones do: each has a personal bias and rates with noise.

use std::collections::BTreeMap;

use super::rng::Rng;

/// One rating of one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub prompt: String,
    pub response: String,
    pub rating: f64,
    pub rater: String,
}

/// A ratings table: `prompt`, `response` (text), `rating` (a number),
/// optional `rater` (text); nulls and non-finite ratings are refused by row.
pub fn read(
    df: &polars::prelude::DataFrame,
    path: &std::path::Path,
) -> Result<Vec<Rating>, super::DataError> {
    use polars::prelude::*;
    let text = |name: &str| super::formats::text_column(df, name, path);
    let (prompts, responses) = (text("prompt")?, text("response")?);
    let raters = if df.column("rater").is_ok() {
        Some(text("rater")?)
    } else {
        None
    };
    let bad = |message: String| super::DataError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let rating = df
        .column("rating")
        .map_err(|_| bad("no `rating` column: a ratings table has prompt, response, rating and optionally rater".into()))?
        .cast(&DataType::Float64)
        .map_err(|e| bad(format!("column `rating` is not numeric: {e}")))?;
    let rating = rating.f64().map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let (Some(p), Some(r), Some(v)) = (prompts[i].clone(), responses[i].clone(), rating.get(i))
        else {
            return Err(bad(format!(
                "row {i}: `prompt`, `response` and `rating` must all be given"
            )));
        };
        if !v.is_finite() {
            return Err(bad(format!("row {i}: rating {v} is not a finite number")));
        }
        let rater = raters
            .as_ref()
            .and_then(|rs| rs[i].clone())
            .unwrap_or_else(|| format!("row{i}"));
        out.push(Rating {
            prompt: p,
            response: r,
            rating: v,
            rater,
        });
    }
    Ok(out)
}

/// Each answer's mean rating, grouped by prompt (first-seen order).
fn means(ratings: &[Rating]) -> Vec<(String, Vec<(String, f64)>)> {
    let mut order: Vec<String> = Vec::new();
    let mut by_prompt: BTreeMap<String, Vec<(String, f64, usize)>> = BTreeMap::new();
    for r in ratings {
        let answers = by_prompt.entry(r.prompt.clone()).or_insert_with(|| {
            order.push(r.prompt.clone());
            Vec::new()
        });
        match answers.iter_mut().find(|(a, _, _)| *a == r.response) {
            Some((_, sum, n)) => {
                *sum += r.rating;
                *n += 1;
            }
            None => answers.push((r.response.clone(), r.rating, 1)),
        }
    }
    order
        .into_iter()
        .map(|p| {
            let answers = by_prompt
                .remove(&p)
                .unwrap_or_default()
                .into_iter()
                .map(|(a, s, n)| (a, s / n as f64))
                .collect();
            (p, answers)
        })
        .collect()
}

/// (prompt, chosen, rejected, margin): every pair of answers to a prompt
/// whose mean ratings differ, the higher chosen; the margin is the
/// difference of the means.
pub fn to_comparisons(ratings: &[Rating]) -> (Vec<(String, String, String, f64)>, usize) {
    let mut out = Vec::new();
    let mut ties = 0;
    for (prompt, answers) in means(ratings) {
        for i in 0..answers.len() {
            for j in i + 1..answers.len() {
                let ((a, ra), (b, rb)) = (&answers[i], &answers[j]);
                if (ra - rb).abs() < 1e-9 {
                    ties += 1;
                    continue;
                }
                let (c, r) = if ra > rb { (a, b) } else { (b, a) };
                out.push((prompt.clone(), c.clone(), r.clone(), (ra - rb).abs()));
            }
        }
    }
    (out, ties)
}

/// (prompt, response, desirable): each answer's mean rating against `threshold`.
pub fn to_labels(ratings: &[Rating], threshold: f64) -> Vec<(String, String, bool)> {
    means(ratings)
        .into_iter()
        .flat_map(|(p, answers)| {
            answers
                .into_iter()
                .map(move |(a, m)| (p.clone(), a, m >= threshold))
        })
        .collect()
}

/// Simulated raters on a 1..=`scale` scale: rater k rates an answer of
/// quality `z` (a standardized gold score) as
/// `round(mid + spread z + bias_k + noise e)`, clipped to the scale.
pub struct Raters {
    biases: Vec<f64>,
    pub scale: u32,
    pub spread: f64,
    pub noise: f64,
}

fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.uniform().max(1e-12);
    let u2 = rng.uniform();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl Raters {
    pub fn new(n: usize, scale: u32, spread: f64, noise: f64, bias: f64, rng: &mut Rng) -> Raters {
        Raters {
            biases: (0..n).map(|_| bias * normal(rng)).collect(),
            scale,
            spread,
            noise,
        }
    }

    pub fn len(&self) -> usize {
        self.biases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.biases.is_empty()
    }

    pub fn rate(&self, rater: usize, z: f64, rng: &mut Rng) -> f64 {
        let mid = (1.0 + f64::from(self.scale)) / 2.0;
        let x = mid + self.spread * z + self.biases[rater] + self.noise * normal(rng);
        x.round().clamp(1.0, f64::from(self.scale))
    }
}

/// Pairwise agreement: over the pairs of answers to one prompt that two
/// raters both rated and both rated differently, the share where they
/// order them the same way (a tie expresses no preference and is left out,
/// as agreement between preference labelers is counted).
pub fn agreement(ratings: &[Rating]) -> f64 {
    // prompt -> rater -> response -> rating
    let mut by: BTreeMap<&str, BTreeMap<&str, BTreeMap<&str, f64>>> = BTreeMap::new();
    for r in ratings {
        by.entry(&r.prompt)
            .or_default()
            .entry(&r.rater)
            .or_default()
            .insert(&r.response, r.rating);
    }
    let (mut agree, mut total) = (0usize, 0usize);
    for raters in by.values() {
        let raters: Vec<&BTreeMap<&str, f64>> = raters.values().collect();
        for (i, x) in raters.iter().enumerate() {
            for y in &raters[i + 1..] {
                let shared: Vec<(f64, f64)> = x
                    .iter()
                    .filter_map(|(resp, vx)| y.get(resp).map(|vy| (*vx, *vy)))
                    .collect();
                for (j, (ax, ay)) in shared.iter().enumerate() {
                    for (bx, by) in &shared[j + 1..] {
                        let (dx, dy) = (ax - bx, ay - by);
                        if dx != 0.0 && dy != 0.0 {
                            total += 1;
                            agree += usize::from(dx * dy > 0.0);
                        }
                    }
                }
            }
        }
    }
    if total == 0 {
        f64::NAN
    } else {
        agree as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: &str, a: &str, v: f64, who: &str) -> Rating {
        Rating {
            prompt: p.into(),
            response: a.into(),
            rating: v,
            rater: who.into(),
        }
    }

    #[test]
    fn comparisons_order_by_mean_rating_and_drop_ties() {
        let rs = [
            r("q", "a", 6.0, "x"),
            r("q", "a", 4.0, "y"), // a: mean 5
            r("q", "b", 3.0, "x"), // b: 3
            r("q", "c", 5.0, "y"), // c: 5, ties a
        ];
        let (pairs, ties) = to_comparisons(&rs);
        assert_eq!(ties, 1);
        assert_eq!(
            pairs,
            [
                ("q".into(), "a".into(), "b".into(), 2.0),
                ("q".into(), "c".into(), "b".into(), 2.0)
            ]
        );
        let labels = to_labels(&rs, 5.0);
        assert_eq!(labels.iter().filter(|l| l.2).count(), 2); // a and c
    }

    #[test]
    fn agreement_counts_same_order_pairs() {
        // x: a > b; y: a > b (agree); z: b > a (disagrees with both); w
        // ties a and b: no preference, left out.
        let rs = [
            r("q", "a", 6.0, "x"),
            r("q", "b", 2.0, "x"),
            r("q", "a", 5.0, "y"),
            r("q", "b", 4.0, "y"),
            r("q", "a", 3.0, "z"),
            r("q", "b", 4.0, "z"),
            r("q", "a", 4.0, "w"),
            r("q", "b", 4.0, "w"),
        ];
        assert!((agreement(&rs) - 1.0 / 3.0).abs() < 1e-12);
    }
}

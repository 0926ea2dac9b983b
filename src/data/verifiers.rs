//! Rule-based ("verifiable") rewards for online RL: named checks of a
//! response to a prompt, combined with weights. DeepSeek-R1 trained on
//! accuracy and format rewards of this kind instead of a learned reward
//! model; here the synthetic world's gold labeler stands in for the
//! accuracy check.
//!
//! | name      | reward                                                         |
//! |-----------|----------------------------------------------------------------|
//! | `gold`    | the gold labeler's whole score (correct, refusal, answered, polite, concise) |
//! | `correct` | its correctness part only: the exact answer (for arithmetic, the last number said) +2, a wrong one -1 |
//! | `format`  | 1 when the answer ended with the end-of-turn token and its text ends with `.` or `!`, else 0 |

use std::collections::BTreeMap;

use super::gold::GoldLabeler;
use super::world::World;

/// The checks a stage may name, with whether each needs the world.
pub const CHECKS: [(&str, bool); 3] = [("gold", true), ("correct", true), ("format", false)];

/// Weighted checks.
pub struct Verifiers<'w> {
    checks: Vec<(String, f64)>,
    gold: Option<GoldLabeler<'w>>,
}

impl<'w> Verifiers<'w> {
    /// `weights` by check name (validated with [`validate`]); `world` when
    /// a check needs it.
    pub fn new(weights: &BTreeMap<String, f64>, world: Option<&'w World>) -> Verifiers<'w> {
        Verifiers {
            checks: weights
                .iter()
                .filter(|(_, w)| **w != 0.0)
                .map(|(n, w)| (n.clone(), *w))
                .collect(),
            gold: world.map(GoldLabeler::new),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// The weighted sum of the checks for one answer.
    pub fn score(&self, question: &str, response: &str, finished: bool) -> f64 {
        self.checks
            .iter()
            .map(|(name, w)| {
                let v = match name.as_str() {
                    "gold" => self
                        .gold
                        .as_ref()
                        .map_or(0.0, |g| g.score(question, response).total),
                    "correct" => self
                        .gold
                        .as_ref()
                        .map_or(0.0, |g| g.score(question, response).correct),
                    "format" => {
                        let t = response.trim_end();
                        f64::from(u8::from(finished && (t.ends_with('.') || t.ends_with('!'))))
                    }
                    _ => 0.0,
                };
                w * v
            })
            .sum()
    }
}

/// Check names and weights: `Err((field, message))` naming what is wrong.
pub fn validate(weights: &BTreeMap<String, f64>, has_world: bool) -> Result<(), (String, String)> {
    for (name, w) in weights {
        if name == "reward_model" {
            continue;
        }
        let Some((_, needs_world)) = CHECKS.iter().find(|(n, _)| n == name) else {
            return Err((
                format!("rewards.{name}"),
                format!(
                    "no check named `{name}`: use reward_model, {}",
                    CHECKS.map(|c| c.0).join(", ")
                ),
            ));
        };
        if !w.is_finite() {
            return Err((
                format!("rewards.{name}"),
                format!("must be a finite weight, got {w}"),
            ));
        }
        if *needs_world && !has_world {
            return Err((
                format!("rewards.{name}"),
                format!("`{name}` needs the world's gold labeler: set `gold` to a synth stage"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_check_and_weights() {
        let w: BTreeMap<String, f64> = [("format".to_string(), 0.5)].into();
        let v = Verifiers::new(&w, None);
        assert_eq!(v.score("Hi?", "Hello.", true), 0.5);
        assert_eq!(v.score("Hi?", "Hello.", false), 0.0); // ran out of tokens
        assert_eq!(v.score("Hi?", "Hello", true), 0.0);
    }

    #[test]
    fn gold_checks_need_the_world_and_unknown_names_are_refused() {
        let w: BTreeMap<String, f64> = [("gold".to_string(), 1.0)].into();
        assert!(validate(&w, false)
            .unwrap_err()
            .1
            .contains("needs the world"));
        let w: BTreeMap<String, f64> = [("exact".to_string(), 1.0)].into();
        let e = validate(&w, true).unwrap_err();
        assert_eq!(e.0, "rewards.exact");
        assert!(e.1.contains("gold, correct, format"), "{}", e.1);
    }

    #[test]
    fn correct_is_the_exact_answer_part_of_gold() {
        let world = World::generate(0, 50);
        let w: BTreeMap<String, f64> = [("correct".to_string(), 1.0)].into();
        let v = Verifiers::new(&w, Some(&world));
        assert_eq!(v.score("What is 2 plus 3?", "2 plus 3 is 5.", true), 2.0);
        assert_eq!(v.score("What is 2 plus 3?", "2 plus 3 is 6.", true), -1.0);
    }
}

//! Row-level dataset preparation: renaming columns, a seeded train/test
//! split, deduplication, a row cap, and a heuristic dialogue filter in the
//! spirit of DeepMind's Gopher rules.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use polars::prelude::*;

use super::DataError;

/// Rename columns: `renames` maps the name a stage expects to the name in
/// the file (`prompt = "question"`).
pub fn rename_columns(
    df: &mut DataFrame,
    renames: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(), DataError> {
    for (wanted, present) in renames {
        if df.column(present).is_err() {
            return Err(missing_column(df, present, path));
        }
        df.rename(present, wanted.as_str().into())?;
    }
    Ok(())
}

/// "no column `x` (did you mean `y`?); columns: a, b".
pub fn missing_column(df: &DataFrame, name: &str, path: &Path) -> DataError {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    DataError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "no column `{name}`{}; columns present: {}",
            crate::text::did_you_mean(name, names.iter().map(String::as_str)),
            names.join(", ")
        ),
    }
}

/// Which rows fall in the test split: a seeded hash of the row's index, so
/// the split is stable for a seed and independent of row order elsewhere.
pub fn test_mask(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    (0..n)
        .map(|i| {
            let h = blake3::hash(format!("split/{seed}/{i}").as_bytes());
            let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
            (x as f64 / u64::MAX as f64) < fraction
        })
        .collect()
}

/// Rows whose values (all columns, as text) were not seen before.
pub fn first_occurrences(df: &DataFrame) -> Vec<bool> {
    let mut seen = HashSet::new();
    (0..df.height())
        .map(|i| {
            let row: Vec<String> = df
                .columns()
                .iter()
                .map(|c| c.get(i).map(|v| v.to_string()).unwrap_or_default())
                .collect();
            seen.insert(row)
        })
        .collect()
}

/// Gopher-style dialogue filter: keep texts made of "[A]: ... [B]: ..."
/// turns that alternate, with at least `min_turns` turns, each of 1 to 100
/// words, and no line repeated.
pub fn is_good_dialogue(text: &str, min_turns: usize) -> bool {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() < min_turns {
        return false;
    }
    let mut seen = HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let speaker = if i % 2 == 0 { "[A]:" } else { "[B]:" };
        let Some(body) = line.strip_prefix(speaker) else {
            return false;
        };
        let words = body.split_whitespace().count();
        if !(1..=100).contains(&words) || !seen.insert(*line) {
            return false;
        }
    }
    true
}

pub fn filter(df: &DataFrame, keep: Vec<bool>) -> Result<DataFrame, DataError> {
    let mask = BooleanChunked::from_slice("keep".into(), &keep);
    Ok(df.filter(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialogue_filter_follows_the_rules() {
        assert!(is_good_dialogue("[A]: Hi there?\n[B]: Hello.", 2));
        assert!(!is_good_dialogue("[A]: Hi there?", 2), "too few turns");
        assert!(
            !is_good_dialogue("[A]: Hi?\n[A]: Hi again?", 2),
            "not alternating"
        );
        assert!(
            !is_good_dialogue("[A]: x\n[B]: y\n[A]: x", 2),
            "repeated line"
        );
        assert!(!is_good_dialogue("just some prose", 1));
        assert!(!is_good_dialogue("[A]:\n[B]: y", 2), "empty turn");
    }

    #[test]
    fn split_is_seeded_and_near_the_fraction() {
        let m = test_mask(10_000, 0.2, 1);
        let share = m.iter().filter(|x| **x).count() as f64 / 1e4;
        assert!((share - 0.2).abs() < 0.02, "{share}");
        assert_eq!(m, test_mask(10_000, 0.2, 1));
        assert_ne!(m, test_mask(10_000, 0.2, 2));
    }

    #[test]
    fn dedup_keeps_first_of_each_row() {
        let df = df!("a" => ["x", "y", "x"], "b" => [1, 2, 1]).unwrap();
        assert_eq!(first_occurrences(&df), vec![true, true, false]);
    }
}

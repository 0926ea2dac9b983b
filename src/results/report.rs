//! `results/EXP/report.html`: one self-contained page per experiment (the
//! eval table, the runs table and every plot), so a result can be mailed or
//! archived as a single file. CSS is inline and the SVG plots are inlined as
//! markup: the page loads nothing else.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::runs_table::RUNS_FILE;
use crate::data::{read_parquet, DataError};

pub const REPORT_FILE: &str = "report.html";
use super::eval_table::EVAL_FILE;
/// Plots are shown in name order, except this one, the summary, first.
const FIRST_PLOT: &str = "reward_vs_kl";

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("experiment `{0}` has no results yet: run it first (posttrain run {0})")]
    NoResults(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;\
color:#222;padding:0 1em}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}\
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top;\
max-width:40em;overflow-wrap:anywhere}th{background:#f0f0f0}td.num{text-align:right;\
font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}.plot svg{max-width:100%;height:auto}";

/// Write `results_dir/report.html` for `experiment` and return its path.
pub fn write_report(results_dir: &Path, experiment: &str) -> Result<PathBuf, ReportError> {
    let read_if_present = |name: &str| -> Result<Option<DataFrame>, DataError> {
        let path = results_dir.join(name);
        path.exists().then(|| read_parquet(&path)).transpose()
    };
    let (eval, runs) = (read_if_present(EVAL_FILE)?, read_if_present(RUNS_FILE)?);
    if eval.is_none() && runs.is_none() {
        return Err(ReportError::NoResults(experiment.to_string()));
    }
    let name = escape(experiment);
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>posttrain report: {name}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>posttrain report</h1>\n<p>experiment <code>{name}</code></p>\n"
    );
    if let Some(df) = &eval {
        html.push_str("<h2>Evaluation</h2>\n");
        let df = without_empty_columns(df);
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let main: Vec<String> = ["policy"]
            .iter()
            .chain(&super::eval_table::SUMMARY_COLUMNS[1..])
            .chain(&["win_rate_reward"])
            .filter(|c| names.iter().any(|n| n == *c))
            .map(|c| c.to_string())
            .collect();
        match df.select(main.clone()) {
            Ok(summary) if !main.is_empty() => {
                push_table(&mut html, &summary);
                let _ = writeln!(
                    html,
                    "<details><summary>all {} columns</summary>",
                    names.len()
                );
                push_table(&mut html, &df);
                html.push_str("</details>\n");
            }
            _ => push_table(&mut html, &df),
        }
    }
    if let Some(df) = &runs {
        html.push_str("<h2>Runs</h2>\n");
        push_runs(&mut html, df);
    }
    let plots = svg_files(&results_dir.join("plots"))?;
    if !plots.is_empty() {
        html.push_str("<h2>Plots</h2>\n");
    }
    for path in plots {
        let svg = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<h3>{}</h3>\n<div class=\"plot\">\n{}\n</div>\n",
            escape(&stem),
            inline_svg(&svg)
        );
    }
    html.push_str("</body>\n</html>\n");
    let out = results_dir.join(REPORT_FILE);
    std::fs::write(&out, html).map_err(io_err(&out))?;
    Ok(out)
}

/// `*.svg` directly in `dir` (none if it does not exist), the summary plot
/// first and the rest by name, so the page is the same on every run.
fn svg_files(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "svg") {
            files.push(path);
        }
    }
    files.sort_by_key(|p| (p.file_stem().is_none_or(|s| s != FIRST_PLOT), p.clone()));
    Ok(files)
}

/// An SVG file's markup without its XML prolog, which is not allowed inside
/// HTML.
fn inline_svg(svg: &str) -> &str {
    svg.find("<svg").map_or(svg, |at| &svg[at..])
}

/// The frame without the columns that hold no value in any row (no gold
/// labeler: no gold columns).
fn without_empty_columns(df: &DataFrame) -> DataFrame {
    let keep: Vec<Column> = df
        .columns()
        .iter()
        .filter(|c| {
            let floats = c.cast(&DataType::Float64).ok();
            match floats.as_ref().and_then(|f| f.f64().ok()) {
                Some(f) if c.dtype().is_primitive_numeric() => {
                    f.iter().any(|v| v.is_some_and(f64::is_finite))
                }
                _ => c.null_count() < c.len(),
            }
        })
        .cloned()
        .collect();
    DataFrame::new(df.height(), keep).unwrap_or_else(|_| df.clone())
}

/// The runs table as a person reads it: short keys (the full one on
/// hover), the time each entry took to build (a cached stage's too, from
/// its store manifest), the final metrics folded, 3 significant digits.
fn push_runs(html: &mut String, df: &DataFrame) {
    let text = |c: &str| -> Vec<String> {
        df.column(c)
            .ok()
            .and_then(|c| {
                c.str()
                    .ok()
                    .map(|s| s.iter().map(|v| v.unwrap_or("").to_string()).collect())
            })
            .unwrap_or_else(|| vec![String::new(); df.height()])
    };
    let (stage, kind, key, status, store, metrics) = (
        text("stage"),
        text("kind"),
        text("key"),
        text("status"),
        text("store_path"),
        text("metrics"),
    );
    let duration: Vec<Option<f64>> = df
        .column("duration_s")
        .ok()
        .and_then(|c| c.f64().ok().map(|f| f.iter().collect()))
        .unwrap_or_else(|| vec![None; df.height()]);
    html.push_str("<table>\n<thead><tr><th>stage</th><th>kind</th><th>key</th><th>status</th><th>built in (s)</th><th>metrics</th></tr></thead>\n<tbody>\n");
    for i in 0..df.height() {
        let built = match duration[i] {
            Some(d) if status[i] != "cached" => Some(d),
            _ => built_seconds(Path::new(&store[i])),
        };
        let metric_map: std::collections::BTreeMap<String, f64> =
            serde_json::from_str(&metrics[i]).unwrap_or_default();
        let lines: Vec<String> = metric_map
            .iter()
            .map(|(k, v)| format!("{} = {}", escape(k), sig3(*v)))
            .collect();
        let short = key[i].chars().take(12).collect::<String>();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td><code title=\"{}\">{}</code></td><td>{}</td><td class=\"num\">{}</td><td><details><summary>{} metrics</summary>{}</details></td></tr>",
            escape(&stage[i]),
            escape(&kind[i]),
            escape(&key[i]),
            escape(&short),
            escape(&status[i]),
            built.map(sig3).unwrap_or_default(),
            lines.len(),
            lines.join("<br>")
        );
    }
    html.push_str("</tbody>\n</table>\n");
}

/// How long the store entry at `dir` took to build, from its manifest.
fn built_seconds(dir: &Path) -> Option<f64> {
    let bytes = std::fs::read(dir.join("manifest.json")).ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    manifest.get("duration_s")?.as_f64()
}

fn push_table(html: &mut String, df: &DataFrame) {
    html.push_str("<table>\n<thead><tr>");
    for name in df.get_column_names() {
        let _ = write!(html, "<th>{}</th>", escape(name));
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    for i in 0..df.height() {
        html.push_str("<tr>");
        for col in df.columns() {
            let numeric = col.dtype().is_primitive_numeric();
            let class = if numeric { " class=\"num\"" } else { "" };
            let cell = col.get(i).map(|v| cell_text(&v)).unwrap_or_default();
            if is_key(&cell) {
                // A cache key: its first 12 characters, the whole on hover.
                let _ = write!(
                    html,
                    "<td><code title=\"{cell}\">{}</code></td>",
                    &cell[..12]
                );
                continue;
            }
            let _ = write!(html, "<td{class}>{}</td>", escape(&cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n");
}

/// A 64-character blake3 hex key.
fn is_key(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A table cell's text: nulls blank, floats to 3 significant digits,
/// strings unquoted.
fn cell_text(value: &AnyValue) -> String {
    match value {
        AnyValue::Null => String::new(),
        AnyValue::Float64(x) => sig3(*x),
        AnyValue::Float32(x) => sig3(f64::from(*x)),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// `x` to 3 significant digits: fixed-point from 0.001 to 99999 (whole
/// numbers from 100 on), scientific outside, where fixed-point would print
/// a row of zeros.
fn sig3(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return x.to_string();
    }
    // Counts (rows, steps, tokens) print as integers, not "50.0".
    if x.fract() == 0.0 && x.abs() < 1e5 {
        return format!("{x:.0}");
    }
    let exponent = x.abs().log10().floor() as i32;
    if (-3..5).contains(&exponent) {
        let decimals = (2 - exponent).max(0) as usize;
        let rounded = if exponent > 2 {
            let scale = 10f64.powi(exponent - 2);
            (x / scale).round() * scale
        } else {
            x
        };
        format!("{rounded:.decimals$}")
    } else {
        format!("{x:.2e}")
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::write_parquet;

    #[test]
    fn floats_keep_three_significant_digits() {
        let cases = [
            (0.123456, "0.123"),
            (123.456, "123"),
            (-2.0, "-2"),
            (-2.5, "-2.50"),
            (50.0, "50"),
            (0.00123456, "0.00123"),
            (12345.6, "12300"),
            (123456.0, "1.23e5"),
            (0.0, "0"),
            (f64::NAN, "NaN"),
        ];
        for (x, want) in cases {
            assert_eq!(sig3(x), want, "{x}");
        }
    }

    #[test]
    fn report_inlines_tables_and_plots_and_escapes_cells() {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path();
        let mut eval = df!(
            "policy" => ["sft", "<script>alert('x')</script>"],
            "gold_reward" => [Some(0.123456), None],
            "n" => [100i64, 100],
            "policy_key" => ["0123456789abcdef".repeat(4), "fedcba9876543210".repeat(4)],
        )
        .unwrap();
        write_parquet(&mut eval, &results.join(EVAL_FILE)).unwrap();
        let entry = results.join("entry");
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("manifest.json"), r#"{"duration_s": 41.27}"#).unwrap();
        let key = "0123456789abcdef".repeat(4);
        let mut runs = df!(
            "stage" => ["sft", "rm"],
            "kind" => ["sft", "reward"],
            "key" => [key.as_str(), key.as_str()],
            "status" => ["ran", "cached"],
            "duration_s" => [12.5, 0.0],
            "store_path" => ["", entry.to_str().unwrap()],
            "metrics" => [r#"{"loss": 1.23456}"#, "{}"],
        )
        .unwrap();
        write_parquet(&mut runs, &results.join(RUNS_FILE)).unwrap();
        let plots = results.join("plots");
        std::fs::create_dir_all(&plots).unwrap();
        let svg = |text: &str| {
            format!("<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"><text>{text}</text></svg>\n")
        };
        std::fs::write(plots.join("a-training.svg"), svg("curves")).unwrap();
        std::fs::write(plots.join("reward_vs_kl.svg"), svg("frontier")).unwrap();
        std::fs::write(plots.join("notes.txt"), "not a plot").unwrap();

        let path = write_report(results, "llama-dpo").unwrap();
        assert_eq!(path, results.join(REPORT_FILE));
        let html = std::fs::read_to_string(&path).unwrap();
        assert!(html.contains("<code>llama-dpo</code>"));
        for cell in [
            "<td>sft</td>",
            "<td class=\"num\">0.123</td>",
            "<td class=\"num\">12.5</td>",
            "<td class=\"num\">41.3</td>",
            "<td>ran</td>",
            "<code title=\"0123456789abcdef",
            ">0123456789ab</code>",
            "loss = 1.23",
            "<details><summary>all 4 columns</summary>",
            "<td><code title=\"fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210\">fedcba987654</code></td>",
        ] {
            assert!(html.contains(cell), "report lacks {cell}");
        }
        assert!(html.contains("<td>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</td>"));
        assert!(!html.contains("<script"), "a cell was not escaped");
        // Plots inline, the summary first, without their XML prolog.
        let frontier = html
            .find("<text>frontier</text>")
            .expect("reward_vs_kl inlined");
        let curves = html
            .find("<text>curves</text>")
            .expect("training plot inlined");
        assert!(frontier < curves);
        assert!(html.contains("<h3>reward_vs_kl</h3>") && html.contains("<h3>a-training</h3>"));
        assert!(!html.contains("<?xml") && !html.contains("not a plot"));
        assert!(!html.contains("src=\"") && !html.contains("<link"));
    }

    #[test]
    fn runs_alone_are_enough_and_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path(), "llama-dpo").unwrap_err();
        assert_eq!(
            err.to_string(),
            "experiment `llama-dpo` has no results yet: run it first (posttrain run llama-dpo)"
        );
        let mut runs = df!("stage" => ["sft"]).unwrap();
        write_parquet(&mut runs, &dir.path().join(RUNS_FILE)).unwrap();
        let html = std::fs::read_to_string(write_report(dir.path(), "llama-dpo").unwrap()).unwrap();
        assert!(html.contains("<h2>Runs</h2>") && !html.contains("<h2>Evaluation</h2>"));
    }
}

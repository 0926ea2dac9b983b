//! Figures of results, drawn with plotters: a training stage's per-step
//! curves, and gold reward against KL to the reference for a set of
//! policies. Every figure is written twice: SVG (text stays text, so the HTML
//! report can inline it and tests can read it) and PNG (for anything else).
//!
//! Text is rendered with the DejaVu Sans embedded in the binary, through
//! ab_glyph, so a plot looks the same on every machine and needs no system
//! fonts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;

use crate::data::prepare::missing_column;
use crate::data::{read_parquet_path, DataError};

/// Why a figure could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: cannot draw the figure: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// The figure's font family; plotters' default text styles ask for it.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const PANEL_GROUPS: [&str; 4] = ["loss", "reward", "KL", "accuracy"];
/// Logged by training stages but not worth a panel.
const SKIPPED: [&str; 4] = ["step", "lr", "grad_norm", "tokens_per_s"];

/// plotters' ab_glyph backend knows only registered fonts, and keeps them
/// in a global table, so register ours once per process.
fn ensure_font(path: &Path) -> Result<(), PlotError> {
    static REGISTER: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    REGISTER.call_once(|| {
        let ok = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok();
        OK.store(ok, Ordering::SeqCst);
    });
    if OK.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(PlotError::Draw {
            path: path.to_path_buf(),
            message: "the embedded font assets/DejaVuSans.ttf does not parse".into(),
        })
    }
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Something drawable on any backend, so one drawing makes both files.
trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Write `fig` as `{out_dir}/{stem}.svg` and `.png`.
fn write_figure(fig: &impl Figure, out_dir: &Path, stem: &str) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let (svg_path, png_path) = (
        out_dir.join(format!("{stem}.svg")),
        out_dir.join(format!("{stem}.png")),
    );
    ensure_font(&svg_path)?;
    let failed = |path: &Path, e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // The SVG goes through a string so that a write error is an IO error
    // naming the file, not an opaque drawing error.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, fig.size()).into_drawing_area();
        fig.draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| failed(&svg_path, &e))?;
    }
    std::fs::write(&svg_path, svg).map_err(|source| PlotError::Io {
        path: svg_path.clone(),
        source,
    })?;
    {
        let root = BitMapBackend::new(&png_path, fig.size()).into_drawing_area();
        fig.draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| failed(&png_path, &e))?;
    }
    Ok(vec![svg_path, png_path])
}

/// A value range padded by 5% on each side, never empty.
fn padded(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5 * lo.abs().max(1.0)
    };
    (lo - pad)..(hi + pad)
}

/// The y range grown at the top by a band for the legend (about one line
/// per curve), so the legend in the upper right sits over no data.
fn with_legend_room(range: std::ops::Range<f64>, curves: usize) -> std::ops::Range<f64> {
    let band = 0.09 * (curves as f64 + 0.5);
    let span = range.end - range.start;
    range.start..(range.end + span * band / (1.0 - band).max(0.2))
}

// ---------------------------------------------------------------- training

/// One metric column: its non-null (step, value) points.
struct Curve {
    name: String,
    points: Vec<(f64, f64)>,
    /// Logged only every few steps (eval): drawn with markers, since a line
    /// alone hides how few points there are.
    sparse: bool,
}

struct TrainingFigure {
    title: String,
    /// (group name, curves), non-empty groups in PANEL_GROUPS order.
    panels: Vec<(&'static str, Vec<Curve>)>,
}

/// Which panel a metric column belongs to. Accuracy is checked before
/// reward so that DPO's `rewards/accuracies` lands with the accuracies.
fn panel_of(name: &str) -> Option<&'static str> {
    let has = |parts: &[&str]| parts.iter().any(|p| name.contains(p));
    if SKIPPED.contains(&name) {
        None
    } else if name == "loss" || name.ends_with("_loss") || name.starts_with("loss/") {
        Some("loss")
    } else if has(&["accuracy", "accuracies", "clip_frac", "clipfrac"]) {
        Some("accuracy")
    } else if has(&["kl"]) {
        Some("KL")
    } else if has(&["reward", "score", "margin"]) {
        Some("reward")
    } else {
        None
    }
}

/// A numeric column as f64 (steps may be u64 or i64), or None if it is not
/// numeric.
fn as_f64(df: &DataFrame, name: &str) -> Result<Option<Vec<Option<f64>>>, PolarsError> {
    let col = df.column(name)?;
    if !col.dtype().is_primitive_numeric() {
        return Ok(None);
    }
    Ok(Some(col.cast(&DataType::Float64)?.f64()?.iter().collect()))
}

/// A stage's per-step metrics as panels; `start` holds final metrics, where
/// `NAME_start` (a held-out value before the first step) puts curve NAME's
/// first point at step 0.
fn training_figure(
    df: &DataFrame,
    path: &Path,
    stage: &str,
    start: &BTreeMap<String, f64>,
) -> Result<TrainingFigure, DataError> {
    let Ok(step) = df.column("step") else {
        return Err(missing_column(df, "step", path));
    };
    let steps = as_f64(df, "step")?.ok_or_else(|| DataError::Invalid {
        path: path.to_path_buf(),
        message: format!("column `step` has type {}, expected integers", step.dtype()),
    })?;
    let mut panels: Vec<(&'static str, Vec<Curve>)> =
        PANEL_GROUPS.iter().map(|g| (*g, Vec::new())).collect();
    for name in df.get_column_names() {
        let Some(group) = panel_of(name) else {
            continue;
        };
        let Some(values) = as_f64(df, name)? else {
            continue;
        };
        let mut points: Vec<(f64, f64)> = steps
            .iter()
            .zip(&values)
            .filter_map(|(s, v)| Some(((*s)?, (*v)?)))
            .filter(|(s, v)| s.is_finite() && v.is_finite())
            .collect();
        if let Some(v) = start
            .get(&format!("{name}_start"))
            .filter(|v| v.is_finite())
        {
            if points.first().is_some_and(|p| p.0 > 0.0) {
                points.insert(0, (0.0, *v));
            }
        }
        if points.is_empty() {
            continue;
        }
        let sparse = name.starts_with("eval") || points.len() < values.len();
        if let Some((_, curves)) = panels.iter_mut().find(|(g, _)| *g == group) {
            curves.push(Curve {
                name: name.to_string(),
                points,
                sparse,
            });
        }
    }
    panels.retain(|(_, curves)| !curves.is_empty());
    Ok(TrainingFigure {
        title: format!("{stage}: training"),
        panels,
    })
}

/// An exponential moving average of a dense curve (TensorBoard's
/// smoothing, weight 0.9 for 100+ points, less for shorter curves);
/// `None` for curves too short to need it.
fn smooth(points: &[(f64, f64)]) -> Option<Vec<(f64, f64)>> {
    if points.len() < 20 {
        return None;
    }
    let weight = if points.len() >= 100 { 0.9 } else { 0.6 };
    let mut last = points[0].1;
    Some(
        points
            .iter()
            .map(|(x, y)| {
                last = weight * last + (1.0 - weight) * y;
                (*x, last)
            })
            .collect(),
    )
}

/// Steps are integers: "200", not plotters' "200.0".
fn step_label(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

impl TrainingFigure {
    fn grid(&self) -> (usize, usize) {
        let cols = if self.panels.len() > 1 { 2 } else { 1 };
        (self.panels.len().max(1).div_ceil(cols), cols)
    }
}

impl Figure for TrainingFigure {
    fn size(&self) -> (u32, u32) {
        (900, 300 * self.grid().0 as u32 + 40)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let root = root.titled(&self.title, (FONT, 24))?;
        if self.panels.is_empty() {
            let note = "no loss, reward, KL or accuracy metrics were logged";
            return root.draw(&Text::new(note, (20, 40), (FONT, 18)));
        }
        for ((group, curves), area) in self.panels.iter().zip(root.split_evenly(self.grid())) {
            let all = || curves.iter().flat_map(|c| c.points.iter());
            // Name what is plotted: DPO's `kl_proxy` is a log-ratio margin
            // that can go negative, not a KL.
            let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
            let caption = format!("{group}: {}", names.join(", "));
            let mut chart = ChartBuilder::on(&area)
                .caption(caption, (FONT, 20))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(
                    padded(all().map(|p| p.0)),
                    with_legend_room(padded(all().map(|p| p.1)), curves.len()),
                )?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(*group)
                .x_label_formatter(&step_label)
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .light_line_style(BLACK.mix(0.04))
                .draw()?;
            for (i, curve) in curves.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let smoothed = smooth(&curve.points);
                if smoothed.is_some() {
                    // The raw per-step values faded, the smoothed curve on top.
                    chart.draw_series(LineSeries::new(
                        curve.points.iter().copied(),
                        color.mix(0.25).stroke_width(1),
                    ))?;
                }
                chart
                    .draw_series(LineSeries::new(
                        smoothed.unwrap_or_else(|| curve.points.clone()),
                        color.stroke_width(2),
                    ))?
                    .label(curve.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                if curve.sparse {
                    let markers = curve
                        .points
                        .iter()
                        .map(|p| Circle::new(*p, 3, color.filled()));
                    chart.draw_series(markers)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        Ok(())
    }
}

/// Plot a training stage's per-step metrics Parquet (a file, or a folder of
/// them): one panel per group of metrics (loss, reward, KL, accuracy) that
/// the stage logged. Writes `{out_dir}/{stage}-training.svg` and `.png`.
pub fn training_curves(
    metrics: &Path,
    stage: &str,
    start: &BTreeMap<String, f64>,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    let df = read_parquet_path(metrics)?;
    let fig = training_figure(&df, metrics, stage, start)?;
    write_figure(&fig, out_dir, &format!("{stage}-training"))
}

// ---------------------------------------------------------- reward vs KL

/// One policy on the reward/KL plane: mean gold reward with its interval
/// (e.g. a bootstrap 95% CI), and KL to the reference in nats.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyPoint {
    pub label: String,
    pub kl: f64,
    pub reward: f64,
    pub reward_low: f64,
    pub reward_high: f64,
    /// The reward is the gold labeler's (else the reward model's score).
    pub gold: bool,
}

struct FrontierFigure<'a> {
    title: &'a str,
    shown: Vec<&'a PolicyPoint>,
    /// Policies without a finite KL or reward, named in a note rather than
    /// silently dropped.
    hidden: Vec<&'a str>,
}

impl Figure for FrontierFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (900, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let (plot, footer) = root.split_vertically(570);
        // The reference sits at 0, so the axis starts there, or below it for
        // a negative estimate (drawn where it is, not clamped to 0); the
        // extra 15% leaves room for the labels.
        let max_kl = self.shown.iter().map(|p| p.kl).fold(0.0, f64::max);
        let min_kl = self.shown.iter().map(|p| p.kl).fold(0.0, f64::min);
        let x_max = if max_kl > 0.0 { 1.15 * max_kl } else { 1.0 };
        let x_min = if min_kl < 0.0 { 1.15 * min_kl } else { 0.0 };
        let y_desc = match (
            self.shown.iter().all(|p| p.gold),
            self.shown.iter().any(|p| p.gold),
        ) {
            (true, _) => "gold reward",
            (false, false) => "reward model score",
            (false, true) => "gold reward (reward model score where no gold)",
        };
        let ys = self
            .shown
            .iter()
            .flat_map(|p| [p.reward, p.reward_low, p.reward_high]);
        let mut chart = ChartBuilder::on(&plot)
            .caption(self.title, (FONT, 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_min..x_max, padded(ys))?;
        chart
            .configure_mesh()
            .x_desc("KL to reference (nats)")
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(BLACK.mix(0.04))
            .draw()?;
        let bar = BLACK.mix(0.6).stroke_width(1);
        for p in &self.shown {
            if p.reward_low.is_finite() && p.reward_high.is_finite() {
                let (lo, hi) = ((p.kl, p.reward_low), (p.kl, p.reward_high));
                chart.draw_series([PathElement::new(vec![lo, hi], bar)])?;
                // Caps in pixels, so they stay the same width at any scale.
                let cap = |at: (f64, f64)| {
                    EmptyElement::at(at) + PathElement::new(vec![(-4, 0), (4, 0)], bar)
                };
                chart.draw_series([cap(lo), cap(hi)])?;
            }
        }
        // A sweep's points (`dpo@beta=0.1`, `dpo@beta=0.5`) joined by a line,
        // in KL order.
        let mut sweeps: std::collections::BTreeMap<&str, Vec<(f64, f64)>> = Default::default();
        for p in &self.shown {
            if let Some((base, _)) = p.label.split_once('@') {
                sweeps.entry(base).or_default().push((p.kl, p.reward));
            }
        }
        for line in sweeps.values_mut().filter(|l| l.len() > 1) {
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart.draw_series(LineSeries::new(
                line.clone(),
                BLACK.mix(0.35).stroke_width(1),
            ))?;
        }
        // Labels of points at the same place stack instead of overlapping.
        let mut seen: Vec<(f64, f64)> = Vec::new();
        let points = self.shown.iter().enumerate().map(|(i, p)| {
            let color = Palette99::pick(i).to_rgba();
            let near = |q: &(f64, f64)| {
                (q.0 - p.kl).abs() <= 1e-6 * (1.0 + p.kl.abs())
                    && (q.1 - p.reward).abs() <= 1e-6 * (1.0 + p.reward.abs())
            };
            let stacked = seen.iter().filter(|q| near(q)).count() as i32;
            seen.push((p.kl, p.reward));
            EmptyElement::at((p.kl, p.reward))
                + Circle::new((0, 0), 5, color.filled())
                + Text::new(p.label.clone(), (8, -18 + 18 * stacked), (FONT, 16))
        });
        chart.draw_series(points)?;
        let note = if self.shown.is_empty() {
            "no policy has a finite KL and reward to plot".to_string()
        } else if !self.hidden.is_empty() {
            format!(
                "not shown (KL or reward not finite): {}",
                self.hidden.join(", ")
            )
        } else {
            return Ok(());
        };
        footer.draw(&Text::new(note, (20, 5), (FONT, 16)))
    }
}

/// Scatter gold reward against KL to the reference, with the reward
/// intervals as error bars and each point labelled. Writes
/// `{out_dir}/reward_vs_kl.svg` and `.png`.
pub fn reward_vs_kl(
    points: &[PolicyPoint],
    title: &str,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    let (shown, hidden): (Vec<&PolicyPoint>, Vec<&PolicyPoint>) = points
        .iter()
        .partition(|p| p.kl.is_finite() && p.reward.is_finite());
    let fig = FrontierFigure {
        title,
        shown,
        hidden: hidden.iter().map(|p| p.label.as_str()).collect(),
    };
    write_figure(&fig, out_dir, "reward_vs_kl")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::write_parquet;

    /// Width and height from a PNG's IHDR chunk, after checking the magic.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is not a PNG",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn metrics_frame() -> DataFrame {
        let every_3rd = |v: f64| {
            (0..10)
                .map(|i| (i % 3 == 0).then_some(v - i as f64 * 0.01))
                .collect::<Vec<_>>()
        };
        df!(
            "step" => (0..10u64).collect::<Vec<_>>(),
            "loss" => (0..10).map(|i| 2.0 - 0.1 * i as f64).collect::<Vec<_>>(),
            "lr" => vec![1e-3; 10],
            "grad_norm" => vec![1.0; 10],
            "rewards/margins" => (0..10).map(|i| 0.05 * i as f64).collect::<Vec<_>>(),
            "kl_proxy" => (0..10).map(|i| 0.01 * i as f64).collect::<Vec<_>>(),
            "rewards/accuracies" => vec![0.5; 10],
            "eval_loss" => every_3rd(2.1),
            "eval_rewards/margins" => every_3rd(0.3),
        )
        .unwrap()
    }

    #[test]
    fn training_curves_write_svg_and_png_with_every_panel() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.parquet");
        write_parquet(&mut metrics_frame(), &metrics).unwrap();
        let out = dir.path().join("plots");
        let files = training_curves(&metrics, "dpo", &BTreeMap::new(), &out).unwrap();
        assert_eq!(
            files,
            vec![out.join("dpo-training.svg"), out.join("dpo-training.png")]
        );
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        for name in [
            "loss",
            "eval_loss",
            "rewards/margins",
            "eval_rewards/margins",
            "kl_proxy",
            "rewards/accuracies",
        ] {
            // plotters writes each text as `>\ntext\n</text>`.
            assert!(
                svg.contains(&format!(">\n{name}\n<")),
                "legend lacks {name}"
            );
        }
        for skipped in [">\nlr\n<", ">\ngrad_norm\n<"] {
            assert!(!svg.contains(skipped), "{skipped} should not be plotted");
        }
        // 4 panels on 2 columns: 2 rows of 300 px plus the title.
        assert_eq!(png_size(&files[1]), (900, 640));
    }

    #[test]
    fn eval_curves_start_at_step_0_and_the_legend_has_its_own_band() {
        let df = df!(
            "step" => [1i64, 2, 3, 4, 5, 6],
            "loss" => [3.0, 2.9, 2.8, 2.7, 2.6, 2.5],
            "eval_loss" => [None, None, Some(2.4), None, None, Some(2.2)],
        )
        .unwrap();
        let start = BTreeMap::from([("eval_loss_start".to_string(), 2.5)]);
        let fig = training_figure(&df, Path::new("m.parquet"), "sft", &start).unwrap();
        let eval = fig
            .panels
            .iter()
            .flat_map(|(_, c)| c)
            .find(|c| c.name == "eval_loss")
            .unwrap();
        assert_eq!(eval.points[0], (0.0, 2.5), "{:?}", eval.points);
        let plain = training_figure(&df, Path::new("m.parquet"), "sft", &BTreeMap::new()).unwrap();
        let eval0 = plain
            .panels
            .iter()
            .flat_map(|(_, c)| c)
            .find(|c| c.name == "eval_loss")
            .unwrap();
        assert!(eval0.points[0].0 > 0.0);
        // Two curves: the top 22.5% of the panel is above every value.
        let r = with_legend_room(0.0..1.0, 2);
        assert!((1.0 - 1.0 / r.end - 0.225).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn groups_follow_the_metric_names() {
        let cases = [
            ("loss", Some("loss")),
            ("eval_loss", Some("loss")),
            ("value_loss", Some("loss")),
            ("rewards/chosen", Some("reward")),
            ("objective/scores", Some("reward")),
            ("margin", Some("reward")),
            ("objective/kl", Some("KL")),
            ("accuracy", Some("accuracy")),
            ("eval_rewards/accuracies", Some("accuracy")),
            ("policy/clip_frac", Some("accuracy")),
            ("lr", None),
            ("tokens_per_s", None),
            ("logps/chosen", None),
        ];
        for (name, group) in cases {
            assert_eq!(panel_of(name), group, "{name}");
        }
    }

    #[test]
    fn missing_step_column_names_file_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.parquet");
        write_parquet(&mut df!("loss" => [1.0, 0.5]).unwrap(), &metrics).unwrap();
        let err = training_curves(&metrics, "sft", &BTreeMap::new(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metrics.parquet") && err.contains("`step`"),
            "{err}"
        );
    }

    #[test]
    fn a_stage_without_plottable_metrics_still_gets_a_figure() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.parquet");
        write_parquet(
            &mut df!("step" => [0i64, 1], "lr" => [1e-3, 1e-3]).unwrap(),
            &metrics,
        )
        .unwrap();
        let files = training_curves(&metrics, "load", &BTreeMap::new(), dir.path()).unwrap();
        assert_eq!(png_size(&files[1]), (900, 340));
    }

    fn point(label: &str, kl: f64, reward: f64) -> PolicyPoint {
        PolicyPoint {
            label: label.into(),
            kl,
            reward,
            reward_low: reward - 0.1,
            reward_high: reward + 0.1,
            gold: true,
        }
    }

    #[test]
    fn panels_name_what_they_plot_and_the_frontier_its_y_axis() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = df!(
            "step" => (0..40i64).collect::<Vec<_>>(),
            "loss" => (0..40).map(|i| 1.0 / (1.0 + i as f64)).collect::<Vec<_>>(),
            "kl_proxy" => (0..40).map(|i| -0.2 * i as f64).collect::<Vec<_>>(),
        )
        .unwrap();
        let path = dir.path().join("metrics.parquet");
        crate::data::write_parquet(&mut metrics.clone(), &path).unwrap();
        let files = training_curves(&path, "dpo", &BTreeMap::new(), dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            svg.contains("KL: kl_proxy"),
            "the KL panel says what it plots"
        );
        assert!(smooth(&metrics_points()).is_some());

        let mut a = point("dpo@beta=0.1", -1.0, 0.2);
        a.gold = false;
        let mut b = point("dpo@beta=0.5", 2.0, 0.4);
        b.gold = false;
        let mut c = point("sft", 2.0, 0.4);
        c.gold = false;
        let files = reward_vs_kl(&[a, b, c], "rm vs KL", dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            svg.contains("reward model score"),
            "no gold: the y axis says so"
        );
        assert!(!svg.contains("gold reward"));
        assert!(
            !svg.contains("not shown"),
            "a negative KL is drawn, not dropped"
        );
    }

    fn metrics_points() -> Vec<(f64, f64)> {
        (0..30).map(|i| (i as f64, (i % 3) as f64)).collect()
    }

    #[test]
    fn reward_vs_kl_labels_points_and_notes_skipped_ones() {
        let dir = tempfile::tempdir().unwrap();
        let points = [
            point("sft", 0.0, 0.2),
            point("dpo β=0.1", 3.5, 0.6),
            point("ppo", f64::NAN, 0.5),
        ];
        let files = reward_vs_kl(&points, "gold reward vs KL", dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        for text in [
            "sft",
            "dpo β=0.1",
            "gold reward vs KL",
            "KL to reference (nats)",
            "not shown (KL or reward not finite): ppo",
        ] {
            assert!(svg.contains(text), "svg lacks {text}");
        }
        assert_eq!(png_size(&files[1]), (900, 600));
    }

    #[test]
    fn reward_vs_kl_without_finite_points_writes_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let points = [point("a", f64::INFINITY, 0.1), point("b", 1.0, f64::NAN)];
        let files = reward_vs_kl(&points, "empty", dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.contains("no policy has a finite KL and reward to plot"));
        assert!(files[1].exists());
        let files = reward_vs_kl(&[], "none", dir.path()).unwrap();
        assert!(files.iter().all(|f| f.exists()));
    }
}

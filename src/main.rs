//! The `posttrain` command line. Only argument parsing and dispatch live
//! here; every command calls one library function.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use posttrain::experiment::{self, Experiment};
use posttrain::runner::{self, Project, RunOptions, Status};
use posttrain::store::lease::Lease;
use posttrain::text::table;

#[derive(Parser)]
#[command(
    name = "posttrain",
    version,
    about = "Run LLM post-training experiments (pretrain, SFT, reward, PPO, DPO, best-of-N, eval) from TOML files",
    long_about = "Run LLM post-training experiments from TOML files.\n\n\
An experiment (experiments/NAME.toml) is a DAG of stages. Every stage is keyed by a blake3 hash \
of its kind, settings, upstream keys, dataset contents and seed; `run` computes only the stages \
whose key is not in the store yet, and `plan` says why.",
    after_help = "Examples:\n  \
posttrain run llama-dpo                 build every stale stage, reuse the rest\n  \
posttrain plan llama-dpo                what would run and why (alias: status)\n  \
posttrain run llama-dpo --until sft     only sft and what it reads\n  \
posttrain run llama-dpo --keep-going    build what is fine when a dataset is not\n  \
posttrain compare llama-dpo llama-rlhf  eval rows side by side, and the settings that differ\n  \
posttrain sample llama-dpo dpo --prompt \"What is 2 plus 2?\"\n\n\
Exit codes: 0 success; 1 an error (bad experiment, data, a failed stage); 2 a usage error (unknown flag, missing argument)."
)]
struct Cli {
    /// Store folder for stage outputs [default: results/store; env: POSTTRAIN_STORE]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// No progress display or status lines
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment: compute stale stages, reuse cached ones
    Run {
        /// Experiment name under experiments/, or a path to a .toml file
        experiment: String,
        /// Rebuild this stage even if it is cached (repeatable)
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Run only this stage and the stages it depends on
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// Show what would run, run nothing
        #[arg(long)]
        dry_run: bool,
        /// Where stale stages are built [default: posttrain.toml's run.executor, else local]
        #[arg(long, value_enum)]
        executor: Option<runner::config::ExecutorName>,
        /// Local executor: build up to N independent stages at once [default: posttrain.toml's run.jobs, else 1]
        #[arg(long, short, value_name = "N")]
        jobs: Option<usize>,
        /// Slurm executor: submit the jobs and return without waiting (see `status`, `cancel`)
        #[arg(long)]
        detach: bool,
        /// When a dataset has a problem, still build every stage whose data is fine
        #[arg(long, short = 'k')]
        keep_going: bool,
    },
    /// Cancel the cluster jobs submitted for an experiment's stages
    Cancel { experiment: String },
    /// Build the one stage a cluster job's spec names (what Slurm jobs run)
    #[command(hide = true)]
    BuildJob { spec: PathBuf },
    /// Show each stage as cached or stale, and why
    #[command(visible_alias = "status")]
    Plan {
        experiment: String,
        /// One JSON object per stage (name, kind, key, status, reasons)
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph
    Dag {
        experiment: String,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// List the experiments under experiments/ with their stages
    List,
    /// Remove store entries that no registered project's experiment files, last runs or live runs use
    Gc {
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Remove only entries published longer ago than this (90s, 30m, 12h, 7d)
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Keep the entries of each experiment's last N finished runs (0 = only what the experiment files reference now)
        #[arg(long, value_name = "N", default_value_t = 1)]
        last_runs: usize,
        /// Drop a project root from the store's registry first (it is gone; repeatable)
        #[arg(long, value_name = "ROOT")]
        forget: Vec<PathBuf>,
    },
    /// Rehash store entries (blake3) against their manifests; move corrupt ones out and rebuild them
    Verify {
        /// Only this experiment's entries, rebuilt by running it; without it, every entry (not rebuilt)
        experiment: Option<String>,
    },
    /// Compare the last runs of experiments in one table
    Compare {
        #[arg(required = true)]
        experiments: Vec<String>,
        /// Metric columns to show (comma separated) [default: all]
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
        /// Sort by this column (metrics descending)
        #[arg(long)]
        sort: Option<String>,
        /// Also write the table to FILE (.parquet or .csv)
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Compare the stages' final metrics (runs.parquet) instead of the eval rows
        #[arg(long)]
        runs: bool,
    },
    /// Write results/EXP/report.html: the eval and runs tables and every plot in one page
    Report { experiment: String },
    /// Answer prompts with a model stage of an experiment (interactive without --prompt)
    Sample {
        experiment: String,
        /// A model stage (pretrain, load, sft, ...)
        stage: String,
        /// The user's message; repeat for a batch. Without it, read lines from stdin.
        #[arg(long)]
        prompt: Vec<String>,
        /// 0 = greedy
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        /// Keep only the k most likely tokens (0 = all)
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1 = off)
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// "model" (the model's own template when it has one), "posttrain", or a .jinja file
        #[arg(long, default_value = "model")]
        chat_template: String,
        /// Read {"prompt": "..."} lines from stdin, write {"prompt", "answer", "finished"} lines
        #[arg(long, conflicts_with = "prompt")]
        jsonl: bool,
    },
    /// Write a model as a GGUF file (for llama.cpp and Ollama), with its tokenizer and chat template
    Export {
        /// A model folder, or EXPERIMENT:STAGE
        model: String,
        /// The file to write (.gguf)
        #[arg(long)]
        out: PathBuf,
        /// Tensor type: f32, f16 or q8_0 (norms and biases stay f32)
        #[arg(long = "type", default_value = "f16")]
        kind: String,
    },
    /// Per-token log-probabilities (JSON) of text under a model, or a corpus's perplexity
    Score {
        /// A model folder (config.json + *.safetensors), or EXPERIMENT:STAGE
        model: String,
        /// Text to score (tokenized with the model's tokenizer.json)
        #[arg(long, conflicts_with_all = ["ids", "perplexity"])]
        text: Option<String>,
        /// Raw token ids, comma separated (needs no tokenizer)
        #[arg(long, value_delimiter = ',', conflicts_with = "perplexity")]
        ids: Vec<usize>,
        /// A corpus (Parquet with a `text` column, or a text file, one document a line)
        #[arg(long, value_name = "FILE")]
        perplexity: Option<PathBuf>,
    },
    /// Dataset tools
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the synthetic assistant world (all default settings) to a folder
    Synth {
        /// Output folder
        #[arg(long, default_value = "datasets/assistant")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Overwrite files already in the output folder
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
}

/// mimalloc: training allocates and frees the same large buffers every
/// step (activations, gradients, packed GEMM panels); glibc returns such
/// blocks to the kernel and faults the pages in again each time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (its index in mimalloc 3's option enum).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed pages 3 s (mimalloc 3's default: 1 s, its arenas the same)
/// before handing them back to the kernel, so that a training step's
/// buffers reuse the pages the last ones freed instead of faulting in
/// fresh ones the kernel zeroes: that zeroing was 22% of a SmolLM2 SFT
/// step. Measured on SmolLM2 SFT / DPO (README): 3 s gave most of the
/// speed of 10 s for less peak RSS (10 s: up to 0.5 GB more). A user's own
/// setting wins: mimalloc's `MIMALLOC_PURGE_DELAY`, or its older name
/// `MIMALLOC_RESET_DELAY`, in any case (as mimalloc reads them).
fn keep_freed_memory() {
    let user_set = std::env::vars_os().any(|(name, _)| {
        let name = name.to_string_lossy().to_ascii_uppercase();
        name == "MIMALLOC_PURGE_DELAY" || name == "MIMALLOC_RESET_DELAY"
    });
    if !user_set {
        // SAFETY: sets one of mimalloc's integer options; any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 3_000) };
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", render_error(&err));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes, each cause once: many messages already hold
/// their cause's text, which `{:#}` would print a second time.
fn render_error(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// The store folder of a model stage, leased (so gc leaves it) until the
/// returned lease drops; a stage that writes no model is refused by name,
/// with the experiment's model stages.
fn model_stage(
    project: &Project,
    exp: &Experiment,
    stage: &str,
    command: &str,
) -> anyhow::Result<(PathBuf, Option<Lease>)> {
    let models: Vec<&str> = exp
        .stages
        .iter()
        .filter(|(_, s)| {
            s.settings
                .outputs()
                .is_some_and(|o| o.iter().any(|f| f == "config.json"))
        })
        .map(|(n, _)| n.as_str())
        .collect();
    if let Some(s) = exp.stages.get(stage) {
        if !models.contains(&stage) {
            anyhow::bail!(
                "stage `{stage}` of `{}` is a {} stage, not a model: `{command}` needs a stage that writes a model\n  help: model stages of this experiment: {}",
                exp.name,
                s.settings.kind(),
                if models.is_empty() { "none".to_string() } else { models.join(", ") }
            );
        }
    }
    let dir = runner::stage_output(project, exp, stage)?;
    let key = dir.file_name().unwrap_or_default().to_string_lossy();
    let keys = std::iter::once(key.into_owned()).collect();
    let mut lease = Lease::take(&project.store, &exp.name, &project.root, &keys)
        .context("cannot lease the model's store entry")?;
    lease.remove_on_drop = true;
    // gc may have removed it between the plan and the lease.
    if !dir.join("config.json").is_file() {
        anyhow::bail!(
            "the store entry of `{stage}` was removed meanwhile (by gc?)\n  help: build it again: posttrain run {} --until {stage}",
            exp.name
        );
    }
    Ok((dir, Some(lease)))
}

/// A model folder given as a path or as EXPERIMENT:STAGE.
fn model_dir(
    project: &Project,
    model: &str,
    command: &str,
) -> anyhow::Result<(PathBuf, Option<Lease>)> {
    if Path::new(model).is_dir() {
        Ok((PathBuf::from(model), None))
    } else if let Some((exp, stage)) = model.split_once(':') {
        let exp = load(project, exp)?;
        model_stage(project, &exp, stage, command)
    } else {
        anyhow::bail!("`{model}` is neither a model folder nor EXPERIMENT:STAGE");
    }
}

fn load(project: &Project, name: &str) -> Result<Experiment> {
    let path = experiment::find(&project.root, name)?;
    Ok(experiment::load(&path, &project.root)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cwd = std::env::current_dir().context("cannot read the current folder")?;
    let project = Project::discover(&cwd, cli.store.clone());
    project.store.check_usable().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Run {
            experiment,
            force,
            until,
            dry_run,
            executor,
            jobs,
            detach,
            keep_going,
        } => {
            let exp = load(&project, &experiment)?;
            let config = runner::config::ProjectConfig::load(&project.root)?;
            if jobs == Some(0) {
                anyhow::bail!("--jobs must be at least 1");
            }
            let jobs = jobs.or(config.run.jobs).unwrap_or(1);
            let executor = match executor.or(config.run.executor) {
                None | Some(runner::config::ExecutorName::Local) => {
                    if detach {
                        anyhow::bail!("--detach needs the slurm executor (--executor slurm)");
                    }
                    runner::Executor::Local { jobs }
                }
                Some(runner::config::ExecutorName::Slurm) => {
                    runner::Executor::Slurm(config.slurm.clone())
                }
            };
            let options = RunOptions {
                force,
                until,
                dry_run,
                quiet: cli.quiet,
                executor,
                detach,
                keep_going,
            };
            let report = runner::run(&project, &exp, &options)?;
            print_run_report(&report, dry_run);
            if !dry_run {
                let stale_evals: Vec<&str> = report
                    .stages
                    .iter()
                    .filter(|s| {
                        s.kind == "eval"
                            && matches!(s.status, Status::Skipped | Status::Blocked)
                            && !s.reasons.is_empty()
                    })
                    .map(|s| s.name.as_str())
                    .collect();
                if stale_evals.is_empty() {
                    print_eval_summary(&report.results_dir)?;
                } else {
                    println!(
                        "eval table not shown: `{}` was not built for the current settings, so the last table is from an earlier configuration",
                        stale_evals.join("`, `")
                    );
                }
            }
            if !report.blocked.is_empty() {
                for (stage, why) in &report.blocked {
                    eprintln!("error: stage `{stage}` not built: {}", why.join("; "));
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Cancel { experiment } => {
            let exp = load(&project, &experiment)?;
            let plan = runner::plan(&project, &exp)?;
            let keys: Vec<&str> = plan.stages.iter().map(|s| s.key()).collect();
            let cancelled = runner::slurm::cancel(&project, &keys)?;
            if cancelled.is_empty() {
                println!("no queued or running job of `{}` to cancel", exp.name);
            }
            for (stage, job) in cancelled {
                println!("cancelled {stage} (job {job})");
            }
        }
        Command::BuildJob { spec } => {
            runner::job::build_job(&spec, cli.quiet)?;
        }
        Command::Plan { experiment, json } => {
            let exp = load(&project, &experiment)?;
            let plan = runner::plan(&project, &exp)?;
            let keys: Vec<&str> = plan.stages.iter().map(|s| s.key()).collect();
            let jobs = runner::slurm::claimed(&project, &keys);
            let status_of = |s: &posttrain::plan::PlannedStage| -> String {
                if s.cached {
                    return "cached".into();
                }
                match jobs.get(s.key()) {
                    Some((job, state, _)) => format!("{} (job {job})", state.to_lowercase()),
                    None => "stale".into(),
                }
            };
            for s in &plan.stages {
                if json {
                    let reasons: Vec<serde_json::Value> = s
                        .reasons
                        .iter()
                        .map(|r| {
                            let mut v = serde_json::to_value(r).expect("reason serializes");
                            v["message"] = serde_json::Value::String(r.to_string());
                            v
                        })
                        .collect();
                    let line = serde_json::json!({
                        "name": s.name, "kind": s.kind(), "key": s.key(),
                        "status": if s.cached { "cached" } else { "stale" },
                        "job": jobs.get(s.key()).map(|(job, state, log)| serde_json::json!({
                            "id": job, "state": state, "log": log,
                        })),
                        "reasons": reasons,
                    });
                    println!("{line}");
                }
            }
            if !json {
                let rows: Vec<Vec<String>> = plan
                    .stages
                    .iter()
                    .map(|s| {
                        let why = s
                            .reasons
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ");
                        vec![
                            s.name.clone(),
                            s.kind().to_string(),
                            s.key()[..12].to_string(),
                            status_of(s),
                            why,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["stage", "kind", "key", "status", "why"], &rows)
                );
                for problem in posttrain::plan::check_data::check(&exp, &project.root) {
                    println!("data problem: {problem}");
                }
                let stale = plan.stages.iter().filter(|s| !s.cached).count();
                if stale == 0 {
                    println!(
                        "\nall {} stages are cached: `posttrain run {}` would compute nothing",
                        plan.stages.len(),
                        exp.name
                    );
                } else {
                    println!("\n{stale} of {} stages would run", plan.stages.len());
                }
            }
        }
        Command::Dag { experiment, format } => {
            let exp = load(&project, &experiment)?;
            let dag = posttrain::plan::Dag::build(&exp)?;
            match format {
                DagFormat::Text => print!("{}", dag.to_text(&exp)),
                DagFormat::Dot => print!("{}", dag.to_dot(&exp)),
            }
        }
        Command::List => {
            let names = experiment::available(&project.root);
            if names.is_empty() {
                println!(
                    "no experiments in {}",
                    project.root.join("experiments").display()
                );
            }
            let mut failed = false;
            for name in names {
                match load(&project, &name).and_then(|exp| Ok((runner::plan(&project, &exp)?, exp)))
                {
                    Ok((plan, exp)) => {
                        let cached = plan.stages.iter().filter(|s| s.cached).count();
                        println!(
                            "{name}: {cached}/{} stages cached{}",
                            plan.stages.len(),
                            if exp.description.is_empty() {
                                String::new()
                            } else {
                                format!(" — {}", exp.description)
                            }
                        );
                        for s in &plan.stages {
                            let mark = if s.cached { "cached" } else { "stale" };
                            println!("  {:<20} {:<12} {mark}", s.name, s.kind());
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!("{name}: invalid: {e:#}");
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Gc {
            dry_run,
            older_than,
            last_runs,
            forget,
        } => {
            use posttrain::store::keep;
            let older_than = older_than
                .map(|d| keep::parse_duration(&d))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--older-than {e}"))?;
            let options = keep::GcOptions {
                dry_run,
                older_than,
                last_runs,
                forget,
            };
            let out = keep::gc(&project.store, &project.root, &options).context("gc failed")?;
            let report = &out.report;
            let verb = if dry_run { "would remove" } else { "removed" };
            for note in &out.notes {
                eprintln!("note: {note}");
            }
            for key in &report.entries {
                println!("{verb} {key}");
            }
            for tmp in &report.temporary {
                println!("{verb} .tmp/{tmp}");
            }
            if report.young > 0 {
                println!(
                    "kept {} unused entries published within --older-than",
                    report.young
                );
            }
            println!(
                "{verb} {} entries, {} unfinished builds and {:.1} MB of caches ({:.1} MB in all); kept {} entries used by {} experiments of {} projects and {} live runs",
                report.entries.len(),
                report.temporary.len(),
                report.cache_bytes as f64 / 1e6,
                report.bytes as f64 / 1e6,
                out.kept,
                out.experiments,
                out.projects,
                out.live_runs
            );
        }
        Command::Verify { experiment } => {
            use posttrain::store::verify;
            let exp = experiment.map(|e| load(&project, &e)).transpose()?;
            let keys = match &exp {
                Some(exp) => runner::plan(&project, exp)?
                    .stages
                    .iter()
                    .map(|s| s.key().to_string())
                    .collect(),
                None => project.store.keys().context("cannot list the store")?,
            };
            let report = verify::verify(&project.store, &keys, true).context("verify failed")?;
            for (key, problem) in &report.corrupt {
                println!("corrupt {key}: {problem}; moved out of the store");
            }
            for key in &report.busy {
                println!("busy {key}: another run is building it; not checked");
            }
            println!(
                "verified {} entries ({:.1} MB): {} corrupt",
                report.checked,
                report.bytes as f64 / 1e6,
                report.corrupt.len()
            );
            if let Some(exp) = &exp {
                if !report.corrupt.is_empty() {
                    let options = RunOptions {
                        quiet: cli.quiet,
                        ..RunOptions::default()
                    };
                    let run = runner::run(&project, exp, &options)?;
                    print_run_report(&run, false);
                }
            } else if !report.corrupt.is_empty() {
                println!("rebuild them by running the experiments that use them (`posttrain verify EXPERIMENT` does both)");
            }
        }
        Command::Compare {
            experiments,
            metrics,
            sort,
            out,
            runs,
        } => {
            use posttrain::results::{compare, eval_table, experiment_plots, plots};
            set_table_format();
            let eval = if runs {
                None
            } else {
                compare::eval_table(&project.root, &experiments)?
            };
            let mut df = match &eval {
                Some(all) => {
                    // The eval table is wide: the summary columns unless asked.
                    let shown: Vec<String> = if metrics.is_empty() {
                        eval_table::SUMMARY_COLUMNS[1..]
                            .iter()
                            .map(|c| c.to_string())
                            .collect()
                    } else {
                        metrics.clone()
                    };
                    let (all, swept) = compare::with_swept_columns(
                        all.clone(),
                        "policy",
                        &compare::EVAL_ID_COLUMNS,
                    )?;
                    let ids: Vec<&str> = compare::EVAL_ID_COLUMNS
                        .iter()
                        .copied()
                        .chain(swept.iter().map(String::as_str))
                        .collect();
                    compare::select_and_sort(all, &ids, &shown, sort.as_deref())?
                }
                None => {
                    let df = compare::compare_table(&project.root, &experiments)?;
                    let (df, swept) =
                        compare::with_swept_columns(df, "stage", &compare::ID_COLUMNS)?;
                    let ids: Vec<&str> = compare::ID_COLUMNS
                        .iter()
                        .copied()
                        .chain(swept.iter().map(String::as_str))
                        .collect();
                    let metrics = if metrics.is_empty() {
                        // All metrics of every kind are dozens of columns:
                        // the ones most stages have, as many as fit.
                        let (shown, left) =
                            compare::fitting_metrics(&df, &ids, terminal_width().unwrap_or(160));
                        if left > 0 {
                            eprintln!(
                                "{left} more metric columns: name them with --metrics a,b, or write all with --out FILE"
                            );
                        }
                        shown
                    } else {
                        metrics
                    };
                    compare::select_and_sort(df, &ids, &metrics, sort.as_deref())?
                }
            };
            println!("{df}");
            if let Some(all) = &eval {
                let dir = project.root.join("results").join("compare");
                let points = experiment_plots::policy_points(all, true)?;
                let title = format!("{}: reward vs KL to the reference", experiments.join(", "));
                let written = plots::reward_vs_kl(&points, &title, &dir)?;
                if let Some(svg) = written.first() {
                    eprintln!("reward vs KL of these policies: {}", svg.display());
                }
            }
            if experiments.len() == 2 {
                let changed =
                    compare::changed_settings(&project.root, &experiments[0], &experiments[1]);
                if changed.is_empty() {
                    println!("no settings differ between the matching stages");
                } else {
                    let rows: Vec<Vec<String>> = changed
                        .into_iter()
                        .map(|(s, f, a, b)| vec![s, f, a, b])
                        .collect();
                    println!("settings that differ:");
                    print!(
                        "{}",
                        table(&["stage", "field", &experiments[0], &experiments[1]], &rows)
                    );
                }
            }
            if let Some(path) = out {
                compare::write_table(&mut df, &path)?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Report { experiment } => {
            let exp = load(&project, &experiment)?;
            let dir = posttrain::results::experiment_dir(&project.root, &exp.name);
            let path = posttrain::results::report::write_report(&dir, &exp.name)?;
            println!("{}", path.display());
        }
        Command::Sample {
            experiment,
            stage,
            prompt,
            temperature,
            top_k,
            top_p,
            max_new_tokens,
            seed,
            chat_template,
            jsonl,
        } => {
            let settings = posttrain::model::generate::SampleSettings {
                temperature,
                top_k,
                top_p,
                max_new_tokens,
            };
            settings.check().map_err(|e| {
                anyhow::anyhow!("sample: {e}\n  help: --temperature, --top-p and --max-new-tokens follow the rules of a stage's `sampling` table")
            })?;
            let exp = load(&project, &experiment)?;
            let (dir, _lease) = model_stage(&project, &exp, &stage, "sample")?;
            let choice = posttrain::chat::TemplateChoice::parse(
                Some(&chat_template),
                &std::env::current_dir().context("no current directory")?,
            )
            .map_err(anyhow::Error::msg)?;
            let model = posttrain::model::chat::ChatModel::load(&dir, &choice)?;
            if jsonl {
                // One JSON object in, one out, in order: {"prompt": ...} ->
                // {"prompt", "answer", "finished"}; a bad line is an error
                // naming it, never a silently dropped row.
                use std::io::BufRead;
                for (i, line) in std::io::stdin().lock().lines().enumerate() {
                    let line = line.context("cannot read standard input")?;
                    let value: serde_json::Value = serde_json::from_str(&line)
                        .with_context(|| format!("stdin line {}: not JSON", i + 1))?;
                    let Some(text) = value.get("prompt").and_then(|p| p.as_str()) else {
                        anyhow::bail!("stdin line {}: expected {{\"prompt\": \"...\"}}", i + 1);
                    };
                    let answer = model.answer(&[text.to_string()], &settings, seed + i as u64)?;
                    let out = serde_json::json!({
                        "prompt": text,
                        "answer": answer[0].text,
                        "finished": answer[0].finished,
                    });
                    println!("{out}");
                }
            } else if prompt.is_empty() {
                use std::io::BufRead;
                eprintln!("{stage} ({}): type a message, Ctrl-D to quit", exp.name);
                for (i, line) in std::io::stdin().lock().lines().enumerate() {
                    let line = line.context("cannot read standard input")?;
                    if line.trim().is_empty() {
                        // An empty answer keeps the answers in line with the input.
                        println!();
                        continue;
                    }
                    let answer = model.answer(&[line], &settings, seed + i as u64)?;
                    // One line per answer, so answers stay in line with the input.
                    println!("{}", answer[0].text.replace('\n', " "));
                }
            } else {
                let clock = std::time::Instant::now();
                let answers = model.answer(&prompt, &settings, seed)?;
                let secs = clock.elapsed().as_secs_f64();
                if !cli.quiet {
                    // Generated tokens, each answer's stop token included.
                    let tokens: usize = answers
                        .iter()
                        .map(|a| a.tokens + usize::from(a.finished))
                        .sum();
                    eprintln!(
                        "generated {tokens} tokens for {} prompts in {secs:.2} s ({:.1} tokens/s)",
                        answers.len(),
                        tokens as f64 / secs.max(1e-9)
                    );
                }
                for (p, a) in prompt.iter().zip(answers) {
                    let note = if a.finished {
                        ""
                    } else {
                        " [cut at --max-new-tokens]"
                    };
                    println!("> {p}\n{}{note}", a.text);
                }
            }
        }
        Command::Export { model, out, kind } => {
            let (dir, _lease) = model_dir(&project, &model, "export")?;
            let Some(kind) = posttrain::model::gguf_checkpoint::ExportType::parse(&kind) else {
                anyhow::bail!("--type `{kind}`: use f32, f16 or q8_0");
            };
            if out.extension().is_none_or(|e| e != "gguf") {
                anyhow::bail!("--out {}: name the file *.gguf", out.display());
            }
            posttrain::model::gguf_checkpoint::export_folder(&dir, &out, kind)?;
            println!("{}", out.display());
        }
        Command::Score {
            model,
            text,
            ids,
            perplexity,
        } => {
            let (dir, _lease) = model_dir(&project, &model, "score")?;
            let scorer = posttrain::model::score::Scorer::load(&dir)?;
            if let Some(file) = perplexity {
                let docs: Vec<String> = if file.extension().is_some_and(|e| e == "parquet") {
                    let df = posttrain::data::read_parquet(&file)?;
                    posttrain::data::formats::load_corpus(&df, &file)?
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .collect()
                };
                let (mut nll, mut n) = (0.0f64, 0usize);
                for doc in &docs {
                    let lp = scorer.logprobs(&scorer.encode(doc)?);
                    finite_logprobs(&lp, &dir)?;
                    nll -= lp.iter().map(|x| *x as f64).sum::<f64>();
                    n += lp.len();
                }
                let mean = nll / n.max(1) as f64;
                println!(
                    "{}",
                    serde_json::json!({"documents": docs.len(), "tokens": n, "nll": mean, "perplexity": mean.exp()})
                );
            } else {
                let ids = match text {
                    Some(t) if t.trim().is_empty() => {
                        anyhow::bail!("--text is empty: there is nothing to score\n  help: give the text to score, e.g. --text \"The capital of Oria is\"")
                    }
                    Some(t) => scorer.encode(&t)?,
                    None if !ids.is_empty() => ids,
                    None => anyhow::bail!("give --text, --ids or --perplexity"),
                };
                if let Some(bad) = ids.iter().find(|i| **i >= scorer.vocab_size()) {
                    anyhow::bail!(
                        "token id {bad} is outside the vocabulary (size {})",
                        scorer.vocab_size()
                    );
                }
                if ids.is_empty() {
                    anyhow::bail!("the text gives no tokens: there is nothing to score");
                }
                let lp = scorer.logprobs(&ids);
                finite_logprobs(&lp, &dir)?;
                let logprobs: Vec<Option<f32>> = std::iter::once(None)
                    .chain(lp.into_iter().map(Some))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"tokens": ids, "logprobs": logprobs})
                );
            }
        }
        Command::Data(DataCommand::Synth { out, seed, force }) => {
            let existing = std::fs::read_dir(&out).map_or(0, |d| d.count());
            if existing > 0 && !force {
                anyhow::bail!(
                    "{} already holds {existing} files, which this would overwrite\n  help: pass --force to overwrite them, or write elsewhere with --out DIR",
                    out.display()
                );
            }
            let cfg = posttrain::data::synth::SynthConfig::default();
            let mut data = posttrain::data::synth::generate(&cfg, seed)?;
            posttrain::data::synth::write(&mut data, &out)?;
            println!(
                "wrote the synthetic world (seed {seed}) to {}",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuse NaN or infinite log-probabilities: the model's weights are not
/// finite, and `null`s in the output would hide it.
fn finite_logprobs(lp: &[f32], dir: &Path) -> Result<()> {
    if let Some(i) = lp.iter().position(|x| !x.is_finite()) {
        anyhow::bail!(
            "the model in {} gives a non-finite log-probability ({}) at token {}: its weights hold NaN or infinite values\n  help: rebuild or re-download the model; `posttrain verify` checks store entries against their manifests",
            dir.display(),
            lp[i],
            i + 1
        );
    }
    Ok(())
}

/// Columns of the terminal on stdout (`COLUMNS` first); `None` when
/// stdout is not a terminal (a pipe or a file gets the whole table).
fn terminal_width() -> Option<usize> {
    if let Some(w) = std::env::var("COLUMNS").ok().and_then(|v| v.parse().ok()) {
        return Some(w);
    }
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ fills a winsize; nothing else is touched.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 {
            return Some(size.ws_col as usize);
        }
    }
    None
}

/// Polars' table printing: every column, no shape line, no dtype row,
/// unless the user set these variables themselves.
fn set_table_format() {
    for (var, value) in [
        ("POLARS_FMT_MAX_COLS", "-1"),
        ("POLARS_FMT_MAX_ROWS", "50"),
        ("POLARS_FMT_TABLE_HIDE_DATAFRAME_SHAPE_INFORMATION", "1"),
        ("POLARS_FMT_TABLE_HIDE_COLUMN_DATA_TYPES", "1"),
        ("POLARS_FMT_TABLE_HIDE_COLUMN_SEPARATOR", "1"),
        ("POLARS_FMT_STR_LEN", "60"),
        ("POLARS_TABLE_WIDTH", "220"),
    ] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value);
        }
    }
}

/// The eval table of a run, when the experiment has an eval stage.
fn print_eval_summary(results_dir: &std::path::Path) -> Result<()> {
    use posttrain::results::eval_table;
    let Ok(df) = eval_table::read_eval(results_dir) else {
        return Ok(());
    };
    set_table_format();
    let width = terminal_width();
    if let Some(w) = width {
        std::env::set_var("POLARS_TABLE_WIDTH", w.to_string());
    }
    let summary = eval_table::summary_fitting(&df, width.unwrap_or(usize::MAX))
        .context("cannot summarise the eval table")?;
    let legend = if summary.column("gold").is_ok() {
        "gold = the synthetic world's gold score, [low, high] its 95% bootstrap interval; kl in nats"
    } else {
        "reward = the reward model's score; kl in nats"
    };
    println!("\nEval ({legend}):\n{summary}");
    println!(
        "Full table: {}",
        results_dir.join(eval_table::EVAL_FILE).display()
    );
    Ok(())
}

fn print_run_report(report: &runner::RunReport, dry_run: bool) {
    let rows: Vec<Vec<String>> = report
        .stages
        .iter()
        .map(|s| {
            let metrics = s
                .metrics
                .iter()
                .take(4)
                .map(|(k, v)| format!("{k}={}", format_metric(*v)))
                .collect::<Vec<_>>()
                .join(" ");
            let why = s
                .reasons
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            let detail = if s.status == Status::Cached {
                metrics
            } else if dry_run {
                why
            } else {
                metrics
            };
            vec![
                s.name.clone(),
                s.kind.clone(),
                s.key[..12].to_string(),
                s.status.as_str().to_string(),
                format!("{:.2}", s.duration_s),
                detail,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["stage", "kind", "key", "status", "time_s", "metrics"],
            &rows
        )
    );
    let ran = report
        .stages
        .iter()
        .filter(|s| s.status == Status::Ran)
        .count();
    let skipped_stale: Vec<&str> = report
        .stages
        .iter()
        .filter(|s| s.status == Status::Skipped && !s.reasons.is_empty())
        .map(|s| s.name.as_str())
        .collect();
    if dry_run {
        let would = report
            .stages
            .iter()
            .filter(|s| s.status == Status::WouldRun)
            .count();
        println!("dry run: {would} stages would run");
    } else if !skipped_stale.is_empty() || !report.blocked.is_empty() {
        if !skipped_stale.is_empty() {
            println!(
                "not run: {} (stale, left out by --until; run without it to build them)",
                skipped_stale.join(", ")
            );
        }
        if !report.blocked.is_empty() {
            let names: Vec<&str> = report.blocked.keys().map(String::as_str).collect();
            println!(
                "not built: {} (a problem with their data, or a failure upstream: see the errors)",
                names.join(", ")
            );
        }
        if ran > 0 {
            println!("results in {}", report.results_dir.display());
        }
    } else if ran == 0 {
        println!(
            "nothing to do: every stage was cached (see why with `posttrain plan {}`)",
            report.experiment
        );
    } else {
        println!("results in {}", report.results_dir.display());
    }
}

fn format_metric(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

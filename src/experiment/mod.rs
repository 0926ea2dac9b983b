//! Experiment files: reading (TOML, includes), type-checking each stage's
//! settings against its kind, and checking references, datasets and cycles,
//! all before anything runs. Loading is two steps, as the style guide asks:
//! [`source::read`] gives the raw merged tables; [`load`] resolves them.

pub mod defaults;
pub mod error;
pub mod matrix;
pub mod names;
pub mod references;
pub mod resources;
pub mod source;
pub mod splits;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use error::{ErrorKind, ExperimentError, Location};
use source::{RawField, RawStage};

use crate::stages::{InputTarget, StageSettings, KINDS};
use crate::text::{closest, did_you_mean, quoted_list};

/// Fields every stage may have besides its kind's settings. `description`
/// is documentation (not in the cache key); `seed` overrides the
/// experiment's; `resources` is what a cluster job asks for (not in the
/// key); `matrix` sweeps fields (see [`matrix`]).
const COMMON_FIELDS: [&str; 5] = ["kind", "seed", "description", "resources", "matrix"];

/// Default experiment seed when `[experiment] seed` is not given.
pub const DEFAULT_SEED: u64 = 0;

/// A resolved, validated experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub description: String,
    pub seed: u64,
    /// The experiment file given, then the files it included.
    pub path: PathBuf,
    pub files: Vec<PathBuf>,
    /// Stages by name.
    pub stages: BTreeMap<String, Stage>,
}

/// One stage of an experiment.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub description: Option<String>,
    pub seed: u64,
    pub settings: StageSettings,
    /// A cluster job's request as written (`resources = {...}`); the
    /// executor fills the rest from the kind's defaults.
    pub resources: resources::ResourcesOverride,
    /// The settings as written (after includes and matrix expansion), which
    /// a cluster job parses again to build exactly this stage.
    pub table: toml::Table,
    pub at: Location,
}

/// Find an experiment by name (`experiments/NAME.toml` under `root`) or path.
pub fn find(root: &Path, name_or_path: &str) -> Result<PathBuf, ExperimentError> {
    let as_path = Path::new(name_or_path);
    if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
        let path = if as_path.is_absolute() || as_path.exists() {
            as_path.to_path_buf()
        } else {
            root.join(as_path)
        };
        if path.is_file() {
            return Ok(path);
        }
    } else {
        let path = root
            .join("experiments")
            .join(format!("{name_or_path}.toml"));
        if path.is_file() {
            return Ok(path);
        }
    }
    let available = available(root);
    let mut err = ExperimentError::new(
        ErrorKind::ExperimentNotFound,
        None,
        format!(
            "no experiment `{name_or_path}` in {}{}",
            root.join("experiments").display(),
            did_you_mean(name_or_path, available.iter().map(String::as_str))
        ),
    );
    err = err.with_help(if available.is_empty() {
        "there are no experiment files yet: create experiments/NAME.toml".to_string()
    } else {
        format!("available experiments: {}", available.join(", "))
    });
    Err(err)
}

/// Names of the experiments under `root/experiments` (files starting with
/// `_` are shared includes, not experiments).
pub fn available(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = walkdir::WalkDir::new(root.join("experiments"))
        .max_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".toml")?.to_string();
            (!name.starts_with('_') && e.file_type().is_file()).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// Read, type-check and validate an experiment file. `root` is the project
/// root that dataset paths are relative to.
pub fn load(path: &Path, root: &Path) -> Result<Experiment, ExperimentError> {
    let raw = source::read(path)?;
    let header = Header::from_raw(&raw.header, path)?;
    if raw.stages.is_empty() {
        return Err(ExperimentError::new(
            ErrorKind::MissingField,
            Some(Location {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
            }),
            format!("experiment `{}` has no stages", header.name),
        )
        .with_help("add one, e.g. [stages.world] with kind = \"synth\"; `posttrain list` shows the experiments there are"));
    }

    let (mut raw_stages, groups) = matrix::expand(&raw.stages, |name, stage| {
        resolve_stage(name, stage, header.seed)
    })?;
    let mut stages = BTreeMap::new();
    for (name, raw_stage) in &raw_stages {
        names::check_stage(name).map_err(|m| {
            ExperimentError::new(ErrorKind::InvalidValue, Some(raw_stage.header.clone()), m)
                .with_help(names::RULE)
        })?;
        let stage = resolve_stage(name, raw_stage, header.seed)?;
        stages.insert(name.clone(), stage);
    }
    for name in matrix::expand_references(&stages, &mut raw_stages, &groups)? {
        let stage = resolve_stage(&name, &raw_stages[&name], header.seed)?;
        stages.insert(name, stage);
    }
    let kinds: BTreeMap<String, &'static str> = stages
        .iter()
        .map(|(n, s)| (n.clone(), s.settings.kind()))
        .collect();
    for stage in stages.values_mut() {
        defaults::resolve(&mut stage.settings, &|n| kinds.get(n).copied());
    }
    for (name, stage) in &stages {
        crate::memory::check(stage, &stages).map_err(|(field, message)| {
            let fields = &raw_stages[name].fields;
            let at = fields
                .get(&field)
                .map(|f| f.value_at.clone())
                .unwrap_or_else(|| raw_stages[name].header.clone());
            ExperimentError::new(
                ErrorKind::InvalidValue,
                Some(at),
                format!("stage `{name}`: `{field}` {message}"),
            )
        })?;
    }
    check_references(&stages, &raw_stages)?;
    check_datasets(&stages, &raw_stages, root)?;
    splits::check(&stages, &raw_stages)?;
    let experiment = Experiment {
        name: header.name,
        description: header.description,
        seed: header.seed,
        path: path.to_path_buf(),
        files: raw.files,
        stages,
    };
    crate::plan::dag::Dag::build(&experiment)?;
    Ok(experiment)
}

struct Header {
    name: String,
    description: String,
    seed: u64,
}

impl Header {
    fn from_raw(
        fields: &BTreeMap<String, RawField>,
        path: &Path,
    ) -> Result<Header, ExperimentError> {
        let string = |key: &str| -> Result<Option<String>, ExperimentError> {
            match fields.get(key) {
                None => Ok(None),
                Some(f) => f
                    .value
                    .as_str()
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| wrong_type(f, &format!("`experiment.{key}` must be a string"))),
            }
        };
        let seed = match fields.get("seed") {
            None => DEFAULT_SEED,
            Some(f) => f
                .value
                .as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| wrong_type(f, "`experiment.seed` must be a non-negative integer"))?,
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("experiment");
        let name = string("name")?.unwrap_or_else(|| stem.to_string());
        names::check("experiment", &name).map_err(|m| {
            let at = fields.get("name").map_or(
                Location {
                    file: path.to_path_buf(),
                    line: 1,
                    col: 1,
                },
                |f| f.value_at.clone(),
            );
            let m = if fields.contains_key("name") {
                m
            } else {
                format!("{m} (taken from the file name; set `[experiment] name`)")
            };
            ExperimentError::new(ErrorKind::InvalidValue, Some(at), m).with_help(names::RULE)
        })?;
        Ok(Header {
            name,
            description: string("description")?.unwrap_or_default(),
            seed,
        })
    }
}

fn wrong_type(field: &RawField, message: &str) -> ExperimentError {
    ExperimentError::new(ErrorKind::WrongType, Some(field.value_at.clone()), message)
}

fn resolve_stage(
    name: &str,
    raw: &RawStage,
    experiment_seed: u64,
) -> Result<Stage, ExperimentError> {
    let kind_field = raw.fields.get("kind").ok_or_else(|| {
        ExperimentError::new(
            ErrorKind::MissingField,
            Some(raw.header.clone()),
            format!("stage `{name}` has no `kind`"),
        )
        .with_help(format!(
            "add kind = \"...\", one of {}",
            quoted_list(KINDS.iter().copied())
        ))
    })?;
    let kind = kind_field
        .value
        .as_str()
        .ok_or_else(|| wrong_type(kind_field, "`kind` must be a string"))?;

    let description = match raw.fields.get("description") {
        None => None,
        Some(f) => Some(
            f.value
                .as_str()
                .ok_or_else(|| wrong_type(f, "`description` must be a string"))?
                .to_string(),
        ),
    };
    let seed = match raw.fields.get("seed") {
        None => experiment_seed,
        Some(f) => f
            .value
            .as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| wrong_type(f, "`seed` must be a non-negative integer"))?,
    };

    let resources = match raw.fields.get("resources") {
        None => resources::ResourcesOverride::default(),
        Some(f) => {
            let o: resources::ResourcesOverride =
                f.value.clone().try_into().map_err(|e: toml::de::Error| {
                    ExperimentError::new(
                        ErrorKind::InvalidValue,
                        Some(f.value_at.clone()),
                        format!("stage `{name}`: `resources`: {}", e.message()),
                    )
                    .with_help(
                        "resources = { cpus = 2, mem = \"4G\", time = \"01:00:00\", gpus = 0 }",
                    )
                })?;
            o.validate().map_err(|(field, message)| {
                ExperimentError::new(
                    ErrorKind::InvalidValue,
                    Some(f.value_at.clone()),
                    format!("stage `{name}`: `{field}` {message}"),
                )
            })?;
            o
        }
    };

    let table: toml::Table = raw
        .fields
        .iter()
        .filter(|(k, _)| !COMMON_FIELDS.contains(&k.as_str()))
        .map(|(k, f)| (k.clone(), f.value.clone()))
        .collect();
    let parsed =
        StageSettings::parse(kind, toml::Value::Table(table.clone())).ok_or_else(|| {
            ExperimentError::new(
                ErrorKind::UnknownKind,
                Some(kind_field.value_at.clone()),
                format!(
                    "stage `{name}`: unknown kind `{kind}`{}",
                    did_you_mean(kind, KINDS.iter().copied())
                ),
            )
            .with_help(format!(
                "valid kinds: {}",
                quoted_list(KINDS.iter().copied())
            ))
        })?;
    let settings = parsed.map_err(|e| settings_error(name, kind, raw, e))?;
    settings.validate().map_err(|(field, message)| {
        let at = raw
            .fields
            .get(&field)
            .map(|f| f.value_at.clone())
            .or(Some(raw.header.clone()));
        ExperimentError::new(
            ErrorKind::InvalidValue,
            at,
            format!("stage `{name}`: `{field}` {message}"),
        )
    })?;
    Ok(Stage {
        name: name.to_string(),
        description,
        seed,
        resources,
        settings,
        table,
        at: raw.header.clone(),
    })
}

/// Turn a serde error on a stage's settings into a located message.
fn settings_error(
    stage: &str,
    kind: &str,
    raw: &RawStage,
    err: serde_path_to_error::Error<toml::de::Error>,
) -> ExperimentError {
    let path = err.path().to_string();
    let message = err.inner().message().to_string();
    let top_field = path.split(['.', '[']).next().unwrap_or("").to_string();
    let field_at = |f: &str| raw.fields.get(f).map(|x| x.value_at.clone());

    if let Some(field) = backticked_after(&message, "unknown field `") {
        // The path ends at the unknown key; what holds it is the rest.
        let container = match path.rsplit_once('.') {
            Some((parent, last)) if last == field => parent.to_string(),
            _ if path == field || path == "." => String::new(),
            _ => path.clone(),
        };
        let mut valid_names: Vec<String> = expected_list(&message);
        if container.is_empty() {
            valid_names.extend(COMMON_FIELDS.iter().map(|s| s.to_string()));
        }
        let (key_at, place) = if container.is_empty() {
            (
                raw.fields.get(&field).map(|f| f.key_at.clone()),
                format!("stage `{stage}` (kind `{kind}`)"),
            )
        } else {
            (
                field_at(&top_field),
                format!("`{container}` of stage `{stage}`"),
            )
        };
        return ExperimentError::new(
            ErrorKind::UnknownField,
            key_at.or(Some(raw.header.clone())),
            format!(
                "unknown field `{field}` in {place}{}",
                suggestion(&field, &valid_names)
            ),
        )
        .with_help(format!(
            "valid fields: {}",
            quoted_list(valid_names.iter().map(String::as_str))
        ));
    }
    if let Some(field) = backticked_after(&message, "missing field `") {
        let place = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!(" in `{path}`")
        };
        return ExperimentError::new(
            ErrorKind::MissingField,
            field_at(&top_field).or(Some(raw.header.clone())),
            format!(
                "stage `{stage}` (kind `{kind}`) is missing the required field `{field}`{place}"
            ),
        );
    }
    let is_type = message.starts_with("invalid type") || message.starts_with("invalid value");
    ExperimentError::new(
        if is_type {
            ErrorKind::WrongType
        } else {
            ErrorKind::InvalidValue
        },
        field_at(&top_field).or(Some(raw.header.clone())),
        format!("stage `{stage}`: field `{path}`: {message}"),
    )
}

/// Names people bring from Hugging Face / TRL for fields posttrain spells
/// otherwise; suggested when the misspelling is not close to any name.
const SYNONYMS: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("max_steps", "steps"),
    ("num_steps", "steps"),
    ("train_steps", "steps"),
    ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("warmup", "warmup_steps"),
    ("lr_scheduler_type", "schedule"),
    ("adam_beta1", "beta1"),
    ("adam_beta2", "beta2"),
    ("adam_epsilon", "eps"),
    ("max_length", "max_len"),
    ("max_seq_length", "max_len"),
    ("max_prompt_length", "max_len"),
    ("eval_steps", "eval_every"),
    ("save_steps", "checkpoint_every"),
    ("ref_model", "reference"),
    ("model", "from"),
    ("dataset", "data"),
    ("train_dataset", "data"),
    ("eval_dataset", "eval_data"),
    ("kl_coef", "beta"),
    ("num_generations", "samples"),
];

/// " (did you mean `x`?)" for a close spelling, else for a known synonym
/// that is a valid name here.
fn suggestion(field: &str, valid: &[String]) -> String {
    let close = did_you_mean(field, valid.iter().map(String::as_str));
    if !close.is_empty() {
        return close;
    }
    SYNONYMS
        .iter()
        .find(|(from, to)| *from == field && valid.iter().any(|v| v == to))
        .map(|(_, to)| format!(" (did you mean `{to}`?)"))
        .unwrap_or_default()
}

fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.split(prefix).nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// The names in serde's "expected one of `a`, `b`" tail.
fn expected_list(message: &str) -> Vec<String> {
    message
        .split("expected one of ")
        .nth(1)
        .or_else(|| message.split("expected ").nth(1))
        .map(|tail| {
            tail.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn check_references(
    stages: &BTreeMap<String, Stage>,
    raw: &BTreeMap<String, RawStage>,
) -> Result<(), ExperimentError> {
    for (name, stage) in stages {
        for input in stage.settings.inputs() {
            let Some(target) = input.upstream() else {
                continue;
            };
            let top = input.field.split(['[', '.']).next().unwrap_or(&input.field);
            let at = raw[name].fields.get(top).map(|f| f.value_at.clone());
            let Some(upstream) = stages.get(target) else {
                let hint = closest(
                    target,
                    stages.keys().map(String::as_str).filter(|s| *s != name),
                );
                let mut err = ExperimentError::new(
                    ErrorKind::MissingStage,
                    at,
                    format!(
                        "stage `{name}`: `{}` names stage `{target}`, which does not exist{}",
                        input.field,
                        hint.map(|h| format!(" (did you mean `{h}`?)"))
                            .unwrap_or_default()
                    ),
                );
                err = err.with_help(format!(
                    "stages in this experiment: {}",
                    quoted_list(stages.keys().map(String::as_str))
                ));
                return Err(err);
            };
            if let InputTarget::Stage(_) = &input.target {
                let at = at.clone().or(Some(raw[name].header.clone()));
                check_kind(name, stage, &input.field, upstream, stages, at)?;
            }
            if let InputTarget::StageFile { file, .. } = &input.target {
                if let Some(outputs) = upstream.settings.outputs() {
                    if !outputs.contains(file) {
                        return Err(ExperimentError::new(
                            ErrorKind::MissingOutput,
                            at,
                            format!(
                                "stage `{name}`: `{}` reads `{file}` from stage `{target}`, which does not write it{}",
                                input.field,
                                did_you_mean(file, outputs.iter().map(String::as_str))
                            ),
                        )
                        .with_help(format!(
                            "stage `{target}` (kind `{}`) writes: {}",
                            upstream.settings.kind(),
                            outputs.join(", ")
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A reference names a stage whose kind produces what the field needs.
fn check_kind(
    name: &str,
    stage: &Stage,
    field: &str,
    upstream: &Stage,
    stages: &BTreeMap<String, Stage>,
    at: Option<Location>,
) -> Result<(), ExperimentError> {
    let kind = stage.settings.kind();
    let Some(wanted) = references::needs(kind, field) else {
        return Ok(());
    };
    let up_kind = upstream.settings.kind();
    let Some(missing) = references::mismatch(wanted, up_kind) else {
        return Ok(());
    };
    let would_do = references::kinds_producing(wanted);
    let candidates: Vec<&str> = stages
        .iter()
        .filter(|(n, s)| *n != name && would_do.contains(&s.settings.kind()))
        .map(|(n, _)| n.as_str())
        .collect();
    let help = if candidates.is_empty() {
        format!("kinds that would do: {}", would_do.join(", "))
    } else {
        format!(
            "kinds that would do: {}; in this experiment: {}",
            would_do.join(", "),
            quoted_list(candidates.iter().copied())
        )
    };
    Err(ExperimentError::new(
        ErrorKind::WrongStageKind,
        at,
        format!(
            "stage `{name}` (kind `{kind}`): `{field}` needs {missing}, but stage `{}` is a `{up_kind}` stage",
            upstream.name
        ),
    )
    .with_help(help))
}

fn check_datasets(
    stages: &BTreeMap<String, Stage>,
    raw: &BTreeMap<String, RawStage>,
    root: &Path,
) -> Result<(), ExperimentError> {
    for (name, stage) in stages {
        for input in stage.settings.inputs() {
            let InputTarget::Path(rel) = &input.target else {
                continue;
            };
            let top = input.field.split(['[', '.']).next().unwrap_or(&input.field);
            let at = raw[name].fields.get(top).map(|f| f.value_at.clone());
            let path = root.join(rel);
            let problem = match std::fs::metadata(&path) {
                Err(e) => Some(format!("cannot read it: {e}")),
                Ok(m) if m.is_file() => std::fs::File::open(&path)
                    .err()
                    .map(|e| format!("cannot open it: {e}")),
                Ok(_) => std::fs::read_dir(&path)
                    .err()
                    .map(|e| format!("cannot list it: {e}")),
            };
            if let Some(problem) = problem {
                return Err(ExperimentError::new(
                    ErrorKind::Dataset,
                    at,
                    format!(
                        "stage `{name}`: dataset `{rel}` (field `{}`) {problem}",
                        input.field
                    ),
                )
                .with_help(format!(
                    "dataset paths are relative to the project root {}",
                    root.display()
                )));
            }
        }
    }
    Ok(())
}

//! The project's own settings, `posttrain.toml` at the project root
//! (optional): the default executor and the cluster's settings.
//!
//! ```toml
//! [run]
//! executor = "slurm"      # or "local" (the default)
//! jobs = 2                # local: stages built at once (default 1)
//!
//! [slurm]
//! partition = "gpu"
//! account = "my-lab"
//! qos = "normal"
//! cpus = 1                # defaults for stages whose `resources` do not
//! mem = "3G"              #   say (else the kind's defaults)
//! time = "02:00:00"
//! sbatch_args = ["--exclusive"]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::SlurmConfig;

pub const CONFIG_FILE: &str = "posttrain.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    #[serde(default)]
    pub run: RunDefaults,
    #[serde(default)]
    pub slurm: SlurmConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDefaults {
    pub executor: Option<ExecutorName>,
    pub jobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorName {
    Local,
    Slurm,
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl ProjectConfig {
    /// `ROOT/posttrain.toml`, or the defaults when there is none.
    pub fn load(root: &Path) -> Result<ProjectConfig, ConfigError> {
        let path = root.join(CONFIG_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(ProjectConfig::default());
        };
        let config: ProjectConfig = toml::from_str(&text).map_err(|e| ConfigError {
            path: path.clone(),
            message: format!(
                "{}{}",
                e.message(),
                e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default()
            ),
        })?;
        let defaults = crate::experiment::resources::ResourcesOverride {
            cpus: config.slurm.cpus,
            mem: config.slurm.mem.clone(),
            time: config.slurm.time.clone(),
            gpus: None,
        };
        if let Err((field, message)) = defaults.validate() {
            return Err(ConfigError {
                path,
                message: format!("`{}` {message}", field.replace("resources.", "slurm.")),
            });
        }
        if config.run.jobs == Some(0) {
            return Err(ConfigError {
                path,
                message: "`run.jobs` must be at least 1".into(),
            });
        }
        Ok(config)
    }
}

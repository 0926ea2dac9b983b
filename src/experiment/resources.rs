//! `resources = { cpus = 2, mem = "4G", time = "01:00:00", gpus = 1 }` on a
//! stage: what a cluster job for it asks for. Not in the key. Fields not
//! given take the defaults of the stage's kind ([`Resources::default_for`]).

use serde::{Deserialize, Serialize};

/// A stage's resource request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    /// Memory, Slurm's syntax: a number with an optional K, M, G or T.
    pub mem: String,
    /// Wall-clock limit, Slurm's syntax: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`,
    /// `D-HH:MM`, `D-HH:MM:SS`.
    pub time: String,
    pub gpus: u32,
}

/// The fields as written (each optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesOverride {
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    pub gpus: Option<u32>,
}

/// Kinds that only move data: small, short jobs.
const DATA_KINDS: &[&str] = &["synth", "dataset", "tokenizer", "load", "rate"];

impl Resources {
    /// Defaults by kind: data stages 1 CPU, 2G, 30 minutes; training and
    /// sampling stages 2 CPUs (posttrain's two workers), 4G, 4 hours.
    pub fn default_for(kind: &str) -> Resources {
        if DATA_KINDS.contains(&kind) {
            Resources {
                cpus: 1,
                mem: "2G".into(),
                time: "00:30:00".into(),
                gpus: 0,
            }
        } else {
            Resources {
                cpus: 2,
                mem: "4G".into(),
                time: "04:00:00".into(),
                gpus: 0,
            }
        }
    }

    pub fn with(mut self, o: &ResourcesOverride) -> Resources {
        if let Some(c) = o.cpus {
            self.cpus = c;
        }
        if let Some(m) = &o.mem {
            self.mem = m.clone();
        }
        if let Some(t) = &o.time {
            self.time = t.clone();
        }
        if let Some(g) = o.gpus {
            self.gpus = g;
        }
        self
    }
}

impl ResourcesOverride {
    /// `Err((field, message))` for a value Slurm would refuse.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.cpus == Some(0) {
            return Err(("resources.cpus".into(), "must be at least 1".into()));
        }
        if let Some(m) = &self.mem {
            if !valid_mem(m) {
                return Err((
                    "resources.mem".into(),
                    format!("`{m}` is not a memory size: write a number with K, M, G or T, e.g. \"4G\" or \"512M\""),
                ));
            }
        }
        if let Some(t) = &self.time {
            if !valid_time(t) {
                return Err((
                    "resources.time".into(),
                    format!("`{t}` is not a time limit: write HH:MM:SS, MM, MM:SS or D-HH:MM:SS, e.g. \"01:00:00\""),
                ));
            }
        }
        Ok(())
    }
}

fn valid_mem(m: &str) -> bool {
    let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
    m.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0)
}

fn valid_time(t: &str) -> bool {
    let nums = |s: &str, max_parts: usize| -> bool {
        let parts: Vec<&str> = s.split(':').collect();
        parts.len() <= max_parts
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    match t.split_once('-') {
        Some((days, rest)) => {
            !days.is_empty() && days.bytes().all(|b| b.is_ascii_digit()) && nums(rest, 3)
        }
        None => nums(t, 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_syntax_is_checked() {
        for ok in ["4G", "512M", "100", "1T"] {
            assert!(valid_mem(ok), "{ok}");
        }
        for bad in ["4GB", "G", "-1G", "", "0", "4.5G"] {
            assert!(!valid_mem(bad), "{bad}");
        }
        for ok in ["01:00:00", "30", "30:00", "1-00:00:00", "2-12"] {
            assert!(valid_time(ok), "{ok}");
        }
        for bad in ["1h", "", "1:2:3:4", "-1", "a-01"] {
            assert!(!valid_time(bad), "{bad}");
        }
    }
}

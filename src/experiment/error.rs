//! Errors found while reading an experiment: each names the file, the line
//! and column where it applies, and what would be valid.

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in an experiment file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl Location {
    /// The location of byte `offset` in `text`.
    pub fn at(file: &Path, text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location {
            file: file.to_path_buf(),
            line,
            col,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// What went wrong, for callers and tests that need to tell errors apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ExperimentNotFound,
    Unreadable,
    Syntax,
    Include,
    UnknownKind,
    UnknownField,
    MissingField,
    WrongType,
    InvalidValue,
    MissingStage,
    MissingOutput,
    WrongStageKind,
    Cycle,
    Dataset,
}

/// An experiment that cannot run, and why.
#[derive(Debug, Clone)]
pub struct ExperimentError {
    pub kind: ErrorKind,
    pub location: Option<Location>,
    pub message: String,
    pub help: Option<String>,
}

impl ExperimentError {
    pub fn new(kind: ErrorKind, location: Option<Location>, message: impl Into<String>) -> Self {
        ExperimentError {
            kind,
            location,
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for ExperimentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ExperimentError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_columns() {
        let text = "a = 1\nbb = 2\n";
        let loc = Location::at(Path::new("x.toml"), text, 9);
        assert_eq!((loc.line, loc.col), (2, 4));
        assert_eq!(loc.to_string(), "x.toml:2:4");
    }
}

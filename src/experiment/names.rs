//! Experiment and stage names become folder and link names
//! (`results/EXPERIMENT/`, `results/EXPERIMENT/stages/STAGE`), so they are
//! held to a safe set: ASCII letters, digits, `_`, `-` and `.`, starting
//! with a letter or digit, at most [`MAX_LEN`] characters. Experiment names
//! must also not be a folder `results/` already uses for itself.

pub const MAX_LEN: usize = 100;
/// Folders of `results/` that are not experiments (the default store, the
/// output of `compare`).
pub const RESERVED: [&str; 2] = ["store", "compare"];

pub const RULE: &str =
    "names use ASCII letters, digits, `_`, `-` and `.`, start with a letter or digit, and have at most 100 characters";

/// `Err` says what is wrong with `name` (`what` is "experiment" or "stage").
pub fn check(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the {what} name is empty"));
    }
    if name.len() > MAX_LEN {
        return Err(format!(
            "the {what} name has {} characters, more than {MAX_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "the {what} name `{name}` has the character {bad:?}"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "the {what} name `{name}` does not start with a letter or digit"
        ));
    }
    if what == "experiment" && RESERVED.contains(&name) {
        return Err(format!(
            "the experiment name `{name}` is reserved: results/{name} is not an experiment's folder"
        ));
    }
    Ok(())
}

/// A stage name: [`check`], except that a matrix stage's name
/// (`dpo@beta=0.05,lr=1e-4`) may also hold `@`, `=` and `,` after its base.
pub fn check_stage(name: &str) -> Result<(), String> {
    let Some((base, swept)) = name.split_once('@') else {
        return check("stage", name);
    };
    check("stage", base)?;
    if let Some(bad) = swept
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | ',')))
    {
        return Err(format!(
            "the stage name `{name}` has the character {bad:?}: a matrix value that names a stage uses letters, digits, `_`, `-` and `.`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn safe_names_pass_and_paths_do_not() {
        for ok in ["llama-dpo", "a", "run_2.b", "7up"] {
            assert!(check("experiment", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "store",
            "../../outside",
            "a/b",
            ".hidden",
            "-x",
            "sp ace",
            "é",
        ] {
            assert!(check("experiment", bad).is_err(), "{bad}");
        }
        assert!(
            check("stage", "store").is_ok(),
            "only results/ has reserved names"
        );
        assert!(check("stage", "sft/v2").is_err());
    }
}

//! Child processes: one place that runs a command and, when it fails, says exactly which
//! command (with its directory and the environment we set) so a CI log is enough to rerun it.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion, inheriting stdio; an error names the command when it cannot
/// start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a check quietly and returns its trimmed stdout, or `None` when it cannot start or
/// fails: checks decide whether an install step is needed, so a failure is an answer.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A shell-like rendering of `cmd`: the variables we set (PATH and `LD_LIBRARY_PATH` left
/// out, they are long), the program, its arguments and its directory.
pub fn show(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        if key == "PATH" || key == "LD_LIBRARY_PATH" {
            continue;
        }
        let _ = write!(
            line,
            "{}={} ",
            key.to_string_lossy(),
            quote(&value.to_string_lossy())
        );
    }
    line.push_str(&quote(&cmd.get_program().to_string_lossy()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(&arg.to_string_lossy()));
    }
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(line, " (in {})", dir.display());
    }
    line
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=+./:,@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_lists_env_program_args_and_dir() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "a b"])
            .env("XLB_EBPF_OBJECT", "/x/lb-ebpf")
            .env("PATH", "/long")
            .current_dir("/work");
        assert_eq!(
            show(&cmd),
            "XLB_EBPF_OBJECT=/x/lb-ebpf cargo test 'a b' (in /work)"
        );
    }

    #[test]
    fn probe_reports_failure_as_none() {
        assert_eq!(
            probe(Command::new("sh").args(["-c", "echo hi"])),
            Some("hi".into())
        );
        assert_eq!(probe(Command::new("sh").args(["-c", "exit 3"])), None);
        assert_eq!(probe(&mut Command::new("/nonexistent/xtask-probe")), None);
    }
}

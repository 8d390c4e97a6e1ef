//! `cargo xtask test`: the project's one test command (CI runs it as root via .ci/run).
//! Lint and test steps all run even if one fails, so a CI log shows every problem at once.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::run::run;
use crate::toolchain::{self, Toolchain};
use crate::{EBPF_OBJECT_VAR, ebpf, host_cargo, privilege};

/// Runs the test pipeline and prints the time each step took, whatever the outcome.
pub fn test(no_lint: bool, extra: &[String]) -> Result<()> {
    let mut steps = Steps::default();
    let mut totals = Totals::default();
    let result = run_steps(&mut steps, &mut totals, no_lint, extra);
    steps.summary();
    // The closing line CI reads: every test binary's counts added up.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    let failed: Vec<&str> = steps
        .done
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(name, _, _)| *name)
        .collect();
    // Each failing step already printed its error; end with the list.
    if !failed.is_empty() {
        bail!("failed: {}", failed.join("; "));
    }
    result
}

fn run_steps(
    steps: &mut Steps,
    totals: &mut Totals,
    no_lint: bool,
    extra: &[String],
) -> Result<()> {
    steps.run("privileges and bpffs", privilege::ensure_test_privileges)?;
    let (toolchain, object) = steps.run("toolchain and build-ebpf --release", || {
        let toolchain = toolchain::ensure()?;
        let object = ebpf::build(&toolchain, true)?;
        eprintln!("xtask: eBPF object {}", object.display());
        Ok((toolchain, object))
    })?;

    // From here on a failing step does not stop the others: its error is printed and the
    // summary marks it, so one run shows every problem.
    if !no_lint {
        let _ = steps.run("cargo fmt --all --check", || {
            run(host_cargo().args(["fmt", "--all", "--check"]))
        });
        let _ = steps.run("cargo fmt --check (lb-ebpf, its nightly)", || {
            toolchain.ensure_lint_components()?;
            ebpf_cargo(&toolchain, &["fmt", "--check"])
        });
        let _ = steps.run("cargo clippy --workspace --all-targets", || {
            run(host_cargo()
                .args(["clippy", "--workspace", "--all-targets"])
                .args(["--", "-D", "warnings"])
                .env(EBPF_OBJECT_VAR, &object))
        });
        let _ = steps.run("cargo clippy (lb-ebpf, its nightly)", || {
            toolchain.ensure_lint_components()?;
            ebpf_cargo(
                &toolchain,
                &[
                    "clippy",
                    "--target",
                    ebpf::TARGET,
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        });
    }
    let _ = steps.run("cargo test --workspace", || {
        run_counting(
            host_cargo()
                .args(["test", "--workspace"])
                .args(extra)
                .env(EBPF_OBJECT_VAR, &object),
            totals,
        )
    });
    Ok(())
}

/// Test counts summed over every `test result:` line of `cargo test`.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds one libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs `cmd`, passing its stdout through line by line while counting test results.
fn run_counting(cmd: &mut std::process::Command, totals: &mut Totals) -> Result<()> {
    use std::io::BufRead as _;
    let shown = crate::run::show(cmd);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start `{shown}`: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn totals_add_up_libtest_summaries() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 54 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 5.54s");
        t.add_line(
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 55,
                failed: 1,
                ignored: 2
            }
        );
    }
}

/// `cargo +TOOLCHAIN <args>` in lb-ebpf ([`toolchain::nightly`]) with the eBPF build environment.
fn ebpf_cargo(toolchain: &Toolchain, args: &[&str]) -> Result<()> {
    run(toolchain.nightly_cargo(&ebpf::dir()?)?.args(args))
}

/// Named, timed steps, each announced with a `==> ` line on stderr.
#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Duration, bool)>,
}

impl Steps {
    /// Runs one step; a failure is printed right away (and recorded for the summary).
    fn run<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("==> {name}");
        let start = Instant::now();
        let result = step();
        if let Err(err) = &result {
            eprintln!("xtask: {name}: {err:#}");
        }
        self.done.push((name, start.elapsed(), result.is_ok()));
        result
    }

    fn summary(&self) {
        eprintln!("==> summary");
        for (name, elapsed, ok) in &self.done {
            let verdict = if *ok { "ok" } else { "FAILED" };
            eprintln!("{:>8.1}s  {verdict:<6}  {name}", elapsed.as_secs_f64());
        }
    }
}

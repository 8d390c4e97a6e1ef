//! Running the external tools the testbed drives (`ip`, `ethtool`, `sysctl`)
//! with a deadline, and errors that quote the full command line and its
//! stderr, so a failing test says exactly what it ran and what the tool said.

use std::fmt::{self, Write as _};
use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Deadline for the configuration tools: they finish in milliseconds, so a
/// command still running after this is stuck and the test must not hang.
pub(crate) const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A program and its arguments, kept as strings so that errors and logs can
/// show the exact command line.
#[derive(Debug, Clone)]
pub(crate) struct CmdLine {
    program: String,
    args: Vec<String>,
}

impl CmdLine {
    pub(crate) fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// A `Command` for this line with stdin closed (nothing the testbed runs
    /// reads input; an inherited terminal would only make it hang).
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null());
        cmd
    }
}

impl fmt::Display for CmdLine {
    /// Shell-like quoting, so the line can be pasted into a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, word) in std::iter::once(&self.program).chain(&self.args).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let plain = !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
            if plain {
                f.write_str(word)?;
            } else {
                write!(f, "'{}'", word.replace('\'', r"'\''"))?;
            }
        }
        Ok(())
    }
}

/// Runs `cmd` to completion, killing it after `timeout`, and fails unless it
/// exits with status 0. The error names the command line, its exit status,
/// its stderr and (when not empty) its stdout.
pub(crate) fn run_checked(cmd: &CmdLine, timeout: Duration) -> anyhow::Result<Output> {
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!("{}", describe_failure(cmd, &out));
    }
    Ok(out)
}

fn describe_failure(cmd: &CmdLine, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut msg = format!(
        "command `{cmd}` failed ({}); stderr: {:?}",
        out.status,
        stderr.trim()
    );
    if !stdout.trim().is_empty() {
        let _ = write!(msg, "; stdout: {:?}", stdout.trim());
    }
    msg
}

/// Runs `cmd`, collecting stdout and stderr, and kills it (SIGKILL, by PID)
/// if it has not finished within `timeout`. Does not look at the exit status.
pub(crate) fn run(cmd: &CmdLine, timeout: Duration) -> anyhow::Result<Output> {
    tracing::debug!(command = %cmd, "running");
    let deadline = Instant::now() + timeout;
    let mut child = cmd
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{cmd}`"))?;

    // Both pipes are drained on their own threads so a chatty child cannot
    // block on a full pipe while we wait for it.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    spawn_reader(child.stdout.take(), true, tx.clone());
    spawn_reader(child.stderr.take(), false, tx);

    let mut stdout = None;
    let mut stderr = None;
    // The pipes reach EOF when the child exits (unless a descendant keeps
    // them open, which the deadline covers).
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, buf)) => stdout = Some(buf),
            Ok((false, buf)) => stderr = Some(buf),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_and_reap(&mut child, cmd);
                bail!("command `{cmd}` did not finish within {timeout:?}; killed it");
            }
        }
    }

    // Between closing its pipes and becoming a zombie a process needs a few
    // microseconds; poll with a short, growing pause, bounded by the deadline.
    let mut pause = Duration::from_micros(50);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for `{cmd}`"))?
        {
            break status;
        }
        let now = Instant::now();
        if now >= deadline {
            kill_and_reap(&mut child, cmd);
            bail!("command `{cmd}` did not exit within {timeout:?}; killed it");
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.unwrap_or_default(),
        stderr: stderr.unwrap_or_default(),
    })
}

/// Reads `pipe` to EOF on its own thread and sends `(is_stdout, bytes)`.
fn spawn_reader<R: Read + Send + 'static>(
    pipe: Option<R>,
    is_stdout: bool,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
) {
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error keeps what was read so far; the exit status still
            // decides success.
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((is_stdout, buf));
        });
    }
}

/// SIGKILL by PID, then reap, so no zombie or stray process outlives the
/// testbed. Errors are only logged: this runs on failure and in `Drop` paths.
pub(crate) fn kill_and_reap(child: &mut Child, what: &dyn fmt::Display) {
    if let Err(e) = child.kill() {
        // Already exited (and possibly reaped): nothing left to kill.
        tracing::debug!(pid = child.id(), error = %e, "kill {what}");
    }
    if let Err(e) = child.wait() {
        tracing::warn!(pid = child.id(), error = %e, "cannot reap {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        let cmd = CmdLine::new("ip", ["-n", "xlb-a-1-0", "addr", "add", "2001:db8::1/64"]);
        assert_eq!(cmd.to_string(), "ip -n xlb-a-1-0 addr add 2001:db8::1/64");
        let cmd = CmdLine::new("sh", ["-c", "echo 'hi' there", ""]);
        assert_eq!(cmd.to_string(), r"sh -c 'echo '\''hi'\'' there' ''");
    }

    #[test]
    fn failure_names_command_status_and_stderr() {
        let cmd = CmdLine::new("sh", ["-c", "echo out; echo oops >&2; exit 3"]);
        let err = run_checked(&cmd, TOOL_TIMEOUT).unwrap_err().to_string();
        assert!(
            err.contains("sh -c 'echo out; echo oops >&2; exit 3'"),
            "{err}"
        );
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("stderr: \"oops\""), "{err}");
        assert!(err.contains("stdout: \"out\""), "{err}");
    }

    #[test]
    fn missing_program_is_an_error_naming_it() {
        let cmd = CmdLine::new("/nonexistent/xlb-no-such-tool", ["x"]);
        let err = format!("{:#}", run(&cmd, TOOL_TIMEOUT).unwrap_err());
        assert!(err.contains("/nonexistent/xlb-no-such-tool x"), "{err}");
    }

    #[test]
    fn timeout_kills_the_command() {
        let cmd = CmdLine::new("sleep", ["5"]);
        let start = Instant::now();
        let err = run(&cmd, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(
            err.contains("sleep 5") && err.contains("did not finish"),
            "{err}"
        );
    }
}

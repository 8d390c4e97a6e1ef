//! What every benchmark shares: percentiles, ratios, target marks and the JSON file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The programs of `tools` found neither on `PATH` nor in `/usr/sbin` or `/sbin`.
pub fn missing_tools<'t>(tools: &[&'t str]) -> Vec<&'t str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .collect();
    tools
        .iter()
        .copied()
        .filter(|tool| !dirs.iter().any(|d| d.join(tool).is_file()))
        .collect()
}

/// Fails when the runs found `problems` (each printed as a `PROBLEM` line): their
/// figures are not trustworthy.
pub fn fail_on_problems(problems: usize) -> Result<()> {
    if problems > 0 {
        bail!(
            "{problems} check(s) failed; see PROBLEM lines above (the figures of those runs \
             are not trustworthy)"
        );
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` when one was given.
pub fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}

/// A benchmark's arguments parsed from `args` as `xlb-bench NAME ARGS` parses them.
#[cfg(test)]
pub fn parse_args<A: clap::Args>(args: &[&str]) -> A {
    #[derive(clap::Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    <Cli<A> as clap::Parser>::parse_from(std::iter::once("xlb-bench").chain(args.iter().copied()))
        .args
}

/// The median of `v` (the mean of the middle two for an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Nearest-rank percentile `p` (0 < p <= 100) of sorted samples.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    assert!(!sorted.is_empty(), "percentile of no samples");
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank between 1 and the sample count"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): unlike wall time it
/// leaves out the time the thread waited for a CPU that other processes held.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The 1-minute load average and the CPU count, for the header of a report: other
/// processes on the machine compete with a benchmark for the same CPUs.
pub fn machine_load() -> (f64, usize) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (load, cpus)
}

/// A line about the machine's load, warning when other work is running.
pub fn load_line() -> String {
    let (load, cpus) = machine_load();
    let note = if load > 0.5 {
        " -- other processes are running; figures are noisier than on an idle machine"
    } else {
        ""
    };
    format!("machine: {cpus} CPUs, 1-minute load average {load:.2} at the start{note}")
}

/// `a / b`, or `None` when `b` is not a positive number.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// The word printed after a target.
pub fn mark(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(vec![4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=50).collect();
        assert_eq!(percentile(&v, 50.0), 25);
        assert_eq!(percentile(&v, 99.0), 50);
        assert_eq!(percentile(&v, 100.0), 50);
        let v: Vec<u32> = (1..=200).collect();
        assert_eq!(percentile(&v, 99.0), 198);
        assert_eq!(percentile(&[7], 1.0), 7);
    }

    #[test]
    fn ratios_need_a_positive_base() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }
}

//! `xlb-bench maglev`: how fast the agent builds a Maglev table, and how good the table is.
//!
//! Build time of `maglev::build_table` for M = 65537, N = 1000 (the target is at
//! most 1 ms), timed build by build, interleaved with two baselines measured in the same
//! run on the same input:
//! - the plain fill as the paper writes it (`maglev::build_table_plain`, Pseudocode 1):
//!   what a straightforward implementation takes for the same table (it is checked to be
//!   byte-identical);
//! - the floor: writing the same M slots round-robin from the id list, i.e. the cost of
//!   producing any table of that size at all.
//!
//! Quality, from the same tables: imbalance (a backend's slots over its ideal share) for
//! equal weights and for weights 1..4, and disruption (the fraction of slots that change
//! backend) when one backend is removed or added, against the ideal 1/N.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_core::maglev::{self, Backend};

use crate::report::{self, mark, percentile, ratio, thread_cpu_time};

/// The target for one build at M = 65537, N = 1000.
const TARGET_BUILD: Duration = Duration::from_millis(1);

#[derive(clap::Args)]
pub struct Args {
    /// Table size M (a prime).
    #[arg(long, default_value_t = 65_537)]
    size: u32,
    /// Number of backends N.
    #[arg(long, default_value_t = 1000)]
    backends: u32,
    /// Timed builds of each kind, after the warm-up.
    #[arg(long, default_value_t = 200)]
    builds: u32,
    /// Untimed builds of each kind first.
    #[arg(long, default_value_t = 10)]
    warmup: u32,
    /// Disruption samples: this many different backends removed (one at a time) and as
    /// many different new backends added.
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Backend `i`'s identity: documentation-range IPv6 addresses, as the agent would write
/// `address:port/protocol`.
fn identity(i: u32) -> String {
    format!("[2001:db8:b::{:x}:{:x}]:8080/TCP", i >> 16, i & 0xffff)
}

/// A backend set: identities of `indices`, ids `index + 1`, weights from `weight`.
struct Set {
    identities: Vec<(u32, String, u32)>,
}

impl Set {
    fn new(indices: impl Iterator<Item = u32>, weight: impl Fn(u32) -> u32) -> Self {
        Self {
            identities: indices.map(|i| (i + 1, identity(i), weight(i))).collect(),
        }
    }

    fn backends(&self) -> Vec<Backend<'_>> {
        self.identities
            .iter()
            .map(|(id, identity, weight)| Backend {
                id: *id,
                identity: identity.as_bytes(),
                weight: *weight,
            })
            .collect()
    }

    fn ids(&self) -> Vec<u32> {
        self.identities.iter().map(|(id, _, _)| *id).collect()
    }
}

/// The floor: the same number of slots filled with ids round-robin.
fn fill_round_robin(ids: &[u32], size: u32) -> Vec<u32> {
    ids.iter().copied().cycle().take(size as usize).collect()
}

fn mixed_weight(i: u32) -> u32 {
    1 + i % 4
}

#[derive(serde::Serialize)]
struct Timing {
    name: &'static str,
    /// Wall time.
    median_us: f64,
    p99_us: f64,
    /// The building thread's CPU time.
    cpu_median_us: f64,
    cpu_p99_us: f64,
    /// Wall-time median over the plain fill's median.
    ratio_to_plain: Option<f64>,
    /// Wall-time median over the floor's median.
    ratio_to_floor: Option<f64>,
}

#[derive(serde::Serialize)]
struct Balance {
    weights: &'static str,
    /// Largest (smallest) slots-over-ideal-share among the backends.
    max_over_ideal: f64,
    min_over_ideal: f64,
}

#[derive(serde::Serialize)]
struct Disruption {
    change: String,
    samples: u32,
    /// Fraction of all slots whose backend changed.
    mean_fraction: f64,
    max_fraction: f64,
    /// The minimum possible: the removed backend's share (1/N), or the new one's (1/(N+1)).
    ideal_fraction: f64,
    /// Slots that moved between backends that stayed, as a fraction of all slots.
    mean_beyond_own: f64,
}

pub fn run(args: &Args) -> Result<()> {
    if args.builds == 0 || args.backends == 0 || args.changes == 0 {
        bail!("--builds, --backends and --changes must be at least 1");
    }
    if args.changes > args.backends {
        bail!("--changes must be at most --backends");
    }
    let (m, n) = (args.size, args.backends);
    let equal = Set::new(0..n, |_| 1);
    let mixed = Set::new(0..n, mixed_weight);
    let (equal_backends, mixed_backends) = (equal.backends(), mixed.backends());
    let ids = equal.ids();

    // The same table both ways, before anything is timed.
    let table = maglev::build_table(&equal_backends, m).context("build_table")?;
    if maglev::build_table_plain(&equal_backends, m)? != table {
        bail!("build_table and the plain fill disagree; the comparison would be meaningless");
    }
    let mixed_table = maglev::build_table(&mixed_backends, m)?;

    let kinds: [(&'static str, &dyn Fn() -> Vec<u32>); 4] = [
        ("xlb build_table, equal weights", &|| {
            maglev::build_table(black_box(&equal_backends), m).expect("validated above")
        }),
        ("xlb build_table, weights 1..4", &|| {
            maglev::build_table(black_box(&mixed_backends), m).expect("validated above")
        }),
        ("baseline: plain fill (paper)", &|| {
            maglev::build_table_plain(black_box(&equal_backends), m).expect("validated above")
        }),
        ("floor: ids round-robin", &|| {
            fill_round_robin(black_box(&ids), m)
        }),
    ];
    // Wall time, and the thread's CPU time, which leaves out waits for a CPU that other
    // processes held (this machine may be shared).
    let mut wall: Vec<Vec<Duration>> = (0..kinds.len())
        .map(|_| Vec::with_capacity(args.builds as usize))
        .collect();
    let mut cpu = wall.clone();
    for round in 0..args.warmup + args.builds {
        // Interleaved, so drift in the machine's load affects every kind alike.
        for (k, (_, build)) in kinds.iter().enumerate() {
            let (start, start_cpu) = (Instant::now(), thread_cpu_time());
            black_box(build());
            let (took, took_cpu) = (start.elapsed(), thread_cpu_time().saturating_sub(start_cpu));
            if round >= args.warmup {
                wall[k].push(took);
                cpu[k].push(took_cpu);
            }
        }
    }
    for s in wall.iter_mut().chain(cpu.iter_mut()) {
        s.sort_unstable();
    }
    let median = |s: &[Duration]| micros(percentile(s, 50.0));
    let (plain, floor) = (median(&wall[2]), median(&wall[3]));
    let timings: Vec<Timing> = kinds
        .iter()
        .zip(wall.iter().zip(&cpu))
        .map(|((name, _), (w, c))| Timing {
            name,
            median_us: median(w),
            p99_us: micros(percentile(w, 99.0)),
            cpu_median_us: median(c),
            cpu_p99_us: micros(percentile(c, 99.0)),
            ratio_to_plain: ratio(median(w), plain),
            ratio_to_floor: ratio(median(w), floor),
        })
        .collect();

    let balance = [
        balance("equal", &table, &equal),
        balance("1..4 (1 + i mod 4)", &mixed_table, &mixed),
    ];
    let disruption = [
        remove_one(&equal, &table, m, args.changes)?,
        add_one(&equal, &table, m, args.changes)?,
    ];

    print_report(args, &timings, &balance, &disruption);
    let build_ok = |t: &Timing| t.median_us <= micros(TARGET_BUILD);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "maglev",
            "table_size": m,
            "backends": n,
            "builds": args.builds,
            "warmup": args.warmup,
            "target_build_us": micros(TARGET_BUILD),
            "target_met": build_ok(&timings[0]),
            "timings": timings,
            "balance": balance,
            "disruption": disruption,
            "reproduce": reproduce(args),
        }),
    )
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Slots over ideal share, largest and smallest, for a table built from `set`.
fn balance(weights: &'static str, table: &[u32], set: &Set) -> Balance {
    let max_id = set.ids().into_iter().max().unwrap_or(0) as usize;
    let mut counts = vec![0u64; max_id + 1];
    for &id in table {
        counts[id as usize] += 1;
    }
    let total_weight: u64 = set.identities.iter().map(|(_, _, w)| u64::from(*w)).sum();
    #[expect(clippy::cast_precision_loss, reason = "slot counts, far below 2^52")]
    let shares = set.identities.iter().map(|(id, _, w)| {
        let ideal = table.len() as f64 * f64::from(*w) / total_weight as f64;
        counts[*id as usize] as f64 / ideal
    });
    let (max, min) = shares.fold((f64::MIN, f64::MAX), |(hi, lo), s| (hi.max(s), lo.min(s)));
    Balance {
        weights,
        max_over_ideal: max,
        min_over_ideal: min,
    }
}

/// Slots whose backend differs, and those of them where neither side is `own`.
fn changed(old: &[u32], new: &[u32], own: u32) -> (usize, usize) {
    old.iter()
        .zip(new)
        .filter(|(o, n)| o != n)
        .fold((0, 0), |(all, beyond), (o, n)| {
            (all + 1, beyond + usize::from(*o != own && *n != own))
        })
}

fn remove_one(set: &Set, table: &[u32], m: u32, samples: u32) -> Result<Disruption> {
    let n = u32::try_from(set.identities.len())?;
    let mut fractions = Vec::new();
    let mut beyond = Vec::new();
    for s in 0..samples {
        // Spread over the identity order.
        let removed = s * n / samples;
        let rest = Set::new((0..n).filter(|&i| i != removed), |_| 1);
        let new = maglev::build_table(&rest.backends(), m)?;
        let (all, other) = changed(table, &new, removed + 1);
        fractions.push(fraction(all, m));
        beyond.push(fraction(other, m));
    }
    Ok(summary(
        format!("remove one of {n}"),
        &fractions,
        &beyond,
        1.0 / f64::from(n),
    ))
}

fn add_one(set: &Set, table: &[u32], m: u32, samples: u32) -> Result<Disruption> {
    let n = u32::try_from(set.identities.len())?;
    let mut fractions = Vec::new();
    let mut beyond = Vec::new();
    for s in 0..samples {
        // A fresh identity (index n + s) each time.
        let added = n + s;
        let more = Set::new((0..n).chain([added]), |_| 1);
        let new = maglev::build_table(&more.backends(), m)?;
        let (all, other) = changed(table, &new, added + 1);
        fractions.push(fraction(all, m));
        beyond.push(fraction(other, m));
    }
    Ok(summary(
        format!("add one to {n}"),
        &fractions,
        &beyond,
        1.0 / f64::from(n + 1),
    ))
}

fn fraction(slots: usize, m: u32) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "slot counts, far below 2^52")]
    let slots = slots as f64;
    slots / f64::from(m)
}

fn summary(change: String, fractions: &[f64], beyond: &[f64], ideal: f64) -> Disruption {
    #[expect(clippy::cast_precision_loss, reason = "a handful of samples")]
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Disruption {
        change,
        samples: u32::try_from(fractions.len()).unwrap_or(u32::MAX),
        mean_fraction: mean(fractions),
        max_fraction: fractions.iter().copied().fold(0.0, f64::max),
        ideal_fraction: ideal,
        mean_beyond_own: mean(beyond),
    }
}

fn reproduce(args: &Args) -> String {
    format!(
        "cargo xtask bench maglev --size {} --backends {} --builds {} --warmup {} --changes {}",
        args.size, args.backends, args.builds, args.warmup, args.changes
    )
}

fn print_report(args: &Args, timings: &[Timing], balance: &[Balance], disruption: &[Disruption]) {
    let opt = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
    println!(
        "xlb maglev benchmark: M = {} slots, N = {} backends; {} timed builds of each kind \
         after {} warm-up builds, interleaved build by build.",
        args.size, args.backends, args.builds, args.warmup
    );
    println!("{}", report::load_line());
    println!(
        "Baseline: the paper's plain fill (Pseudocode 1, one candidate at a time) of the same, \
         byte-identical table. Floor: writing M ids round-robin."
    );
    println!();
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "build time", "median", "p99", "cpu med", "cpu p99", "x plain", "x floor"
    );
    for t in timings {
        println!(
            "{:<32} {:>7.1} us {:>7.1} us {:>7.1} us {:>7.1} us {:>8} {:>8}",
            t.name,
            t.median_us,
            t.p99_us,
            t.cpu_median_us,
            t.cpu_p99_us,
            opt(t.ratio_to_plain),
            opt(t.ratio_to_floor)
        );
    }
    println!("(median, p99: wall time; cpu: the thread's CPU time, without waits for a CPU;");
    println!(" x plain, x floor: wall-time median over the baseline's)");
    let xlb = &timings[0];
    let target = micros(TARGET_BUILD);
    println!(
        "target: equal-weight build <= {target:.0} us: median {:.1} us {}, p99 {:.1} us {} \
         (cpu p99 {:.1} us {})",
        xlb.median_us,
        mark(xlb.median_us <= target),
        xlb.p99_us,
        mark(xlb.p99_us <= target),
        xlb.cpu_p99_us,
        mark(xlb.cpu_p99_us <= target),
    );
    if let Some(r) = xlb.ratio_to_plain {
        println!("xlb is {:.1}x faster than the plain fill", 1.0 / r);
    }
    println!();
    println!(
        "{:<34} {:>11} {:>11}",
        "imbalance (slots / ideal share)", "max", "min"
    );
    for b in balance {
        println!(
            "{:<34} {:>11.4} {:>11.4}",
            format!("weights {}", b.weights),
            b.max_over_ideal,
            b.min_over_ideal
        );
    }
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>11} {:>12}",
        "disruption (slots that change)", "mean", "max", "ideal", "mean/ideal", "beyond own"
    );
    for d in disruption {
        println!(
            "{:<34} {:>8.4}% {:>8.4}% {:>8.4}% {:>11.3} {:>11.4}%",
            format!("{} ({} samples)", d.change, d.samples),
            d.mean_fraction * 100.0,
            d.max_fraction * 100.0,
            d.ideal_fraction * 100.0,
            d.mean_fraction / d.ideal_fraction,
            d.mean_beyond_own * 100.0
        );
    }
    println!("(ideal: the removed backend's share 1/N, or the new backend's 1/(N+1);");
    println!(" beyond own: slots that moved between backends that stayed)");
    println!();
    println!("reproduce: {}", reproduce(args));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_distinct_documentation_addresses() {
        let ids: std::collections::BTreeSet<String> = (0..70_000).map(identity).collect();
        assert_eq!(ids.len(), 70_000);
        assert!(ids.iter().all(|i| i.starts_with("[2001:db8:")));
    }

    #[test]
    fn change_counts_split_own_and_beyond() {
        assert_eq!(changed(&[1, 2, 3, 3], &[1, 4, 4, 2], 3), (3, 1));
    }

    #[test]
    fn balance_of_a_perfect_table_is_one() {
        let set = Set::new(0..2, mixed_weight);
        // Weights 1 and 2: ids 1 and 2 own 1 and 2 of 3 slots.
        let b = balance("w", &[1, 2, 2], &set);
        assert!((b.max_over_ideal - 1.0).abs() < 1e-9);
        assert!((b.min_over_ideal - 1.0).abs() < 1e-9);
    }
}

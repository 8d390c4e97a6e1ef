//! The aggregation both e2e topologies share: a figure over rounds as its median and its
//! spread, and the figures of a set of wrk runs (requests/s, p99, the benchmark's own CPU
//! per request).

use super::Measured;
use super::load::WrkResult;
use crate::report;

/// One figure over rounds: the median that the tables print and the smallest and largest
/// value, so a reader sees how noisy it was.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(super) struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Rounds it is over.
    pub n: usize,
}

impl Spread {
    /// Over the finite values of `values` (NaN figures when there are none).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let v: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        Spread {
            median: report::median(v.clone()),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: v.len(),
        }
    }

    /// `median [min..max]` with `digits` decimals, or `-`.
    pub fn cell(&self, digits: usize) -> String {
        if self.n == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.digits$} [{:.digits$}..{:.digits$}]",
                self.median, self.min, self.max
            )
        }
    }
}

/// The benchmark's own CPU microseconds (load generator, servers, softirq) per completed
/// request of a wrk run.
pub(super) fn cpu_us_per_request(m: &Measured<WrkResult>) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "request counts")]
    let requests = m.result.requests as f64;
    1e6 * m.cpu.own_seconds() / requests
}

/// A set of wrk runs of one kind (keep-alive or close) over rounds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(super) struct WrkFigures {
    pub requests_per_sec: Spread,
    pub p99_ms: Spread,
    pub cpu_us_per_request: Spread,
}

impl WrkFigures {
    pub fn of<'m>(runs: impl IntoIterator<Item = &'m Measured<WrkResult>> + Clone) -> Self {
        WrkFigures {
            requests_per_sec: Spread::of(
                runs.clone().into_iter().map(|m| m.result.requests_per_sec),
            ),
            p99_ms: Spread::of(runs.clone().into_iter().map(|m| m.result.p99_ms)),
            cpu_us_per_request: Spread::of(runs.into_iter().map(cpu_us_per_request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_over_finite_values() {
        let s = Spread::of([3.0, f64::NAN, 1.0, 2.0, 10.0]);
        assert_eq!(s.n, 4);
        assert!((s.median - 2.5).abs() < 1e-12);
        assert!((s.min - 1.0).abs() < 1e-12 && (s.max - 10.0).abs() < 1e-12);
        assert_eq!(s.cell(1), "2.5 [1.0..10.0]");
        let none = Spread::of([f64::INFINITY]);
        assert_eq!(none.n, 0);
        assert!(none.median.is_nan());
        assert_eq!(none.cell(0), "-");
    }
}

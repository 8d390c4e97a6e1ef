//! Active health checks for the standalone agent: a TCP connect or an HTTP/1.1
//! GET per backend every `interval`, with `HAProxy`-style `rise`/`fall`
//! hysteresis, reported as up/down transitions on a channel.
//!
//! - [`Threshold`] is the pure rise/fall state machine.
//! - [`probe`] runs one check against one address.
//!
//! # Initial state
//!
//! A backend the agent has never seen starts **up**, as in `HAProxy`: a new
//! configuration forwards at once instead of waiting `rise` intervals, and a
//! backend that is really down is taken out after `fall` failed probes. A
//! backend's state after an agent restart is not this module's business: the
//! caller restores it (e.g. from the pinned data-plane maps) and passes it as
//! the initial state.

/// Rise/fall hysteresis: a healthy backend goes down after `fall` consecutive
/// failed probes, an unhealthy one comes back after `rise` consecutive
/// successes. An observation that agrees with the current state resets the
/// opposite streak, so a single success between failures keeps a backend up.
///
/// `rise` and `fall` of 0 act as 1 (every transition needs at least one
/// observation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    up: bool,
    rise: u32,
    fall: u32,
    /// Consecutive observations so far that contradict `up`.
    streak: u32,
}

impl Threshold {
    pub fn new(up: bool, rise: u32, fall: u32) -> Self {
        Threshold {
            up,
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
        }
    }

    /// Feeds one probe result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }

    pub fn is_up(&self) -> bool {
        self.up
    }
}

#[cfg(test)]
mod tests;

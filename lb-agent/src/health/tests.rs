//! Health check tests: the rise/fall state machine (pure), and probes and the
//! monitor against real sockets in network namespaces the tests create (they
//! need root and fail, never skip, without it).

mod threshold {
    use super::super::Threshold;
    use proptest::prelude::*;

    /// Feeds `obs` ('+' ok, '-' failed) and returns the transitions, as
    /// (index, new state).
    fn run(t: &mut Threshold, obs: &str) -> Vec<(usize, bool)> {
        obs.bytes()
            .enumerate()
            .filter_map(|(i, b)| {
                let ok = match b {
                    b'+' => true,
                    b'-' => false,
                    _ => panic!("bad observation {b}"),
                };
                t.observe(ok).map(|up| (i, up))
            })
            .collect()
    }

    #[test]
    fn up_goes_down_after_fall_consecutive_failures() {
        let mut t = Threshold::new(true, 2, 3);
        assert_eq!(run(&mut t, "--"), []);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "-"), [(0, false)]);
        assert!(!t.is_up());
        // Further failures while down report nothing.
        assert_eq!(run(&mut t, "-----"), []);
        assert!(!t.is_up());
    }

    #[test]
    fn down_comes_up_after_rise_consecutive_successes() {
        let mut t = Threshold::new(false, 2, 3);
        assert_eq!(run(&mut t, "+"), []);
        assert!(!t.is_up());
        assert_eq!(run(&mut t, "+"), [(0, true)]);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "+++++"), []);
    }

    #[test]
    fn a_success_while_up_resets_the_failure_count() {
        let mut t = Threshold::new(true, 2, 3);
        assert_eq!(run(&mut t, "--+--+--+"), []);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "---"), [(2, false)]);
    }

    #[test]
    fn a_failure_while_down_resets_the_success_count() {
        let mut t = Threshold::new(false, 3, 1);
        assert_eq!(run(&mut t, "++-++-++-"), []);
        assert!(!t.is_up());
        assert_eq!(run(&mut t, "+++"), [(2, true)]);
    }

    #[test]
    fn counts_restart_after_a_transition() {
        let mut t = Threshold::new(true, 2, 2);
        // Down after 2 failures; the first success afterwards starts a fresh
        // count (the failures before the transition do not carry over).
        assert_eq!(run(&mut t, "--+-++--"), [(1, false), (5, true), (7, false)]);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_change() {
        let mut t = Threshold::new(true, 1, 1);
        assert_eq!(
            run(&mut t, "-+-++--"),
            [(0, false), (1, true), (2, false), (3, true), (5, false)]
        );
    }

    #[test]
    fn zero_rise_and_fall_act_as_one() {
        let mut t = Threshold::new(true, 0, 0);
        assert_eq!(t, Threshold::new(true, 1, 1));
        assert_eq!(run(&mut t, "+-+"), [(1, false), (2, true)]);
    }

    #[test]
    fn agreeing_observations_never_transition() {
        let mut up = Threshold::new(true, 1, 1);
        let mut down = Threshold::new(false, 1, 1);
        for _ in 0..100 {
            assert_eq!(up.observe(true), None);
            assert_eq!(down.observe(false), None);
        }
        assert!(up.is_up());
        assert!(!down.is_up());
    }

    #[test]
    fn large_thresholds_do_not_overflow() {
        let mut t = Threshold::new(true, u32::MAX, u32::MAX);
        for _ in 0..10_000 {
            assert_eq!(t.observe(false), None);
        }
        assert!(t.is_up());
    }

    /// Reference model, written differently: keep every observation since the
    /// last transition and flip when the trailing run of contradicting
    /// observations is long enough.
    struct Model {
        up: bool,
        rise: usize,
        fall: usize,
        since: Vec<bool>,
    }

    impl Model {
        fn observe(&mut self, ok: bool) -> Option<bool> {
            self.since.push(ok);
            let contradicting = self.since.iter().rev().take_while(|&&o| o != self.up);
            let needed = if self.up { self.fall } else { self.rise };
            if contradicting.count() >= needed.max(1) {
                self.up = !self.up;
                self.since.clear();
                Some(self.up)
            } else {
                None
            }
        }
    }

    proptest! {
        #[test]
        fn prop_matches_reference_model(
            up in any::<bool>(),
            rise in 0u32..6,
            fall in 0u32..6,
            obs in prop::collection::vec(any::<bool>(), 0..200),
        ) {
            let mut t = Threshold::new(up, rise, fall);
            let mut model = Model {
                up,
                rise: rise as usize,
                fall: fall as usize,
                since: Vec::new(),
            };
            let mut last = up;
            for ok in obs {
                let got = t.observe(ok);
                prop_assert_eq!(got, model.observe(ok));
                prop_assert_eq!(t.is_up(), model.up);
                // Some(..) only on a change, and always to the other state.
                if let Some(new) = got {
                    prop_assert_ne!(new, last);
                }
                last = t.is_up();
            }
        }
    }
}

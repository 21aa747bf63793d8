use super::*;

const MS: u64 = 1000;

fn name(s: &str) -> SequenceName {
    SequenceName::new(s).unwrap()
}

fn config() -> AllocatorConfig {
    AllocatorConfig {
        raise_lead_ms: 100,
        rate_tau_ms: 100,
        window_ids_min: 100,
        window_ids_max: 1_000_000,
        block_ids_max: 10_000,
        raise_retry_ms: 5,
        sequences_max: 4,
    }
}

fn leader(width: Width, ceiling: Id) -> LeaderAllocator {
    let c = CommittedCeiling {
        sequence: name("s"),
        width,
        ceiling,
    };
    LeaderAllocator::new(config(), 0, [c]).unwrap()
}

/// Proposes and commits raises until none is needed.
fn commit_all(a: &mut LeaderAllocator, now_us: u64) {
    while let Some(r) = a.poll_raise(now_us) {
        a.on_raise_committed(&r.sequence, r.ceiling).unwrap();
    }
}

#[test]
fn config_is_validated() {
    assert!(AllocatorConfig::DEFAULT.validate().is_ok());
    type Breaker = (&'static str, fn(&mut AllocatorConfig));
    let cases: [Breaker; 8] = [
        ("raise_lead_ms", |c| c.raise_lead_ms = 0),
        ("rate_tau_ms", |c| c.rate_tau_ms = 0),
        ("window_ids_min", |c| c.window_ids_min = 0),
        ("window_ids_max", |c| {
            c.window_ids_max = c.window_ids_min - 1
        }),
        ("block_ids_max", |c| c.block_ids_max = 0),
        ("window_ids_max", |c| c.block_ids_max = c.window_ids_max + 1),
        ("raise_retry_ms", |c| c.raise_retry_ms = RAISE_MS_MAX + 1),
        ("sequences_max", |c| c.sequences_max = 0),
    ];
    for (field, break_it) in cases {
        let mut c = config();
        break_it(&mut c);
        match LeaderAllocator::new(c, 0, []) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn new_leader_is_not_ready_until_its_first_raise_commits() {
    let mut a = leader(Width::W8, 1000);
    let s = name("s");
    assert_eq!(a.grant(0, &s, 10), Err(Error::NotReady));
    // It asks for the raise at once, from the committed ceiling.
    let r = a.poll_raise(0).unwrap();
    assert_eq!(r.sequence, s);
    assert_eq!(r.ceiling, 1000 + 100); // window_ids_min: no rate yet.
    // Only one raise outstanding.
    assert_eq!(a.poll_raise(0), None);
    assert_eq!(a.grant(1, &s, 10), Err(Error::NotReady));
    a.on_raise_committed(&s, r.ceiling).unwrap();
    let b = a.grant(2, &s, 10).unwrap();
    // Starts at the committed ceiling it was built from.
    assert_eq!((b.first(), b.count()), (1000, 10));
    assert_eq!(a.stats().not_ready, 2);
}

#[test]
fn grants_are_increasing_and_below_the_committed_ceiling() {
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    let r = a.poll_raise(0).unwrap();
    a.on_raise_committed(&s, r.ceiling).unwrap();
    let mut end = 0;
    loop {
        match a.grant(1, &s, 7) {
            Ok(b) => {
                assert_eq!(b.first(), end);
                assert!(b.end() <= 100);
                end = b.end();
            }
            Err(e) => {
                assert_eq!(e, Error::AwaitingRaise);
                break;
            }
        }
    }
    // Granted exactly up to the ceiling; the last block was partial.
    assert_eq!(end, 100);
    assert_eq!(a.stats().grants_partial, 1);
    assert_eq!(a.stats().awaiting_raise, 1);
    assert_eq!(a.headroom_ids(&s), Some(0));
}

#[test]
fn blocks_are_capped() {
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    commit_all(&mut a, 0);
    // Drive the rate up so the window exceeds the block cap.
    for t in 1..=200u64 {
        let _ = a.grant(t * MS, &s, 10_000);
        commit_all(&mut a, t * MS);
    }
    let b = a.grant(201 * MS, &s, u64::MAX).unwrap();
    assert_eq!(b.count(), 10_000);
    assert_eq!(a.grant(202 * MS, &s, 0), Err(Error::EmptyRequest));
}

#[test]
fn raises_ahead_of_demand_so_grants_never_wait_in_steady_state() {
    // 1M ids/s in 1 ms steps of 1000 ids; consensus takes 20 ms (lead is
    // 100 ms, so the low-water mark leaves 50 ms).
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    let commit_ms = 20;
    let mut in_flight: Vec<(u64, Raise)> = Vec::new();
    let mut stalls_after_warmup = 0;
    for t in 0..3000u64 {
        let now = t * MS;
        in_flight.retain(|(at, r)| {
            if *at <= now {
                a.on_raise_committed(&r.sequence, r.ceiling).unwrap();
                false
            } else {
                true
            }
        });
        if a.sequence(&s).unwrap().ready {
            match a.grant(now, &s, 1000) {
                Ok(b) => assert!(t < 1000 || b.count() == 1000, "t={t} {b:?}"),
                Err(e) => {
                    assert_eq!(e, Error::AwaitingRaise);
                    if t > 1000 {
                        stalls_after_warmup += 1;
                    }
                }
            }
        }
        while let Some(r) = a.poll_raise_for(now, &s) {
            in_flight.push((now + commit_ms * MS, r));
        }
        assert_eq!(a.poll_raise(now), None);
    }
    assert_eq!(stalls_after_warmup, 0);
    // The window tracks rate × lead: 1M/s × 100 ms = 100k ids.
    let w = a.window_ids(3000 * MS, &s).unwrap();
    assert!((90_000..=110_000).contains(&w), "{w}");
    // A raise per half window or so, not per grant.
    assert!(a.stats().raises_proposed < 3000 / 20, "{:?}", a.stats());
}

#[test]
fn window_is_clamped_and_decays_when_idle() {
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    assert_eq!(a.window_ids(0, &s), Some(100));
    commit_all(&mut a, 0);
    for t in 1..=500u64 {
        while a.grant(t * MS, &s, 10_000).is_ok() {}
        commit_all(&mut a, t * MS);
    }
    // Demand far beyond: clamped to window_ids_max.
    assert_eq!(a.window_ids(500 * MS, &s), Some(1_000_000));
    // Long idle: back to window_ids_min.
    assert_eq!(a.window_ids(10_000 * MS, &s), Some(100));
    assert_eq!(a.window_ids(0, &name("other")), None);
}

#[test]
fn commits_have_max_semantics_and_are_idempotent() {
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    let r1 = a.poll_raise(0).unwrap();
    a.on_raise_committed(&s, r1.ceiling).unwrap();
    a.on_raise_committed(&s, r1.ceiling).unwrap();
    a.on_raise_committed(&s, 0).unwrap();
    assert_eq!(a.sequence(&s).unwrap().committed_ceiling, r1.ceiling);
    assert_eq!(a.stats().raises_committed, 1);
    // Not proposed by this leader: refused, not applied.
    let err = a.on_raise_committed(&s, r1.ceiling + 1).unwrap_err();
    assert_eq!(
        err,
        Error::CeilingNotProposed {
            ceiling: r1.ceiling + 1,
            proposed_max: r1.ceiling
        }
    );
    assert_eq!(
        a.on_raise_committed(&s, u128::MAX),
        Err(Error::CeilingOutOfRange {
            ceiling: u128::MAX,
            limit: Width::W8.limit()
        })
    );
    assert_eq!(a.sequence(&s).unwrap().committed_ceiling, r1.ceiling);
    assert_eq!(a.stats().commits_refused, 2);
    assert_eq!(
        a.on_raise_committed(&name("zz"), 1),
        Err(Error::UnknownSequence)
    );
}

#[test]
fn failed_raise_is_retried_after_the_retry_delay() {
    let mut a = leader(Width::W8, 0);
    let s = name("s");
    let r = a.poll_raise(0).unwrap();
    // A stale failure (other ceiling) changes nothing.
    a.on_raise_failed(0, &s, r.ceiling + 1).unwrap();
    assert_eq!(a.sequence(&s).unwrap().raise, Some(r.ceiling));
    a.on_raise_failed(MS, &s, r.ceiling).unwrap();
    assert_eq!(a.sequence(&s).unwrap().raise, None);
    assert_eq!(a.poll_raise(2 * MS), None);
    assert_eq!(a.poll_timeout(), Some(6 * MS));
    let r2 = a.poll_raise(6 * MS).unwrap();
    assert_eq!(r2.ceiling, r.ceiling);
    // The first raise committed after all (ambiguous failure): accepted.
    a.on_raise_committed(&s, r.ceiling).unwrap();
    assert!(a.sequence(&s).unwrap().ready);
    assert_eq!(a.sequence(&s).unwrap().raise, None);
    assert_eq!(a.stats().raises_failed, 1);
}

#[test]
fn request_crossing_the_limit_gets_what_remains_then_exhausted() {
    let limit = Width::W2.limit();
    let mut a = leader(Width::W2, limit - 40);
    let s = name("s");
    let r = a.poll_raise(0).unwrap();
    // The raise never crosses the limit.
    assert_eq!(r.ceiling, limit);
    a.on_raise_committed(&s, r.ceiling).unwrap();
    let b = a.grant(1, &s, 30).unwrap();
    assert_eq!((b.first(), b.count()), (limit - 40, 30));
    let b = a.grant(2, &s, 30).unwrap();
    assert_eq!((b.first(), b.count(), b.end()), (limit - 10, 10, limit));
    assert_eq!(a.grant(3, &s, 1), Err(Error::Exhausted));
    assert_eq!(a.poll_raise(4), None);
    assert_eq!(a.stats().exhausted, 1);
    // A leader built on an exhausted sequence says so, not NotReady.
    let mut b = leader(Width::W2, limit);
    assert_eq!(b.grant(0, &s, 1), Err(Error::Exhausted));
    assert_eq!(b.poll_raise(0), None);
}

#[test]
fn small_width_windows_and_blocks_scale_down() {
    let mut c = config();
    c.window_ids_min = 4096;
    c.window_ids_max = 1 << 20;
    c.block_ids_max = 1 << 16;
    assert_eq!(c.window_ids_max_for(Width::W2), 255);
    assert_eq!(c.window_ids_min_for(Width::W2), 255);
    assert_eq!(c.block_ids_max_for(Width::W2), 63);
    assert_eq!(c.block_ids_max_for(Width::W8), 1 << 16);
    // One leader drains a whole 2-byte sequence: no overlap, nothing lost.
    let seq = CommittedCeiling {
        sequence: name("s"),
        width: Width::W2,
        ceiling: 1,
    };
    let mut a = LeaderAllocator::new(c, 0, [seq]).unwrap();
    let s = name("s");
    let mut end = 1;
    let mut t = 0;
    loop {
        t += 1;
        commit_all(&mut a, t);
        match a.grant(t, &s, u64::MAX) {
            Ok(b) => {
                assert_eq!(b.first(), end);
                assert!(b.count() <= 63);
                end = b.end();
            }
            Err(Error::Exhausted) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(end, Width::W2.limit());
    assert_eq!(a.stats().ids_granted, Width::W2.limit() - 1);
    // Every raise moved the ceiling by at most one window.
    assert!(a.stats().raises_proposed >= (65_534 / 255) as u64);
}

#[test]
fn leader_change_loses_at_most_one_window_on_small_widths() {
    // Leaders follow each other; each grants a varying amount, raises and
    // maybe leaves a committed raise unused. Every id a new leader skips is
    // lost; the bound is window_ids_max_for(W2) = 255 per change.
    let c = config();
    let cap = c.window_ids_max_for(Width::W2) as u128;
    let s = name("s");
    let mut committed: Id = 0;
    let mut highest_end: Id = 0;
    for round in 0..40u64 {
        let mut a = LeaderAllocator::new(
            c.clone(),
            round * 1000 * MS,
            [CommittedCeiling {
                sequence: s.clone(),
                width: Width::W2,
                ceiling: committed,
            }],
        )
        .unwrap();
        // Skipped ids: from the old leader's last grant to this start.
        assert!(
            committed - highest_end <= cap,
            "lost {} ids",
            committed - highest_end
        );
        let grants = round % 7;
        for g in 0..=grants {
            let now = round * 1000 * MS + g * MS;
            if let Some(r) = a.poll_raise(now) {
                a.on_raise_committed(&s, r.ceiling).unwrap();
                committed = committed.max(r.ceiling);
            }
            if let Ok(b) = a.grant(now, &s, 13 * (round + 1)) {
                assert!(b.first() >= highest_end);
                highest_end = b.end();
            }
        }
        // Sometimes the leader dies right after a raise committed.
        if round % 3 == 0
            && let Some(r) = a.poll_raise(round * 1000 * MS + 999 * MS)
        {
            committed = committed.max(r.ceiling);
        }
        let v = a.sequence(&s).unwrap();
        assert!(v.committed_ceiling - v.next <= cap);
    }
}

#[test]
fn sequences_are_bounded_and_unique() {
    let mut a = LeaderAllocator::new(config(), 0, []).unwrap();
    for i in 0..4 {
        let c = CommittedCeiling {
            sequence: name(&format!("s{i}")),
            width: Width::W4,
            ceiling: 0,
        };
        a.add_sequence(0, c).unwrap();
    }
    let c = CommittedCeiling {
        sequence: name("s9"),
        width: Width::W4,
        ceiling: 0,
    };
    assert_eq!(
        a.add_sequence(0, c),
        Err(Error::TooManySequences { max: 4 })
    );
    let c = CommittedCeiling {
        sequence: name("s0"),
        width: Width::W4,
        ceiling: 0,
    };
    assert_eq!(a.add_sequence(0, c), Err(Error::DuplicateSequence));
    let c = CommittedCeiling {
        sequence: name("s0"),
        width: Width::W2,
        ceiling: 1 << 16,
    };
    assert!(matches!(
        a.add_sequence(0, c),
        Err(Error::CeilingOutOfRange { .. })
    ));
    assert_eq!(a.grant(0, &name("nope"), 1), Err(Error::UnknownSequence));
    // Every sequence gets its first raise, one poll each.
    let mut raised = 0;
    while a.poll_raise(0).is_some() {
        raised += 1;
    }
    assert_eq!(raised, 4);
}

#[test]
fn agent_restart_on_a_small_width_loses_at_most_its_blocks() {
    // An agent holding two blocks of a 2-byte sequence restarts and never
    // uses them: each block is at most block_ids_cap(W2) = 63 ids, so the
    // loss is at most 126 ids = 0.19 % of the space.
    let mut a = leader(Width::W2, 1);
    let s = name("s");
    commit_all(&mut a, 0);
    let held = [
        a.grant(1, &s, u64::MAX).unwrap(),
        a.grant(2, &s, u64::MAX).unwrap(),
    ];
    let lost: u64 = held.iter().map(|b| b.count()).sum();
    assert!(held.iter().all(|b| b.count() <= 63));
    assert!(lost <= 2 * 63);
    assert!((lost as f64) / (Width::W2.limit() as f64) < 0.002);
    // The restarted agent's first block starts after them: lost, not reused.
    commit_all(&mut a, 3);
    let next = a.grant(3, &s, 10).unwrap();
    assert_eq!(next.first(), held[1].end());
}

/// The bounds of `AllocatorConfig::validate`, each on its edge (killed `cargo mutants`
/// survivors: `RAISE_MS_MAX = 60 * 1000`, `raise_retry_ms > RAISE_MS_MAX`, and the two
/// `window_ids_max <` comparisons).
#[test]
fn config_bounds_accept_their_edges_and_refuse_one_beyond() {
    let base = AllocatorConfig::DEFAULT;
    let field = |c: AllocatorConfig| match c.validate() {
        Ok(()) => None,
        Err(Error::InvalidConfig { field, .. }) => Some(field),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(RAISE_MS_MAX, 60_000, "one minute");
    assert_eq!(
        field(AllocatorConfig {
            raise_retry_ms: 60_000,
            ..base
        }),
        None
    );
    assert_eq!(
        field(AllocatorConfig {
            raise_retry_ms: 60_001,
            ..base
        }),
        Some("raise_retry_ms")
    );
    assert_eq!(
        field(AllocatorConfig {
            raise_lead_ms: 60_000,
            ..base
        }),
        None
    );
    let (min, block) = (1_000, 500);
    let sized = |max| AllocatorConfig {
        window_ids_min: min,
        window_ids_max: max,
        block_ids_max: block,
        ..base
    };
    assert_eq!(field(sized(min)), None, "max == min is allowed");
    assert_eq!(field(sized(min - 1)), Some("window_ids_max"));
    let equal = AllocatorConfig {
        window_ids_min: 10,
        window_ids_max: 500,
        block_ids_max: 500,
        ..base
    };
    assert_eq!(
        field(equal.clone()),
        None,
        "window_ids_max == block_ids_max is allowed"
    );
    assert_eq!(
        field(AllocatorConfig {
            block_ids_max: 501,
            ..equal
        }),
        Some("window_ids_max")
    );
}

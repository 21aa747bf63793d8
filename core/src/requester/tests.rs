use super::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

const MS: u64 = 1000;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7000))
}

fn config() -> RequesterConfig {
    RequesterConfig {
        requests_max: 4,
        servers_max: 8,
        rto_initial_ms: 10,
        rto_max_ms: 40,
        jitter_percent: 0,
        attempts_max: 5,
        request_timeout_ms: 10_000,
        silent_timeouts_max: 2,
    }
}

type R = Requester<&'static str, u32>;

fn requester(config: RequesterConfig, servers: u8) -> R {
    let servers: Vec<_> = (1..=servers).map(addr).collect();
    Requester::new(config, &servers, 1, 0).unwrap()
}

fn done(reply_to: SeqNo, epoch: Epoch, payload: u32) -> Response<u32> {
    Response {
        reply_to,
        epoch,
        reply: Reply::Done(payload),
    }
}

/// Fires the timer if it is due at `now_us`.
fn fire(r: &mut R, now_us: u64, rng: &mut SmallRng) {
    if r.poll_timeout().is_some_and(|t| t <= now_us) {
        r.handle_timeout(now_us, rng);
    }
}

#[test]
fn config_and_servers_are_validated() {
    assert!(RequesterConfig::DEFAULT.validate().is_ok());
    type Breaker = (&'static str, fn(&mut RequesterConfig));
    let cases: [Breaker; 8] = [
        ("requests_max", |c| c.requests_max = 0),
        ("servers_max", |c| c.servers_max = SERVERS_MAX_LIMIT + 1),
        ("rto_initial_ms", |c| c.rto_initial_ms = 0),
        ("rto_max_ms", |c| c.rto_max_ms = c.rto_initial_ms - 1),
        ("jitter_percent", |c| c.jitter_percent = 91),
        ("attempts_max", |c| c.attempts_max = 0),
        ("request_timeout_ms", |c| c.request_timeout_ms = 0),
        ("silent_timeouts_max", |c| c.silent_timeouts_max = 0),
    ];
    for (field, break_it) in cases {
        let mut c = config();
        break_it(&mut c);
        match R::new(c, &[addr(1)], 1, 0) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let field = |r: Result<R, Error>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(field(R::new(config(), &[], 1, 0)), "servers");
    assert_eq!(
        field(R::new(config(), &[addr(1), addr(1)], 1, 0)),
        "servers"
    );
    let many: Vec<_> = (1..=9).map(addr).collect();
    assert_eq!(field(R::new(config(), &many, 1, 0)), "servers");
    assert_eq!(field(R::new(config(), &[addr(1)], 0, 0)), "first_seq");
}

#[test]
fn backoff_doubles_and_is_capped() {
    let c = config();
    assert_eq!(c.rto_us(1), 10 * MS);
    assert_eq!(c.rto_us(2), 20 * MS);
    assert_eq!(c.rto_us(3), 40 * MS);
    assert_eq!(c.rto_us(4), 40 * MS);
    assert_eq!(c.rto_us(64), 40 * MS);
    assert_eq!(c.rto_us(u32::MAX), 40 * MS);
}

#[test]
fn seqs_increase_from_first_seq_and_outstanding_is_bounded() {
    let mut r: R = Requester::new(config(), &[addr(1)], 500, 0).unwrap();
    for i in 0..4 {
        assert_eq!(r.send(0, "x"), Ok(500 + i));
    }
    assert_eq!(r.send(0, "x"), Err(Error::TooManyOutstanding { max: 4 }));
    let t = r.poll_transmit(0).unwrap();
    assert_eq!(
        (t.seq, t.destination, t.attempt, t.request),
        (500, addr(1), 1, "x")
    );
    for seq in 501..504 {
        assert_eq!(r.poll_transmit(0).unwrap().seq, seq);
    }
    assert_eq!(r.poll_transmit(0), None);
    // A completion not yet taken still counts.
    assert_eq!(
        r.handle_response(1, addr(1), done(500, 1, 9)),
        Disposition::Accepted
    );
    assert_eq!(r.send(2, "y"), Err(Error::TooManyOutstanding { max: 4 }));
    assert!(matches!(
        r.poll_event(),
        Some(Event::Completed {
            seq: 500,
            payload: 9,
            ..
        })
    ));
    assert_eq!(r.send(3, "y"), Ok(504));
}

#[test]
fn completes_once_and_drops_duplicates_and_unknown_seqs() {
    let mut r = requester(config(), 2);
    let seq = r.send(0, "a").unwrap();
    r.poll_transmit(0).unwrap();
    assert_eq!(
        r.handle_response(1, addr(1), done(seq, 3, 7)),
        Disposition::Accepted
    );
    assert_eq!(
        r.poll_event(),
        Some(Event::Completed {
            seq,
            epoch: 3,
            from: addr(1),
            payload: 7
        })
    );
    // The same response again, a different payload for the same seq, a seq
    // never sent, seq 0: all dropped.
    assert_eq!(
        r.handle_response(2, addr(1), done(seq, 3, 7)),
        Disposition::UnknownSeq
    );
    assert_eq!(
        r.handle_response(2, addr(1), done(seq, 3, 8)),
        Disposition::UnknownSeq
    );
    assert_eq!(
        r.handle_response(2, addr(1), done(99, 3, 8)),
        Disposition::UnknownSeq
    );
    assert_eq!(
        r.handle_response(2, addr(1), done(0, 3, 8)),
        Disposition::UnknownSeq
    );
    assert_eq!(
        r.handle_response(2, addr(9), done(seq, 3, 8)),
        Disposition::UnknownSource
    );
    // A response for an outstanding seq from a server it was never sent to,
    // or for a seq not transmitted yet, answers some other request.
    let b = r.send(3, "b").unwrap();
    let d = r.handle_response(3, addr(1), done(b, 3, 1));
    assert_eq!(d, Disposition::UnknownSeq);
    r.poll_transmit(3).unwrap();
    let d = r.handle_response(3, addr(2), done(b, 3, 1));
    assert_eq!(d, Disposition::UnknownSeq);
    let d = r.handle_response(3, addr(1), done(b, 3, 1));
    assert_eq!(d, Disposition::Accepted);
    r.poll_event().unwrap();
    assert_eq!(r.poll_event(), None);
    assert_eq!(r.stats().unknown_seq, 6);
    assert_eq!(r.stats().unknown_source, 1);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn retransmits_with_the_same_seq_on_the_backoff_schedule() {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut r = requester(config(), 1);
    let seq = r.send(0, "a").unwrap();
    let mut sent_at = Vec::new();
    let mut now = 0;
    while now < 500 * MS {
        fire(&mut r, now, &mut rng);
        while let Some(t) = r.poll_transmit(now) {
            assert_eq!(t.seq, seq);
            sent_at.push((now, t.attempt));
        }
        now += MS;
    }
    // 5 attempts at 0, 10, 30, 70, 110 ms; then given up at 150 ms.
    let times: Vec<_> = sent_at.iter().map(|(t, _)| t / MS).collect();
    assert_eq!(times, [0, 10, 30, 70, 110]);
    assert_eq!(
        sent_at.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        r.poll_event(),
        Some(Event::Failed {
            seq,
            error: Error::AttemptsExhausted { seq, attempts: 5 }
        })
    );
    assert_eq!(r.stats().retransmits, 4);
    assert_eq!(r.stats().failed, 1);
}

#[test]
fn jitter_shortens_timeouts_within_bounds_deterministically() {
    let run = |seed: u64| {
        let mut c = config();
        c.jitter_percent = 50;
        c.attempts_max = 20;
        c.request_timeout_ms = 100_000;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut r = requester(c, 1);
        r.send(0, "a").unwrap();
        r.poll_transmit(0).unwrap();
        let mut times = vec![0];
        while let Some(t) = r.poll_timeout() {
            r.handle_timeout(t, &mut rng);
            if r.poll_transmit(t).is_some() {
                times.push(t);
            }
        }
        times
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    assert_eq!(a.len(), 20);
    for (i, pair) in a.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let rto = config().rto_us(i as u32 + 1);
        if i == 0 {
            assert_eq!(gap, rto); // The first timeout is not jittered.
        } else {
            assert!(gap <= rto && gap >= rto / 2, "{i}: {gap} vs {rto}");
        }
    }
}

#[test]
fn stale_epochs_are_never_used() {
    let mut r = requester(config(), 2);
    let a = r.send(0, "a").unwrap();
    let b = r.send(0, "b").unwrap();
    while r.poll_transmit(0).is_some() {}
    assert_eq!(
        r.handle_response(1, addr(1), done(a, 5, 1)),
        Disposition::Accepted
    );
    assert_eq!(r.highest_epoch(), 5);
    // An older leader's answer to b: dropped, b still outstanding.
    assert_eq!(
        r.handle_response(2, addr(2), done(b, 4, 2)),
        Disposition::StaleEpoch
    );
    let redirect = Response {
        reply_to: b,
        epoch: 4,
        reply: Reply::Redirect { leader: None },
    };
    assert_eq!(
        r.handle_response(2, addr(1), redirect),
        Disposition::StaleEpoch
    );
    assert_eq!(r.outstanding(), 2);
    // Same or newer epoch: used.
    assert_eq!(
        r.handle_response(3, addr(1), done(b, 5, 3)),
        Disposition::Accepted
    );
    assert_eq!(r.stats().stale_epoch, 2);
}

/// Regression (found by the simulator): a redirect from a server in a higher
/// term than the leader (its failed elections raised its term) must not
/// make the real leader's answers stale.
#[test]
fn a_redirect_from_a_higher_term_does_not_make_the_leader_stale() {
    let mut r = requester(config(), 2);
    let a = r.send(0, "a").unwrap();
    assert_eq!(r.poll_transmit(0).unwrap().destination, addr(1));
    // Server 1 is a candidate in term 7; the leader, server 2, is in term 4.
    let redirect = Response {
        reply_to: a,
        epoch: 7,
        reply: Reply::Redirect {
            leader: Some(addr(2)),
        },
    };
    assert_eq!(
        r.handle_response(1, addr(1), redirect),
        Disposition::Redirected
    );
    assert_eq!(r.highest_epoch(), 0);
    assert_eq!(r.poll_transmit(1).unwrap().destination, addr(2));
    assert_eq!(
        r.handle_response(2, addr(2), done(a, 4, 9)),
        Disposition::Accepted
    );
    assert_eq!(r.highest_epoch(), 4);
}

/// Issue 12 item 5: a datagram that answers no outstanding request (spoofed,
/// replayed, or a late duplicate) carrying `epoch = 2^64-1` must not raise the
/// highest epoch, or every real answer after it would be dropped as stale.
#[test]
fn an_answer_to_no_request_raises_no_epoch() {
    let mut r = requester(config(), 2);
    let a = r.send(0, "a").unwrap();
    while r.poll_transmit(0).is_some() {}
    assert_eq!(
        r.handle_response(1, addr(1), done(a + 1000, u64::MAX, 1)),
        Disposition::UnknownSeq
    );
    assert_eq!(r.highest_epoch(), 0);
    assert_eq!(
        r.handle_response(2, addr(1), done(a, 3, 2)),
        Disposition::Accepted
    );
    assert_eq!(r.highest_epoch(), 3);
}

#[test]
fn follows_a_redirect_to_the_named_leader_with_the_same_seq() {
    let mut r = requester(config(), 3);
    let seq = r.send(0, "a").unwrap();
    assert_eq!(r.poll_transmit(0).unwrap().destination, addr(1));
    let redirect = |to| Response {
        reply_to: seq,
        epoch: 2,
        reply: Reply::Redirect { leader: to },
    };
    assert_eq!(
        r.handle_response(1, addr(1), redirect(Some(addr(3)))),
        Disposition::Redirected
    );
    assert_eq!(r.leader(), addr(3));
    let t = r.poll_transmit(1).unwrap();
    assert_eq!((t.seq, t.destination, t.attempt), (seq, addr(3), 2));
    // A late redirect answering the first transmission is stale.
    assert_eq!(
        r.handle_response(2, addr(1), redirect(Some(addr(2)))),
        Disposition::StaleRedirect
    );
    assert_eq!(r.leader(), addr(3));
    // A redirect naming an unknown server, or none: rotate to the next.
    assert_eq!(
        r.handle_response(3, addr(3), redirect(Some(addr(9)))),
        Disposition::Redirected
    );
    assert_eq!(r.leader(), addr(1));
    assert_eq!(r.poll_transmit(3).unwrap().destination, addr(1));
    assert_eq!(
        r.handle_response(4, addr(1), redirect(None)),
        Disposition::Redirected
    );
    assert_eq!(r.leader(), addr(2));
    assert_eq!(r.poll_transmit(4).unwrap().destination, addr(2));
    // The redirects count as attempts: the loop is bounded.
    assert_eq!(
        r.handle_response(5, addr(2), redirect(Some(addr(1)))),
        Disposition::Redirected
    );
    assert_eq!(r.poll_transmit(5).unwrap().attempt, 5);
    assert_eq!(
        r.handle_response(6, addr(1), redirect(Some(addr(2)))),
        Disposition::Redirected
    );
    assert_eq!(r.poll_transmit(6), None);
    assert_eq!(
        r.poll_event(),
        Some(Event::Failed {
            seq,
            error: Error::AttemptsExhausted { seq, attempts: 5 }
        })
    );
}

#[test]
fn rotates_away_from_a_silent_server() {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut r = requester(config(), 3);
    let seq = r.send(0, "a").unwrap();
    let mut dests = Vec::new();
    let mut now = 0;
    while dests.len() < 5 {
        fire(&mut r, now, &mut rng);
        while let Some(t) = r.poll_transmit(now) {
            dests.push(t.destination);
        }
        now += MS;
    }
    // Two silent timeouts per server (silent_timeouts_max = 2).
    assert_eq!(dests, [addr(1), addr(1), addr(2), addr(2), addr(3)]);
    assert_eq!(r.stats().rotations, 2);
    // The third server answers.
    assert_eq!(
        r.handle_response(now, addr(3), done(seq, 1, 1)),
        Disposition::Accepted
    );
    assert_eq!(r.leader(), addr(3));
}

#[test]
fn try_later_keeps_the_server_and_the_schedule() {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut r = requester(config(), 2);
    let seq = r.send(0, "a").unwrap();
    r.poll_transmit(0).unwrap();
    let later = Response {
        reply_to: seq,
        epoch: 1,
        reply: Reply::TryLater,
    };
    assert_eq!(
        r.handle_response(MS, addr(1), later.clone()),
        Disposition::TryLater
    );
    assert_eq!(r.poll_transmit(MS), None);
    assert_eq!(r.poll_timeout(), Some(10 * MS));
    r.handle_timeout(10 * MS, &mut rng);
    assert_eq!(r.poll_transmit(10 * MS).unwrap().destination, addr(1));
    // An answer from the leader resets its silence count: no rotation.
    assert_eq!(
        r.handle_response(11 * MS, addr(1), later),
        Disposition::TryLater
    );
    r.handle_timeout(30 * MS, &mut rng);
    assert_eq!(r.poll_transmit(30 * MS).unwrap().destination, addr(1));
    assert_eq!(r.stats().rotations, 0);
}

#[test]
fn send_error_rotates_and_retransmits_at_once() {
    let mut r = requester(config(), 2);
    let a = r.send(0, "a").unwrap();
    let b = r.send(0, "b").unwrap();
    while r.poll_transmit(0).is_some() {}
    r.handle_send_error(1, addr(1));
    assert_eq!(r.leader(), addr(2));
    let t1 = r.poll_transmit(1).unwrap();
    let t2 = r.poll_transmit(1).unwrap();
    assert_eq!((t1.seq, t1.destination, t1.attempt), (a, addr(2), 2));
    assert_eq!((t2.seq, t2.destination, t2.attempt), (b, addr(2), 2));
    // An error for a server no request went to last changes no request.
    r.handle_send_error(2, addr(1));
    assert_eq!(r.poll_transmit(2), None);
    assert_eq!(r.stats().send_errors, 2);
}

#[test]
fn every_server_refusing_fails_after_attempts_max() {
    let mut r = requester(config(), 2);
    let seq = r.send(0, "a").unwrap();
    let mut sends = 0;
    while let Some(t) = r.poll_transmit(0) {
        sends += 1;
        r.handle_send_error(0, t.destination);
    }
    assert_eq!(sends, 5);
    assert_eq!(
        r.poll_event(),
        Some(Event::Failed {
            seq,
            error: Error::AttemptsExhausted { seq, attempts: 5 }
        })
    );
}

#[test]
fn deadline_bounds_a_request() {
    let mut c = config();
    c.attempts_max = 64;
    c.request_timeout_ms = 100;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut r = requester(c, 1);
    let seq = r.send(0, "a").unwrap();
    let mut now = 0;
    let mut last_send = 0;
    loop {
        while r.poll_transmit(now).is_some() {
            last_send = now;
        }
        let Some(t) = r.poll_timeout() else { break };
        now = t;
        r.handle_timeout(now, &mut rng);
    }
    assert_eq!(now, 100 * MS);
    assert!(last_send < 100 * MS);
    assert_eq!(
        r.poll_event(),
        Some(Event::Failed {
            seq,
            error: Error::DeadlineExceeded {
                seq,
                waited_ms: 100
            }
        })
    );
}

#[test]
fn a_continued_requester_keeps_the_epoch_filter_and_numbers_above() {
    let mut r = requester(config(), 2);
    let a = r.send(0, "a").unwrap();
    r.poll_transmit(0).unwrap();
    assert_eq!(
        r.handle_response(MS, addr(1), done(a, 7, 1)),
        Disposition::Accepted
    );
    let b = r.send(MS, "b").unwrap();
    assert_eq!(r.highest_epoch(), 7);
    // Switched to server 2 first: same filter, seqs above `b`, nothing outstanding.
    let mut n: R = r.continue_with(&[addr(2), addr(1)], 2 * MS).unwrap();
    assert_eq!(n.leader(), addr(2));
    assert_eq!(n.highest_epoch(), 7);
    assert_eq!(n.outstanding(), 0);
    let c = n.send(2 * MS, "c").unwrap();
    assert!(c > b, "{c} above {b}");
    n.poll_transmit(2 * MS).unwrap();
    assert_eq!(
        n.handle_response(3 * MS, addr(2), done(c, 6, 2)),
        Disposition::StaleEpoch
    );
    assert_eq!(
        n.handle_response(3 * MS, addr(2), done(c, 7, 2)),
        Disposition::Accepted
    );
}

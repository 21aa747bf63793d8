//! The machine driven with no sockets: a fake server in the test decodes its datagrams
//! with `unid_proto::decode` and answers with `Codec::encode`, so the codec, the CRC and
//! every check of the machine are in the loop.

use super::*;
use unid_proto::{Block, List};

const MS: u64 = 1000;

fn server(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400 + i))
}

fn config() -> MachineConfig {
    let mut c = crate::AgentConfig::new(vec![server(1), server(2)]);
    c.sequences = vec![SequenceName::new("orders").unwrap()];
    c.name = "test-agent".to_owned();
    c.machine_config(1_000_000)
}

/// Everything the machine wants to send at `now`.
fn sent(m: &mut Machine, now: u64) -> Vec<Transmit> {
    std::iter::from_fn(|| m.poll_transmit(now)).collect()
}

fn outputs(m: &mut Machine) -> Vec<Output> {
    std::iter::from_fn(|| m.poll_output()).collect()
}

/// A server's datagram: `message` answering `reply_to`, in `epoch`.
fn datagram(epoch: u64, seq: u64, reply_to: u64, message: &Message) -> Vec<u8> {
    let mut out = [0u8; DATAGRAM_BYTES_MAX];
    let header = Header {
        sender: 1,
        seq,
        reply_to,
        epoch,
    };
    let len = Codec::new()
        .encode(&header, message, None, &mut out)
        .expect("encodes");
    out[..len].to_vec()
}

fn welcome(node_id: NodeId) -> Message<'static> {
    Message::Welcome {
        node_id,
        lease_ms: 3000,
        servers: List::empty(),
        truncated: false,
    }
}

fn grant(first: u128, count: u64) -> Message<'static> {
    Message::BlockGrant {
        sequence: "orders",
        width: Width::W8,
        block: Block::new(first, count, Width::W8).expect("fits"),
    }
}

/// The one block request the machine sends at `now` (pings aside): where to, its seq and
/// how many ids it asks for.
fn one_request(m: &mut Machine, now: u64) -> (SocketAddr, u64, u64) {
    let t = sent(m, now);
    let blocks: Vec<_> = t
        .iter()
        .filter_map(|t| {
            let f = decode(&t.bytes, None).expect("the machine's datagrams decode");
            match f.message {
                Message::BlockRequest { sequence, count } => {
                    assert_eq!(sequence, "orders");
                    Some((t.to, f.header.seq, count))
                }
                Message::Ping { .. } => None,
                other => panic!("unexpected {other:?}"),
            }
        })
        .collect();
    assert_eq!(blocks.len(), 1, "one block request: {t:?}");
    blocks[0]
}

/// A machine registered with server 1 as node 7 (epoch 3), its first block request
/// sent: returns it and that request's seq and count.
fn registered() -> (Machine, u64, u64) {
    let mut m = Machine::new(config(), 0, 1).unwrap();
    m.handle_timeout(0);
    let t = sent(&mut m, 0);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, server(1));
    let f = decode(&t[0].bytes, None).unwrap();
    assert_eq!(f.header.sender, 0, "a Hello has no node id yet");
    match f.message {
        Message::Hello {
            incarnation, name, ..
        } => {
            assert_eq!(incarnation, 1_000_000);
            assert_eq!(name, "test-agent");
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    m.handle_datagram(MS, server(1), &datagram(3, 50, f.header.seq, &welcome(7)));
    assert_eq!(m.node_id(), 7);
    assert_eq!(m.connection(), Connection::Connected);
    assert_eq!(m.epoch(), 3);
    m.handle_timeout(2 * MS);
    let t = sent(&mut m, 2 * MS);
    let blocks: Vec<_> = t
        .iter()
        .filter_map(|t| {
            let f = decode(&t.bytes, None).unwrap();
            assert_eq!(f.header.sender, 7, "requests carry the node id");
            match f.message {
                Message::BlockRequest { count, .. } => Some((f.header.seq, count)),
                _ => None,
            }
        })
        .collect();
    assert_eq!(blocks.len(), 1, "one block request in flight: {t:?}");
    (m, blocks[0].0, blocks[0].1)
}

#[test]
fn registers_then_asks_for_a_block() {
    let (m, _, count) = registered();
    assert!(count >= 1);
    assert_eq!(m.counters().registrations, 1);
    assert_eq!(m.counters().block_requests, 1);
    assert_eq!(m.sequence(0, 2 * MS).state, SequenceState::Waiting);
}

#[test]
fn a_corrupted_welcome_is_dropped() {
    let mut m = Machine::new(config(), 0, 1).unwrap();
    m.handle_timeout(0);
    let t = sent(&mut m, 0);
    let seq = decode(&t[0].bytes, None).unwrap().header.seq;
    let mut bytes = datagram(3, 50, seq, &welcome(7));
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    m.handle_datagram(MS, server(1), &bytes);
    assert_eq!(
        m.node_id(),
        0,
        "a datagram failing its CRC is not a Welcome"
    );
    assert_eq!(m.counters().datagrams_dropped, 1);
    m.handle_datagram(MS, server(1), &datagram(3, 51, seq, &welcome(7)));
    assert_eq!(m.node_id(), 7);
}

#[test]
fn a_grant_opens_the_ring_and_is_written() {
    let (mut m, seq, count) = registered();
    m.handle_datagram(3 * MS, server(1), &datagram(3, 51, seq, &grant(1, count)));
    assert_eq!(
        outputs(&mut m),
        vec![Output::OpenRing {
            index: 0,
            width: Width::W8
        }]
    );
    assert!(
        sent(&mut m, 3 * MS).is_empty(),
        "nothing until the ring is open"
    );
    m.handle_ring_opened(3 * MS, 0, Ok(()));
    assert_eq!(
        outputs(&mut m),
        vec![Output::Write {
            index: 0,
            first: 1,
            count
        }]
    );
    let s = m.sequence(0, 3 * MS);
    assert_eq!(s.state, SequenceState::Serving);
    assert_eq!(s.next_min, 1 + u128::from(count));
    assert_eq!(s.ids_ahead, count);
    assert_eq!(m.counters().grants, 1);
    // Two blocks ahead: the next one is asked for at once.
    let (_, next, _) = one_request(&mut m, 3 * MS);
    assert!(next > seq);
}

#[test]
fn a_ring_that_cannot_open_drops_the_grant_and_asks_later() {
    let (mut m, seq, count) = registered();
    m.handle_datagram(3 * MS, server(1), &datagram(3, 51, seq, &grant(1, count)));
    assert_eq!(outputs(&mut m).len(), 1);
    m.handle_ring_opened(3 * MS, 0, Err("no space".to_owned()));
    assert!(
        outputs(&mut m).is_empty(),
        "the block is lost, never written"
    );
    assert_eq!(
        m.sequence(0, 3 * MS).state,
        SequenceState::RingError("no space".to_owned())
    );
    m.handle_timeout(4 * MS);
    assert!(sent(&mut m, 4 * MS).is_empty(), "not asked again at once");
    assert!(m.poll_timeout().is_some_and(|t| t > 4 * MS));
    m.handle_timeout(3 * MS + 2_000 * MS);
    let (_, again, _) = one_request(&mut m, 3 * MS + 2_000 * MS);
    assert!(again > seq);
}

#[test]
fn out_of_order_duplicate_overlapping_and_oversized_grants_are_refused() {
    let (mut m, seq, count) = registered();
    m.handle_datagram(
        3 * MS,
        server(1),
        &datagram(3, 51, seq, &grant(1000, count)),
    );
    assert_eq!(outputs(&mut m).len(), 1, "OpenRing");
    m.handle_ring_opened(3 * MS, 0, Ok(()));
    assert_eq!(outputs(&mut m).len(), 1, "Write");
    let end = 1000 + u128::from(count);
    // The same answer again (a duplicate datagram): its request is done, dropped.
    m.handle_datagram(
        3 * MS,
        server(1),
        &datagram(3, 52, seq, &grant(1000, count)),
    );
    assert!(outputs(&mut m).is_empty());
    assert_eq!(m.counters().grants, 1);
    // The next request answered below the previous block, overlapping it, or larger
    // than asked: refused, nothing written, counted.
    let mut rejected = 0;
    for (first, n) in [(1, 10), (end - 1, 10)] {
        let (_, next, _) = one_request(&mut m, 4 * MS);
        m.handle_datagram(
            4 * MS,
            server(1),
            &datagram(3, 60 + first as u64, next, &grant(first, n)),
        );
        rejected += 1;
        assert!(outputs(&mut m).is_empty(), "{first}+{n} refused");
        assert_eq!(m.counters().grants_rejected, rejected);
        m.handle_timeout(4 * MS);
    }
    let (_, next, asked) = one_request(&mut m, 4 * MS);
    m.handle_datagram(
        4 * MS,
        server(1),
        &datagram(3, 70, next, &grant(end, asked + 1)),
    );
    assert!(outputs(&mut m).is_empty(), "larger than asked");
    assert_eq!(m.counters().grants_rejected, 3);
    assert_eq!(
        m.sequence(0, 4 * MS).next_min,
        end,
        "nothing refused moved it"
    );
    // A good one still goes in.
    m.handle_timeout(4 * MS);
    let (_, next, asked) = one_request(&mut m, 4 * MS);
    m.handle_datagram(
        4 * MS,
        server(1),
        &datagram(3, 71, next, &grant(end, asked)),
    );
    assert_eq!(
        outputs(&mut m),
        vec![Output::Write {
            index: 0,
            first: end,
            count: asked
        }]
    );
}

#[test]
fn a_redirect_does_not_raise_the_epoch() {
    let (mut m, seq, count) = registered();
    assert_eq!(m.epoch(), 3);
    // Server 2 (not the leader, in a higher term) redirects the request to server 1:
    // stale for the requester (it went to server 1), and nothing is raised.
    let redirect = Message::NotLeader {
        leader_id: 1,
        leader: Some(server(1)),
        servers: List::empty(),
        truncated: false,
    };
    m.handle_datagram(3 * MS, server(2), &datagram(9, 80, seq, &redirect));
    assert_eq!(m.epoch(), 3);
    // Server 1 itself redirects in a higher term (it lost leadership to server 2).
    m.handle_datagram(3 * MS, server(1), &datagram(9, 81, seq, &redirect_to(2)));
    assert_eq!(m.epoch(), 3, "a redirect raises nothing");
    assert_eq!(m.counters().redirects, 1);
    let (to, again, _) = one_request(&mut m, 3 * MS);
    assert_eq!(
        (to, again),
        (server(2), seq),
        "retransmitted to the named leader"
    );
    // The real leader answers in a term below the redirect's: accepted.
    m.handle_datagram(4 * MS, server(2), &datagram(4, 90, seq, &grant(1, count)));
    assert_eq!(outputs(&mut m).len(), 1);
    assert_eq!(m.epoch(), 4);
    // Below the highest epoch a leader answered with: dropped.
    m.handle_datagram(4 * MS, server(1), &datagram(3, 91, seq, &grant(1, count)));
    assert_eq!(m.counters().datagrams_dropped, 1);
}

fn redirect_to(i: u16) -> Message<'static> {
    Message::NotLeader {
        leader_id: u64::from(i),
        leader: Some(server(i)),
        servers: List::empty(),
        truncated: false,
    }
}

fn leader_change(i: u16) -> Message<'static> {
    Message::LeaderChange {
        leader_id: u64::from(i),
        leader: server(i),
        servers: List::empty(),
        truncated: false,
    }
}

#[test]
fn a_leader_change_from_or_naming_an_unknown_server_is_ignored() {
    let (mut m, _, _) = registered();
    assert_eq!(m.leader(), server(1));
    // From an address that is not one of the servers: dropped before anything.
    m.handle_datagram(3 * MS, server(9), &datagram(3, 100, 0, &leader_change(2)));
    assert_eq!(m.leader(), server(1));
    assert_eq!(m.counters().datagrams_dropped, 1);
    assert_eq!(m.counters().leader_changes, 0);
    // From a known server, naming one this agent does not know: rejected.
    m.handle_datagram(3 * MS, server(2), &datagram(3, 101, 0, &leader_change(9)));
    assert_eq!(m.leader(), server(1));
    assert_eq!(m.counters().leader_changes_rejected, 1);
    // With an epoch far above any leader's: rejected.
    m.handle_datagram(3 * MS, server(2), &datagram(50, 102, 0, &leader_change(2)));
    assert_eq!(m.leader(), server(1));
    assert_eq!(m.counters().leader_changes_rejected, 2);
    // A plausible one naming a known server: followed, the request re-sent there, the
    // epoch not raised by it.
    m.handle_datagram(3 * MS, server(2), &datagram(4, 103, 0, &leader_change(2)));
    assert_eq!(m.leader(), server(2));
    assert_eq!(m.counters().leader_changes, 1);
    assert_eq!(m.epoch(), 3);
    let (to, _, _) = one_request(&mut m, 3 * MS);
    assert_eq!(to, server(2));
    // The same datagram again (a replay): dropped and counted.
    m.handle_datagram(3 * MS, server(2), &datagram(4, 103, 0, &leader_change(1)));
    assert_eq!(m.leader(), server(2));
    assert_eq!(m.counters().replays_dropped, 1);
}

#[test]
fn consumption_is_measured_and_a_drained_ring_is_counted() {
    let (mut m, seq, count) = registered();
    m.handle_datagram(3 * MS, server(1), &datagram(3, 51, seq, &grant(1, count)));
    m.handle_ring_opened(3 * MS, 0, Ok(()));
    outputs(&mut m);
    m.handle_ring_taken(500 * MS, 0, u128::from(count));
    assert_eq!(m.sequence(0, 500 * MS).ids_ahead, 0);
    assert_eq!(m.counters().ring_empty_events, 1);
    assert!(m.sequence(0, 500 * MS).rate_ids_per_s > 0.0);
    // The same total again changes nothing.
    m.handle_ring_taken(501 * MS, 0, u128::from(count));
    assert_eq!(m.counters().ring_empty_events, 1);
}

#[test]
fn the_next_timeout_is_never_in_the_past() {
    let (mut m, _, _) = registered();
    for now in [2 * MS, 3 * MS, 1_000 * MS] {
        m.handle_timeout(now);
        sent(&mut m, now);
        let t = m.poll_timeout().expect("the request's timer");
        assert!(t > now, "{t} after {now}");
    }
}

#[test]
fn same_seed_same_datagrams() {
    let run = || {
        let mut m = Machine::new(config(), 0, 42).unwrap();
        let mut all = Vec::new();
        // Nobody answers: retransmissions (with jitter), rotations, failures.
        let mut now = 0;
        for _ in 0..200 {
            m.handle_timeout(now);
            all.extend(sent(&mut m, now));
            now = m.poll_timeout().unwrap_or(now + 10 * MS).max(now + 1);
        }
        all
    };
    let a = run();
    assert!(a.len() > 20);
    assert!(a.iter().any(|t| t.to == server(2)), "rotated to server 2");
    assert_eq!(a, run());
}

#[test]
fn a_rate_limit_from_a_higher_term_raises_nothing() {
    let (mut m, seq, count) = registered();
    // Any server rate-limits, leader or not: not a leader's answer.
    let limited = Message::Error {
        code: ErrorCode::RateLimited,
        sequence: None,
        retry_after_ms: 0,
        text: "",
    };
    m.handle_datagram(3 * MS, server(1), &datagram(9, 60, seq, &limited));
    assert_eq!(m.epoch(), 3);
    assert_eq!(m.counters().datagrams_dropped, 0, "taken as try-later");
    m.handle_datagram(4 * MS, server(1), &datagram(3, 61, seq, &grant(1, count)));
    assert_eq!(
        outputs(&mut m).len(),
        1,
        "the term-3 leader's grant is not stale"
    );
}

mod pairing {
    use super::*;
    use crate::pair::{PairConfig, PairRole, PeerLoss, PeerState};

    fn listen(role: PairRole) -> SocketAddr {
        match role {
            PairRole::Primary => "10.0.0.1:7412".parse().unwrap(),
            PairRole::Backup => "10.0.0.2:7413".parse().unwrap(),
        }
    }

    fn paired(role: PairRole, incarnation: u64, now_us: u64) -> Machine {
        let peer = (role == PairRole::Backup).then(|| listen(PairRole::Primary));
        let mut pc = PairConfig::new(role, listen(role), peer);
        pc.heartbeat_ms = 1;
        pc.dead_ms = 50;
        let mut c = config();
        c.incarnation = incarnation;
        c.pair = Some(PairSetup {
            config: pc,
            listen: listen(role),
            ring_dir: format!("/tmp/{}", role.as_str()).into(),
        });
        let mut m = Machine::new(c, now_us, incarnation).unwrap();
        m.set_wall_clock_us(1_700_000_000_000_000 + now_us);
        m
    }

    /// Ticks `a` (and `b`, if it runs) every millisecond from `from_ms` for `ms`,
    /// carrying heartbeats between them; returns whether each took over.
    fn run(a: &mut Machine, mut b: Option<&mut Machine>, from_ms: u64, ms: u64) -> (bool, bool) {
        let before = (
            a.counters().takeovers,
            b.as_ref().map_or(0, |b| b.counters().takeovers),
        );
        for t in from_ms..from_ms + ms {
            let now = t * MS;
            a.set_wall_clock_us(1_700_000_000_000_000 + now);
            a.handle_timeout(now);
            if let Some(b) = b.as_deref_mut() {
                b.set_wall_clock_us(1_700_000_000_000_000 + now);
                b.handle_timeout(now);
                carry(now, a, b);
                carry(now, b, a);
            } else if a.poll_pair_transmit().is_some() {
                // Nobody there: nothing comes back (a frozen peer) unless the test says.
                a.handle_pair_sent(Ok(()));
            }
        }
        (
            a.counters().takeovers > before.0,
            b.is_some_and(|b| b.counters().takeovers > before.1),
        )
    }

    /// Delivers `from`'s heartbeat, if one is due, to `to`.
    fn carry(now: u64, from: &mut Machine, to: &mut Machine) {
        if let Some(beat) = from.poll_pair_transmit() {
            let src = from.pair_status(now).unwrap().listen;
            assert_eq!(Some(beat.to), from.pair_peer());
            from.handle_pair_sent(Ok(()));
            to.handle_pair_datagram(now, src, &beat.bytes);
        }
    }

    #[test]
    fn primary_active_backup_stands_by_and_takes_over_on_the_fast_signal() {
        let mut primary = paired(PairRole::Primary, 1_000_000, 0);
        let mut backup = paired(PairRole::Backup, 2_000_000, 0);
        // The primary registers (node 7): the standby backup names it in its Hello.
        primary.handle_timeout(0);
        let t = sent(&mut primary, 0);
        let seq = decode(&t[0].bytes, None).unwrap().header.seq;
        primary.handle_datagram(0, server(1), &datagram(3, 1, seq, &welcome(7)));
        run(&mut primary, Some(&mut backup), 0, 30);
        assert!(primary.is_active());
        assert!(!backup.is_active());
        let st = backup.pair_status(30 * MS).unwrap();
        assert_eq!(st.peer_state, PeerState::Alive);
        assert_eq!(st.peer_node_id, 7);
        assert_eq!(
            primary.pair_status(30 * MS).unwrap().peer_ring_dir,
            Some(PathBuf::from("/tmp/backup"))
        );
        let hellos: Vec<_> = sent(&mut backup, 30 * MS)
            .iter()
            .filter_map(|t| match decode(&t.bytes, None).unwrap().message {
                Message::Hello { backup_of, .. } => Some(backup_of),
                _ => None,
            })
            .collect();
        assert!(hellos.contains(&Some(7)), "{hellos:?}");
        // The backup's pair file says who is active, and where the peer's rings are.
        let files: Vec<_> = outputs(&mut backup)
            .into_iter()
            .filter_map(|o| match o {
                Output::PairFile { text } => Some(text),
                _ => None,
            })
            .collect();
        let last = files.last().expect("a pair file");
        assert!(last.contains("active 0\n") && last.contains("peer_ring_dir /tmp/primary\n"));
        // The primary's process goes: a heartbeat to it is refused.
        backup.handle_timeout(31 * MS);
        assert!(backup.poll_pair_transmit().is_some());
        backup.handle_pair_sent(Err(Some(PeerLoss::Refused)));
        let (took, _) = run(&mut backup, None, 31, 2);
        assert!(took, "backup took over");
        assert!(backup.is_active());
        assert_eq!(
            backup.pair_status(33 * MS).unwrap().peer_state,
            PeerState::Dead(PeerLoss::Refused),
            "the fast signal, well before dead_ms"
        );
        assert_eq!(backup.counters().peer_losses_fast, 1);
        assert_eq!(backup.counters().peer_send_errors, 1);
    }

    #[test]
    fn silent_peer_is_lost_by_missed_heartbeats_and_a_returning_primary_stands_by() {
        let mut primary = paired(PairRole::Primary, 1_000_000, 0);
        let mut backup = paired(PairRole::Backup, 2_000_000, 0);
        run(&mut primary, Some(&mut backup), 0, 20);
        assert!(!backup.is_active());
        // The primary stops (frozen, cut off): no error, only silence.
        let (took, _) = run(&mut backup, None, 20, 80);
        assert!(took);
        assert_eq!(
            backup.pair_status(100 * MS).unwrap().peer_state,
            PeerState::Dead(PeerLoss::MissedHeartbeats)
        );
        assert_eq!(backup.counters().peer_losses_slow, 1);
        // A restarted primary (same address, new incarnation) hears an active backup and
        // stands by; the backup stays active.
        let mut again = paired(PairRole::Primary, 3_000_000, 100 * MS);
        let (a, b) = run(&mut again, Some(&mut backup), 100, 30);
        assert!(!a && !b);
        assert!(!again.is_active());
        assert!(backup.is_active());
        assert_eq!(
            again.pair_status(130 * MS).unwrap().peer_state,
            PeerState::Alive
        );
    }

    #[test]
    fn a_restarted_primary_that_heard_nothing_at_first_yields_to_the_active_backup() {
        let mut backup = paired(PairRole::Backup, 2_000_000, 0);
        run(&mut backup, None, 0, 60);
        assert!(backup.is_active(), "its primary died long ago");
        // A primary comes up, hears nothing for dead_ms and becomes active too (later).
        let mut primary = paired(PairRole::Primary, 3_000_000, 60 * MS);
        run(&mut primary, None, 60, 60);
        assert!(primary.is_active());
        // Now they meet: the primary (active later) yields.
        run(&mut primary, Some(&mut backup), 120, 30);
        assert!(!primary.is_active());
        assert!(backup.is_active());
    }

    #[test]
    fn a_backup_hears_only_its_primary() {
        let mut backup = paired(PairRole::Backup, 2_000_000, 0);
        let mut stranger = paired(PairRole::Primary, 9_000_000, 0);
        stranger.handle_timeout(0);
        let beat = stranger.poll_pair_transmit();
        assert!(
            beat.is_none(),
            "a primary sends nowhere before it hears a backup"
        );
        let wrong: SocketAddr = "10.0.0.9:7412".parse().unwrap();
        backup.handle_pair_datagram(MS, wrong, &sample_beat(wrong));
        assert_eq!(backup.counters().peer_beats_dropped, 1);
        backup.handle_pair_datagram(MS, wrong, b"garbage");
        assert_eq!(backup.counters().peer_beats_dropped, 2);
        assert_eq!(backup.counters().peer_beats_received, 0);
    }

    fn sample_beat(listen: SocketAddr) -> Vec<u8> {
        crate::pair::Beat {
            role: PairRole::Primary,
            incarnation: 5,
            node_id: 1,
            active: true,
            active_since_us: 1,
            connection: "connected".into(),
            listen,
            socket: None,
            sequences: Vec::new(),
            ring_dir: "/tmp/x".into(),
        }
        .encode(None)
    }

    use std::path::PathBuf;
}

/// The sim's way, in small: one machine, a fake leader, a link that drops, duplicates,
/// delays and corrupts datagrams (real bytes: the CRC catches the corruption), a consumer
/// taking ids from a ring model, and the clock jumping to the next thing due.
#[test]
fn through_a_lossy_link_ids_enter_the_ring_increasing_and_never_twice() {
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, HashMap};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut c = config();
    c.sizing.refill_period_ms = 20; // Many small blocks: much traffic.
    let mut m = Machine::new(c, 0, 7).unwrap();
    let mut corrupted = 0;
    // The fake leader (server 1; server 2 is silent): grants from a counter, answers a
    // retransmission with the same datagram (a reply cache).
    let mut next_id: u128 = 1;
    let mut cache: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut granted: Vec<(u128, u64)> = Vec::new();
    let mut server_seq = 1000;
    // In flight towards the agent: delivery time -> datagrams.
    let mut wire: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut ring: std::collections::VecDeque<(u128, u64)> = Default::default();
    let (mut written_end, mut taken_total, mut taken): (u128, u128, Vec<u128>) = (0, 0, vec![]);
    let mut now = 0;
    let mut next_take = 0;
    while now < 3_000 * MS {
        m.handle_timeout(now);
        loop {
            let mut busy = false;
            while let Some(o) = m.poll_output() {
                busy = true;
                match o {
                    Output::OpenRing { index, .. } => m.handle_ring_opened(now, index, Ok(())),
                    Output::Write { first, count, .. } => {
                        assert!(first >= written_end, "{first} below {written_end}");
                        written_end = first + u128::from(count);
                        ring.push_back((first, count));
                    }
                    Output::PairFile { .. } => unreachable!("not paired"),
                }
            }
            while let Some(t) = m.poll_transmit(now) {
                busy = true;
                if t.to != server(1) || rng.random_bool(0.2) {
                    continue; // Lost, or to the silent server.
                }
                let f = decode(&t.bytes, None).expect("the machine's datagrams decode");
                let reply = cache.entry(f.header.seq).or_insert_with(|| {
                    server_seq += 1;
                    let message = match f.message {
                        Message::Hello { .. } => welcome(7),
                        Message::Ping { sent_us } => Message::Pong {
                            echo_us: sent_us,
                            lease_ms: 3000,
                        },
                        Message::BlockRequest { count, .. } => {
                            let g = (next_id, count);
                            next_id += u128::from(count);
                            granted.push(g);
                            grant(g.0, g.1)
                        }
                        other => panic!("unexpected {other:?}"),
                    };
                    datagram(1, server_seq, f.header.seq, &message)
                });
                let mut bytes = reply.clone();
                let copies = if rng.random_bool(0.1) { 2 } else { 1 };
                if rng.random_bool(0.1) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                    corrupted += copies;
                }
                for _ in 0..copies {
                    let at = now + rng.random_range(100..3_000);
                    wire.entry(at).or_default().push(bytes.clone());
                }
            }
            if !busy {
                break;
            }
        }
        // The clock jumps to what is due next: a delivery, a timer or the consumer.
        let next = [
            wire.keys().next().copied(),
            m.poll_timeout(),
            Some(next_take),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
        now = next.max(now + 1);
        while let Some(entry) = wire.first_entry() {
            if *entry.key() > now {
                break;
            }
            for bytes in entry.remove() {
                m.handle_datagram(now, server(1), &bytes);
            }
        }
        if now >= next_take {
            let mut want = 50u64;
            while want > 0
                && let Some(front) = ring.front_mut()
            {
                let k = want.min(front.1);
                taken.extend((0..k).map(|i| front.0 + u128::from(i)));
                front.0 += u128::from(k);
                front.1 -= k;
                want -= k;
                taken_total += u128::from(k);
                if front.1 == 0 {
                    ring.pop_front();
                }
            }
            m.handle_ring_taken(now, 0, taken_total);
            next_take = now + MS;
        }
    }
    assert!(taken.len() > 10_000, "ids flowed: {}", taken.len());
    assert!(
        taken.windows(2).all(|w| w[0] < w[1]),
        "increasing, never twice"
    );
    assert!(
        taken.iter().all(|id| granted
            .iter()
            .any(|&(f, c)| (f..f + u128::from(c)).contains(id))),
        "every id taken was granted"
    );
    assert!(corrupted > 0);
    assert!(
        m.counters().datagrams_dropped >= corrupted,
        "every corrupted datagram was dropped: {} of {corrupted}",
        m.counters().datagrams_dropped
    );
    assert!(m.counters().retransmits > 0);
    assert_eq!(m.node_id(), 7);
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Machine>();
};

/// Issue 18: a server's `VersionMismatch` is reported (status, counter) and the next
/// `Hello` waits [`INCOMPATIBLE_RETRY_US`]; a later `Welcome` clears it.
#[test]
fn a_version_refusal_is_reported_and_hello_is_retried_slowly() {
    let mut m = Machine::new(config(), 0, 1).unwrap();
    m.handle_timeout(0);
    let t = sent(&mut m, 0);
    let f = decode(&t[0].bytes, None).unwrap();
    match f.message {
        Message::Hello {
            versions, software, ..
        } => {
            assert_eq!(versions, VERSIONS);
            assert_eq!(software, unid_proto::SOFTWARE);
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    let server_versions = Versions { min: 3, max: 4 };
    let refusal = Message::VersionMismatch {
        versions: server_versions,
        offered: VERSIONS,
        software: "unid 2.0.0",
    };
    m.handle_datagram(MS, server(1), &datagram(3, 50, f.header.seq, &refusal));
    let i = m.incompatible().expect("reported").clone();
    assert_eq!(i.server, server(1));
    assert_eq!(i.server_versions, server_versions);
    assert_eq!(i.server_software, "unid 2.0.0");
    assert!(i.to_string().contains("upgrade this agent"), "{i}");
    assert_eq!(m.counters().version_refusals, 1);
    assert_eq!(m.node_id(), 0);
    // No new Hello (retransmissions of the refused one aside) for INCOMPATIBLE_RETRY_US.
    let mut hellos_after_refusal = Vec::new();
    let mut now = MS;
    while now < INCOMPATIBLE_RETRY_US + 2_000 * MS {
        now += 100 * MS;
        m.handle_timeout(now);
        for t in sent(&mut m, now) {
            let f = decode(&t.bytes, None).unwrap();
            if matches!(f.message, Message::Hello { .. }) {
                hellos_after_refusal.push((now, f.header.seq));
            }
        }
    }
    let new_seqs: Vec<_> = hellos_after_refusal
        .iter()
        .filter(|(_, s)| *s != f.header.seq)
        .collect();
    let first_new = new_seqs.first().expect("Hello is asked again");
    assert!(
        first_new.0 >= MS + INCOMPATIBLE_RETRY_US,
        "a new Hello at {} µs, before the slow retry",
        first_new.0
    );
    // The server was upgraded: welcomed, the report clears.
    let seq = first_new.1;
    m.handle_datagram(now, server(1), &datagram(3, 51, seq, &welcome(7)));
    assert_eq!(m.node_id(), 7);
    assert_eq!(m.incompatible(), None);
}

/// A datagram whose header carries a version this agent does not speak is reported too.
#[test]
fn a_datagram_of_another_header_version_is_reported() {
    let mut m = Machine::new(config(), 0, 1).unwrap();
    m.handle_timeout(0);
    let _ = sent(&mut m, 0);
    let mut d = datagram(3, 50, 0, &welcome(7));
    d[2] = 5;
    m.handle_datagram(MS, server(1), &d);
    let i = m.incompatible().expect("reported");
    assert_eq!(i.server_versions, Versions::only(5));
    assert_eq!(m.node_id(), 0);
    // From an address that is not a server of ours: dropped, not reported.
    let mut m = Machine::new(config(), 0, 1).unwrap();
    m.handle_datagram(MS, server(9), &d);
    assert_eq!(m.incompatible(), None);
}

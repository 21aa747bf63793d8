//! The machine driven with no I/O: datagrams encoded by a test agent, consensus results
//! reported by hand.

use std::net::SocketAddr;

use unid_core::state::{ClusterState, Command};
use unid_proto::{
    Codec, DATAGRAM_BYTES_MAX, ErrorCode, Header, List, Message, NodeRole, Server as ServerEntry,
    decode,
};

use super::*;

const ME: NodeId = 1;
const T0: u64 = 1_000_000;

fn config() -> Config {
    Config {
        id: ME,
        key: None,
        lease_ms: 10_000,
        agents_max: 16,
        replies_per_agent_max: 8,
        source_rate_per_s: 1_000,
        allocator: AllocatorConfig::DEFAULT,
        udp_addr: "127.0.0.1:7400".parse().unwrap(),
        peers: vec![(2, "127.0.0.1:7401".parse().unwrap())],
        first_seq: 1,
    }
}

fn state_with(sequence: &str, ceiling: Id) -> ClusterState {
    let mut s = ClusterState::new();
    let create = Command::CreateSequence {
        name: sequence.into(),
        width: 8,
        start: 1,
    };
    s.apply(&create, 1);
    let raise = Command::RaiseCeiling {
        name: sequence.into(),
        ceiling,
    };
    s.apply(&raise, 1);
    s
}

/// A leader of term 3 with an allocator built from `state`.
fn leader(state: &ClusterState) -> Server {
    let mut m = Server::new(config(), T0).unwrap();
    let removed = m.on_leader(
        T0,
        Leadership {
            leader: Some(ME),
            term: 3,
            member: true,
        },
    );
    assert!(!removed);
    assert_eq!(m.poll_action(), Some(Action::ReadReady { term: 3 }));
    m.on_ready(T0, 3, state);
    assert!(m.is_granting());
    m
}

fn request(sender: NodeId, seq: u64, msg: &Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let h = Header {
        sender,
        seq,
        reply_to: 0,
        epoch: 0,
    };
    let n = Codec::new().encode(&h, msg, None, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn agent_addr() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// Registers an agent through the machine; returns its node id.
fn register(m: &mut Server, state: &ClusterState) -> NodeId {
    let hello = request(
        0,
        7,
        &Message::Hello {
            role: NodeRole::Agent,
            incarnation: 1,
            name: "host-a",
            listen: None,
            backup_of: None,
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        },
    );
    assert_eq!(m.handle_datagram(T0, agent_addr(), &hello, state), None);
    // The other actions (raises, server records) stay queued.
    let (registers, others): (Vec<Action>, Vec<Action>) = m
        .actions
        .drain(..)
        .partition(|a| matches!(a, Action::Register { .. }));
    m.actions.extend(others);
    let Some(Action::Register { asker, .. }) = registers.into_iter().next() else {
        panic!("a registration asked for")
    };
    let node_id = 1 << 32;
    m.on_registered(T0, asker, 1, "host-a", Ok(node_id));
    let t = m.poll_transmit().expect("a Welcome");
    assert_eq!(t.to, agent_addr());
    let f = decode(&t.datagram, None).unwrap();
    assert!(matches!(f.message, Message::Welcome { node_id: n, .. } if n == node_id));
    node_id
}

/// What a block request got.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Block(Id, u64),
    Error(ErrorCode),
    Redirect,
}

fn block(m: &mut Server, state: &ClusterState, node: NodeId, seq: u64) -> Got {
    let req = request(
        node,
        seq,
        &Message::BlockRequest {
            sequence: "orders",
            count: 100,
        },
    );
    let d = m
        .handle_datagram(T0 + seq, agent_addr(), &req, state)
        .expect("an answer");
    match decode(&d, None).unwrap().message {
        Message::BlockGrant { block, .. } => Got::Block(block.first(), block.count()),
        Message::Error { code, .. } => Got::Error(code),
        Message::NotLeader { .. } => Got::Redirect,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Commits every raise the machine asks for (at the ceiling it asks); returns the highest.
fn commit_raises(m: &mut Server, term: u64) -> Option<Id> {
    let raises: Vec<_> = std::iter::from_fn(|| m.poll_action())
        .filter_map(|a| match a {
            Action::Raise { term, raise } => Some((term, raise)),
            _ => None,
        })
        .collect();
    let mut top = None;
    for (t, raise) in raises {
        assert_eq!(t, term);
        m.on_raise_done(T0, t, &raise, Ok((raise.ceiling, t)), 10);
        top = top.max(Some(raise.ceiling));
    }
    top
}

#[test]
fn a_leader_grants_only_between_the_ceiling_it_read_and_the_one_it_committed() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    let node = register(&mut m, &state);
    // Ids below 250 may have been granted by earlier leaders: nothing is granted until a
    // raise above it commits.
    assert_eq!(
        block(&mut m, &state, node, 10),
        Got::Error(ErrorCode::NotReady)
    );
    let (term, raise) = std::iter::from_fn(|| m.poll_action())
        .find_map(|a| match a {
            Action::Raise { term, raise } => Some((term, raise)),
            _ => None,
        })
        .expect("a raise asked for");
    assert_eq!(term, 3);
    // A raise result of an earlier term is not applied to this term's allocator.
    m.on_raise_done(T0, 2, &raise, Ok((raise.ceiling, 2)), 10);
    assert_eq!(
        block(&mut m, &state, node, 11),
        Got::Error(ErrorCode::NotReady)
    );
    m.on_raise_done(T0, 3, &raise, Ok((raise.ceiling, 3)), 10);
    let mut ceiling = raise.ceiling;
    let mut next = 250;
    for seq in 12..200 {
        match block(&mut m, &state, node, seq) {
            Got::Block(first, count) => {
                assert_eq!(
                    first, next,
                    "blocks follow each other from the read ceiling"
                );
                assert!(
                    first + Id::from(count) <= ceiling,
                    "never above the committed ceiling"
                );
                next = first + Id::from(count);
            }
            Got::Error(ErrorCode::NotReady) => {}
            other => panic!("{other:?}"),
        }
        if let Some(c) = commit_raises(&mut m, 3) {
            ceiling = ceiling.max(c);
        }
    }
    assert!(next > 250, "granted something");
}

#[test]
fn a_follower_redirects_and_an_unregistered_agent_is_told_so() {
    let state = state_with("orders", 250);
    let mut m = Server::new(config(), T0).unwrap();
    m.on_leader(
        T0,
        Leadership {
            leader: Some(2),
            term: 3,
            member: true,
        },
    );
    let req = request(
        5,
        1,
        &Message::BlockRequest {
            sequence: "orders",
            count: 1,
        },
    );
    let d = m.handle_datagram(T0, agent_addr(), &req, &state).unwrap();
    let f = decode(&d, None).unwrap();
    // To an unregistered sender, no larger than its request: the leader's endpoint alone.
    let leader_addr: SocketAddr = "127.0.0.1:7401".parse().unwrap();
    assert!(
        matches!(f.message, Message::NotLeader { leader: Some(a), .. } if a == leader_addr),
        "{:?}",
        f.message
    );
    let mut m = leader(&state);
    let d = m.handle_datagram(T0, agent_addr(), &req, &state).unwrap();
    let f = decode(&d, None).unwrap();
    assert!(matches!(
        f.message,
        Message::Error {
            code: ErrorCode::NotRegistered,
            ..
        }
    ));
}

#[test]
fn a_new_term_drops_the_allocator_before_anything_else() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    let node = register(&mut m, &state);
    m.on_leader(
        T0,
        Leadership {
            leader: Some(2),
            term: 4,
            member: true,
        },
    );
    assert!(!m.is_granting());
    assert_eq!(block(&mut m, &state, node, 50), Got::Redirect);
    // Leading again in a later term needs a new ready read: the old allocator is gone.
    m.on_leader(
        T0,
        Leadership {
            leader: Some(ME),
            term: 5,
            member: true,
        },
    );
    assert!(!m.is_granting());
    m.on_ready(T0, 4, &state); // a read of an earlier term: ignored
    assert!(!m.is_granting());
    m.on_ready(T0, 5, &state);
    assert!(m.is_granting());
}

#[test]
fn a_retransmitted_request_gets_the_same_block_and_a_replay_none() {
    let state = state_with("orders", 1_000);
    let mut m = leader(&state);
    let node = register(&mut m, &state);
    assert_eq!(
        block(&mut m, &state, node, 20),
        Got::Error(ErrorCode::NotReady)
    );
    commit_raises(&mut m, 3).expect("a raise");
    let first = block(&mut m, &state, node, 21);
    assert!(matches!(first, Got::Block(..)));
    assert_eq!(block(&mut m, &state, node, 21), first, "the cached answer");
    // A seq that fell out of the replay window (1,024 behind the newest answered): no block.
    let next = block(&mut m, &state, node, 21 + 5_000);
    assert!(matches!(next, Got::Block(..)));
    assert_eq!(
        block(&mut m, &state, node, 22),
        Got::Error(ErrorCode::Replayed)
    );
}

#[test]
fn an_unreachable_agent_is_forgotten_at_once_and_only_it() {
    let mut m = Server::new(config(), T0).unwrap();
    m.phase = Phase::Leading;
    let dead: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let alive: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    for (id, addr, incarnation) in [(7, dead, 1), (8, alive, 2)] {
        m.agents.insert(
            id,
            Agent {
                addr,
                last_seen_us: 1_000,
            },
        );
        m.hellos.insert((addr, incarnation), id);
    }
    assert_eq!(m.on_unreachable(dead), vec![7]);
    assert!(!m.agents.contains_key(&7));
    assert!(m.agents.contains_key(&8));
    assert_eq!(m.hellos.len(), 1);
    assert_eq!(m.hellos.get(&(alive, 2)), Some(&8));
    // A second error for the same address changes nothing (and logs nothing).
    assert!(m.on_unreachable(dead).is_empty());
    let unknown: SocketAddr = "127.0.0.1:40003".parse().unwrap();
    assert!(m.on_unreachable(unknown).is_empty());
    assert_eq!(m.agents.len(), 1);
}

#[test]
fn a_graceful_leader_names_its_successor_to_every_agent_and_server() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    register(&mut m, &state);
    assert!(m.stop(true, Some(2)));
    let to: Vec<SocketAddr> = std::iter::from_fn(|| m.poll_transmit())
        .map(|t| {
            let f = decode(&t.datagram, None).unwrap();
            assert!(matches!(
                f.message,
                Message::LeaderChange { leader_id: 2, .. }
            ));
            t.to
        })
        .collect();
    assert_eq!(
        to,
        vec!["127.0.0.1:7401".parse().unwrap(), agent_addr()],
        "the agent and the other server"
    );
}

fn len(msg: &Message<'_>) -> usize {
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let h = Header {
        sender: 1 << 32,
        seq: u64::MAX,
        reply_to: u64::MAX,
        epoch: u64::MAX,
    };
    Codec::new().encode(&h, msg, None, &mut buf).unwrap()
}

fn hello(name: &str) -> usize {
    len(&Message::Hello {
        role: NodeRole::Agent,
        incarnation: 1,
        name,
        listen: None,
        backup_of: None,
        versions: unid_proto::VERSIONS,
        software: unid_proto::SOFTWARE,
    })
}

/// What the no-amplification rule lets through to unregistered senders (the numbers the
/// agent's authors need).
#[test]
fn small_answers_fit_the_smallest_requests() {
    let leader: SocketAddr = "255.255.255.255:65535".parse().unwrap();
    let one = [ServerEntry {
        id: 1,
        addr: leader,
    }];
    // A Pong to an unregistered sender (lease 0) fits its Ping; NotRegistered any
    // BlockRequest; a Welcome without servers any Hello.
    for t in [0, 1, u64::MAX] {
        let pong = len(&Message::Pong {
            echo_us: t,
            lease_ms: 0,
        });
        assert!(pong <= len(&Message::Ping { sent_us: t }));
    }
    let not_registered = len(&Message::Error {
        code: ErrorCode::NotRegistered,
        sequence: None,
        retry_after_ms: 0,
        text: "",
    });
    assert!(
        not_registered
            <= len(&Message::BlockRequest {
                sequence: "a",
                count: 1
            })
    );
    let welcome = |servers: &[ServerEntry]| {
        len(&Message::Welcome {
            node_id: u64::MAX,
            lease_ms: u32::MAX,
            servers: List::new(servers),
            truncated: true,
        })
    };
    assert!(welcome(&[]) <= hello("a"));
    // A NotLeader naming an IPv4 leader needs a Hello with a name of about 9 to 12 bytes or
    // more (FlatBuffers pads); a Welcome carrying one IPv4 server, about 40.
    let not_leader = len(&Message::NotLeader {
        leader_id: u64::MAX,
        leader: Some(leader),
        servers: List::empty(),
        truncated: true,
    });
    let fits = (1..=64)
        .find(|n| not_leader <= hello(&"x".repeat(*n)))
        .unwrap();
    assert!(fits <= 12, "a NotLeader needs a Hello name of {fits} bytes");
    assert!(not_leader <= hello("a-short-host"));
    // The smallest redirect (endpoint only) fits the smallest Hello, IPv4 or IPv6.
    for addr in ["255.255.255.255:65535", "[ffff::ffff]:65535"] {
        let minimal = len(&Message::NotLeader {
            leader_id: 0,
            leader: Some(addr.parse().unwrap()),
            servers: List::empty(),
            truncated: false,
        });
        assert!(minimal <= hello("a"), "{addr}: {minimal} > {}", hello("a"));
    }
    assert!(welcome(&one) <= hello(&"x".repeat(40)));
}

#[test]
fn buckets_refill_at_their_rate_up_to_the_burst() {
    let mut b = Bucket::full(2.0, 0);
    assert!(b.take(0, 10.0, 2.0));
    assert!(b.take(0, 10.0, 2.0));
    assert!(!b.take(0, 10.0, 2.0));
    assert!(!b.take(50_000, 10.0, 2.0), "half a token after 50 ms");
    assert!(b.take(100_000, 10.0, 2.0));
    assert!(b.take(10_000_000, 10.0, 2.0));
    assert!(b.take(10_000_000, 10.0, 2.0));
    assert!(!b.take(10_000_000, 10.0, 2.0), "never more than the burst");
}

/// Killed `cargo mutants` survivors (results/mutants.md): a leader raises every sequence's
/// ceiling as soon as it is ready, before any agent asks (`propose_raises`
/// emptied, or its phase check inverted, left the first request of each sequence to wait a
/// raise's round trip), and the per-sequence grant count of the gauges counts each grant.
#[test]
fn a_ready_leader_raises_before_any_request_and_its_gauges_count_every_grant() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    let ahead: Vec<_> = std::iter::from_fn(|| m.poll_action())
        .filter_map(|a| match a {
            Action::Raise { term, raise } => Some((term, raise)),
            _ => None,
        })
        .collect();
    assert_eq!(ahead.len(), 1, "one raise for the one sequence: {ahead:?}");
    let (term, raise) = &ahead[0];
    assert_eq!(
        (*term, raise.sequence.to_string()),
        (3, "orders".to_owned())
    );
    assert!(raise.ceiling > 250, "above the ceiling read: {raise:?}");
    m.on_raise_done(T0, 3, raise, Ok((raise.ceiling, 3)), 10);

    let node = register(&mut m, &state);
    let mut ids: u128 = 0;
    for seq in 1..=3 {
        match block(&mut m, &state, node, seq) {
            Got::Block(first, count) => {
                assert!(first >= 250 && first + Id::from(count) <= raise.ceiling);
                ids += u128::from(count);
            }
            other => panic!("the raise committed before the first request: {other:?}"),
        }
    }
    let g = m.gauges(Some(&state));
    let orders = g.sequences.iter().find(|s| s.name == "orders").unwrap();
    assert_eq!((orders.grants, orders.ids), (3, ids));
}

/// An `add-server` retried after its first answer was lost may reach the server it added,
/// which may lead by then: it answers with the voters (the command succeeded), and refuses
/// only an add of its id at another Raft address. (Found by the simulator's membership
/// changes: the retry was refused "server id already in use", so the operator was told the
/// add failed when it had been done.)
#[test]
fn an_add_server_retried_to_the_added_server_now_leading_is_answered_with_the_voters() {
    let state = state_with("orders", 1_000);
    let mut m = leader(&state);
    let raft: SocketAddr = "127.0.0.1:7500".parse().unwrap();
    m.set_raft_view(RaftView {
        term: 3,
        role: Some(unid_proto::RaftRole::Leader),
        voters: [ME, 2].into(),
        members: [(ME, raft.to_string()), (2, "127.0.0.1:7501".to_owned())].into(),
        ..RaftView::default()
    });
    let ask = |m: &mut Server, seq: u64, raft: SocketAddr| {
        let add = request(
            0,
            seq,
            &Message::AddServer {
                id: ME,
                raft,
                listen: config().udp_addr,
            },
        );
        let d = m
            .handle_datagram(T0 + seq, agent_addr(), &add, &state)
            .expect("an answer");
        match decode(&d, None).unwrap().message {
            Message::Membership { voters, .. } => {
                Ok(voters.iter().map(|s| s.id).collect::<Vec<_>>())
            }
            Message::Error { code, .. } => Err(code),
            other => panic!("unexpected answer {other:?}"),
        }
    };
    assert_eq!(
        ask(&mut m, 9, raft),
        Ok(vec![ME, 2]),
        "answered with the voters"
    );
    assert!(
        m.actions
            .iter()
            .all(|a| !matches!(a, Action::AddServer { .. })),
        "nothing more to do"
    );
    let elsewhere: SocketAddr = "127.0.0.1:7999".parse().unwrap();
    assert_eq!(ask(&mut m, 10, elsewhere), Err(ErrorCode::BadRequest));
}

/// Issue 18: a `Hello` offering no version this server speaks is refused with the server's
/// range (counted); one offering a range that includes it registers; a datagram of another
/// header version is answered `VersionMismatch` naming that version (reply_to 0), counted.
#[test]
fn hellos_without_a_common_version_are_refused_with_the_servers_range() {
    let state = state_with("orders", 1_000);
    let mut m = leader(&state);
    let hello = |versions| Message::Hello {
        role: NodeRole::Agent,
        incarnation: 1,
        name: "host-a",
        listen: None,
        backup_of: None,
        versions,
        software: "unid 9.0.0",
    };
    let newer = unid_proto::Versions { min: 3, max: 4 };
    let req = request(0, 7, &hello(newer));
    let d = m
        .handle_datagram(T0, agent_addr(), &req, &state)
        .expect("an answer");
    let f = decode(&d, None).unwrap();
    assert_eq!(f.header.reply_to, 7);
    match f.message {
        Message::VersionMismatch {
            versions,
            offered,
            software,
        } => {
            assert_eq!(versions, unid_proto::VERSIONS);
            assert_eq!(offered, newer);
            assert_eq!(software, unid_proto::SOFTWARE);
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    assert!(
        m.actions
            .iter()
            .all(|a| !matches!(a, Action::Register { .. }))
    );
    assert_eq!(m.stats().snapshot().refused_version, 1);
    // A range that includes this server's version: registration asked for.
    let wide = unid_proto::Versions {
        min: 1,
        max: unid_proto::VERSION + 1,
    };
    let req = request(0, 8, &hello(wide));
    assert_eq!(m.handle_datagram(T0, agent_addr(), &req, &state), None);
    assert!(
        m.actions
            .iter()
            .any(|a| matches!(a, Action::Register { .. }))
    );
    assert_eq!(m.stats().snapshot().refused_version, 1);
    // Header version 3 (a future agent's Hello): answered in version 2, reply_to 0,
    // offered 3. (A datagram smaller than the answer gets none: no amplification.)
    let mut v3 = request(0, 9, &hello(newer));
    v3[2] = 3;
    let d = m
        .handle_datagram(T0, agent_addr(), &v3, &state)
        .expect("an answer");
    let f = decode(&d, None).unwrap();
    assert_eq!(f.header.reply_to, 0);
    assert!(
        matches!(f.message, Message::VersionMismatch { offered, .. } if offered == unid_proto::Versions::only(3)),
        "{:?}",
        f.message
    );
    assert_eq!(m.stats().snapshot().dropped_version, 1);
    // Not unid at all (bad magic): dropped unanswered, not counted as a version.
    let mut junk = v3.clone();
    junk[0] = b'X';
    assert_eq!(m.handle_datagram(T0, agent_addr(), &junk, &state), None);
    assert_eq!(m.stats().snapshot().dropped_version, 1);
}

#[test]
fn a_raise_revealing_a_higher_ceiling_rewarms_in_the_same_term_and_grants_above_it() {
    // A leader restored by openraft after a restart, in its old term: its ready read saw
    // ceiling 250, but an entry of its previous incarnation (same term) raised it to 5,000
    // and commits only together with this allocator's first raise.
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    let node = register(&mut m, &state);
    let (term, raise) = std::iter::from_fn(|| m.poll_action())
        .find_map(|a| match a {
            Action::Raise { term, raise } => Some((term, raise)),
            _ => None,
        })
        .expect("a raise asked for");
    assert!(raise.ceiling < 5_000, "the test needs a raise below 5,000");
    m.on_raise_done(T0, term, &raise, Ok((5_000, term)), 10);
    assert!(
        !m.is_granting(),
        "nothing is granted from the stale allocator"
    );
    assert_eq!(m.stats().snapshot().rewarms, 1);
    assert_eq!(
        block(&mut m, &state, node, 20),
        Got::Error(ErrorCode::NotReady),
        "warming up again: the agent is asked to retry, not redirected to this same server"
    );
    // The server reads the committed ceilings again in the same term: no new election.
    let actions: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
    assert!(
        actions.contains(&Action::ReadReady { term }),
        "a new ready read in term {term}: {actions:?}"
    );
    let now = state_with("orders", 5_000);
    m.on_ready(T0, term, &now);
    assert!(m.is_granting());
    let mut granted = 0;
    for seq in 21..80 {
        match block(&mut m, &now, node, seq) {
            Got::Block(first, count) => {
                assert!(
                    first >= 5_000,
                    "block {first}+{count} below the revealed ceiling"
                );
                granted += 1;
            }
            Got::Error(ErrorCode::NotReady) => {}
            other => panic!("{other:?}"),
        }
        commit_raises(&mut m, term);
    }
    assert!(granted > 0, "the rebuilt allocator grants");
}

fn lead(m: &mut Server, leader: Option<NodeId>, term: u64) -> bool {
    m.on_leader(
        T0,
        Leadership {
            leader,
            term,
            member: true,
        },
    )
}

fn counter(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn leadership_is_read_again_only_in_a_new_term_and_each_change_is_counted_once() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    m.actions.clear();
    assert_eq!(counter(&m.counters.leader_changes), 1);
    assert_eq!(counter(&m.counters.leaderships), 1);
    // The same leadership reported again (consensus reports every metrics change): nothing
    // is read again, the allocator stays.
    assert!(!lead(&mut m, Some(ME), 3));
    assert!(m.is_granting());
    assert_eq!(m.poll_action(), None, "no new ready read in the same term");
    assert_eq!(counter(&m.counters.leader_changes), 1);
    assert_eq!(counter(&m.counters.leaderships), 1);
    // Leading again in a new term without a step down in between (a re-election after a
    // failed check): the allocator of term 3 goes, and term 4 is read.
    assert!(!lead(&mut m, Some(ME), 4));
    assert!(!m.is_granting());
    assert!(m.allocator.is_none(), "term 3's allocator is dropped");
    assert_eq!(m.poll_action(), Some(Action::ReadReady { term: 4 }));
    assert_eq!(counter(&m.counters.leaderships), 2);
    assert_eq!(counter(&m.counters.leader_changes), 1, "the same leader");
    // An election with no leader yet is not a change of leader.
    assert!(!lead(&mut m, None, 5));
    assert!(m.allocator.is_none());
    assert_eq!(counter(&m.counters.leader_changes), 1);
    assert!(!lead(&mut m, Some(2), 5));
    assert_eq!(counter(&m.counters.leader_changes), 2);
}

#[test]
fn a_failed_ready_read_is_asked_again_only_while_warming_in_its_term() {
    let mut m = Server::new(config(), T0).unwrap();
    assert!(!lead(&mut m, Some(ME), 3));
    assert_eq!(m.poll_action(), Some(Action::ReadReady { term: 3 }));
    m.on_ready_failed(3, "quorum not enough");
    assert_eq!(m.poll_action(), Some(Action::ReadReady { term: 3 }));
    assert_eq!(m.ready_tries, 1);
    m.on_ready_failed(2, "an earlier term's read");
    assert_eq!(m.poll_action(), None);
    assert_eq!(m.ready_tries, 1);
    m.on_ready(T0, 3, &state_with("orders", 250));
    m.actions.clear();
    m.on_ready_failed(3, "late");
    assert_eq!(m.poll_action(), None, "leading already: not read again");
}

#[test]
fn a_ready_leader_takes_the_node_tables_agents_up_to_its_bound_and_records_missing_servers() {
    let mut state = state_with("orders", 250);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        state.apply(
            &Command::RegisterAgent {
                name: (*name).into(),
                incarnation: 10 + i as u64,
                addr: "127.0.0.1".into(),
                port: 41_000 + i as u16,
                role: String::new(),
            },
            2,
        );
    }
    // Server 2 is recorded with its UDP address; this server (1) is not.
    state.apply(
        &Command::UpsertServer {
            id: 2,
            addr: "127.0.0.1:7401".into(),
        },
        2,
    );
    let mut m = Server::new(
        Config {
            agents_max: 2,
            ..config()
        },
        T0,
    )
    .unwrap();
    m.raft.voters = [1, 2].into_iter().collect();
    assert!(!lead(&mut m, Some(ME), 3));
    m.actions.clear();
    m.on_ready(T0, 3, &state);
    assert!(m.is_granting());
    assert_eq!(m.agents.len(), 2, "at most agents_max agents");
    for a in m.agents.values() {
        assert!((41_000..41_003).contains(&a.addr.port()), "{}", a.addr);
    }
    for (name, incarnation) in [("a", 10), ("b", 11)] {
        assert_eq!(
            m.hello_seen.get(name).map(|s| s.0),
            Some(incarnation),
            "{name}'s incarnation seeds the replay check"
        );
    }
    let actions: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
    assert!(
        actions.contains(&Action::RecordServers {
            servers: vec![(ME, config().udp_addr)]
        }),
        "only the voter missing from the node table: {actions:?}"
    );
    assert!(
        actions.contains(&Action::CreateClusterId),
        "no cluster id yet: {actions:?}"
    );
    // With a cluster id and every voter recorded, neither is asked for.
    state
        .settings
        .insert(unid_core::state::SETTING_CLUSTER_ID.into(), 7);
    state.apply(
        &Command::UpsertServer {
            id: ME,
            addr: config().udp_addr.to_string(),
        },
        2,
    );
    assert!(!lead(&mut m, Some(ME), 4));
    m.actions.clear();
    m.on_ready(T0, 4, &state);
    let actions: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
    assert!(!actions.contains(&Action::CreateClusterId), "{actions:?}");
    assert!(
        actions.contains(&Action::RecordServers { servers: vec![] }),
        "{actions:?}"
    );
}

#[test]
fn the_quorum_is_checked_one_at_a_time_and_its_loss_counted_once() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    m.actions.clear();
    m.check_quorum(T0 + 1_000);
    assert_eq!(m.poll_action(), Some(Action::ConfirmLeadership { term: 3 }));
    m.check_quorum(T0 + 2_000);
    assert_eq!(m.poll_action(), None, "one check at a time");
    m.on_quorum_checked(T0 + 3_000, 3, true);
    m.check_quorum(T0 + 4_000);
    assert_eq!(m.poll_action(), Some(Action::ConfirmLeadership { term: 3 }));
    // Not confirmed, and the last confirmation is older than QUORUM_LOST_MS: counted once.
    let late = T0 + 3_000 + QUORUM_LOST_MS * 1_000 + 1;
    m.on_quorum_checked(late, 3, false);
    assert_eq!(counter(&m.counters.quorum_lost), 1);
    m.check_quorum(late + 1_000);
    assert_eq!(m.poll_action(), Some(Action::ConfirmLeadership { term: 3 }));
    m.on_quorum_checked(late + 2_000, 3, false);
    assert_eq!(counter(&m.counters.quorum_lost), 1, "still lost: not again");
    // A follower checks nothing.
    let mut f = Server::new(config(), T0).unwrap();
    assert!(!lead(&mut f, Some(2), 3));
    f.check_quorum(T0 + 1_000);
    assert_eq!(f.poll_action(), None);
}

#[test]
fn stopped_consensus_stops_the_machine_for_good() {
    let state = state_with("orders", 250);
    let mut m = leader(&state);
    m.actions.clear();
    m.on_consensus_stopped();
    assert!(!m.is_granting());
    assert!(m.allocator.is_none());
    assert!(!lead(&mut m, Some(ME), 4));
    assert_eq!(
        m.poll_action(),
        None,
        "a stopped server does not warm up again"
    );
    assert!(!m.is_granting());
}

#[test]
fn only_a_graceful_leader_sends_leader_change_and_its_list_is_whole() {
    let state = state_with("orders", 250);
    let mut f = Server::new(config(), T0).unwrap();
    assert!(!lead(&mut f, Some(2), 3));
    assert!(!f.stop(true, Some(2)), "was not the leader");
    assert_eq!(
        f.poll_transmit().map(|t| t.to),
        None,
        "a follower tells nobody"
    );
    let mut m = leader(&state);
    register(&mut m, &state);
    assert!(m.stop(false, Some(2)));
    assert_eq!(
        m.poll_transmit().map(|t| t.to),
        None,
        "a crash-like stop tells nobody"
    );
    let mut m = leader(&state);
    register(&mut m, &state);
    assert!(m.stop(true, Some(2)));
    let t = m.poll_transmit().expect("a LeaderChange");
    let f = decode(&t.datagram, None).unwrap();
    let Message::LeaderChange { truncated, .. } = f.message else {
        panic!("{:?}", f.message)
    };
    assert!(!truncated, "two servers fit the list");
}

//! Property tests: every message type round-trips (with and without a key),
//! arbitrary bytes never panic, any single bit flip and any truncation of a
//! valid datagram is rejected.

mod common;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::{frame_raw, key, roundtrip};
use proptest::prelude::*;
use proptest::sample::select;
use unid_proto::{
    AuthKey, Block, Codec, DATAGRAM_BYTES_MAX, DecodeError, ErrorCode, Header, Health, List,
    Message, MessageType, Node, NodeRole, RaftRole, SequenceStatus, Server, ServerStatus, Width,
    decode,
};

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), 1..=u16::MAX)
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), 1..=u16::MAX)
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn node_id() -> impl Strategy<Value = u64> {
    1..=u64::MAX
}

fn header() -> impl Strategy<Value = Header> {
    (any::<u64>(), 1..=u64::MAX, any::<u64>(), any::<u64>()).prop_map(
        |(sender, seq, reply_to, epoch)| Header {
            sender,
            seq,
            reply_to,
            epoch,
        },
    )
}

fn width() -> impl Strategy<Value = Width> {
    select(Width::ALL.to_vec())
}

/// An id below the width's limit, biased towards both ends.
fn id_below(limit: u128) -> impl Strategy<Value = u128> {
    prop_oneof![
        0..limit,
        (0..1000u128).prop_map(move |d| limit.saturating_sub(1 + d)),
        0..1000u128.min(limit),
    ]
}

fn block() -> impl Strategy<Value = (Width, Block)> {
    width()
        .prop_flat_map(|w| (Just(w), id_below(w.limit())))
        .prop_flat_map(|(w, first)| {
            let room = (w.limit() - first).min(u64::MAX as u128) as u64;
            (Just(w), Just(first), 1..=room)
        })
        .prop_map(|(w, first, count)| (w, Block::new(first, count, w).unwrap()))
}

fn servers(max: usize) -> impl Strategy<Value = Vec<Server>> {
    prop::collection::vec(
        (node_id(), addr()).prop_map(|(id, addr)| Server { id, addr }),
        0..=max,
    )
}

fn node_role() -> impl Strategy<Value = NodeRole> {
    select(vec![
        NodeRole::Server,
        NodeRole::Agent,
        NodeRole::Client,
        NodeRole::Admin,
    ])
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u8..=9).prop_map(|v| ErrorCode::from_u8(v).unwrap())
}

/// Printable UTF-8 (multi-byte allowed) of at most 128 bytes.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}".prop_filter("at most 128 bytes", |s| s.len() <= 128)
}

fn server_status(max: usize) -> impl Strategy<Value = Vec<ServerStatus>> {
    prop::collection::vec(
        (
            node_id(),
            addr(),
            (1u8..=4).prop_map(|v| RaftRole::from_u8(v).unwrap()),
            any::<u64>(),
            (1u8..=3).prop_map(|v| Health::from_u8(v).unwrap()),
        )
            .prop_map(|(id, addr, role, term, health)| ServerStatus {
                id,
                addr,
                role,
                term,
                health,
            }),
        0..=max,
    )
}

fn sequence_status(max: usize) -> impl Strategy<Value = Vec<(String, Width, u128, u128)>> {
    prop::collection::vec(
        (name(), width())
            .prop_flat_map(|(n, w)| (Just(n), Just(w), id_below(w.limit()), id_below(w.limit()))),
        0..=max,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn ping(h in header(), sent_us in any::<u64>()) {
        roundtrip(h, &Message::Ping { sent_us });
    }

    #[test]
    fn pong(h in header(), echo_us in any::<u64>(), lease_ms in any::<u32>()) {
        roundtrip(h, &Message::Pong { echo_us, lease_ms });
    }

    #[test]
    fn hello(
        h in header(),
        role in node_role(),
        incarnation in any::<u64>(),
        name in name(),
        listen in proptest::option::of(addr()),
        backup_of in proptest::option::of(node_id()),
    ) {
        roundtrip(h, &Message::Hello { role, incarnation, name: &name, listen, backup_of, versions: unid_proto::VERSIONS, software: unid_proto::SOFTWARE });
    }

    #[test]
    fn welcome(
        h in header(),
        node_id in node_id(),
        lease_ms in any::<u32>(),
        servers in servers(16),
        truncated in any::<bool>(),
    ) {
        roundtrip(h, &Message::Welcome { node_id, lease_ms, servers: List::new(&servers), truncated });
    }

    #[test]
    fn block_request(h in header(), sequence in name(), count in 1..=u64::MAX) {
        roundtrip(h, &Message::BlockRequest { sequence: &sequence, count });
    }

    #[test]
    fn block_grant(h in header(), sequence in name(), (width, block) in block()) {
        roundtrip(h, &Message::BlockGrant { sequence: &sequence, width, block });
    }

    #[test]
    fn not_leader(
        h in header(),
        leader_id in any::<u64>(),
        leader in proptest::option::of(addr()),
        servers in servers(16),
        truncated in any::<bool>(),
    ) {
        roundtrip(h, &Message::NotLeader { leader_id, leader, servers: List::new(&servers), truncated });
    }

    #[test]
    fn error(
        h in header(),
        code in error_code(),
        sequence in proptest::option::of(name()),
        retry_after_ms in any::<u32>(),
        text in text(),
    ) {
        roundtrip(h, &Message::Error {
            code,
            sequence: sequence.as_deref(),
            retry_after_ms,
            text: &text,
        });
    }

    #[test]
    fn node_table_request(h in header(), page in any::<u16>()) {
        roundtrip(h, &Message::NodeTableRequest { page });
    }

    #[test]
    fn node_table(
        h in header(),
        version in any::<u64>(),
        (page, page_count) in (1..=u16::MAX).prop_flat_map(|c| (0..c, Just(c))),
        nodes in prop::collection::vec(
            (node_id(), addr(), node_role()).prop_map(|(id, addr, role)| Node { id, addr, role }),
            0..=16,
        ),
    ) {
        roundtrip(h, &Message::NodeTable { version, page, page_count, nodes: List::new(&nodes) });
    }

    #[test]
    fn leader_change(
        h in header(),
        leader_id in node_id(),
        leader in addr(),
        servers in servers(16),
        truncated in any::<bool>(),
    ) {
        roundtrip(h, &Message::LeaderChange { leader_id, leader, servers: List::new(&servers), truncated });
    }

    #[test]
    fn sequence_create(
        h in header(),
        name in name(),
        (width, start) in width().prop_flat_map(|w| (Just(w), id_below(w.limit()))),
    ) {
        roundtrip(h, &Message::SequenceCreate { name: &name, width, start });
    }

    #[test]
    fn sequence_describe(h in header(), name in name()) {
        roundtrip(h, &Message::SequenceDescribe { name: &name });
    }

    #[test]
    fn sequence_list(h in header(), after in proptest::option::of(name())) {
        roundtrip(h, &Message::SequenceList { after: after.as_deref() });
    }

    #[test]
    fn sequence_info(
        h in header(),
        name in name(),
        (width, mut bounds) in width().prop_flat_map(|w| {
            (Just(w), [0..=w.limit(), 0..=w.limit(), 0..=w.limit()])
        }),
    ) {
        bounds.sort();
        let [start, next, ceiling] = bounds;
        // `start` is an id it issues, so it is below the limit.
        let start = start.min(width.limit() - 1).min(next);
        roundtrip(h, &Message::SequenceInfo { name: &name, width, start, next, ceiling });
    }

    #[test]
    fn sequence_list_reply(
        h in header(),
        names in prop::collection::vec(name(), 0..=12),
        more in any::<bool>(),
    ) {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        roundtrip(h, &Message::SequenceListReply { names: List::new(&names), more });
    }

    #[test]
    fn status_request(h in header(), sequences_after in proptest::option::of(name())) {
        roundtrip(h, &Message::StatusRequest { sequences_after: sequences_after.as_deref() });
    }

    #[test]
    fn status_reply(
        h in header(),
        leader_id in any::<u64>(),
        term in any::<u64>(),
        servers in server_status(8),
        sequences in sequence_status(4),
        more in any::<bool>(),
    ) {
        let sequences: Vec<SequenceStatus<'_>> = sequences
            .iter()
            .map(|(name, width, ceiling, remaining)| SequenceStatus {
                name,
                width: *width,
                ceiling: *ceiling,
                remaining: *remaining,
            })
            .collect();
        roundtrip(h, &Message::StatusReply {
            leader_id,
            term,
            servers: List::new(&servers),
            sequences: List::new(&sequences),
            more,
        });
    }

    #[test]
    fn add_server(h in header(), id in node_id(), raft in addr(), listen in addr()) {
        roundtrip(h, &Message::AddServer { id, raft, listen });
    }

    #[test]
    fn remove_server(h in header(), id in node_id()) {
        roundtrip(h, &Message::RemoveServer { id });
    }

    #[test]
    fn membership(h in header(), voters in servers(16), truncated in any::<bool>()) {
        roundtrip(h, &Message::Membership { voters: List::new(&voters), truncated });
    }
}

/// A few valid messages of different shapes, to mutate.
fn sample_datagram(choice: usize, key: Option<&AuthKey>) -> Vec<u8> {
    let servers = [
        Server {
            id: 1,
            addr: "10.0.0.1:7000".parse().unwrap(),
        },
        Server {
            id: 2,
            addr: "[fe80::1]:7000".parse().unwrap(),
        },
    ];
    let messages = [
        Message::BlockRequest {
            sequence: "orders",
            count: 1000,
        },
        Message::BlockGrant {
            sequence: "orders",
            width: Width::W8,
            block: Block::new(1 << 40, 4096, Width::W8).unwrap(),
        },
        Message::NotLeader {
            leader_id: 2,
            leader: Some(servers[1].addr),
            servers: List::new(&servers),
            truncated: false,
        },
        Message::Ping { sent_us: 0 },
    ];
    common::encode(&messages[choice % messages.len()], key)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..1300)) {
        let key = key();
        let _ = decode(&data, None);
        let _ = decode(&data, Some(&key));
        let _ = unid_proto::peek_header(&data);
    }

    /// Arbitrary payloads behind a valid header and CRC reach the verifier
    /// and the field checks; they must not panic, and what they accept must
    /// re-encode to an equal message.
    #[test]
    fn arbitrary_payloads_never_panic(
        t in 1u8..=21,
        payload in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let datagram = frame_raw(t, 0, 1, &payload, None);
        if let Ok(frame) = decode(&datagram, None) {
            let mut buf = [0u8; DATAGRAM_BYTES_MAX];
            match Codec::new().encode(&frame.header, &frame.message, None, &mut buf) {
                Ok(len) => prop_assert_eq!(decode(&buf[..len], None).unwrap().message, frame.message),
                // Shared strings can make a re-encoding larger; nothing else may fail.
                Err(e) => prop_assert!(matches!(e, unid_proto::EncodeError::TooLarge { .. }), "{}", e),
            }
        }
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        choice in 0usize..4,
        with_key in any::<bool>(),
        bit in any::<prop::sample::Index>(),
    ) {
        let key = key();
        let k = with_key.then_some(&key);
        let datagram = sample_datagram(choice, k);
        prop_assert!(decode(&datagram, k).is_ok());
        let mut bad = datagram.clone();
        let bit = bit.index(datagram.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&bad, k).is_err(), "flipping bit {} was accepted", bit);
    }

    #[test]
    fn truncation_and_extension_are_rejected(
        choice in 0usize..4,
        with_key in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        extra in 1usize..20,
    ) {
        let key = key();
        let k = with_key.then_some(&key);
        let datagram = sample_datagram(choice, k);
        let cut = cut.index(datagram.len());
        prop_assert!(decode(&datagram[..cut], k).is_err());
        let mut longer = datagram.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(decode(&longer, k).is_err());
    }
}

#[test]
fn every_single_bit_flip_of_each_sample_is_rejected() {
    let key = key();
    for choice in 0..4 {
        for k in [None, Some(&key)] {
            let datagram = sample_datagram(choice, k);
            for bit in 0..datagram.len() * 8 {
                let mut bad = datagram.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode(&bad, k).is_err(),
                    "sample {choice}, key {}, bit {bit} accepted",
                    k.is_some()
                );
            }
        }
    }
}

#[test]
fn every_truncation_of_each_sample_is_rejected() {
    let key = key();
    for choice in 0..4 {
        for k in [None, Some(&key)] {
            let datagram = sample_datagram(choice, k);
            for cut in 0..datagram.len() {
                assert!(decode(&datagram[..cut], k).is_err());
            }
        }
    }
}

#[test]
fn message_type_numbers_are_stable() {
    let expected = [
        (MessageType::Ping, 1),
        (MessageType::Pong, 2),
        (MessageType::Hello, 3),
        (MessageType::Welcome, 4),
        (MessageType::BlockRequest, 5),
        (MessageType::BlockGrant, 6),
        (MessageType::NotLeader, 7),
        (MessageType::Error, 8),
        (MessageType::NodeTableRequest, 9),
        (MessageType::NodeTable, 10),
        (MessageType::LeaderChange, 11),
        (MessageType::SequenceCreate, 12),
        (MessageType::SequenceDescribe, 13),
        (MessageType::SequenceList, 14),
        (MessageType::SequenceInfo, 15),
        (MessageType::SequenceListReply, 16),
        (MessageType::StatusRequest, 17),
        (MessageType::StatusReply, 18),
        (MessageType::AddServer, 19),
        (MessageType::RemoveServer, 20),
        (MessageType::Membership, 21),
        (MessageType::VersionMismatch, 22),
    ];
    assert_eq!(expected.len(), MessageType::ALL.len());
    for (t, n) in expected {
        assert_eq!(t.as_u8(), n);
        assert_eq!(MessageType::from_u8(n), Some(t));
    }
    assert_eq!(MessageType::from_u8(0), None);
    assert_eq!(MessageType::from_u8(23), None);
    assert_eq!(MessageType::from_u8(255), None);
}

#[test]
fn decoded_lists_iterate_like_the_originals() {
    let servers: Vec<Server> = (1..=16)
        .map(|i| Server {
            id: i,
            addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::MAX - i as u128)), 65535),
        })
        .collect();
    let msg = Message::Welcome {
        node_id: 9,
        lease_ms: 5000,
        servers: List::new(&servers),
        truncated: true,
    };
    let datagram = common::encode(&msg, None);
    let frame = decode(&datagram, None).unwrap();
    let Message::Welcome { servers: got, .. } = frame.message else {
        panic!("wrong type");
    };
    assert_eq!(got.len(), 16);
    assert_eq!(got.iter().collect::<Vec<_>>(), servers);
    assert_eq!(got.get(15), Some(servers[15]));
    assert_eq!(got.get(16), None);
    // A full list of IPv6 servers fits a datagram.
    assert!(datagram.len() <= DATAGRAM_BYTES_MAX);
    let _ = DecodeError::ZeroSeq;
}

/// Writes one valid datagram per message type (without and with the fuzz
/// target's key, and in the fuzz target's "selector byte + payload" form) as
/// a fuzzing seed corpus, when `UNID_FUZZ_SEEDS_DIR` is set:
/// `UNID_FUZZ_SEEDS_DIR=$PWD/fuzz/corpus/decode cargo test -p unid-proto --test roundtrip write_fuzz_seeds -- --ignored`
#[test]
#[ignore = "a tool, not a check: writes fuzz seeds to $UNID_FUZZ_SEEDS_DIR"]
fn write_fuzz_seeds() {
    let dir = std::env::var_os("UNID_FUZZ_SEEDS_DIR")
        .expect("set UNID_FUZZ_SEEDS_DIR to the folder to write fuzz seeds to");
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fuzz_key = AuthKey::from_secret(b"fuzz secret");
    let servers = [
        Server {
            id: 1,
            addr: "10.0.0.1:7000".parse().unwrap(),
        },
        Server {
            id: 2,
            addr: "[fe80::1]:7000".parse().unwrap(),
        },
    ];
    let nodes = [Node {
        id: 3,
        addr: "10.0.0.3:7001".parse().unwrap(),
        role: NodeRole::Agent,
    }];
    let statuses = [ServerStatus {
        id: 1,
        addr: servers[0].addr,
        role: RaftRole::Leader,
        term: 4,
        health: Health::Healthy,
    }];
    let seqs = [SequenceStatus {
        name: "orders",
        width: Width::W8,
        ceiling: 1 << 20,
        remaining: 1 << 40,
    }];
    let names = ["a", "orders", "z.9"];
    let messages = [
        Message::Ping { sent_us: 1 },
        Message::Pong {
            echo_us: 1,
            lease_ms: 3000,
        },
        Message::Hello {
            role: NodeRole::Agent,
            incarnation: 2,
            name: "host-1",
            listen: Some(servers[1].addr),
            backup_of: Some(9),
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        },
        Message::Welcome {
            node_id: 9,
            lease_ms: 3000,
            servers: List::new(&servers),
            truncated: false,
        },
        Message::BlockRequest {
            sequence: "orders",
            count: 100,
        },
        Message::BlockGrant {
            sequence: "orders",
            width: Width::W4,
            block: Block::new(100, 100, Width::W4).unwrap(),
        },
        Message::NotLeader {
            leader_id: 2,
            leader: Some(servers[1].addr),
            servers: List::new(&servers),
            truncated: true,
        },
        Message::Error {
            code: ErrorCode::RateLimited,
            sequence: Some("orders"),
            retry_after_ms: 5,
            text: "slow down",
        },
        Message::NodeTableRequest { page: 1 },
        Message::NodeTable {
            version: 1,
            page: 0,
            page_count: 2,
            nodes: List::new(&nodes),
        },
        Message::LeaderChange {
            leader_id: 2,
            leader: servers[1].addr,
            servers: List::new(&servers),
            truncated: false,
        },
        Message::SequenceCreate {
            name: "orders",
            width: Width::W16,
            start: 1,
        },
        Message::SequenceDescribe { name: "orders" },
        Message::SequenceList { after: Some("a") },
        Message::SequenceInfo {
            name: "orders",
            width: Width::W2,
            start: 1,
            next: 10,
            ceiling: 100,
        },
        Message::SequenceListReply {
            names: List::new(&names),
            more: true,
        },
        Message::StatusRequest {
            sequences_after: None,
        },
        Message::StatusReply {
            leader_id: 1,
            term: 4,
            servers: List::new(&statuses),
            sequences: List::new(&seqs),
            more: false,
        },
        Message::AddServer {
            id: 4,
            raft: "127.0.0.1:7504".parse().unwrap(),
            listen: "127.0.0.1:7404".parse().unwrap(),
        },
        Message::RemoveServer { id: 4 },
        Message::Membership {
            voters: List::new(&servers),
            truncated: false,
        },
    ];
    let mut codec = Codec::new();
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let h = Header {
        sender: 42,
        seq: 1,
        reply_to: 0,
        epoch: 0,
    };
    for m in &messages {
        let t = m.message_type().as_u8();
        for (suffix, k) in [("plain", None), ("auth", Some(&fuzz_key))] {
            let len = codec.encode(&h, m, k, &mut buf).unwrap();
            std::fs::write(dir.join(format!("seed-{t:02}-{suffix}")), &buf[..len]).unwrap();
            // Selector byte + payload: type index (t - 1), top bit = keyed.
            let mut framed = vec![(t - 1) | if k.is_some() { 0x80 } else { 0 }];
            framed.extend_from_slice(&buf[40..len - 4 - if k.is_some() { 16 } else { 0 }]);
            std::fs::write(dir.join(format!("seed-{t:02}-{suffix}-payload")), framed).unwrap();
        }
    }
}

fn raw_block_grant(width: u8, first: u128, count: u64) -> Vec<u8> {
    common::raw_datagram(MessageType::BlockGrant.as_u8(), |fbb| {
        let sequence = fbb.create_string("orders");
        let first = unid_proto_fbs::U128::new(first as u64, (first >> 64) as u64);
        let root = unid_proto_fbs::BlockGrant::create(
            fbb,
            &unid_proto_fbs::BlockGrantArgs {
                sequence: Some(sequence),
                width,
                first: Some(&first),
                count,
            },
        );
        fbb.finish_minimal(root);
    })
}

proptest! {
    #[test]
    fn out_of_range_widths_are_rejected(
        w in any::<u8>().prop_filter("not a width", |w| Width::from_bytes(*w).is_none()),
    ) {
        let d = raw_block_grant(w, 1, 1);
        let r = decode(&d, None);
        prop_assert!(matches!(
            r,
            Err(DecodeError::Field(unid_proto::FieldError::BadWidth { bytes, .. })) if bytes == w
        ), "{:?}", r);
    }

    #[test]
    fn blocks_past_the_limit_are_rejected(
        (w, first, count) in width().prop_flat_map(|w| {
            // first + count > limit.
            (Just(w), 0..=w.limit()).prop_flat_map(move |(w, first)| {
                let min = (w.limit() - first).saturating_add(1).min(u64::MAX as u128) as u64;
                (Just(w), Just(first), min..=u64::MAX)
            })
        }),
    ) {
        prop_assume!(first.checked_add(count as u128).is_none_or(|end| end > w.limit()));
        let d = raw_block_grant(w.bytes(), first, count);
        let r = decode(&d, None);
        prop_assert!(matches!(
            r,
            Err(DecodeError::Field(unid_proto::FieldError::BlockOutOfRange { .. }))
        ), "{:?}", r);
    }

    #[test]
    fn zero_counts_are_rejected(w in width(), first in any::<u64>()) {
        let d = raw_block_grant(w.bytes(), first as u128 % w.limit(), 0);
        let r = decode(&d, None);
        prop_assert!(matches!(
            r,
            Err(DecodeError::Field(unid_proto::FieldError::ZeroCount { .. }))
        ), "{:?}", r);
    }

    #[test]
    fn bad_names_are_rejected(name in "[^A-Za-z0-9]\\PC{0,10}|[A-Za-z0-9]{65,80}|[a-z]{1,5}[ /:@é][a-z]{0,5}") {
        let m = Message::BlockRequest { sequence: &name, count: 1 };
        let mut buf = [0u8; DATAGRAM_BYTES_MAX];
        let err = Codec::new().encode(&common::header(), &m, None, &mut buf).unwrap_err();
        prop_assert!(
            matches!(err, unid_proto::EncodeError::Field(unid_proto::FieldError::BadName { .. })),
            "{:?}",
            err
        );
    }
}

//! One test per error variant: each malformed input gives its own variant.

mod common;

use common::{encode, frame_raw, header, key, raw_datagram};
use unid_proto::{
    Block, Codec, DATAGRAM_BYTES_MAX, DATAGRAM_BYTES_MIN, DecodeError, ERROR_TEXT_BYTES_MAX,
    EncodeError, ErrorCode, FLAG_AUTH, FieldError, HEADER_BYTES, Header, List, Message,
    MessageType, NameError, Node, NodeRole, SequenceStatus, Server, TAG_BYTES, Width, decode,
    peek_header,
};
use unid_proto_fbs as fb;

fn ping() -> Vec<u8> {
    encode(&Message::Ping { sent_us: 77 }, None)
}

/// Decodes without a key and returns the field error, panicking otherwise.
fn field_error(datagram: &[u8]) -> FieldError {
    match decode(datagram, None) {
        Err(DecodeError::Field(e)) => e,
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn encode_error(message: &Message<'_>) -> EncodeError {
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    Codec::new()
        .encode(&header(), message, None, &mut buf)
        .expect_err("must not encode")
}

fn u128(v: u128) -> fb::U128 {
    fb::U128::new(v as u64, (v >> 64) as u64)
}

fn endpoint(ip: u128, port: u16, family: u8) -> fb::Endpoint {
    fb::Endpoint::new(&u128(ip), port, family)
}

fn block_grant(width: u8, first: u128, count: u64, name: &str) -> Vec<u8> {
    raw_datagram(MessageType::BlockGrant.as_u8(), |fbb| {
        let sequence = fbb.create_string(name);
        let first = u128(first);
        let root = fb::BlockGrant::create(
            fbb,
            &fb::BlockGrantArgs {
                sequence: Some(sequence),
                width,
                first: Some(&first),
                count,
            },
        );
        fbb.finish_minimal(root);
    })
}

fn welcome(node_id: u64, servers: &[fb::ServerEntry]) -> Vec<u8> {
    raw_datagram(MessageType::Welcome.as_u8(), |fbb| {
        let servers = fbb.create_vector(servers);
        let root = fb::Welcome::create(
            fbb,
            &fb::WelcomeArgs {
                node_id,
                lease_ms: 1000,
                servers: Some(servers),
                truncated: false,
            },
        );
        fbb.finish_minimal(root);
    })
}

// ------------------------------------------------------------ DecodeError ---

#[test]
fn too_short() {
    let d = ping();
    for len in 0..DATAGRAM_BYTES_MIN {
        assert_eq!(
            decode(&d[..len.min(d.len())], None),
            Err(DecodeError::TooShort { len })
        );
    }
}

#[test]
fn too_long() {
    let d = vec![0u8; DATAGRAM_BYTES_MAX + 1];
    assert_eq!(
        decode(&d, None),
        Err(DecodeError::TooLong {
            len: DATAGRAM_BYTES_MAX + 1
        })
    );
}

#[test]
fn bad_magic() {
    let mut d = ping();
    d[0] = b'X';
    assert_eq!(
        decode(&d, None),
        Err(DecodeError::BadMagic { found: *b"XN" })
    );
}

#[test]
fn unsupported_version() {
    let mut d = ping();
    // Version 1 (no cluster id in the header) and a future version.
    for version in [1, 3] {
        d[2] = version;
        assert_eq!(
            decode(&d, None),
            Err(DecodeError::UnsupportedVersion { version })
        );
    }
}

/// The cluster id a codec stamps comes back from `decode` and `peek_header`, and is covered
/// by the CRC and the tag: a datagram whose cluster id was rewritten does not decode.
#[test]
fn the_cluster_id_is_carried_and_covered() {
    let key = key();
    let mut codec = Codec::new();
    assert_eq!(codec.cluster(), 0);
    codec.set_cluster(0x0123_4567_89ab_cdef);
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let n = codec
        .encode(
            &header(),
            &Message::Ping { sent_us: 1 },
            Some(&key),
            &mut buf,
        )
        .unwrap();
    let d = &mut buf[..n];
    assert_eq!(d[40..48], 0x0123_4567_89ab_cdef_u64.to_le_bytes());
    assert_eq!(peek_header(d).unwrap().cluster, 0x0123_4567_89ab_cdef);
    assert_eq!(
        decode(d, Some(&key)).unwrap().cluster,
        0x0123_4567_89ab_cdef
    );
    d[40] ^= 1;
    assert!(matches!(
        decode(d, Some(&key)),
        Err(DecodeError::BadCrc { .. })
    ));
    // With the CRC fixed up the tag still fails: a forger cannot move a datagram to
    // another cluster.
    let body = n - TAG_BYTES - 4;
    let crc = crc32fast::hash(&d[..body]);
    d[body..body + 4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode(d, Some(&key)), Err(DecodeError::BadTag));
}

#[test]
fn unknown_type() {
    for t in [0u8, 23, 200, 255] {
        let d = frame_raw(t, 0, 1, &[], None);
        assert_eq!(
            decode(&d, None),
            Err(DecodeError::UnknownType { message_type: t })
        );
    }
}

#[test]
fn unknown_flags() {
    for flags in [2u16, 0x8000, 0x8001, 0xFFFF] {
        let d = frame_raw(MessageType::Ping.as_u8(), flags, 1, &[], None);
        assert_eq!(decode(&d, None), Err(DecodeError::UnknownFlags { flags }));
    }
}

#[test]
fn length_mismatch() {
    let d = ping();
    let mut longer = d.clone();
    longer.push(0);
    assert_eq!(
        decode(&longer, None),
        Err(DecodeError::LengthMismatch {
            expected: d.len(),
            actual: d.len() + 1
        })
    );
    assert_eq!(
        decode(&d[..d.len() - 1], None),
        Err(DecodeError::LengthMismatch {
            expected: d.len(),
            actual: d.len() - 1
        })
    );
}

#[test]
fn zero_seq() {
    let d = frame_raw(MessageType::Ping.as_u8(), 0, 0, &[], None);
    assert_eq!(decode(&d, None), Err(DecodeError::ZeroSeq));
    assert_eq!(peek_header(&d), Err(DecodeError::ZeroSeq));
}

#[test]
fn bad_crc() {
    let mut d = ping();
    d[HEADER_BYTES] ^= 0x10;
    assert!(matches!(decode(&d, None), Err(DecodeError::BadCrc { .. })));
    // peek_header does not check the CRC.
    assert!(peek_header(&d).is_ok());
}

#[test]
fn missing_tag() {
    let d = ping();
    assert_eq!(decode(&d, Some(&key())), Err(DecodeError::MissingTag));
}

#[test]
fn bad_tag() {
    let key = key();
    let mut d = encode(&Message::Ping { sent_us: 1 }, Some(&key));
    let last = d.len() - 1;
    d[last] ^= 1;
    assert_eq!(decode(&d, Some(&key)), Err(DecodeError::BadTag));
    // Another secret: CRC fine, tag wrong.
    let other = unid_proto::AuthKey::from_secret(b"another secret");
    let d = encode(&Message::Ping { sent_us: 1 }, Some(&other));
    assert_eq!(decode(&d, Some(&key)), Err(DecodeError::BadTag));
}

#[test]
fn unexpected_tag() {
    let key = key();
    let d = encode(&Message::Ping { sent_us: 1 }, Some(&key));
    assert_eq!(decode(&d, None), Err(DecodeError::UnexpectedTag));
    assert_eq!(d[4] as u16 & FLAG_AUTH, FLAG_AUTH);
}

#[test]
fn verify() {
    // Garbage payload behind a valid header and CRC.
    let d = frame_raw(MessageType::BlockRequest.as_u8(), 0, 1, &[0xFF; 12], None);
    assert!(matches!(decode(&d, None), Err(DecodeError::Verify(_))));
    // An empty payload is not a table either.
    let d = frame_raw(MessageType::Ping.as_u8(), 0, 1, &[], None);
    assert!(matches!(decode(&d, None), Err(DecodeError::Verify(_))));
    // A required field missing: a Ping payload read as a BlockRequest (no
    // sequence name).
    let ping = ping();
    let payload = &ping[HEADER_BYTES..ping.len() - 4];
    let d = frame_raw(MessageType::BlockRequest.as_u8(), 0, 1, payload, None);
    assert!(matches!(decode(&d, None), Err(DecodeError::Verify(_))));
}

#[test]
fn verifier_limits_tables() {
    // One SequenceStatus table referenced 40 times: a small payload whose
    // expanded tree has more tables than the verifier allows (32), refused
    // before the field checks ever count the list.
    let d = raw_datagram(MessageType::StatusReply.as_u8(), |fbb| {
        let name = fbb.create_string("a");
        let c = u128(1);
        let one = fb::SequenceStatus::create(
            fbb,
            &fb::SequenceStatusArgs {
                name: Some(name),
                width: 8,
                ceiling: Some(&c),
                remaining: Some(&c),
            },
        );
        let sequences = fbb.create_vector(&[one; 40]);
        let root = fb::StatusReply::create(
            fbb,
            &fb::StatusReplyArgs {
                sequences: Some(sequences),
                ..Default::default()
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(d.len() < DATAGRAM_BYTES_MAX);
    match decode(&d, None) {
        Err(DecodeError::Verify(e)) => {
            assert!(e.to_string().contains("tables"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn field() {
    let d = block_grant(3, 1, 1, "orders");
    assert!(matches!(
        decode(&d, None),
        Err(DecodeError::Field(FieldError::BadWidth { bytes: 3, .. }))
    ));
}

#[test]
fn checks_run_in_order() {
    // Bad CRC and no tag with a key: the CRC is reported first.
    let mut d = ping();
    d[HEADER_BYTES] ^= 1;
    assert!(matches!(
        decode(&d, Some(&key())),
        Err(DecodeError::BadCrc { .. })
    ));
}

// ------------------------------------------------------------- FieldError ---

#[test]
fn bad_width() {
    for w in [0u8, 1, 3, 5, 7, 9, 15, 17, 32, 255] {
        assert!(matches!(
            field_error(&block_grant(w, 1, 1, "orders")),
            FieldError::BadWidth { bytes, .. } if bytes == w
        ));
    }
    let d = raw_datagram(MessageType::SequenceCreate.as_u8(), |fbb| {
        let name = fbb.create_string("orders");
        let root = fb::SequenceCreate::create(
            fbb,
            &fb::SequenceCreateArgs {
                name: Some(name),
                width: 6,
                start: None,
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(
        field_error(&d),
        FieldError::BadWidth { bytes: 6, .. }
    ));
}

#[test]
fn zero_count() {
    assert!(matches!(
        field_error(&block_grant(8, 1, 0, "orders")),
        FieldError::ZeroCount { .. }
    ));
    let d = raw_datagram(MessageType::BlockRequest.as_u8(), |fbb| {
        let sequence = fbb.create_string("orders");
        let root = fb::BlockRequest::create(
            fbb,
            &fb::BlockRequestArgs {
                sequence: Some(sequence),
                count: 0,
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(field_error(&d), FieldError::ZeroCount { .. }));
    assert!(matches!(
        encode_error(&Message::BlockRequest {
            sequence: "orders",
            count: 0
        }),
        EncodeError::Field(FieldError::ZeroCount { .. })
    ));
}

#[test]
fn block_out_of_range() {
    // The last id of a 2-byte sequence is 0xFFFE; 0xFFFF is reserved.
    assert!(decode(&block_grant(2, 0xFFFE, 1, "s"), None).is_ok());
    assert_eq!(
        field_error(&block_grant(2, 0xFFFE, 2, "s")),
        FieldError::BlockOutOfRange {
            first: 0xFFFE,
            count: 2,
            width: Width::W2
        }
    );
    assert!(matches!(
        field_error(&block_grant(4, 1 << 40, 1, "s")),
        FieldError::BlockOutOfRange { .. }
    ));
    assert!(matches!(
        field_error(&block_grant(16, u128::MAX, 1, "s")),
        FieldError::BlockOutOfRange { .. }
    ));
    assert!(matches!(
        field_error(&block_grant(8, u64::MAX as u128, 1, "s")),
        FieldError::BlockOutOfRange { .. }
    ));
}

#[test]
fn id_out_of_range() {
    let info = |start: u128, next: u128, ceiling: u128| {
        raw_datagram(MessageType::SequenceInfo.as_u8(), |fbb| {
            let name = fbb.create_string("orders");
            let (s, n, c) = (u128(start), u128(next), u128(ceiling));
            let root = fb::SequenceInfo::create(
                fbb,
                &fb::SequenceInfoArgs {
                    name: Some(name),
                    width: 2,
                    start: Some(&s),
                    next: Some(&n),
                    ceiling: Some(&c),
                },
            );
            fbb.finish_minimal(root);
        })
    };
    assert!(decode(&info(1, 5, 0xFFFF), None).is_ok());
    for (s, n, c) in [(1, 5, 0x1_0000), (6, 5, 10), (1, 11, 10)] {
        assert!(matches!(
            field_error(&info(s, n, c)),
            FieldError::IdOutOfRange { .. }
        ));
    }
    assert!(matches!(
        encode_error(&Message::SequenceCreate {
            name: "s",
            width: Width::W2,
            start: 0xFFFF
        }),
        EncodeError::Field(FieldError::IdOutOfRange { .. })
    ));
    let status = [SequenceStatus {
        name: "s",
        width: Width::W2,
        ceiling: 0x1_0000,
        remaining: 0,
    }];
    assert!(matches!(
        encode_error(&Message::StatusReply {
            leader_id: 0,
            term: 0,
            servers: List::empty(),
            sequences: List::new(&status),
            more: false
        }),
        EncodeError::Field(FieldError::IdOutOfRange { .. })
    ));
}

#[test]
fn bad_name() {
    let long = "a".repeat(65);
    for (name, why) in [
        ("", NameError::Empty),
        ("-x", NameError::BadCharacter),
        ("a b", NameError::BadCharacter),
        ("a/b", NameError::BadCharacter),
        ("é", NameError::BadCharacter),
        (long.as_str(), NameError::TooLong { len: 65 }),
    ] {
        assert_eq!(
            field_error(&block_grant(8, 1, 1, name)),
            FieldError::BadName {
                field: "block grant sequence",
                source: why.clone()
            }
        );
        assert!(matches!(
            encode_error(&Message::SequenceDescribe { name }),
            EncodeError::Field(FieldError::BadName { .. })
        ));
        let names = ["ok", name];
        assert!(matches!(
            encode_error(&Message::SequenceListReply {
                names: List::new(&names),
                more: false
            }),
            EncodeError::Field(FieldError::BadName { .. })
        ));
    }
    let d = raw_datagram(MessageType::SequenceListReply.as_u8(), |fbb| {
        let a = fbb.create_string("good");
        let b = fbb.create_string("bad name");
        let names = fbb.create_vector(&[a, b]);
        let root = fb::SequenceListReply::create(
            fbb,
            &fb::SequenceListReplyArgs {
                names: Some(names),
                more: false,
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(field_error(&d), FieldError::BadName { .. }));
}

#[test]
fn bad_enum() {
    for code in [0u8, 11, 255] {
        let d = raw_datagram(MessageType::Error.as_u8(), |fbb| {
            let root = fb::Error::create(
                fbb,
                &fb::ErrorArgs {
                    code: fb::ErrorCode(code),
                    ..Default::default()
                },
            );
            fbb.finish_minimal(root);
        });
        assert_eq!(
            field_error(&d),
            FieldError::BadEnum {
                field: "error code",
                value: code
            }
        );
    }
    let d = raw_datagram(MessageType::Hello.as_u8(), |fbb| {
        let name = fbb.create_string("host1");
        let root = fb::Hello::create(
            fbb,
            &fb::HelloArgs {
                role: fb::NodeRole(0),
                name: Some(name),
                ..Default::default()
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(
        field_error(&d),
        FieldError::BadEnum { value: 0, .. }
    ));
    let d = raw_datagram(MessageType::NodeTable.as_u8(), |fbb| {
        let nodes = fbb.create_vector(&[fb::NodeEntry::new(
            1,
            &endpoint(0x7F00_0001, 7000, 4),
            fb::NodeRole(9),
        )]);
        let root = fb::NodeTable::create(
            fbb,
            &fb::NodeTableArgs {
                version: 1,
                page: 0,
                page_count: 1,
                nodes: Some(nodes),
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(
        field_error(&d),
        FieldError::BadEnum { value: 9, .. }
    ));
}

#[test]
fn list_too_long() {
    let servers: Vec<fb::ServerEntry> = (1..=17)
        .map(|i| fb::ServerEntry::new(i, &endpoint(0x7F00_0001, 7000, 4)))
        .collect();
    assert!(decode(&welcome(5, &servers[..16]), None).is_ok());
    assert_eq!(
        field_error(&welcome(5, &servers)),
        FieldError::ListTooLong {
            field: "servers",
            len: 17,
            max: 16
        }
    );
    let servers: Vec<Server> = (1..=17)
        .map(|i| Server {
            id: i,
            addr: "127.0.0.1:7000".parse().unwrap(),
        })
        .collect();
    assert!(matches!(
        encode_error(&Message::LeaderChange {
            leader_id: 1,
            leader: servers[0].addr,
            servers: List::new(&servers),
            truncated: false
        }),
        EncodeError::Field(FieldError::ListTooLong { len: 17, .. })
    ));
}

#[test]
fn bad_address() {
    let bad = [
        endpoint(0x7F00_0001, 7000, 5),  // unknown family
        endpoint(0x7F00_0001, 0, 4),     // port 0
        endpoint(1 << 32, 7000, 4),      // IPv4 with bits above 32
        endpoint(1u128 << 100, 7000, 4), // IPv4 with high half set
        endpoint(0x7F00_0001, 7000, 0),  // no family
    ];
    for e in bad {
        let d = welcome(5, &[fb::ServerEntry::new(1, &e)]);
        assert!(
            matches!(field_error(&d), FieldError::BadAddress { .. }),
            "{e:?}"
        );
    }
    let d = raw_datagram(MessageType::Hello.as_u8(), |fbb| {
        let name = fbb.create_string("host1");
        let listen = endpoint(1, 1, 7);
        let root = fb::Hello::create(
            fbb,
            &fb::HelloArgs {
                role: fb::NodeRole::Agent,
                name: Some(name),
                listen: Some(&listen),
                ..Default::default()
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(field_error(&d), FieldError::BadAddress { .. }));
    assert!(matches!(
        encode_error(&Message::Hello {
            role: NodeRole::Agent,
            incarnation: 1,
            name: "h",
            listen: Some("10.0.0.1:0".parse().unwrap()),
            backup_of: None,
            versions: unid_proto::VERSIONS,
            software: unid_proto::SOFTWARE,
        }),
        EncodeError::Field(FieldError::BadAddress { .. })
    ));
}

#[test]
fn zero_node_id() {
    let d = welcome(0, &[]);
    assert!(matches!(field_error(&d), FieldError::ZeroNodeId { .. }));
    let d = welcome(5, &[fb::ServerEntry::new(0, &endpoint(1, 1, 4))]);
    assert!(matches!(field_error(&d), FieldError::ZeroNodeId { .. }));
    let d = raw_datagram(MessageType::Hello.as_u8(), |fbb| {
        let name = fbb.create_string("host1");
        let root = fb::Hello::create(
            fbb,
            &fb::HelloArgs {
                role: fb::NodeRole::Agent,
                name: Some(name),
                backup_of: Some(0),
                ..Default::default()
            },
        );
        fbb.finish_minimal(root);
    });
    assert!(matches!(field_error(&d), FieldError::ZeroNodeId { .. }));
    let nodes = [Node {
        id: 0,
        addr: "[::1]:9".parse().unwrap(),
        role: NodeRole::Server,
    }];
    assert!(matches!(
        encode_error(&Message::NodeTable {
            version: 1,
            page: 0,
            page_count: 1,
            nodes: List::new(&nodes)
        }),
        EncodeError::Field(FieldError::ZeroNodeId { .. })
    ));
}

#[test]
fn bad_page() {
    for (page, page_count) in [(0u16, 0u16), (1, 1), (5, 3)] {
        let d = raw_datagram(MessageType::NodeTable.as_u8(), |fbb| {
            let root = fb::NodeTable::create(
                fbb,
                &fb::NodeTableArgs {
                    version: 1,
                    page,
                    page_count,
                    nodes: None,
                },
            );
            fbb.finish_minimal(root);
        });
        assert_eq!(field_error(&d), FieldError::BadPage { page, page_count });
    }
}

#[test]
fn text_too_long() {
    let text = "x".repeat(ERROR_TEXT_BYTES_MAX + 1);
    let d = raw_datagram(MessageType::Error.as_u8(), |fbb| {
        let t = fbb.create_string(&text);
        let root = fb::Error::create(
            fbb,
            &fb::ErrorArgs {
                code: fb::ErrorCode::Internal,
                text: Some(t),
                ..Default::default()
            },
        );
        fbb.finish_minimal(root);
    });
    assert_eq!(
        field_error(&d),
        FieldError::TextTooLong {
            len: ERROR_TEXT_BYTES_MAX + 1
        }
    );
    assert!(matches!(
        encode_error(&Message::Error {
            code: ErrorCode::Internal,
            sequence: None,
            retry_after_ms: 0,
            text: &text
        }),
        EncodeError::Field(FieldError::TextTooLong { .. })
    ));
}

// ------------------------------------------------------------ EncodeError ---

#[test]
fn encode_zero_seq() {
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let h = Header { seq: 0, ..header() };
    assert_eq!(
        Codec::new().encode(&h, &Message::Ping { sent_us: 0 }, None, &mut buf),
        Err(EncodeError::ZeroSeq)
    );
}

#[test]
fn encode_too_large() {
    // 16 names of 64 bytes do not fit one datagram; the sender must send
    // fewer and set `more`.
    let names: Vec<String> = (0..16).map(|i| format!("{i:0>64}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let message = Message::SequenceListReply {
        names: List::new(&names),
        more: false,
    };
    match encode_error(&message) {
        EncodeError::TooLarge { len } => assert!(len > DATAGRAM_BYTES_MAX),
        e => panic!("{e:?}"),
    }
    // The biggest that fits, without and with a tag.
    let fits = Message::SequenceListReply {
        names: List::new(&names[..14]),
        more: true,
    };
    let key = key();
    let d = encode(&fits, Some(&key));
    assert!(d.len() <= DATAGRAM_BYTES_MAX);
    assert_eq!(decode(&d, Some(&key)).unwrap().message, fits);
}

#[test]
fn encode_buffer_too_small() {
    let mut buf = [0u8; 50];
    let message = Message::BlockRequest {
        sequence: "orders",
        count: 1,
    };
    match Codec::new().encode(&header(), &message, None, &mut buf) {
        Err(EncodeError::BufferTooSmall { len, capacity: 50 }) => assert!(len > 50),
        other => panic!("{other:?}"),
    }
}

// -------------------------------------------------------- limits that fit ---

#[test]
fn full_server_lists_and_node_pages_fit() {
    let key = key();
    let v6 = |i: u64| -> std::net::SocketAddr {
        std::net::SocketAddr::new(
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX - i as u128)),
            65535,
        )
    };
    let servers: Vec<Server> = (1..=16).map(|i| Server { id: i, addr: v6(i) }).collect();
    let nodes: Vec<Node> = (1..=16)
        .map(|i| Node {
            id: u64::MAX - i,
            addr: v6(i),
            role: NodeRole::Agent,
        })
        .collect();
    for m in [
        Message::Welcome {
            node_id: u64::MAX,
            lease_ms: u32::MAX,
            servers: List::new(&servers),
            truncated: true,
        },
        Message::NotLeader {
            leader_id: u64::MAX,
            leader: Some(v6(0)),
            servers: List::new(&servers),
            truncated: true,
        },
        Message::LeaderChange {
            leader_id: u64::MAX,
            leader: v6(0),
            servers: List::new(&servers),
            truncated: true,
        },
        Message::NodeTable {
            version: u64::MAX,
            page: u16::MAX - 1,
            page_count: u16::MAX,
            nodes: List::new(&nodes),
        },
    ] {
        let d = encode(&m, Some(&key));
        assert!(
            d.len() <= DATAGRAM_BYTES_MAX,
            "{:?}: {}",
            m.message_type(),
            d.len()
        );
        assert_eq!(decode(&d, Some(&key)).unwrap().message, m);
    }
}

#[test]
fn a_block_grant_is_small() {
    let m = Message::BlockGrant {
        sequence: "orders",
        width: Width::W16,
        block: Block::new(u128::MAX - 1000, 1000, Width::W16).unwrap(),
    };
    let d = encode(&m, Some(&key()));
    assert!(d.len() < 150, "{}", d.len());
}

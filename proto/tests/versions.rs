//! Issue 18: the protocol versions in `Hello`, `VersionMismatch`, and `peek_version`.

use flatbuffers::FlatBufferBuilder;
use unid_proto::{
    Codec, DATAGRAM_BYTES_MAX, HELLO_VERSIONS_ABSENT, Header, Message, NodeRole, VERSION, Versions,
    decode, peek_version,
};
use unid_proto_fbs as fb;

fn encode(msg: &Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let h = Header {
        sender: 0,
        seq: 1,
        reply_to: 0,
        epoch: 0,
    };
    let n = Codec::new().encode(&h, msg, None, &mut buf).unwrap();
    buf[..n].to_vec()
}

#[test]
fn hello_versions_and_software_round_trip() {
    let hello = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 5,
        name: "host-1",
        listen: None,
        backup_of: None,
        versions: Versions { min: 2, max: 7 },
        software: "unid 1.2.3",
    };
    assert_eq!(decode(&encode(&hello), None).unwrap().message, hello);
    let refusal = Message::VersionMismatch {
        versions: Versions { min: 3, max: 4 },
        offered: Versions::only(2),
        software: "",
    };
    assert_eq!(decode(&encode(&refusal), None).unwrap().message, refusal);
}

/// A Hello as unid 0.1.0 framed it (no `versions`, no `software`) decodes as version 2.
#[test]
fn an_old_format_hello_decodes_as_version_2() {
    let mut fbb = FlatBufferBuilder::new();
    let name = fbb.create_string("old-agent");
    let root = fb::Hello::create(
        &mut fbb,
        &fb::HelloArgs {
            role: fb::NodeRole(NodeRole::Agent as u8),
            incarnation: 9,
            name: Some(name),
            ..Default::default()
        },
    );
    fbb.finish_minimal(root);
    let payload = fbb.finished_data();
    let mut d = Vec::new();
    d.extend_from_slice(b"UN");
    d.push(VERSION);
    d.push(3); // Hello
    d.extend_from_slice(&0u16.to_le_bytes());
    d.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    for v in [0u64, 1, 0, 0, 0] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d.extend_from_slice(payload);
    let crc = crc32fast::hash(&d);
    d.extend_from_slice(&crc.to_le_bytes());
    match decode(&d, None).unwrap().message {
        Message::Hello {
            name,
            versions,
            software,
            ..
        } => {
            assert_eq!(name, "old-agent");
            assert_eq!(versions, HELLO_VERSIONS_ABSENT);
            assert_eq!(versions, Versions::only(2));
            assert_eq!(software, "");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_ranges_and_software_are_refused_and_peek_version_reads_any_version() {
    for v in [Versions { min: 0, max: 2 }, Versions { min: 3, max: 2 }] {
        let hello = Message::Hello {
            role: NodeRole::Agent,
            incarnation: 1,
            name: "h",
            listen: None,
            backup_of: None,
            versions: v,
            software: "",
        };
        assert!(hello.validate().is_err(), "{v:?} accepted");
    }
    let hello = Message::Hello {
        role: NodeRole::Agent,
        incarnation: 1,
        name: "h",
        listen: None,
        backup_of: None,
        versions: Versions::only(2),
        software: "bad\nline",
    };
    assert!(hello.validate().is_err());
    let mut d = encode(&Message::Ping { sent_us: 1 });
    assert_eq!(peek_version(&d), Some(VERSION));
    d[2] = 9;
    assert_eq!(peek_version(&d), Some(9));
    assert_eq!(peek_version(b"XX\x02"), None);
    assert_eq!(peek_version(b"UN"), None);
}

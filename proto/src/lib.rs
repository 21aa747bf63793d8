//! The unid wire format. No I/O: bytes in, typed messages out, and back.
//!
//! - [`types`]: value types shared by every crate (widths, blocks, names, ids).
//! - [`auth`]: the cluster MAC ([`AuthKey`]).
//! - [`message`]: the messages ([`Message`], one variant per
//!   [`MessageType`]), with the limits of every field.
//! - [`replay`]: the anti-replay window ([`ReplayWindow`]) receivers keep
//!   per sender.
//! - [`codec`]: datagram framing (header, CRC32, tag), [`Codec::encode`],
//!   [`decode`] and [`peek_header`].
//!
//! The payload of every datagram is a FlatBuffers table described in
//! `proto/schema/unid.fbs`; the code flatc generates from it lives in the
//! `unid-proto-fbs` crate because it needs `unsafe`, which this crate
//! forbids. See `proto/README.md` for the header layout, the message list
//! and the authentication rule.
//!
//! ```
//! use unid_proto::{decode, AuthKey, Codec, Header, Message, DATAGRAM_BYTES_MAX};
//!
//! let key = AuthKey::from_secret(b"cluster secret");
//! let mut codec = Codec::new();
//! let mut buf = [0u8; DATAGRAM_BYTES_MAX];
//! let header = Header { sender: 7, seq: 1, reply_to: 0, epoch: 3 };
//! codec.set_cluster(0x5eed);
//! let request = Message::BlockRequest { sequence: "orders", count: 1000 };
//! let len = codec.encode(&header, &request, Some(&key), &mut buf).unwrap();
//! let frame = decode(&buf[..len], Some(&key)).unwrap();
//! assert_eq!(frame.header, header);
//! assert_eq!(frame.cluster, 0x5eed);
//! assert_eq!(frame.message, request);
//! ```
#![forbid(unsafe_code)]

pub mod types;

pub use types::{Block, ClusterId, Epoch, Id, NameError, NodeId, SeqNo, SequenceName, Width};
pub mod auth;
pub use auth::{AuthKey, TAG_BYTES};
pub mod codec;
pub mod message;
pub mod replay;

pub use codec::{
    Codec, DATAGRAM_BYTES_MAX, DATAGRAM_BYTES_MIN, DecodeError, EncodeError, FLAG_AUTH, Frame,
    HEADER_BYTES, HELLO_VERSIONS_ABSENT, Header, PAYLOAD_BYTES_MAX, PeekedHeader, SOFTWARE,
    VERSION, VERSIONS, decode, peek_header, peek_version,
};
pub use message::{
    ERROR_TEXT_BYTES_MAX, ErrorCode, FieldError, Health, List, ListItem, ListIter, Message,
    MessageType, NODE_TABLE_PAGE_MAX, Node, NodeRole, RaftRole, SEQUENCE_LIST_MAX, SERVERS_MAX,
    SOFTWARE_BYTES_MAX, STATUS_SEQUENCES_MAX, SequenceStatus, Server, ServerStatus, Versions,
};
pub use replay::{REPLAY_WINDOW_BITS, ReplayWindow};

//! Datagram framing, encoding and decoding.
//!
//! Every datagram, all integers little-endian:
//!
//! ```text
//! off   size field
//! 0     2    magic 0x55 0x4E ("UN")          (stable in every version)
//! 2     1    protocol version = 2           (stable in every version)
//! 3     1    message type (MessageType)
//! 4     2    flags: bit 0 AUTH = a 16-byte tag follows the CRC; other bits must be 0
//! 6     2    payload length n
//! 8     8    sender node id (0 = not yet registered)
//! 16    8    seq: the sender's per-sender sequence number (never 0)
//! 24    8    reply_to: seq of the datagram this answers (0 = not a reply)
//! 32    8    leader epoch (Raft term; 0 = unknown)
//! 40    8    cluster id (ClusterId; 0 = not known yet)
//! 48    n    FlatBuffers payload (root table of the message type)
//! 48+n  4    CRC32 (crc32fast, IEEE) of bytes [0, 48+n)
//! 52+n  16   tag, only with AUTH: AuthKey::tag(bytes [0, 48+n))
//! ```
//!
//! The cluster id is not one of the [`Header`] fields a sender chooses per
//! datagram: a [`Codec`] stamps the one it was given ([`Codec::set_cluster`])
//! on everything it encodes, and [`decode`] returns it in [`Frame::cluster`].
//! Receivers decide what a foreign id means (servers and agents drop it).
//!
//! The datagram is exactly that long and at most [`DATAGRAM_BYTES_MAX`].
//!
//! # Versions
//!
//! Bytes 0-2 (magic and version) keep this layout in every protocol version, so that any
//! receiver can tell a unid datagram of a version it does not speak ([`peek_version`]) from
//! garbage. The rest of the header may change with the version. A node speaks a range of
//! versions ([`VERSIONS`] for this crate) and says so in [`Message::Hello`]; a server that
//! speaks none of them, or that receives a datagram whose header version it does not speak,
//! answers [`Message::VersionMismatch`], always framed as version 2 as laid out above: every
//! later version must keep decoding that one message in this framing, so that an agent of
//! any version reads why it is refused.
//!
//! # Authentication rule
//!
//! A node decodes with `Some(key)` when it has a cluster secret and with
//! `None` when it has none:
//!
//! | key      | AUTH flag | result                                           |
//! |----------|-----------|--------------------------------------------------|
//! | `Some`   | set       | accepted if the tag verifies, else [`DecodeError::BadTag`] |
//! | `Some`   | clear     | [`DecodeError::MissingTag`]                      |
//! | `None`   | clear     | accepted                                         |
//! | `None`   | set       | [`DecodeError::UnexpectedTag`]: a node without the secret cannot check the tag, and accepting it would hide a configuration mismatch |
//!
//! The CRC is checked before the tag: it is cheaper and catches corruption;
//! the tag catches forgery.

use core::net::SocketAddr;

use flatbuffers::{FlatBufferBuilder, InvalidFlatbuffer, VerifierOptions, WIPOffset};
use unid_proto_fbs as fb;

use crate::auth::{AuthKey, TAG_BYTES};
use crate::message::{
    ErrorCode, FieldError, List, ListItem, Message, MessageType, NODE_TABLE_PAGE_MAX, NodeRole,
    SEQUENCE_LIST_MAX, SERVERS_MAX, STATUS_SEQUENCES_MAX, Server, Versions, WireVec,
    endpoint_from_fb, endpoint_to_fb, u128_from_fb, u128_to_fb, width_from_wire,
};
use crate::types::{Block, ClusterId, Epoch, NodeId, SeqNo};

/// The two magic bytes that start every datagram: "UN".
pub const MAGIC: [u8; 2] = *b"UN";
/// The protocol version this crate speaks (and puts in every header it encodes).
pub const VERSION: u8 = 2;
/// Every protocol version this crate speaks: today only [`VERSION`].
pub const VERSIONS: Versions = Versions::only(VERSION);
/// What a [`Message::Hello`] without `versions` (sent by unid 0.1.0, before the field
/// existed) speaks: version 2, the only one those builds know.
pub const HELLO_VERSIONS_ABSENT: Versions = Versions::only(2);
/// This build's software string, as [`Message::Hello`] and [`Message::VersionMismatch`]
/// carry it.
pub const SOFTWARE: &str = concat!("unid ", env!("CARGO_PKG_VERSION"));
/// Bytes of the fixed header before the payload.
pub const HEADER_BYTES: usize = 48;
/// Bytes of the CRC32 after the payload.
pub const CRC_BYTES: usize = 4;
/// The largest datagram sent or accepted, in bytes: fits any path MTU of
/// 1280 (IPv6 minimum) with IP and UDP headers.
pub const DATAGRAM_BYTES_MAX: usize = 1200;
/// The smallest datagram: header, empty payload, CRC.
pub const DATAGRAM_BYTES_MIN: usize = HEADER_BYTES + CRC_BYTES;
/// The largest payload of an authenticated datagram.
pub const PAYLOAD_BYTES_MAX: usize = DATAGRAM_BYTES_MAX - HEADER_BYTES - CRC_BYTES - TAG_BYTES;
/// Flag bit 0: a tag follows the CRC.
pub const FLAG_AUTH: u16 = 1;
/// Every flag bit this version knows.
pub const FLAGS_KNOWN: u16 = FLAG_AUTH;

const _: () = assert!(HEADER_BYTES == 2 + 1 + 1 + 2 + 2 + 8 * 5);
const _: () = assert!(DATAGRAM_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(PAYLOAD_BYTES_MAX == 1132);

/// Limits for the FlatBuffers verifier: far above what a valid payload needs
/// (depth 2, at most 1 + [`STATUS_SEQUENCES_MAX`] tables) and small enough
/// that hostile input costs little.
const VERIFIER_OPTIONS: VerifierOptions = VerifierOptions {
    max_depth: 8,
    max_tables: 32,
    max_apparent_size: 4 * DATAGRAM_BYTES_MAX,
    ignore_missing_null_terminator: false,
};

/// The header fields the sender chooses (the rest, type, flags and length,
/// follow from the message and the key).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Header {
    /// The sender's node id (0 = not yet registered).
    pub sender: NodeId,
    /// The sender's sequence number for this datagram (never 0).
    pub seq: SeqNo,
    /// The seq of the datagram this one answers (0 = not a reply).
    pub reply_to: SeqNo,
    /// The leader epoch (Raft term) the sender knows (0 = unknown).
    pub epoch: Epoch,
}

/// What [`peek_header`] reads without checking the CRC, tag or payload.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeekedHeader {
    /// The message type.
    pub message_type: MessageType,
    /// Whether the AUTH flag is set.
    pub authenticated: bool,
    /// The payload length.
    pub payload_bytes: u16,
    /// The sender's fields.
    pub header: Header,
    /// The sender's cluster id (0: not known yet).
    pub cluster: ClusterId,
}

/// A decoded datagram.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The sender's header fields.
    pub header: Header,
    /// The sender's cluster id (0: not known yet); covered by the CRC and the
    /// tag like every header byte.
    pub cluster: ClusterId,
    /// Whether it carried a tag that verified (always true when decoded with
    /// a key, always false without).
    pub authenticated: bool,
    /// The message, borrowing from the datagram.
    pub message: Message<'a>,
}

/// Why a datagram was rejected. Each variant is one way a datagram can be
/// malformed; checks run in the order of the variants below.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the smallest datagram ([`DATAGRAM_BYTES_MIN`]).
    #[error("datagram is {len} bytes, shorter than the {DATAGRAM_BYTES_MIN}-byte minimum")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// Longer than [`DATAGRAM_BYTES_MAX`].
    #[error("datagram is {len} bytes, longer than the {DATAGRAM_BYTES_MAX}-byte maximum")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The first two bytes.
        found: [u8; 2],
    },
    /// A protocol version other than [`VERSION`].
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// A message type number this version does not know.
    #[error("unknown message type {message_type}")]
    UnknownType {
        /// The number found.
        message_type: u8,
    },
    /// Flag bits this version does not know are set.
    #[error("unknown flag bits in {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// The datagram's length is not header + payload length + CRC (+ tag).
    #[error("datagram is {actual} bytes, its header says {expected}")]
    LengthMismatch {
        /// The length the header implies.
        expected: usize,
        /// The actual length.
        actual: usize,
    },
    /// The header's seq is 0.
    #[error("seq is 0")]
    ZeroSeq,
    /// The CRC32 does not match: the datagram was corrupted.
    #[error("CRC mismatch: computed {computed:#010x}, datagram says {found:#010x}")]
    BadCrc {
        /// The CRC of the bytes received.
        computed: u32,
        /// The CRC in the datagram.
        found: u32,
    },
    /// Decoded with a key, but the datagram has no tag (AUTH flag clear).
    #[error("datagram has no authentication tag but this node requires one")]
    MissingTag,
    /// Decoded with a key, and the tag does not verify: forged, or made with
    /// another secret.
    #[error("authentication tag does not verify")]
    BadTag,
    /// Decoded without a key, but the datagram has a tag: the sender has a
    /// cluster secret this node lacks.
    #[error("datagram has an authentication tag but this node has no key")]
    UnexpectedTag,
    /// The payload is not a valid FlatBuffer of the message type's table (or
    /// exceeds the verifier's limits).
    #[error("payload fails FlatBuffers verification: {0}")]
    Verify(#[source] InvalidFlatbuffer),
    /// The payload is well formed but a field is out of range.
    #[error("invalid field: {0}")]
    Field(#[from] FieldError),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The header's seq is 0.
    #[error("seq is 0")]
    ZeroSeq,
    /// A field breaks its limits (see [`Message::validate`]).
    #[error("invalid field: {0}")]
    Field(#[from] FieldError),
    /// The datagram would exceed [`DATAGRAM_BYTES_MAX`]: send fewer list
    /// items (see the paging rules in the schema).
    #[error("datagram would be {len} bytes, more than the {DATAGRAM_BYTES_MAX}-byte maximum")]
    TooLarge {
        /// The length it would have.
        len: usize,
    },
    /// The caller's buffer is smaller than the datagram.
    #[error("datagram is {len} bytes but the buffer holds {capacity}")]
    BufferTooSmall {
        /// The datagram's length.
        len: usize,
        /// The buffer's length.
        capacity: usize,
    },
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The protocol version in a datagram's header, if it starts with [`MAGIC`] (bytes 0-2 are
/// laid out alike in every version): tells a unid datagram of another version, worth an
/// answer, from garbage. Checks nothing else.
pub fn peek_version(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [m0, m1, version, ..] if [*m0, *m1] == MAGIC => Some(*version),
        _ => None,
    }
}

/// Reads and checks the header: length bounds, magic, version, type, flags,
/// total length and seq. Does not check the CRC, the tag or the payload, so
/// it is cheap enough to route or count datagrams before [`decode`]; never
/// act on a peeked header alone.
pub fn peek_header(datagram: &[u8]) -> Result<PeekedHeader, DecodeError> {
    let len = datagram.len();
    if len < DATAGRAM_BYTES_MIN {
        return Err(DecodeError::TooShort { len });
    }
    if len > DATAGRAM_BYTES_MAX {
        return Err(DecodeError::TooLong { len });
    }
    let magic = [datagram[0], datagram[1]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    if datagram[2] != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            version: datagram[2],
        });
    }
    let message_type = MessageType::from_u8(datagram[3]).ok_or(DecodeError::UnknownType {
        message_type: datagram[3],
    })?;
    let flags = read_u16(datagram, 4);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DecodeError::UnknownFlags { flags });
    }
    let authenticated = flags & FLAG_AUTH != 0;
    let payload_bytes = read_u16(datagram, 6);
    let expected = HEADER_BYTES
        + payload_bytes as usize
        + CRC_BYTES
        + if authenticated { TAG_BYTES } else { 0 };
    if expected != len {
        return Err(DecodeError::LengthMismatch {
            expected,
            actual: len,
        });
    }
    let header = Header {
        sender: read_u64(datagram, 8),
        seq: read_u64(datagram, 16),
        reply_to: read_u64(datagram, 24),
        epoch: read_u64(datagram, 32),
    };
    if header.seq == 0 {
        return Err(DecodeError::ZeroSeq);
    }
    Ok(PeekedHeader {
        message_type,
        authenticated,
        payload_bytes,
        header,
        cluster: read_u64(datagram, 40),
    })
}

/// Checks and decodes one datagram. `key` is the cluster key if this node
/// has one (see the module docs for the authentication rule).
///
/// Never panics; allocates only to describe a FlatBuffers verification
/// failure (bounded by the verifier's depth limit).
pub fn decode<'a>(datagram: &'a [u8], key: Option<&AuthKey>) -> Result<Frame<'a>, DecodeError> {
    let peeked = peek_header(datagram)?;
    let body_end = HEADER_BYTES + peeked.payload_bytes as usize;
    let mut crc = [0u8; CRC_BYTES];
    crc.copy_from_slice(&datagram[body_end..body_end + CRC_BYTES]);
    let found = u32::from_le_bytes(crc);
    let computed = crc32fast::hash(&datagram[..body_end]);
    if computed != found {
        return Err(DecodeError::BadCrc { computed, found });
    }
    match (key, peeked.authenticated) {
        (Some(key), true) => {
            let tag = &datagram[body_end + CRC_BYTES..];
            if !key.verify(&datagram[..body_end], tag) {
                return Err(DecodeError::BadTag);
            }
        }
        (Some(_), false) => return Err(DecodeError::MissingTag),
        (None, true) => return Err(DecodeError::UnexpectedTag),
        (None, false) => {}
    }
    let payload = &datagram[HEADER_BYTES..body_end];
    let message = decode_payload(peeked.message_type, payload)?;
    message.validate()?;
    Ok(Frame {
        header: peeked.header,
        cluster: peeked.cluster,
        authenticated: peeked.authenticated,
        message,
    })
}

fn root<'a, T>(payload: &'a [u8]) -> Result<T::Inner, DecodeError>
where
    T: flatbuffers::Follow<'a> + flatbuffers::Verifiable + 'a,
{
    flatbuffers::root_with_opts::<T>(&VERIFIER_OPTIONS, payload).map_err(DecodeError::Verify)
}

fn servers<'a>(
    v: Option<flatbuffers::Vector<'a, fb::ServerEntry>>,
) -> Result<List<'a, Server>, FieldError> {
    List::check_wire(v.map(WireVec::Servers), "servers", SERVERS_MAX)
}

fn decode_payload(t: MessageType, p: &[u8]) -> Result<Message<'_>, DecodeError> {
    use MessageType as T;
    let m = match t {
        T::Ping => {
            let m = root::<fb::Ping>(p)?;
            Message::Ping {
                sent_us: m.sent_us(),
            }
        }
        T::Pong => {
            let m = root::<fb::Pong>(p)?;
            Message::Pong {
                echo_us: m.echo_us(),
                lease_ms: m.lease_ms(),
            }
        }
        T::Hello => {
            let m = root::<fb::Hello>(p)?;
            Message::Hello {
                role: NodeRole::from_wire(m.role().0)?,
                incarnation: m.incarnation(),
                name: m.name(),
                listen: m
                    .listen()
                    .map(|e| endpoint_from_fb(e, "hello listen"))
                    .transpose()?,
                backup_of: m.backup_of(),
                versions: m.versions().map_or(HELLO_VERSIONS_ABSENT, |v| Versions {
                    min: v.min(),
                    max: v.max(),
                }),
                software: m.software().unwrap_or(""),
            }
        }
        T::Welcome => {
            let m = root::<fb::Welcome>(p)?;
            Message::Welcome {
                node_id: m.node_id(),
                lease_ms: m.lease_ms(),
                servers: servers(m.servers())?,
                truncated: m.truncated(),
            }
        }
        T::BlockRequest => {
            let m = root::<fb::BlockRequest>(p)?;
            Message::BlockRequest {
                sequence: m.sequence(),
                count: m.count(),
            }
        }
        T::BlockGrant => {
            let m = root::<fb::BlockGrant>(p)?;
            let width = width_from_wire("block grant width", m.width())?;
            let first = u128_from_fb(m.first());
            let count = m.count();
            if count == 0 {
                return Err(FieldError::ZeroCount {
                    field: "block grant count",
                }
                .into());
            }
            let block = Block::new(first, count, width).ok_or(FieldError::BlockOutOfRange {
                first,
                count,
                width,
            })?;
            Message::BlockGrant {
                sequence: m.sequence(),
                width,
                block,
            }
        }
        T::NotLeader => {
            let m = root::<fb::NotLeader>(p)?;
            Message::NotLeader {
                leader_id: m.leader_id(),
                leader: m
                    .leader()
                    .map(|e| endpoint_from_fb(e, "not leader leader"))
                    .transpose()?,
                servers: servers(m.servers())?,
                truncated: m.truncated(),
            }
        }
        T::Error => {
            let m = root::<fb::Error>(p)?;
            Message::Error {
                code: ErrorCode::from_wire(m.code().0)?,
                sequence: m.sequence(),
                retry_after_ms: m.retry_after_ms(),
                text: m.text().unwrap_or(""),
            }
        }
        T::NodeTableRequest => {
            let m = root::<fb::NodeTableRequest>(p)?;
            Message::NodeTableRequest { page: m.page() }
        }
        T::NodeTable => {
            let m = root::<fb::NodeTable>(p)?;
            Message::NodeTable {
                version: m.version(),
                page: m.page(),
                page_count: m.page_count(),
                nodes: List::check_wire(
                    m.nodes().map(WireVec::Nodes),
                    "nodes",
                    NODE_TABLE_PAGE_MAX,
                )?,
            }
        }
        T::LeaderChange => {
            let m = root::<fb::LeaderChange>(p)?;
            Message::LeaderChange {
                leader_id: m.leader_id(),
                leader: endpoint_from_fb(m.leader(), "leader change leader")?,
                servers: servers(m.servers())?,
                truncated: m.truncated(),
            }
        }
        T::SequenceCreate => {
            let m = root::<fb::SequenceCreate>(p)?;
            Message::SequenceCreate {
                name: m.name(),
                width: width_from_wire("sequence create width", m.width())?,
                start: m.start().map_or(1, u128_from_fb),
            }
        }
        T::SequenceDescribe => {
            let m = root::<fb::SequenceDescribe>(p)?;
            Message::SequenceDescribe { name: m.name() }
        }
        T::SequenceList => {
            let m = root::<fb::SequenceList>(p)?;
            Message::SequenceList { after: m.after() }
        }
        T::SequenceInfo => {
            let m = root::<fb::SequenceInfo>(p)?;
            Message::SequenceInfo {
                name: m.name(),
                width: width_from_wire("sequence info width", m.width())?,
                start: u128_from_fb(m.start()),
                next: u128_from_fb(m.next()),
                ceiling: u128_from_fb(m.ceiling()),
            }
        }
        T::SequenceListReply => {
            let m = root::<fb::SequenceListReply>(p)?;
            Message::SequenceListReply {
                names: List::check_wire(m.names().map(WireVec::Names), "names", SEQUENCE_LIST_MAX)?,
                more: m.more(),
            }
        }
        T::StatusRequest => {
            let m = root::<fb::StatusRequest>(p)?;
            Message::StatusRequest {
                sequences_after: m.sequences_after(),
            }
        }
        T::StatusReply => {
            let m = root::<fb::StatusReply>(p)?;
            Message::StatusReply {
                leader_id: m.leader_id(),
                term: m.term(),
                servers: List::check_wire(
                    m.servers().map(WireVec::ServerStatus),
                    "servers",
                    SERVERS_MAX,
                )?,
                sequences: List::check_wire(
                    m.sequences().map(WireVec::SequenceStatus),
                    "sequences",
                    STATUS_SEQUENCES_MAX,
                )?,
                more: m.more(),
            }
        }
        T::AddServer => {
            let m = root::<fb::AddServer>(p)?;
            Message::AddServer {
                id: m.id(),
                raft: endpoint_from_fb(m.raft(), "add server raft")?,
                listen: endpoint_from_fb(m.listen(), "add server listen")?,
            }
        }
        T::RemoveServer => {
            let m = root::<fb::RemoveServer>(p)?;
            Message::RemoveServer { id: m.id() }
        }
        T::Membership => {
            let m = root::<fb::Membership>(p)?;
            Message::Membership {
                voters: servers(m.voters())?,
                truncated: m.truncated(),
            }
        }
        T::VersionMismatch => {
            let m = root::<fb::VersionMismatch>(p)?;
            let v = |v: &fb::Versions| Versions {
                min: v.min(),
                max: v.max(),
            };
            Message::VersionMismatch {
                versions: v(m.versions()),
                offered: v(m.offered()),
                software: m.software().unwrap_or(""),
            }
        }
    };
    Ok(m)
}

/// Encodes messages into datagrams, reusing one FlatBuffers builder so the
/// steady state allocates nothing. One per thread; cheap to keep around.
pub struct Codec {
    fbb: FlatBufferBuilder<'static>,
    cluster: ClusterId,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new()
    }
}

impl core::fmt::Debug for Codec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Codec")
    }
}

impl Codec {
    /// A codec with a builder sized for the largest datagram.
    pub fn new() -> Codec {
        Codec {
            fbb: FlatBufferBuilder::with_capacity(2 * DATAGRAM_BYTES_MAX),
            cluster: 0,
        }
    }

    /// Sets the cluster id stamped on every datagram encoded from now on
    /// (0, the default: not known yet).
    pub fn set_cluster(&mut self, cluster: ClusterId) {
        self.cluster = cluster;
    }

    /// The cluster id this codec stamps.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    /// Encodes `message` with `header` into `out` and returns the datagram's
    /// length (`out[..len]` is the datagram). With `Some(key)` the datagram
    /// carries the AUTH flag and a tag.
    ///
    /// Checks the message's limits first ([`Message::validate`]), so whatever
    /// encodes also decodes. `out` needs at most [`DATAGRAM_BYTES_MAX`]
    /// bytes.
    pub fn encode(
        &mut self,
        header: &Header,
        message: &Message<'_>,
        key: Option<&AuthKey>,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        if header.seq == 0 {
            return Err(EncodeError::ZeroSeq);
        }
        message.validate()?;
        self.fbb.reset();
        build_payload(&mut self.fbb, message);
        let payload = self.fbb.finished_data();
        let body_end = HEADER_BYTES + payload.len();
        let len = body_end + CRC_BYTES + if key.is_some() { TAG_BYTES } else { 0 };
        if len > DATAGRAM_BYTES_MAX {
            return Err(EncodeError::TooLarge { len });
        }
        if len > out.len() {
            return Err(EncodeError::BufferTooSmall {
                len,
                capacity: out.len(),
            });
        }
        let out = &mut out[..len];
        let flags = if key.is_some() { FLAG_AUTH } else { 0 };
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = message.message_type().as_u8();
        out[4..6].copy_from_slice(&flags.to_le_bytes());
        // Fits: len <= DATAGRAM_BYTES_MAX <= u16::MAX.
        out[6..8].copy_from_slice(&(payload.len() as u16).to_le_bytes());
        out[8..16].copy_from_slice(&header.sender.to_le_bytes());
        out[16..24].copy_from_slice(&header.seq.to_le_bytes());
        out[24..32].copy_from_slice(&header.reply_to.to_le_bytes());
        out[32..40].copy_from_slice(&header.epoch.to_le_bytes());
        out[40..48].copy_from_slice(&self.cluster.to_le_bytes());
        out[HEADER_BYTES..body_end].copy_from_slice(payload);
        let crc = crc32fast::hash(&out[..body_end]);
        out[body_end..body_end + CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
        if let Some(key) = key {
            let tag = key.tag(&out[..body_end]);
            out[body_end + CRC_BYTES..].copy_from_slice(&tag);
        }
        Ok(len)
    }
}

fn opt_endpoint(addr: Option<SocketAddr>) -> Option<fb::Endpoint> {
    addr.map(|a| endpoint_to_fb(&a))
}

/// Pushes a vector of structs without a temporary allocation.
fn struct_vector<'a, 'b, T, S>(
    fbb: &mut FlatBufferBuilder<'static>,
    list: &List<'a, T>,
    convert: impl Fn(&T) -> S,
) -> Option<WIPOffset<flatbuffers::Vector<'b, S>>>
where
    T: ListItem<'a>,
    S: flatbuffers::Push + 'static,
{
    if list.is_empty() {
        return None;
    }
    fbb.start_vector::<S>(list.len());
    for i in (0..list.len()).rev() {
        if let Some(item) = list.get(i) {
            fbb.push(convert(&item));
        }
    }
    Some(fbb.end_vector(list.len()))
}

fn servers_vector<'b>(
    fbb: &mut FlatBufferBuilder<'static>,
    list: &List<'_, Server>,
) -> Option<WIPOffset<flatbuffers::Vector<'b, fb::ServerEntry>>> {
    struct_vector(fbb, list, |s| {
        fb::ServerEntry::new(s.id, &endpoint_to_fb(&s.addr))
    })
}

fn build_payload(fbb: &mut FlatBufferBuilder<'static>, message: &Message<'_>) {
    match *message {
        Message::Ping { sent_us } => {
            let root = fb::Ping::create(fbb, &fb::PingArgs { sent_us });
            fbb.finish_minimal(root);
        }
        Message::Pong { echo_us, lease_ms } => {
            let root = fb::Pong::create(fbb, &fb::PongArgs { echo_us, lease_ms });
            fbb.finish_minimal(root);
        }
        Message::Hello {
            role,
            incarnation,
            name,
            listen,
            backup_of,
            versions,
            software,
        } => {
            let name = fbb.create_string(name);
            let software = (!software.is_empty()).then(|| fbb.create_string(software));
            let listen = opt_endpoint(listen);
            let versions = fb::Versions::new(versions.min, versions.max);
            let root = fb::Hello::create(
                fbb,
                &fb::HelloArgs {
                    role: fb::NodeRole(role as u8),
                    incarnation,
                    name: Some(name),
                    listen: listen.as_ref(),
                    backup_of,
                    versions: Some(&versions),
                    software,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::Welcome {
            node_id,
            lease_ms,
            servers,
            truncated,
        } => {
            let servers = servers_vector(fbb, &servers);
            let root = fb::Welcome::create(
                fbb,
                &fb::WelcomeArgs {
                    node_id,
                    lease_ms,
                    servers,
                    truncated,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::BlockRequest { sequence, count } => {
            let sequence = fbb.create_string(sequence);
            let root = fb::BlockRequest::create(
                fbb,
                &fb::BlockRequestArgs {
                    sequence: Some(sequence),
                    count,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::BlockGrant {
            sequence,
            width,
            block,
        } => {
            let sequence = fbb.create_string(sequence);
            let first = u128_to_fb(block.first());
            let root = fb::BlockGrant::create(
                fbb,
                &fb::BlockGrantArgs {
                    sequence: Some(sequence),
                    width: width.bytes(),
                    first: Some(&first),
                    count: block.count(),
                },
            );
            fbb.finish_minimal(root);
        }
        Message::NotLeader {
            leader_id,
            leader,
            servers,
            truncated,
        } => {
            let servers = servers_vector(fbb, &servers);
            let leader = opt_endpoint(leader);
            let root = fb::NotLeader::create(
                fbb,
                &fb::NotLeaderArgs {
                    leader_id,
                    leader: leader.as_ref(),
                    servers,
                    truncated,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::Error {
            code,
            sequence,
            retry_after_ms,
            text,
        } => {
            let sequence = sequence.map(|s| fbb.create_string(s));
            let text = (!text.is_empty()).then(|| fbb.create_string(text));
            let root = fb::Error::create(
                fbb,
                &fb::ErrorArgs {
                    code: fb::ErrorCode(code as u8),
                    sequence,
                    retry_after_ms,
                    text,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::NodeTableRequest { page } => {
            let root = fb::NodeTableRequest::create(fbb, &fb::NodeTableRequestArgs { page });
            fbb.finish_minimal(root);
        }
        Message::NodeTable {
            version,
            page,
            page_count,
            nodes,
        } => {
            let nodes = struct_vector(fbb, &nodes, |n| {
                fb::NodeEntry::new(n.id, &endpoint_to_fb(&n.addr), fb::NodeRole(n.role as u8))
            });
            let root = fb::NodeTable::create(
                fbb,
                &fb::NodeTableArgs {
                    version,
                    page,
                    page_count,
                    nodes,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::LeaderChange {
            leader_id,
            leader,
            servers,
            truncated,
        } => {
            let servers = servers_vector(fbb, &servers);
            let leader = endpoint_to_fb(&leader);
            let root = fb::LeaderChange::create(
                fbb,
                &fb::LeaderChangeArgs {
                    leader_id,
                    leader: Some(&leader),
                    servers,
                    truncated,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::SequenceCreate { name, width, start } => {
            let name = fbb.create_string(name);
            let start = u128_to_fb(start);
            let root = fb::SequenceCreate::create(
                fbb,
                &fb::SequenceCreateArgs {
                    name: Some(name),
                    width: width.bytes(),
                    start: Some(&start),
                },
            );
            fbb.finish_minimal(root);
        }
        Message::SequenceDescribe { name } => {
            let name = fbb.create_string(name);
            let root =
                fb::SequenceDescribe::create(fbb, &fb::SequenceDescribeArgs { name: Some(name) });
            fbb.finish_minimal(root);
        }
        Message::SequenceList { after } => {
            let after = after.map(|s| fbb.create_string(s));
            let root = fb::SequenceList::create(fbb, &fb::SequenceListArgs { after });
            fbb.finish_minimal(root);
        }
        Message::SequenceInfo {
            name,
            width,
            start,
            next,
            ceiling,
        } => {
            let name = fbb.create_string(name);
            let (start, next, ceiling) = (u128_to_fb(start), u128_to_fb(next), u128_to_fb(ceiling));
            let root = fb::SequenceInfo::create(
                fbb,
                &fb::SequenceInfoArgs {
                    name: Some(name),
                    width: width.bytes(),
                    start: Some(&start),
                    next: Some(&next),
                    ceiling: Some(&ceiling),
                },
            );
            fbb.finish_minimal(root);
        }
        Message::SequenceListReply { names, more } => {
            let mut offsets = [WIPOffset::new(0); SEQUENCE_LIST_MAX];
            let n = names.len().min(SEQUENCE_LIST_MAX);
            for (slot, name) in offsets.iter_mut().zip(names.iter()) {
                *slot = fbb.create_string(name);
            }
            let names = (n > 0).then(|| fbb.create_vector(&offsets[..n]));
            let root =
                fb::SequenceListReply::create(fbb, &fb::SequenceListReplyArgs { names, more });
            fbb.finish_minimal(root);
        }
        Message::StatusRequest { sequences_after } => {
            let sequences_after = sequences_after.map(|s| fbb.create_string(s));
            let root = fb::StatusRequest::create(fbb, &fb::StatusRequestArgs { sequences_after });
            fbb.finish_minimal(root);
        }
        Message::StatusReply {
            leader_id,
            term,
            servers,
            sequences,
            more,
        } => {
            let mut offsets = [WIPOffset::new(0); STATUS_SEQUENCES_MAX];
            let n = sequences.len().min(STATUS_SEQUENCES_MAX);
            for (slot, s) in offsets.iter_mut().zip(sequences.iter()) {
                let name = fbb.create_string(s.name);
                let (ceiling, remaining) = (u128_to_fb(s.ceiling), u128_to_fb(s.remaining));
                *slot = fb::SequenceStatus::create(
                    fbb,
                    &fb::SequenceStatusArgs {
                        name: Some(name),
                        width: s.width.bytes(),
                        ceiling: Some(&ceiling),
                        remaining: Some(&remaining),
                    },
                );
            }
            let sequences = (n > 0).then(|| fbb.create_vector(&offsets[..n]));
            let servers = struct_vector(fbb, &servers, |s| {
                fb::ServerStatus::new(
                    s.id,
                    &endpoint_to_fb(&s.addr),
                    fb::RaftRole(s.role as u8),
                    s.term,
                    fb::Health(s.health as u8),
                )
            });
            let root = fb::StatusReply::create(
                fbb,
                &fb::StatusReplyArgs {
                    leader_id,
                    term,
                    servers,
                    sequences,
                    more,
                },
            );
            fbb.finish_minimal(root);
        }
        Message::AddServer { id, raft, listen } => {
            let (raft, listen) = (endpoint_to_fb(&raft), endpoint_to_fb(&listen));
            let root = fb::AddServer::create(
                fbb,
                &fb::AddServerArgs {
                    id,
                    raft: Some(&raft),
                    listen: Some(&listen),
                },
            );
            fbb.finish_minimal(root);
        }
        Message::RemoveServer { id } => {
            let root = fb::RemoveServer::create(fbb, &fb::RemoveServerArgs { id });
            fbb.finish_minimal(root);
        }
        Message::Membership { voters, truncated } => {
            let voters = servers_vector(fbb, &voters);
            let root = fb::Membership::create(fbb, &fb::MembershipArgs { voters, truncated });
            fbb.finish_minimal(root);
        }
        Message::VersionMismatch {
            versions,
            offered,
            software,
        } => {
            let software = (!software.is_empty()).then(|| fbb.create_string(software));
            let versions = fb::Versions::new(versions.min, versions.max);
            let offered = fb::Versions::new(offered.min, offered.max);
            let root = fb::VersionMismatch::create(
                fbb,
                &fb::VersionMismatchArgs {
                    versions: Some(&versions),
                    offered: Some(&offered),
                    software,
                },
            );
            fbb.finish_minimal(root);
        }
    }
}

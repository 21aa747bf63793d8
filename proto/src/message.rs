//! The messages: one variant of [`Message`] per [`MessageType`], holding
//! typed, validated values. Strings and lists borrow from the datagram they
//! were decoded from (or from the caller, when encoding), so decoding a
//! message allocates nothing.
//!
//! Field meanings are documented in `proto/schema/unid.fbs`; the doc of each
//! variant here repeats the essentials and the limits.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flatbuffers::{ForwardsUOffset, Vector};
use unid_proto_fbs as fb;

use crate::types::{Block, Epoch, Id, NameError, NodeId, SequenceName, Width};

/// Most servers a [`Message::NotLeader`], [`Message::Welcome`],
/// [`Message::LeaderChange`] or [`Message::StatusReply`] carries; with more,
/// the sender sets `truncated` and the receiver asks for the node table.
pub const SERVERS_MAX: usize = 16;

/// Most nodes one [`Message::NodeTable`] page carries.
pub const NODE_TABLE_PAGE_MAX: usize = 16;

/// Most names one [`Message::SequenceListReply`] carries.
pub const SEQUENCE_LIST_MAX: usize = 16;

/// Most sequences one [`Message::StatusReply`] carries (fewer if they do not
/// fit the datagram).
pub const STATUS_SEQUENCES_MAX: usize = 8;

/// Longest [`Message::Error`] text, in bytes.
pub const ERROR_TEXT_BYTES_MAX: usize = 128;

/// Longest software string ([`Message::Hello`], [`Message::VersionMismatch`]), in bytes.
pub const SOFTWARE_BYTES_MAX: usize = 64;

/// A range of protocol versions a node speaks: every version from `min` to `max`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Versions {
    /// The oldest version spoken (at least 1).
    pub min: u8,
    /// The newest version spoken (at least `min`).
    pub max: u8,
}

impl Versions {
    /// The one version `v`.
    pub const fn only(v: u8) -> Versions {
        Versions { min: v, max: v }
    }

    /// Whether `v` is in the range.
    pub const fn contains(&self, v: u8) -> bool {
        self.min <= v && v <= self.max
    }

    /// Whether the two ranges share a version.
    pub const fn overlaps(&self, other: &Versions) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl core::fmt::Display for Versions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// The stable number of each message type, carried in byte 3 of the header.
///
/// Numbers are never reused; `0` is never a message type.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// [`Message::Ping`].
    Ping = 1,
    /// [`Message::Pong`].
    Pong = 2,
    /// [`Message::Hello`].
    Hello = 3,
    /// [`Message::Welcome`].
    Welcome = 4,
    /// [`Message::BlockRequest`].
    BlockRequest = 5,
    /// [`Message::BlockGrant`].
    BlockGrant = 6,
    /// [`Message::NotLeader`].
    NotLeader = 7,
    /// [`Message::Error`].
    Error = 8,
    /// [`Message::NodeTableRequest`].
    NodeTableRequest = 9,
    /// [`Message::NodeTable`].
    NodeTable = 10,
    /// [`Message::LeaderChange`].
    LeaderChange = 11,
    /// [`Message::SequenceCreate`].
    SequenceCreate = 12,
    /// [`Message::SequenceDescribe`].
    SequenceDescribe = 13,
    /// [`Message::SequenceList`].
    SequenceList = 14,
    /// [`Message::SequenceInfo`].
    SequenceInfo = 15,
    /// [`Message::SequenceListReply`].
    SequenceListReply = 16,
    /// [`Message::StatusRequest`].
    StatusRequest = 17,
    /// [`Message::StatusReply`].
    StatusReply = 18,
    /// [`Message::AddServer`].
    AddServer = 19,
    /// [`Message::RemoveServer`].
    RemoveServer = 20,
    /// [`Message::Membership`].
    Membership = 21,
    /// [`Message::VersionMismatch`].
    VersionMismatch = 22,
}

impl MessageType {
    /// Every message type, in number order.
    pub const ALL: [MessageType; 22] = [
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::BlockRequest,
        MessageType::BlockGrant,
        MessageType::NotLeader,
        MessageType::Error,
        MessageType::NodeTableRequest,
        MessageType::NodeTable,
        MessageType::LeaderChange,
        MessageType::SequenceCreate,
        MessageType::SequenceDescribe,
        MessageType::SequenceList,
        MessageType::SequenceInfo,
        MessageType::SequenceListReply,
        MessageType::StatusRequest,
        MessageType::StatusReply,
        MessageType::AddServer,
        MessageType::RemoveServer,
        MessageType::Membership,
        MessageType::VersionMismatch,
    ];

    /// The message type with this number, or `None`.
    pub const fn from_u8(value: u8) -> Option<MessageType> {
        if value >= 1 && value as usize <= MessageType::ALL.len() {
            Some(MessageType::ALL[value as usize - 1])
        } else {
            None
        }
    }

    /// The number carried on the wire.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Why a message's content is invalid: a field out of range, a bad name, a
/// list too long. Both decoding (the datagram was malformed) and encoding
/// (the caller built a message that would be) report these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A width is not 2, 4, 8 or 16 bytes.
    #[error("{field}: width {bytes} is not 2, 4, 8 or 16")]
    BadWidth {
        /// The field.
        field: &'static str,
        /// The value found.
        bytes: u8,
    },
    /// A count of ids is 0.
    #[error("{field}: count is 0")]
    ZeroCount {
        /// The field.
        field: &'static str,
    },
    /// A block of ids reaches its width's reserved limit.
    #[error("block of {count} ids from {first} reaches the limit of width {width}")]
    BlockOutOfRange {
        /// The first id.
        first: Id,
        /// The count.
        count: u64,
        /// The width.
        width: Width,
    },
    /// An id or id bound is out of its width's range, or bounds are out of
    /// order (a sequence's `start <= next <= ceiling <= limit`).
    #[error("{field}: id out of range for its width or bounds out of order")]
    IdOutOfRange {
        /// The field.
        field: &'static str,
    },
    /// A sequence or node name breaks the name rules.
    #[error("{field}: {source}")]
    BadName {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        source: NameError,
    },
    /// An enum field holds 0 (`Unspecified`) or a value this version does not
    /// know.
    #[error("{field}: unknown enum value {value}")]
    BadEnum {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u8,
    },
    /// A list holds more items than its limit.
    #[error("{field}: {len} items, more than the {max} allowed")]
    ListTooLong {
        /// The field.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An endpoint's family is neither 4 nor 6, an IPv4 address has bits
    /// above 32, or its port is 0.
    #[error("{field}: bad endpoint")]
    BadAddress {
        /// The field.
        field: &'static str,
    },
    /// A node id that must name a node is 0.
    #[error("{field}: node id is 0")]
    ZeroNodeId {
        /// The field.
        field: &'static str,
    },
    /// A node table page index is not below the page count, or the count is 0.
    #[error("node table page {page} of {page_count}")]
    BadPage {
        /// The page index.
        page: u16,
        /// The page count.
        page_count: u16,
    },
    /// An error text is longer than [`ERROR_TEXT_BYTES_MAX`].
    #[error("error text is {len} bytes, more than the {ERROR_TEXT_BYTES_MAX} allowed")]
    TextTooLong {
        /// The length found.
        len: usize,
    },
    /// A version range has `min` 0 or above `max`.
    #[error("{field}: versions {min}..={max} are not a range of versions from 1")]
    BadVersions {
        /// The field.
        field: &'static str,
        /// The range's start found.
        min: u8,
        /// The range's end found.
        max: u8,
    },
    /// A software string is longer than [`SOFTWARE_BYTES_MAX`] or has a byte that is not
    /// printable ASCII.
    #[error("{field}: {len} bytes, not at most {SOFTWARE_BYTES_MAX} bytes of printable ASCII")]
    BadSoftware {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

/// What a node is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NodeRole {
    /// A cluster server.
    Server = 1,
    /// An agent on an application host.
    Agent = 2,
    /// A client library talking to the cluster directly.
    Client = 3,
    /// An operator tool.
    Admin = 4,
}

/// A server's role in the Raft group.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RaftRole {
    /// Follows a leader.
    Follower = 1,
    /// Campaigning.
    Candidate = 2,
    /// The leader.
    Leader = 3,
    /// Non-voting replica.
    Learner = 4,
}

/// A server's health as the reporting server sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Health {
    /// Answering and up to date.
    Healthy = 1,
    /// Answering but behind.
    Degraded = 2,
    /// Not answering.
    Unreachable = 3,
}

/// Why a request failed ([`Message::Error`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// No sequence has this name.
    UnknownSequence = 1,
    /// The sequence has no ids left.
    Exhausted = 2,
    /// Not ready yet (no leader, ceiling not persisted); retry later.
    NotReady = 3,
    /// Too many requests; retry after `retry_after_ms`.
    RateLimited = 4,
    /// Well formed but meaningless request.
    BadRequest = 5,
    /// The sender may not do this.
    Unauthorized = 6,
    /// A sequence with this name already exists.
    AlreadyExists = 7,
    /// The sender is not registered: send [`Message::Hello`].
    NotRegistered = 8,
    /// The server failed internally.
    Internal = 9,
    /// The request's seq was answered already and that answer is no longer
    /// cached: send it again under a new seq (a copy of an answered request
    /// never gets a second block; see [`ReplayWindow`](crate::ReplayWindow)).
    Replayed = 10,
}

macro_rules! wire_enum {
    ($ty:ident, $field:literal, [$($v:ident),+]) => {
        impl $ty {
            /// The value with this wire number, or `None` (0 and unknown values).
            pub const fn from_u8(value: u8) -> Option<$ty> {
                $(if value == $ty::$v as u8 { return Some($ty::$v); })+
                None
            }

            pub(crate) fn from_wire(value: u8) -> Result<$ty, FieldError> {
                $ty::from_u8(value).ok_or(FieldError::BadEnum { field: $field, value })
            }
        }
    };
}
wire_enum!(NodeRole, "role", [Server, Agent, Client, Admin]);
wire_enum!(
    RaftRole,
    "raft role",
    [Follower, Candidate, Leader, Learner]
);
wire_enum!(Health, "health", [Healthy, Degraded, Unreachable]);
wire_enum!(
    ErrorCode,
    "error code",
    [
        UnknownSequence,
        Exhausted,
        NotReady,
        RateLimited,
        BadRequest,
        Unauthorized,
        AlreadyExists,
        NotRegistered,
        Internal,
        Replayed
    ]
);

/// A server in a list of servers.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Server {
    /// Its node id (never 0).
    pub id: NodeId,
    /// Where it listens. IPv6 flow info and scope id are not carried.
    pub addr: SocketAddr,
}

/// A node of the node table.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    /// Its node id (never 0).
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it is.
    pub role: NodeRole,
}

/// One server's line in a [`Message::StatusReply`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerStatus {
    /// Its node id (never 0).
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its Raft role.
    pub role: RaftRole,
    /// The Raft term it last reported.
    pub term: Epoch,
    /// Its health.
    pub health: Health,
}

/// One sequence's line in a [`Message::StatusReply`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SequenceStatus<'a> {
    /// The sequence's name (valid per [`SequenceName`] rules).
    pub name: &'a str,
    /// Its width.
    pub width: Width,
    /// The persisted ceiling (at most the width's limit).
    pub ceiling: Id,
    /// How many ids it can still issue (at most the width's limit).
    pub remaining: Id,
}

mod sealed {
    use super::{FieldError, ForwardsUOffset, Vector, fb};

    /// A list read from the wire: one variant per list item type, so that
    /// [`super::List`] stays covariant in its lifetime.
    #[derive(Copy, Clone)]
    pub enum WireVec<'a> {
        Servers(Vector<'a, fb::ServerEntry>),
        Nodes(Vector<'a, fb::NodeEntry>),
        ServerStatus(Vector<'a, fb::ServerStatus>),
        SequenceStatus(Vector<'a, ForwardsUOffset<fb::SequenceStatus<'a>>>),
        Names(Vector<'a, ForwardsUOffset<&'a str>>),
    }

    impl WireVec<'_> {
        pub fn len(&self) -> usize {
            match self {
                WireVec::Servers(v) => v.len(),
                WireVec::Nodes(v) => v.len(),
                WireVec::ServerStatus(v) => v.len(),
                WireVec::SequenceStatus(v) => v.len(),
                WireVec::Names(v) => v.len(),
            }
        }
    }

    pub trait Sealed<'a>: Sized {
        /// Converts and checks item `index` (below `wire.len()`); `None` if
        /// the list holds another item type.
        fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>>;
    }
}

pub(crate) use sealed::WireVec;

/// A type that can be an item of a [`List`]. Sealed: implemented by
/// [`Server`], [`Node`], [`ServerStatus`], [`SequenceStatus`] and `&str`
/// (a sequence name).
pub trait ListItem<'a>: Copy + sealed::Sealed<'a> + 'a {}

/// A bounded list inside a message: either a slice the caller built (to
/// encode) or a view into a decoded datagram (every item already checked
/// when the datagram was decoded, so iterating it never fails and never
/// allocates).
#[derive(Copy, Clone)]
pub struct List<'a, T> {
    repr: ListRepr<'a, T>,
}

#[derive(Copy, Clone)]
enum ListRepr<'a, T> {
    Slice(&'a [T]),
    Wire(WireVec<'a>),
}

impl<'a, T: ListItem<'a>> List<'a, T> {
    /// A list of these items.
    pub const fn new(items: &'a [T]) -> Self {
        List {
            repr: ListRepr::Slice(items),
        }
    }

    /// An empty list.
    pub const fn empty() -> Self {
        List::new(&[])
    }

    /// Checks the length of a decoded vector (before reading any item), then
    /// every item, and wraps it.
    pub(crate) fn check_wire(
        wire: Option<WireVec<'a>>,
        field: &'static str,
        max: usize,
    ) -> Result<Self, FieldError> {
        let Some(wire) = wire else {
            return Ok(List::empty());
        };
        check_len(field, wire.len(), max)?;
        for i in 0..wire.len() {
            match T::from_wire(wire, i) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(FieldError::ListTooLong {
                        field,
                        len: wire.len(),
                        max: 0,
                    });
                }
            }
        }
        Ok(List {
            repr: ListRepr::Wire(wire),
        })
    }

    /// How many items.
    pub fn len(&self) -> usize {
        match self.repr {
            ListRepr::Slice(s) => s.len(),
            ListRepr::Wire(v) => v.len(),
        }
    }

    /// Whether the list has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item at `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<T> {
        match self.repr {
            ListRepr::Slice(s) => s.get(index).copied(),
            ListRepr::Wire(v) => {
                if index < v.len() {
                    // Checked at decode; a failure here cannot happen and
                    // would only hide the item, never panic.
                    T::from_wire(v, index).and_then(Result::ok)
                } else {
                    None
                }
            }
        }
    }

    /// The items, in order.
    pub fn iter(&self) -> ListIter<'a, T> {
        ListIter {
            list: *self,
            next: 0,
        }
    }
}

impl<'a, T: ListItem<'a>> Default for List<'a, T> {
    fn default() -> Self {
        List::empty()
    }
}

impl<'a, T: ListItem<'a>> From<&'a [T]> for List<'a, T> {
    fn from(items: &'a [T]) -> Self {
        List::new(items)
    }
}

impl<'a, 'b, T: ListItem<'a> + PartialEq<U>, U: ListItem<'b>> PartialEq<List<'b, U>>
    for List<'a, T>
{
    fn eq(&self, other: &List<'b, U>) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl<'a, T: ListItem<'a> + Eq> Eq for List<'a, T> {}

impl<'a, T: ListItem<'a> + fmt::Debug> fmt::Debug for List<'a, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a, T: ListItem<'a>> IntoIterator for List<'a, T> {
    type Item = T;
    type IntoIter = ListIter<'a, T>;
    fn into_iter(self) -> ListIter<'a, T> {
        self.iter()
    }
}

/// Iterator over a [`List`].
pub struct ListIter<'a, T> {
    list: List<'a, T>,
    next: usize,
}

impl<'a, T: ListItem<'a>> Iterator for ListIter<'a, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        while self.next < self.list.len() {
            let i = self.next;
            self.next += 1;
            if let Some(item) = self.list.get(i) {
                return Some(item);
            }
        }
        None
    }
}

pub(crate) fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), FieldError> {
    if len > max {
        return Err(FieldError::ListTooLong { field, len, max });
    }
    Ok(())
}

// ------------------------------------------------------------ conversions ---

pub(crate) fn u128_to_fb(v: Id) -> fb::U128 {
    fb::U128::new(v as u64, (v >> 64) as u64)
}

pub(crate) fn u128_from_fb(v: &fb::U128) -> Id {
    (v.lo() as Id) | ((v.hi() as Id) << 64)
}

pub(crate) fn endpoint_to_fb(addr: &SocketAddr) -> fb::Endpoint {
    let (ip, family) = match addr.ip() {
        IpAddr::V4(ip) => (u32::from(ip) as u128, 4),
        IpAddr::V6(ip) => (u128::from(ip), 6),
    };
    fb::Endpoint::new(&u128_to_fb(ip), addr.port(), family)
}

pub(crate) fn endpoint_from_fb(
    e: &fb::Endpoint,
    field: &'static str,
) -> Result<SocketAddr, FieldError> {
    let ip = u128_from_fb(e.ip());
    let port = e.port();
    let bad = FieldError::BadAddress { field };
    if port == 0 {
        return Err(bad);
    }
    let ip = match e.family() {
        4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(ip).map_err(|_| bad.clone())?)),
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        _ => return Err(bad),
    };
    Ok(SocketAddr::new(ip, port))
}

pub(crate) fn width_from_wire(field: &'static str, bytes: u8) -> Result<Width, FieldError> {
    Width::from_bytes(bytes).ok_or(FieldError::BadWidth { field, bytes })
}

pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    SequenceName::check(name).map_err(|source| FieldError::BadName { field, source })
}

fn check_node_id(field: &'static str, id: NodeId) -> Result<(), FieldError> {
    if id == 0 {
        return Err(FieldError::ZeroNodeId { field });
    }
    Ok(())
}

fn check_addr(field: &'static str, addr: &SocketAddr) -> Result<(), FieldError> {
    if addr.port() == 0 {
        return Err(FieldError::BadAddress { field });
    }
    Ok(())
}

impl ListItem<'_> for Server {}
impl<'a> sealed::Sealed<'a> for Server {
    fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>> {
        match wire {
            WireVec::Servers(v) => Some(Server::from_fb(v.get(index))),
            _ => None,
        }
    }
}

impl Server {
    fn from_fb(e: &fb::ServerEntry) -> Result<Self, FieldError> {
        let server = Server {
            id: e.id(),
            addr: endpoint_from_fb(e.addr(), "server address")?,
        };
        server.check()?;
        Ok(server)
    }

    fn check(&self) -> Result<(), FieldError> {
        check_node_id("server id", self.id)?;
        check_addr("server address", &self.addr)
    }
}

impl ListItem<'_> for Node {}
impl<'a> sealed::Sealed<'a> for Node {
    fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>> {
        match wire {
            WireVec::Nodes(v) => Some(Node::from_fb(v.get(index))),
            _ => None,
        }
    }
}

impl Node {
    fn from_fb(e: &fb::NodeEntry) -> Result<Self, FieldError> {
        let node = Node {
            id: e.id(),
            addr: endpoint_from_fb(e.addr(), "node address")?,
            role: NodeRole::from_wire(e.role().0)?,
        };
        node.check()?;
        Ok(node)
    }

    fn check(&self) -> Result<(), FieldError> {
        check_node_id("node id", self.id)?;
        check_addr("node address", &self.addr)
    }
}

impl ListItem<'_> for ServerStatus {}
impl<'a> sealed::Sealed<'a> for ServerStatus {
    fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>> {
        match wire {
            WireVec::ServerStatus(v) => Some(ServerStatus::from_fb(v.get(index))),
            _ => None,
        }
    }
}

impl ServerStatus {
    fn from_fb(e: &fb::ServerStatus) -> Result<Self, FieldError> {
        let status = ServerStatus {
            id: e.id(),
            addr: endpoint_from_fb(e.addr(), "server address")?,
            role: RaftRole::from_wire(e.role().0)?,
            term: e.term(),
            health: Health::from_wire(e.health().0)?,
        };
        status.check()?;
        Ok(status)
    }

    fn check(&self) -> Result<(), FieldError> {
        check_node_id("server id", self.id)?;
        check_addr("server address", &self.addr)
    }
}

impl<'a> ListItem<'a> for SequenceStatus<'a> {}
impl<'a> sealed::Sealed<'a> for SequenceStatus<'a> {
    fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>> {
        match wire {
            WireVec::SequenceStatus(v) => Some(SequenceStatus::from_fb(v.get(index))),
            _ => None,
        }
    }
}

impl<'a> SequenceStatus<'a> {
    fn from_fb(e: fb::SequenceStatus<'a>) -> Result<Self, FieldError> {
        let status = SequenceStatus {
            name: e.name(),
            width: width_from_wire("sequence status width", e.width())?,
            ceiling: u128_from_fb(e.ceiling()),
            remaining: u128_from_fb(e.remaining()),
        };
        status.check()?;
        Ok(status)
    }

    fn check(&self) -> Result<(), FieldError> {
        check_name("sequence status name", self.name)?;
        let limit = self.width.limit();
        if self.ceiling > limit || self.remaining > limit {
            return Err(FieldError::IdOutOfRange {
                field: "sequence status",
            });
        }
        Ok(())
    }
}

impl<'a> ListItem<'a> for &'a str {}
impl<'a> sealed::Sealed<'a> for &'a str {
    fn from_wire(wire: WireVec<'a>, index: usize) -> Option<Result<Self, FieldError>> {
        match wire {
            WireVec::Names(v) => {
                let name = v.get(index);
                Some(check_name("sequence list name", name).map(|()| name))
            }
            _ => None,
        }
    }
}

// --------------------------------------------------------------- messages ---

/// A message: the payload of one datagram. Build one to encode it with
/// [`crate::Codec::encode`]; [`crate::decode`] returns one borrowing from the
/// datagram.
///
/// Every variant's limits are checked both when encoding (a violation is
/// [`crate::EncodeError::Field`]) and when decoding
/// ([`crate::DecodeError::Field`]), so whatever encodes also decodes to an
/// equal message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Heartbeat; renews the sender's registration. Answered by
    /// [`Message::Pong`].
    Ping {
        /// The sender's clock, in microseconds; echoed back.
        sent_us: u64,
    },
    /// Answer to [`Message::Ping`].
    Pong {
        /// The ping's `sent_us`.
        echo_us: u64,
        /// How long the registration now lasts without a ping (0: not
        /// registered).
        lease_ms: u32,
    },
    /// A node announces itself. Answered by [`Message::Welcome`] (or
    /// [`Message::VersionMismatch`] by a server that speaks none of its `versions`).
    Hello {
        /// What the sender is.
        role: NodeRole,
        /// Increases at every restart of the sender.
        incarnation: u64,
        /// The sender's name (sequence-name rules).
        name: &'a str,
        /// Where it accepts datagrams, if not their source address.
        listen: Option<SocketAddr>,
        /// The agent it stands in for, if a backup (never `Some(0)`).
        backup_of: Option<NodeId>,
        /// The protocol versions it speaks; a Hello without the field (unid 0.1.0)
        /// decodes as [`crate::HELLO_VERSIONS_ABSENT`].
        versions: Versions,
        /// Its software and version, e.g. `"unid 0.1.0"` (empty if not sent; at most
        /// [`SOFTWARE_BYTES_MAX`] bytes of printable ASCII).
        software: &'a str,
    },
    /// The sender of a [`Message::Hello`] is registered.
    Welcome {
        /// The node id assigned to it (never 0).
        node_id: NodeId,
        /// How long the registration lasts without a ping.
        lease_ms: u32,
        /// The servers (at most [`SERVERS_MAX`]).
        servers: List<'a, Server>,
        /// More servers exist: ask for the node table.
        truncated: bool,
    },
    /// An agent asks for a block of ids.
    BlockRequest {
        /// The sequence.
        sequence: &'a str,
        /// How many ids it wants (at least 1).
        count: u64,
    },
    /// The leader grants a block.
    BlockGrant {
        /// The sequence.
        sequence: &'a str,
        /// Its width.
        width: Width,
        /// The ids granted (valid for `width`).
        block: Block,
    },
    /// The receiver is not the leader.
    NotLeader {
        /// The leader's node id, 0 if unknown.
        leader_id: NodeId,
        /// The leader's endpoint, if known.
        leader: Option<SocketAddr>,
        /// The servers (at most [`SERVERS_MAX`]).
        servers: List<'a, Server>,
        /// More servers exist: ask for the node table.
        truncated: bool,
    },
    /// A request failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// The sequence concerned, if any.
        sequence: Option<&'a str>,
        /// When to retry, in milliseconds (0: sender decides).
        retry_after_ms: u32,
        /// A human-readable explanation, at most [`ERROR_TEXT_BYTES_MAX`]
        /// bytes; empty if none.
        text: &'a str,
    },
    /// Asks for a page of the node table.
    NodeTableRequest {
        /// The page, from 0.
        page: u16,
    },
    /// One page of the node table.
    NodeTable {
        /// Changes whenever the table changes; only combine pages of one
        /// version.
        version: u64,
        /// This page's index (below `page_count`).
        page: u16,
        /// How many pages (at least 1).
        page_count: u16,
        /// This page's nodes (at most [`NODE_TABLE_PAGE_MAX`]).
        nodes: List<'a, Node>,
    },
    /// "Go to this server now": the leader is quitting or has changed.
    LeaderChange {
        /// The server to use (never 0).
        leader_id: NodeId,
        /// Its endpoint.
        leader: SocketAddr,
        /// The servers (at most [`SERVERS_MAX`]).
        servers: List<'a, Server>,
        /// More servers exist: ask for the node table.
        truncated: bool,
    },
    /// Creates a sequence.
    SequenceCreate {
        /// Its name.
        name: &'a str,
        /// Its width.
        width: Width,
        /// The first id it will issue (below the width's limit).
        start: Id,
    },
    /// Asks for one sequence's state.
    SequenceDescribe {
        /// The sequence.
        name: &'a str,
    },
    /// Asks for sequence names after a cursor.
    SequenceList {
        /// Only names after this one.
        after: Option<&'a str>,
    },
    /// One sequence's state.
    SequenceInfo {
        /// The sequence.
        name: &'a str,
        /// Its width.
        width: Width,
        /// The first id it issued.
        start: Id,
        /// The lowest id not yet granted.
        next: Id,
        /// The persisted ceiling; `start <= next <= ceiling <= limit`.
        ceiling: Id,
    },
    /// Sequence names, in order.
    SequenceListReply {
        /// At most [`SEQUENCE_LIST_MAX`] names.
        names: List<'a, &'a str>,
        /// More follow: ask again after the last one.
        more: bool,
    },
    /// Asks for the cluster's status.
    StatusRequest {
        /// Only sequences named after this one.
        sequences_after: Option<&'a str>,
    },
    /// The cluster's status as one server sees it. The sender puts in what
    /// fits the datagram and sets `more`.
    StatusReply {
        /// The leader's node id, 0 if unknown.
        leader_id: NodeId,
        /// The current Raft term.
        term: Epoch,
        /// The servers (at most [`SERVERS_MAX`]).
        servers: List<'a, ServerStatus>,
        /// Sequences (at most [`STATUS_SEQUENCES_MAX`]).
        sequences: List<'a, SequenceStatus<'a>>,
        /// More sequences follow.
        more: bool,
    },
    /// Adds a server to the cluster (learner, then voter once caught up).
    AddServer {
        /// The new server's node id (never 0).
        id: NodeId,
        /// Its Raft (TCP) address.
        raft: SocketAddr,
        /// Its UDP address for agents and tools.
        listen: SocketAddr,
    },
    /// Removes a server from the cluster.
    RemoveServer {
        /// The server's node id (never 0).
        id: NodeId,
    },
    /// The voters after a membership change committed.
    Membership {
        /// The voters (at most [`SERVERS_MAX`]).
        voters: List<'a, Server>,
        /// More voters exist than `voters` holds.
        truncated: bool,
    },
    /// A server cannot serve the sender: its [`Message::Hello`] offered no version the
    /// server speaks, or its datagram's header carried one (then `reply_to` is 0). Always
    /// framed as protocol version 2, which every later version keeps able to decode.
    VersionMismatch {
        /// The versions the server speaks.
        versions: Versions,
        /// What the sender offered, as the server read it.
        offered: Versions,
        /// The server's software and version (may be empty).
        software: &'a str,
    },
}

impl Message<'_> {
    /// This message's type number.
    pub const fn message_type(&self) -> MessageType {
        match self {
            Message::Ping { .. } => MessageType::Ping,
            Message::Pong { .. } => MessageType::Pong,
            Message::Hello { .. } => MessageType::Hello,
            Message::Welcome { .. } => MessageType::Welcome,
            Message::BlockRequest { .. } => MessageType::BlockRequest,
            Message::BlockGrant { .. } => MessageType::BlockGrant,
            Message::NotLeader { .. } => MessageType::NotLeader,
            Message::Error { .. } => MessageType::Error,
            Message::NodeTableRequest { .. } => MessageType::NodeTableRequest,
            Message::NodeTable { .. } => MessageType::NodeTable,
            Message::LeaderChange { .. } => MessageType::LeaderChange,
            Message::SequenceCreate { .. } => MessageType::SequenceCreate,
            Message::SequenceDescribe { .. } => MessageType::SequenceDescribe,
            Message::SequenceList { .. } => MessageType::SequenceList,
            Message::SequenceInfo { .. } => MessageType::SequenceInfo,
            Message::SequenceListReply { .. } => MessageType::SequenceListReply,
            Message::StatusRequest { .. } => MessageType::StatusRequest,
            Message::StatusReply { .. } => MessageType::StatusReply,
            Message::AddServer { .. } => MessageType::AddServer,
            Message::RemoveServer { .. } => MessageType::RemoveServer,
            Message::Membership { .. } => MessageType::Membership,
            Message::VersionMismatch { .. } => MessageType::VersionMismatch,
        }
    }

    /// Checks every field's limits. [`crate::Codec::encode`] calls this
    /// before encoding and [`crate::decode`] after decoding.
    pub fn validate(&self) -> Result<(), FieldError> {
        fn servers(list: &List<'_, Server>) -> Result<(), FieldError> {
            check_len("servers", list.len(), SERVERS_MAX)?;
            list.iter().try_for_each(|s| s.check())
        }
        match *self {
            Message::Ping { .. }
            | Message::Pong { .. }
            | Message::NodeTableRequest { .. }
            | Message::StatusRequest {
                sequences_after: None,
            }
            | Message::SequenceList { after: None } => Ok(()),
            Message::Hello {
                name,
                listen,
                backup_of,
                versions,
                software,
                ..
            } => {
                check_name("hello name", name)?;
                check_versions("hello versions", versions)?;
                check_software("hello software", software)?;
                if let Some(addr) = listen {
                    check_addr("hello listen", &addr)?;
                }
                if backup_of == Some(0) {
                    return Err(FieldError::ZeroNodeId {
                        field: "hello backup_of",
                    });
                }
                Ok(())
            }
            Message::Welcome {
                node_id,
                servers: s,
                ..
            } => {
                check_node_id("welcome node_id", node_id)?;
                servers(&s)
            }
            Message::BlockRequest { sequence, count } => {
                check_name("block request sequence", sequence)?;
                if count == 0 {
                    return Err(FieldError::ZeroCount {
                        field: "block request count",
                    });
                }
                Ok(())
            }
            Message::BlockGrant {
                sequence,
                width,
                block,
            } => {
                check_name("block grant sequence", sequence)?;
                if Block::new(block.first(), block.count(), width).is_none() {
                    return Err(FieldError::BlockOutOfRange {
                        first: block.first(),
                        count: block.count(),
                        width,
                    });
                }
                Ok(())
            }
            Message::NotLeader {
                leader, servers: s, ..
            } => {
                if let Some(addr) = leader {
                    check_addr("not leader leader", &addr)?;
                }
                servers(&s)
            }
            Message::Error { sequence, text, .. } => {
                if let Some(name) = sequence {
                    check_name("error sequence", name)?;
                }
                if text.len() > ERROR_TEXT_BYTES_MAX {
                    return Err(FieldError::TextTooLong { len: text.len() });
                }
                Ok(())
            }
            Message::NodeTable {
                page,
                page_count,
                nodes,
                ..
            } => {
                if page >= page_count {
                    return Err(FieldError::BadPage { page, page_count });
                }
                check_len("nodes", nodes.len(), NODE_TABLE_PAGE_MAX)?;
                nodes.iter().try_for_each(|n| n.check())
            }
            Message::LeaderChange {
                leader_id,
                leader,
                servers: s,
                ..
            } => {
                check_node_id("leader change leader_id", leader_id)?;
                check_addr("leader change leader", &leader)?;
                servers(&s)
            }
            Message::SequenceCreate { name, width, start } => {
                check_name("sequence create name", name)?;
                if !width.contains(start) {
                    return Err(FieldError::IdOutOfRange {
                        field: "sequence create start",
                    });
                }
                Ok(())
            }
            Message::SequenceDescribe { name } => check_name("sequence describe name", name),
            Message::SequenceList { after: Some(name) } => check_name("sequence list after", name),
            Message::StatusRequest {
                sequences_after: Some(name),
            } => check_name("status request sequences_after", name),
            Message::SequenceInfo {
                name,
                width,
                start,
                next,
                ceiling,
            } => {
                check_name("sequence info name", name)?;
                if !(start <= next && next <= ceiling && ceiling <= width.limit()) {
                    return Err(FieldError::IdOutOfRange {
                        field: "sequence info",
                    });
                }
                Ok(())
            }
            Message::SequenceListReply { names, .. } => {
                check_len("names", names.len(), SEQUENCE_LIST_MAX)?;
                names
                    .iter()
                    .try_for_each(|n| check_name("sequence list name", n))
            }
            Message::StatusReply {
                servers: s,
                sequences,
                ..
            } => {
                check_len("servers", s.len(), SERVERS_MAX)?;
                s.iter().try_for_each(|s| s.check())?;
                check_len("sequences", sequences.len(), STATUS_SEQUENCES_MAX)?;
                sequences.iter().try_for_each(|s| s.check())
            }
            Message::AddServer { id, raft, listen } => {
                check_node_id("add server id", id)?;
                check_addr("add server raft", &raft)?;
                check_addr("add server listen", &listen)
            }
            Message::RemoveServer { id } => check_node_id("remove server id", id),
            Message::Membership { voters, .. } => servers(&voters),
            Message::VersionMismatch {
                versions,
                offered,
                software,
            } => {
                check_versions("version mismatch versions", versions)?;
                check_versions("version mismatch offered", offered)?;
                check_software("version mismatch software", software)
            }
        }
    }
}

fn check_versions(field: &'static str, v: Versions) -> Result<(), FieldError> {
    if v.min == 0 || v.min > v.max {
        return Err(FieldError::BadVersions {
            field,
            min: v.min,
            max: v.max,
        });
    }
    Ok(())
}

fn check_software(field: &'static str, s: &str) -> Result<(), FieldError> {
    if s.len() > SOFTWARE_BYTES_MAX || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(FieldError::BadSoftware {
            field,
            len: s.len(),
        });
    }
    Ok(())
}

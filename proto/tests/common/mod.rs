//! Helpers shared by the integration tests: raw framing (to build datagrams
//! the encoder would refuse) and a round trip.
#![allow(dead_code)]

use flatbuffers::FlatBufferBuilder;
use unid_proto::{
    AuthKey, Codec, DATAGRAM_BYTES_MAX, FLAG_AUTH, HEADER_BYTES, Header, Message, TAG_BYTES, decode,
};

pub const SECRET: &[u8] = b"test cluster secret";

pub fn key() -> AuthKey {
    AuthKey::from_secret(SECRET)
}

pub fn header() -> Header {
    Header {
        sender: 11,
        seq: 5,
        reply_to: 4,
        epoch: 3,
    }
}

/// Frames `payload` exactly as the encoder would, with any type byte, flags
/// and seq, and a correct CRC (and tag when `key` is given and `flags` has
/// AUTH).
pub fn frame_raw(
    message_type: u8,
    flags: u16,
    seq: u64,
    payload: &[u8],
    key: Option<&AuthKey>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"UN");
    out.push(unid_proto::codec::VERSION);
    out.push(message_type);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(&11u64.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // cluster id
    assert_eq!(out.len(), HEADER_BYTES);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    let body = out.clone();
    out.extend_from_slice(&crc.to_le_bytes());
    if flags & FLAG_AUTH != 0 {
        let tag = key.map_or([0u8; TAG_BYTES], |k| k.tag(&body));
        out.extend_from_slice(&tag);
    }
    out
}

/// A datagram of `message_type` (a `MessageType` number) whose payload is
/// whatever `build` finishes, framed without a key.
pub fn raw_datagram(
    message_type: u8,
    build: impl FnOnce(&mut FlatBufferBuilder<'static>),
) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    build(&mut fbb);
    frame_raw(message_type, 0, 1, fbb.finished_data(), None)
}

/// Encodes, decodes and compares, without and with a key.
pub fn roundtrip(header: Header, message: &Message<'_>) {
    let key = key();
    let mut codec = Codec::new();
    codec.set_cluster(0xC1A5_7E12_0000_0001);
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    for k in [None, Some(&key)] {
        let len = codec
            .encode(&header, message, k, &mut buf)
            .unwrap_or_else(|e| panic!("encode {message:?}: {e}"));
        let frame = decode(&buf[..len], k).unwrap_or_else(|e| panic!("decode {message:?}: {e}"));
        assert_eq!(frame.header, header);
        assert_eq!(frame.cluster, 0xC1A5_7E12_0000_0001);
        assert_eq!(frame.message, *message);
        assert_eq!(frame.authenticated, k.is_some());
        assert_eq!(frame.message.message_type(), message.message_type());
    }
}

/// Encodes one message (without a key), panicking on failure.
pub fn encode(message: &Message<'_>, key: Option<&AuthKey>) -> Vec<u8> {
    let mut codec = Codec::new();
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let len = codec.encode(&header(), message, key, &mut buf).unwrap();
    buf[..len].to_vec()
}

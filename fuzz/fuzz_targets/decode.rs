//! Feeds arbitrary bytes to `unid_proto::decode`, with and without a key.
//!
//! Three ways per input, none may panic:
//! 1. the input as a whole datagram, without a key and with one;
//! 2. the input (after one selector byte) as the payload of a datagram with a
//!    valid header, CRC and (when the selector says so) tag, so that the
//!    fuzzer reaches the FlatBuffers verifier and the field checks instead of
//!    stopping at the CRC;
//! 3. whatever decodes must re-encode, and the re-encoded datagram must
//!    decode to an equal frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unid_proto::{
    AuthKey, Codec, DATAGRAM_BYTES_MAX, EncodeError, FLAG_AUTH, Frame, HEADER_BYTES, MessageType, TAG_BYTES,
    decode,
};

fn key() -> AuthKey {
    AuthKey::from_secret(b"fuzz secret")
}

fn check_roundtrip(frame: &Frame<'_>, key: Option<&AuthKey>) {
    let mut codec = Codec::new();
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    let len = match codec.encode(&frame.header, &frame.message, key, &mut buf) {
        Ok(len) => len,
        // A sender may share one string between several fields (FlatBuffers
        // allows it); our encoder writes each separately, so a dense
        // datagram can re-encode larger than the limit. Nothing else may
        // fail.
        Err(EncodeError::TooLarge { .. }) => return,
        Err(e) => panic!("a decoded message does not re-encode: {e}: {frame:?}"),
    };
    let again = decode(&buf[..len], key).expect("a re-encoded message decodes");
    assert_eq!(again.header, frame.header);
    assert_eq!(again.message, frame.message);
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    if let Ok(frame) = decode(data, None) {
        check_roundtrip(&frame, None);
    }
    if let Ok(frame) = decode(data, Some(&key)) {
        check_roundtrip(&frame, Some(&key));
    }

    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let types = MessageType::ALL;
    let message_type = types[(selector as usize) % types.len()];
    let with_key = selector & 0x80 != 0;
    let tail = if with_key { 4 + TAG_BYTES } else { 4 };
    if HEADER_BYTES + payload.len() + tail > DATAGRAM_BYTES_MAX {
        return;
    }
    let mut buf = [0u8; DATAGRAM_BYTES_MAX];
    buf[0..2].copy_from_slice(b"UN");
    buf[2] = unid_proto::codec::VERSION;
    buf[3] = message_type.as_u8();
    let flags: u16 = if with_key { FLAG_AUTH } else { 0 };
    buf[4..6].copy_from_slice(&flags.to_le_bytes());
    buf[6..8].copy_from_slice(&(payload.len() as u16).to_le_bytes());
    buf[8..16].copy_from_slice(&42u64.to_le_bytes());
    buf[16..24].copy_from_slice(&1u64.to_le_bytes());
    let end = HEADER_BYTES + payload.len();
    buf[HEADER_BYTES..end].copy_from_slice(payload);
    let crc = crc32fast::hash(&buf[..end]);
    buf[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    if with_key {
        let tag = key.tag(&buf[..end]);
        buf[end + 4..end + 4 + TAG_BYTES].copy_from_slice(&tag);
    }
    let datagram = &buf[..end + tail];
    let k = with_key.then_some(&key);
    if let Ok(frame) = decode(datagram, k) {
        check_roundtrip(&frame, k);
    }
});

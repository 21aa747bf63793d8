//! Peer frames: how every Raft RPC travels over TCP.
//!
//! ```text
//! +----------------+-----------------+------------------+----------------------+
//! | len: u32 LE    | payload         | crc32: u32 LE    | tag: 16 bytes        |
//! | payload bytes  | `len` bytes     | over len+payload | only with a secret:  |
//! |                |                 | (crc32fast)      | AuthKey tag over     |
//! |                |                 |                  | len+payload+crc      |
//! +----------------+-----------------+------------------+----------------------+
//! ```
//!
//! `len` is at most [`FRAME_PAYLOAD_BYTES_MAX`]; a larger value is rejected
//! before anything is allocated. A frame whose CRC or tag does not check is
//! dropped, counted in [`NetStats`], and the connection is closed: after a
//! bad frame the stream position cannot be trusted.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use unid_proto::auth::{AuthKey, TAG_BYTES};

/// The largest payload a frame may carry: 16 MiB. Snapshot chunks are sized
/// well below it (see `NodeConfig::snapshot_chunk_bytes`).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 16 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds [`FRAME_PAYLOAD_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The CRC32 does not match.
    #[error("bad CRC")]
    BadCrc,
    /// The authentication tag does not match (or a tag was expected).
    #[error("bad authentication tag")]
    BadTag,
}

/// Counters of frames seen by one node (both as server and as client).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames received that passed every check.
    pub frames_ok: AtomicU64,
    /// Frames dropped for a bad CRC.
    pub frames_bad_crc: AtomicU64,
    /// Frames dropped for a bad authentication tag.
    pub frames_bad_tag: AtomicU64,
    /// Frames dropped for an oversized length prefix.
    pub frames_too_large: AtomicU64,
    /// Frames that checked but whose payload did not decode.
    pub frames_undecodable: AtomicU64,
    /// Connections closed because of a bad frame.
    pub connections_closed_bad: AtomicU64,
}

/// A copy of [`NetStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    /// See [`NetStats::frames_ok`].
    pub frames_ok: u64,
    /// See [`NetStats::frames_bad_crc`].
    pub frames_bad_crc: u64,
    /// See [`NetStats::frames_bad_tag`].
    pub frames_bad_tag: u64,
    /// See [`NetStats::frames_too_large`].
    pub frames_too_large: u64,
    /// See [`NetStats::frames_undecodable`].
    pub frames_undecodable: u64,
    /// See [`NetStats::connections_closed_bad`].
    pub connections_closed_bad: u64,
}

impl NetStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            frames_ok: l(&self.frames_ok),
            frames_bad_crc: l(&self.frames_bad_crc),
            frames_bad_tag: l(&self.frames_bad_tag),
            frames_too_large: l(&self.frames_too_large),
            frames_undecodable: l(&self.frames_undecodable),
            connections_closed_bad: l(&self.connections_closed_bad),
        }
    }

    /// Counts a refused frame.
    pub fn count(&self, e: &FrameError) {
        let c = match e {
            FrameError::BadCrc => &self.frames_bad_crc,
            FrameError::BadTag => &self.frames_bad_tag,
            FrameError::TooLarge(_) => &self.frames_too_large,
            FrameError::Closed | FrameError::Io(_) => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.connections_closed_bad.fetch_add(1, Ordering::Relaxed);
    }
}

/// Encodes one frame around `payload`.
///
/// # Panics
/// If `payload` is longer than [`FRAME_PAYLOAD_BYTES_MAX`] (a programming
/// error: callers bound what they send).
pub fn encode(payload: &[u8], key: Option<&AuthKey>) -> Vec<u8> {
    assert!(
        payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
        "frame payload too large"
    );
    let mut out = Vec::with_capacity(4 + payload.len() + 4 + TAG_BYTES);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    if let Some(key) = key {
        let tag = key.tag(&out);
        out.extend_from_slice(&tag);
    }
    out
}

/// Checks a whole frame held in memory and returns its payload.
pub fn decode<'a>(frame: &'a [u8], key: Option<&AuthKey>) -> Result<&'a [u8], FrameError> {
    let short = || FrameError::Io(std::io::ErrorKind::UnexpectedEof.into());
    let len_bytes: [u8; 4] = frame
        .get(..4)
        .ok_or_else(short)?
        .try_into()
        .map_err(|_| short())?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let tag_len = if key.is_some() { TAG_BYTES } else { 0 };
    if frame.len() != 4 + len + 4 + tag_len {
        return Err(short());
    }
    let body = &frame[..4 + len];
    let crc = u32::from_le_bytes(frame[4 + len..8 + len].try_into().map_err(|_| short())?);
    if crc32fast::hash(body) != crc {
        return Err(FrameError::BadCrc);
    }
    if let Some(key) = key
        && !key.verify(&frame[..8 + len], &frame[8 + len..])
    {
        return Err(FrameError::BadTag);
    }
    Ok(&frame[4..4 + len])
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
    key: Option<&AuthKey>,
) -> Result<(), FrameError> {
    let bytes = encode(payload, key);
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame and returns its checked payload. Counts refused frames
/// in `stats`; the caller must close the connection on any error.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    key: Option<&AuthKey>,
    stats: &NetStats,
) -> Result<Vec<u8>, FrameError> {
    let res = read_frame_inner(r, key).await;
    match &res {
        Ok(_) => {
            stats.frames_ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => stats.count(e),
    }
    res
}

async fn read_frame_inner<R: AsyncRead + Unpin>(
    r: &mut R,
    key: Option<&AuthKey>,
) -> Result<Vec<u8>, FrameError> {
    let mut len_bytes = [0u8; 4];
    match r.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let tag_len = if key.is_some() { TAG_BYTES } else { 0 };
    let mut frame = vec![0u8; 4 + len + 4 + tag_len];
    frame[..4].copy_from_slice(&len_bytes);
    r.read_exact(&mut frame[4..]).await?;
    decode(&frame, key)?;
    frame.truncate(4 + len);
    frame.drain(..4);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let key = AuthKey::from_secret(b"s");
        for k in [None, Some(&key)] {
            let f = encode(b"hello", k);
            assert_eq!(decode(&f, k).unwrap(), b"hello");
            let mut bad = f.clone();
            bad[5] ^= 1;
            assert!(matches!(decode(&bad, k), Err(FrameError::BadCrc)));
        }
        // Right CRC, wrong tag: a frame made with another key.
        let other = AuthKey::from_secret(b"t");
        let f = encode(b"hello", Some(&other));
        assert!(matches!(decode(&f, Some(&key)), Err(FrameError::BadTag)));
        let mut huge = encode(b"x", None);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge, None), Err(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn stream_counts_bad_frames() {
        let stats = NetStats::default();
        let key = AuthKey::from_secret(b"s");
        let mut good = encode(b"abc", Some(&key));
        let mut r: &[u8] = &good;
        assert_eq!(
            read_frame(&mut r, Some(&key), &stats).await.unwrap(),
            b"abc"
        );
        good[4] ^= 0xff;
        let mut r: &[u8] = &good;
        assert!(read_frame(&mut r, Some(&key), &stats).await.is_err());
        let s = stats.snapshot();
        assert_eq!(
            (s.frames_ok, s.frames_bad_crc, s.connections_closed_bad),
            (1, 1, 1)
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoder, and a frame accepted
        /// with a key is exactly one that was encoded with it.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let key = AuthKey::from_secret(b"k");
            let _ = decode(&bytes, None);
            if let Ok(p) = decode(&bytes, Some(&key)) {
                proptest::prop_assert_eq!(encode(p, Some(&key)), bytes.clone());
            }
        }
    }
}

//! Datagram and frame authentication: a keyed MAC with the cluster secret.
//!
//! The MAC is keyed BLAKE3 truncated to [`TAG_BYTES`] bytes. The 32-byte key is
//! derived from the operator's secret (any length) with BLAKE3's key
//! derivation mode and a fixed context string, so a secret is never used
//! directly as a key and two uses of one secret can be separated later by
//! context. A 128-bit tag gives a forger one chance in 2^128 per attempt.

/// Bytes in an authentication tag.
pub const TAG_BYTES: usize = 16;

/// The BLAKE3 key-derivation context for datagram and peer-frame MACs.
const KEY_CONTEXT: &str = "unid 2026-11 cluster MAC v1";

/// A cluster authentication key, derived from the cluster secret.
#[derive(Clone)]
pub struct AuthKey {
    key: [u8; 32],
}

impl core::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material.
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// Derives the key from the operator's secret.
    pub fn from_secret(secret: &[u8]) -> AuthKey {
        AuthKey {
            key: blake3::derive_key(KEY_CONTEXT, secret),
        }
    }

    /// The tag of `data`: the MAC over every byte of it.
    pub fn tag(&self, data: &[u8]) -> [u8; TAG_BYTES] {
        let hash = blake3::keyed_hash(&self.key, data);
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&hash.as_bytes()[..TAG_BYTES]);
        tag
    }

    /// Whether `tag` is the tag of `data`. Compares in constant time, so the
    /// time taken says nothing about how many bytes of a forged tag matched.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        if tag.len() != TAG_BYTES {
            return false;
        }
        let expected = self.tag(data);
        let mut diff = 0u8;
        for (a, b) in expected.iter().zip(tag) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_verifies_and_detects_change() {
        let key = AuthKey::from_secret(b"cluster secret");
        let data = b"header and payload";
        let tag = key.tag(data);
        assert!(key.verify(data, &tag));
        assert!(!key.verify(b"header and payloaD", &tag));
        let mut bad = tag;
        bad[TAG_BYTES - 1] ^= 1;
        assert!(!key.verify(data, &bad));
        assert!(!key.verify(data, &tag[..TAG_BYTES - 1]));
        let other = AuthKey::from_secret(b"another secret");
        assert!(!other.verify(data, &tag));
        assert_eq!(format!("{key:?}"), "AuthKey(..)");
    }
}

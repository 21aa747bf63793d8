//! Free ports for tests and tools that start servers on 127.0.0.1.
//!
//! Why not `bind(127.0.0.1:0)` and reuse the number: the kernel hands out such ports from its
//! *ephemeral* range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 by default), and
//! it goes on handing them out — to the next `bind(0)`, and to every outgoing TCP connection
//! (a server retrying Raft connections to peers not yet up uses several a second). Between
//! "this port is free" and the server binding it, another process can take it, and the server
//! exits with `EADDRINUSE` (seen in CI: a spawned cluster that never elected a leader). Ports
//! below the ephemeral range are never handed out by the kernel, so only another process that
//! picks ports the same way can race us, and the random choice makes that rare.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

/// The lowest port [`free_port`] picks.
pub const PORT_MIN: u16 = 12_000;
/// How many random ports [`free_port`] tries before it falls back to the ephemeral range.
pub const TRIES_MAX: u32 = 1_000;

/// Ports this process already handed out (a test binary starts many servers at once).
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The start of the kernel's ephemeral port range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Whether `port` is free on 127.0.0.1 for both TCP and UDP right now.
fn free_now(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// A port free on 127.0.0.1 for both TCP and UDP, below the ephemeral range when there is
/// room there, and never one this process handed out before. `None` only when no port at all
/// could be found.
pub fn free_port() -> Option<u16> {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let high = ephemeral_low();
    if high > PORT_MIN {
        let span = u64::from(high - PORT_MIN);
        // RandomState is seeded randomly per process: concurrent test processes pick
        // different sequences.
        let seed = std::collections::hash_map::RandomState::new();
        for i in 0..TRIES_MAX {
            let mut h = seed.build_hasher();
            h.write_u32(i);
            let port = PORT_MIN + (h.finish() % span) as u16;
            debug_assert!((PORT_MIN..high).contains(&port));
            if !given.contains(&port) && free_now(port) {
                given.insert(port);
                return Some(port);
            }
        }
    }
    // No room below the ephemeral range: ask the kernel.
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        if !given.contains(&port) && free_now(port) {
            given.insert(port);
            return Some(port);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let high = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in &ports {
            if high > PORT_MIN {
                assert!(
                    (PORT_MIN..high).contains(p),
                    "{p} outside {PORT_MIN}..{high}"
                );
            }
            assert!(free_now(*p), "{p} is taken");
        }
    }

    #[test]
    fn a_taken_port_is_not_handed_out() {
        let p = free_port().unwrap();
        let _hold = UdpSocket::bind(("127.0.0.1", p)).unwrap();
        assert!(!free_now(p));
    }
}

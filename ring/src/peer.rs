//! Who is at the other end of a local socket (issue 12, items 6 and 11): the agent checks who
//! takes ids, the client checks it talks to the agent.
//!
//! * Unix sockets: `SO_PEERCRED` (unix(7)): pid, uid and gid of the peer, as the kernel recorded
//!   them at `connect`/`listen`; and the peer's supplementary groups from `/proc/PID/status`.
//! * Loopback TCP: the owner of the socket at the far end, read from `/proc/net/tcp` and
//!   `/proc/net/tcp6` (the `uid` column; proc(5)). Both ends of a loopback connection are
//!   listed in the same network namespace, so the far end's entry is the one whose local address
//!   is our remote one and whose remote address is our local one. An accepted socket inherits
//!   its listener's owner.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The credentials of a Unix socket's peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its pid (in our pid namespace; 0 if it has none here).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected Unix stream socket.
pub fn unix_peer(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (the size of `cred`, a plain C struct on our
    // stack) and the new length into `len`; the fd is open for the duration (borrowed).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short ucred"));
    }
    Ok(PeerCred {
        pid: cred.pid.max(0) as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of process `pid` (`Groups:` in `/proc/PID/status`).
pub fn process_groups(pid: u32) -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .ok_or_else(|| io::Error::other("no Groups line"))?;
    Ok(line
        .split_ascii_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect())
}

/// The uid owning the far end of the loopback TCP connection whose local address is `local`
/// and remote address `remote`; `None` if the kernel lists no such socket (not local, or gone).
pub fn tcp_peer_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    let file = if remote.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(file)?;
    Ok(find_uid(&text, remote, local))
}

/// In a `/proc/net/tcp{,6}` table: the uid of the entry with this local and remote address.
fn find_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    for line in table.lines().skip(1) {
        let mut f = line.split_ascii_whitespace();
        let (Some(_), Some(l), Some(r)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if parse_addr(l) != Some(local) || parse_addr(r) != Some(remote) {
            continue;
        }
        // Only an established socket has its owner listed (a TIME_WAIT entry reads uid 0).
        if f.next() != Some("01") {
            return None;
        }
        // tx:rx, tr:when, retrnsmt, then uid.
        return f.nth(3).and_then(|u| u.parse().ok());
    }
    None
}

/// `0100007F:1CF3` (IPv4) or 32 hex digits `:PORT` (IPv6): the address as the kernel prints it,
/// each 32-bit word in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(ip.get(8 * i..8 * i + 8)?)?);
            }
            let v6 = Ipv6Addr::from(b);
            // An IPv4 peer on a dual-stack socket: compare as IPv4.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1CF3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1CF3 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1\n";
        let srv: SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let cli: SocketAddr = "127.0.0.1:40960".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find_uid(table, srv, cli), Some(1000));
            assert_eq!(find_uid(table, cli, srv), None);
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "real sockets and /proc/net/tcp: not under miri")]
    fn finds_both_ends_of_a_real_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let far = tcp_peer_uid(c.local_addr().unwrap(), c.peer_addr().unwrap()).unwrap();
        assert_eq!(far, Some(me));
        let far = tcp_peer_uid(s.local_addr().unwrap(), s.peer_addr().unwrap()).unwrap();
        assert_eq!(far, Some(me));
        let (a, b) = UnixStream::pair().unwrap();
        let cred = unix_peer(&a).unwrap();
        assert_eq!((cred.pid, cred.uid), (std::process::id(), me));
        drop(b);
    }
}

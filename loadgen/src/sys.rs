//! The few system calls the batched load client and echo peer need beyond `std`: `recvmmsg(2)`
//! and `sendmmsg(2)` on a nonblocking UDP socket (IPv4), `poll(2)` on several sockets, pinning
//! a thread to a CPU (`sched_setaffinity(2)`), and CPU time and RSS of a process or thread
//! from `/proc` (`proc(5)`). The only `unsafe` of loadgen lives here, each block with what it
//! relies on, as in `unid_engine::udp` (which loadgen may not link).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;

/// Most datagrams one [`recv_batch`] or [`SendQueue::flush`] call moves (as the server's shards).
pub const BATCH_MAX: usize = 64;
/// Bytes of each receive buffer (a unid datagram is at most 1500).
pub const RECV_BYTES: usize = 2048;

/// Preallocated buffers for one `recvmmsg`.
pub struct RecvBufs {
    bufs: Vec<[u8; RECV_BYTES]>,
    addrs: Vec<libc::sockaddr_in>,
    lens: Vec<usize>,
}

impl Default for RecvBufs {
    fn default() -> Self {
        RecvBufs {
            bufs: vec![[0u8; RECV_BYTES]; BATCH_MAX],
            // SAFETY: sockaddr_in is plain old data; all zeroes is a valid value.
            addrs: vec![unsafe { zeroed() }; BATCH_MAX],
            lens: vec![0; BATCH_MAX],
        }
    }
}

impl RecvBufs {
    /// Datagram `i` of the last [`recv_batch`] and its source.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let a = &self.addrs[i];
        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        let from = SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port)));
        (&self.bufs[i][..self.lens[i]], from)
    }
}

/// Receives up to [`BATCH_MAX`] datagrams without waiting; returns how many (0: none queued).
/// Errors other than "nothing queued" (an ICMP error reported on the socket, mostly) are
/// returned so the caller can count them.
pub fn recv_batch(sock: &UdpSocket, b: &mut RecvBufs) -> io::Result<usize> {
    let mut iovs: [libc::iovec; BATCH_MAX] =
        // SAFETY: iovec is plain old data; all zeroes is valid (filled in below).
        unsafe { zeroed() };
    // SAFETY: as above, for mmsghdr.
    let mut msgs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
    for i in 0..BATCH_MAX {
        iovs[i].iov_base = b.bufs[i].as_mut_ptr().cast();
        iovs[i].iov_len = RECV_BYTES;
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_in).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
    }
    // SAFETY: every msg_hdr points at a live buffer of RECV_BYTES and a sockaddr_in of the
    // stated length, all owned by `b` and `iovs`, which outlive the call; the kernel writes at
    // most that much into each. vlen is the arrays' length.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH_MAX as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        };
    }
    let n = n as usize;
    for (i, m) in msgs.iter().enumerate().take(n) {
        b.lens[i] = (m.msg_len as usize).min(RECV_BYTES);
    }
    Ok(n)
}

/// Datagrams queued for one socket, sent with `sendmmsg` in batches of [`BATCH_MAX`].
#[derive(Default)]
pub struct SendQueue {
    data: Vec<u8>,
    /// (destination, offset, length) per datagram.
    items: Vec<(SocketAddr, usize, usize)>,
}

impl SendQueue {
    /// Queues `bytes` for `to` (IPv4 only: loadgen talks to 127.0.0.1).
    pub fn push(&mut self, to: SocketAddr, bytes: &[u8]) {
        self.items.push((to, self.data.len(), bytes.len()));
        self.data.extend_from_slice(bytes);
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Sends everything queued (a full socket buffer drops the rest: the retransmit timers
    /// cover it, as for a lost datagram); returns (sendmmsg calls, datagrams sent).
    pub fn flush(&mut self, sock: &UdpSocket) -> (u64, u64) {
        let (mut calls, mut sent) = (0u64, 0u64);
        let mut at = 0;
        while at < self.items.len() {
            let chunk = &self.items[at..(at + BATCH_MAX).min(self.items.len())];
            // SAFETY: plain old data; all zeroes is valid (filled in below).
            let mut addrs: [libc::sockaddr_in; BATCH_MAX] = unsafe { zeroed() };
            // SAFETY: as above.
            let mut iovs: [libc::iovec; BATCH_MAX] = unsafe { zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
            let mut k = 0;
            for (to, off, len) in chunk {
                let SocketAddr::V4(v4) = to else { continue };
                addrs[k].sin_family = libc::AF_INET as libc::sa_family_t;
                addrs[k].sin_port = v4.port().to_be();
                addrs[k].sin_addr.s_addr = u32::from(*v4.ip()).to_be();
                iovs[k].iov_base = self.data[*off..].as_ptr() as *mut libc::c_void;
                iovs[k].iov_len = *len;
                let h = &mut msgs[k].msg_hdr;
                h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut iovs[k];
                h.msg_iovlen = 1;
                k += 1;
            }
            at += chunk.len();
            let mut done = 0;
            while done < k {
                // SAFETY: msgs[done..k] point at addresses, iovecs and bytes of `self.data`
                // that live until after the call; the kernel only reads them.
                let n = unsafe {
                    libc::sendmmsg(
                        sock.as_raw_fd(),
                        msgs[done..].as_mut_ptr(),
                        (k - done) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                calls += 1;
                if n <= 0 {
                    // EAGAIN (buffer full) or an error for the first datagram: skip it.
                    done += 1;
                    continue;
                }
                done += n as usize;
                sent += n as u64;
            }
        }
        self.items.clear();
        self.data.clear();
        (calls, sent)
    }
}

/// Waits until one of `socks` is readable or `timeout_ms` passed.
pub fn poll_readable(socks: &[UdpSocket], timeout_ms: i32) {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a live array of `fds.len()` pollfd entries for the duration of the call.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
}

/// Pins thread or process `tid` (0: the calling thread) to CPU `cpu`.
pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`, which is live; `cpu` is checked below.
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpu out of range",
        ));
    }
    // SAFETY: as above: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the threads of process `pid` whose name (`/proc/PID/task/TID/comm`) starts with
/// `prefix` to CPU `cpu`; returns how many.
pub fn pin_threads(pid: u32, prefix: &str, cpu: usize) -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            pin(tid, cpu)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The calling thread's id (for [`cpu_ns`] of `/proc/self/task/TID`).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// User + system CPU time of a `/proc` stat file (`/proc/PID/stat` or
/// `/proc/PID/task/TID/stat`), in nanoseconds (clock-tick resolution, usually 10 ms).
pub fn cpu_ns(stat_path: &str) -> Option<u64> {
    let s = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// Resident set size of process `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_go_out_and_come_back_whole() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut q = SendQueue::default();
        for i in 0..100u8 {
            q.push(to, &[i; 10][..usize::from(i % 10) + 1]);
        }
        assert_eq!(q.len(), 100);
        let (calls, sent) = q.flush(&a);
        assert_eq!(sent, 100);
        assert!(calls >= 2, "100 datagrams need two sendmmsg calls of 64");
        let mut bufs = RecvBufs::default();
        let mut got = Vec::new();
        while got.len() < 100 {
            poll_readable(std::slice::from_ref(&b), 1000);
            let n = recv_batch(&b, &mut bufs).unwrap();
            assert!(n <= BATCH_MAX);
            for i in 0..n {
                let (d, from) = bufs.get(i);
                assert_eq!(from, a.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; i % 10 + 1]);
        }
        assert_eq!(recv_batch(&b, &mut bufs).unwrap(), 0, "nothing more queued");
    }

    #[test]
    fn this_process_has_cpu_time_and_rss() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_ns(&format!("/proc/{pid}/stat")).is_some());
        assert!(cpu_ns(&format!("/proc/self/task/{}/stat", gettid())).is_some());
        assert!(rss_bytes(pid).unwrap() > 0);
    }
}

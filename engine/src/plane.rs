//! The two data planes a [`crate::shard::Shards`] can run on, and how one is chosen.
//!
//! - [`DataPlane::IoUring`]: one glommio `LocalExecutor` per shard; a shard waits in io_uring
//!   (a `MSG_PEEK` receive, glommio timers, the executor's eventfd for cross-thread wake-ups).
//! - [`DataPlane::Threads`]: one plain `std::thread` per shard, pinned the same way; a shard
//!   waits in `ppoll(2)` on its socket and an `eventfd(2)` that [`crate::shard::ShardSender`]
//!   and [`crate::shard::StopHandle`] write, with the handler's deadline as the timeout.
//!
//! Both run the same shard loop (see [`crate::shard`]): the same bounds per turn, the same stop
//! semantics and the same [`crate::shard::ShardStats`]; only the waiting differs. The socket I/O
//! is `recvmmsg`/`sendmmsg` on both.
//!
//! io_uring is often unavailable: Docker's default seccomp profile (since Docker 25) and
//! containerd 2.0's `RuntimeDefault` refuse `io_uring_setup`, and hardened hosts set the
//! `kernel.io_uring_disabled` sysctl (`io_uring_setup(2)`, "EPERM"). glommio then panics in its
//! thread. [`DataPlane::Auto`] therefore probes once per process ([`probe_io_uring`]) and picks
//! [`DataPlane::Threads`] when the probe fails; a forced [`DataPlane::IoUring`] that fails the
//! probe is [`crate::Error::IoUringUnavailable`], before any executor starts.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::OnceLock;

use crate::{Error, Result, now_us};

/// Which data plane runs the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlane {
    /// [`Self::IoUring`] if io_uring works here ([`probe_io_uring`]), else [`Self::Threads`].
    #[default]
    Auto,
    /// glommio executors waiting in io_uring; an error if io_uring is unavailable.
    IoUring,
    /// Plain threads waiting in `ppoll(2)`; works wherever `recvmmsg` does.
    Threads,
}

impl DataPlane {
    /// The name used in flags, configuration files and metrics: `auto`, `io-uring`, `threads`.
    pub fn name(self) -> &'static str {
        match self {
            DataPlane::Auto => "auto",
            DataPlane::IoUring => "io-uring",
            DataPlane::Threads => "threads",
        }
    }
}

impl fmt::Display for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataPlane {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DataPlane::Auto),
            "io-uring" | "io_uring" | "iouring" => Ok(DataPlane::IoUring),
            "threads" => Ok(DataPlane::Threads),
            _ => Err(Error::Config(
                "data plane must be one of auto, io-uring, threads",
            )),
        }
    }
}

/// The plane a [`crate::shard::Shards`] runs on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenPlane {
    /// [`DataPlane::IoUring`] or [`DataPlane::Threads`], never [`DataPlane::Auto`].
    pub plane: DataPlane,
    /// What was asked for.
    pub wanted: DataPlane,
    /// Why this plane: forced, or the probe's outcome.
    pub reason: String,
}

impl ChosenPlane {
    /// `Auto` fell back to threads because io_uring is unavailable.
    pub fn is_fallback(&self) -> bool {
        self.wanted == DataPlane::Auto && self.plane == DataPlane::Threads
    }
}

/// Resolves `wanted` to the plane that will run, probing io_uring when needed.
pub fn choose(wanted: DataPlane) -> Result<ChosenPlane> {
    let chosen = |plane, reason: String| ChosenPlane {
        plane,
        wanted,
        reason,
    };
    match wanted {
        DataPlane::Threads => Ok(chosen(
            DataPlane::Threads,
            "forced by the configuration".to_owned(),
        )),
        DataPlane::IoUring => match probe_io_uring() {
            Ok(()) => Ok(chosen(
                DataPlane::IoUring,
                "forced by the configuration; io_uring works".to_owned(),
            )),
            Err(reason) => Err(Error::IoUringUnavailable { reason }),
        },
        DataPlane::Auto => Ok(match probe_io_uring() {
            Ok(()) => chosen(DataPlane::IoUring, "io_uring works".to_owned()),
            Err(reason) => chosen(
                DataPlane::Threads,
                format!("io_uring is unavailable: {reason}"),
            ),
        }),
    }
}

/// Checks once per process that io_uring works the way glommio needs it: `io_uring_setup(2)`
/// of a small ring, then `io_uring_register(2)` with `IORING_REGISTER_PROBE` (what glommio
/// does first, and where it panics when io_uring is refused). `Err` says which call failed and
/// how, plus `kernel.io_uring_disabled` when it is set.
///
/// The probe runs on a thread of its own, which exits before this returns. A ring belongs to
/// the thread that set it up: when it is closed, the kernel's ring teardown later queues
/// signal-like task work (`TWA_SIGNAL`) on that thread, which cuts its next blocking call with
/// a timeout short with `EINTR` (seen: a `recv_from` with `SO_RCVTIMEO` on the caller's
/// thread, right after the probe). A thread that has exited gets none of that.
pub fn probe_io_uring() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("unid-io-uring-probe".into())
                .spawn(probe_uncached)
                .map_err(|e| format!("cannot start the io_uring probe thread: {e}"))
                .and_then(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("the io_uring probe panicked".to_owned()))
                })
        })
        .clone()
}

/// `IORING_REGISTER_PROBE` from `<linux/io_uring.h>`.
const IORING_REGISTER_PROBE: libc::c_uint = 8;
/// Operations an `io_uring_probe` buffer has room for (the opcode is a `u8`).
const PROBE_OPS_MAX: usize = 256;

fn probe_uncached() -> std::result::Result<(), String> {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().to_owned());
    let with_sysctl = |what: String| match sysctl.as_deref() {
        Some(value) if value != "0" => format!("{what}; kernel.io_uring_disabled = {value}"),
        _ => what,
    };
    // `struct io_uring_params` is 120 bytes; all zero asks for the defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup reads and writes `struct io_uring_params` (120 bytes), which
    // `params` provides for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            4 as libc::c_uint,
            params.as_mut_ptr(),
        )
    };
    if fd < 0 {
        return Err(with_sysctl(format!(
            "io_uring_setup: {}",
            std::io::Error::last_os_error()
        )));
    }
    let fd = RawFd::try_from(fd).map_err(|_| "io_uring_setup returned a bad fd".to_owned())?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let ring = unsafe { OwnedFd::from_raw_fd(fd) };
    // `struct io_uring_probe`: a 16-byte header and 8 bytes per operation.
    let mut probe = [0u64; 2 + PROBE_OPS_MAX];
    // SAFETY: the buffer holds the header and PROBE_OPS_MAX operations, the count passed; it
    // outlives the call. The ring descriptor is open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_PROBE,
            probe.as_mut_ptr(),
            PROBE_OPS_MAX as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(with_sysctl(format!(
            "io_uring_register(IORING_REGISTER_PROBE): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A nonblocking `eventfd(2)`: other threads [`Self::notify`] a shard sleeping in
/// [`wait_readable`].
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a negative result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Makes the descriptor readable until the next [`Self::reset`].
    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call. The only possible
        // failure, EAGAIN at a counter of 2^64 - 2, still leaves the descriptor readable.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Clears the counter (nonblocking: does nothing if it is already clear).
    fn reset(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into `count`, which lives across the call.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

/// Sleeps until `socket` is readable or has a pending error, `event` was notified (which this
/// clears), or `deadline_us` (a [`crate::now_us`] time) passes. Returns at once if the
/// deadline has passed; an interrupted `ppoll` returns early too (the loop looks again).
pub(crate) fn wait_readable(
    socket: RawFd,
    event: &EventFd,
    deadline_us: Option<u64>,
) -> std::io::Result<()> {
    let timeout = match deadline_us {
        Some(deadline) => {
            let wait_us = deadline.saturating_sub(now_us());
            if wait_us == 0 {
                return Ok(());
            }
            Some(libc::timespec {
                tv_sec: libc::time_t::try_from(wait_us / 1_000_000).unwrap_or(libc::time_t::MAX),
                // Below 10^9, so it fits any `c_long`.
                tv_nsec: ((wait_us % 1_000_000) * 1_000) as libc::c_long,
            })
        }
        None => None,
    };
    let mut fds = [
        libc::pollfd {
            fd: socket,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: event.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout_ptr = timeout
        .as_ref()
        .map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `fds` holds the 2 entries passed and lives across the call; `timeout_ptr` is null
    // or points at `timeout`, alive until the end of this function; no signal mask is given.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout_ptr,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(err);
    }
    if fds[1].revents != 0 {
        event.reset();
    }
    Ok(())
}

/// Pins the calling thread to `cpu` (`sched_setaffinity`).
pub(crate) fn pin_current_thread(cpu: usize) -> std::result::Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!(
            "CPU {cpu} is beyond CPU_SETSIZE ({})",
            libc::CPU_SETSIZE
        ));
    }
    // SAFETY: all-zero bytes are a valid, empty `cpu_set_t`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid `cpu_set_t` on the stack and its exact size is passed; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if rc != 0 {
        return Err(format!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `AUDIT_ARCH_*` of this build's architecture (`<linux/audit.h>`), checked by the filter.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Makes the child `cmd` spawns refuse io_uring the way Docker's default seccomp profile does:
/// before `exec`, it sets `PR_SET_NO_NEW_PRIVS` and installs a seccomp BPF filter that fails
/// `io_uring_setup`, `io_uring_enter` and `io_uring_register` with `EPERM` and allows
/// everything else. For tests of the fallback (and to try it by hand); needs no privilege.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn deny_io_uring_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // Offsets in `struct seccomp_data`: `nr` at 0, `arch` at 4.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let nr = |n: libc::c_long| u32::try_from(n).expect("syscall numbers are small");
    let filter: Vec<libc::sock_filter> = vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH),
        // Another architecture's syscall numbers mean other calls: allow.
        jeq(AUDIT_ARCH, 0, 4),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR),
        jeq(nr(libc::SYS_io_uring_setup), 3, 0),
        jeq(nr(libc::SYS_io_uring_enter), 2, 0),
        jeq(nr(libc::SYS_io_uring_register), 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
    ];
    let install = move || {
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `prog` points at `filter.len()` valid instructions, alive across the
        // call; the kernel copies the program.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: `install` runs in the forked child before exec and only makes two prctl calls
    // (async-signal-safe) with pointers into `filter`, which it owns and which was built
    // before the fork, so nothing is allocated in the child.
    unsafe { cmd.pre_exec(install) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for plane in [DataPlane::Auto, DataPlane::IoUring, DataPlane::Threads] {
            assert_eq!(plane.name().parse::<DataPlane>().unwrap(), plane);
        }
        assert!("uring2".parse::<DataPlane>().is_err());
    }

    #[test]
    fn forced_threads_needs_no_probe() {
        let chosen = choose(DataPlane::Threads).unwrap();
        assert_eq!(chosen.plane, DataPlane::Threads);
        assert!(!chosen.is_fallback());
    }

    /// Auto agrees with the probe, and a forced io_uring fails exactly when the probe does.
    #[test]
    fn auto_follows_the_probe() {
        let auto = choose(DataPlane::Auto).unwrap();
        let forced = choose(DataPlane::IoUring);
        match probe_io_uring() {
            Ok(()) => {
                assert_eq!(auto.plane, DataPlane::IoUring);
                assert_eq!(forced.unwrap().plane, DataPlane::IoUring);
            }
            Err(reason) => {
                assert_eq!(auto.plane, DataPlane::Threads);
                assert!(auto.is_fallback() && auto.reason.contains(&reason));
                assert!(matches!(forced, Err(Error::IoUringUnavailable { .. })));
            }
        }
    }

    #[test]
    fn eventfd_wakes_a_waiter_and_deadlines_end_a_wait() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let event = std::sync::Arc::new(EventFd::new().unwrap());
        // A deadline 20 ms away ends an idle wait after it, not before.
        let start = now_us();
        wait_readable(socket.as_raw_fd(), &event, Some(start + 20_000)).unwrap();
        assert!(now_us() >= start + 20_000);
        // A notification from another thread ends a wait without deadline.
        let notifier = event.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            notifier.notify();
        });
        wait_readable(socket.as_raw_fd(), &event, None).unwrap();
        thread.join().unwrap();
        // The wake-up was consumed: the next wait lasts until its deadline again.
        let start = now_us();
        wait_readable(socket.as_raw_fd(), &event, Some(start + 5_000)).unwrap();
        assert!(now_us() >= start + 5_000);
    }

    #[test]
    fn pinning_beyond_the_cpu_set_is_an_error() {
        let err = std::thread::spawn(|| pin_current_thread(1 << 20))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(err.contains("CPU_SETSIZE"), "{err}");
    }
}

//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd.
//!
//! A service started with `Type=notify` finds the address of the service manager's socket in
//! `NOTIFY_SOCKET`: an absolute path (`/run/systemd/notify`) or, after an `@`, a name in the
//! abstract socket namespace. It sends newline-separated `KEY=VALUE` assignments in one
//! datagram (`AF_UNIX`, `SOCK_DGRAM`): `READY=1` once it serves, `STOPPING=1` when a graceful
//! stop begins, `STATUS=...` a line for `systemctl status`, `MAINPID=...`, and `WATCHDOG=1`
//! at least every `WATCHDOG_USEC` microseconds when the unit sets `WatchdogSec=`.
//!
//! [`Notifier::from_env`] reads `NOTIFY_SOCKET` (and `WATCHDOG_USEC`, `WATCHDOG_PID`) and
//! removes them from the environment so that child processes do not inherit them (a child
//! would otherwise report readiness for this service). Removing an environment variable
//! races with any other thread reading the environment, so it is done only while the process
//! has a single thread (see [`remove_env_single_threaded`]); call `from_env` first thing in
//! `main`. This lives in the engine crate because that one `unsafe` call may only be written
//! in the engine, ring and FFI crates.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. A
//! `NOTIFY_SOCKET` that cannot be used (not a path or `@name`, nobody listening) is reported
//! by [`Notifier::notify`] as an [`Error`]; the caller logs it and keeps serving: readiness is
//! a courtesy to the service manager, never a reason to stop.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable that holds the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Microseconds between the watchdog pings the service manager expects at most.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid the watchdog is meant for (absent: this process).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// Longest `STATUS=` text sent, in bytes (longer text is cut at a character boundary).
pub const STATUS_BYTES_MAX: usize = 512;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@name` (systemd also knows `vsock:`
    /// addresses, which this implementation does not).
    #[error(
        "NOTIFY_SOCKET={value:?} is not an absolute path or @abstract-name: readiness is not reported"
    )]
    Unsupported {
        /// The variable's value.
        value: String,
    },
    /// The address could not be made into a Unix socket address (too long, a NUL byte).
    #[error("NOTIFY_SOCKET={value:?}: {source}")]
    Address {
        /// The variable's value.
        value: String,
        /// What the socket layer said.
        source: std::io::Error,
    },
    /// Creating the sending socket or sending the datagram failed (nobody listens there, no
    /// permission).
    #[error("sending {what} to NOTIFY_SOCKET={value:?}: {source}")]
    Send {
        /// The first assignment of the message (`READY=1`, `STOPPING=1`, ...).
        what: String,
        /// The variable's value.
        value: String,
        /// What the socket layer said.
        source: std::io::Error,
    },
}

/// Where notifications go: the `NOTIFY_SOCKET` taken from the environment, if any.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
    watchdog: Option<Duration>,
    env_kept: bool,
}

impl Notifier {
    /// Takes `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment and
    /// removes them when the process has one thread (see [`Notifier::env_kept`]). The
    /// watchdog interval is kept only when `WATCHDOG_PID` is absent or names this process.
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
        let socket = var(NOTIFY_SOCKET).filter(|s| !s.is_empty());
        let usec = var(WATCHDOG_USEC).and_then(|s| s.trim().parse::<u64>().ok());
        let for_us = var(WATCHDOG_PID)
            .is_none_or(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = usec.filter(|&u| u > 0 && for_us).map(Duration::from_micros);
        let present = [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID]
            .iter()
            .any(|k| std::env::var_os(k).is_some());
        let env_kept =
            present && !remove_env_single_threaded(&[NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID]);
        Notifier {
            socket,
            watchdog,
            env_kept,
        }
    }

    /// A notifier sending to `socket` (a path or `@name`), as if `NOTIFY_SOCKET` said so.
    pub fn to_socket(socket: impl Into<String>) -> Notifier {
        Notifier {
            socket: Some(socket.into()),
            watchdog: None,
            env_kept: false,
        }
    }

    /// Whether a service manager asked for notifications (`NOTIFY_SOCKET` was set).
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The `NOTIFY_SOCKET` value, if any.
    pub fn socket(&self) -> Option<&str> {
        self.socket.as_deref()
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// advises. `None` without a watchdog (or one meant for another pid).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Whether the variables were present but could not be removed from the environment
    /// (the process already had more than one thread): children would inherit them.
    pub fn env_kept(&self) -> bool {
        self.env_kept
    }

    /// `READY=1` with `MAINPID` and a `STATUS` line.
    pub fn ready(&self, status: &str) -> Result<(), Error> {
        let pid = std::process::id();
        self.notify(&format!(
            "READY=1\nMAINPID={pid}\nSTATUS={}\n",
            status_text(status)
        ))
    }

    /// `STOPPING=1` with a `STATUS` line.
    pub fn stopping(&self, status: &str) -> Result<(), Error> {
        self.notify(&format!("STOPPING=1\nSTATUS={}\n", status_text(status)))
    }

    /// A new `STATUS` line.
    pub fn status(&self, status: &str) -> Result<(), Error> {
        self.notify(&format!("STATUS={}\n", status_text(status)))
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> Result<(), Error> {
        self.notify("WATCHDOG=1\n")
    }

    /// Sends `message` (newline-separated assignments) in one datagram; does nothing without
    /// `NOTIFY_SOCKET`.
    pub fn notify(&self, message: &str) -> Result<(), Error> {
        let Some(value) = self.socket.as_deref() else {
            return Ok(());
        };
        let addr = unix_addr(value)?;
        let what = message.lines().next().unwrap_or_default().to_owned();
        let send_err = |source| Error::Send {
            what: what.clone(),
            value: value.to_owned(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(send_err)?;
        sock.send_to_addr(message.as_bytes(), &addr)
            .map_err(send_err)?;
        Ok(())
    }
}

/// One line, at most [`STATUS_BYTES_MAX`] bytes: a newline would end the assignment.
fn status_text(status: &str) -> String {
    let mut s: String = status
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if s.len() > STATUS_BYTES_MAX {
        let mut end = STATUS_BYTES_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `NOTIFY_SOCKET`'s value as a Unix socket address: `/path` or `@abstract`.
fn unix_addr(value: &str) -> Result<UnixAddr, Error> {
    let addr_err = |source| Error::Address {
        value: value.to_owned(),
        source,
    };
    if let Some(name) = value.strip_prefix('@') {
        UnixAddr::from_abstract_name(name.as_bytes()).map_err(addr_err)
    } else if value.starts_with('/') {
        UnixAddr::from_pathname(std::ffi::OsStr::from_bytes(value.as_bytes())).map_err(addr_err)
    } else {
        Err(Error::Unsupported {
            value: value.to_owned(),
        })
    }
}

/// The number of threads of this process, from `/proc/self/status` (`None` if unreadable).
fn thread_count() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Removes the variables `keys` from the environment if this process has exactly one thread
/// (this one); returns whether it did. With more threads it leaves the environment alone:
/// another thread could be reading it.
pub fn remove_env_single_threaded(keys: &[&str]) -> bool {
    if thread_count() != Some(1) {
        return false;
    }
    for k in keys {
        // SAFETY: `remove_var` is unsound only while another thread may read or write the
        // environment. The kernel just reported that this process has one thread, the one
        // running this code, and nothing here starts another before the loop ends.
        unsafe { std::env::remove_var(k) };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_stopping_and_status_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::to_socket(path.to_str().unwrap());
        assert!(n.enabled());
        n.ready("serving\non 127.0.0.1:7400").unwrap();
        let got = recv(&sock);
        assert_eq!(
            got,
            format!(
                "READY=1\nMAINPID={}\nSTATUS=serving on 127.0.0.1:7400\n",
                std::process::id()
            )
        );
        n.stopping("bye").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=bye\n");
        n.watchdog().unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
        let long = "é".repeat(STATUS_BYTES_MAX);
        n.status(&long).unwrap();
        let got = recv(&sock);
        assert!(got.len() <= "STATUS=\n".len() + STATUS_BYTES_MAX, "{got}");
    }

    #[test]
    fn an_abstract_socket_is_reached_with_an_at_sign() {
        let name = format!("unid-sd-notify-test-{}", std::process::id());
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::to_socket(format!("@{name}")).ready("up").unwrap();
        assert!(recv(&sock).starts_with("READY=1\n"));
    }

    #[test]
    fn unusable_sockets_are_errors_that_name_the_variable_and_no_socket_is_a_no_op() {
        let err = Notifier::to_socket("relative/path").ready("x").unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        let err = Notifier::to_socket("/nonexistent/unid/notify")
            .ready("x")
            .unwrap_err();
        assert!(
            err.to_string().contains("READY=1") && err.to_string().contains("/nonexistent"),
            "{err}"
        );
        let err = Notifier::to_socket(format!("/{}", "x".repeat(200)))
            .ready("x")
            .unwrap_err();
        assert!(matches!(err, Error::Address { .. }), "{err}");
        let none = Notifier::default();
        assert!(!none.enabled());
        none.ready("x").unwrap();
    }

    #[test]
    fn the_environment_is_left_alone_while_other_threads_run() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        assert!(thread_count().unwrap() > 1);
        assert!(!remove_env_single_threaded(&["UNID_SD_NOTIFY_NEVER_SET"]));
        drop(tx);
        let _ = other.join();
    }
}

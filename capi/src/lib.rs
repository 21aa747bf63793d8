//! C bindings of the `unid` client crate: `libunid.so`, `libunid.a` and `include/unid.h`
//! (generated from this file by cbindgen; see `build.rs`).
//!
//! Everything about rings, sockets, agents and pairs is the client crate's; this crate only
//! converts: ids to two 64-bit halves, errors to status codes with the client's message kept per
//! thread, panics to `UNID_INTERNAL`, and after `fork()` a handle opens its sequence again
//! before it is used in the child.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use unid_client::{Error, Options, Unid};

/// Success.
pub const UNID_OK: c_int = 0;
/// No agent serves this sequence here: no ring and no socket answer.
pub const UNID_AGENT_NOT_RUNNING: c_int = 1;
/// The agent does not serve this sequence, or the cluster does not know it.
pub const UNID_UNKNOWN_SEQUENCE: c_int = 2;
/// The sequence has no ids left in its width. Final: ids never wrap.
pub const UNID_EXHAUSTED: c_int = 3;
/// The agent runs but has no ids right now (cluster unreachable, or starting): retry later.
pub const UNID_NOT_READY: c_int = 4;
/// This process may not map the ring file (run as the agent's user or in its group).
pub const UNID_PERMISSION_DENIED: c_int = 5;
/// Not a valid sequence name: 1-64 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub const UNID_INVALID_NAME: c_int = 6;
/// A count of 0, or more than the client allows at once.
pub const UNID_BAD_COUNT: c_int = 7;
/// The ring file is broken or of another version: restart the agent.
pub const UNID_RING: c_int = 8;
/// The agent's socket answered something that is not the unid protocol.
pub const UNID_PROTOCOL: c_int = 9;
/// Talking to the agent's socket failed.
pub const UNID_IO: c_int = 10;
/// A null pointer, a string that is not UTF-8, or a socket address that does not parse.
pub const UNID_INVALID_ARGUMENT: c_int = 11;
/// A bug in the library (a panic, caught); the message says where.
pub const UNID_INTERNAL: c_int = 12;
/// Another error of the client (a kind newer than this list); the message says what.
pub const UNID_OTHER: c_int = 13;
/// A ring folder, ring file or socket is not owned by a trusted user (this process's, root,
/// or `UNID_AGENT_UID`).
pub const UNID_INSECURE: c_int = 14;
/// The ring handed out ids this handle must not return (a rewound or tampered ring); none was
/// returned.
pub const UNID_CORRUPT: c_int = 15;

/// An id: the low and high 64 bits of its value (`hi` is 0 for sequences of up to 8 bytes).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UnidId {
    /// Bits 0-63.
    pub lo: u64,
    /// Bits 64-127.
    pub hi: u64,
}

impl UnidId {
    fn new(v: u128) -> UnidId {
        UnidId {
            lo: v as u64,
            hi: (v >> 64) as u64,
        }
    }
}

/// A handle on one sequence (opaque).
pub struct Handle {
    sequence: String,
    options: Options,
    /// `None` while a child could not open the sequence again.
    unid: Option<Unid>,
    /// The fork generation `unid` was opened in.
    generation: u64,
}

/// Bumped in every child process by the `pthread_atfork` child handler.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER_AT_FORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

fn register_at_fork() {
    REGISTER_AT_FORK.call_once(|| {
        // SAFETY: the handler is an `extern "C" fn()` item that lives for the whole process and
        // only touches an atomic (async-signal-safe, as a child handler must be). A failure
        // (ENOMEM) leaves handles without fork detection; nothing else depends on it.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(code: c_int, message: String) -> c_int {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = c);
    code
}

fn fail_unid(e: Error) -> c_int {
    let code = match e {
        Error::AgentNotRunning { .. } => UNID_AGENT_NOT_RUNNING,
        Error::UnknownSequence { .. } => UNID_UNKNOWN_SEQUENCE,
        Error::Exhausted { .. } => UNID_EXHAUSTED,
        Error::NotReady { .. } => UNID_NOT_READY,
        Error::PermissionDenied { .. } => UNID_PERMISSION_DENIED,
        Error::Insecure { .. } => UNID_INSECURE,
        Error::Corrupt { .. } => UNID_CORRUPT,
        Error::InvalidName { .. } => UNID_INVALID_NAME,
        Error::BadCount { .. } => UNID_BAD_COUNT,
        Error::Ring(_) => UNID_RING,
        Error::Protocol { .. } => UNID_PROTOCOL,
        Error::Io { .. } => UNID_IO,
        _ => UNID_OTHER,
    };
    fail(code, e.to_string())
}

/// Runs `f`, turning a panic into `UNID_INTERNAL` (unwinding into C is undefined).
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(code) => code,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            fail(UNID_INTERNAL, format!("internal error in libunid: {what}"))
        }
    }
}

/// A borrowed C string as `&str`.
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, c_int> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string valid for the call (header contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| fail(UNID_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

impl Handle {
    /// The client handle, opened again first if this process is a fork child of the one that
    /// opened it.
    #[inline]
    fn unid(&mut self) -> Result<&mut Unid, c_int> {
        let generation = FORK_GENERATION.load(Ordering::Relaxed);
        if self.generation != generation || self.unid.is_none() {
            self.reopen(generation)?;
        }
        Ok(self.unid.as_mut().expect("opened"))
    }

    #[cold]
    fn reopen(&mut self, generation: u64) -> Result<(), c_int> {
        // Forked: what the parent's copy holds (ids taken beyond those returned, a socket
        // reply's ids, the connection) is the parent's. Another thread may have been inside it
        // at the fork, so it is leaked, not dropped.
        if let Some(old) = self.unid.take() {
            std::mem::forget(old);
        }
        self.unid = Some(Unid::open_with(&self.sequence, self.options.clone()).map_err(fail_unid)?);
        self.generation = generation;
        Ok(())
    }
}

/// Opens `sequence` with the defaults (ring folder `UNID_RING_DIR`, else `/dev/shm/unid`;
/// socket `UNID_SOCKET`, else `127.0.0.1:7411`; wait 2 s for an empty ring): maps its ring, or
/// checks that the agent's socket answers. On success stores a new handle in `*out` and
/// returns `UNID_OK`; else returns an error code (`UNID_AGENT_NOT_RUNNING` without an agent)
/// and leaves `*out` untouched.
///
/// # Safety
/// `sequence` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_open(sequence: *const c_char, out: *mut *mut Handle) -> c_int {
    // SAFETY: the caller's contract is this function's.
    unsafe { unid_open_with(sequence, std::ptr::null(), std::ptr::null(), -1, out) }
}

/// Like `unid_open`, with the ring folder (`ring_dir`), the agent's socket (`socket`, as
/// `HOST:PORT`) and how long a take waits for an empty ring (`wait_ms`) given; NULL (or a
/// negative `wait_ms`) keeps the default.
///
/// # Safety
/// `sequence` is a NUL-terminated string, `ring_dir` and `socket` are NULL or NUL-terminated
/// strings; `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_open_with(
    sequence: *const c_char,
    ring_dir: *const c_char,
    socket: *const c_char,
    wait_ms: i64,
    out: *mut *mut Handle,
) -> c_int {
    guard(|| {
        register_at_fork();
        if out.is_null() {
            return fail(UNID_INVALID_ARGUMENT, "unid_open: out is NULL".into());
        }
        // SAFETY: the three strings are NULL or NUL-terminated (the caller's contract).
        let (sequence, ring_dir, socket) = match unsafe {
            (
                text(sequence, "sequence"),
                text(ring_dir, "ring_dir"),
                text(socket, "socket"),
            )
        } {
            (Ok(Some(q)), Ok(d), Ok(s)) => (q, d, s),
            (Ok(None), ..) => {
                return fail(UNID_INVALID_ARGUMENT, "unid_open: sequence is NULL".into());
            }
            (Err(c), ..) | (_, Err(c), _) | (.., Err(c)) => return c,
        };
        let mut options = Options::default();
        if let Some(d) = ring_dir {
            options.ring_dir = PathBuf::from(d);
        }
        if let Some(s) = socket {
            match s.parse::<SocketAddr>() {
                Ok(a) => options.socket = a,
                Err(_) => {
                    return fail(
                        UNID_INVALID_ARGUMENT,
                        format!("socket must be HOST:PORT, e.g. 127.0.0.1:7411, not {s:?}"),
                    );
                }
            }
        }
        if wait_ms >= 0 {
            options.wait = Duration::from_millis(wait_ms as u64);
        }
        let generation = FORK_GENERATION.load(Ordering::Relaxed);
        match Unid::open_with(sequence, options.clone()) {
            Ok(unid) => {
                let h = Box::new(Handle {
                    sequence: sequence.to_owned(),
                    options,
                    unid: Some(unid),
                    generation,
                });
                // SAFETY: `out` is non-null and writable (checked above, the caller's contract).
                unsafe { out.write(Box::into_raw(h)) };
                UNID_OK
            }
            Err(e) => fail_unid(e),
        }
    })
}

/// Takes the next id into `*out`: from the ring (waiting up to the handle's wait for an empty
/// one), else from the agent's socket. Returns `UNID_OK` or an error code (`*out` untouched).
///
/// # Safety
/// `handle` comes from `unid_open` and is not closed nor used by another thread during the
/// call; `out` points to writable storage for a `unid_id`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_next(handle: *mut Handle, out: *mut UnidId) -> c_int {
    guard(|| {
        if handle.is_null() || out.is_null() {
            return fail(UNID_INVALID_ARGUMENT, "unid_next: NULL argument".into());
        }
        // SAFETY: a live handle from `unid_open`, used by this thread only (the contract).
        let h = unsafe { &mut *handle };
        let unid = match h.unid() {
            Ok(u) => u,
            Err(c) => return c,
        };
        match unid.next() {
            Ok(id) => {
                // SAFETY: `out` is non-null and writable (checked above, the contract).
                unsafe { out.write(UnidId::new(id.get())) };
                UNID_OK
            }
            Err(e) => fail_unid(e),
        }
    })
}

/// Takes up to `max` consecutive ids, at least one: stores the first in `*first` and how many
/// in `*count` (the ids `first .. first + count - 1`). The cheapest way to take many; at most
/// 10,000 a call. `max` = 0 is `UNID_BAD_COUNT`.
///
/// # Safety
/// As `unid_next`; `first` and `count` point to writable storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_take_range(
    handle: *mut Handle,
    max: u64,
    first: *mut UnidId,
    count: *mut u64,
) -> c_int {
    guard(|| {
        if handle.is_null() || first.is_null() || count.is_null() {
            return fail(
                UNID_INVALID_ARGUMENT,
                "unid_take_range: NULL argument".into(),
            );
        }
        if max == 0 {
            return fail_unid(Error::BadCount { asked: 0 });
        }
        // SAFETY: a live handle from `unid_open`, used by this thread only (the contract).
        let h = unsafe { &mut *handle };
        let unid = match h.unid() {
            Ok(u) => u,
            Err(c) => return c,
        };
        match unid.take_range(max) {
            Ok((id, n)) => {
                // SAFETY: both are non-null and writable (checked above, the contract).
                unsafe {
                    first.write(UnidId::new(id.get()));
                    count.write(n);
                }
                UNID_OK
            }
            Err(e) => fail_unid(e),
        }
    })
}

/// The sequence's width in bytes (2, 4, 8 or 16), or 0 while unknown (a handle on the socket
/// before its first id) or for a NULL handle.
///
/// # Safety
/// `handle` is NULL or comes from `unid_open`, not closed, not used by another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_width(handle: *const Handle) -> c_int {
    // SAFETY: NULL or a live handle (the contract).
    let Some(h) = (unsafe { handle.as_ref() }) else {
        return 0;
    };
    h.unid
        .as_ref()
        .and_then(|u| u.width())
        .map_or(0, |w| c_int::from(w.bytes()))
}

/// 1 if the handle takes ids from the shared-memory ring, 0 if from the agent's socket (or for
/// a NULL handle).
///
/// # Safety
/// As `unid_width`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_via_ring(handle: *const Handle) -> c_int {
    // SAFETY: NULL or a live handle (the contract).
    let Some(h) = (unsafe { handle.as_ref() }) else {
        return 0;
    };
    c_int::from(h.unid.as_ref().is_some_and(|u| u.via_ring()))
}

/// Frees a handle (unmaps its ring, closes its socket). NULL is ignored. Ids it took and did
/// not return are lost, never handed out again.
///
/// # Safety
/// `handle` is NULL or comes from `unid_open` and is not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_close(handle: *mut Handle) {
    if handle.is_null() {
        return;
    }
    // SAFETY: from `Box::into_raw` in `unid_open_with`, freed exactly once (the contract).
    let h = unsafe { Box::from_raw(handle) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(h)));
}

/// The message of this thread's last failed unid call ("" if none): says what went wrong and
/// what to do. Valid until this thread's next unid call; do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn unid_error_message() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

/// Writes `id` in decimal, NUL-terminated, into `buf` of `len` bytes (40 always suffice).
/// Returns the number of digits, or 0 if `buf` is NULL or too small.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unid_id_format(id: UnidId, buf: *mut c_char, len: usize) -> usize {
    let v = (u128::from(id.hi) << 64) | u128::from(id.lo);
    let s = v.to_string();
    if buf.is_null() || s.len() >= len {
        return 0;
    }
    // SAFETY: `buf` has `len` > `s.len()` writable bytes (the contract, checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_current() {
        let generated = include_str!(concat!(env!("OUT_DIR"), "/unid.h"));
        let checked_in = include_str!("../include/unid.h");
        assert!(
            generated == checked_in,
            "capi/include/unid.h is stale: run scripts/test-capi.sh --update-header and commit it"
        );
    }

    #[test]
    fn ids_split_into_halves_and_format_in_decimal() {
        let v = (7u128 << 64) | 9;
        let id = UnidId::new(v);
        assert_eq!((id.lo, id.hi), (9, 7));
        let mut buf = [0 as c_char; 40];
        // SAFETY: `buf` has 40 writable bytes.
        let n = unsafe { unid_id_format(id, buf.as_mut_ptr(), buf.len()) };
        // SAFETY: `unid_id_format` wrote a NUL-terminated string into `buf`.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!((n, s), (v.to_string().len(), v.to_string().as_str()));
        let max = UnidId::new(u128::MAX);
        // SAFETY: as above; 39 digits and the NUL need 40 bytes.
        assert_eq!(unsafe { unid_id_format(max, buf.as_mut_ptr(), 40) }, 39);
        // SAFETY: as above; 39 bytes are too few.
        assert_eq!(unsafe { unid_id_format(max, buf.as_mut_ptr(), 39) }, 0);
    }

    #[test]
    fn errors_are_codes_with_the_clients_message() {
        let mut h: *mut Handle = std::ptr::null_mut();
        let seq = c"no spaces allowed";
        // SAFETY: a NUL-terminated name and a writable out pointer.
        let rc = unsafe { unid_open(seq.as_ptr(), &mut h) };
        assert_eq!(rc, UNID_INVALID_NAME);
        assert!(h.is_null());
        // SAFETY: the library's NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(unid_error_message()) }
            .to_str()
            .unwrap();
        assert!(msg.contains("invalid sequence name"), "{msg}");
        // SAFETY: NULL arguments are checked, not dereferenced.
        let rc = unsafe { unid_next(std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(rc, UNID_INVALID_ARGUMENT);
        // SAFETY: a NUL-terminated name, NULL ring dir, a bad socket string.
        let rc = unsafe {
            unid_open_with(
                c"s".as_ptr(),
                std::ptr::null(),
                c"nope".as_ptr(),
                -1,
                &mut h,
            )
        };
        assert_eq!(rc, UNID_INVALID_ARGUMENT);
    }
}

//! Python bindings of the `unid` client crate: the native module `unid._unid`, re-exported by
//! the pure-Python package `unid` (`python/unid/__init__.py`).
//!
//! Everything about rings, sockets, agents and pairs is the `unid` crate's; this crate only
//! converts: ids to Python ints, `unid::Error` variants to exception classes (their messages
//! unchanged), and it adds two things a Python process needs:
//!
//! - **The GIL is released** for every call into the client (`Python::detach`), so a thread
//!   waiting for an empty ring or the agent's socket does not stop the others.
//! - **Fork safety.** A handle remembers the fork generation it was opened in; a
//!   `pthread_atfork` child handler bumps the generation, and a handle used in a child opens its
//!   sequence anew before anything else, dropping whatever the parent's copy held: ids taken
//!   beyond what was returned, ids buffered from a socket reply, the socket connection itself
//!   (shared with the parent, so replies could go to either process). A fork waits until calls
//!   in flight in other threads have left the client (the *fork gate*), so the child never
//!   inherits a handle locked by a thread that does not exist in it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

create_exception!(
    unid,
    Error,
    PyException,
    "Base class of every unid error; the message says what to do."
);
create_exception!(
    unid,
    AgentNotRunning,
    Error,
    "No unid agent serves this sequence here: no ring and no socket answer."
);
create_exception!(
    unid,
    UnknownSequence,
    Error,
    "The agent does not serve this sequence, or the cluster does not know it."
);
create_exception!(
    unid,
    Exhausted,
    Error,
    "The sequence has no ids left in its width. Final: ids never wrap."
);
create_exception!(
    unid,
    NotReady,
    Error,
    "The agent runs but has no ids right now (cluster unreachable, or starting). Retry later."
);
create_exception!(
    unid,
    PermissionDenied,
    Error,
    "This process may not map the ring file (run as the agent's user or in its group)."
);
create_exception!(
    unid,
    Insecure,
    Error,
    "A ring folder, ring file or socket is not owned by a trusted user (this one, root, the agent's)."
);
create_exception!(
    unid,
    Corrupt,
    Error,
    "The ring handed out ids this handle must not return (a rewound or tampered ring); none was returned."
);
create_exception!(
    unid,
    InvalidName,
    Error,
    "Not a valid sequence name: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit."
);
create_exception!(
    unid,
    BadCount,
    Error,
    "More ids asked for at once than the client allows, or none."
);
create_exception!(
    unid,
    TooWide,
    Error,
    "An id does not fit the integer type asked for."
);
create_exception!(
    unid,
    RingError,
    Error,
    "The ring file is broken or of another version; restart the agent."
);
create_exception!(
    unid,
    ProtocolError,
    Error,
    "The agent's socket answered something that is not the unid protocol."
);
create_exception!(
    unid,
    SocketError,
    Error,
    "Talking to the agent's socket failed."
);

/// Bumped in every child process by the `pthread_atfork` child handler.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
/// Calls inside the client right now (the fork gate).
static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// A fork is being prepared: new calls wait until it is done.
static FORKING: AtomicBool = AtomicBool::new(false);
static REGISTER_AT_FORK: Once = Once::new();

extern "C" fn before_fork() {
    FORKING.store(true, Ordering::SeqCst);
    // A call in flight holds a handle's lock and runs without the GIL; it leaves within the
    // handle's `wait` (2 s by default) or the socket's read timeout.
    while CALLS_IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

extern "C" fn after_fork_in_parent() {
    FORKING.store(false, Ordering::SeqCst);
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
}

fn register_at_fork() -> PyResult<()> {
    let mut rc = 0;
    REGISTER_AT_FORK.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()` items that live for the whole
        // process and only touch atomics (async-signal-safe, as a child handler must be).
        rc = unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_in_parent),
                Some(after_fork_in_child),
            )
        };
    });
    if rc != 0 {
        return Err(PyException::new_err(format!(
            "pthread_atfork failed ({rc}): unid cannot make its handles fork-safe"
        )));
    }
    Ok(())
}

/// Held while a call is inside the client; a fork waits for none to be held.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        loop {
            while FORKING.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            if !FORKING.load(Ordering::SeqCst) {
                return InFlight;
            }
            CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a call failed, built without the GIL and turned into an exception with it.
enum Failure {
    Unid(unid::Error),
    Closed,
}

impl From<unid::Error> for Failure {
    fn from(e: unid::Error) -> Failure {
        Failure::Unid(e)
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        let e = match f {
            Failure::Closed => return PyValueError::new_err("operation on a closed unid handle"),
            Failure::Unid(e) => e,
        };
        let text = e.to_string();
        match e {
            unid::Error::AgentNotRunning { .. } => AgentNotRunning::new_err(text),
            unid::Error::UnknownSequence { .. } => UnknownSequence::new_err(text),
            unid::Error::Exhausted { .. } => Exhausted::new_err(text),
            unid::Error::NotReady { .. } => NotReady::new_err(text),
            unid::Error::PermissionDenied { .. } => PermissionDenied::new_err(text),
            unid::Error::Insecure { .. } => Insecure::new_err(text),
            unid::Error::Corrupt { .. } => Corrupt::new_err(text),
            unid::Error::InvalidName { .. } => InvalidName::new_err(text),
            unid::Error::BadCount { .. } => BadCount::new_err(text),
            unid::Error::TooWide { .. } => TooWide::new_err(text),
            unid::Error::Ring(_) => RingError::new_err(text),
            unid::Error::Protocol { .. } => ProtocolError::new_err(text),
            unid::Error::Io { .. } => SocketError::new_err(text),
            // Variants added to the client later keep their message.
            _ => Error::new_err(text),
        }
    }
}

/// What a handle holds behind its lock.
struct State {
    /// `None` once closed, or while a child could not open its sequence again.
    unid: Option<unid::Unid>,
    closed: bool,
    /// The fork generation `unid` was opened in.
    generation: u64,
}

/// A handle on one sequence: `unid.open("orders")`.
///
/// Safe to share between threads (calls on one handle take turns; open one per thread for
/// parallel takes) and across `os.fork()` (a child's handle opens the sequence again and never
/// hands out what the parent's had taken).
#[pyclass(module = "unid", name = "Unid", frozen)]
struct PyUnid {
    sequence: String,
    options: unid::Options,
    state: Mutex<State>,
}

impl PyUnid {
    /// Runs `f` on the client without the GIL, inside the fork gate, after opening the
    /// sequence again if this process is a fork child of the one that opened it.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut unid::Unid) -> Result<T, unid::Error> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let _gate = InFlight::enter();
            // A panic in the client (a broken invariant) poisons the lock; the next call
            // still gets the handle, which the client keeps consistent between calls.
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.closed {
                return Err(Failure::Closed);
            }
            let generation = FORK_GENERATION.load(Ordering::SeqCst);
            if st.generation != generation || st.unid.is_none() {
                // Forked (or a reopen failed before): what the parent's copy held is the
                // parent's. Dropping it is safe: the fork gate saw no call in flight.
                st.unid = None;
                st.unid = Some(unid::Unid::open_with(&self.sequence, self.options.clone())?);
                st.generation = generation;
            }
            let unid = st.unid.as_mut().expect("opened above");
            Ok(f(unid)?)
        })
        .map_err(PyErr::from)
    }
}

/// An id as a Python int (u64 when it fits: the common, faster conversion).
fn id_to_py(py: Python<'_>, value: u128) -> PyResult<Bound<'_, PyAny>> {
    Ok(match u64::try_from(value) {
        Ok(v) => v.into_pyobject(py)?.into_any(),
        Err(_) => value.into_pyobject(py)?.into_any(),
    })
}

#[pymethods]
impl PyUnid {
    /// The next id, an int. Waits up to the handle's `wait` for an empty ring.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let id = self.call(py, |u| u.next())?;
        id_to_py(py, id.get())
    }

    /// `n` ids (1..=1,000,000), increasing, as a list of ints. Consecutive runs come from one
    /// block; there may be gaps between runs.
    fn take<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyList>> {
        // Runs, not a Vec of 24-byte `Id`s: the list is built from them with the GIL.
        let runs = self.call(py, |u| {
            if !(1..=unid::TAKE_IDS_MAX).contains(&n) {
                return Err(unid::Error::BadCount { asked: n });
            }
            let mut runs = Vec::new();
            let mut got = 0usize;
            while got < n {
                let (first, count) = u.take_range((n - got) as u64)?;
                runs.push((first.get(), count));
                got += count as usize;
            }
            Ok(runs)
        })?;
        let list = PyList::empty(py);
        for (first, count) in runs {
            match u64::try_from(first + u128::from(count)) {
                Ok(end) => {
                    let first = first as u64;
                    for v in first..end {
                        list.append(v)?;
                    }
                }
                Err(_) => {
                    for i in 0..count {
                        list.append(first + u128::from(i))?;
                    }
                }
            }
        }
        Ok(list)
    }

    /// Up to `max` consecutive ids, at least one: `(first, count)`, the ids
    /// `range(first, first + count)`. The cheapest way to take many (at most 10,000 a call).
    fn take_range<'py>(&self, py: Python<'py>, max: u64) -> PyResult<(Bound<'py, PyAny>, u64)> {
        if max == 0 {
            return Err(BadCount::new_err(
                unid::Error::BadCount { asked: 0 }.to_string(),
            ));
        }
        let (first, count) = self.call(py, |u| u.take_range(max))?;
        Ok((id_to_py(py, first.get())?, count))
    }

    /// Releases the ring mapping and the socket. Further calls raise `ValueError`.
    fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        st.unid = None;
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// The sequence's name.
    #[getter]
    fn sequence(&self) -> &str {
        &self.sequence
    }

    /// The sequence's width in bytes (2, 4, 8 or 16), once known.
    #[getter]
    fn width(&self, py: Python<'_>) -> PyResult<Option<u8>> {
        self.call(py, |u| Ok(u.width().map(|w| w.bytes())))
    }

    /// Whether ids come from the shared-memory ring (else the agent's socket).
    #[getter]
    fn via_ring(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, |u| Ok(u.via_ring()))
    }

    /// Whether this handle maps the rings of a primary/backup agent pair.
    #[getter]
    fn paired(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, |u| Ok(u.paired()))
    }

    /// In pair mode: whether the ring used last is the backup agent's.
    #[getter]
    fn on_backup(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, |u| Ok(u.on_backup()))
    }

    /// Counters: `{"switches": ..., "ids_skipped": ...}` (switches between paired rings, ids
    /// discarded after a switch: lost, never repeated).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.call(py, |u| Ok(u.stats()))?;
        let d = PyDict::new(py);
        d.set_item("switches", s.switches)?;
        d.set_item("ids_skipped", s.ids_skipped)?;
        Ok(d)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _ty: Option<Bound<'_, PyAny>>,
        _value: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let how = match (&st.unid, st.closed) {
            (_, true) => "closed",
            (Some(u), _) if u.via_ring() => "ring",
            (Some(_), _) => "socket",
            (None, _) => "not open",
        };
        format!("<unid.Unid {:?} ({how})>", self.sequence)
    }
}

/// Opens `sequence`: maps the local agent's ring, or (unless `socket_fallback=False`) checks
/// that the agent's socket answers. Keyword arguments override the defaults, which come from
/// `UNID_RING_DIR`, `UNID_SOCKET`, `UNID_BACKUP_RING_DIR` and `UNID_AGENT_UID` (else
/// `/dev/shm/unid`, `127.0.0.1:7411`, the pair file, none); `wait` is in seconds (default 2);
/// `agent_uid` is the agent's user when it is neither this process's nor root.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, each optional
#[pyo3(signature = (sequence, *, ring_dir=None, socket=None, backup_ring_dir=None, wait=None, socket_fallback=true, agent_uid=None))]
fn open(
    py: Python<'_>,
    sequence: &str,
    ring_dir: Option<PathBuf>,
    socket: Option<&str>,
    backup_ring_dir: Option<PathBuf>,
    wait: Option<f64>,
    socket_fallback: bool,
    agent_uid: Option<u32>,
) -> PyResult<PyUnid> {
    let mut options = unid::Options::default();
    if let Some(d) = ring_dir {
        options.ring_dir = d;
    }
    if let Some(s) = socket {
        options.socket = s.parse::<SocketAddr>().map_err(|_| {
            PyValueError::new_err(format!(
                "socket must be HOST:PORT, e.g. 127.0.0.1:7411, not {s:?}"
            ))
        })?;
    }
    if backup_ring_dir.is_some() {
        options.backup_ring_dir = backup_ring_dir;
    }
    if let Some(w) = wait {
        options.wait = Duration::try_from_secs_f64(w)
            .map_err(|_| PyValueError::new_err(format!("wait must be seconds >= 0, not {w}")))?;
    }
    options.socket_fallback = socket_fallback;
    if agent_uid.is_some() {
        options.agent_uid = agent_uid;
    }
    let generation = FORK_GENERATION.load(Ordering::SeqCst);
    let opts = options.clone();
    let seq = sequence.to_owned();
    let unid = py
        .detach(|| {
            let _gate = InFlight::enter();
            unid::Unid::open_with(&seq, opts)
        })
        .map_err(|e| PyErr::from(Failure::Unid(e)))?;
    Ok(PyUnid {
        sequence: sequence.to_owned(),
        options,
        state: Mutex::new(State {
            unid: Some(unid),
            closed: false,
            generation,
        }),
    })
}

/// The native part of the `unid` package.
#[pymodule]
fn _unid(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_at_fork()?;
    let py = m.py();
    m.add_class::<PyUnid>()?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("AgentNotRunning", py.get_type::<AgentNotRunning>())?;
    m.add("UnknownSequence", py.get_type::<UnknownSequence>())?;
    m.add("Exhausted", py.get_type::<Exhausted>())?;
    m.add("NotReady", py.get_type::<NotReady>())?;
    m.add("PermissionDenied", py.get_type::<PermissionDenied>())?;
    m.add("Insecure", py.get_type::<Insecure>())?;
    m.add("Corrupt", py.get_type::<Corrupt>())?;
    m.add("InvalidName", py.get_type::<InvalidName>())?;
    m.add("BadCount", py.get_type::<BadCount>())?;
    m.add("TooWide", py.get_type::<TooWide>())?;
    m.add("RingError", py.get_type::<RingError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("SocketError", py.get_type::<SocketError>())?;
    m.add("TAKE_IDS_MAX", unid::TAKE_IDS_MAX)?;
    Ok(())
}

//! PostgreSQL extension `unid`: ids from the host's unid agent, inside the database.
//!
//! ```sql
//! CREATE EXTENSION unid;
//! CREATE TABLE orders (id bigint PRIMARY KEY DEFAULT unid_next('orders'), item text);
//! INSERT INTO orders (item) VALUES ('book') RETURNING id;
//! SELECT unid_take('orders', 1000);          -- SETOF bigint, for bulk loads
//! SELECT unid_next_numeric('wide');          -- numeric, for 16-byte sequences
//! ```
//!
//! Each function takes ids through the `unid` client crate: the agent's shared-memory ring (one
//! compare-and-swap, no system call), else the agent's socket, exactly as any application does.
//! Nothing runs in the postmaster (no `shared_preload_libraries`): a backend opens a handle per
//! sequence the first time it asks for one, and keeps it for the session. Backends are forked
//! from the postmaster; a handle remembers the pid that opened it and is opened again, dropping
//! whatever the old one had claimed, if it is ever used in another process, so ids one backend
//! has claimed are never handed out by another.
//!
//! Ids are taken, never given back: a transaction that rolls back, or an insert that fails,
//! loses the ids it took (as `nextval()` does) and nothing is ever repeated.
//!
//! Every client error is raised as a PostgreSQL `ERROR` with a SQLSTATE, the client's message
//! and a hint ([`sqlstate`] lists them).
//!
//! Settings (`postgresql.conf`, `ALTER SYSTEM`, or `SET` by a superuser before the first use in a
//! session; a backend reads them when it opens a sequence):
//!
//! | setting | default | what |
//! |---|---|---|
//! | `unid.ring_dir` | `UNID_RING_DIR`, else `/dev/shm/unid` | the agent's ring folder |
//! | `unid.socket` | `UNID_SOCKET`, else `127.0.0.1:7411` | the agent's localhost socket |
//! | `unid.agent_uid` | `UNID_AGENT_UID`, else none (-1) | the agent's uid when it is neither `postgres` nor root |
//! | `unid.wait_ms` | 2000 | how long a call waits for an empty ring to be refilled |

use std::cell::RefCell;
use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{AnyNumeric, GucContext, GucFlags, GucRegistry, GucSetting};

::pgrx::pg_module_magic!(name, version);

/// The most ids one `unid_take` returns (the client's bound).
pub const TAKE_IDS_MAX: i32 = unid_client::TAKE_IDS_MAX as i32;

static RING_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static SOCKET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static AGENT_UID: GucSetting<i32> = GucSetting::<i32>::new(-1);
static WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// Registers the `unid.*` settings when a backend loads the library.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    GucRegistry::define_string_guc(
        c"unid.ring_dir",
        c"The unid agent's ring folder.",
        c"Empty: UNID_RING_DIR of the server's environment, else /dev/shm/unid.",
        &RING_DIR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"unid.socket",
        c"The unid agent's localhost socket, HOST:PORT.",
        c"Empty: UNID_SOCKET of the server's environment, else 127.0.0.1:7411.",
        &SOCKET,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"unid.agent_uid",
        c"The unid agent's uid, when it runs as neither this server's user nor root.",
        c"Rings and sockets are trusted only when owned by this server's user, root or this uid. -1: UNID_AGENT_UID, else none.",
        &AGENT_UID,
        -1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"unid.wait_ms",
        c"How long a call waits for an empty ring to be refilled, in ms.",
        c"After that the agent's socket is asked, then an error is raised.",
        &WAIT_MS,
        0,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
}

/// What can go wrong; [`sqlstate`] maps each to a SQLSTATE and a hint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client crate's error, message unchanged.
    #[error(transparent)]
    Client(#[from] unid_client::Error),
    /// An 8- or 16-byte id above 2^63-1: PostgreSQL's `bigint` is signed.
    #[error("id {id} of sequence {sequence:?} does not fit bigint (above 2^63-1); the id is lost")]
    NotBigint {
        /// The sequence.
        sequence: String,
        /// The id taken.
        id: u128,
    },
    /// `unid_take` asked for fewer than 1 or more than [`TAKE_IDS_MAX`] ids.
    #[error("cannot take {asked} ids at once: 1..={TAKE_IDS_MAX}")]
    BadCount {
        /// How many were asked for.
        asked: i32,
    },
    /// A `unid.*` setting that cannot be used.
    #[error("unid.{name} = {value:?}: {reason}")]
    BadSetting {
        /// The setting, without `unid.`.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The SQLSTATE and hint of `e`.
///
/// | error | SQLSTATE |
/// |---|---|
/// | agent not running (no ring, no socket) | `08001` sqlclient_unable_to_establish_sqlconnection (as postgres_fdw) |
/// | socket broke mid-way | `08006` connection_failure |
/// | agent answered outside the protocol | `08P01` protocol_violation |
/// | unknown sequence | `42704` undefined_object |
/// | sequence exhausted | `2200H` sequence_generator_limit_exceeded (as `nextval()`) |
/// | no ids right now (cluster unreachable, agent starting) | `55000` object_not_in_prerequisite_state |
/// | no permission on the ring; a ring or socket of an untrusted owner | `42501` insufficient_privilege |
/// | id above 2^63-1 for `bigint` | `22003` numeric_value_out_of_range |
/// | bad sequence name, count or setting | `22023` invalid_parameter_value |
/// | ring broken or of another version | `58000` system_error |
/// | ring gave ids not above the last one | `XX001` data_corrupted |
pub fn sqlstate(e: &Error) -> (PgSqlErrorCode, String) {
    use PgSqlErrorCode::*;
    let setting = "set unid.ring_dir and unid.socket in postgresql.conf to the agent's";
    match e {
        Error::Client(c) => match c {
            unid_client::Error::AgentNotRunning { sequence, .. } => (
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!(
                    "start the agent on this host (`unid agent --sequence {sequence} --group-readable`), or {setting} (SHOW unid.ring_dir)"
                ),
            ),
            unid_client::Error::Io { .. } => (
                ERRCODE_CONNECTION_FAILURE,
                "the agent's socket failed mid-way: is the agent restarting? Retry.".into(),
            ),
            unid_client::Error::Protocol { .. } => (
                ERRCODE_PROTOCOL_VIOLATION,
                format!("is unid.socket a unid agent? {setting}"),
            ),
            unid_client::Error::UnknownSequence { sequence, .. } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!(
                    "create it (`unid sequence create {sequence}`) and add `--sequence {sequence}` to the agent"
                ),
            ),
            unid_client::Error::Exhausted { .. } => (
                ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
                "ids never wrap: create a new, wider sequence and use it".into(),
            ),
            unid_client::Error::NotReady { .. } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the agent runs but has no ids (servers unreachable, or starting): retry; `unid status` shows the cluster".into(),
            ),
            unid_client::Error::PermissionDenied { .. } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "run the agent with --group-readable and add this server's user to its group (`usermod -aG unid-clients postgres`), then restart PostgreSQL".into(),
            ),
            unid_client::Error::Insecure { .. } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "if the agent runs as its own user, set unid.agent_uid to its uid (`id -u unid`) in postgresql.conf".into(),
            ),
            unid_client::Error::InvalidName { .. } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                "sequence names are 1-64 of [A-Za-z0-9_.-], starting with a letter or digit".into(),
            ),
            unid_client::Error::BadCount { .. } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("ask for 1..={TAKE_IDS_MAX} ids"),
            ),
            unid_client::Error::TooWide { .. } => (
                ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                "use unid_next_numeric() and a numeric column".into(),
            ),
            unid_client::Error::Ring(_) => (ERRCODE_SYSTEM_ERROR, "restart the unid agent".into()),
            unid_client::Error::Corrupt { .. } => (
                ERRCODE_DATA_CORRUPTED,
                "a process wrote to the ring outside the protocol: restart the agent and find the writer".into(),
            ),
            _ => (ERRCODE_INTERNAL_ERROR, "see the unid client's message".into()),
        },
        Error::NotBigint { sequence, .. } => (
            ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            format!(
                "use unid_next_numeric('{sequence}') and a numeric column, or a sequence whose ids stay below 2^63"
            ),
        ),
        Error::BadCount { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("ask for 1..={TAKE_IDS_MAX} ids"),
        ),
        Error::BadSetting { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "fix the setting in postgresql.conf (SHOW unid.ring_dir, unid.socket)".into(),
        ),
    }
}

/// Raises `e` as an `ERROR` (never returns).
fn raise(e: Error) -> ! {
    let (code, hint) = sqlstate(&e);
    ErrorReport::new(code, e.to_string(), "unid")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// A sequence's handle in this backend.
struct Handle {
    sequence: String,
    /// The process that opened it: a handle is never used in another (a fork's child).
    pid: i32,
    unid: unid_client::Unid,
}

thread_local! {
    /// This backend's handles, most recently opened last; a backend uses few sequences, so a
    /// linear search by name beats hashing it. Backends run one thread.
    static HANDLES: RefCell<Vec<Handle>> = const { RefCell::new(Vec::new()) };
}

/// This process's pid as PostgreSQL knows it, read without a system call (`getpid()` cost
/// ~1.2 µs on the benchmark VM, more than the rest of a `unid_next()` call).
fn backend_pid() -> i32 {
    // SAFETY: `MyProcPid` is a plain int that PostgreSQL sets when a process starts (the
    // postmaster, and each child right after the fork, before any query runs) and never again;
    // it is read here by the backend's only thread.
    unsafe { pg_sys::MyProcPid }
}

/// The client's options from the `unid.*` settings (unset ones from the environment).
fn options() -> Result<unid_client::Options, Error> {
    let mut o = unid_client::Options::default();
    if let Some(dir) = RING_DIR.get().filter(|s| !s.is_empty()) {
        o.ring_dir = PathBuf::from(dir.to_string_lossy().into_owned());
    }
    if let Some(s) = SOCKET.get().filter(|s| !s.is_empty()) {
        let text = s.to_string_lossy().into_owned();
        o.socket = text.parse::<SocketAddr>().map_err(|_| Error::BadSetting {
            name: "socket",
            value: text.clone(),
            reason: "not an address HOST:PORT (an IP address and a port)",
        })?;
    }
    if let Ok(uid) = u32::try_from(AGENT_UID.get()) {
        o.agent_uid = Some(uid);
    }
    o.wait = Duration::from_millis(u64::try_from(WAIT_MS.get()).unwrap_or(0));
    Ok(o)
}

/// Runs `f` on this backend's handle of `sequence`, opening it first if needed (or if it was
/// opened by another process). A handle whose call failed is kept: it still knows its last id.
fn with_handle<R>(
    sequence: &str,
    f: impl FnOnce(&mut unid_client::Unid) -> Result<R, Error>,
) -> Result<R, Error> {
    let pid = backend_pid();
    HANDLES.with(|cell| {
        let mut handles = cell.borrow_mut();
        let found = handles.iter().position(|h| h.sequence == sequence);
        let k = match found {
            Some(k) if handles[k].pid == pid => k,
            _ => {
                // One opened by another process is dropped, not used: whatever it had claimed
                // stays lost to this process.
                if let Some(k) = found {
                    handles.remove(k);
                }
                let unid = unid_client::Unid::open_with(sequence, options()?)?;
                handles.push(Handle {
                    sequence: sequence.to_owned(),
                    pid,
                    unid,
                });
                handles.len() - 1
            }
        };
        f(&mut handles[k].unid)
    })
}

fn bigint(sequence: &str, id: u128) -> Result<i64, Error> {
    i64::try_from(id).map_err(|_| Error::NotBigint {
        sequence: sequence.to_owned(),
        id,
    })
}

fn count(n: i32) -> Result<u64, Error> {
    if (1..=TAKE_IDS_MAX).contains(&n) {
        Ok(n as u64)
    } else {
        Err(Error::BadCount { asked: n })
    }
}

/// `n` ids of `sequence`, increasing, as `(first, count)` runs.
fn take_runs(sequence: &str, n: u64) -> Result<Vec<(u128, u64)>, Error> {
    with_handle(sequence, |u| {
        let mut runs = Vec::new();
        let mut got = 0;
        while got < n {
            let (first, k) = u.take_range(n - got)?;
            runs.push((first.get(), k));
            got += k;
        }
        Ok(runs)
    })
}

fn next_bigint(sequence: &str) -> Result<i64, Error> {
    let id = with_handle(sequence, |u| Ok(u.next()?))?;
    bigint(sequence, id.get())
}

fn take_bigint(sequence: &str, n: i32) -> Result<Vec<i64>, Error> {
    let runs = take_runs(sequence, count(n)?)?;
    let mut ids = Vec::with_capacity(n as usize);
    for (first, k) in runs {
        // The run's last id is its largest: if it fits, all do.
        bigint(sequence, first + u128::from(k) - 1)?;
        ids.extend((0..k).map(|i| (first + u128::from(i)) as i64));
    }
    Ok(ids)
}

/// The next id of `sequence`, as `bigint`: use as a column default,
/// `id bigint DEFAULT unid_next('orders')`. An id above 2^63-1 raises `22003`.
#[pg_extern(volatile, parallel_unsafe)]
pub fn unid_next(sequence: &str) -> i64 {
    next_bigint(sequence).unwrap_or_else(|e| raise(e))
}

/// `n` ids of `sequence` (1..=1000000), increasing, as `bigint` rows: for bulk loads.
#[pg_extern(volatile, parallel_unsafe)]
pub fn unid_take(sequence: &str, n: i32) -> SetOfIterator<'static, i64> {
    SetOfIterator::new(take_bigint(sequence, n).unwrap_or_else(|e| raise(e)))
}

/// The next id of `sequence` as `numeric`: for 16-byte sequences (ids up to 2^128-2).
#[pg_extern(volatile, parallel_unsafe)]
pub fn unid_next_numeric(sequence: &str) -> AnyNumeric {
    let id = with_handle(sequence, |u| Ok(u.next()?)).unwrap_or_else(|e| raise(e));
    AnyNumeric::from(id.get())
}

/// `n` ids of `sequence`, increasing, as `numeric` rows.
#[pg_extern(volatile, parallel_unsafe)]
pub fn unid_take_numeric(sequence: &str, n: i32) -> SetOfIterator<'static, AnyNumeric> {
    let runs = count(n)
        .and_then(|n| take_runs(sequence, n))
        .unwrap_or_else(|e| raise(e));
    SetOfIterator::new(
        runs.into_iter()
            .flat_map(|(first, k)| (0..k).map(move |i| AnyNumeric::from(first + u128::from(i)))),
    )
}

/// Where this backend takes ids of `sequence` from: `ring` (shared memory) or `socket`
/// (opens the sequence if this backend has not yet).
#[pg_extern(volatile, parallel_unsafe)]
pub fn unid_source(sequence: &str) -> &'static str {
    let ring = with_handle(sequence, |u| Ok(u.via_ring())).unwrap_or_else(|e| raise(e));
    if ring { "ring" } else { "socket" }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // These tests run inside a PostgreSQL backend (`cargo pgrx test`). Where they need an
    // agent, the backend plays it: it makes a real ring with `unid_ring::Producer` in a folder
    // of its own and pushes the ids the test wants, so the whole client path (ring mapping,
    // owner checks, increase checks) runs as with a real agent. scripts/test-pg.sh adds the
    // tests against a real `unid server` and agent.
    use pgrx::pg_sys::panic::CaughtError;
    use pgrx::prelude::*;
    use std::path::PathBuf;

    /// A closed loopback port: nothing answers there.
    const NO_SOCKET: &str = "127.0.0.1:9";

    /// Runs `f`, which must raise an ERROR; returns its SQLSTATE, message and hint.
    fn error_of<R>(
        f: impl FnOnce() -> R + std::panic::UnwindSafe,
    ) -> (PgSqlErrorCode, String, String) {
        PgTryBuilder::new(|| {
            f();
            None
        })
        .catch_others(|e| match e {
            CaughtError::ErrorReport(r) | CaughtError::PostgresError(r) => Some((
                r.sql_error_code(),
                r.message().to_owned(),
                r.hint().unwrap_or("").to_owned(),
            )),
            CaughtError::RustPanic { ereport, .. } => {
                panic!("a Rust panic, not an ERROR: {}", ereport.message())
            }
        })
        .execute()
        .expect("no ERROR was raised")
    }

    /// A ring folder for one test, played by this backend, and the settings pointing at it.
    fn agent_dir(test: &str) -> PathBuf {
        let dir = PathBuf::from(format!("/tmp/unid-pgrx-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Spi::run(&format!("SET unid.ring_dir = '{}'", dir.display())).unwrap();
        Spi::run(&format!("SET unid.socket = '{NO_SOCKET}'")).unwrap();
        Spi::run("SET unid.wait_ms = 50").unwrap();
        dir
    }

    fn ring(dir: &std::path::Path, name: &str, width: u8) -> unid_ring::Producer {
        let opts = unid_ring::ProducerOptions::new(width);
        unid_ring::Producer::create(dir, name, &opts).expect("create ring")
    }

    #[pg_test]
    fn no_agent_is_08001_with_a_hint() {
        let dir = agent_dir("none");
        let (code, msg, hint) = error_of(|| crate::unid_next("orders"));
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        );
        assert!(
            msg.contains("no unid agent serves sequence \"orders\""),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(hint.contains("unid agent --sequence orders"), "{hint}");
        // Every function says the same, and a later call tries again (nothing cached).
        let (code, ..) = error_of(|| crate::unid_take("orders", 3));
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        );
        let (code, ..) = error_of(|| crate::unid_next_numeric("orders"));
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        );
    }

    #[pg_test]
    fn bad_arguments_are_22023() {
        agent_dir("args");
        let (code, msg, _) = error_of(|| crate::unid_next("no/such name"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
        assert!(msg.contains("invalid sequence name"), "{msg}");
        for n in [0, -1, crate::TAKE_IDS_MAX + 1] {
            let (code, msg, _) = error_of(move || crate::unid_take("orders", n));
            assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
            assert!(msg.contains(&format!("cannot take {n} ids")), "{msg}");
        }
        Spi::run("SET unid.socket = 'not an address'").unwrap();
        let (code, msg, _) = error_of(|| crate::unid_next("orders"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
        assert!(msg.contains("unid.socket"), "{msg}");
    }

    #[pg_test]
    fn ids_come_from_the_ring_in_order() {
        let dir = agent_dir("ring");
        let mut p = ring(&dir, "orders", 8);
        assert_eq!(p.push(1000, 100).unwrap(), 100);
        assert_eq!(crate::unid_source("orders"), "ring");
        let a = Spi::get_one::<i64>("SELECT unid_next('orders')")
            .unwrap()
            .unwrap();
        let b = Spi::get_one::<i64>("SELECT unid_next('orders')")
            .unwrap()
            .unwrap();
        assert_eq!((a, b), (1000, 1001));
        let bulk: Vec<i64> = crate::unid_take_ids("orders", 5);
        assert_eq!(bulk, vec![1002, 1003, 1004, 1005, 1006]);
        // As a column default, through SQL.
        Spi::run(
            "CREATE TEMP TABLE t (id bigint PRIMARY KEY DEFAULT unid_next('orders'), v int);
             INSERT INTO t (v) SELECT g FROM generate_series(1, 10) g;",
        )
        .unwrap();
        let (lo, hi, n) =
            Spi::get_three::<i64, i64, i64>("SELECT min(id), max(id), count(*) FROM t").unwrap();
        assert_eq!((lo, hi, n), (Some(1007), Some(1016), Some(10)));
        let sum = Spi::get_one::<i64>("SELECT sum(x)::bigint FROM unid_take('orders', 3) x")
            .unwrap()
            .unwrap();
        assert_eq!(sum, 1017 + 1018 + 1019);
        // A second block with a gap: unid_take spans it, still increasing.
        assert_eq!(p.push(5000, 10).unwrap(), 10);
        let ids = crate::unid_take_ids("orders", 90);
        assert_eq!(ids.len(), 90);
        assert_eq!(ids[..80], (1020..1100).collect::<Vec<_>>()[..]);
        assert_eq!(ids[80..], (5000..5010).collect::<Vec<_>>()[..]);
    }

    #[pg_test]
    fn ids_above_bigint_raise_22003_and_numeric_takes_them() {
        let dir = agent_dir("big");
        let mut p = ring(&dir, "big", 8);
        let max = i64::MAX as u128;
        p.push(max, 4).unwrap();
        assert_eq!(crate::unid_next("big"), i64::MAX);
        let (code, msg, hint) = error_of(|| crate::unid_next("big"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE);
        assert!(msg.contains(&format!("id {} ", max + 1)), "{msg}");
        assert!(hint.contains("unid_next_numeric('big')"), "{hint}");
        // The refused id is lost, never given again; numeric takes the next ones.
        let n = Spi::get_one::<String>("SELECT unid_next_numeric('big')::text")
            .unwrap()
            .unwrap();
        assert_eq!(n, (max + 2).to_string());
        // A take whose run crosses 2^63-1 is refused as a whole.
        p.push(max + 100, 10).unwrap();
        let (code, ..) = error_of(|| crate::unid_take("big", 5));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE);
    }

    #[pg_test]
    fn sixteen_byte_ids_as_numeric() {
        let dir = agent_dir("wide");
        let mut p = ring(&dir, "wide", 16);
        let first = 1u128 << 100;
        p.push(first, 10).unwrap();
        let got: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT x::text FROM unid_take_numeric('wide', 3) x",
                None,
                &[],
            )
            .unwrap()
            .map(|row| row.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        let want: Vec<String> = (0..3).map(|i| (first + i).to_string()).collect();
        assert_eq!(got, want);
        let n = Spi::get_one::<String>("SELECT unid_next_numeric('wide')::text")
            .unwrap()
            .unwrap();
        assert_eq!(n, (first + 3).to_string());
        let (code, ..) = error_of(|| crate::unid_next("wide"));
        assert_eq!(code, PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE);
    }

    #[pg_test]
    fn a_ring_of_a_foreign_owner_is_refused_42501() {
        // The folder belongs to this backend's user; the ring file to another uid: the client
        // must not trust it (a squatted ring). Only root can chown, so this runs only as root.
        let dir = agent_dir("foreign");
        let _p = ring(&dir, "orders", 8);
        let path = dir.join("orders");
        if std::os::unix::fs::chown(&path, Some(65534), None).is_err() {
            // Not root (the normal case: the backend runs as postgres): check a folder others
            // may write instead, which needs no privilege.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (code, msg, _) = error_of(|| crate::unid_next("orders"));
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "{msg}"
        );
        assert!(msg.contains("refusing"), "{msg}");
    }

    #[pg_test]
    fn a_closed_ring_is_drained_then_08001() {
        let dir = agent_dir("closed");
        let mut p = ring(&dir, "orders", 8);
        p.push(10, 2).unwrap();
        assert_eq!(crate::unid_next("orders"), 10);
        drop(p); // The agent stops: what is in the ring is still handed out, then the error.
        assert_eq!(crate::unid_next("orders"), 11);
        let (code, ..) = error_of(|| crate::unid_next("orders"));
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        );
        // A new agent (a new ring with higher ids): the same handle takes from it.
        let mut p = ring(&dir, "orders", 8);
        p.push(100, 5).unwrap();
        assert_eq!(crate::unid_next("orders"), 100);
    }
}

/// Test helper: `unid_take` collected (outside SQL).
#[cfg(any(test, feature = "pg_test"))]
fn unid_take_ids(sequence: &str, n: i32) -> Vec<i64> {
    take_bigint(sequence, n).unwrap_or_else(|e| raise(e))
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    /// One-off setup when the test framework starts.
    pub fn setup(_options: Vec<&str>) {}

    /// `postgresql.conf` settings the tests need.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}

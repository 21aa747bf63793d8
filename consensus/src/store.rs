//! Durable Raft log store and state machine on one `redb` database per node.
//!
//! # Durability
//! Every write transaction commits with [`redb::Durability::Immediate`]: the
//! commit returns only after redb has fsync'd. The log store calls openraft's
//! [`LogFlushed`] callback only after that commit, so openraft never counts an
//! entry as persisted (and so never acknowledges it to a leader, nor commits
//! it as leader) before it is on disk. Any redb error (including a failed
//! fsync) becomes an openraft [`StorageError`](openraft::StorageError), on
//! which openraft stops the node: fail-stop, never a silent loss.
//!
//! The state machine is persisted too (each `apply` batch is one fsync'd
//! transaction that writes the changed sequences/nodes and the last applied
//! log id), so a restarted node starts from its applied state and its local
//! view of ceilings never goes backwards. Snapshots are the whole serialized
//! state (postcard) and the current one is kept in the same database.
//!
//! # Tables
//! `log` (index → entry), `meta` (vote, committed, last purged), `sm_meta`
//! (last applied, membership, counters and settings), `sequences`
//! (name → sequence), `nodes` (id → record), `snapshot` (the current one).
//!
//! `apply` updates the in-memory state and then persists it; if persisting
//! fails, openraft stops the node, and the in-memory state may be ahead of
//! the disk until the process restarts (it is reloaded from disk and the
//! log). Only a running leader's linearizable reads are used for granting,
//! so a stopped node's view is never used.
//!
//! Blocking redb calls run on tokio's blocking pool (`spawn_blocking`) so an
//! fsync never stalls the Raft core's executor thread.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, StorageIOError, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::state::{ClusterState, Response, Touched};
use crate::types::{Entry, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const SEQUENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sequences");
const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_COUNTERS: &str = "counters";
const KEY_CURRENT: &str = "current";

/// The database file inside a node's data directory.
pub const DB_FILE: &str = "unid-raft.redb";

/// Opens (creating if needed) the node's database in `dir` and returns its
/// log store and state machine.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Storage(format!("create dir {}: {e}", dir.display())))?;
    let path = dir.join(DB_FILE);
    let db = Database::create(&path)
        .map_err(|e| Error::Storage(format!("open {}: {e}", path.display())))?;
    finish_open(db, IoMode::Blocking, &path.display().to_string())
}

/// How the store runs its (blocking) redb calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// On tokio's blocking pool (`spawn_blocking`), so an fsync never stalls
    /// the Raft core's executor thread. What [`open`] uses.
    Blocking,
    /// Inline, on the calling task. For storage backends that never block
    /// (memory, a simulated disk): the I/O then happens at a deterministic
    /// point of the task schedule, which a deterministic simulation needs
    /// (a blocking-pool thread finishing first or second is up to the OS).
    Inline,
}

/// Opens (creating if needed) a database on a custom redb
/// [`StorageBackend`](redb::StorageBackend), e.g. a simulated disk, with the
/// same tables, durability and recovery as [`open`]. `name` only labels
/// errors.
pub fn open_with_backend(
    backend: impl redb::StorageBackend,
    io: IoMode,
    name: &str,
) -> Result<(LogStore, StateMachineStore), Error> {
    let db = Database::builder()
        .create_with_backend(backend)
        .map_err(|e| Error::Storage(format!("open {name}: {e}")))?;
    finish_open(db, io, name)
}

fn finish_open(
    db: Database,
    io: IoMode,
    name: &str,
) -> Result<(LogStore, StateMachineStore), Error> {
    let db = Arc::new(Db {
        inner: db,
        fault: AtomicBool::new(false),
        io,
    });
    init_tables(&db).map_err(|e| Error::Storage(format!("init {name}: {e}")))?;
    check_format(&db).map_err(|e| Error::Storage(format!("open {name}: {e}")))?;
    let data = load_sm(&db).map_err(|e| Error::Storage(format!("load {name}: {e}")))?;
    let log = LogStore { db: db.clone() };
    let sm = StateMachineStore {
        db,
        data: Arc::new(RwLock::new(data)),
    };
    Ok((log, sm))
}

/// The database and its fault-injection switch.
struct Db {
    inner: Database,
    /// While set, every write transaction fails (see
    /// [`StateMachineStore::inject_write_fault`]).
    fault: AtomicBool,
    /// Where redb calls run.
    io: IoMode,
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        &self.inner
    }
}

/// The error of an injected write fault.
#[derive(Debug, thiserror::Error)]
#[error("injected storage write fault")]
struct InjectedFault;

fn init_tables(db: &Database) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    tx.open_table(LOG)?;
    tx.open_table(META)?;
    tx.open_table(SM_META)?;
    tx.open_table(SEQUENCES)?;
    tx.open_table(NODES)?;
    tx.open_table(SNAPSHOT)?;
    tx.commit()?;
    Ok(())
}

/// The `meta` key of the store's format version.
const KEY_FORMAT: &str = "format";
/// The format this code writes: 2 = every value carries its checksum (see [`encode`]).
const FORMAT: u32 = 2;

/// Stamps a new database with [`FORMAT`], or checks an existing one's: a database from
/// before checksums (no stamp, but data) is refused rather than read as all corrupt.
fn check_format(db: &Db) -> Result<(), AnyError> {
    if let Some(format) = get_meta::<u32>(db, KEY_FORMAT)? {
        if format != FORMAT {
            return Err(AnyError::new(&CodecError(format!(
                "store format {format}, this unid reads format {FORMAT}"
            ))));
        }
        return Ok(());
    }
    let tx = db.begin_read().map_err(any)?;
    let empty = tx.open_table(LOG).map_err(any)?.is_empty().map_err(any)?
        && tx.open_table(META).map_err(any)?.is_empty().map_err(any)?
        && tx
            .open_table(SM_META)
            .map_err(any)?
            .is_empty()
            .map_err(any)?;
    drop(tx);
    if !empty {
        return Err(AnyError::new(&CodecError(
            "written by a unid from before record checksums (no format stamp); start this \
             replica with an empty data dir and let it catch up from the others"
                .to_owned(),
        )));
    }
    put_meta(db, KEY_FORMAT, &FORMAT)
}

/// An error while (de)coding a stored value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CodecError(String);

/// Bytes of the checksum after every stored value.
const CHECKSUM_BYTES: usize = 4;

/// The checksum of a stored value: CRC-32 over the table's name, the record's key and the
/// value, so that a flipped bit in the value, a value under another key (a flipped bit in a
/// key) or a value of another table all fail. CRC-32 detects every error of up to 3 bits
/// in records this short, and all but one in 2^32 of the rest.
fn checksum(table: &str, key: &[u8], value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for part in [table.as_bytes(), key] {
        h.update(&(part.len() as u32).to_le_bytes());
        h.update(part);
    }
    h.update(value);
    h.finalize()
}

/// A value as stored: postcard bytes, then [`checksum`] (little-endian).
fn encode<T: Serialize>(table: &str, key: &[u8], v: &T) -> Result<Vec<u8>, AnyError> {
    let mut bytes =
        postcard::to_stdvec(v).map_err(|e| AnyError::new(&CodecError(e.to_string())))?;
    let sum = checksum(table, key, &bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    Ok(bytes)
}

/// Checks a stored value's checksum and decodes it. A mismatch is an error naming the
/// record: the server stops (fail-stop) rather than act on a value the disk changed,
/// e.g. a ceiling lower than one it granted below.
fn decode<T: for<'de> Deserialize<'de>>(table: &str, key: &[u8], b: &[u8]) -> Result<T, AnyError> {
    let corrupt = |why: &str| {
        AnyError::new(&CodecError(format!(
            "stored record {table}/{} is corrupt ({why}): the disk changed it; this replica \
             stops, restore it from a replica with good data",
            String::from_utf8_lossy(key).escape_debug()
        )))
    };
    if b.len() < CHECKSUM_BYTES {
        return Err(corrupt("shorter than its checksum"));
    }
    let (value, sum) = b.split_at(b.len() - CHECKSUM_BYTES);
    let sum = u32::from_le_bytes(sum.try_into().expect("4 bytes"));
    if sum != checksum(table, key, value) {
        return Err(corrupt("checksum mismatch"));
    }
    postcard::from_bytes(value).map_err(|e| corrupt(&e.to_string()))
}

/// The key bytes a node id or log index is checksummed with.
fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn sto(subject: ErrorSubject<u64>, verb: ErrorVerb, e: AnyError) -> StorageError {
    StorageIOError::new(subject, verb, e).into()
}

/// Runs blocking redb work off the async executor (or inline, see
/// [`IoMode`]).
async fn blocking<T, F>(
    io: IoMode,
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    f: F,
) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AnyError> + Send + 'static,
{
    if io == IoMode::Inline {
        return f().map_err(|e| sto(subject, verb, e));
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(sto(subject, verb, e)),
        Err(join) => Err(sto(subject, verb, AnyError::error(join))),
    }
}

/// Removes the log entries whose index is in `range` (truncate, purge).
fn remove_log_range(
    t: &mut redb::Table<'_, u64, &'static [u8]>,
    range: impl RangeBounds<u64>,
) -> Result<(), AnyError> {
    let keys: Vec<u64> = t
        .range(range)
        .map_err(any)?
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(any)?;
    for k in keys {
        t.remove(k).map_err(any)?;
    }
    Ok(())
}

fn write_tx(db: &Db) -> Result<redb::WriteTransaction, AnyError> {
    if db.fault.load(Ordering::Acquire) {
        return Err(AnyError::new(&InjectedFault));
    }
    let mut tx = db.begin_write().map_err(any)?;
    tx.set_durability(Durability::Immediate).map_err(any)?;
    Ok(tx)
}

fn get_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
    let tx = db.begin_read().map_err(any)?;
    let t = tx.open_table(META).map_err(any)?;
    match t.get(key).map_err(any)? {
        Some(v) => Ok(Some(decode("meta", key.as_bytes(), v.value())?)),
        None => Ok(None),
    }
}

fn put_meta<T: Serialize>(db: &Db, key: &str, v: &T) -> Result<(), AnyError> {
    let bytes = encode("meta", key.as_bytes(), v)?;
    let tx = write_tx(db)?;
    {
        let mut t = tx.open_table(META).map_err(any)?;
        t.insert(key, bytes.as_slice()).map_err(any)?;
    }
    tx.commit().map_err(any)
}

/// The Raft log and vote, durable in redb. Cheap to clone (shares the
/// database); a clone is also the log reader.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(self.db.io, ErrorSubject::Logs, ErrorVerb::Read, move || {
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let mut out = Vec::new();
            for item in t.range(bounds).map_err(any)? {
                let (k, v) = item.map_err(any)?;
                out.push(decode::<Entry>("log", &id_key(k.value()), v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(self.db.io, ErrorSubject::Logs, ErrorVerb::Read, move || {
            let purged: Option<LogId<u64>> =
                get_meta::<Option<LogId<u64>>>(&db, KEY_PURGED)?.flatten();
            let tx = db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let last = match t.last().map_err(any)? {
                Some((k, v)) => Some(decode::<Entry>("log", &id_key(k.value()), v.value())?.log_id),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let db = self.db.clone();
        let vote = *vote;
        blocking(
            self.db.io,
            ErrorSubject::Vote,
            ErrorVerb::Write,
            move || put_meta(&db, KEY_VOTE, &vote),
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        let db = self.db.clone();
        blocking(self.db.io, ErrorSubject::Vote, ErrorVerb::Read, move || {
            get_meta(&db, KEY_VOTE)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(
            self.db.io,
            ErrorSubject::Store,
            ErrorVerb::Write,
            move || put_meta(&db, KEY_COMMITTED, &committed),
        )
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        let db = self.db.clone();
        blocking(
            self.db.io,
            ErrorSubject::Store,
            ErrorVerb::Read,
            move || Ok(get_meta::<Option<LogId<u64>>>(&db, KEY_COMMITTED)?.flatten()),
        )
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = encode("log", &id_key(e.log_id.index), &e)
                .map_err(|err| sto(ErrorSubject::Logs, ErrorVerb::Write, err))?;
            rows.push((e.log_id.index, bytes));
        }
        let db = self.db.clone();
        let res = blocking(
            self.db.io,
            ErrorSubject::Logs,
            ErrorVerb::Write,
            move || {
                let tx = write_tx(&db)?;
                {
                    let mut t = tx.open_table(LOG).map_err(any)?;
                    for (index, bytes) in &rows {
                        t.insert(*index, bytes.as_slice()).map_err(any)?;
                    }
                }
                // Durability::Immediate: returns after fsync.
                tx.commit().map_err(any)
            },
        )
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(
            self.db.io,
            ErrorSubject::Logs,
            ErrorVerb::Delete,
            move || {
                let tx = write_tx(&db)?;
                {
                    let mut t = tx.open_table(LOG).map_err(any)?;
                    remove_log_range(&mut t, log_id.index..)?;
                }
                tx.commit().map_err(any)
            },
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(
            self.db.io,
            ErrorSubject::Logs,
            ErrorVerb::Delete,
            move || {
                let purged = encode("meta", KEY_PURGED.as_bytes(), &Some(log_id))?;
                let tx = write_tx(&db)?;
                {
                    let mut m = tx.open_table(META).map_err(any)?;
                    m.insert(KEY_PURGED, purged.as_slice()).map_err(any)?;
                    let mut t = tx.open_table(LOG).map_err(any)?;
                    remove_log_range(&mut t, ..=log_id.index)?;
                }
                tx.commit().map_err(any)
            },
        )
        .await
    }
}

/// The applied state: what the state machine holds in memory (and on disk).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// The last log id applied.
    pub last_applied: Option<LogId<u64>>,
    /// The last applied membership.
    pub membership: StoredMembership,
    /// The application state.
    pub state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct Counters {
    next_agent_id: u64,
    settings: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn load_sm(db: &Database) -> Result<AppliedState, AnyError> {
    let tx = db.begin_read().map_err(any)?;
    let meta = tx.open_table(SM_META).map_err(any)?;
    let mut out = AppliedState {
        state: ClusterState::new(),
        ..AppliedState::default()
    };
    if let Some(v) = meta.get(KEY_APPLIED).map_err(any)? {
        out.last_applied = decode("sm_meta", KEY_APPLIED.as_bytes(), v.value())?;
    }
    if let Some(v) = meta.get(KEY_MEMBERSHIP).map_err(any)? {
        out.membership = decode("sm_meta", KEY_MEMBERSHIP.as_bytes(), v.value())?;
    }
    if let Some(v) = meta.get(KEY_COUNTERS).map_err(any)? {
        let c: Counters = decode("sm_meta", KEY_COUNTERS.as_bytes(), v.value())?;
        out.state.next_agent_id = c.next_agent_id;
        out.state.settings = c.settings;
    }
    let seqs = tx.open_table(SEQUENCES).map_err(any)?;
    for item in seqs.iter().map_err(any)? {
        let (k, v) = item.map_err(any)?;
        out.state.sequences.insert(
            k.value().to_owned(),
            decode("sequences", k.value().as_bytes(), v.value())?,
        );
    }
    let nodes = tx.open_table(NODES).map_err(any)?;
    for item in nodes.iter().map_err(any)? {
        let (k, v) = item.map_err(any)?;
        out.state
            .nodes
            .insert(k.value(), decode("nodes", &id_key(k.value()), v.value())?);
    }
    Ok(out)
}

/// Writes the parts of `data` named by `touched` plus the applied log id and
/// membership, in an open transaction.
fn persist_touched(
    tx: &redb::WriteTransaction,
    data: &AppliedState,
    touched: &[Touched],
    all: bool,
) -> Result<(), AnyError> {
    let mut meta = tx.open_table(SM_META).map_err(any)?;
    let mut seqs = tx.open_table(SEQUENCES).map_err(any)?;
    let mut nodes = tx.open_table(NODES).map_err(any)?;
    if all {
        seqs.retain(|_, _| false).map_err(any)?;
        nodes.retain(|_, _| false).map_err(any)?;
        for (name, s) in &data.state.sequences {
            seqs.insert(
                name.as_str(),
                encode("sequences", name.as_bytes(), s)?.as_slice(),
            )
            .map_err(any)?;
        }
        for (id, n) in &data.state.nodes {
            nodes
                .insert(*id, encode("nodes", &id_key(*id), n)?.as_slice())
                .map_err(any)?;
        }
    }
    for t in touched {
        match t {
            Touched::Nothing | Touched::Meta => {}
            Touched::Sequence(name) => match data.state.sequences.get(name) {
                Some(s) => {
                    seqs.insert(
                        name.as_str(),
                        encode("sequences", name.as_bytes(), s)?.as_slice(),
                    )
                    .map_err(any)?;
                }
                None => {
                    seqs.remove(name.as_str()).map_err(any)?;
                }
            },
            Touched::Nodes(ids) => {
                for id in ids {
                    match data.state.nodes.get(id) {
                        Some(n) => {
                            nodes
                                .insert(*id, encode("nodes", &id_key(*id), n)?.as_slice())
                                .map_err(any)?;
                        }
                        None => {
                            nodes.remove(*id).map_err(any)?;
                        }
                    }
                }
            }
        }
    }
    let counters = Counters {
        next_agent_id: data.state.next_agent_id,
        settings: data.state.settings.clone(),
    };
    meta.insert(
        KEY_COUNTERS,
        encode("sm_meta", KEY_COUNTERS.as_bytes(), &counters)?.as_slice(),
    )
    .map_err(any)?;
    meta.insert(
        KEY_APPLIED,
        encode("sm_meta", KEY_APPLIED.as_bytes(), &data.last_applied)?.as_slice(),
    )
    .map_err(any)?;
    meta.insert(
        KEY_MEMBERSHIP,
        encode("sm_meta", KEY_MEMBERSHIP.as_bytes(), &data.membership)?.as_slice(),
    )
    .map_err(any)?;
    Ok(())
}

/// The state machine: the applied [`ClusterState`] in memory, persisted in
/// redb on every apply. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Db>,
    data: Arc<RwLock<AppliedState>>,
}

impl Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMachineStore")
    }
}

impl StateMachineStore {
    /// A copy of the applied state.
    pub fn applied(&self) -> AppliedState {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fault injection for tests: while `on`, every write to this node's
    /// database (log appends, votes, applies, snapshots) fails, as a full or
    /// failing disk would. openraft then stops the node (fail-stop).
    pub fn inject_write_fault(&self, on: bool) {
        self.db.fault.store(on, Ordering::Release);
    }

    /// Reads the applied state through `f` without copying all of it.
    pub fn with_applied<T>(&self, f: impl FnOnce(&AppliedState) -> T) -> T {
        f(&self.data.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (bytes, meta) = {
            let d = self.data.read().unwrap_or_else(|p| p.into_inner());
            let bytes = encode("snapshot", b"data", &*d)
                .map_err(|e| sto(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            let id = match &d.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, bytes.len()),
                None => format!("none-{}", bytes.len()),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.membership.clone(),
                snapshot_id: id,
            };
            (bytes, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        let db = self.db.clone();
        let sig = Some(meta.signature());
        blocking(
            self.db.io,
            ErrorSubject::Snapshot(sig),
            ErrorVerb::Write,
            move || {
                let v = encode("snapshot", KEY_CURRENT.as_bytes(), &stored)?;
                let tx = write_tx(&db)?;
                {
                    let mut t = tx.open_table(SNAPSHOT).map_err(any)?;
                    t.insert(KEY_CURRENT, v.as_slice()).map_err(any)?;
                }
                tx.commit().map_err(any)
            },
        )
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership), StorageError> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut touched = Vec::new();
        let snapshot = {
            let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                let term = entry.log_id.leader_id.term;
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(Response::None),
                    EntryPayload::Normal(cmd) => {
                        let (r, t) = d.state.apply(&cmd, term);
                        responses.push(r);
                        touched.push(t);
                    }
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(entry.log_id), m);
                        responses.push(Response::None);
                    }
                }
            }
            // Only what was touched is written; copy just that out of the lock.
            let mut part = AppliedState {
                last_applied: d.last_applied,
                membership: d.membership.clone(),
                state: ClusterState {
                    next_agent_id: d.state.next_agent_id,
                    settings: d.state.settings.clone(),
                    ..ClusterState::default()
                },
            };
            for t in &touched {
                match t {
                    Touched::Sequence(n) => {
                        if let Some(s) = d.state.sequences.get(n) {
                            part.state.sequences.insert(n.clone(), s.clone());
                        }
                    }
                    Touched::Nodes(ids) => {
                        for id in ids {
                            if let Some(n) = d.state.nodes.get(id) {
                                part.state.nodes.insert(*id, n.clone());
                            }
                        }
                    }
                    Touched::Nothing | Touched::Meta => {}
                }
            }
            part
        };
        let db = self.db.clone();
        blocking(
            self.db.io,
            ErrorSubject::StateMachine,
            ErrorVerb::Write,
            move || {
                let tx = write_tx(&db)?;
                persist_touched(&tx, &snapshot, &touched, false)?;
                tx.commit().map_err(any)
            },
        )
        .await?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let sig = Some(meta.signature());
        let bytes = snapshot.into_inner();
        let mut new: AppliedState = decode("snapshot", b"data", &bytes)
            .map_err(|e| sto(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Read, e))?;
        // The meta is authoritative for what the snapshot covers.
        new.last_applied = meta.last_log_id;
        new.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let db = self.db.clone();
        let to_write = new.clone();
        blocking(
            self.db.io,
            ErrorSubject::Snapshot(sig),
            ErrorVerb::Write,
            move || {
                let v = encode("snapshot", KEY_CURRENT.as_bytes(), &stored)?;
                let tx = write_tx(&db)?;
                persist_touched(&tx, &to_write, &[], true)?;
                {
                    let mut t = tx.open_table(SNAPSHOT).map_err(any)?;
                    t.insert(KEY_CURRENT, v.as_slice()).map_err(any)?;
                }
                tx.commit().map_err(any)
            },
        )
        .await?;
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let db = self.db.clone();
        let stored: Option<StoredSnapshot> = blocking(
            self.db.io,
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            move || {
                let tx = db.begin_read().map_err(any)?;
                let t = tx.open_table(SNAPSHOT).map_err(any)?;
                match t.get(KEY_CURRENT).map_err(any)? {
                    Some(v) => Ok(Some(decode("snapshot", KEY_CURRENT.as_bytes(), v.value())?)),
                    None => Ok(None),
                }
            },
        )
        .await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::state::Command;

    fn entry(term: u64, index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn raise(c: u128) -> Command {
        Command::RaiseCeiling {
            name: "s".into(),
            ceiling: c,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_state_survives_reopen_and_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let membership = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Membership(Membership::new(
                vec![std::collections::BTreeSet::from([1u64])],
                None,
            )),
        };
        {
            let (_log, mut sm) = open(dir.path()).unwrap();
            let create = Command::CreateSequence {
                name: "s".into(),
                width: 4,
                start: 7,
            };
            let r = sm
                .apply(vec![
                    membership,
                    entry(1, 2, create),
                    entry(1, 3, raise(100)),
                    entry(2, 4, raise(50)),
                ])
                .await
                .unwrap();
            assert_eq!(
                r[1..],
                [
                    Response::Created { ceiling: 7 },
                    Response::Ceiling { ceiling: 100 },
                    Response::Ceiling { ceiling: 100 }
                ]
            );
        }
        // Reopen: the applied state is exactly what it was.
        let (_log, mut sm) = open(dir.path()).unwrap();
        let a = sm.applied();
        assert_eq!(a.state.sequences["s"].ceiling, 100);
        assert_eq!(a.last_applied.map(|l| l.index), Some(4));
        assert_eq!(sm.applied_state().await.unwrap().1, a.membership);

        // Snapshot, install into a fresh node, reopen that: same state.
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        {
            let (_l2, mut sm2) = open(other.path()).unwrap();
            sm2.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .unwrap();
            assert_eq!(sm2.applied(), a);
        }
        let (_l2, mut sm2) = open(other.path()).unwrap();
        assert_eq!(sm2.applied(), a);
        let cur = sm2.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, snap.meta);
        // A later raise on top of the installed snapshot still only rises.
        let r = sm2.apply(vec![entry(2, 5, raise(90))]).await.unwrap();
        assert_eq!(r, [Response::Ceiling { ceiling: 100 }]);
    }

    /// Issue 12 item 4: one bit flipped on disk in a stored ceiling (here 2,706,158 lowered by
    /// 65,536, as a failing disk might) must stop the node with an error naming the record,
    /// not start it with a lower ceiling that would grant ids again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_bit_in_a_stored_ceiling_stops_the_node() {
        const CEILING: u128 = 2_706_158;
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, mut sm) = open(dir.path()).unwrap();
            let create = Command::CreateSequence {
                name: "default".into(),
                width: 8,
                start: 1,
            };
            let raise = Command::RaiseCeiling {
                name: "default".into(),
                ceiling: CEILING,
            };
            sm.apply(vec![entry(1, 1, create), entry(1, 2, raise)])
                .await
                .unwrap();
        }
        // The record as postcard lays it out: width 8, start 1, then the ceiling in LEB128.
        let mut pattern = vec![8u8, 1];
        let mut v = CEILING;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            pattern.push(if v == 0 { byte } else { byte | 0x80 });
            if v == 0 {
                break;
            }
        }
        assert_eq!(pattern[2..], [0xee, 0x95, 0xa5, 0x01]);
        let path = dir.path().join(DB_FILE);
        let mut file = std::fs::read(&path).unwrap();
        let mut flipped = 0;
        for i in 0..file.len().saturating_sub(pattern.len()) {
            if file[i..i + pattern.len()] == pattern[..] {
                file[i + 4] &= !0x04; // 0xa5 -> 0xa1: 2,706,158 -> 2,640,622
                flipped += 1;
            }
        }
        assert!(flipped > 0, "the stored ceiling was not found in the file");
        std::fs::write(&path, &file).unwrap();
        let err = match open(dir.path()) {
            Ok((_log, sm)) => panic!(
                "opened with ceiling {} after a bit flip",
                sm.applied().state.sequences["default"].ceiling
            ),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("sequences/default") && err.contains("corrupt"),
            "{err}"
        );
    }

    /// A value under the wrong key (a flipped bit in a key) or from another table fails too.
    #[test]
    fn checksums_bind_the_table_and_the_key() {
        let v = encode("sequences", b"default", &42u64).unwrap();
        assert_eq!(decode::<u64>("sequences", b"default", &v).unwrap(), 42);
        assert!(decode::<u64>("sequences", b"defaulu", &v).is_err());
        assert!(decode::<u64>("nodes", b"default", &v).is_err());
        assert!(decode::<u64>("sequences", b"default", &v[..3]).is_err());
        for bit in 0..v.len() * 8 {
            let mut bad = v.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode::<u64>("sequences", b"default", &bad).is_err(),
                "bit {bit}"
            );
        }
    }
}

//! Thread-per-core UDP shards, on glommio or on plain threads.
//!
//! [`Shards::start`] chooses the data plane ([`ShardConfig::data_plane`], see [`crate::plane`]),
//! opens one socket per shard, all bound to one address with `SO_REUSEPORT` (the first may bind
//! port 0; the others reuse the port it got), then starts one thread per shard — a glommio
//! `LocalExecutor` on the io_uring plane, a plain `std::thread` on the threads plane — pinned to a
//! CPU when it can be, each running the shard loop over its own socket and its own [`Handler`]. The kernel spreads incoming
//! datagrams over the sockets by a hash of the addresses, so one peer's datagrams always reach the
//! same shard.
//!
//! # The shard loop
//! One turn:
//! 1. receive with [`UdpSocket::recv_batch`] until a batch comes back short (the socket is
//!    drained) or [`RECV_BATCHES_PER_TURN_MAX`] batches were read, handing each datagram to
//!    [`Handler::on_datagram`] and flushing replies with [`UdpSocket::send_batch`] after each batch;
//!    truncated datagrams are dropped and counted;
//! 2. deliver up to [`MESSAGES_PER_TURN_MAX`] cross-thread messages ([`Handler::on_message`]);
//! 3. call [`Handler::on_timeout`] if its [`Handler::poll_timeout`] deadline has passed;
//! 4. send what is queued, report refused datagrams and [`UdpSocket::drain_errors`] to
//!    [`Handler::on_peer_error`];
//! 5. if a bound above was hit, yield and start over; otherwise wait for the first of: the socket
//!    readable, the handler's deadline, a message, or shutdown. On glommio the wait is a
//!    `MSG_PEEK` receive in io_uring, a glommio timer and the channel's async receive; on the
//!    threads plane it is one `ppoll(2)` on the socket and the shard's `eventfd(2)` (written by
//!    [`ShardSender`] after each message and by [`StopHandle::stop`]) with the deadline as timeout.
//!
//! Steps 1-4 and the stop (deliver queued messages, flush) are one implementation
//! (`ShardLoop`) for both planes; only step 5 differs. The threads plane ignores
//! [`ShardConfig::io_memory_bytes`] and [`ShardConfig::spin_before_park`].
//!
//! A handler is always called with room for at least one datagram in `out` (the shard flushes
//! first if the batch is full), so a handler answering each request once never sees
//! [`crate::Error::BatchFull`].
//!
//! # Memory locking and `io_memory`
//! glommio registers `io_memory` bytes of buffers with io_uring per executor, and registered
//! buffers count against `RLIMIT_MEMLOCK` (`ulimit -l`). Its default, 10 MiB, exceeds the 8 MiB
//! limit ordinary users get here, so it would warn and fall back; below 512 KiB of allowance it
//! refuses to start. The shards use none of those buffers (our I/O goes through `recvmmsg` and
//! `sendmmsg` into our own buffers), so [`ShardConfig::io_memory_bytes`] defaults to 512 KiB:
//! enough for glommio to start, small enough that 2 shards (1 MiB) start as root and as an
//! ordinary user alike. The `unprivileged_start` test checks the latter.
//!
//! # Messages from other threads
//! Each shard has a bounded channel ([`ShardConfig::channel_messages_max`]); [`Shards::sender`]
//! gives a [`ShardSender`] usable from any thread: [`ShardSender::try_send`] (never blocks),
//! [`ShardSender::send`] (async, runtime-agnostic, so a tokio task can await it) and
//! [`ShardSender::send_blocking`] (plain threads). The channel is `flume`'s, whose internal lock
//! is held only for the queue operation itself, never across I/O; glommio wakes the shard's task
//! from a foreign thread through the executor's eventfd, and on the threads plane the sender
//! writes the shard's own eventfd. glommio's own
//! `channels::shared_channel` is not used because both of its ends must `connect().await` inside
//! a glommio executor, so a tokio or plain thread cannot send on it.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_lite::future;
use glommio::{LocalExecutorBuilder, Placement};

use crate::plane::{ChosenPlane, DataPlane, EventFd};
use crate::udp::{
    BATCH_DATAGRAMS_MAX, ERRORS_PER_DRAIN_MAX, PeerError, RecvBatch, SendBatch, UdpConfig,
    UdpCounters, UdpSocket,
};
use crate::{Error, Result, now_us};

/// Most shards one [`Shards`] runs.
pub const SHARDS_MAX: usize = 256;
/// Most `recvmmsg` batches a shard reads per loop turn before it serves its other duties.
pub const RECV_BATCHES_PER_TURN_MAX: usize = 16;
/// Most cross-thread messages a shard delivers per loop turn.
pub const MESSAGES_PER_TURN_MAX: usize = 256;
/// Largest per-shard channel capacity, in messages.
pub const CHANNEL_MESSAGES_MAX: usize = 1 << 16;
/// Most queued messages a stopping shard still delivers: a full channel's worth.
pub const MESSAGES_AT_STOP_MAX: usize = CHANNEL_MESSAGES_MAX;
/// How long a shard waits before retrying datagrams the kernel did not take (`EAGAIN`).
pub const SEND_RETRY_US: u64 = 100;

/// What a shard does with datagrams, messages and time. Implemented by the server's request
/// logic; it never touches a socket. `now_us` comes from [`crate::now_us`].
pub trait Handler {
    /// Messages other threads send to the shard through a [`ShardSender`].
    type Message: Send + 'static;

    /// A datagram arrived from `from`. Replies go into `out`, which has room for at least one
    /// datagram.
    fn on_datagram(&mut self, data: &[u8], from: SocketAddr, now_us: u64, out: &mut SendBatch);

    /// A message from another thread. `out` has room for at least one datagram. The default
    /// drops it.
    fn on_message(&mut self, msg: Self::Message, now_us: u64, out: &mut SendBatch) {
        let _ = (msg, now_us, out);
    }

    /// A datagram this shard sent could not be delivered: refused by `sendmmsg`, or reported
    /// by ICMP through the error queue. The default ignores it.
    fn on_peer_error(&mut self, err: PeerError, now_us: u64) {
        let _ = (err, now_us);
    }

    /// The next time (in [`crate::now_us`] microseconds) [`Self::on_timeout`] should run, if any.
    fn poll_timeout(&self) -> Option<u64> {
        None
    }

    /// Called once per loop turn while [`Self::poll_timeout`] is at or before `now_us`. `out`
    /// has room for at least one datagram.
    fn on_timeout(&mut self, now_us: u64, out: &mut SendBatch) {
        let _ = (now_us, out);
    }
}

/// How to run the shards.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Number of shards (1 ..= [`SHARDS_MAX`]).
    pub shards: usize,
    /// Address every shard binds; port 0 lets the first shard pick one for all.
    pub addr: SocketAddr,
    /// Socket options (`reuse_port` must be on for more than one shard).
    pub udp: UdpConfig,
    /// Pin shards to CPUs: shard `i` to `cpus[i]`, or without [`Self::cpus`] to the `i`-th CPU
    /// this process may run on (`sched_getaffinity`). A shard without a CPU, or whose pinning
    /// fails, runs unbound; [`Shards::placements`] says why and a line goes to stderr.
    pub pin_cpus: bool,
    /// Explicit CPUs for the shards (e.g. to leave one core to the consensus thread).
    pub cpus: Option<Vec<usize>>,
    /// glommio `io_memory` per executor, in bytes (see the module docs; at least 512 KiB).
    pub io_memory_bytes: usize,
    /// glommio `spin_before_park`: how long an idle shard spins before sleeping. Spinning cuts
    /// wake-up latency (about 1.75x on a ping-pong here) at the cost of CPU.
    pub spin_before_park: Option<Duration>,
    /// Capacity of each shard's message channel (1 ..= [`CHANNEL_MESSAGES_MAX`]).
    pub channel_messages_max: usize,
    /// Datagrams per receive and send batch (1 ..= [`BATCH_DATAGRAMS_MAX`]).
    pub batch_datagrams: usize,
    /// Thread name prefix.
    pub name: String,
    /// Which data plane runs the shards (see [`crate::plane`]); [`DataPlane::Auto`] by default.
    pub data_plane: DataPlane,
}

impl ShardConfig {
    /// Defaults for `shards` shards on `addr`.
    pub fn new(shards: usize, addr: SocketAddr) -> Self {
        Self {
            shards,
            addr,
            udp: UdpConfig::default(),
            pin_cpus: true,
            cpus: None,
            io_memory_bytes: 512 << 10,
            spin_before_park: None,
            channel_messages_max: 1024,
            batch_datagrams: BATCH_DATAGRAMS_MAX,
            name: "unid-shard".to_owned(),
            data_plane: DataPlane::Auto,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return Err(Error::Config("shards must be 1 ..= SHARDS_MAX"));
        }
        if self.shards > 1 && !self.udp.reuse_port {
            return Err(Error::Config("several shards need udp.reuse_port"));
        }
        if self.channel_messages_max == 0 || self.channel_messages_max > CHANNEL_MESSAGES_MAX {
            return Err(Error::Config(
                "channel_messages_max must be 1 ..= CHANNEL_MESSAGES_MAX",
            ));
        }
        if self.batch_datagrams == 0 || self.batch_datagrams > BATCH_DATAGRAMS_MAX {
            return Err(Error::Config(
                "batch_datagrams must be 1 ..= BATCH_DATAGRAMS_MAX",
            ));
        }
        if self.io_memory_bytes < 512 << 10 {
            return Err(Error::Config("io_memory_bytes must be at least 512 KiB"));
        }
        Ok(())
    }
}

/// Where a shard's executor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardPlacement {
    /// Pinned to this CPU.
    Fixed(usize),
    /// Not pinned; `reason` says why (pinning disabled, too few CPUs, or the error).
    Unbound {
        /// Why the shard is not pinned.
        reason: String,
    },
}

/// What a handler factory learns about its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Index of the shard, `0 .. shards`.
    pub index: usize,
    /// The address all shards are bound to.
    pub local_addr: SocketAddr,
    /// Where the shard runs.
    pub placement: ShardPlacement,
}

/// What a shard did, returned when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// Index of the shard.
    pub index: usize,
    /// Its socket's counters.
    pub udp: UdpCounters,
    /// Loop turns.
    pub turns: u64,
    /// Turns that ended waiting for readiness, a deadline, a message or shutdown.
    pub waits: u64,
    /// Datagrams handed to [`Handler::on_datagram`].
    pub datagrams_handled: u64,
    /// Received datagrams dropped before the handler (truncated, or from an unknown address).
    pub datagrams_dropped_in: u64,
    /// Queued replies dropped because the kernel kept refusing them with `EAGAIN` while the
    /// handler needed room.
    pub datagrams_dropped_out: u64,
    /// Messages handed to [`Handler::on_message`].
    pub messages: u64,
    /// Calls of [`Handler::on_timeout`].
    pub timeouts: u64,
    /// Peer errors handed to [`Handler::on_peer_error`].
    pub peer_errors: u64,
}

/// Why a message could not be sent to a shard; gives the message back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError<M> {
    /// The channel is at capacity (only from [`ShardSender::try_send`]).
    Full(M),
    /// The shard has stopped.
    Closed(M),
}

/// Sends messages to one shard from any thread. Cheap to clone.
#[derive(Debug)]
pub struct ShardSender<M> {
    tx: flume::Sender<M>,
    /// On the threads plane, the shard's eventfd, written after each message.
    notify: Option<Arc<EventFd>>,
}

impl<M> Clone for ShardSender<M> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            notify: self.notify.clone(),
        }
    }
}

impl<M> ShardSender<M> {
    /// Wakes a threads-plane shard for a message just queued (glommio's wakes by itself).
    fn notify<T>(&self, result: Result<T, SendError<M>>) -> Result<T, SendError<M>> {
        if let (Ok(_), Some(event)) = (&result, &self.notify) {
            event.notify();
        }
        result
    }
}

impl<M: Send + 'static> ShardSender<M> {
    /// Queues `msg` if there is room; never blocks.
    pub fn try_send(&self, msg: M) -> Result<(), SendError<M>> {
        self.notify(self.tx.try_send(msg).map_err(|err| match err {
            flume::TrySendError::Full(m) => SendError::Full(m),
            flume::TrySendError::Disconnected(m) => SendError::Closed(m),
        }))
    }

    /// Queues `msg`, waiting for room. Works under any async runtime (tokio included).
    pub async fn send(&self, msg: M) -> Result<(), SendError<M>> {
        let sent = self
            .tx
            .send_async(msg)
            .await
            .map_err(|flume::SendError(m)| SendError::Closed(m));
        self.notify(sent)
    }

    /// Queues `msg`, blocking the calling thread until there is room. Not for async code.
    pub fn send_blocking(&self, msg: M) -> Result<(), SendError<M>> {
        self.notify(
            self.tx
                .send(msg)
                .map_err(|flume::SendError(m)| SendError::Closed(m)),
        )
    }

    /// Messages queued and not yet taken by the shard.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

/// Tells every shard of one [`Shards`] to stop; usable from any thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopHandle {
    stopping: Arc<AtomicBool>,
    wake: Arc<[Waker]>,
}

/// Wakes one sleeping shard.
#[derive(Debug, Clone)]
enum Waker {
    /// A glommio shard awaits this channel.
    Channel(flume::Sender<()>),
    /// A threads-plane shard polls this eventfd.
    Event(Arc<EventFd>),
}

impl Waker {
    fn wake(&self) {
        match self {
            // A full channel already holds a wake-up; a closed one belongs to a stopped shard.
            Waker::Channel(tx) => {
                let _ = tx.try_send(());
            }
            Waker::Event(event) => event.notify(),
        }
    }
}

impl StopHandle {
    /// Asks every shard to finish its current turn, deliver the messages already queued in its
    /// channel (at most [`MESSAGES_AT_STOP_MAX`]; any beyond are dropped), flush its replies
    /// and return. Does not wait; see [`Shards::join`]. Idempotent. Once a shard has returned,
    /// senders get [`SendError::Closed`].
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for waker in self.wake.iter() {
            waker.wake();
        }
    }

    /// [`Self::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// A running shard's thread, on either plane.
#[derive(Debug)]
enum JoinHandle {
    Glommio(glommio::ExecutorJoinHandle<Result<ShardStats>>),
    Thread(std::thread::JoinHandle<Result<ShardStats>>),
}

impl JoinHandle {
    /// Waits for the shard; `Err` is the panic message or glommio's error.
    fn join(self) -> std::result::Result<Result<ShardStats>, String> {
        match self {
            JoinHandle::Glommio(join) => join.join().map_err(|err| err.to_string()),
            JoinHandle::Thread(join) => join.join().map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_owned())
            }),
        }
    }
}

/// Running shards. Dropping it stops and joins them.
#[derive(Debug)]
pub struct Shards<M> {
    local_addr: SocketAddr,
    senders: Vec<ShardSender<M>>,
    placements: Vec<ShardPlacement>,
    stop: StopHandle,
    joins: Vec<JoinHandle>,
    plane: ChosenPlane,
}

/// The CPUs this process may run on (`sched_getaffinity`), in increasing order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: all-zero bytes are a valid, empty `cpu_set_t`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid `cpu_set_t` on the stack and its exact size is passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_ISSET reads inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// A shard that is running.
struct Started<M> {
    join: JoinHandle,
    sender: ShardSender<M>,
    wake: Waker,
}

/// Binds the first shard's socket so that no other process shares the address.
///
/// `SO_REUSEPORT` lets any socket of the same user join a port, and the kernel then splits
/// the traffic between them by a hash: two unrelated servers on one address would each grant
/// to some agents (issue 12, item 1). So one shard binds without `SO_REUSEPORT` (nothing can
/// join it), and several shards first check, with a socket bound without it, that nothing
/// holds the address, then bind their own with it. Returns the first socket and the options
/// the other shards bind with. An address held elsewhere is [`Error::AddrInUse`].
fn bind_exclusive(config: &ShardConfig) -> Result<(UdpSocket, UdpConfig)> {
    let mut udp = config.udp.clone();
    let in_use = |e: Error| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            Error::AddrInUse { addr: config.addr }
        }
        e => e,
    };
    if config.shards == 1 {
        udp.reuse_port = false;
        return Ok((UdpSocket::bind(config.addr, &udp).map_err(in_use)?, udp));
    }
    if config.addr.port() != 0 {
        let probe = UdpConfig {
            reuse_port: false,
            recv_buffer_bytes: None,
            send_buffer_bytes: None,
        };
        drop(UdpSocket::bind(config.addr, &probe).map_err(in_use)?);
    }
    Ok((UdpSocket::bind(config.addr, &udp).map_err(in_use)?, udp))
}

impl<M: Send + 'static> Shards<M> {
    /// Chooses the data plane ([`ShardConfig::data_plane`], see [`crate::plane::choose`]),
    /// binds the sockets and starts the shards; returns once every shard is running.
    /// `make_handler` runs on each shard's thread, so the handler need not be `Send`.
    pub fn start<H, F>(config: ShardConfig, make_handler: F) -> Result<Self>
    where
        H: Handler<Message = M> + 'static,
        F: Fn(&ShardInfo) -> H + Send + Sync + 'static,
    {
        config.validate()?;
        let plane = crate::plane::choose(config.data_plane)?;
        let (first, udp) = bind_exclusive(&config)?;
        let local_addr = first.local_addr();
        let mut sockets = vec![first];
        for _ in 1..config.shards {
            sockets.push(UdpSocket::bind(local_addr, &udp)?);
        }
        let cpus = match &config.cpus {
            Some(cpus) => cpus.clone(),
            None => allowed_cpus(),
        };
        let make_handler = Arc::new(make_handler);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut shards = Self {
            local_addr,
            senders: Vec::with_capacity(config.shards),
            placements: Vec::with_capacity(config.shards),
            stop: StopHandle {
                stopping: stopping.clone(),
                wake: Arc::new([]),
            },
            joins: Vec::with_capacity(config.shards),
            plane: plane.clone(),
        };
        let mut wakes = Vec::with_capacity(config.shards);
        for (index, socket) in sockets.into_iter().enumerate() {
            let wanted = match (config.pin_cpus, cpus.get(index)) {
                (true, Some(&cpu)) => ShardPlacement::Fixed(cpu),
                (true, None) => ShardPlacement::Unbound {
                    reason: format!(
                        "only {} CPUs listed or available for {} shards",
                        cpus.len(),
                        config.shards
                    ),
                },
                (false, _) => ShardPlacement::Unbound {
                    reason: "pinning disabled".to_owned(),
                },
            };
            let spawn = ShardSpawn {
                config: &config,
                index,
                local_addr,
                stopping: &stopping,
                make_handler: &make_handler,
            };
            let start_error = |reason| Error::ShardStart {
                shard: index,
                reason,
            };
            let (placement, started) = match plane.plane {
                DataPlane::Threads => spawn.thread(wanted, socket).map_err(start_error)?,
                _ => match spawn.glommio(wanted.clone(), socket) {
                    Ok(started) => (wanted, started),
                    Err(reason) if matches!(wanted, ShardPlacement::Fixed(_)) => {
                        let reason = format!("pinning to {wanted:?} failed: {reason}");
                        // The failed executor dropped its socket; the others keep the port, and
                        // SO_REUSEPORT (or, for a single shard, UDP's lack of TIME_WAIT) lets a
                        // new socket bind it again.
                        let socket = UdpSocket::bind(local_addr, &udp)?;
                        let unbound = ShardPlacement::Unbound { reason };
                        let started = spawn
                            .glommio(unbound.clone(), socket)
                            .map_err(start_error)?;
                        (unbound, started)
                    }
                    Err(reason) => return Err(start_error(reason)),
                },
            };
            if let (true, ShardPlacement::Unbound { reason }) = (config.pin_cpus, &placement) {
                eprintln!("unid-engine: shard {index} runs unbound: {reason}");
            }
            shards.placements.push(placement);
            shards.senders.push(started.sender);
            shards.joins.push(started.join);
            wakes.push(started.wake);
            // Keep the stop handle complete at every step, so an early return (dropping
            // `shards`) stops the shards already started.
            shards.stop.wake = wakes.clone().into();
        }
        Ok(shards)
    }
}

/// What starting one shard needs, on either plane.
struct ShardSpawn<'a, F> {
    config: &'a ShardConfig,
    index: usize,
    local_addr: SocketAddr,
    stopping: &'a Arc<AtomicBool>,
    make_handler: &'a Arc<F>,
}

type Ready<T> = std::sync::mpsc::SyncSender<std::result::Result<T, String>>;

impl<F> ShardSpawn<'_, F> {
    fn thread_name(&self) -> String {
        format!("{}-{}", self.config.name, self.index)
    }

    fn info(&self, placement: ShardPlacement) -> ShardInfo {
        ShardInfo {
            index: self.index,
            local_addr: self.local_addr,
            placement,
        }
    }

    /// Spawns one glommio executor running one shard and waits until the shard loop runs.
    fn glommio<H>(
        &self,
        placement: ShardPlacement,
        socket: UdpSocket,
    ) -> std::result::Result<Started<H::Message>, String>
    where
        H: Handler + 'static,
        F: Fn(&ShardInfo) -> H + Send + Sync + 'static,
    {
        let glommio_placement = match placement {
            ShardPlacement::Fixed(cpu) => Placement::Fixed(cpu),
            ShardPlacement::Unbound { .. } => Placement::Unbound,
        };
        let mut builder = LocalExecutorBuilder::new(glommio_placement)
            .name(&self.thread_name())
            .io_memory(self.config.io_memory_bytes);
        if let Some(spin) = self.config.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let (message_tx, message_rx) = flume::bounded(self.config.channel_messages_max);
        let (wake_tx, wake_rx) = flume::bounded(1);
        let info = self.info(placement);
        let (index, batch_datagrams) = (self.index, self.config.batch_datagrams);
        let stopping = self.stopping.clone();
        let make_handler = self.make_handler.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let join = builder
            .spawn(move || async move {
                let handler = make_handler(&info);
                let setup = Readiness::new(&socket).and_then(|waiter| {
                    let lp = ShardLoop::new(index, socket, handler, message_rx, batch_datagrams)?;
                    Ok((waiter, lp))
                });
                let (waiter, lp) = report_ready(&ready_tx, setup, ())?;
                drop(ready_tx);
                run_glommio(lp, waiter, &wake_rx, &stopping).await
            })
            .map_err(|err| err.to_string())?;
        let join = JoinHandle::Glommio(join);
        wait_ready(&ready_rx, join).map(|(join, ())| Started {
            join,
            sender: ShardSender {
                tx: message_tx,
                notify: None,
            },
            wake: Waker::Channel(wake_tx),
        })
    }

    /// Spawns one plain thread running one shard (pinned to `wanted`'s CPU if it can be) and
    /// waits until the shard loop runs; returns where it runs.
    fn thread<H>(
        &self,
        wanted: ShardPlacement,
        socket: UdpSocket,
    ) -> std::result::Result<(ShardPlacement, Started<H::Message>), String>
    where
        H: Handler + 'static,
        F: Fn(&ShardInfo) -> H + Send + Sync + 'static,
    {
        let (message_tx, message_rx) = flume::bounded(self.config.channel_messages_max);
        let event = Arc::new(EventFd::new().map_err(|err| format!("eventfd: {err}"))?);
        let shard_event = event.clone();
        let (index, batch_datagrams) = (self.index, self.config.batch_datagrams);
        let template = self.info(wanted);
        let stopping = self.stopping.clone();
        let make_handler = self.make_handler.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let join = std::thread::Builder::new()
            .name(self.thread_name())
            .spawn(move || {
                let placement = match template.placement {
                    ShardPlacement::Fixed(cpu) => match crate::plane::pin_current_thread(cpu) {
                        Ok(()) => ShardPlacement::Fixed(cpu),
                        Err(err) => ShardPlacement::Unbound {
                            reason: format!("pinning to Fixed({cpu}) failed: {err}"),
                        },
                    },
                    unbound => unbound,
                };
                let info = ShardInfo {
                    placement: placement.clone(),
                    ..template
                };
                let handler = make_handler(&info);
                let setup = ShardLoop::new(index, socket, handler, message_rx, batch_datagrams);
                let lp = report_ready(&ready_tx, setup, placement)?;
                drop(ready_tx);
                run_threads(lp, &shard_event, &stopping)
            })
            .map_err(|err| format!("spawning the shard thread: {err}"))?;
        let (join, placement) = wait_ready(&ready_rx, JoinHandle::Thread(join))?;
        Ok((
            placement,
            Started {
                join,
                sender: ShardSender {
                    tx: message_tx,
                    notify: Some(event.clone()),
                },
                wake: Waker::Event(event),
            },
        ))
    }
}

/// Tells the starting thread how the shard's setup went (with `value` if it went well) and
/// passes the setup on.
fn report_ready<T, R>(ready: &Ready<R>, setup: Result<T>, value: R) -> Result<T> {
    match setup {
        Ok(parts) => {
            let _ = ready.send(Ok(value));
            Ok(parts)
        }
        Err(err) => {
            let _ = ready.send(Err(err.to_string()));
            Err(err)
        }
    }
}

/// Waits for a starting shard's [`report_ready`]; on failure joins it and returns why.
fn wait_ready<R>(
    ready: &std::sync::mpsc::Receiver<std::result::Result<R, String>>,
    join: JoinHandle,
) -> std::result::Result<(JoinHandle, R), String> {
    match ready.recv() {
        Ok(Ok(value)) => Ok((join, value)),
        Ok(Err(reason)) => {
            let _ = join.join();
            Err(reason)
        }
        // The thread failed before running the shard (e.g. pinning or io_uring setup).
        Err(_) => Err(match join.join() {
            Ok(Ok(_)) => "shard exited before it was ready".to_owned(),
            Ok(Err(err)) => err.to_string(),
            Err(err) => err,
        }),
    }
}

/// Waits, through glommio's io_uring, until a [`UdpSocket`] has a datagram or a pending error.
///
/// It holds a duplicate descriptor of the socket and waits with a 1-byte `MSG_PEEK` receive
/// (first tried as a nonblocking syscall, then submitted to the ring), which leaves the datagram
/// queued for [`UdpSocket::recv_batch`]. Dropping the future cancels the ring operation.
#[derive(Debug)]
pub struct Readiness {
    waiter: glommio::net::UdpSocket,
    peek_buf: [u8; 1],
}

impl Readiness {
    /// A waiter for `socket`.
    ///
    /// # Panics
    /// If called outside a glommio executor thread.
    pub fn new(socket: &UdpSocket) -> Result<Self> {
        Ok(Self {
            waiter: glommio::net::UdpSocket::from(socket.try_clone_socket()?),
            peek_buf: [0],
        })
    }

    /// Returns when the socket is readable: a datagram is queued, or an error is pending
    /// (which [`UdpSocket::recv_batch`] absorbs and [`UdpSocket::drain_errors`] reads).
    pub async fn readable(&mut self) {
        // Any outcome means there is something to look at.
        let _ = self.waiter.peek_from(&mut self.peek_buf).await;
    }
}

/// What ended a glommio wait.
enum Wake<M> {
    Readable,
    Deadline,
    Message(M),
    ChannelClosed,
    Stop,
}

/// What the plane does after a turn.
enum Next {
    /// A bound was hit: yield and turn again.
    Again,
    /// Sleep until the socket is readable, this deadline ([`crate::now_us`]), a message or a
    /// stop request.
    Wait { deadline_us: Option<u64> },
}

/// The shard loop's state and its turn (steps 1-4 of the module docs), shared by both planes;
/// the planes differ only in how they yield and wait (step 5).
struct ShardLoop<H: Handler> {
    core: Core<H>,
    recv: RecvBatch,
    errors: Vec<PeerError>,
    messages: flume::Receiver<H::Message>,
    channel_open: bool,
    /// A message the last (glommio) wait took from the channel.
    pending_message: Option<H::Message>,
}

impl<H: Handler> ShardLoop<H> {
    fn new(
        index: usize,
        socket: UdpSocket,
        handler: H,
        messages: flume::Receiver<H::Message>,
        batch_datagrams: usize,
    ) -> Result<Self> {
        let stats = ShardStats {
            index,
            udp: UdpCounters::default(),
            turns: 0,
            waits: 0,
            datagrams_handled: 0,
            datagrams_dropped_in: 0,
            datagrams_dropped_out: 0,
            messages: 0,
            timeouts: 0,
            peer_errors: 0,
        };
        Ok(Self {
            core: Core {
                socket,
                handler,
                out: SendBatch::new(batch_datagrams)?,
                stats,
            },
            recv: RecvBatch::new(batch_datagrams)?,
            errors: Vec::with_capacity(ERRORS_PER_DRAIN_MAX),
            messages,
            channel_open: true,
            pending_message: None,
        })
    }
}

/// What the handler writes through: the socket, the send batch and the counters.
struct Core<H: Handler> {
    socket: UdpSocket,
    handler: H,
    out: SendBatch,
    stats: ShardStats,
}

impl<H: Handler> Core<H> {
    /// Sends what is queued and reports refused datagrams to the handler.
    fn flush(&mut self, now_us: u64) {
        if self.out.is_empty() {
            return;
        }
        let report = self.socket.send_batch(&mut self.out);
        for i in 0..report.failed {
            let failure = self.out.failures()[i];
            self.stats.peer_errors += 1;
            self.handler.on_peer_error(failure, now_us);
        }
    }

    /// Makes room for at least one datagram in `out`.
    fn make_room(&mut self, now_us: u64) {
        if self.out.is_full() {
            self.flush(now_us);
        }
        if self.out.is_full() {
            // The kernel refuses everything (EAGAIN): drop rather than stall the shard.
            self.stats.datagrams_dropped_out += self.out.len() as u64;
            self.out.clear();
        }
        debug_assert!(self.out.remaining() >= 1);
    }

    fn deliver(&mut self, msg: H::Message, now_us: u64) {
        self.make_room(now_us);
        self.stats.messages += 1;
        self.handler.on_message(msg, now_us, &mut self.out);
    }
}

impl<H: Handler> ShardLoop<H> {
    /// One turn: datagrams, messages, the timeout, sends and peer errors.
    fn turn(&mut self) -> Result<Next> {
        self.core.stats.turns += 1;
        let mut now = now_us();
        let mut busy = false;

        // 1. Datagrams.
        for round in 0..RECV_BATCHES_PER_TURN_MAX {
            let got = self.core.socket.recv_batch(&mut self.recv)?;
            if got == 0 {
                break;
            }
            now = now_us();
            let core = &mut self.core;
            for datagram in self.recv.iter() {
                if datagram.truncated || datagram.from.port() == 0 {
                    core.stats.datagrams_dropped_in += 1;
                    continue;
                }
                core.make_room(now);
                core.stats.datagrams_handled += 1;
                core.handler
                    .on_datagram(datagram.data, datagram.from, now, &mut core.out);
            }
            self.core.flush(now);
            if got < self.recv.capacity() {
                break;
            }
            if round + 1 == RECV_BATCHES_PER_TURN_MAX {
                busy = true;
            }
        }

        // 2. Messages (one may have arrived with the last wake-up).
        if let Some(msg) = self.pending_message.take() {
            self.core.deliver(msg, now);
        }
        if self.channel_open {
            let mut delivered = 0;
            while delivered < MESSAGES_PER_TURN_MAX {
                match self.messages.try_recv() {
                    Ok(msg) => {
                        self.core.deliver(msg, now);
                        delivered += 1;
                    }
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        self.channel_open = false;
                        break;
                    }
                }
            }
            busy |= delivered == MESSAGES_PER_TURN_MAX;
        }

        // 3. Timeout.
        now = now_us();
        if self
            .core
            .handler
            .poll_timeout()
            .is_some_and(|deadline| deadline <= now)
        {
            self.core.make_room(now);
            self.core.stats.timeouts += 1;
            self.core.handler.on_timeout(now, &mut self.core.out);
        }

        // 4. Send, then peer errors.
        self.core.flush(now);
        let drained = self.core.socket.drain_errors(&mut self.errors)?;
        busy |= drained == ERRORS_PER_DRAIN_MAX;
        for err in self.errors.drain(..) {
            self.core.stats.peer_errors += 1;
            self.core.handler.on_peer_error(err, now);
        }

        if busy {
            return Ok(Next::Again);
        }
        let mut deadline_us = self.core.handler.poll_timeout();
        if !self.core.out.is_empty() {
            let retry = now + SEND_RETRY_US;
            deadline_us = Some(deadline_us.map_or(retry, |d| d.min(retry)));
        }
        Ok(Next::Wait { deadline_us })
    }

    /// Takes in what ended a glommio wait.
    fn woke(&mut self, wake: Wake<H::Message>) {
        match wake {
            Wake::Readable | Wake::Deadline | Wake::Stop => {}
            Wake::Message(msg) => self.pending_message = Some(msg),
            Wake::ChannelClosed => self.channel_open = false,
        }
    }

    /// After the stop: delivers a message taken by the last wait and those queued before the
    /// stop (bounded), then flushes. A stopping server's last messages are its `LeaderChange`
    /// notices, queued just before it stops the shards, and under load the shard may not have
    /// taken them yet.
    fn finish(mut self) -> ShardStats {
        let now = now_us();
        if let Some(msg) = self.pending_message.take() {
            self.core.deliver(msg, now);
        }
        if self.channel_open {
            for _ in 0..MESSAGES_AT_STOP_MAX {
                let Ok(msg) = self.messages.try_recv() else {
                    break;
                };
                self.core.deliver(msg, now);
            }
        }
        self.core.flush(now);
        let mut stats = self.core.stats;
        stats.udp = *self.core.socket.counters();
        stats
    }
}

/// The shard loop on glommio: yields to the executor, waits in io_uring.
async fn run_glommio<H: Handler>(
    mut lp: ShardLoop<H>,
    mut waiter: Readiness,
    stop: &flume::Receiver<()>,
    stopping: &AtomicBool,
) -> Result<ShardStats> {
    while !stopping.load(Ordering::Acquire) {
        match lp.turn()? {
            Next::Again => glommio::yield_if_needed().await,
            Next::Wait { deadline_us } => {
                if stopping.load(Ordering::Acquire) {
                    break;
                }
                lp.core.stats.waits += 1;
                let wake = wait(
                    &mut waiter,
                    deadline_us,
                    &lp.messages,
                    lp.channel_open,
                    stop,
                )
                .await;
                lp.woke(wake);
            }
        }
    }
    Ok(lp.finish())
}

/// The shard loop on a plain thread: waits in `ppoll` on the socket and the shard's eventfd.
fn run_threads<H: Handler>(
    mut lp: ShardLoop<H>,
    event: &EventFd,
    stopping: &AtomicBool,
) -> Result<ShardStats> {
    while !stopping.load(Ordering::Acquire) {
        match lp.turn()? {
            // Nothing else runs on this thread: turn again at once.
            Next::Again => {}
            Next::Wait { deadline_us } => {
                if stopping.load(Ordering::Acquire) {
                    break;
                }
                lp.core.stats.waits += 1;
                crate::plane::wait_readable(lp.core.socket.as_raw_fd(), event, deadline_us)
                    .map_err(|source| Error::Io {
                        op: "ppoll",
                        addr: lp.core.socket.local_addr(),
                        source,
                    })?;
            }
        }
    }
    Ok(lp.finish())
}

/// Waits for the socket to be readable, `deadline_us`, a message or a stop request.
async fn wait<M>(
    waiter: &mut Readiness,
    deadline_us: Option<u64>,
    messages: &flume::Receiver<M>,
    channel_open: bool,
    stop: &flume::Receiver<()>,
) -> Wake<M> {
    let readable = async {
        waiter.readable().await;
        Wake::Readable
    };
    let deadline = async {
        match deadline_us {
            Some(deadline) => {
                let wait_us = deadline.saturating_sub(now_us());
                if wait_us > 0 {
                    glommio::timer::sleep(Duration::from_micros(wait_us)).await;
                }
                Wake::Deadline
            }
            None => future::pending().await,
        }
    };
    let message = async {
        if !channel_open {
            return future::pending().await;
        }
        match messages.recv_async().await {
            Ok(msg) => Wake::Message(msg),
            Err(flume::RecvError::Disconnected) => Wake::ChannelClosed,
        }
    };
    let stop = async {
        let _ = stop.recv_async().await;
        Wake::Stop
    };
    future::or(stop, future::or(message, future::or(readable, deadline))).await
}

impl<M> Shards<M> {
    /// The address every shard is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// There are no shards (never true for a started [`Shards`]).
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// A sender to shard `index`.
    pub fn sender(&self, index: usize) -> Option<ShardSender<M>> {
        self.senders.get(index).cloned()
    }

    /// Where each shard runs.
    pub fn placements(&self) -> &[ShardPlacement] {
        &self.placements
    }

    /// The data plane the shards run on, and why it was chosen.
    pub fn data_plane(&self) -> &ChosenPlane {
        &self.plane
    }

    /// A handle that stops the shards from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops every shard and waits for them; returns their statistics in shard order.
    pub fn shutdown(self) -> Result<Vec<ShardStats>> {
        self.stop.stop();
        self.join()
    }

    /// Waits until every shard has stopped (after a [`StopHandle::stop`]); returns their
    /// statistics in shard order, or the first failure.
    pub fn join(mut self) -> Result<Vec<ShardStats>> {
        let mut stats = Vec::with_capacity(self.joins.len());
        let mut first_error = None;
        for (shard, join) in std::mem::take(&mut self.joins).into_iter().enumerate() {
            match join.join() {
                Ok(Ok(s)) => stats.push(s),
                Ok(Err(err)) => {
                    first_error.get_or_insert(err);
                }
                Err(err) => {
                    first_error.get_or_insert(Error::ShardFailed {
                        shard,
                        reason: err.to_string(),
                    });
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(stats),
        }
    }
}

impl<M> Drop for Shards<M> {
    fn drop(&mut self) {
        if self.joins.is_empty() {
            return;
        }
        self.stop.stop();
        for join in self.joins.drain(..) {
            let _ = join.join();
        }
    }
}

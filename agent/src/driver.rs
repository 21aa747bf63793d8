//! The driver thread: the agent's I/O loop. It owns the server sockets (`net.rs`), the
//! rings (`rings.rs`), the pair link (`pair.rs`), the clock and the status snapshot, and
//! feeds what they report into the state machine (`machine/`), then does what it asks:
//! send its datagrams, open rings and write blocks into them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use unid_proto::DATAGRAM_BYTES_MAX;

use crate::machine::{Machine, Output};
use crate::net::{Net, Recv};
use crate::pair::PairLink;
use crate::rings::Rings;
use crate::{AgentConfig, Error, Metrics, Shared};

/// How often the status snapshot is refreshed, in microseconds.
const STATUS_EVERY_US: u64 = 20_000;
/// Datagrams read from each non-leader socket per loop, at most.
const RECV_PER_SOCKET_MAX: usize = 16;

pub(crate) struct Driver {
    config: AgentConfig,
    shared: Arc<Shared>,
    net: Net,
    start: Instant,
    machine: Machine,
    rings: Rings,
    status_at_us: u64,
    pair: Option<PairLink>,
}

impl Driver {
    pub(crate) fn new(
        config: AgentConfig,
        incarnation: u64,
        shared: Arc<Shared>,
    ) -> Result<Driver, Error> {
        let mut net = Net::new();
        for a in &config.servers {
            net.ensure(*a, &config.servers)
                .map_err(|source| Error::Io {
                    op: "open udp socket to server",
                    addr: *a,
                    source,
                })?;
        }
        let mut pair = match &config.pair {
            Some(p) => Some(PairLink::bind(p.listen).map_err(|source| Error::Io {
                op: "bind pair udp",
                addr: p.listen,
                source,
            })?),
            None => None,
        };
        let mut machine_config = config.machine_config(incarnation);
        if let (Some(setup), Some(link)) = (&mut machine_config.pair, &pair) {
            setup.listen = link.local_addr();
        }
        let machine = Machine::new(machine_config, 0, incarnation)?;
        if let Some(link) = &mut pair {
            link.connect(machine.pair_peer());
        }
        Ok(Driver {
            rings: Rings::new(&config),
            pair,
            machine,
            config,
            shared,
            net,
            start: Instant::now(),
            status_at_us: 0,
        })
    }

    pub(crate) fn pair_addr(&self) -> Option<SocketAddr> {
        self.pair.as_ref().map(PairLink::local_addr)
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub(crate) fn run(mut self) {
        tracing::info!(
            servers = ?self.config.servers,
            sequences = ?self.config.sequences.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            incarnation = self.machine.incarnation(),
            "agent starting: registering with the cluster"
        );
        self.machine.set_local_socket(self.shared.socket_addr());
        let tick_us = self.config.poll_interval_ms * 1000;
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 64];
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = self.now_us();
            self.tick(now);
            let wait_us = match self.machine.poll_timeout() {
                Some(t) => t.saturating_sub(self.now_us()).min(tick_us),
                None => tick_us,
            }
            .max(100);
            let leader = self.machine.leader();
            let mut got = Vec::new();
            self.net.recv(
                leader,
                Duration::from_micros(wait_us),
                &mut buf,
                RECV_PER_SOCKET_MAX,
                |r, bytes| got.push((r, bytes.to_vec())),
            );
            for (r, bytes) in got {
                let now = self.now_us();
                match r {
                    Recv::Datagram { from, .. } => {
                        self.service_rings(now);
                        self.machine.handle_datagram(now, from, &bytes);
                    }
                    Recv::PathError { from, loss } => {
                        Metrics::add(&self.shared.metrics.path_errors, 1);
                        self.machine.handle_send_error(now, from, Some(loss));
                    }
                }
                self.perform(now);
                self.transmit(now);
            }
            self.sync_metrics();
        }
        self.machine.stop();
        self.rings.close();
        self.publish_status(self.now_us());
        tracing::info!("agent stopped; rings closed");
    }

    /// Everything timed: the rings, the pair link's heartbeats, the machine's timers,
    /// refills and pair decision.
    fn tick(&mut self, now: u64) {
        self.service_rings(now);
        self.receive_pair(now);
        self.machine.set_wall_clock_us(wall_clock_us());
        self.machine.handle_timeout(now);
        self.perform(now);
        self.send_pair();
        self.perform(now);
        self.transmit(now);
        self.sync_metrics();
        if now >= self.status_at_us {
            self.publish_status(now);
            self.status_at_us = now + STATUS_EVERY_US;
        }
    }

    /// Heartbeats every ring, moves held ids in, and tells the machine what consumers took.
    fn service_rings(&mut self, now: u64) {
        for index in 0..self.machine.sequence_count() {
            let machine = &mut self.machine;
            if let Some(taken) = self
                .rings
                .service(index, &mut |n| machine.handle_ring_refused(index, n))
            {
                self.machine.handle_ring_taken(now, index, taken);
            }
        }
    }

    /// Does what the machine asked of the rings.
    fn perform(&mut self, now: u64) {
        while let Some(output) = self.machine.poll_output() {
            match output {
                Output::OpenRing { index, width } => {
                    let result = self.rings.open(index, width);
                    self.machine.handle_ring_opened(now, index, result);
                }
                Output::Write {
                    index,
                    first,
                    count,
                } => {
                    let machine = &mut self.machine;
                    self.rings.write(index, first, count, &mut |n| {
                        machine.handle_ring_refused(index, n)
                    });
                }
                Output::PairFile { text } => {
                    if let Err(e) = crate::pair::write_pair_file(&self.config.ring_dir, &text) {
                        tracing::warn!(dir = %self.config.ring_dir.display(), "pair: cannot write the pair file: {e}");
                    }
                }
            }
        }
    }

    /// Sends the machine's datagrams; a send error goes back to it at once (the requester
    /// rotates and retransmits in this same loop).
    fn transmit(&mut self, now: u64) {
        while let Some(t) = self.machine.poll_transmit(now) {
            if let Err(e) = self.net.send(t.to, &t.bytes, self.machine.servers()) {
                Metrics::add(&self.shared.metrics.send_errors, 1);
                tracing::debug!("send to {}: {e}", t.to);
                self.machine
                    .handle_send_error(now, t.to, crate::net::classify(&e));
            }
        }
    }

    /// The peer's heartbeats, and what the kernel said about sending to it.
    fn receive_pair(&mut self, now: u64) {
        let Some(link) = &mut self.pair else {
            return;
        };
        let machine = &mut self.machine;
        link.recv(|from, bytes| machine.handle_pair_datagram(now, from, bytes));
        link.connect(machine.pair_peer());
        if let Some(loss) = link.error() {
            machine.handle_pair_error(loss);
        }
    }

    /// This side's heartbeat, if one is due.
    fn send_pair(&mut self) {
        let Some(link) = &mut self.pair else {
            return;
        };
        if let Some(t) = self.machine.poll_pair_transmit()
            && let Some(result) = link.send(t.to, &t.bytes)
        {
            self.machine.handle_pair_sent(result);
        }
    }

    /// Copies the machine's counters into the shared metrics.
    fn sync_metrics(&self) {
        let c = self.machine.counters();
        let m = &self.shared.metrics;
        for (counter, value) in [
            (&m.grants, c.grants),
            (&m.ids_granted, c.ids_granted),
            (&m.grants_rejected, c.grants_rejected),
            (&m.block_requests, c.block_requests),
            (&m.retransmits, c.retransmits),
            (&m.redirects, c.redirects),
            (&m.leader_changes, c.leader_changes),
            (&m.leader_changes_rejected, c.leader_changes_rejected),
            (&m.other_cluster_dropped, c.other_cluster_dropped),
            (&m.replays_dropped, c.replays_dropped),
            (&m.datagrams_dropped, c.datagrams_dropped),
            (&m.requests_failed, c.requests_failed),
            (&m.registrations, c.registrations),
            (&m.version_refusals, c.version_refusals),
            (&m.refill_latency_us_last, c.refill_latency_us_last),
            (&m.refill_latency_us_max, c.refill_latency_us_max),
            (&m.ring_empty_events, c.ring_empty_events),
            (&m.path_losses, c.path_losses),
            (&m.network_losses, c.network_losses),
            (&m.peer_beats_sent, c.peer_beats_sent),
            (&m.peer_beats_received, c.peer_beats_received),
            (&m.peer_beats_dropped, c.peer_beats_dropped),
            (&m.peer_send_errors, c.peer_send_errors),
            (&m.peer_losses_fast, c.peer_losses_fast),
            (&m.peer_losses_slow, c.peer_losses_slow),
            (&m.takeovers, c.takeovers),
        ] {
            counter.store(value, Ordering::Relaxed);
        }
    }

    fn publish_status(&self, now: u64) {
        let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.machine;
        st.connection = m.connection();
        st.node_id = m.node_id();
        st.leader = Some(m.leader());
        st.epoch = m.epoch();
        st.cluster = m.cluster();
        st.pair = m.pair_status(now);
        st.servers = m.paths();
        st.network_down = m.network_down();
        st.incompatible = m.incompatible().cloned();
        for (index, line) in st.sequences.iter_mut().enumerate() {
            let s = m.sequence(index, now);
            line.width = s.width;
            line.state = s.state;
            line.ring_ids = self.rings.ring_ids(index);
            line.held_ids = self.rings.held_ids(index);
            line.rate_ids_per_s = s.rate_ids_per_s;
            line.block_ids = s.block_ids;
            line.ids_pushed = self.rings.pushed(index);
        }
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

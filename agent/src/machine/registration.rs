//! Registration: `Hello` until a `Welcome` gives a node id, pings within the lease, going
//! back to `Hello` when a server says this agent is not registered, and the connection
//! state shown in the status.

use unid_proto::NodeId;

use super::Machine;
use super::link::Req;
use crate::Connection;

/// Ping interval when the server gave no lease, in milliseconds.
const LEASE_MS_DEFAULT: u64 = 3000;

/// Registration and connection state.
pub(super) struct Registration {
    /// The configured incarnation: the first `Hello` carries it.
    pub(super) incarnation: u64,
    /// The incarnation the current `Hello` carries: `incarnation` for the first, then
    /// above every earlier one (wall-clock µs, at least one more). Servers refuse a `Hello`
    /// not newer than the last one registered under this name (replay protection), so a
    /// registration after another agent of the same name must carry a newer one.
    pub(super) hello_incarnation: u64,
    /// The wall clock (µs since the Unix epoch) as the I/O side last reported it.
    pub(super) wall_us: u64,
    pub(super) node_id: NodeId,
    lease_ms: u64,
    pub(super) hello_inflight: bool,
    pub(super) hello_retry_at_us: u64,
    pub(super) ping_inflight: bool,
    next_ping_us: u64,
    pub(super) connection: Connection,
    /// A standby backup names the primary it stands in for in `Hello` (set by the
    /// pairing decision).
    pub(super) backup_of: Option<NodeId>,
}

impl Registration {
    pub(super) fn new(incarnation: u64) -> Registration {
        Registration {
            incarnation,
            hello_incarnation: 0,
            wall_us: 0,
            node_id: 0,
            lease_ms: LEASE_MS_DEFAULT,
            hello_inflight: false,
            hello_retry_at_us: 0,
            ping_inflight: false,
            next_ping_us: 0,
            connection: Connection::Registering,
            backup_of: None,
        }
    }

    /// Reports the timers of registration and pings to `add`.
    pub(super) fn timers(&self, add: &mut impl FnMut(u64)) {
        if self.node_id == 0 {
            if !self.hello_inflight {
                add(self.hello_retry_at_us);
            }
        } else if !self.ping_inflight {
            add(self.next_ping_us);
        }
    }
}

impl Machine {
    /// Reports the wall clock (µs since the Unix epoch), read by the I/O side: a `Hello`
    /// after the first carries an incarnation at least this (and above the last). Call it
    /// before [`handle_timeout`](Self::handle_timeout).
    pub fn set_wall_clock_us(&mut self, wall_us: u64) {
        self.reg.wall_us = wall_us;
    }

    /// Sends a `Hello` when unregistered and none is in flight.
    pub(super) fn tick_registration(&mut self, now: u64) {
        let r = &mut self.reg;
        if r.node_id == 0 && !r.hello_inflight && now >= r.hello_retry_at_us {
            let previous = r.hello_incarnation;
            r.hello_incarnation = if previous == 0 {
                r.incarnation
            } else {
                r.wall_us.max(previous.saturating_add(1))
            };
            r.hello_inflight = self.link.send(now, Req::Hello).is_some();
            if !r.hello_inflight {
                r.hello_incarnation = previous;
            }
        }
    }

    /// Pings once a third of the lease has passed.
    pub(super) fn tick_ping(&mut self, now: u64) {
        let r = &mut self.reg;
        if r.node_id != 0 && !r.ping_inflight && now >= r.next_ping_us {
            r.ping_inflight = self.link.send(now, Req::Ping).is_some();
            r.next_ping_us = now + r.lease_ms * 1000 / 3;
        }
    }

    pub(super) fn on_welcome(&mut self, now: u64, node_id: NodeId, lease_ms: u32) {
        let r = &mut self.reg;
        r.node_id = node_id;
        r.lease_ms = if lease_ms == 0 {
            LEASE_MS_DEFAULT
        } else {
            u64::from(lease_ms)
        };
        r.next_ping_us = now + r.lease_ms * 1000 / 3;
        self.counters.registrations += 1;
        if let Some(was) = self.incompatible.take() {
            tracing::info!(refused_by = %was.server, "registered: a server speaks this agent's protocol version again");
        }
        tracing::info!(node_id, leader = %self.link.requester.leader(), "registered");
        self.set_connection(Connection::Connected);
    }

    pub(super) fn unregistered(&mut self, why: &str) {
        if self.reg.node_id != 0 {
            tracing::info!(node_id = self.reg.node_id, "{why}: registering again");
        }
        self.reg.node_id = 0;
        self.set_connection(Connection::Registering);
    }

    pub(super) fn set_connection(&mut self, c: Connection) {
        if self.reg.connection != c {
            match c {
                Connection::Unreachable => tracing::warn!(
                    "cluster unreachable: serving from the rings only until it answers"
                ),
                Connection::Connected => {
                    tracing::info!(leader = %self.link.requester.leader(), "cluster reachable")
                }
                Connection::Registering => tracing::info!("registering"),
                Connection::Stopped => tracing::info!("stopping"),
            }
            self.reg.connection = c;
        }
    }
}

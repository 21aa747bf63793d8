//! What the kernel said about each server's path (the fast signal: ICMP refused or
//! unreachable, no route), logged and counted once per change, and whether the network on
//! this side is gone (every server unroutable).

use std::net::SocketAddr;

use super::Machine;

/// Why a path to a server counts as down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathLoss {
    /// The server's host answered "port unreachable": no server process.
    Refused,
    /// Host unreachable (ICMP, or no neighbour answers ARP).
    HostUnreachable,
    /// Network unreachable: no route (interface down, route removed).
    NetworkUnreachable,
}

/// One server's path as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// Nothing heard from it yet, and no error.
    Unknown,
    /// It answered since the last error.
    Up,
    /// The last thing the kernel said about it was an error.
    Down(PathLoss),
}

/// A server and its path state, for [`crate::Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerPath {
    /// The server.
    pub addr: SocketAddr,
    /// Its path.
    pub state: PathState,
}

/// The most paths kept (as the driver's server sockets: paths of servers no longer
/// among the requester's are dropped first).
const PATHS_MAX: usize = crate::net::SOCKETS_MAX;

/// Every server path this agent has sent on.
pub(super) struct Paths {
    entries: Vec<ServerPath>,
    /// Every server path down for lack of a route.
    pub(super) no_route: bool,
}

impl Paths {
    pub(super) fn new(servers: &[SocketAddr]) -> Paths {
        let mut p = Paths {
            entries: Vec::new(),
            no_route: false,
        };
        for a in servers {
            p.ensure(*a, servers);
        }
        p
    }

    /// Adds `addr` if new, forgetting one not in `keep` when full.
    pub(super) fn ensure(&mut self, addr: SocketAddr, keep: &[SocketAddr]) {
        if self.entries.iter().any(|e| e.addr == addr) {
            return;
        }
        if self.entries.len() >= PATHS_MAX {
            let Some(i) = self.entries.iter().position(|e| !keep.contains(&e.addr)) else {
                return;
            };
            self.entries.swap_remove(i);
        }
        self.entries.push(ServerPath {
            addr,
            state: PathState::Unknown,
        });
    }

    /// Records `addr`'s path state; returns the previous one if it changed.
    fn set(&mut self, addr: SocketAddr, state: PathState) -> Option<PathState> {
        let e = self.entries.iter_mut().find(|e| e.addr == addr)?;
        if e.state == state {
            return None;
        }
        Some(std::mem::replace(&mut e.state, state))
    }

    pub(super) fn list(&self) -> Vec<ServerPath> {
        self.entries.clone()
    }

    /// Whether every path among `servers` is down for lack of a route (the network on
    /// this side is gone), and there is at least one.
    fn all_unroutable(&self, servers: &[SocketAddr]) -> bool {
        let mut any = false;
        for e in self.entries.iter().filter(|e| servers.contains(&e.addr)) {
            match e.state {
                PathState::Down(PathLoss::NetworkUnreachable | PathLoss::HostUnreachable) => {
                    any = true
                }
                _ => return false,
            }
        }
        any
    }
}

impl Machine {
    pub(super) fn path_down(&mut self, addr: SocketAddr, loss: PathLoss) {
        if self.paths.set(addr, PathState::Down(loss)).is_some() {
            self.counters.path_losses += 1;
            tracing::warn!(server = %addr, "server path down: {loss:?} (fast signal)");
        }
        if !self.paths.no_route && self.paths.all_unroutable(&self.link.servers) {
            self.paths.no_route = true;
            self.counters.network_losses += 1;
            tracing::warn!(
                "network lost: no route to any server (interface down?); serving from the rings only"
            );
        }
    }

    pub(super) fn path_up(&mut self, addr: SocketAddr) {
        if let Some(was) = self.paths.set(addr, PathState::Up)
            && was != PathState::Unknown
        {
            tracing::info!(server = %addr, "server path up again");
        }
        if self.paths.no_route {
            self.paths.no_route = false;
            tracing::info!("network back: a server answers");
        }
    }
}

//! systemd notifications (`Type=notify`) for `unid server` and `unid agent`: the protocol is
//! [`unid_engine::sd_notify`]; this module logs what could not be sent and runs the watchdog.
//!
//! A `NOTIFY_SOCKET` that cannot be used is logged once as an ERROR and the process keeps
//! serving: systemd then never sees the unit started and stops it after `TimeoutStartSec=`,
//! which the log line explains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use unid_engine::sd_notify::{Error, Notifier};

/// Set once a notification failed: later failures (the same cause) are not logged again.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Logs a failed notification (the first one as an ERROR naming `NOTIFY_SOCKET`, later ones at
/// debug level).
pub fn report(result: Result<(), Error>) {
    if let Err(e) = result {
        if FAILED.swap(true, Ordering::Relaxed) {
            tracing::debug!("sd_notify: {e}");
        } else {
            tracing::error!(
                "sd_notify: {e}; serving anyway, but a Type=notify unit will not be seen as \
                 started (systemd stops it after TimeoutStartSec=)"
            );
        }
    }
}

/// Says at start what the notifier found in the environment.
pub fn log_start(notifier: &Notifier) {
    if notifier.env_kept() {
        tracing::warn!(
            "NOTIFY_SOCKET/WATCHDOG_USEC could not be removed from the environment (more than \
             one thread was running): child processes would inherit them"
        );
    }
    if let Some(socket) = notifier.socket() {
        tracing::debug!(
            socket,
            watchdog = ?notifier.watchdog_interval(),
            "reporting readiness to the service manager"
        );
    }
}

/// Sends `WATCHDOG=1` every half `WATCHDOG_USEC` from a thread, for as long as the process
/// runs, when the unit set `WatchdogSec=`; `alive` says whether the service still works (a
/// false answer skips the ping, so systemd restarts a process whose service died).
pub fn spawn_watchdog(
    notifier: &Notifier,
    alive: impl Fn() -> bool + Send + 'static,
) -> anyhow::Result<()> {
    let Some(interval) = notifier.watchdog_interval() else {
        return Ok(());
    };
    let notifier = notifier.clone();
    let interval = interval.max(Duration::from_millis(1));
    std::thread::Builder::new()
        .name("unid-watchdog".into())
        .spawn(move || {
            loop {
                if alive() {
                    report(notifier.watchdog());
                }
                std::thread::sleep(interval);
            }
        })
        .map(drop)
        .map_err(|e| anyhow::anyhow!("starting the watchdog thread: {e}"))
}

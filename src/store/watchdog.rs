//! Index calls in flight, so that a hung index becomes a fatal error instead of a
//! mount that stops answering for good.
//!
//! sled, the index engine of formats 1 and 2, has an open upstream report of a deadlock
//! under high load (spacejam/sled#1412), and the daemon hit one: every FUSE thread
//! waiting on sled, no CPU used, nothing logged. Any engine can hang on a sick disk. The
//! index is crash-safe (docs/DURABILITY.md), so the safe answer to a call
//! that has not returned for `index_timeout` seconds is to log it and exit non-zero;
//! systemd (`Restart=on-failure`) then starts a fresh daemon whose recovery finds the
//! state of the last durable commit. Each watched call registers here on entry and
//! leaves on return; the daemon's watchdog thread looks at the oldest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Watch {
    next: AtomicU64,
    calls: Mutex<HashMap<u64, (&'static str, Instant)>>,
    /// The index refuses every write from now on (fjall poisons itself when a write or
    /// fsync of its journal fails): as fatal as a hung call.
    failed: std::sync::atomic::AtomicBool,
}

/// One index call in flight; it leaves the watch when dropped.
pub struct InFlight<'a> {
    watch: &'a Watch,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.watch
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Watch {
    /// Register a call to `op` (a short name: "commit", "get", ...).
    pub fn enter(&self, op: &'static str) -> InFlight<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (op, Instant::now()));
        stall_if_injected();
        InFlight { watch: self, id }
    }

    /// The index has failed for good (see `failed`).
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The call that has been in flight the longest, and for how long.
    pub fn oldest(&self) -> Option<(&'static str, Duration)> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .min_by_key(|(_, since)| *since)
            .map(|(op, since)| (*op, since.elapsed()))
    }
}

/// Fault injection for the watchdog tests (tests/scale.rs, scripts/systemd-test): with
/// `NACRITHFS_STALL_INDEX_IF=<path>`, every index call made while that file exists hangs
/// forever, as in the observed sled deadlock. Unset (always, in normal use), this costs
/// one initialized `OnceLock` read.
fn stall_if_injected() {
    static IF: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let armed = IF.get_or_init(|| std::env::var_os("NACRITHFS_STALL_INDEX_IF").map(Into::into));
    if let Some(path) = armed {
        if path.exists() {
            log::warn!(
                "fault injection: this index call hangs ({} exists)",
                path.display()
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_call_in_flight_is_reported_until_it_returns() {
        let w = Watch::default();
        assert!(w.oldest().is_none());
        let a = w.enter("commit");
        std::thread::sleep(Duration::from_millis(20));
        let b = w.enter("get");
        let (op, age) = w.oldest().expect("two in flight");
        assert_eq!(op, "commit");
        assert!(age >= Duration::from_millis(20));
        drop(a);
        assert_eq!(w.oldest().map(|(op, _)| op), Some("get"));
        drop(b);
        assert!(w.oldest().is_none());
    }
}

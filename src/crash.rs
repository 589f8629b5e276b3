//! Crash points: named places in every multi-step operation where the crash-consistency
//! harness (tests/crash.rs, scripts/crash-test) can make the daemon die at once.
//!
//! `NACRITHFS_CRASH_AT=NAME[:N]` arms one point: the N-th time (default 1) the process
//! passes it, it writes one line to stderr and sends itself SIGKILL: no unwinding, no
//! destructors, no flush, like `kill -9` at that instant. Unset, a point costs one
//! atomic load. The steps each point sits between are listed in docs/DURABILITY.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    left: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("NACRITHFS_CRASH_AT").ok()?;
            let (name, n) = match spec.rsplit_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                left: AtomicU64::new(n.max(1)),
            })
        })
        .as_ref()
}

/// Die here (SIGKILL to ourselves) if this is the armed point and its count is reached.
pub fn point(name: &'static str) {
    let Some(a) = armed() else {
        return;
    };
    if a.name == name && a.left.fetch_sub(1, Ordering::SeqCst) == 1 {
        eprintln!("nacrithfs: crash point {name} reached: SIGKILL");
        // SAFETY: signalling our own process; SIGKILL cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // SIGKILL to ourselves is delivered before kill returns; never go on.
        std::process::abort();
    }
}

/// Fault injection for the daemon's liveness check (tests/scale.rs): with
/// `NACRITHFS_STALL_LOCKED_IF=<path>`, a thread taking the state lock (`Core::lock`)
/// while that file exists keeps it forever, as in a deadlock. Unset (always, in normal
/// use), one initialized `OnceLock` read.
pub fn stall_if_locked_injected() {
    static IF: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let armed = IF.get_or_init(|| std::env::var_os("NACRITHFS_STALL_LOCKED_IF").map(Into::into));
    if let Some(path) = armed {
        if path.exists() {
            eprintln!("nacrithfs: fault injection: the state lock is kept forever");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}

/// Fault injection for the panic boundaries (tests/security.rs): with
/// `NACRITHFS_PANIC_IN=<name>`, every pass through the point of that name panics: a FUSE
/// operation's name (such as `mkdir`) inside its handler, or `compress.after_blob_tmp`
/// in a compressor. Never set in normal use.
pub fn panic_point(op: &str) {
    static PANIC_IN: OnceLock<Option<String>> = OnceLock::new();
    let armed = PANIC_IN.get_or_init(|| std::env::var("NACRITHFS_PANIC_IN").ok());
    if armed.as_deref() == Some(op) {
        panic!("fault injection: NACRITHFS_PANIC_IN={op}");
    }
}

//! The shutdown phase as the accept loops and connections see it.
//!
//! Shutdown runs in two phases:
//!
//! 1. **Draining** (`shutdown.drain_delay`): the loop keeps accepting, so requests the
//!    load balancer still routes here are served. Every HTTP/1.x response carries
//!    `Connection: close` (the client's next request opens a connection elsewhere), and
//!    HTTP/2 connections get GOAWAY. Idle HTTP/1.1 connections are left open on purpose:
//!    closing one races a request the client may be sending on it at that moment, which
//!    is how an ALB ends up answering 502.
//! 2. **Closing**: connections already in the accept backlog are taken in (by `accept`
//!    on the socket itself, not by the runtime's readiness, which can lag the kernel),
//!    then the listening socket closes (new connections are refused). Every connection
//!    is asked to finish: idle HTTP/1.1 closes now, a request in flight gets its response
//!    first, and a connection that has sent nothing yet gets a short grace
//!    (`FIRST_REQUEST_GRACE`, 1 s) to send its request. Connections still open at the
//!    deadline are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio::time::Instant;

/// Where a shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Normal operation.
    Serving,
    /// Still accepting, but telling every client to go elsewhere.
    Draining,
    /// No longer accepting; connections finish until the deadline.
    Closing { deadline: Instant },
}

/// The shutdown phase as the accept loops and connections see it. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Drain {
    pub(super) phase: watch::Receiver<Phase>,
    /// Mirrors "phase is not Serving" for the per-request check: one relaxed load on the
    /// hot path instead of the watch channel's lock.
    pub(super) draining: Arc<AtomicBool>,
}

/// The sending side of [`Drain`], held by the server.
#[derive(Debug)]
pub(crate) struct DrainControl {
    phase: watch::Sender<Phase>,
    draining: Arc<AtomicBool>,
}

impl Drop for DrainControl {
    /// The server is gone: connections look at the phase watch, which now says so (they
    /// poll it only while `draining`).
    fn drop(&mut self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

impl DrainControl {
    pub(crate) fn new() -> (Self, Drain) {
        let (tx, rx) = watch::channel(Phase::Serving);
        let draining = Arc::new(AtomicBool::new(false));
        (
            Self {
                phase: tx,
                draining: draining.clone(),
            },
            Drain {
                phase: rx,
                draining,
            },
        )
    }

    /// Enters `phase`; the loops and connections react at once.
    pub(crate) fn enter(&self, phase: Phase) {
        self.draining
            .store(phase != Phase::Serving, Ordering::Relaxed);
        self.phase.send_replace(phase);
    }
}

//! What a connection's service and its guarded IO tell each other: requests in flight,
//! a head being read, its framing verdict, the drain's flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::head_scan::HeadFault;

/// What the service and the IO wrapper tell each other about one connection.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// The connection spoke HTTP/2 at least once: GOAWAY is how to drain it.
    pub(super) spoke_h2: AtomicBool,
    /// A request on an HTTP/2 connection finished while draining: send GOAWAY now.
    pub(super) goaway: Notify,
    /// At least one request arrived on the connection.
    pub(super) used: AtomicBool,
    /// The drain's flag: a shutdown began (see [`Drain`](super::drain::Drain)).
    pub(super) draining: Arc<AtomicBool>,
    /// Requests handed to the service and not answered yet.
    pub(super) in_flight: AtomicUsize,
    /// Bytes of a request head arrived and the service has not seen that request yet.
    pub(super) head_started: AtomicBool,
    /// A `101` went out: the connection is a tunnel now, and its bytes are no request's
    /// head (no header clock, no framing scan), only the idle clock applies.
    pub(super) upgraded: AtomicBool,
    /// What is wrong with the framing of the head being read, as a [`HeadFault`]'s
    /// code (0: nothing); see `HeadScan`.
    pub(super) fault: AtomicU8,
    /// The HTTP/2 connection's task waiting in `poll_read`, for the end of the last
    /// request to wake it (see `unclocked`).
    pub(super) reader: AtomicWaker,
    /// `poll_read` went pending without a clock because a request was in flight, and
    /// the end of the requests has not been counted since. With hyper's own header
    /// timeout off, hyper does not read again after answering until the socket wakes
    /// it, so the idle clock would not start:
    /// - HTTP/1.1 answers in the connection's task, which then counts the end and calls
    ///   the reader back within the idle timeout (see `Connection::serve`). Waking the
    ///   reader at once cost every request a third poll of the whole connection.
    /// - An HTTP/2 stream ends in a task of its own: the end of the last one wakes the
    ///   reader, which counts the end as activity.
    pub(super) unclocked: AtomicBool,
}

impl ConnState {
    /// hyper parsed a head and called the service: the head is complete. Returns the
    /// guard of the request, and what is wrong with its framing.
    pub(super) fn request_started(self: &Arc<Self>) -> (InFlight, Option<HeadFault>) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(false, Ordering::Release);
        let fault = HeadFault::from_code(self.fault.swap(0, Ordering::AcqRel));
        (InFlight(self.clone()), fault)
    }
}

/// Held while the service answers one request.
pub(super) struct InFlight(pub(super) Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // SeqCst, paired with `Guarded::poll_read`: either the reader sees no request in
        // flight and arms its clock, or this sees `unclocked` and wakes it (HTTP/2).
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.spoke_h2.load(Ordering::Relaxed)
            && self.0.unclocked.load(Ordering::SeqCst)
        {
            self.0.reader.wake();
        }
    }
}

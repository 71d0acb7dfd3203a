//! The bodies the proxy streams: the client's request body on its way up, which a retry
//! can take back while no byte of it was read, and the upstream's response body on its
//! way down, under the group's request deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::pool::Lease;
use super::target::InFlight;

/// Any body error, boxed.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body, boxed: one type for the pool whatever the listener's body.
pub(crate) type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

/// The request body of one attempt. The client's body sits in a shared slot until the
/// connection polls it; if the attempt fails before that (a failed connect), the next
/// attempt finds it still there and sends it to another target. Once polled, it is gone
/// and the request cannot be retried.
#[derive(Debug)]
pub(crate) struct AttemptBody {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    taken: Option<ClientBody>,
    hint: SizeHint,
}

/// The client's body, shared by the attempts of one request.
#[derive(Debug, Clone)]
pub(crate) struct BodySlot {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    hint: SizeHint,
}

impl BodySlot {
    /// Holds the client's body; a request without one needs no slot (nor a box): every
    /// attempt then sends an empty body.
    pub(crate) fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let hint = body.size_hint();
        let slot = (!body.is_end_stream())
            .then(|| Arc::new(Mutex::new(Some(body.map_err(Into::into).boxed_unsync()))));
        Self { slot, hint }
    }

    /// Whether an attempt can still send the whole body: it has none, or no attempt has
    /// started reading it.
    pub(crate) fn replayable(&self) -> bool {
        self.slot.as_ref().is_none_or(|slot| {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        })
    }

    /// Whether the request has a body at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.slot.is_none()
    }

    pub(crate) fn attempt(&self) -> AttemptBody {
        AttemptBody {
            slot: self.slot.clone(),
            taken: None,
            hint: self.hint,
        }
    }
}

impl AttemptBody {
    /// No body.
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        Self {
            slot: None,
            taken: None,
            hint: SizeHint::with_exact(0),
        }
    }
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.taken.is_none() {
            let Some(slot) = self.slot.take() else {
                return Poll::Ready(None);
            };
            let body = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            match body {
                Some(body) => self.taken = Some(body),
                None => {
                    return Poll::Ready(Some(Err(
                        "the request body was taken by an earlier attempt".into(),
                    )));
                }
            }
        }
        match &mut self.taken {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(body) => body.is_end_stream(),
            None => self.slot.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(body) => body.size_hint(),
            None => self.hint,
        }
    }
}

/// An upstream's response body on its way to the client. It counts as a request in
/// flight to its target until it ends, and ends with an error at the group's request
/// deadline (the client sees a cut response: its head was already sent).
///
/// An HTTP/1.1 body drives its connection as it is read (see `pool`), and hands the
/// connection back to the pool once it was read to the end.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
    deadline: Instant,
    /// Armed the first time the body has to wait: a small answer usually arrives with
    /// its head and never needs a timer.
    timer: Option<Pin<Box<Sleep>>>,
    _in_flight: InFlight,
}

impl UpstreamBody {
    pub(crate) fn new(
        inner: Incoming,
        lease: Option<Lease>,
        deadline: Instant,
        in_flight: InFlight,
    ) -> Self {
        Self {
            inner,
            lease,
            deadline,
            timer: None,
            _in_flight: in_flight,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.lease {
            Some(lease) => {
                lease.drive(cx);
                // The frames come from the connection driven just above, and nothing
                // else: waiting for them needs no waker of its own (one would only make
                // the task wake itself for nothing when the connection hands one over).
                Pin::new(&mut self.inner).poll_frame(&mut Context::from_waker(Waker::noop()))
            }
            None => Pin::new(&mut self.inner).poll_frame(cx),
        };
        if let Poll::Ready(frame) = polled {
            // The server stops polling once `is_end_stream` says so, so the last frame
            // is the moment to give the connection back.
            let ended = match &frame {
                None => true,
                Some(Ok(_)) => self.inner.is_end_stream(),
                Some(Err(_)) => {
                    self.lease = None;
                    false
                }
            };
            if ended {
                if let Some(lease) = self.lease.take() {
                    lease.release(cx);
                }
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(
                "the upstream's response body passed the group's request_timeout".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// A body the server never polled because it had nothing to read (`HEAD`, `204`,
    /// `304`, `Content-Length: 0`) still gives its connection back. A body dropped before
    /// its end closes the connection: what is left of it would come before the next
    /// response.
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.inner.is_end_stream() {
                // Nothing waits to be woken: the next request polls the connection
                // again with its own waker.
                lease.release(&mut Context::from_waker(Waker::noop()));
            }
        }
    }
}

//! The bodies the proxy streams: the client's request body on its way up, which a retry
//! can take back while no byte of it was read and whose progress ([`Upload`]) says when
//! the response clock starts and whose fault a failure is; and the upstream's response
//! body on its way down, under the group's request deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::pool::Lease;
use super::target::InFlight;
use crate::error::Side;

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
    upload: Option<Arc<Upload>>,
}

/// The client's body, shared by the attempts of one request.
#[derive(Debug, Clone)]
pub(crate) struct BodySlot {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    hint: SizeHint,
    /// `None` for a request without a body: there is nothing to wait for.
    upload: Option<Arc<Upload>>,
}

/// How the client's request body is getting on, as the connection that sends it up sees
/// it. The forwarder reads it to start the response clock once the body is all sent,
/// and to tell a failure of the client (a malformed chunk, a client that went away, one
/// that stopped sending) from a failure of the target.
#[derive(Debug, Default)]
pub(crate) struct Upload {
    state: AtomicU8,
    /// Woken when the body ends or fails: an HTTP/2 connection sends it from a task of
    /// its own, while the forwarder waits for the response head.
    ended: AtomicWaker,
}

/// What [`Upload`] knows, in its `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadState {
    /// Not started, or the client's last poll gave a frame: the connection has what it
    /// asked for, and anything it waits for now is the target.
    Moving,
    /// The connection asked for more and the client has not sent it yet.
    WaitingForClient,
    /// All of it was handed to the connection.
    Sent,
    /// The client's body failed: its framing is broken.
    Malformed,
    /// The client's body failed: it went away (closed, reset) before the end.
    Aborted,
}

impl Upload {
    const STATES: [UploadState; 5] = [
        UploadState::Moving,
        UploadState::WaitingForClient,
        UploadState::Sent,
        UploadState::Malformed,
        UploadState::Aborted,
    ];

    pub(crate) fn state(&self) -> UploadState {
        Self::STATES
            .get(usize::from(self.state.load(Ordering::Acquire)))
            .copied()
            .unwrap_or(UploadState::Moving)
    }

    fn set(&self, state: UploadState) {
        self.state.store(state as u8, Ordering::Release);
        if matches!(
            state,
            UploadState::Sent | UploadState::Malformed | UploadState::Aborted
        ) {
            self.ended.wake();
        }
    }

    /// Wakes `waker` when the body ends or fails; register before reading the state.
    pub(crate) fn wake_when_ended(&self, waker: &Waker) {
        self.ended.register(waker);
    }

    /// What the client body's `error` says about the client: hyper reports broken
    /// framing as an I/O error of kind `InvalidInput` or `InvalidData`; anything else
    /// (an early end of the stream, a reset, a closed connection) is a client gone.
    fn failed(&self, error: &BoxError) -> UploadState {
        let io = std::iter::successors(Some(error.as_ref() as &dyn std::error::Error), |e| {
            e.source()
        })
        .find_map(|e| e.downcast_ref::<std::io::Error>());
        let malformed = io.is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        });
        if malformed {
            UploadState::Malformed
        } else {
            UploadState::Aborted
        }
    }
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
        let upload = slot.as_ref().map(|_| Arc::new(Upload::default()));
        Self { slot, hint, upload }
    }

    /// The body's progress; `None` when there is no body.
    pub(crate) fn upload(&self) -> Option<&Upload> {
        self.upload.as_deref()
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
            upload: self.upload.clone(),
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
            upload: None,
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
        let this = &mut *self;
        let Some(body) = &mut this.taken else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        if let Some(upload) = &this.upload {
            let state = match &polled {
                Poll::Pending => UploadState::WaitingForClient,
                Poll::Ready(None) => UploadState::Sent,
                Poll::Ready(Some(Ok(_))) if body.is_end_stream() => UploadState::Sent,
                Poll::Ready(Some(Ok(_))) => UploadState::Moving,
                Poll::Ready(Some(Err(error))) => upload.failed(error),
            };
            upload.set(state);
        }
        polled
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

/// Where a response body comes from.
#[derive(Debug)]
pub(crate) enum Received {
    /// hyper's client: HTTP/2 groups, and upgrades.
    Hyper(Incoming),
    /// The proxy's own HTTP/1.1 codec, through the connection's [`Lease`].
    Native,
}

/// An upstream's response body on its way to the client. It counts as a request in
/// flight to its target until it ends, and ends with an error at the group's request
/// deadline (the client sees a cut response: its head was already sent).
///
/// An HTTP/1.1 body is read from its connection as it is read (see `pool`), and hands
/// the connection back to the pool once it was read to the end.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Received,
    lease: Option<Lease>,
    deadline: Instant,
    /// Armed the first time the body has to wait: a small answer usually arrives with
    /// its head and never needs a timer.
    timer: Option<Pin<Box<Sleep>>>,
    in_flight: InFlight,
}

impl UpstreamBody {
    pub(crate) fn new(
        inner: Received,
        lease: Option<Lease>,
        deadline: Instant,
        in_flight: InFlight,
    ) -> Self {
        Self {
            inner,
            lease,
            deadline,
            timer: None,
            in_flight,
        }
    }

    /// Counts and logs a body cut at the request deadline, waiting on `side`; the
    /// connection closes with the body (what is left of it would come first on it). A
    /// cut is not counted against the target's health: it answered, and a long stream
    /// (server-sent events, a download) says nothing of that.
    fn cut(&mut self, side: Side) -> BoxError {
        let target = self.in_flight.target();
        let (counter, side_name) = match side {
            Side::Upstream => (&target.metrics.cut_upstream, "upstream"),
            Side::Client | Side::Local => (&target.metrics.cut_client, "client"),
        };
        counter.increment(1);
        tracing::warn!(
            target = target.address,
            waiting_on = side_name,
            "Response cut at the group's request_timeout."
        );
        self.lease = None;
        "the response passed the group's request_timeout".into()
    }

    /// The next frame from where the body comes from.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match (&mut self.inner, &mut self.lease) {
            (Received::Hyper(body), Some(lease)) => {
                lease.drive(cx);
                // The frames come from the connection driven just above, and nothing
                // else: waiting for them needs no waker of its own (one would only make
                // the task wake itself for nothing when the connection hands one over).
                Pin::new(body)
                    .poll_frame(&mut Context::from_waker(Waker::noop()))
                    .map_err(Into::into)
            }
            (Received::Hyper(body), None) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            (Received::Native, Some(lease)) => lease.poll_frame(cx),
            // Ended, failed or cut: the error was given already.
            (Received::Native, None) => Poll::Ready(None),
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
        if let Poll::Ready(frame) = self.poll_inner(cx) {
            // The server stops polling once `is_end_stream` says so, so the last frame
            // is the moment to give the connection back.
            let ended = match &frame {
                None => true,
                // Trailers are the last frame of an HTTP/1.1 body, and the server
                // polls no further after them.
                Some(Ok(frame)) => frame.is_trailers() || self.is_end_stream(),
                Some(Err(_)) => {
                    self.lease = None;
                    false
                }
            };
            if ended {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            } else if frame.as_ref().is_some_and(Result::is_ok) && Instant::now() >= self.deadline {
                // The upstream had more ready: it is the client that read too slowly to
                // finish in time. (The last frame skips the clock: a small answer never
                // reads it.)
                return Poll::Ready(Some(Err(self.cut(Side::Client))));
            }
            return Poll::Ready(frame);
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(self.cut(Side::Upstream)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Received::Hyper(body) => body.is_end_stream(),
            Received::Native => self.lease.as_ref().is_none_or(Lease::body_done),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Received::Hyper(body) => body.size_hint(),
            Received::Native => self
                .lease
                .as_ref()
                .and_then(Lease::body_left)
                .map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

impl Drop for UpstreamBody {
    /// A body the server never polled because it had nothing to read (`HEAD`, `204`,
    /// `304`, `Content-Length: 0`) still gives its connection back. A body dropped before
    /// its end closes the connection: what is left of it would come before the next
    /// response.
    fn drop(&mut self) {
        if self.is_end_stream() {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }
}

//! A group's pool of keep-alive connections to its targets.
//!
//! HTTP/1.1 groups use a pool of their own, over the proxy's own codec ([`h1`]): a
//! connection is its socket, the buffers it writes requests from and reads responses
//! into, and no task of its own drives it: the request using the connection writes and
//! reads it, while it waits for the head ([`Pool::send`]) and inside [`UpstreamBody`]'s
//! `poll_frame` while the body streams. A request so costs no hop to another task and
//! no wake-up of one. A request asking for an upgrade goes through hyper's
//! `client::conn::http1` instead, on a connection of its own, which hyper hands over to
//! the tunnel after a `101`.
//!
//! What it takes:
//! - a connection makes progress only while its request is polled: while the client
//!   reads slowly, the upstream waits too (the backpressure a proxy wants anyway);
//! - it goes back to the pool only when its response body was read to the end and it
//!   is ready for the next request; otherwise it is closed (an upgrade is never back);
//! - an idle connection is not watched: the pool looks at it once when it is taken (a
//!   target that closed it is seen then) and [`Pool::reap`] closes the expired and the
//!   closed ones from time to time. A request a reused connection did not send (the
//!   target closed it in the meantime) goes out again on another one.
//!
//! Per target, the idle connections are a stack of at most `max_idle_per_target`: the
//! most recently used is taken first, so under light load the others age out. With
//! `max_connections_per_target`, a connection holds a permit of its target's semaphore
//! until it closes; a request that finds none left waits for an idle connection to come
//! back or a permit to be released, whichever is first, up to `connect_timeout`.
//!
//! HTTP/2 groups keep hyper-util's client: one connection carries all the streams to a
//! target, so a task of its own has to drive it.
//!
//! [`UpstreamBody`]: super::UpstreamBody

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Frame;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tiergate_config::{UpstreamProtocol, UpstreamSettings};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::{AttemptBody, BoxError, Received, Upload, UploadState};
use super::connector::CountingConnector;
use super::h1;
use super::headers::{Outgoing, RequestHead, own_fields};
use crate::error::Timeout;
use crate::timer;

/// A group's connections to its targets, by target index (the group's order).
#[derive(Debug)]
pub(crate) struct Pool {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Http1(Http1Pool),
    H2 {
        // Boxed: the client is six times the size of the HTTP/1.1 pool.
        client: Box<Client<CountingConnector, AttemptBody>>,
        authorities: Box<[Authority]>,
    },
}

#[derive(Debug)]
struct Http1Pool {
    connector: CountingConnector,
    targets: Box<[Slot]>,
    max_idle: usize,
    idle_timeout: Duration,
    /// How long a request waits for room under `max_connections_per_target`.
    connect_timeout: Duration,
}

/// One target's idle connections, oldest first.
#[derive(Debug)]
struct Slot {
    /// `http://host:port`, what the connector resolves and connects to.
    uri: Uri,
    idle: Mutex<VecDeque<Idle>>,
    /// Permits for `max_connections_per_target` connections; `None`: no limit.
    limit: Option<Arc<Semaphore>>,
    /// Told when a connection is checked in, for the requests waiting under `limit`.
    returned: Notify,
}

#[derive(Debug)]
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection to the target: nothing was sent.
    #[error("cannot connect")]
    Connect(#[source] BoxError),
    /// The connection failed while sending the request or before the response head.
    #[error("the exchange broke off")]
    Exchange(#[source] BoxError),
    /// Every connection `max_connections_per_target` allows was busy for all of
    /// `connect_timeout`: nothing was sent.
    #[error("no connection came free within connect_timeout")]
    Saturated,
    /// No response head by the [`HeadClock`]'s deadline.
    #[error("no response head in time")]
    TimedOut,
}

/// The clock of one attempt's response head. While the request body is still on its
/// way up only the group's request deadline runs: a slow upload is not a slow target
/// (Envoy's route timeout, too, starts when the downstream request is complete). Once
/// the body is all sent — at once for a request without one — the response clock
/// starts: `response_timeout` from then, never past the request deadline.
#[derive(Debug)]
pub(crate) struct HeadClock<'a> {
    deadline: Instant,
    response_timeout: Duration,
    upload: Option<&'a Upload>,
    /// The deadline in force now.
    due: Instant,
    /// Whether the response clock runs (the body is sent).
    started: bool,
}

impl<'a> HeadClock<'a> {
    /// The clock of an attempt starting now, under the request `deadline`; `upload` is
    /// the request body's progress (`None`: no body).
    pub(crate) fn new(
        deadline: Instant,
        response_timeout: Duration,
        upload: Option<&'a Upload>,
    ) -> Self {
        let mut clock = Self {
            deadline,
            response_timeout,
            upload,
            due: deadline,
            started: false,
        };
        clock.update(None);
        clock
    }

    /// Starts the response clock if the body has been sent since the last look, and
    /// returns the new deadline then. With `waker`, it is woken when the body ends (an
    /// HTTP/2 connection sends it from a task of its own).
    fn update(&mut self, waker: Option<&Waker>) -> Option<Instant> {
        if self.started {
            return None;
        }
        if let Some(upload) = self.upload {
            if let Some(waker) = waker {
                upload.wake_when_ended(waker);
            }
            if upload.state() != UploadState::Sent {
                return None;
            }
        }
        self.started = true;
        self.due = Instant::now()
            .checked_add(self.response_timeout)
            .map_or(self.deadline, |due| due.min(self.deadline));
        Some(self.due)
    }

    /// The limit that ran out, when the clock has fired.
    pub(crate) fn limit(&self) -> Timeout {
        if self.started && self.due < self.deadline {
            Timeout::Response
        } else {
            Timeout::Request
        }
    }
}

impl Pool {
    /// An empty pool for the group's targets (validated as URI authorities).
    ///
    /// # Errors
    /// A target address is not a valid URI authority.
    pub(crate) fn new(settings: &UpstreamSettings) -> Result<Self, http::Error> {
        let addresses = settings.targets.iter().map(|t| t.address());
        let connector = CountingConnector::new(&settings.name, addresses, settings.connect_timeout);
        let authorities = settings
            .targets
            .iter()
            .map(|t| t.address().parse::<Authority>())
            .collect::<Result<Box<[_]>, _>>()?;
        let kind = match settings.protocol {
            UpstreamProtocol::Http1 => {
                let targets = authorities
                    .into_iter()
                    .map(|authority| {
                        let uri = Uri::builder()
                            .scheme(Scheme::HTTP)
                            .authority(authority)
                            .path_and_query("/")
                            .build()?;
                        Ok(Slot {
                            uri,
                            idle: Mutex::new(VecDeque::new()),
                            limit: (settings.max_connections_per_target > 0).then(|| {
                                Arc::new(Semaphore::new(settings.max_connections_per_target))
                            }),
                            returned: Notify::new(),
                        })
                    })
                    .collect::<Result<_, http::Error>>()?;
                Kind::Http1(Http1Pool {
                    connector,
                    targets,
                    max_idle: settings.max_idle_per_target,
                    idle_timeout: settings.idle_timeout,
                    connect_timeout: settings.connect_timeout,
                })
            }
            UpstreamProtocol::H2 => Kind::H2 {
                client: Box::new(
                    Client::builder(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .pool_timer(TokioTimer::new())
                        .pool_idle_timeout(settings.idle_timeout)
                        .pool_max_idle_per_host(settings.max_idle_per_target)
                        // The proxy sets `Host` itself, as `host_header` says.
                        .set_host(false)
                        .http2_only(true)
                        .build(connector),
                ),
                authorities,
            },
        };
        Ok(Self { kind })
    }

    /// Sends a request (`head`, with `body`) to target `index` on an idle connection, or
    /// a new one, and waits for the response head until `clock` runs out. With the
    /// response comes the lease on its HTTP/1.1 connection, to be driven while the body
    /// is read (see the module docs).
    pub(crate) async fn send(
        self: &Arc<Self>,
        index: usize,
        head: &RequestHead<'_>,
        body: AttemptBody,
        clock: &mut HeadClock<'_>,
    ) -> Result<(Response<Received>, Option<Lease>), SendError> {
        let pool = match &self.kind {
            Kind::Http1(pool) => pool,
            // Boxed, as the upgrade below: HTTP/1.1 requests, the most, do not carry the
            // HTTP/2 path's state in their futures (the proxied future is boxed whole,
            // and past 1 KiB the allocator takes its slow path).
            Kind::H2 {
                client,
                authorities,
            } => return Box::pin(send_h2(client, authorities, index, head, body, clock)).await,
        };
        let start = match head.outgoing {
            Outgoing::Written(start) => start,
            // An upgrade: hyper's client hands its connection over to the tunnel.
            Outgoing::Parsed(parsed) => {
                let uri = |path: &PathAndQuery| Uri::from(path.clone());
                let req = parsed.request(head.set, head.via, body, uri, Version::HTTP_11);
                // Boxed: inline, the rare upgrade's future would make every request's
                // bigger.
                return Box::pin(self.send_upgrade(pool, index, req, clock)).await;
            }
        };
        let mut body = Some(body);
        loop {
            // An idle connection is taken at once, with no timer. Only a connect or a wait
            // for room arms one, in a box: inline, its state would make every request's
            // future bigger.
            let idle = poll_fn(|cx| Poll::Ready(pool.checkout_at(index, cx))).await;
            let (mut conn, reused) = match idle {
                Some(conn) => (conn, true),
                None => Box::pin(tokio::time::timeout_at(clock.due, pool.take(index, false)))
                    .await
                    .map_err(|_| SendError::TimedOut)??,
            };
            let Conn {
                link, head_clock, ..
            } = &mut *conn;
            let (Link::Native(link), Some(attempt)) = (link, body.take()) else {
                return Err(SendError::Exchange("no HTTP/1.1 connection".into()));
            };
            link.start(start, own_fields(head.set, head.via), attempt);
            let answered = poll_fn(|cx| {
                if let Poll::Ready(answered) = link.poll_head(cx) {
                    return Poll::Ready(Some(answered));
                }
                // The connection polls the body as it writes, in this task: the end of
                // the upload is seen right here, with no waker of its own.
                clock.update(None);
                timer::poll_deadline(head_clock, clock.due, cx).map(|()| None)
            })
            .await;
            // Dropping the connection closes it: what it would still bring is late.
            let Some(answered) = answered else {
                return Err(SendError::TimedOut);
            };
            match answered {
                Ok(head) => {
                    let lease = Lease {
                        conn,
                        pool: self.clone(),
                        index,
                    };
                    return Ok((
                        Response::from_parts(head.parts, Received::Native),
                        Some(lease),
                    ));
                }
                Err(err) => {
                    // The target closed a reused connection just as it was taken: a
                    // request not one byte of which was written goes out again (a new
                    // connection gets no second chance: the failure is the target's).
                    if reused {
                        if let Some(unsent) = link.take_unsent() {
                            body = Some(unsent);
                            continue;
                        }
                    }
                    return Err(SendError::Exchange(err.into()));
                }
            }
        }
    }

    /// Sends a request asking for an upgrade through hyper, on a connection of its own
    /// (an upgraded connection never comes back; one that was not upgraded is closed).
    async fn send_upgrade(
        self: &Arc<Self>,
        pool: &Http1Pool,
        index: usize,
        req: Request<AttemptBody>,
        clock: &mut HeadClock<'_>,
    ) -> Result<(Response<Received>, Option<Lease>), SendError> {
        let (mut conn, _) = tokio::time::timeout_at(clock.due, pool.take(index, true))
            .await
            .map_err(|_| SendError::TimedOut)??;
        let Conn {
            link, head_clock, ..
        } = &mut *conn;
        let Link::Hyper { sender, driver } = link else {
            return Err(SendError::Exchange("no connection for the upgrade".into()));
        };
        let mut response = pin!(sender.try_send_request(req));
        let answered = poll_fn(|cx| {
            drive(driver, cx);
            // Only the connection, driven just above, completes the response future.
            if let Poll::Ready(answered) = response
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                return Poll::Ready(Some(answered));
            }
            clock.update(None);
            timer::poll_deadline(head_clock, clock.due, cx).map(|()| None)
        })
        .await;
        match answered {
            None => Err(SendError::TimedOut),
            Some(Ok(rsp)) => {
                let lease = Lease {
                    conn,
                    pool: self.clone(),
                    index,
                };
                Ok((rsp.map(Received::Hyper), Some(lease)))
            }
            Some(Err(err)) => Err(SendError::Exchange(err.into_error().into())),
        }
    }

    /// Closes the idle connections that expired or that their target closed: an idle
    /// connection is not polled, so without this they would hold their sockets until the
    /// next request to the target.
    pub(crate) fn reap(&self) {
        if let Kind::Http1(pool) = &self.kind {
            for slot in &pool.targets {
                let mut closing = Vec::new();
                {
                    let mut idle = slot.idle.lock().unwrap_or_else(PoisonError::into_inner);
                    while idle
                        .front()
                        .is_some_and(|i| i.since.elapsed() >= pool.idle_timeout)
                    {
                        closing.extend(idle.pop_front());
                    }
                    idle.retain_mut(|i| i.conn.alive(&mut Context::from_waker(Waker::noop())));
                }
                // Closing happens outside the lock: a close is a system call.
                drop(closing);
            }
        }
    }

    /// How often [`Self::reap`] should run; `None`: never (nothing is kept idle).
    pub(crate) fn reap_every(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Http1(pool) if pool.max_idle > 0 => {
                Some((pool.idle_timeout / 2).max(Duration::from_millis(100)))
            }
            _ => None,
        }
    }

    /// Idle connections to target `index` now.
    #[cfg(test)]
    pub(crate) fn idle(&self, index: usize) -> usize {
        match &self.kind {
            Kind::Http1(pool) => pool.targets[index]
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            Kind::H2 { .. } => 0,
        }
    }

    /// Whether an idle connection to target `index` has its socket marked readable,
    /// which makes the look at it when it is taken cost a read.
    #[cfg(test)]
    pub(crate) fn idle_marked_readable(&self, index: usize) -> bool {
        let Kind::Http1(pool) = &self.kind else {
            return false;
        };
        let mut idle = pool.targets[index]
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        idle.iter_mut().any(|i| match &mut i.conn.link {
            Link::Native(link) => link.marked_readable(),
            Link::Hyper { .. } => false,
        })
    }

    fn checkin(&self, index: usize, conn: Box<Conn>) {
        let Kind::Http1(pool) = &self.kind else {
            return;
        };
        let Some(slot) = pool.targets.get(index) else {
            return;
        };
        let evicted = {
            let mut idle = slot.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
            (idle.len() > pool.max_idle).then(|| idle.pop_front())
        };
        if slot.limit.is_some() {
            slot.returned.notify_one();
        }
        // Closed outside the lock.
        drop(evicted);
    }
}

impl Http1Pool {
    /// An idle connection to target `index` (`true`: reused) or a new one; under
    /// `max_connections_per_target`, waits up to `connect_timeout` for one of the two.
    /// `upgrade`: a new connection through hyper, for a request asking for an upgrade.
    async fn take(&self, index: usize, upgrade: bool) -> Result<(Box<Conn>, bool), SendError> {
        let slot = self
            .targets
            .get(index)
            .ok_or_else(|| SendError::Connect("no such target".into()))?;
        let Some(limit) = &slot.limit else {
            if !upgrade {
                if let Some(conn) = poll_fn(|cx| Poll::Ready(self.checkout(slot, cx))).await {
                    return Ok((conn, true));
                }
            }
            return Ok((self.connect(slot, None, upgrade).await?, false));
        };
        let give_up = Instant::now() + self.connect_timeout;
        loop {
            // Listen before looking: a connection checked in between is not missed.
            let mut returned = pin!(slot.returned.notified());
            returned.as_mut().enable();
            if !upgrade {
                if let Some(conn) = poll_fn(|cx| Poll::Ready(self.checkout(slot, cx))).await {
                    return Ok((conn, true));
                }
            }
            let room = tokio::select! {
                room = limit.clone().acquire_owned() => room,
                () = returned.as_mut() => continue,
                () = tokio::time::sleep_until(give_up) => return Err(SendError::Saturated),
            };
            // The semaphore is never closed.
            let room = room.map_err(|_| SendError::Saturated)?;
            return Ok((self.connect(slot, Some(room), upgrade).await?, false));
        }
    }

    /// The most recently used idle connection to target `index` that is still open.
    fn checkout_at(&self, index: usize, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        self.checkout(self.targets.get(index)?, cx)
    }

    /// The most recently used idle connection of `slot` that is still open; the closed
    /// ones met on the way are dropped.
    fn checkout(&self, slot: &Slot, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        loop {
            let entry = {
                let mut idle = slot.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let entry = idle.pop_back()?;
                if entry.since.elapsed() >= self.idle_timeout {
                    // The others are older still.
                    let expired = std::mem::take(&mut *idle);
                    drop(idle);
                    drop(expired);
                    return None;
                }
                entry
            };
            let mut conn = entry.conn;
            // One look at what the target sent while the connection sat idle: an end
            // of stream (it closed) ends the connection here, not the request.
            if conn.alive(cx) {
                return Some(conn);
            }
        }
    }

    async fn connect(
        &self,
        slot: &Slot,
        room: Option<OwnedSemaphorePermit>,
        upgrade: bool,
    ) -> Result<Box<Conn>, SendError> {
        let io = self
            .connector
            .clone()
            .call(slot.uri.clone())
            .await
            .map_err(|err| SendError::Connect(err.into()))?;
        let link = if upgrade {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|err| SendError::Connect(err.into()))?;
            Link::Hyper {
                sender,
                driver: Some(Box::pin(connection.with_upgrades())),
            }
        } else {
            Link::Native(h1::Connection::new(io))
        };
        Ok(Box::new(Conn {
            link,
            room,
            head_clock: Box::pin(tokio::time::sleep_until(Instant::now())),
        }))
    }
}

/// Sends a request to target `index` of an HTTP/2 group through hyper-util's client, and
/// waits for the response head until `clock` runs out.
async fn send_h2(
    client: &Client<CountingConnector, AttemptBody>,
    authorities: &[Authority],
    index: usize,
    head: &RequestHead<'_>,
    body: AttemptBody,
    clock: &mut HeadClock<'_>,
) -> Result<(Response<Received>, Option<Lease>), SendError> {
    let Outgoing::Parsed(parsed) = head.outgoing else {
        return Err(SendError::Exchange(
            "a head written for HTTP/1.1 was sent to an HTTP/2 group".into(),
        ));
    };
    // hyper-util's client wants the absolute form: its pool is keyed by it.
    let uri = |path: &PathAndQuery| {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = authorities.get(index).cloned();
        parts.path_and_query = Some(path.clone());
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from(path.clone()))
    };
    let req = parsed.request(head.set, head.via, body, uri, Version::HTTP_2);
    let mut response = pin!(client.request(req));
    let mut timer = pin!(tokio::time::sleep_until(clock.due));
    let answered = poll_fn(|cx| {
        if let Poll::Ready(answered) = response.as_mut().poll(cx) {
            return Poll::Ready(Some(answered));
        }
        if let Some(due) = clock.update(Some(cx.waker())) {
            timer.as_mut().reset(due);
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await;
    match answered {
        Some(Ok(rsp)) => Ok((rsp.map(Received::Hyper), None)),
        Some(Err(err)) if err.is_connect() => Err(SendError::Connect(err.into())),
        Some(Err(err)) => Err(SendError::Exchange(err.into())),
        None => Err(SendError::TimedOut),
    }
}

/// The connection future; hyper does not name the type with upgrades.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One HTTP/1.1 connection.
struct Conn {
    link: Link,
    /// Its place under `max_connections_per_target`, given back when it is dropped (or,
    /// after an upgrade, when the tunnel that took it over ends).
    room: Option<OwnedSemaphorePermit>,
    /// The clock of the response head, kept with the connection (see
    /// [`timer::poll_deadline`]): a new timer per request took the wheel's lock to register
    /// and again to deregister it.
    head_clock: Pin<Box<Sleep>>,
}

/// What speaks HTTP/1.1 on a connection.
enum Link {
    /// The proxy's own codec (`h1`), for every request but upgrades.
    Native(h1::Connection),
    /// hyper's client connection, for a request asking for an upgrade: hyper hands the
    /// connection over to the tunnel after the `101`.
    Hyper {
        sender: SendRequest<AttemptBody>,
        /// `None` once the connection ended (closed, failed or upgraded).
        driver: Option<Driver>,
    },
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.link {
            Link::Native(_) => "native",
            Link::Hyper { .. } => "hyper",
        };
        f.debug_struct("Conn")
            .field("link", &kind)
            .finish_non_exhaustive()
    }
}

/// Lets a hyper connection read and write what it can; `false` once it has ended.
fn drive(driver: &mut Option<Driver>, cx: &mut Context<'_>) -> bool {
    if let Some(running) = driver {
        if let Poll::Ready(ended) = running.as_mut().poll(cx) {
            if let Err(error) = ended {
                tracing::debug!(%error, "Upstream connection failed.");
            }
            *driver = None;
        }
    }
    driver.is_some()
}

impl Conn {
    /// Whether an idle connection is still open.
    fn alive(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.link {
            Link::Native(link) => link.alive(cx),
            Link::Hyper { .. } => false,
        }
    }
}

/// The HTTP/1.1 connection a response came on, for as long as its body is read.
#[derive(Debug)]
pub(crate) struct Lease {
    /// Boxed once, when it connects: the lease moves with every response, and a
    /// response carrying the connection itself was copied many times over its way
    /// down; the box goes from request to request through the idle list.
    conn: Box<Conn>,
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// Drives a hyper connection: its body comes only as far as the connection reads it.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        if let Link::Hyper { driver, .. } = &mut self.conn.link {
            drive(driver, cx);
        }
    }

    /// The next frame of a body read by the proxy's own codec.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.conn.link {
            Link::Native(link) => link.poll_frame(cx).map_err(Into::into),
            Link::Hyper { .. } => Poll::Ready(None),
        }
    }

    /// Whether the codec's body is complete.
    pub(crate) fn body_done(&self) -> bool {
        match &self.conn.link {
            Link::Native(link) => link.body_done(),
            Link::Hyper { .. } => true,
        }
    }

    /// The exact length of what is left of the codec's body, when known.
    pub(crate) fn body_left(&self) -> Option<u64> {
        match &self.conn.link {
            Link::Native(link) => link.body_left(),
            Link::Hyper { .. } => None,
        }
    }

    /// The response body was read to the end: the connection goes back to its pool if
    /// it can carry the next request (not when the target asked to close, the request
    /// body is still being sent, or anything came after the response), else it is
    /// closed. A hyper connection (an upgrade that was refused) is closed.
    pub(crate) fn release(self) {
        if let Link::Native(link) = &self.conn.link {
            if link.reusable() {
                self.pool.checkin(self.index, self.conn);
            }
        }
    }

    /// Drives the connection until it ends: after a `101`, that hands it to the upgrade.
    /// Returns the connection's place under `max_connections_per_target`, which the
    /// upgraded connection still takes up: the caller holds it while the tunnel runs.
    pub(crate) async fn run_out(mut self) -> Option<OwnedSemaphorePermit> {
        if let Link::Hyper { driver, .. } = &mut self.conn.link {
            poll_fn(|cx| {
                if drive(driver, cx) {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
        }
        self.conn.room.take()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use http::Method;

    use super::*;
    use crate::proxy::{Target, UpstreamBody};

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// The clock of a request without a body that must have its head by `deadline`.
    fn by(deadline: Instant) -> HeadClock<'static> {
        HeadClock::new(deadline, Duration::MAX, None)
    }

    /// A raw HTTP/1.1 upstream that answers each request with `answer` and counts the
    /// connections it accepted and those the other side closed.
    struct Upstream {
        addr: String,
        accepted: Arc<AtomicUsize>,
        closed_by_proxy: Arc<AtomicUsize>,
    }

    /// What the upstream does after an answer.
    #[derive(Clone, Copy)]
    enum Then {
        KeepOpen,
        /// Closes the connection this long after the answer, as a target whose
        /// keep-alive timeout is shorter than the proxy's `idle_timeout`.
        CloseAfter(Duration),
    }

    async fn upstream(answer: &'static [u8], then: Then) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_proxy = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed_by_proxy.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(_) => {}
                        }
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        if let Then::CloseAfter(delay) = then {
                            tokio::time::sleep(delay).await;
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            accepted,
            closed_by_proxy,
        }
    }

    fn pool(addr: &str, max_idle: usize) -> (Arc<Pool>, Arc<Target>) {
        let mut settings = UpstreamSettings::new("g", &[addr]);
        settings.max_idle_per_target = max_idle;
        let pool = Arc::new(Pool::new(&settings).unwrap());
        (pool, Arc::new(Target::new("g", addr, 1).unwrap()))
    }

    /// Sends a `GET /` and returns the response with its body as the proxy streams it.
    async fn send(pool: &Arc<Pool>, target: &Arc<Target>) -> UpstreamBody {
        send_by(pool, target, Instant::now() + Duration::from_secs(5)).await
    }

    /// [`send`] with its response head due by `deadline`.
    async fn send_by(pool: &Arc<Pool>, target: &Arc<Target>, deadline: Instant) -> UpstreamBody {
        let root = Outgoing::bare(&Method::GET, "/");
        let (rsp, lease) = pool
            .send(0, &root.head(), AttemptBody::empty(), &mut by(deadline))
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        UpstreamBody::new(rsp.into_body(), lease, deadline, target.start_request())
    }

    async fn get(pool: &Arc<Pool>, target: &Arc<Target>) -> Bytes {
        let body = send(pool, target).await;
        body.collect().await.unwrap().to_bytes()
    }

    /// Mutation: read the response with `try_read_buf` (the socket stays marked
    /// readable after a read that drained it), and the idle connection is marked.
    #[tokio::test]
    async fn a_connection_whose_response_was_read_whole_is_not_left_marked_readable() {
        let up = upstream(OK, Then::KeepOpen).await;
        let (pool, target) = pool(&up.addr, 8);
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(pool.idle(0), 1);
        assert!(!pool.idle_marked_readable(0));
    }

    /// Waits until `counter` reaches `n`, for at most a second.
    async fn reaches(counter: &AtomicUsize, n: usize) -> bool {
        for _ in 0..100 {
            if counter.load(Ordering::SeqCst) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_while_idle_costs_no_request() {
        let up = upstream(OK, Then::CloseAfter(Duration::from_millis(50))).await;
        let (pool, target) = pool(&up.addr, 8);
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(pool.idle(0), 1, "kept for the next request");
        // The target closes it while it sits idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get(&pool, &target).await, "ok", "on a fresh connection");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_past_max_idle_per_target_are_closed() {
        let up = upstream(OK, Then::KeepOpen).await;
        let (pool, target) = pool(&up.addr, 1);
        // Three requests at once need three connections.
        let bodies = [
            send(&pool, &target).await,
            send(&pool, &target).await,
            send(&pool, &target).await,
        ];
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
        for body in bodies {
            assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(pool.idle(0), 1);
        assert!(reaches(&up.closed_by_proxy, 2).await, "two were closed");
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            3,
            "the kept one is reused"
        );
    }

    #[tokio::test]
    async fn a_connection_whose_body_was_not_read_to_the_end_is_closed() {
        // Ten bytes of a megabyte, then nothing: the rest would come before the next
        // response on that connection.
        let partial = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n0123456789";
        let up = upstream(partial, Then::KeepOpen).await;
        let (pool, target) = pool(&up.addr, 8);
        let mut body = send(&pool, &target).await;
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "0123456789");
        drop(body);
        assert_eq!(pool.idle(0), 0, "not kept");
        assert!(reaches(&up.closed_by_proxy, 1).await, "closed");
        drop(send(&pool, &target).await);
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            2,
            "the next one connects anew"
        );
    }

    fn capped_pool(addr: &str, max_connections: usize) -> (Arc<Pool>, Arc<Target>) {
        let mut settings = UpstreamSettings::new("g", &[addr]);
        settings.max_connections_per_target = max_connections;
        settings.connect_timeout = Duration::from_millis(300);
        let pool = Arc::new(Pool::new(&settings).unwrap());
        (pool, Arc::new(Target::new("g", addr, 1).unwrap()))
    }

    /// A raw upstream that takes one connection and answers its `n`th request (from 0)
    /// with `OK` after `delay(n)`, or never when that is `None`; returns its address.
    async fn one_connection_upstream(delay: fn(usize) -> Option<Duration>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let mut requests = 0;
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                if let Some(delay) = delay(requests) {
                    tokio::time::sleep(delay).await;
                    stream.write_all(OK).await.unwrap();
                }
                requests += 1;
            }
        });
        addr
    }

    async fn try_get(pool: &Arc<Pool>) -> Result<(), SendError> {
        attempt(pool).await.map(drop)
    }

    #[tokio::test]
    async fn a_reused_connection_still_times_out_its_response_head() {
        // Answers the first request on a connection and never the second: the head
        // clock kept with the connection, re-armed for the second request, must fire.
        let addr = one_connection_upstream(|n| (n == 0).then_some(Duration::ZERO)).await;
        let (pool, target) = pool(&addr, 8);
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(
            pool.idle(0),
            1,
            "the connection is back for the second request"
        );

        let root = Outgoing::bare(&Method::GET, "/");
        let started = Instant::now();
        let head_by = started + Duration::from_millis(200);
        let second = pool
            .send(0, &root.head(), AttemptBody::empty(), &mut by(head_by))
            .await;
        assert!(matches!(second, Err(SendError::TimedOut)), "{second:?}");
        assert!(Instant::now() >= head_by, "not before its deadline");
        assert_eq!(pool.idle(0), 0, "the late connection is closed, not kept");
    }

    /// Mutation: in `timer::poll_deadline`, answer `Ready` when the timer fires without
    /// looking at the deadline, and the second request times out at the first's.
    #[tokio::test]
    async fn a_head_clock_left_at_the_last_requests_deadline_does_not_cut_the_next_short() {
        // The first request leaves the connection's timer at its own deadline, a second
        // out; the second, due in five, is answered after that second has passed.
        let addr =
            one_connection_upstream(|n| Some(Duration::from_millis(if n == 0 { 0 } else { 1500 })))
                .await;
        let (pool, target) = pool(&addr, 8);
        let first_by = Instant::now() + Duration::from_secs(1);
        let body = send_by(&pool, &target, first_by).await;
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(pool.idle(0), 1, "the second request reuses the connection");

        // Due in five seconds.
        let second = attempt(&pool).await;
        assert!(
            Instant::now() > first_by,
            "the first deadline passed meanwhile"
        );
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[tokio::test]
    async fn at_max_connections_per_target_a_request_waits_for_one_to_come_back() {
        let up = upstream(OK, Then::KeepOpen).await;
        let (pool, target) = capped_pool(&up.addr, 2);
        // Two responses whose bodies are not read yet hold both connections.
        let first = send(&pool, &target).await;
        let second = send(&pool, &target).await;
        let third = tokio::spawn({
            let (pool, target) = (pool.clone(), target.clone());
            async move { get(&pool, &target).await }
        });
        // On this single-threaded runtime the yield lets the third request run until it
        // waits for room.
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "it waits");
        assert_eq!(first.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(third.await.unwrap(), "ok", "on the connection given back");
        assert_eq!(second.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "never a third");
    }

    #[tokio::test]
    async fn a_request_finding_every_connection_busy_until_connect_timeout_is_saturated() {
        let up = upstream(OK, Then::KeepOpen).await;
        let (pool, target) = capped_pool(&up.addr, 1);
        let held = send(&pool, &target).await;
        let started = Instant::now();
        let busy = try_get(&pool).await;
        assert!(matches!(busy, Err(SendError::Saturated)), "{busy:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A body dropped unread closes its connection, and that frees its place.
        drop(held);
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_reaper_closes_expired_and_closed_connections() {
        let up = upstream(OK, Then::KeepOpen).await;
        let mut settings = UpstreamSettings::new("g", &[&up.addr]);
        settings.idle_timeout = Duration::from_millis(100);
        let pool = Arc::new(Pool::new(&settings).unwrap());
        let target = Arc::new(Target::new("g", &up.addr, 1).unwrap());
        assert_eq!(get(&pool, &target).await, "ok");
        pool.reap();
        assert_eq!(pool.idle(0), 1, "not expired yet");
        tokio::time::sleep(Duration::from_millis(150)).await;
        pool.reap();
        assert_eq!(pool.idle(0), 0, "expired");
        assert!(reaches(&up.closed_by_proxy, 1).await, "and closed");
    }

    /// Sends a `GET /` and returns the attempt's result (the body's lease kept).
    async fn attempt(pool: &Arc<Pool>) -> Result<(Response<Received>, Option<Lease>), SendError> {
        let root = Outgoing::bare(&Method::GET, "/");
        pool.send(
            0,
            &root.head(),
            AttemptBody::empty(),
            &mut by(Instant::now() + Duration::from_secs(5)),
        )
        .await
    }

    #[tokio::test]
    async fn an_ambiguously_framed_response_breaks_the_exchange_and_closes_the_connection() {
        // What a smuggler sends: one framing says the body is empty, the other that a
        // second response follows on the connection.
        let smuggling =
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        let up = upstream(smuggling, Then::KeepOpen).await;
        let (pool, _) = pool(&up.addr, 8);
        let refused = attempt(&pool).await;
        assert!(
            matches!(refused, Err(SendError::Exchange(_))),
            "{refused:?}"
        );
        assert_eq!(pool.idle(0), 0, "never kept");
        assert!(reaches(&up.closed_by_proxy, 1).await, "closed");
    }

    #[tokio::test]
    async fn a_response_followed_by_bytes_nobody_asked_for_is_not_kept() {
        let extra = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n";
        let up = upstream(extra, Then::KeepOpen).await;
        let (pool, target) = pool(&up.addr, 8);
        assert_eq!(get(&pool, &target).await, "ok");
        assert_eq!(
            pool.idle(0),
            0,
            "what followed would be read as the next response"
        );
    }

    #[tokio::test]
    async fn chunked_responses_stream_with_their_trailers_and_the_connection_is_kept() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-sum: 7\r\n\r\n";
        let up = upstream(chunked, Then::KeepOpen).await;
        let (pool, target) = pool(&up.addr, 8);
        for _ in 0..2 {
            let collected = send(&pool, &target).await.collect().await.unwrap();
            assert_eq!(
                collected.trailers().map(|t| &t["x-sum"]),
                Some(&http::HeaderValue::from_static("7"))
            );
            assert_eq!(collected.to_bytes(), "ok");
        }
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            1,
            "one connection for both"
        );
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_up_chunked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let received = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"0\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
            stream.write_all(OK).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let (pool, target) = pool(&addr, 8);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(2);
        let stream = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let slot = super::super::body::BodySlot::new(stream);
        let body = slot.attempt();
        let sending = tokio::spawn({
            let pool = pool.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                let up = Outgoing::bare(&Method::POST, "/up");
                let (rsp, lease) = pool
                    .send(0, &up.head(), body, &mut by(deadline))
                    .await
                    .unwrap();
                UpstreamBody::new(rsp.into_body(), lease, deadline, target.start_request())
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
            }
        });
        for part in ["hello", " world"] {
            tx.send(Ok(http_body::Frame::data(Bytes::from(part))))
                .await
                .unwrap();
        }
        drop(tx);
        assert_eq!(sending.await.unwrap(), "ok");
        let got = received.await.unwrap();
        assert!(got.starts_with("POST /up HTTP/1.1\r\n"), "{got}");
        assert!(got.contains("\r\ntransfer-encoding: chunked\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "{got}"
        );
    }

    /// The frames sent on `rx`, as a stream.
    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
